"""Preference-pair data for DPO: JSONL pairs, built-in pairs, tokenizing, batches.

Sources (`dpo.train_files` / `dpo.eval_files`):

- JSONL globs (comma-separated): one JSON object per line with string fields
  `prompt`, `chosen`, `rejected`. Empty lines are skipped. A malformed line
  (bad JSON, not an object, a missing or non-string field, an empty response)
  stops loading with `file:line`, or, with `dpo.skip_bad_lines`, is skipped and
  counted (the count is logged).
- `builtin`: pairs made offline from the built-in corpus (the Python standard
  library, `data/builtin.py`, split train/eval by file). Pair k takes file
  k mod F, cuts it at a line start chosen by a hash of (file, k): the prompt is
  the text before the cut, `chosen` the true continuation after it, `rejected`
  the text after a line start of another file of the same split. Deterministic.

Tokenizing keeps the prompt's ids identical in both sequences: the prompt is
encoded once and each response is encoded separately and appended, so no BPE
merge across the boundary can change the prompt's tokens. As in pretraining a
sequence is one document, `[BOS] + prompt + response + [EOS]`. The prompt keeps
its last `max_prompt_len` tokens; the whole sequence is cut to `max_len`
tokens at the end of the response (a cut response loses its EOS). Rows are
`max_len` wide: `inputs = tokens[:-1]`, `targets = tokens[1:]`, and
`loss_mask` is 1 only where the target is a response token or its EOS.

Every example carries `pair_index`, its position in the split's pair list
(stable across shuffling, epochs and processes), by which the DPO loop looks
up precomputed reference log-probs (`dpo.precompute_reference`);
`ordered_batches` reads a split's pairs once, in that order.
"""

import json

import grain
import numpy as np
from absl import logging

from data import builtin
from data import sources
from data import sft
from data import tokenizers
from align.losses import SIDE_KEYS

DataError = sources.DataError
BuiltinPairs = builtin.BuiltinPairs   # the built-in pairs live with the corpus
FIELDS = ('prompt', 'chosen', 'rejected')


# ----------------------------------------------------------------------------
# JSONL pairs.


def _parse_line(line: str):
  """(prompt, chosen, rejected) or a reason string."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    return f'bad JSON ({e.msg} at column {e.colno})'
  if not isinstance(obj, dict):
    return f'not a JSON object but {type(obj).__name__}'
  for field in FIELDS:
    if field not in obj:
      return f'missing field {field!r}'
    if not isinstance(obj[field], str):
      return f'field {field!r} is {type(obj[field]).__name__}, not a string'
  for field in ('chosen', 'rejected'):
    if not obj[field].strip():
      return f'empty response {field!r}'
  return tuple(obj[f] for f in FIELDS)


def read_jsonl_pairs(paths, *, skip_bad_lines: bool = False):
  """Reads pairs from JSONL files; returns (pairs, number of lines skipped)."""
  pairs, skipped = [], 0
  for path in paths:
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        parsed = _parse_line(line)
        if isinstance(parsed, str):
          if not skip_bad_lines:
            raise DataError(f'{path}:{number}: {parsed} (set '
                            '--config.dpo.skip_bad_lines=True to skip such lines)')
          skipped += 1
          logging.debug('%s:%d: skipped: %s', path, number, parsed)
          continue
        pairs.append(parsed)
  return pairs, skipped


# ----------------------------------------------------------------------------
# Tokenizing.


def encode_side(prompt_ids, response_ids, *, bos_id: int, eos_id: int,
                max_len: int) -> dict:
  """One sequence's row fields, each [max_len] (see the module docstring)."""
  # The SFT layout: weights mark the response and its EOS.
  tokens, weights = sft.join_segments([(prompt_ids, False), (response_ids, True)],
                                      bos_id=bos_id, eos_id=eos_id)
  tokens, weights = tokens[:max_len + 1], weights[:max_len + 1]
  n = len(tokens) - 1                       # inputs/targets that exist
  out = {k: np.zeros(max_len, np.int32) for k in SIDE_KEYS if k != 'loss_mask'}
  out['inputs'][:n] = tokens[:-1]
  out['targets'][:n] = tokens[1:]
  out['positions'][:n] = np.arange(n)
  out['segment_ids'][:n] = 1
  mask = np.zeros(max_len, np.float32)
  mask[:n] = weights[1:]                    # the target of position t is token t+1
  out['loss_mask'] = mask
  return out


class TokenizePair:
  """(prompt, chosen, rejected) strings -> `chosen_*` and `rejected_*` rows."""

  def __init__(self, tokenizer, max_prompt_len: int, max_len: int):
    self.tokenizer = tokenizer
    self.max_prompt_len, self.max_len = max_prompt_len, max_len

  def __call__(self, pair):
    prompt, chosen, rejected = pair
    tok = self.tokenizer
    prompt_ids = np.asarray(tok.encode(prompt), np.int32)
    if self.max_prompt_len >= 0:
      prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), self.max_prompt_len):]
    out = {}
    for name, response in (('chosen', chosen), ('rejected', rejected)):
      side = encode_side(prompt_ids, np.asarray(tok.encode(response), np.int32),
                         bos_id=tok.bos_id, eos_id=tok.eos_id, max_len=self.max_len)
      out.update({f'{name}_{k}': v for k, v in side.items()})
    return out


class IndexedPair:
  """(pair index, pair) -> the rows of `TokenizePair` and `pair_index`."""

  def __init__(self, tokenize: TokenizePair, num_pairs: int):
    self.tokenize, self.num_pairs = tokenize, num_pairs

  def __call__(self, index: int, pair):
    # grain passes later epochs' indices unwrapped (epoch * num_pairs + i).
    return dict(self.tokenize(pair), pair_index=np.int32(index % self.num_pairs))


def _stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------
# Iterators.


def check_lengths(dpo_cfg) -> None:
  if not (dpo_cfg.max_prompt_len >= 0 and dpo_cfg.max_len >= dpo_cfg.max_prompt_len + 2):
    raise DataError(f'dpo.max_len={dpo_cfg.max_len} must be at least '
                    f'dpo.max_prompt_len + 2 = {dpo_cfg.max_prompt_len + 2} (BOS, the '
                    'prompt and one response token)')


def pairs_for(cfg, split: str):
  """The pair source of `split` (`train` or `eval`); logs skipped lines."""
  d = cfg.dpo
  spec = d.train_files if split == 'train' else d.eval_files
  if spec == 'builtin':
    return BuiltinPairs(split, prompt_chars=d.max_prompt_len,
                        response_chars=d.max_len - d.max_prompt_len)
  try:
    paths = sources.expand_globs(spec, f'{split}_files')
  except DataError as e:        # its message names the `data.` section
    raise DataError(str(e).replace('data.', 'dpo.', 1)) from None
  pairs, skipped = read_jsonl_pairs(paths, skip_bad_lines=d.get('skip_bad_lines', False))
  if skipped:
    logging.warning('dpo.%s_files: skipped %d malformed lines', split, skipped)
  if not pairs:
    raise DataError(f'dpo.{split}_files={spec!r}: no preference pairs')
  return pairs


def _tokenizer(cfg, num_pairs: int) -> IndexedPair:
  check_lengths(cfg.dpo)
  tokenizer = tokenizers.get_tokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise DataError(f'data.tokenizer={cfg.data.tokenizer!r} has '
                    f'{tokenizer.vocab_size} ids but model.vocab_size='
                    f'{cfg.model.vocab_size}')
  return IndexedPair(TokenizePair(tokenizer, cfg.dpo.max_prompt_len, cfg.dpo.max_len),
                     num_pairs)


def ordered_batches(cfg, split: str, batch_size: int, count: int | None = None):
  """Pairs 0 .. count - 1 of `split` (default: all), once and in order.

  Yields batches of `batch_size` rows with the fields of `make_iterator`; the
  last one is filled up with empty rows (all zero, `pair_index` -1).
  """
  pairs = pairs_for(cfg, split)
  tokenize = _tokenizer(cfg, len(pairs))
  count = len(pairs) if count is None else min(count, len(pairs))
  for start in range(0, count, batch_size):
    rows = [tokenize(i, pairs[i]) for i in range(start, min(start + batch_size, count))]
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    empty['pair_index'] = np.int32(-1)
    yield _stack(rows + [empty] * (batch_size - len(rows)))


def num_pairs(cfg, split: str) -> int:
  return len(pairs_for(cfg, split))


def make_iterator(cfg, split: str = 'train', process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """A checkpointable iterator of this process's DPO batches.

  Each batch is a dict of [global_batch_size // process_count, max_len] numpy
  arrays: `chosen_*` and `rejected_*` for the fields of `SIDE_KEYS`, and
  `pair_index` int32 [global_batch_size // process_count]. `train` shuffles
  with `data.shuffle_seed` and repeats forever; `eval` reads the first
  `train.eval_steps` batches in order (pairs 0, 1, ..., wrapping around), the
  same ones on every call.
  """
  global_batch = cfg.train.global_batch_size
  if global_batch % process_count:
    raise DataError(f'train.global_batch_size={global_batch} does not divide '
                    f'over {process_count} processes')
  # Indexed before the shuffle: the index is the pair's place in the source.
  pairs = pairs_for(cfg, split)
  ds = grain.MapDataset.source(pairs).map_with_index(_tokenizer(cfg, len(pairs)))
  if split == 'train':
    ds = ds.shuffle(seed=cfg.data.shuffle_seed)
  ds = ds.repeat()[process_index::process_count]
  ds = ds.batch(global_batch // process_count, batch_fn=_stack)
  if split == 'eval':
    ds = ds[:cfg.train.eval_steps]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
