"""Tokenize a corpus once into token shards: `python -m data.prepare`.

    python -m data.prepare --input '/data/web/*.parquet' --format parquet \\
        --tokenizer hf:/tok --out /data/web_tok --workers 8

then train on it any number of times with `data.source='tokens'` and
`data.train_files=/data/web_tok` (or as one entry of `data.mixture`).

The output folder holds

* `train-UUUUU-KKK.arrayrecord`, `eval-UUUUU-KKK.arrayrecord`: ArrayRecord
  shards, one record per document: its token ids `[BOS] + encode(text) +
  [EOS]` as raw little-endian integers of the smallest unsigned dtype that
  holds the vocabulary (`uint8`, `uint16` or `uint32`, named in the metadata).
  `UUUUU` is the work unit (about 32 MiB of input), `KKK` counts the shards of
  a unit, cut at a document boundary once one holds `--shard_tokens` tokens.
* `metadata.json`: the tokenizer spec and its vocabulary fingerprint, vocab
  size, BOS/EOS ids, dtype, the shards and their document and token counts
  per split, the counts per input file, bad rows, and the command. It is
  written last: a folder without it is unfinished.
* `units/UUUUU.json`: what each finished unit wrote (resume bookkeeping) and
  `plan.json`: the inputs and settings the units were cut from.

A document goes to eval when the first 8 bytes of the BLAKE2b hash of its
UTF-8 text, read as a fraction of 2**64, are below `--eval_fraction`: the
split depends only on the text, however the input is sharded or ordered.

Work units are read, tokenized (`encode_batch`, in `--workers` processes) and
written independently; each unit's shards are renamed into place before its
`units/*.json`, so a re-run after an interruption (any signal, any moment)
skips the finished units and ends with the same bytes as an uninterrupted
run (metadata.json's `command` records the last run's command line). A re-run with other inputs or settings into the same folder is refused.

Bad rows (a missing field, a value that is not a string, null, not UTF-8) are
never written. They are counted per file and, unless `--skip_bad_rows`, the
run ends with an error naming the first ones and writes no metadata.json (a
re-run with `--skip_bad_rows` reuses every shard).
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shlex
import sys
import time

import numpy as np
from absl import flags

from configs import cli
from configs import errors
from data import corpus
from data import sources
from data import tokenizers

PART_BYTES = 32 << 20       # Input bytes per work unit.
ENCODE_BATCH = 256          # Documents per encode_batch call.
FORMAT_VERSION = 1
METADATA = 'metadata.json'


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned integer dtype that holds ids < vocab_size."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if vocab_size - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise sources.DataError(f'a vocabulary of {vocab_size} ids does not fit uint32')


def is_eval(text: str, eval_fraction: float) -> bool:
  """The eval split: BLAKE2b of the text, first 8 bytes / 2**64 < fraction."""
  digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') < eval_fraction * 2**64


@dataclasses.dataclass
class Settings:
  format: str
  text_field: str
  tokenizer: str
  eval_fraction: float
  shard_tokens: int


# ------------------------------------------------------------------ Workers.
_worker = {}


def _init_worker(tokenizer_spec, queue):
  _worker['tokenizer'] = tokenizers.get_tokenizer(tokenizer_spec)
  _worker['queue'] = queue


class _ShardWriter:
  """Shards `{split}-{unit:05d}-{k:03d}.arrayrecord` of one unit and split."""

  def __init__(self, out, split, unit, shard_tokens):
    self.out, self.split, self.unit, self.shard_tokens = out, split, unit, shard_tokens
    self.shards = []      # [name, documents, tokens]
    self._writer = None

  def write(self, record: bytes, tokens: int):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if self._writer is None:
      name = f'{self.split}-{self.unit:05d}-{len(self.shards):03d}.arrayrecord'
      self.shards.append([name, 0, 0])
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self.out, name + '.tmp'), 'group_size:1')
    self._writer.write(record)
    self.shards[-1][1] += 1
    self.shards[-1][2] += tokens
    if self.shards[-1][2] >= self.shard_tokens:
      self.close()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def publish(self):
    self.close()
    for name, _, _ in self.shards:
      path = os.path.join(self.out, name)
      os.replace(path + '.tmp', path)


def _run_unit(args):
  """Tokenizes and writes one unit; returns its record (units/UUUUU.json)."""
  unit, parts, out, settings = args
  tokenizer = _worker['tokenizer']
  queue = _worker.get('queue')
  dtype = token_dtype(tokenizer.vocab_size)
  bos = np.array([tokenizer.bos_id], np.int64)
  eos = np.array([tokenizer.eos_id], np.int64)
  writers = {s: _ShardWriter(out, s, unit, settings.shard_tokens)
             for s in ('train', 'eval')}
  files = []
  for part_dict in parts:
    part = corpus.Part(**part_dict)
    counts = {'path': part.path, 'train_documents': 0, 'train_tokens': 0,
              'eval_documents': 0, 'eval_tokens': 0, 'bad_rows': 0, 'bad_examples': []}
    batch = []
    reported = [0]      # input bytes reported for this part (text length as a proxy)

    def flush():
      if not batch:
        return
      tokens_done = 0
      for text, ids in zip(batch, tokenizer.encode_batch(batch)):
        split = 'eval' if is_eval(text, settings.eval_fraction) else 'train'
        record = np.concatenate([bos, ids, eos]).astype(dtype)
        writers[split].write(record.tobytes(), len(record))
        counts[f'{split}_documents'] += 1
        counts[f'{split}_tokens'] += len(record)
        tokens_done += len(record)
      if queue is not None:
        nbytes = min(sum(len(t) for t in batch), part.size - reported[0])
        reported[0] += nbytes
        queue.put((len(batch), tokens_done, nbytes))
      batch.clear()

    for row, text in corpus.read_part(part, settings.format, settings.text_field):
      if isinstance(text, corpus.BadRow):
        counts['bad_rows'] += 1
        if len(counts['bad_examples']) < 5:
          counts['bad_examples'].append(f'{part.path}:{row}: {text.reason}')
        continue
      batch.append(text)
      if len(batch) >= ENCODE_BATCH:
        flush()
    flush()
    if queue is not None:
      queue.put((0, 0, part.size - reported[0]))
    files.append(counts)
  for w in writers.values():
    w.publish()
  record = {'unit': unit, 'files': files,
            'shards': {s: w.shards for s, w in writers.items()}}
  _write_json(os.path.join(out, 'units', f'{unit:05d}.json'), record)
  return record


def _write_json(path, value):
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)


# ----------------------------------------------------------------- Progress.
class Progress:
  """One status line: input MB done, documents/s, tokens/s, ETA."""

  def __init__(self, total_bytes, stream=sys.stderr):
    self.total = max(total_bytes, 1)
    self.stream = stream
    self.tty = stream.isatty() and not os.environ.get('ABLAX_NO_BAR')
    self.docs = self.tokens = self.bytes = 0
    self.start = time.perf_counter()
    self._last = self.start

  def add(self, docs, tokens, nbytes):
    self.docs += docs
    self.tokens += tokens
    self.bytes += nbytes
    self.show()

  def line(self) -> str:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    done = self.bytes / self.total
    eta = elapsed * (1 - done) / done if done > 0 else float('nan')
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta == eta else '?'
    return (f'prepare: {self.bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB '
            f'{100 * done:3.0f}% | {self.docs:,} docs {self.docs / elapsed:,.0f}/s | '
            f'{self.tokens:,} tokens {self.tokens / elapsed:,.0f}/s | ETA {eta_text}')

  def show(self, final=False):
    now = time.perf_counter()
    if not final and now - self._last < (0.2 if self.tty else 10.0):
      return
    self._last = now
    end = '\n' if final or not self.tty else ''
    print(('\r' if self.tty else '') + self.line(), end=end, file=self.stream,
          flush=True)


class _Direct:
  """The progress queue of a prepare without worker processes."""

  def __init__(self, bar):
    self.bar = bar

  def put(self, item):
    self.bar.add(*item)


# --------------------------------------------------------------------- Main.
def _plan(inputs, settings, tokenizer) -> dict:
  paths = corpus.expand_inputs(inputs)
  parts = corpus.parts(paths, settings.format, settings.text_field, PART_BYTES)
  units, current, size = [], [], 0
  for part in parts:
    # Many small files (text) share a unit; a big file's parts are units.
    if current and size + part.size > PART_BYTES:
      units.append(current)
      current, size = [], 0
    current.append(dataclasses.asdict(part))
    size += part.size
  if current:
    units.append(current)
  files = {p: {'size': os.path.getsize(p), 'mtime_ns': os.stat(p).st_mtime_ns}
           for p in paths}
  return {'format_version': FORMAT_VERSION, 'settings': dataclasses.asdict(settings),
          'tokenizer_fingerprint': tokenizer.fingerprint(), 'files': files,
          'units': units}


def prepare(inputs, out: str, *, format: str = 'jsonl', text_field: str = 'text',
            tokenizer: str = 'bytes', eval_fraction: float = 0.005,
            shard_tokens: int = 100_000_000, workers: int = 1,
            skip_bad_rows: bool = False, command: str = '',
            progress_stream=sys.stderr) -> dict:
  """Tokenizes `inputs` (globs) into `out`; returns the metadata (see module doc).

  Raises DataError for bad inputs or settings, and for bad rows unless
  `skip_bad_rows` (the finished shards stay for a re-run).
  """
  if not 0 <= eval_fraction < 1:
    raise sources.DataError(f'--eval_fraction={eval_fraction}: must be in [0, 1)')
  if shard_tokens < 1 or workers < 1:
    raise sources.DataError('--shard_tokens and --workers must be positive')
  if isinstance(inputs, str):
    inputs = [inputs]
  settings = Settings(format, text_field, tokenizer, float(eval_fraction), int(shard_tokens))
  tok = tokenizers.get_tokenizer(tokenizer)
  plan = _plan(inputs, settings, tok)
  os.makedirs(os.path.join(out, 'units'), exist_ok=True)
  plan_path = os.path.join(out, 'plan.json')
  if os.path.exists(plan_path):
    with open(plan_path, encoding='utf-8') as f:
      if json.load(f) != json.loads(json.dumps(plan)):
        raise sources.DataError(
            f'--out={out} holds a prepare of other inputs or settings (its '
            'plan.json differs): give a new --out, or delete that folder')
  else:
    _write_json(plan_path, plan)

  done = {}
  for unit in range(len(plan['units'])):
    path = os.path.join(out, 'units', f'{unit:05d}.json')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        record = json.load(f)
      if all(os.path.exists(os.path.join(out, name))
             for shards in record['shards'].values() for name, _, _ in shards):
        done[unit] = record
  todo = [u for u in range(len(plan['units'])) if u not in done]
  for folder in (out, os.path.join(out, 'units')):   # leftovers of a kill
    for name in os.listdir(folder):
      if name.endswith('.tmp'):
        os.remove(os.path.join(folder, name))

  total = sum(p['size'] for u in todo for p in plan['units'][u])
  bar = Progress(total, progress_stream)
  if done:
    print(f'prepare: {len(done)} of {len(plan["units"])} units already done in '
          f'{out}; resuming', file=progress_stream)
  jobs = [(u, plan['units'][u], out, settings) for u in todo]
  if workers == 1 or len(jobs) <= 1:
    _init_worker(tokenizer, _Direct(bar))
    for job in jobs:
      record = _run_unit(job)
      done[record['unit']] = record
  elif jobs:
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    with ctx.Pool(workers, _init_worker, (tokenizer, queue)) as pool:
      pending = pool.imap_unordered(_run_unit, jobs)
      finished = 0
      while finished < len(jobs):
        while not queue.empty():
          bar.add(*queue.get())
        try:
          record = pending.next(timeout=0.2)
        except multiprocessing.TimeoutError:
          continue
        done[record['unit']] = record
        finished += 1
      while not queue.empty():
        bar.add(*queue.get())
  bar.show(final=True)
  return _finish(out, plan, done, tok, settings, skip_bad_rows, command)


def _finish(out, plan, done, tok, settings, skip_bad_rows, command) -> dict:
  files = {}
  splits = {s: {'documents': 0, 'tokens': 0, 'shards': []} for s in ('train', 'eval')}
  bad = []
  for unit in range(len(plan['units'])):
    record = done[unit]
    for counts in record['files']:
      entry = files.setdefault(counts['path'], {
          'train_documents': 0, 'train_tokens': 0, 'eval_documents': 0,
          'eval_tokens': 0, 'bad_rows': 0})
      for key in entry:
        entry[key] += counts[key]
      bad.extend(counts['bad_examples'])
    for split, shards in record['shards'].items():
      for name, documents, tokens in shards:
        splits[split]['shards'].append(
            {'file': name, 'documents': documents, 'tokens': tokens})
        splits[split]['documents'] += documents
        splits[split]['tokens'] += tokens
  bad_rows = sum(f['bad_rows'] for f in files.values())
  if bad_rows and not skip_bad_rows:
    raise sources.DataError(
        f'{bad_rows} bad rows (first: {"; ".join(bad[:3])}); fix them or pass '
        '--skip_bad_rows to leave them out (the shards written so far are kept '
        'and reused)')
  if splits['train']['documents'] == 0:
    raise sources.DataError('no documents in the train split (all inputs empty or bad)')
  metadata = {
      'format_version': FORMAT_VERSION,
      'tokenizer': settings.tokenizer,
      'tokenizer_fingerprint': tok.fingerprint(),
      'vocab_size': tok.vocab_size,
      'bos_id': tok.bos_id,
      'eos_id': tok.eos_id,
      'dtype': token_dtype(tok.vocab_size).name,
      'record': 'one document per record: [BOS] + ids + [EOS], little-endian',
      'format': settings.format,
      'text_field': settings.text_field,
      'eval_fraction': settings.eval_fraction,
      'shard_tokens': settings.shard_tokens,
      'splits': splits,
      'files': files,
      'bad_rows': bad_rows,
      'command': command,
  }
  _write_json(os.path.join(out, METADATA), metadata)
  return metadata


def define_input_flags(fv: flags.FlagValues, format_help: str) -> None:
  """The corpus flags `data.prepare` and `data.train_tokenizer` share."""
  flags.DEFINE_multi_string('input', [], 'a glob of input files (repeatable; commas also '
                            "separate globs), e.g. --input '/data/web/*.parquet'",
                            flag_values=fv)
  flags.DEFINE_enum('format', None, corpus.FORMATS, 'the input files\' format: ' +
                    format_help, flag_values=fv)
  flags.DEFINE_string('text_field', 'text', 'jsonl: the field, parquet: the column '
                      'holding the text', flag_values=fv)
  flags.DEFINE_string('out', None, 'the output folder', flag_values=fv)


FLAGS = flags.FlagValues()
define_input_flags(FLAGS, 'text (one document per file), jsonl or parquet')
flags.DEFINE_string('tokenizer', 'bytes', 'bytes | sentencepiece:PATH | hf:PATH, as '
                    'config.data.tokenizer (train on the shards with the same one)',
                    flag_values=FLAGS)
flags.DEFINE_integer('workers', 1, 'tokenizer processes', flag_values=FLAGS)
flags.DEFINE_float('eval_fraction', 0.005, 'the fraction of documents (by a hash of their '
                   'text) that goes to the eval split', flag_values=FLAGS)
flags.DEFINE_integer('shard_tokens', 100_000_000, 'tokens per shard (at most one document '
                     'more); 100_000_000 is accepted', flag_values=FLAGS)
flags.DEFINE_bool('skip_bad_rows', False, 'leave bad rows out (counted in metadata.json) '
                  'instead of failing', flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m data.prepare ARGS` (argv without the program name)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = cli.parse(FLAGS, argv, doc=__doc__, prog='python -m data.prepare',
                   required=('input', 'format', 'out'))
  command = 'python -m data.prepare ' + ' '.join(shlex.quote(a) for a in argv)
  meta = prepare(args.input, args.out, format=args.format, text_field=args.text_field,
                 tokenizer=args.tokenizer, eval_fraction=args.eval_fraction,
                 shard_tokens=args.shard_tokens, workers=args.workers,
                 skip_bad_rows=args.skip_bad_rows, command=command)
  s = meta['splits']
  print(f'wrote {args.out}: train {s["train"]["documents"]:,} documents '
        f'{s["train"]["tokens"]:,} tokens, eval {s["eval"]["documents"]:,} '
        f'documents {s["eval"]["tokens"]:,} tokens ({meta["dtype"]}; '
        f'{meta["bad_rows"]} bad rows skipped)')
  return 0


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
