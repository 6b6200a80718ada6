"""Raw corpus files read row by row: text, JSONL, Parquet.

`data.prepare` and `data.train_tokenizer` read their inputs here. A corpus is
cut into *parts* (a range of rows of one file) so that worker processes can
read pieces of a large file independently:

* `text`: one document per file (the whole file, UTF-8); a part is one file.
* `jsonl`: one document per non-empty line, the string at `text_field`; a
  part is a range of lines, cut at about `part_bytes` of input.
* `parquet`: one document per row, the column `text_field` (string or binary
  UTF-8); a part is a range of row groups, cut at about `part_bytes`.

`read_part(part, format, text_field)` yields `(row, text)` for good rows and
`(row, BadRow(reason))` for rows that are not text: a missing field, a value
that is not a string, null, or bytes that are not UTF-8. `row` names the row
for a message: the 1-based line of a JSONL file, the 0-based row of a Parquet
file, 1 for a text file.
"""

import dataclasses
import glob
import json
import os

from absl import logging
import numpy as np

from data import sources

FORMATS = ('text', 'jsonl', 'parquet')
_EXTENSIONS = (('.parquet', 'parquet'), ('.jsonl', 'jsonl'), ('.json', 'jsonl'),
               ('.arrayrecord', 'arrayrecord'))


def format_of(path: str) -> str:
  """A file's format by extension: parquet, jsonl (.jsonl, .json),
  arrayrecord, else text."""
  for extension, kind in _EXTENSIONS:
    if path.endswith(extension):
      return kind
  return 'text'


def expand_inputs(patterns) -> list[str]:
  """The files of `--input` globs (each may hold comma-separated globs), in
  order, each once."""
  paths = []
  for pattern in [patterns] if isinstance(patterns, str) else patterns:
    for one in [p.strip() for p in pattern.split(',') if p.strip()]:
      matches = sorted(m for m in glob.glob(os.path.expanduser(one), recursive=True)
                       if os.path.isfile(m))
      if not matches:
        raise sources.DataError(f'--input {one!r} matches no file')
      paths.extend(m for m in matches if m not in paths)
  if not paths:
    raise sources.DataError('no --input given')
  return paths


@dataclasses.dataclass(frozen=True)
class Part:
  """Rows [start, stop) of `path`: lines (jsonl), row groups (parquet), or
  the whole file (text: start=0, stop=1)."""
  path: str
  start: int
  stop: int
  size: int          # input bytes, for progress and ETA


@dataclasses.dataclass(frozen=True)
class BadRow:
  reason: str


def _parquet():
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise sources.DataError('Parquet input needs the pyarrow package: '
                            'pip install pyarrow') from None
  return pq


def parquet_file(path: str, text_field: str):
  """An open `pyarrow.parquet.ParquetFile`, checked to hold a text column."""
  pq = _parquet()
  try:
    f = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses
    raise sources.DataError(f'{path}: not a readable Parquet file ({e})') from None
  names = f.schema_arrow.names
  if text_field not in names:
    raise sources.DataError(f'{path}: no column {text_field!r} (text_field); '
                            f'columns: {", ".join(names)}')
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  kind = f.schema_arrow.field(text_field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
          or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
    raise sources.DataError(f'{path}: column {text_field!r} holds {kind}, not text')
  return f


def parts(paths, format: str, text_field: str, part_bytes: int) -> list[Part]:
  """The parts of `paths`, in file order; a file's parts cover all its rows."""
  if format not in FORMATS:
    raise sources.DataError(f'--format={format!r}: must be one of {", ".join(FORMATS)}')
  out = []
  for path in paths:
    size = os.path.getsize(path)
    if format == 'text':
      out.append(Part(path, 0, 1, size))
    elif format == 'jsonl':
      st = os.stat(path)
      starts, lengths, _ = sources._index_lines(path, st.st_mtime_ns, st.st_size)  # pylint: disable=protected-access
      ends = np.asarray(starts) + np.asarray(lengths)
      first = 0
      while first < len(starts):
        # The last line whose end is within part_bytes of this part's start.
        last = int(np.searchsorted(ends, starts[first] + part_bytes, side='right'))
        last = max(last, first + 1)
        out.append(Part(path, first, last, int(ends[last - 1] - starts[first])))
        first = last
    else:
      meta = parquet_file(path, text_field).metadata
      sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
      first = 0
      while first < len(sizes):
        last, total = first, 0
        while last < len(sizes) and (last == first or total + sizes[last] <= part_bytes):
          total += sizes[last]
          last += 1
        out.append(Part(path, first, last, total))
        first = last
  return out


def _jsonl_text(raw: bytes, text_field: str):
  try:
    record = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return BadRow(f'malformed JSON line ({e})')
  if not isinstance(record, dict) or text_field not in record:
    return BadRow(f'no field {text_field!r}')
  text = record[text_field]
  if not isinstance(text, str):
    return BadRow(f'field {text_field!r} is {type(text).__name__}, not a string')
  return text


def read_part(part: Part, format: str, text_field: str):
  """Yields `(row, text or BadRow)` for every row of `part` (see the module doc)."""
  if format == 'text':
    with open(part.path, 'rb') as f:
      raw = f.read()
    try:
      yield 1, raw.decode('utf-8')
    except UnicodeDecodeError as e:
      yield 1, BadRow(f'not UTF-8 text ({e.reason} at byte {e.start})')
  elif format == 'jsonl':
    st = os.stat(part.path)
    starts, lengths, lines = sources._index_lines(part.path, st.st_mtime_ns, st.st_size)  # pylint: disable=protected-access
    with open(part.path, 'rb') as f:
      f.seek(int(starts[part.start]))
      end = int(starts[part.stop - 1] + lengths[part.stop - 1])
      block = f.read(end - int(starts[part.start]))
    base = int(starts[part.start])
    for i in range(part.start, part.stop):
      raw = block[int(starts[i]) - base:int(starts[i] + lengths[i]) - base]
      yield int(lines[i]), _jsonl_text(raw, text_field)
  else:
    f = parquet_file(part.path, text_field)
    meta = f.metadata
    row = sum(meta.row_group(g).num_rows for g in range(part.start))
    for g in range(part.start, part.stop):
      column = f.read_row_group(g, columns=[text_field]).column(0)
      for value in column.to_pylist():
        yield row, parquet_text(value)
        row += 1


def parquet_text(value):
  """A Parquet cell -> its text, or a BadRow."""
  if value is None:
    return BadRow('null')
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError as e:
      return BadRow(f'not UTF-8 text ({e.reason} at byte {e.start})')
  return value


class ParquetDocuments:
  """Rows of Parquet files with random access: `data.source='parquet'`.

  Row counts come from the file footers at start-up; a row group is read (the
  text column only) when a document in it is first needed, and the last
  `CACHED_GROUPS` are kept, so reading in order costs one read per group. A
  global shuffle over large files reads a group per document: prepare such a
  corpus once (`data.prepare`) instead.
  """

  CACHED_GROUPS = 8

  def __init__(self, paths, text_field: str = 'text', *, skip_bad_lines: bool = False):
    self.paths = list(paths)
    self.text_field = text_field
    self.skip_bad_lines = skip_bad_lines
    groups = []                        # (file index, row group, first row in file)
    counts = []
    for i, path in enumerate(self.paths):
      meta = parquet_file(path, text_field).metadata
      first = 0
      for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        if rows:
          groups.append((i, g, first))
          counts.append(rows)
        first += rows
    if not counts:
      raise sources.DataError(f'Parquet files {self.paths} hold no rows')
    self._groups = groups
    self._ends = np.cumsum(counts)
    self._files = {}
    self._cache = {}                   # group index -> list of cells (insertion = age)

  def __len__(self):
    return int(self._ends[-1])

  def _group(self, k):
    if k in self._cache:
      return self._cache[k]
    i, g, _ = self._groups[k]
    if i not in self._files:
      self._files[i] = parquet_file(self.paths[i], self.text_field)
    cells = self._files[i].read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
    if len(self._cache) >= self.CACHED_GROUPS:
      self._cache.pop(next(iter(self._cache)))
    self._cache[k] = cells
    return cells

  def __getitem__(self, index):
    k = int(np.searchsorted(self._ends, index, side='right'))
    start = int(self._ends[k - 1]) if k else 0
    text = parquet_text(self._group(k)[index - start])
    if not isinstance(text, BadRow):
      return text
    i, _, first = self._groups[k]
    where = f'{self.paths[i]}: row {first + index - start}'
    if self.skip_bad_lines:
      logging.log_first_n(logging.WARNING, '%s: skipped: %s', 20, where, text.reason)
      return None
    raise sources.DataError(f'{where}: {text.reason} (or set '
                            '--config.data.skip_bad_lines=True to skip such rows)')

  def __getstate__(self):
    return dict(self.__dict__, _files={}, _cache={})
