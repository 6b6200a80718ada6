"""`python -m data.prepare`: token shards from text, JSONL and Parquet.

The reference for every shard is computed here independently: a document's
record is `[256] + list(text.encode('utf-8')) + [257]` (the bytes tokenizer)
and it is in eval iff BLAKE2b-64 of its text, as a fraction of 2**64, is
below the eval fraction.
"""

import hashlib
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

from data import prepare
from data import sources

EVAL_FRACTION = 0.25


def make_docs(n, seed=0):
  rng = random.Random(seed)
  words = ['alpha', 'béta', 'γάμμα', 'delta', '✓', 'x\ny', '{"q": 1}']
  return [' '.join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def reference(docs):
  out = {'train': [], 'eval': []}
  for text in docs:
    digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest()
    split = 'eval' if int.from_bytes(digest, 'big') / 2**64 < EVAL_FRACTION else 'train'
    out[split].append([256, *text.encode('utf-8'), 257])
  return out


def read_split(folder, split):
  meta = json.load(open(os.path.join(folder, 'metadata.json')))
  docs = []
  for shard in meta['splits'][split]['shards']:
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, shard['file']))
    for i in range(reader.num_records()):
      docs.append(np.frombuffer(reader.read([i])[0], meta['dtype']).tolist())
    reader.close()
  return docs


def write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')


def run(inputs, out, **kw):
  kw.setdefault('format', 'jsonl')
  return prepare.prepare(inputs, str(out), eval_fraction=EVAL_FRACTION,
                         progress_stream=open(os.devnull, 'w'), **kw)


def test_text_jsonl_and_parquet_inputs_give_the_same_tokens(tmp_path):
  docs = make_docs(60)
  want = reference(docs)
  assert want['eval'] and want['train']
  (tmp_path / 'txt').mkdir()
  for i, text in enumerate(docs):
    (tmp_path / 'txt' / f'{i:03d}.txt').write_bytes(text.encode('utf-8'))
  write_jsonl(tmp_path / 'd.jsonl', [{'text': t, 'id': i} for i, t in enumerate(docs)])
  pq.write_table(pa.table({'id': list(range(60)), 'body': docs}), tmp_path / 'd.parquet',
                 row_group_size=16)
  inputs = {'text': str(tmp_path / 'txt' / '*.txt'), 'jsonl': str(tmp_path / 'd.jsonl'),
            'parquet': str(tmp_path / 'd.parquet')}
  for fmt, pattern in inputs.items():
    meta = run(pattern, tmp_path / f'out_{fmt}', format=fmt,
               text_field='body' if fmt == 'parquet' else 'text')
    assert meta['dtype'] == 'uint16' and meta['vocab_size'] == 258
    assert (meta['bos_id'], meta['eos_id']) == (256, 257)
    for split in ('train', 'eval'):
      got = read_split(tmp_path / f'out_{fmt}', split)
      assert got == want[split], (fmt, split)       # same documents, input order
      assert meta['splits'][split]['documents'] == len(want[split])
      assert meta['splits'][split]['tokens'] == sum(map(len, want[split]))
    total = sum(f['train_documents'] + f['eval_documents'] for f in meta['files'].values())
    assert total == 60


def test_interrupted_prepare_ends_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, 'PART_BYTES', 3000)     # many units from a small corpus
  docs = make_docs(400, seed=1)
  write_jsonl(tmp_path / 'd.jsonl', [{'text': t} for t in docs])
  straight = tmp_path / 'straight'
  run(str(tmp_path / 'd.jsonl'), straight, workers=2, shard_tokens=1500)
  units = sorted(os.listdir(straight / 'units'))
  assert len(units) > 6
  assert read_split(straight, 'train') + read_split(straight, 'eval') != []
  want = reference(docs)
  assert read_split(straight, 'train') == want['train']

  # What a kill at various moments leaves: finished units, a unit whose shards
  # are renamed but whose units/*.json is not written, a half-written shard,
  # no metadata.json.
  interrupted = tmp_path / 'interrupted'
  run(str(tmp_path / 'd.jsonl'), interrupted, shard_tokens=1500)
  os.remove(interrupted / 'metadata.json')
  for name in units[len(units) // 2:]:
    record = json.load(open(interrupted / 'units' / name))
    os.remove(interrupted / 'units' / name)
    shards = [s[0] for split in record['shards'].values() for s in split]
    for shard in shards[1:] if name == units[len(units) // 2] else shards:
      os.remove(interrupted / shard)
  with open(interrupted / f'train-{len(units) - 1:05d}-000.arrayrecord.tmp', 'wb') as f:
    f.write(b'\0' * 100)
  (interrupted / 'units' / f'{len(units) - 1:05d}.json.tmp').write_text('{"unit": ')
  kept = interrupted / 'train-00000-000.arrayrecord'
  mtime = os.stat(kept).st_mtime_ns
  run(str(tmp_path / 'd.jsonl'), interrupted, shard_tokens=1500)

  assert os.stat(kept).st_mtime_ns == mtime          # a finished unit was reused
  files = lambda d: sorted(p.relative_to(d) for p in d.rglob('*') if p.is_file())
  assert files(straight) == files(interrupted)
  for rel in files(straight):
    assert (straight / rel).read_bytes() == (interrupted / rel).read_bytes(), rel

  # Other settings into the same folder are refused.
  with pytest.raises(sources.DataError, match='plan.json differs'):
    run(str(tmp_path / 'd.jsonl'), interrupted, shard_tokens=1000)


def test_bad_rows_are_counted_and_refused_unless_skipped(tmp_path):
  good = make_docs(20, seed=2)
  rows = [{'text': t} for t in good[:10]] + [
      {'body': 'no text field'}, {'text': 7}, '{"text": "unterminated', {'text': None}]
  write_jsonl(tmp_path / 'd.jsonl', rows)
  with open(tmp_path / 'd.jsonl', 'ab') as f:
    f.write(b'{"text": "\xff\xfe not utf-8"}\n')
  pq.write_table(pa.table({'text': good[10:] + [None]}), tmp_path / 'd.parquet')

  with pytest.raises(sources.DataError, match=r'^5 bad rows .*d\.jsonl:11: no field'):
    run(str(tmp_path / 'd.jsonl'), tmp_path / 'out')
  assert not (tmp_path / 'out' / 'metadata.json').exists()
  meta = run(str(tmp_path / 'd.jsonl'), tmp_path / 'out', skip_bad_rows=True)
  assert meta['bad_rows'] == 5
  want = reference(good[:10])
  assert read_split(tmp_path / 'out', 'train') == want['train']
  assert read_split(tmp_path / 'out', 'eval') == want['eval']

  with pytest.raises(sources.DataError, match=r'^1 bad rows .*d\.parquet:10: null'):
    run(str(tmp_path / 'd.parquet'), tmp_path / 'pq', format='parquet')
  meta = run(str(tmp_path / 'd.parquet'), tmp_path / 'pq', format='parquet',
             skip_bad_rows=True)
  assert meta['files'][str(tmp_path / 'd.parquet')]['bad_rows'] == 1
  assert meta['splits']['train']['documents'] + meta['splits']['eval']['documents'] == 10

  # The command line raises the same user error (errors.run prints it as one line).
  with pytest.raises(sources.DataError, match=r'^5 bad rows'):
    prepare.main(['--input', str(tmp_path / 'd.jsonl'), '--format', 'jsonl',
                  '--out', str(tmp_path / 'cli')])
