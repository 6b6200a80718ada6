"""The grain pipeline: batch format, process sharding, eval, exact resume."""

import json
import os

import configs
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data import builtin
from data import packing
from data import pipeline
from data import sources


def _cfg(*overrides):
  return configs.load('configs/base.py', [
      'train.global_batch_size=4', 'train.seq_len=32', 'train.eval_steps=3',
      *overrides])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_format():
  for split in ('train', 'eval'):
    it = pipeline.make_iterator(_cfg(), split)
    batch = next(it)
    assert tuple(batch) == packing.BATCH_KEYS
    for k, v in batch.items():
      assert v.shape == (4, 32), k
      assert v.dtype == (np.float32 if k == 'loss_mask' else np.int32), k
    it.close()


def _read_all(paths):
  texts = []
  for p in paths:
    with open(p, encoding='utf-8', errors='replace') as f:
      texts.append(f.read())
  return texts


def test_builtin_rows_come_from_their_split():
  train_texts = _read_all(builtin.split_files('train'))
  eval_texts = _read_all(builtin.split_files('eval'))
  for split, texts in (('train', train_texts), ('eval', eval_texts)):
    it = pipeline.make_iterator(_cfg('train.seq_len=64'), split)
    batch = next(it)
    it.close()
    for row, seg in zip(batch['inputs'], batch['segment_ids']):
      piece = row[(seg == 1) & (row < 256)].astype(np.uint8).tobytes()
      piece = piece.decode('utf-8', errors='ignore')[1:-1]  # drop cut characters
      assert len(piece) > 20
      assert any(piece in t for t in texts), (split, piece)


@pytest.mark.parametrize('split', ['train', 'eval'])
@pytest.mark.parametrize('packed', [True, False])
def test_process_shards_make_up_the_global_batch(split, packed):
  cfg = _cfg(f'data.packing={packed}')
  whole = pipeline.make_iterator(cfg, split)
  expected = _take(whole, 3)
  whole.close()
  for count in (2, 4):
    shards = [pipeline.make_iterator(cfg, split, p, count) for p in range(count)]
    local = [_take(it, 3) for it in shards]
    for it in shards:
      it.close()
    for step in range(3):
      for k in expected[step]:
        assert all(local[p][step][k].shape[0] == 4 // count for p in range(count))
        np.testing.assert_array_equal(
            np.concatenate([local[p][step][k] for p in range(count)]),
            expected[step][k], err_msg=f'{count} processes, step {step}, {k}')


def test_process_arguments_are_checked():
  with pytest.raises(sources.DataError, match='does not divide over 3 processes'):
    pipeline.make_iterator(_cfg(), 'train', 0, 3)
  with pytest.raises(sources.DataError, match='process_index=2'):
    pipeline.make_iterator(_cfg(), 'train', 2, 2)


def test_train_shuffle_seed_and_fixed_eval():
  a = pipeline.make_iterator(_cfg('data.shuffle_seed=1'), 'train')
  b = pipeline.make_iterator(_cfg('data.shuffle_seed=1'), 'train')
  c = pipeline.make_iterator(_cfg('data.shuffle_seed=2'), 'train')
  first_a, first_b, first_c = _take(a, 2), _take(b, 2), _take(c, 2)
  for it in (a, b, c):
    it.close()
  _assert_same(first_a, first_b)
  assert not np.array_equal(first_a[0]['inputs'], first_c[0]['inputs'])
  # Eval: the same eval_steps batches on every call, whatever the seed.
  evals = [list(pipeline.make_iterator(_cfg(f'data.shuffle_seed={s}'), 'eval'))
           for s in (1, 1, 2)]
  assert len(evals[0]) == 3
  _assert_same(evals[0], evals[1])
  _assert_same(evals[0], evals[2])


def test_small_eval_set_repeats(tmp_path):
  (tmp_path / 'e.txt').write_text('tiny eval')
  cfg = _cfg('data.source=text', f'data.train_files={tmp_path}/e.txt',
             f'data.eval_files={tmp_path}/e.txt', 'train.eval_steps=5')
  batches = list(pipeline.make_iterator(cfg, 'eval'))
  assert len(batches) == 5
  assert all(b['loss_mask'].sum() > 0 for b in batches)


def test_eval_files_are_optional_but_named(tmp_path):
  (tmp_path / 'd.txt').write_text('doc')
  cfg = _cfg('data.source=text', f'data.train_files={tmp_path}/d.txt')
  assert not pipeline.has_eval(cfg)
  assert pipeline.has_eval(_cfg())
  with pytest.raises(sources.DataError, match='data.eval_files is empty'):
    pipeline.make_iterator(cfg, 'eval')


def test_tokenizer_must_fit_the_model_vocab():
  with pytest.raises(sources.DataError, match='258 ids but model.vocab_size=200'):
    pipeline.make_iterator(_cfg('model.vocab_size=200'), 'train')


def _aligned_corpus(tmp_path):
  # Documents of exactly one row (15 bytes + BOS + EOS = seq_len + 1), so a
  # saved state often falls on a row that ends with a document.
  for i in range(12):
    (tmp_path / f'{i:02d}.txt').write_text(f'aligned doc {i:03d}')
  return ['data.source=text', f'data.train_files={tmp_path}/*.txt',
          'train.seq_len=16', 'train.global_batch_size=2']


@pytest.mark.parametrize('corpus', ['builtin', 'aligned', 'unpacked', 'synthetic'])
def test_get_state_set_state_resumes_exactly(tmp_path, corpus):
  overrides = {
      'builtin': [],
      'aligned': _aligned_corpus(tmp_path),
      'unpacked': ['data.packing=False'],
      'synthetic': ['data.source=synthetic'],
  }[corpus]
  cfg = _cfg(*overrides)
  it = pipeline.make_iterator(cfg, 'train')
  for steps in (1, 4, 3):
    _take(it, steps)
    state = json.loads(json.dumps(it.get_state()))  # as any checkpoint stores it
    expected = _take(it, 4)
    resumed = pipeline.make_iterator(cfg, 'train')
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)
    resumed.close()
  it.close()


def test_orbax_checkpoint_resumes_the_next_batch(tmp_path):
  cfg = _cfg()
  it = pipeline.make_iterator(cfg, 'train')
  _take(it, 3)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mngr:
    mngr.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'w': np.arange(4.0)}),
        data=grain.checkpoint.CheckpointSave(it)))
    # The loop keeps drawing while the checkpoint is written in the background.
    expected = _take(it, 3)
    mngr.wait_until_finished()
  it.close()
  assert os.path.exists(tmp_path / 'ckpt' / '3' / 'data' / 'process_0-of-1.json')

  resumed = pipeline.make_iterator(cfg, 'train')
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mngr:
    assert mngr.latest_step() == 3
    restored = mngr.restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({'w': np.zeros(4)}),
        data=grain.checkpoint.CheckpointRestore(resumed)))
  np.testing.assert_array_equal(restored['state']['w'], np.arange(4.0))
  assert restored['data'] is resumed
  _assert_same(_take(resumed, 3), expected)
  resumed.close()


def test_worker_processes_read_the_same_batches():
  # One grain worker process reads the whole stream, so it must reproduce the
  # in-process batches; its state restores like the in-process one.
  cfg0 = _cfg('train.global_batch_size=2')
  cfg1 = _cfg('train.global_batch_size=2', 'data.worker_count=1')
  it0 = pipeline.make_iterator(cfg0, 'train')
  expected = _take(it0, 5)
  it0.close()
  it1 = pipeline.make_iterator(cfg1, 'train')
  got = _take(it1, 3)
  state = json.loads(json.dumps(it1.get_state()))
  it1.close()
  _assert_same(got, expected[:3])
  resumed = pipeline.make_iterator(cfg1, 'train')
  resumed.set_state(state)
  _assert_same(_take(resumed, 2), expected[3:])
  resumed.close()
