"""Document sources: the built-in stdlib split, text, jsonl, arrayrecord, synthetic."""

import hashlib
import os
import re

import ml_collections
import numpy as np
import pytest

from data import builtin
from data import sources


def _data_cfg(**fields):
  c = ml_collections.ConfigDict(dict(
      source='text', train_files='', eval_files='', text_field='text',
      tokenizer='bytes', packing=True, shuffle_seed=0, worker_count=0))
  c.update(fields)
  return c


def _docs(data_cfg, split='train'):
  ds = sources.documents(data_cfg, split, vocab_size=320, seq_len=16)
  return [ds[i] for i in range(len(ds))]


def test_builtin_split_is_deterministic_disjoint_and_by_hash():
  root = builtin.stdlib_root()
  files = builtin.list_files(root)
  builtin.list_files.cache_clear()
  assert builtin.list_files(root) == files          # same listing again
  train = builtin.split_files('train')
  evals = builtin.split_files('eval')
  assert not set(train) & set(evals)
  assert sorted(train + evals) == sorted(os.path.join(root, *f.split('/')) for f in files)
  # The stated rule, recomputed: SHA-256 of the relative path, 1 in 20 to eval.
  for rel in files:
    h = int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16)
    assert (os.path.join(root, *rel.split('/')) in evals) == (h % 20 == 0)
  assert 0.02 < len(evals) / len(files) < 0.10
  assert len(files) > 100
  for rel in files:
    parts = rel.split('/')
    assert not {'site-packages', 'test', 'tests', 'idle_test'} & set(parts[:-1])
    assert parts[-1].endswith('.py')


def test_builtin_documents_are_real_python_source():
  docs = sources.documents(_data_cfg(source='builtin'), 'eval', vocab_size=320, seq_len=16)
  paths = builtin.split_files('eval')
  assert len(docs) == len(paths)
  for i in range(3):
    text = docs[i]
    with open(paths[i], encoding='utf-8') as f:
      assert text == f.read()
    compile(text, paths[i], 'exec')  # real Python, docstrings and all


def test_text_globs(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / '1.txt').write_text('one')
  (tmp_path / 'a' / '2.txt').write_text('two')
  (tmp_path / 'b.md').write_text('three')
  cfg = _data_cfg(train_files=f'{tmp_path}/a/*.txt, {tmp_path}/*.md,{tmp_path}/a/1.txt')
  assert _docs(cfg) == ['one', 'two', 'three']  # sorted per glob, no repeats


def test_text_glob_matching_nothing_names_the_glob(tmp_path):
  (tmp_path / 'x.txt').write_text('x')
  bad = f'{tmp_path}/nothing*.txt'
  with pytest.raises(sources.DataError, match='glob .*nothing\\*\\.txt.* matches no file'):
    _docs(_data_cfg(train_files=f'{tmp_path}/x.txt,{bad}'))
  with pytest.raises(sources.DataError, match='data.eval_files is empty'):
    _docs(_data_cfg(train_files=f'{tmp_path}/x.txt'), 'eval')


def test_text_not_utf8_names_the_file(tmp_path):
  (tmp_path / 'latin.txt').write_bytes('caf\u00e9'.encode('latin-1'))
  with pytest.raises(sources.DataError, match='latin.txt: not UTF-8'):
    _docs(_data_cfg(train_files=f'{tmp_path}/*.txt'))


def test_jsonl_documents_and_blank_lines(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_bytes(b'{"text": "first", "id": 1}\n\n{"text": "caf\\u00e9"}\r\n'
                   b'{"body": "x", "text": "third\\nline"}')  # no final newline
  assert _docs(_data_cfg(source='jsonl', train_files=str(path))) == [
      'first', 'caf\u00e9', 'third\nline']
  cfg = _data_cfg(source='jsonl', train_files=str(path), text_field='body')
  with pytest.raises(sources.DataError, match=re.escape(f"{path}:1: no field 'body'")):
    _docs(cfg)


@pytest.mark.parametrize('bad_line, message', [
    ('{"text": "unterminated', 'malformed JSON'),
    ('["text"]', "no field 'text'"),
    ('{"text": 3}', "field 'text' is int, not a string"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "ok"}\n\n' + bad_line + '\n{"text": "ok"}\n')
  cfg = _data_cfg(source='jsonl', train_files=str(path))
  with pytest.raises(sources.DataError, match=re.escape(f'{path}:3: {message}')):
    _docs(cfg)


def test_arrayrecord_round_trip(tmp_path):
  texts = ['alpha', '', 'caf\u00e9 \u20ac', 'x' * 1000]
  sources.write_arrayrecord(tmp_path / 'a.array_record', texts[:2])
  sources.write_arrayrecord(tmp_path / 'b.array_record', texts[2:])
  cfg = _data_cfg(source='arrayrecord', train_files=f'{tmp_path}/*.array_record')
  assert _docs(cfg) == texts


def test_synthetic_is_deterministic_and_in_vocab():
  cfg = _data_cfg(source='synthetic', shuffle_seed=3)
  train = sources.documents(cfg, 'train', vocab_size=50, seq_len=16)
  again = sources.documents(cfg, 'train', vocab_size=50, seq_len=16)
  evals = sources.documents(cfg, 'eval', vocab_size=50, seq_len=16)
  lengths = []
  for i in (0, 1, 12345, 10**9):
    np.testing.assert_array_equal(train[i], again[i])
    assert train[i].dtype == np.int32 and 0 <= train[i].min() and train[i].max() < 50
    assert not np.array_equal(train[i], evals[i])
    lengths.append(len(train[i]))
  assert all(1 <= n <= 32 for n in lengths) and len(set(lengths)) > 1


def test_unknown_source_is_refused():
  with pytest.raises(sources.DataError, match="data.source='csv'"):
    _docs(_data_cfg(source='csv'))
