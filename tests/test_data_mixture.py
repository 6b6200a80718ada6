"""Prepared token folders, Parquet on the fly, and weighted mixtures.

Two corpora in distinguishable alphabets (a: letters a-j, b: digits) with the
same document length distribution, so a document share is a token share:
counting letters and digits in the batches measures the realised mixture
without trusting the pipeline's own source labels.
"""

import json
import os
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import configs
from data import pipeline
from data import prepare
from data import sources
from data import train_tokenizer
from tests import kill_resume

ALPHABETS = {'a': 'abcdefghij', 'b': '0123456789'}
BASE = ['train.seq_len=64', 'train.global_batch_size=8']


def corpus(alphabet, n, seed):
  rng = random.Random(seed)
  return [''.join(rng.choice(alphabet) for _ in range(rng.randint(10, 150)))
          for _ in range(n)]


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpora')
  out = {}
  for i, (name, alphabet) in enumerate(ALPHABETS.items()):
    docs = corpus(alphabet, 300, seed=i)
    with open(root / f'{name}.jsonl', 'w') as f:
      f.writelines(json.dumps({'text': t}) + '\n' for t in docs)
    prepare.prepare(str(root / f'{name}.jsonl'), str(root / f'tok_{name}'),
                    format='jsonl', eval_fraction=0.1, progress_stream=open(os.devnull, 'w'))
    out[name] = str(root / f'tok_{name}')
  out['root'] = root
  return out


def load(*overrides):
  return configs.load('configs/llama.py:tiny', [*BASE, *overrides])


def batches(cfg, n):
  it = pipeline.make_iterator(cfg, 'train')
  try:
    return [next(it) for _ in range(n)], pipeline.tokens_seen(it)
  finally:
    it.close()


def test_mixture_draws_the_sources_in_proportion(folders):
  cfg = load(f'data.mixture=a:{folders["a"]}:0.8,b:{folders["b"]}:0.2')
  got, seen = batches(cfg, 60)
  inputs = np.concatenate([b['inputs'][b['segment_ids'] != 0] for b in got])
  letters = np.isin(inputs, [ord(c) for c in ALPHABETS['a']]).sum()
  digits = np.isin(inputs, [ord(c) for c in ALPHABETS['b']]).sum()
  assert letters + digits > 25_000
  assert abs(letters / (letters + digits) - 0.8) < 0.03
  # The per-source counts the loop logs (data/tokens/<name>) agree: they
  # count every input token, BOS and EOS included.
  assert seen['a'] + seen['b'] == len(inputs)
  assert abs(seen['a'] / len(inputs) - 0.8) < 0.03
  # Every source's document ends up whole in some row: a's rows hold no digits
  # inside an a-document piece and vice versa (the labels follow the tokens).
  assert np.all(np.isin(inputs, [ord(c) for c in ALPHABETS['a'] + ALPHABETS['b']] + [256, 257]))


def test_same_config_same_batches_and_the_seed_changes_them(folders):
  mix = f'data.mixture=a:{folders["a"]}:0.5,b:{folders["b"]}:0.5'
  first, _ = batches(load(mix), 5)
  second, _ = batches(load(mix), 5)
  other, _ = batches(load(mix, 'data.shuffle_seed=1'), 5)
  for x, y in zip(first, second):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x['inputs'], y['inputs']) for x, y in zip(first, other))
  # Every row slot mixes both sources (the 1:1 interleaving has period 2,
  # which divides the batch of 8: mixing before striding would make slots pure).
  for slot in range(8):
    tokens = np.concatenate([b['inputs'][slot] for b in first])
    assert np.isin(tokens, [ord(c) for c in ALPHABETS['a']]).any(), slot
    assert np.isin(tokens, [ord(c) for c in ALPHABETS['b']]).any(), slot


def test_tokens_source_reads_the_prepared_documents(folders):
  # One document per row, unshuffled eval: the rows are the eval records in order.
  cfg = load('data.source=tokens', f'data.train_files={folders["a"]}',
             'data.packing=False', 'train.eval_steps=1', 'train.seq_len=160')
  assert pipeline.has_eval(cfg)
  batch = next(pipeline.make_iterator(cfg, 'eval'))
  meta = sources.read_prepared(folders['a'])
  docs = sources.TokenDocuments([folders['a']], 'eval')
  assert len(docs) == meta['splits']['eval']['documents'] > 0
  for row in range(min(8, len(docs))):
    doc = docs[row]
    n = len(doc) - 1
    np.testing.assert_array_equal(batch['inputs'][row, :n], doc[:-1])
    np.testing.assert_array_equal(batch['targets'][row, :n], doc[1:])
    assert doc[0] == 256 and doc[-1] == 257


def test_a_folder_of_another_vocabulary_is_refused(folders):
  tok = folders['root'] / 'bpe'
  counts = train_tokenizer.train_tokenizer(str(folders['root'] / 'a.jsonl'), str(tok), 280)
  assert counts['vocab_size'] == 280
  from data import tokenizers
  bpe = tokenizers.get_tokenizer(f'hf:{tok}')
  text = 'abc jihgf ✓ é'
  assert bpe.decode(bpe.encode(text)) == text                 # byte-level: lossless
  assert len(bpe.encode('abcdefghij' * 20)) < 200              # it learned merges

  cfg = load('data.source=tokens', f'data.train_files={folders["a"]}',
             f'data.tokenizer=hf:{tok}')
  with pytest.raises(sources.DataError, match=r"prepared with tokenizer 'bytes'.*"
                     r"data.tokenizer='hf:"):
    pipeline.make_iterator(cfg, 'train')
  cfg = load('data.source=tokens', f'data.train_files={folders["a"]}',
             'model.vocab_size=200')
  with pytest.raises(sources.DataError, match='258-id vocabulary but model.vocab_size=200'):
    pipeline.make_dataset(cfg, 'train')


def test_parquet_source_gives_the_batches_of_the_same_jsonl(folders, tmp_path):
  docs = corpus('abcdef', 50, seed=5)
  pq.write_table(pa.table({'text': docs}), tmp_path / 'd.parquet', row_group_size=7)
  with open(tmp_path / 'd.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': t}) + '\n' for t in docs)
  want, _ = batches(load('data.source=jsonl', f'data.train_files={tmp_path}/d.jsonl'), 4)
  got, _ = batches(load('data.source=parquet', f'data.train_files={tmp_path}/d.parquet'), 4)
  for x, y in zip(want, got):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------- kill -9 and resume, mixture.
FLAGS = ['--config', 'configs/llama.py:tiny', '--config.model.num_layers=1',
         '--config.train.seq_len=32', '--config.train.lr_schedule=constant',
         '--config.train.warmup_steps=2', '--config.train.log_every_steps=1',
         '--config.train.eval_steps=1', '--config.train.eval_every_steps=4',
         '--config.train.checkpoint_every_steps=4']


def test_killed_and_resumed_mixture_run_is_bitwise_the_straight_run(folders, tmp_path):
  env = kill_resume.environment(tmp_path / 'jax_cache', devices=1)
  mix = f'--config.data.mixture=a:{folders["a"]}:0.7,b:{folders["b"]}:0.3'
  command = lambda w, steps: kill_resume.command('train', FLAGS, w, steps, mix)
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  kill_resume.run(command(straight, 12), env)
  resumed = kill_resume.kill_and_resume(command, killed, kill_after=8, steps=12, env=env,
                                        log_path=tmp_path / 'killed.log')
  assert re.search(r'resumed from .*checkpoints/(8|12)\b', resumed)

  scalars = kill_resume.scalars
  for tag in ('train/loss', 'data/tokens/a', 'data/tokens/b', 'eval/a/loss',
              'eval/b/loss', 'eval/loss'):
    want, got = scalars(straight, tag), scalars(killed, tag)
    assert want == got, tag                        # float32, bitwise
  assert sorted(scalars(straight, 'train/loss')) == list(range(1, 13))
  ev = scalars(straight, 'eval/loss')
  a, b = scalars(straight, 'eval/a/loss'), scalars(straight, 'eval/b/loss')
  for step in ev:
    assert ev[step] == pytest.approx(0.7 * a[step] + 0.3 * b[step], rel=1e-6)
  assert (kill_resume.data_positions(straight, 12) ==
          kill_resume.data_positions(killed, 12))
  seen = scalars(straight, 'data/tokens/a')
  assert seen[12] > seen[4] > 0


def test_mixture_string_and_list_forms_agree(folders):
  from data import mixture
  jsonl = str(folders['root'] / 'b.jsonl')
  text = mixture.parse(f'web:{folders["a"]}:0.8, raw:{jsonl}:0.2')
  cfg = load()
  del cfg.data['mixture']          # the config-file form: a list of dicts
  cfg.data.mixture = [dict(name='web', path=folders['a'], weight=0.8),
                      dict(name='raw', path=jsonl, weight=0.2)]
  assert mixture.parse(cfg.data.mixture) == text
  assert [(s.name, s.kind, s.weight) for s in text] == [('web', 'tokens', 0.8),
                                                       ('raw', 'jsonl', 0.2)]
  assert pipeline.eval_sources(cfg) == [('web', 0.8), ('raw', 0.2)]
  assert not pipeline.has_eval(cfg)     # a glob source has no eval split
  got, seen = batches(cfg, 2)
  assert set(seen) == {'web', 'raw'} and sum(seen.values()) == sum(
      int((b['segment_ids'] != 0).sum()) for b in got)


def test_mixture_batches_do_not_depend_on_the_process_count(folders):
  cfg = load(f'data.mixture=a:{folders["a"]}:0.7,b:{folders["b"]}:0.3')
  whole, seen = batches(cfg, 3)
  its = [pipeline.make_iterator(cfg, 'train', p, 2) for p in range(2)]
  try:
    for want in whole:
      parts = [next(it) for it in its]
      for key in want:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    halves = [pipeline.tokens_seen(it) for it in its]
  finally:
    for it in its:
      it.close()
  assert {k: halves[0][k] + halves[1][k] for k in seen} == seen
