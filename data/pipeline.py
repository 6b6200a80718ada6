"""The grain input pipeline: documents -> tokens -> packed rows -> batches.

    it = data.pipeline.make_iterator(cfg, 'train', jax.process_index(), jax.process_count())
    batch = next(it)   # dict of numpy arrays, each [global_batch_size // process_count, seq_len]

Batch fields (see `data/packing.py` for the layout): `inputs` int32, `targets`
int32 (the next token), `segment_ids` int32 (1, 2, ... per document piece in
the row, 0 = padding), `positions` int32 (restart at 0 at each piece),
`loss_mask` float32 (1 where the target is the next token of the same
document). Documents are tokenized as `[BOS] + encode(text) + [EOS]` when the
pipeline reaches them (nothing is tokenized up front); `synthetic` documents
are random token ids without BOS/EOS. `sft` examples are tokenized segment by
segment (`data/sft.py`) and `loss_mask` is also 0 where the target is not a
response token.

Row slots and process sharding. The global batch has `B = global_batch_size`
row slots. Slot r reads documents r, r+B, r+2B, ... of the document stream
(the shuffled, endlessly repeated document list) and packs them into its own
sequence of rows; the global batch at step t is row t of every slot, in slot
order. Process p of P owns slots [p*B/P, (p+1)*B/P): it reads only its own
slots' documents, and the local batches of all processes at one step,
concatenated in process order, are exactly the single-process global batch at
that step. So the data never depends on the number of hosts, and the local
batch is the process's contiguous block of global rows (what
`jax.make_array_from_process_local_data` expects for a batch sharded over the
leading axis).

Splits. `train`: documents shuffled with `data.shuffle_seed` (grain's index
shuffle, a new permutation every epoch), repeating forever. `eval`: documents
in source order, not shuffled, repeating if the eval set is small; the
iterator stops after `train.eval_steps` batches, and every `make_iterator`
call starts again from the first batch, so each eval sees the same tokens.

`data.worker_count > 0` reads the training batches in that many grain worker
processes (`mp_prefetch`); each worker handles its share of the batches, so
the sequence of batches depends on `worker_count` (but is deterministic and
restorable for a fixed value; 0 and 1 give the same batches). With 0 a
background thread prepares the next batches while the step runs.

Mixtures (`data.mixture`, `data/mixture.py`). Each source is its own
shuffled, repeating document list (seeded from `data.shuffle_seed` and the
source's position). Row slot r takes documents r, r+B, ... of every source
and grain's `MapDataset.mix` interleaves them in proportion to the weights,
so documents (not tokens) come in those proportions in every slot, and each
slot's stream is a pure function of the index: the checkpointed iterator
state restores every source's position. (Mixing one stream before the slots
stride over it would give a slot a single source whenever the interleaving's
period divides the batch.)
Each token carries its source through packing; batches gain `source_tokens`
(int32 [b, num_sources], `data/packing.py`). Eval reads each source's own
eval split (`make_iterator(cfg, 'eval', source=NAME)`, `eval_sources`).
Prepared token folders (`tokens`) are checked against `data.tokenizer` (the
vocabulary fingerprint) and `model.vocab_size`.

Checkpointing. The iterator is a `grain.DatasetIterator`: `get_state()` is a
small JSON-able dict and `set_state(state)` resumes at the exact next batch.
grain ships an orbax handler that writes one `process_{i}-of-{n}.json` per
process (`i` = `jax.process_index()`); put it beside the model state:

    import grain
    import orbax.checkpoint as ocp

    it = data.pipeline.make_iterator(cfg, 'train', jax.process_index(), jax.process_count())
    mngr = ocp.CheckpointManager(workdir + '/checkpoints')
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(it)))      # state read at save()
    ...
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))   # `it` resumes in place

The iterator's state is taken when `save` is called (the handler is
synchronous even in an async CheckpointManager), so the loop may go on
drawing batches while the model state is written.
"""

import atexit
import functools
import weakref

from absl import flags
from absl import logging
import grain
import numpy as np

from data import mixture
from data import packing
from data import sft
from data import sources
from data import tokenizers

_TRAIN_PREFETCH = 2  # Batches a background thread prepares ahead of the step.
_SEED_SPREAD = 0x9E3779B1  # An odd constant (2**32 / golden ratio): a bijection mod 2**32.
_SOURCE_SPREAD = 0x6C8E9CF5  # Another odd constant: one seed per mixture source.


class TokenizeDocument:
  """text -> {'tokens': int32 [BOS] + ids + [EOS]}."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str):
    ids = self.tokenizer.encode_array(text)
    tokens = np.empty(len(ids) + 2, np.int32)
    tokens[0] = self.tokenizer.bos_id
    tokens[1:-1] = ids
    tokens[-1] = self.tokenizer.eos_id
    return {packing.TOKENS: tokens}


def wrap_tokens(tokens: np.ndarray):
  """Synthetic documents are token arrays already."""
  return {packing.TOKENS: tokens}


class _ThreadPrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):
  """grain's prefetch iterator, with a `close` that may run twice.

  The first close (ours, at exit) joins the thread; grain's `__del__` closes
  again during interpreter teardown, when its module globals are gone.
  """

  def close(self):
    if not self._closed:
      super().close()


class _ThreadPrefetch(grain.experimental.ThreadPrefetchIterDataset):

  def __iter__(self):
    return _ThreadPrefetchIterator(self._parent.__iter__(), self._prefetch_buffer_size)


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise sources.DataError(message)


class AddSource:
  """Marks every token of a document with its mixture source index."""

  def __init__(self, index: int):
    self.index = index

  def __call__(self, element):
    element = dict(element)
    element[packing.SOURCE] = np.full(len(element[packing.TOKENS]), self.index, np.int32)
    return element


class _CountSourcesIterator(grain.DatasetIterator):
  """Takes `source_tokens` out of each batch and keeps the running totals.

  The totals are part of the iterator state, so a resumed run continues them
  exactly; `tokens_seen(n)` gives them after the n-th batch of the run (the
  last few are remembered, since the loop logs a step after drawing the next).
  """

  def __init__(self, parent, names):
    super().__init__(parent)
    self.names = names
    self._batches = 0
    self._totals = [0] * len(names)
    self._history = {}

  def __next__(self):
    batch = dict(next(self._parent))
    counts = batch.pop(packing.SOURCE_TOKENS).sum(axis=0)
    self._totals = [t + int(c) for t, c in zip(self._totals, counts)]
    self._batches += 1
    self._history[self._batches] = list(self._totals)
    self._history.pop(self._batches - 8, None)
    return batch

  def tokens_seen(self, batches: int | None = None) -> dict[str, int]:
    """{source name: input tokens from it in this process's rows so far}."""
    totals = self._history.get(batches, self._totals)
    return dict(zip(self.names, totals))

  def get_state(self):
    return {'parent': self._parent.get_state(), 'batches': self._batches,
            'source_tokens': list(self._totals)}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._batches = int(state['batches'])
    self._totals = [int(t) for t in state['source_tokens']]
    self._history = {self._batches: list(self._totals)}

  def close(self):
    self._parent.close()


class _CountSources(grain.IterDataset):

  def __init__(self, parent, names):
    super().__init__(parent)
    self.names = names

  def __iter__(self):
    return _CountSourcesIterator(self._parent.__iter__(), self.names)


def _check_prepared(data_cfg, split, tokenizer, vocab_size) -> None:
  """Prepared folders must match data.tokenizer and fit model.vocab_size."""
  field = f'{split}_files' if data_cfg[f'{split}_files'].strip() else 'train_files'
  for folder in sources.expand_folders(data_cfg[field], field):
    meta = sources.read_prepared(folder)
    _check(meta['tokenizer_fingerprint'] == tokenizer.fingerprint(),
           f'{folder} was prepared with tokenizer {meta["tokenizer"]!r} (vocabulary '
           f'{meta["tokenizer_fingerprint"][:19]}...) but data.tokenizer='
           f'{data_cfg.tokenizer!r} has vocabulary {tokenizer.fingerprint()[:19]}...: '
           'set data.tokenizer to the one the folder was prepared with')
    _check(meta['vocab_size'] <= vocab_size,
           f'{folder} holds ids of a {meta["vocab_size"]}-id vocabulary but '
           f'model.vocab_size={vocab_size}')


def _documents(cfg, data_cfg, split: str, index: int, sourced: bool) -> grain.MapDataset:
  """One source's document stream: token dicts, shuffled and repeating (train)."""
  seq_len, vocab_size = cfg.train.seq_len, cfg.model.vocab_size
  docs = sources.documents(data_cfg, split, vocab_size=vocab_size, seq_len=seq_len)
  if data_cfg.source in ('synthetic', 'tokens'):
    to_tokens = wrap_tokens
  if data_cfg.source != 'synthetic':
    tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
    if data_cfg.source == 'tokens':   # first: its message names the folder
      _check_prepared(data_cfg, split, tokenizer, vocab_size)
    _check(tokenizer.vocab_size <= vocab_size,
           f'data.tokenizer={data_cfg.tokenizer!r} has {tokenizer.vocab_size} '
           f'ids but model.vocab_size={vocab_size}')
    if data_cfg.source != 'tokens':
      to_tokens = (sft.TokenizeExample(tokenizer) if data_cfg.source == 'sft'
                   else TokenizeDocument(tokenizer))
  _check(len(docs) > 0, f'data.source={data_cfg.source!r}'
         f'{" (" + data_cfg.train_files + ")" if sourced else ""}: the {split} '
         'split has no documents')
  if data_cfg.source in ('text', 'jsonl', 'arrayrecord', 'parquet'):
    # Stops at the first document with text (the first, in any real corpus);
    # only empty documents would train on BOS and EOS alone.
    _check(any(len(docs[i]) for i in range(len(docs))),
           f'data.source={data_cfg.source!r}: every document of the {split} '
           f'split ({len(docs)}) is empty; check data.{split}_files'
           + (' and data.text_field' if data_cfg.source in ('jsonl', 'parquet') else ''))

  if split == 'train' and data_cfg.source != 'synthetic':
    # grain shuffles epoch e with seed + e, so seeds 1 and 2 would share
    # permutations one epoch apart; spreading the seeds keeps runs that differ
    # only in data.shuffle_seed independent.
    seed = (data_cfg.shuffle_seed * _SEED_SPREAD + 1 + index * _SOURCE_SPREAD) % 2**32
    stream = docs.shuffle(seed=seed).repeat()
  else:
    stream = docs.repeat()
  stream = stream.map(to_tokens)
  return stream.map(AddSource(index)) if sourced else stream


def eval_sources(cfg) -> list[tuple[str | None, float]]:
  """`(name, weight)` of each eval stream: the mixture's sources, or
  `[(None, 1.0)]` for a single source."""
  entries = mixture.parse(cfg.data.get('mixture', ''))
  return [(s.name, s.weight) for s in entries] or [(None, 1.0)]


def make_dataset(cfg, split: str = 'train', process_index: int = 0,
                 process_count: int = 1, source: str | None = None) -> grain.IterDataset:
  """The batches of `split` for one process, as a grain IterDataset.

  `source`: with `data.mixture`, the eval split of that source alone.
  """
  _check(split in ('train', 'eval'), f'split={split!r}: must be train or eval')
  _check(process_count >= 1 and 0 <= process_index < process_count,
         f'process_index={process_index}, process_count={process_count}: '
         'need 0 <= process_index < process_count')
  global_batch = cfg.train.global_batch_size
  _check(global_batch % process_count == 0,
         f'train.global_batch_size={global_batch} does not divide over '
         f'{process_count} processes')
  _check(0 <= cfg.data.shuffle_seed < 2**32,
         f'data.shuffle_seed={cfg.data.shuffle_seed}: must be in [0, 2**32)')
  seq_len = cfg.train.seq_len

  entries = mixture.parse(cfg.data.get('mixture', ''))
  names = [e.name for e in entries]
  if entries and split == 'eval':
    _check(source in names, f'source={source!r}: the eval split of a mixture is '
           f'read per source, one of {", ".join(names)}')
    entries = [entries[names.index(source)]]
  else:
    _check(source is None or (entries and source in names),
           f'source={source!r}: no such data.mixture source')
  sourced = bool(entries) and split == 'train'
  if entries:
    streams = [_documents(cfg, mixture.data_config(cfg.data, e), split, i, sourced)
               for i, e in enumerate(entries)]
    if sourced and process_index == 0:
      logging.info('%s', mixture.describe(entries))
  else:
    streams = [_documents(cfg, cfg.data, split, 0, False)]
  weights = [e.weight for e in entries]
  num_sources = len(entries) if sourced else 0

  local_batch = global_batch // process_count
  first_slot = process_index * local_batch
  # Threads would only contend for the GIL here: a slot reads one document
  # per many rows, and the whole batch is prefetched in one thread below.
  read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  slots = []
  for slot in range(first_slot, first_slot + local_batch):
    # Each slot mixes its own share of every source: mixing one stream
    # before the slots stride over it would give a slot only one source when
    # the interleaving's period divides the batch.
    slot_streams = [stream[slot::global_batch] for stream in streams]
    slot_docs = (grain.MapDataset.mix(slot_streams, weights) if len(streams) > 1
                 else slot_streams[0])
    slots.append(packing.pack(slot_docs.to_iter_dataset(read_options),
                              seq_len + 1, cfg.data.packing,
                              weighted=cfg.data.source == 'sft' and not entries,
                              sourced=sourced))
  ds = grain.experimental.ZipIterDataset(slots).map(
      functools.partial(packing.rows_to_batch, num_sources=num_sources))

  if split == 'eval':
    _check(cfg.train.eval_steps > 0,
           f'train.eval_steps={cfg.train.eval_steps}: no eval batches to read')
    return grain.experimental.LimitIterDataset(ds, count=cfg.train.eval_steps)
  if cfg.data.worker_count > 0:
    # grain's worker processes read absl flags; outside an absl app (tests,
    # notebooks) they are unparsed and reading them raises. Defaults are fine.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.worker_count))
  else:
    ds = _ThreadPrefetch(ds, prefetch_buffer_size=_TRAIN_PREFETCH)
  return _CountSources(ds, names) if sourced else ds


def tokens_seen(it, batches: int | None = None) -> dict[str, int]:
  """Per mixture source, the input tokens (not padding) that `it`, a train
  iterator, has given in this process's rows up to its `batches`-th batch
  (default: so far), counted since step 0 across resumes; {} without a
  mixture."""
  return it.tokens_seen(batches) if isinstance(it, _CountSourcesIterator) else {}


def make_iterator(cfg, split: str = 'train', process_index: int = 0,
                  process_count: int = 1, source: str | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's batches of `split`.

  Args:
    cfg: the full config (`data`, `train.global_batch_size`, `train.seq_len`,
      `train.eval_steps`, `model.vocab_size`).
    split: `train` (shuffled, endless) or `eval` (fixed, `train.eval_steps`
      batches, the same on every call).
    process_index: this process, `jax.process_index()`.
    process_count: all processes, `jax.process_count()`.
    source: with `data.mixture`, the eval split of this source (`eval_sources`).

  Returns:
    A grain DatasetIterator of dicts of numpy arrays, each
    `[global_batch_size // process_count, seq_len]`, with `get_state()` and
    `set_state()`. Call `close()` when done with a train iterator (it is also
    closed at interpreter exit).
  """
  it = iter(make_dataset(cfg, split, process_index, process_count, source))
  if split == 'train':
    _close_at_exit(it)
  return it


def _close_at_exit(it: grain.DatasetIterator) -> None:
  # A prefetch thread still running while the interpreter shuts down can be
  # inside grain's C++ index shuffle when Python kills it, which aborts the
  # process (exit code 134 instead of 0); closing first joins the thread.
  ref = weakref.ref(it)

  def close():
    live = ref()
    if live is not None:
      live.close()

  atexit.register(close)


def has_eval(cfg) -> bool:
  """Whether the config names eval data (`text`/`jsonl`/`arrayrecord` need
  `data.eval_files`; `builtin` and `synthetic` always have it; `tokens` has
  its folders' eval split; a mixture needs an eval split in every source)."""
  entries = mixture.parse(cfg.data.get('mixture', ''))
  if entries:
    return all(sources.has_split(mixture.data_config(cfg.data, e), 'eval')
               for e in entries)
  return sources.has_split(cfg.data, 'eval')
