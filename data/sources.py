"""Document sources behind `config.data.source`.

Each source is a random-access list of documents (a `grain.MapDataset`), so
shuffling, sharding and resuming work on document indices and a document is
read only when the pipeline reaches it:

* `builtin`: the Python standard library, one document per file, split train /
  eval by file (`data/builtin.py`).
* `text`: plain UTF-8 text files matched by `data.train_files` /
  `data.eval_files` (comma-separated globs, `**` allowed), one document per
  file, files in sorted order per glob.
* `jsonl`: one JSON object per line, the document is its `data.text_field`
  string. Empty lines are skipped; any other line that is not a JSON object
  with that string field is an error naming `file:line`. Lines are indexed at
  start-up (a byte scan) and parsed when read, so a bad line is reported when
  the pipeline reaches it.
* `arrayrecord`: ArrayRecord files of UTF-8 text records, read through grain's
  `ArrayRecordDataSource`; `write_arrayrecord` makes such files.
* `tokens`: folders written by `python -m data.prepare` (`data/prepare.py`):
  each element is one document's token ids, already `[BOS] ... [EOS]`, read
  from the folder's ArrayRecord shards with random access. `data.eval_files`
  names folders whose `eval` split is read; when it is empty, the eval split
  of the `data.train_files` folders is.
* `parquet`: Parquet files read on the fly, one document per row of the
  column `data.text_field` (`data/corpus.py`); a row group is read when a
  document in it is first needed and a few are kept in memory.
* `synthetic`: documents of uniformly random token ids with random lengths,
  generated from the seed and the document index (benchmarks and tests; no
  files, no tokenizer). Each element is already an int32 token array.
* `sft`: supervised fine-tuning examples, one per JSONL line (`prompt` and
  `response`, or `messages`), read like `jsonl`; each element is a list of
  `(text, counts)` segments (`data/sft.py`). `builtin` as the files makes
  them from the built-in corpus.

Text documents are `str`; the pipeline tokenizes them. With
`data.skip_bad_lines=True` a malformed JSONL line (`jsonl`, `sft`) is skipped
with a warning instead of stopping the pipeline (the element reads as None,
which grain's iterators skip).
"""

import functools
import glob
import json
import os

from absl import logging
import grain
import numpy as np

from configs.errors import UserError
from data import builtin
from data import sft

SOURCES = ('builtin', 'text', 'jsonl', 'arrayrecord', 'synthetic', 'sft',
           'tokens', 'parquet')
PREPARED_METADATA = 'metadata.json'  # what data.prepare writes last
SYNTHETIC_NUM_DOCS = 1 << 40  # Never exhausted in practice.


class DataError(UserError):
  """Bad data or data config; the message names the file, line or field."""


def expand_globs(spec: str, field: str) -> list[str]:
  """Files matched by the comma-separated globs in `spec` (config `field`)."""
  patterns = [p.strip() for p in spec.split(',') if p.strip()]
  if not patterns:
    raise DataError(f'data.{field} is empty: give one or more comma-separated '
                    'globs of data files')
  files, seen = [], set()
  for pattern in patterns:
    matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(m))
    if not matches:
      raise DataError(f'data.{field}: glob {pattern!r} matches no file')
    files.extend(m for m in matches if m not in seen)
    seen.update(matches)
  return files


def expand_folders(spec: str, field: str) -> list[str]:
  """Prepared folders matched by the comma-separated globs in `spec`."""
  patterns = [p.strip() for p in spec.split(',') if p.strip()]
  if not patterns:
    raise DataError(f'data.{field} is empty: give one or more folders written '
                    'by python -m data.prepare')
  folders = []
  for pattern in patterns:
    matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isdir(m))
    if not matches:
      raise DataError(f'data.{field}: {pattern!r} matches no folder')
    folders.extend(m for m in matches if m not in folders)
  return folders


def is_prepared(path: str) -> bool:
  return os.path.isfile(os.path.join(os.path.expanduser(path), PREPARED_METADATA))


def read_prepared(folder: str) -> dict:
  """The metadata.json of a folder written by `python -m data.prepare`."""
  path = os.path.join(os.path.expanduser(folder), PREPARED_METADATA)
  if not os.path.isfile(path):
    raise DataError(f'{folder}: no {PREPARED_METADATA}; not a folder written by '
                    'python -m data.prepare, or that prepare did not finish '
                    '(re-run it to resume)')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class TokenDocuments:
  """Documents of one split of prepared folders, as int32 token arrays."""

  def __init__(self, folders, split: str):
    self.folders = list(folders)
    self.metadata = [read_prepared(f) for f in self.folders]
    first = self.metadata[0]
    for folder, meta in zip(self.folders[1:], self.metadata[1:]):
      if meta['tokenizer_fingerprint'] != first['tokenizer_fingerprint']:
        raise DataError(f'{folder} was prepared with tokenizer {meta["tokenizer"]!r} '
                        f'but {self.folders[0]} with {first["tokenizer"]!r}; '
                        'folders read together need one vocabulary')
    self.dtype = np.dtype(first['dtype']).newbyteorder('<')
    self.paths = [os.path.join(os.path.expanduser(folder), shard['file'])
                  for folder, meta in zip(self.folders, self.metadata)
                  for shard in meta['splits'][split]['shards']]
    self.num_documents = sum(m['splits'][split]['documents'] for m in self.metadata)
    self._source = None

  def __len__(self):
    return self.num_documents

  def __getitem__(self, index) -> np.ndarray:
    if self._source is None:    # opened lazily: once per worker process
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    return np.frombuffer(self._source[index], self.dtype).astype(np.int32)

  def __getstate__(self):
    return dict(self.__dict__, _source=None)


class BuiltinDocuments:
  """The stdlib files of one split, each read when accessed."""

  def __init__(self, split: str):
    self.paths = builtin.split_files(split)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index) -> str:
    return builtin.read_file(self.paths[index])


class TextDocuments:
  """Plain text files, one document per file."""

  def __init__(self, paths):
    self.paths = list(paths)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index) -> str:
    path = self.paths[index]
    try:
      with open(path, encoding='utf-8') as f:
        return f.read()
    except UnicodeDecodeError as e:
      raise DataError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from None


@functools.lru_cache(maxsize=16)
def _index_lines(path: str, mtime_ns: int, size: int):
  """(start offsets, lengths, 1-based line numbers) of the non-empty lines."""
  del mtime_ns, size  # Only part of the cache key: a rewritten file re-indexes.
  newlines = []
  offset = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 24):
      newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + offset)
      offset += len(chunk)
  ends = np.concatenate(newlines + [np.array([offset], np.int64)]).astype(np.int64)
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  lengths = ends - starts
  line_numbers = np.arange(1, len(starts) + 1, dtype=np.int64)
  # A line of nothing but a line feed (or CR LF) is no record; anything else
  # that is not a JSON object is reported when read.
  keep = lengths > 0
  if np.any(lengths == 1):
    with open(path, 'rb') as f:
      for i in np.flatnonzero(lengths == 1):
        f.seek(starts[i])
        keep[i] = f.read(1) != b'\r'
  return starts[keep], lengths[keep], line_numbers[keep]


class _BadLine(Exception):
  """A JSONL line that is not a record of the source; the message says why."""


def _sft_example(record):
  parsed = sft.parse_record(record)
  if isinstance(parsed, str):
    raise _BadLine(parsed)
  return parsed


class JsonlDocuments:
  """One element per JSON line: the string at `field`, or what `parse` makes.

  `parse(record)` turns a line's JSON value into the element, or raises
  `_BadLine` saying why the line is malformed.
  """

  def __init__(self, paths, field: str = 'text', *, parse=None,
               skip_bad_lines: bool = False):
    self.paths = list(paths)
    self.field = field
    self.parse = parse or self._text_field
    self.skip_bad_lines = skip_bad_lines
    starts, lengths, lines, file_ids = [], [], [], []
    for i, path in enumerate(self.paths):
      st = os.stat(path)
      s, n, l = _index_lines(path, st.st_mtime_ns, st.st_size)
      starts.append(s)
      lengths.append(n)
      lines.append(l)
      file_ids.append(np.full(len(s), i, np.int32))
    self._starts = np.concatenate(starts)
    self._lengths = np.concatenate(lengths)
    self._lines = np.concatenate(lines)
    self._file_ids = np.concatenate(file_ids)
    if not len(self._starts):
      raise DataError(f'JSONL files {self.paths} hold no records')
    # Lines skipped so far, while no good one was read: when every line is
    # bad, skipping would spin forever over the repeated stream.
    self._bad, self._any_good = set(), False

  def _text_field(self, record) -> str:
    if not isinstance(record, dict) or self.field not in record:
      raise _BadLine(f'no field {self.field!r} (data.text_field)')
    text = record[self.field]
    if not isinstance(text, str):
      raise _BadLine(f'field {self.field!r} is {type(text).__name__}, not a string')
    return text

  def __len__(self):
    return len(self._starts)

  def __getitem__(self, index):
    path = self.paths[self._file_ids[index]]
    where = f'{path}:{self._lines[index]}'
    with open(path, 'rb') as f:
      f.seek(int(self._starts[index]))
      raw = f.read(int(self._lengths[index]))
    try:
      element = self.parse(json.loads(raw))
      self._any_good = True
      return element
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      reason = f'malformed JSON line ({e})'
    except _BadLine as e:
      reason = str(e)
    if self.skip_bad_lines:
      logging.log_first_n(logging.WARNING, '%s: skipped: %s', 20, where, reason)
      if not self._any_good:
        self._bad.add(int(index))
        if len(self._bad) == len(self):
          raise DataError(f'every line of {", ".join(self.paths)} is malformed '
                          f'(the last, {where}: {reason})')
      return None
    raise DataError(f'{where}: {reason} (or set --config.data.skip_bad_lines=True '
                    'to skip such lines)')


class ArrayRecordDocuments:
  """ArrayRecord files whose records are UTF-8 text."""

  def __init__(self, paths):
    self.paths = list(paths)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index) -> str:
    raw = self._source[index]
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise DataError(f'record {index} of {self.paths}: not UTF-8 text '
                      f'({e.reason} at byte {e.start})') from None


def write_arrayrecord(path: str, texts) -> None:
  """Writes `texts` (strings) as one ArrayRecord file of UTF-8 records."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  # group_size:1 keeps every record individually seekable, which the random
  # access of shuffling needs.
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
  try:
    for text in texts:
      writer.write(text.encode('utf-8'))
  finally:
    writer.close()


class SyntheticDocuments:
  """Random token documents; element i is the same on every call and host."""

  def __init__(self, seed: int, vocab_size: int, max_len: int):
    self.seed = seed
    self.vocab_size = vocab_size
    self.max_len = max_len

  def __len__(self):
    return SYNTHETIC_NUM_DOCS

  def __getitem__(self, index) -> np.ndarray:
    rng = np.random.default_rng([self.seed, int(index)])
    length = int(rng.integers(1, self.max_len + 1))
    return rng.integers(0, self.vocab_size, length, dtype=np.int32)


def documents(data_cfg, split: str, *, vocab_size: int, seq_len: int) -> grain.MapDataset:
  """The documents of `split` (`train` or `eval`) as a grain MapDataset.

  Elements are `str`, except for `synthetic`, whose elements are int32 token
  arrays (ids below `vocab_size`, up to `2 * seq_len` tokens long), and `sft`,
  whose elements are lists of `(text, counts)` segments (built-in examples
  have `seq_len` characters). A skipped bad line reads as None.
  """
  if split not in ('train', 'eval'):
    raise ValueError(f'split={split!r}: must be train or eval')
  source = data_cfg.source
  if source == 'builtin':
    return grain.MapDataset.source(BuiltinDocuments(split))
  if source == 'synthetic':
    seed = (data_cfg.shuffle_seed * 2 + (split == 'eval')) % 2**32
    return grain.MapDataset.source(SyntheticDocuments(seed, vocab_size, 2 * seq_len))
  if source not in SOURCES:
    raise DataError(f'data.source={source!r}: the data pipeline reads '
                    f'{", ".join(SOURCES)}')
  field = f'{split}_files'
  if source == 'sft' and data_cfg[field].strip() == 'builtin':
    return grain.MapDataset.source(sft.BuiltinExamples(split, seq_len))
  if source == 'tokens':
    spec = data_cfg[field] if data_cfg[field].strip() else data_cfg.train_files
    return grain.MapDataset.source(
        TokenDocuments(expand_folders(spec, field if data_cfg[field].strip()
                                      else 'train_files'), split))
  paths = expand_globs(data_cfg[field], field)
  skip = bool(data_cfg.get('skip_bad_lines', False))
  if source == 'parquet':
    from data import corpus  # pylint: disable=g-import-not-at-top
    return grain.MapDataset.source(
        corpus.ParquetDocuments(paths, data_cfg.text_field, skip_bad_lines=skip))
  if source == 'text':
    return grain.MapDataset.source(TextDocuments(paths))
  if source == 'jsonl':
    return grain.MapDataset.source(
        JsonlDocuments(paths, data_cfg.text_field, skip_bad_lines=skip))
  if source == 'sft':
    return grain.MapDataset.source(
        JsonlDocuments(paths, parse=_sft_example, skip_bad_lines=skip))
  return grain.MapDataset.source(ArrayRecordDocuments(paths))


def has_split(data_cfg, split: str) -> bool:
  """Whether `documents(data_cfg, split)` has data to read (eval is optional)."""
  if data_cfg.source in ('builtin', 'synthetic'):
    return True
  if data_cfg.source == 'tokens' and split == 'eval' and not data_cfg.eval_files.strip():
    folders = expand_folders(data_cfg.train_files, 'train_files')
    return all(read_prepared(f)['splits']['eval']['documents'] > 0 for f in folders)
  return bool(data_cfg[f'{split}_files'].strip())
