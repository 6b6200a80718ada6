"""Data speed: `data.prepare` throughput and the training iterator's batches/s.

    python bench/data_throughput.py                 # 20 MB of generated text, 1 and 2 workers
    python bench/data_throughput.py --mb 200 --workers 8

(a) Prepare. Generated JSONL text (Zipf-distributed words, documents of 50 to
    3,000 words; seed 0) is tokenized with a byte-level BPE fitted to a 2 MB
    sample (`data.train_tokenizer`, 8,192 ids). The reference is a bare loop in
    one process that reads the same JSON lines and calls HF `tokenizers`'
    `encode_batch` on batches of 256, writing nothing; `data.prepare` runs with
    1 and `--workers` processes, in work units of 4 MiB (the default is 32 MiB)
    so that a small corpus spreads over the workers. Rust threads inside `tokenizers` are pinned to
    one per process (RAYON_NUM_THREADS=1), so "per worker" means per core.
(b) Iterator. Batches of the `small` preset's shape (16 x 256) from
    `data.source` = `tokens` (the prepared folder), `parquet` and `jsonl` (the
    same documents, tokenized on the fly), and a 3-source mixture of prepared
    folders; each timed over `--batches` batches after 5 untimed ones, with
    `data.worker_count=0` (one background thread). The multiple compares
    tokens/s delivered to what the `small` model trains per second on this CPU
    (`--model_tokens_per_second`, default 900: the quiet-machine end of the
    0.6-0.9k tokens/s in docs/benchmarks.md).

Prints two tables and the command. Times are wall clock on a shared machine.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault('RAYON_NUM_THREADS', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def generate(path: str, megabytes: float, seed: int = 0) -> int:
  """JSONL of Zipf-distributed made-up words; returns the documents written."""
  rng = np.random.default_rng(seed)
  letters = np.array(list('etaoinshrdlucmfwypvbgkjqxz'))
  words = [''.join(rng.choice(letters, rng.integers(1, 10))) for _ in range(20_000)]
  weights = 1 / np.arange(1, len(words) + 1)
  weights /= weights.sum()
  written, docs = 0, 0
  with open(path, 'w', encoding='utf-8') as f:
    while written < megabytes * 1e6:
      ids = rng.choice(len(words), int(rng.integers(50, 3000)), p=weights)
      line = json.dumps({'text': ' '.join(words[i] for i in ids)}) + '\n'
      f.write(line)
      written += len(line)
      docs += 1
  return docs


def bare_loop(path: str, tokenizer_dir: str) -> tuple[float, int]:
  """Seconds and tokens to read and encode every line, writing nothing."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(os.path.join(tokenizer_dir, 'tokenizer.json'))
  start, tokens, batch = time.perf_counter(), 0, []
  with open(path, 'rb') as f:
    for line in f:
      batch.append(json.loads(line)['text'])
      if len(batch) == 256:
        tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
        batch = []
  if batch:
    tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
  return time.perf_counter() - start, tokens


def iterator_rate(overrides, batches: int) -> float:
  """Batches per second of the training iterator for `overrides`."""
  import configs  # pylint: disable=g-import-not-at-top
  from data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = configs.load('configs/llama.py:small', ['train.global_batch_size=16',
                                               'train.seq_len=256', *overrides])
  it = pipeline.make_iterator(cfg, 'train')
  try:
    for _ in range(5):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches / (time.perf_counter() - start)
  finally:
    it.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mb', type=float, default=20.0, help='MB of text to generate')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batches', type=int, default=100)
  parser.add_argument('--model_tokens_per_second', type=float, default=900.0)
  parser.add_argument('--dir', default=None, help='work folder (default: a temporary one)')
  args = parser.parse_args()
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from data import prepare  # pylint: disable=g-import-not-at-top
  from data import train_tokenizer  # pylint: disable=g-import-not-at-top

  root = args.dir or tempfile.mkdtemp(prefix='ablax_bench_data_')
  os.makedirs(root, exist_ok=True)
  corpus = os.path.join(root, 'corpus.jsonl')
  docs = generate(corpus, args.mb)
  size = os.path.getsize(corpus)
  sample = os.path.join(root, 'sample.jsonl')
  generate(sample, 2.0, seed=1)
  tok_dir = os.path.join(root, 'tok')
  train_tokenizer.train_tokenizer(sample, tok_dir, 8192)
  spec = f'hf:{tok_dir}'
  print(f'corpus: {size / 1e6:.1f} MB, {docs:,} documents, tokenizer {spec} (8,192 ids)')

  # Units of 4 MiB (not 32) so that a small corpus still spreads over workers.
  prepare.PART_BYTES = 4 << 20
  rows = []
  seconds, tokens = bare_loop(corpus, tok_dir)
  rows.append(('bare encode_batch loop', 1, seconds, tokens))
  for workers in sorted({1, args.workers}):
    out = os.path.join(root, f'prep_{workers}')
    start = time.perf_counter()
    meta = prepare.prepare(corpus, out, format='jsonl', tokenizer=spec,
                           workers=workers, progress_stream=open(os.devnull, 'w'))
    seconds = time.perf_counter() - start
    tokens = meta['splits']['train']['tokens'] + meta['splits']['eval']['tokens']
    rows.append((f'data.prepare --workers {workers}', workers, seconds, tokens))
  bare_per_core = rows[0][3] / rows[0][2]
  print('\n| run | processes | seconds | MB/s | tokens/s | tokens/s per process vs bare |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name, procs, seconds, tokens in rows:
    print(f'| {name} | {procs} | {seconds:.1f} | {size / 1e6 / seconds:.2f} | '
          f'{tokens / seconds:,.0f} | {tokens / seconds / procs / bare_per_core:.2f}x |')

  # (b) The iterator, on the prepared folder and the same documents raw.
  folder = os.path.join(root, f'prep_{args.workers}')
  table = pa.Table.from_pylist([json.loads(l) for l in open(corpus, encoding='utf-8')])
  pq.write_table(table, os.path.join(root, 'corpus.parquet'), row_group_size=1000)
  mixture = ','.join(f'{n}:{folder}:{w}' for n, w in (('web', 0.7), ('code', 0.2), ('math', 0.1)))
  cases = [
      ('tokens', ['data.source=tokens', f'data.train_files={folder}', f'data.tokenizer={spec}']),
      ('parquet', ['data.source=parquet', f'data.train_files={root}/corpus.parquet',
                   f'data.tokenizer={spec}']),
      ('jsonl', ['data.source=jsonl', f'data.train_files={corpus}', f'data.tokenizer={spec}']),
      ('mixture of 3 prepared folders', [f'data.mixture={mixture}', f'data.tokenizer={spec}']),
  ]
  model_batches = args.model_tokens_per_second / (16 * 256)
  print(f'\n`small` model: {args.model_tokens_per_second:,.0f} tokens/s = '
        f'{model_batches:.3f} batches/s of 16 x 256')
  print('| source | batches/s | tokens/s | x what `small` consumes |')
  print('| --- | --- | --- | --- |')
  for name, overrides in cases:
    rate = iterator_rate(overrides + ['model.vocab_size=8192'], args.batches)
    print(f'| {name} | {rate:.1f} | {rate * 16 * 256:,.0f} | {rate / model_batches:,.0f}x |')
  print(f'\ncommand: python bench/data_throughput.py --mb {args.mb:g} --workers {args.workers} '
        f'--batches {args.batches}; files in {root}')


if __name__ == '__main__':
  main()
