"""Packing token documents into fixed-length rows, and rows into batches.

A document arrives as `{'tokens': int32 [BOS, ..., EOS]}`, optionally with
`'loss_weights': float32` of the same length (SFT examples, `data/sft.py`: 1
where the token counts as a target). Rows hold `row_len = seq_len + 1` tokens,
so that one row gives `seq_len` inputs and their next-token targets. The
weights travel with their tokens through both packers, so a document split
across rows keeps its mask in every piece.

* `packing=True`: concatenate-then-split (grain's `ConcatThenSplitIterDataset`,
  as in T5's packed pre-training, Raffel et al., 2020): documents are laid end
  to end and cut every `row_len` tokens, no padding. A document longer than
  the room left in a row is split; the continuation starts the next row as a
  segment of its own, with positions restarting at 0 (so positions never
  exceed `seq_len`, which learned position tables need).
* `packing=False`: one document per row. A document longer than a row is cut
  into consecutive rows (nothing is thrown away); the last piece is padded
  with token 0 and segment id 0.

Either way every token of every document lands in exactly one row, in order.
`rows_to_batch` then builds the training fields of a batch of rows:

    inputs      = tokens[:, :-1]                      int32   [b, seq_len]
    targets     = tokens[:, 1:]                       int32   [b, seq_len]
    segment_ids = segment[:, :-1]   1, 2, ... per piece in the row, 0 = pad
    positions   = position[:, :-1]  0, 1, ... restarting at each piece
    loss_mask   = segment[:, 1:] == segment[:, :-1] != 0    float32
                  (times loss_weights[:, 1:] when documents carry weights)

so a target counts only when it is the next token of the same document piece:
never on padding, never across a document boundary (the BOS that starts a
document is never a target), and for weighted documents only where the
target token's weight says so. The one next-token pair a row boundary cuts (the
last token of a row and the first of the next) is not trained, as in any
concatenate-then-split pipeline.
"""

import grain
import numpy as np

# Keys of a packed row; the segment/position names are grain's convention.
TOKENS, SEGMENT_IDS, POSITIONS = 'tokens', 'tokens_segment_ids', 'tokens_positions'
LOSS_WEIGHTS = 'loss_weights'  # optional: float32, one weight per token
SOURCE = 'source'              # optional: int32, the mixture source of each token
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')
# Batch field of mixtures: int32 [b, num_sources], the input tokens of each row
# that came from each source. The loop takes it out before the step.
SOURCE_TOKENS = 'source_tokens'


class ChunkDocument(grain.experimental.FlatMapTransform):
  """One document -> rows of `row_len` tokens holding only that document."""

  def __init__(self, row_len: int):
    self.row_len = row_len
    self.max_fan_out = 1 << 30  # Unbounded; only the iterator form is used.

  def flat_map(self, element):
    tokens = element[TOKENS]
    weights = element.get(LOSS_WEIGHTS)
    source = element.get(SOURCE)
    rows = []
    for start in range(0, len(tokens), self.row_len):
      piece = tokens[start:start + self.row_len]
      n = len(piece)
      row = np.zeros(self.row_len, np.int32)
      row[:n] = piece
      segment = np.zeros(self.row_len, np.int32)
      segment[:n] = 1
      position = np.zeros(self.row_len, np.int32)
      position[:n] = np.arange(n, dtype=np.int32)
      rows.append({TOKENS: row, SEGMENT_IDS: segment, POSITIONS: position})
      if weights is not None:
        row_weights = np.zeros(self.row_len, np.float32)
        row_weights[:n] = weights[start:start + self.row_len]
        rows[-1][LOSS_WEIGHTS] = row_weights
      if source is not None:
        row_source = np.zeros(self.row_len, np.int32)
        row_source[:n] = source[start:start + self.row_len]
        rows[-1][SOURCE] = row_source
    return rows


class _JsonRestorableIterator(grain.DatasetIterator):
  """Passes a concat-then-split iterator through, fixing its restored state.

  grain 0.2.18's packer marks "no remainder" with the tuple (-1, -1) and
  compares against it with `!=`; after the JSON round trip of grain's own
  orbax handler the tuple comes back as a list, the packer takes the next
  document for a remainder and slices it away (a document silently lost).
  Turning the slices back into tuples on restore avoids that.
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    state = dict(state)
    state['remainder_slices'] = {
        k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state(state)


class _ConcatThenSplit(grain.experimental.ConcatThenSplitIterDataset):

  def __iter__(self):
    return _JsonRestorableIterator(super().__iter__())


def pack(documents: grain.IterDataset, row_len: int, packing: bool,
         weighted: bool = False, sourced: bool = False) -> grain.IterDataset:
  """Documents `{'tokens': int32 [n]}` -> rows of `row_len` tokens.

  `weighted`: documents also hold `loss_weights` [n], packed alongside;
  `sourced`: documents also hold `source` [n] (mixtures), likewise.
  """
  if packing:
    # The features have the same length per document, so grain splits them
    # at the same points.
    length_struct = {TOKENS: row_len}
    if weighted:
      length_struct[LOSS_WEIGHTS] = row_len
    if sourced:
      length_struct[SOURCE] = row_len
    return _ConcatThenSplit(documents, length_struct=length_struct)
  return grain.experimental.FlatMapIterDataset(documents, ChunkDocument(row_len))


def rows_to_batch(rows, num_sources: int = 0) -> dict[str, np.ndarray]:
  """A sequence of packed rows -> the batch dict the training step reads.

  `num_sources > 0` (mixtures): rows hold `source` and the batch gets
  `source_tokens`, int32 [b, num_sources], the count of input tokens (not
  padding) of each row from each source.
  """
  tokens = np.stack([r[TOKENS] for r in rows]).astype(np.int32)       # [b, t+1]
  segment = np.stack([r[SEGMENT_IDS] for r in rows]).astype(np.int32)  # [b, t+1]
  position = np.stack([r[POSITIONS] for r in rows]).astype(np.int32)   # [b, t+1]
  same_piece = (segment[:, 1:] == segment[:, :-1]) & (segment[:, 1:] != 0)
  loss_mask = same_piece.astype(np.float32)
  if LOSS_WEIGHTS in rows[0]:
    weights = np.stack([r[LOSS_WEIGHTS] for r in rows]).astype(np.float32)
    loss_mask *= weights[:, 1:]        # the target of position i is token i + 1
  batch = {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': segment[:, :-1],
      'positions': position[:, :-1],
      'loss_mask': loss_mask,
  }
  if num_sources:
    source = np.stack([r[SOURCE] for r in rows])[:, :-1]                # [b, t]
    real = segment[:, :-1] != 0
    batch[SOURCE_TOKENS] = np.stack(
        [np.sum(real & (source == s), axis=1) for s in range(num_sources)],
        axis=1).astype(np.int32)                                          # [b, S]
  return {k: np.ascontiguousarray(v) for k, v in batch.items()}
