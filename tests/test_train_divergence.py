"""Divergence: no non-finite state is ever saved, a stopped run names a
checkpoint that really is finite, `train.on_divergence=rollback` survives a
poisoned batch, and the spike detector matches its NumPy definition.

The faults are injected: a poisoned batch (NaN in its loss mask) through
`sharding.global_batch`, and an optimizer whose update turns every parameter into
NaN at one step while that step's loss and gradient are finite (the case of
issue 10: the loss is that of the parameters before the update).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import configs
from train import loop
from train import optim
from train import sharding

RUN = ['model.num_layers=1', 'train.seq_len=32', 'train.log_every_steps=1',
       'train.eval_steps=0', 'train.warmup_steps=1', 'train.lr_schedule=constant']


def saved_params(workdir):
  """{step: list of parameter arrays} of every checkpoint, read with orbax alone."""
  out = {}
  directory = os.path.join(workdir, 'checkpoints')
  for name in sorted(os.listdir(directory)):
    if name.isdigit():
      state = ocp.StandardCheckpointer().restore(os.path.join(directory, name, 'state'))
      out[int(name)] = [np.asarray(x) for x in jax.tree.leaves(state['params'])]
  return out


def poison_batch(monkeypatch, bad: int):
  """The real batches, with a NaN loss mask in the `bad`-th fetched; returns
  the list of fetch counts."""
  real = sharding.global_batch
  calls = []

  def poisoned(batch, batch_sharding):
    calls.append(1)
    if len(calls) == bad:
      batch = dict(batch, loss_mask=batch['loss_mask'] * np.float32('nan'))
    return real(batch, batch_sharding)

  monkeypatch.setattr(sharding, 'global_batch', poisoned)
  return calls


def test_nan_parameters_with_a_finite_loss_are_never_saved(tmp_path, monkeypatch):
  bad = 3
  real = optim.make_optimizer

  def nan_at_update(train_cfg, model_cfg=None):
    optimizer, schedule = real(train_cfg, model_cfg)

    def init(params):
      return optimizer.init(params), jnp.zeros((), jnp.int32)

    def update(updates, state, params=None):
      inner, count = state
      updates, inner = optimizer.update(updates, inner, params)
      count = count + 1
      scale = jnp.where(count == bad, jnp.float32('nan'), 1.0)
      return jax.tree.map(lambda u: u * scale, updates), (inner, count)

    return optax.GradientTransformation(init, update), schedule

  monkeypatch.setattr(optim, 'make_optimizer', nan_at_update)
  cfg = configs.load('configs/llama.py:tiny', RUN + [
      'train.steps=6', 'train.checkpoint_every_steps=1', 'train.keep_checkpoints=1'])
  with pytest.raises(FloatingPointError, match=f'parameters .* at step {bad}; stopping') as e:
    loop.train_and_evaluate(cfg, str(tmp_path))
  saved = saved_params(str(tmp_path))
  # keep_checkpoints=1 kept the newest finite one, and it is the one named.
  assert list(saved) == [bad - 1]
  assert all(np.isfinite(x).all() for x in saved[bad - 1])
  assert str(e.value).endswith(f'checkpoints/{bad - 1}; train.on_divergence=rollback '
                               'would restore it and go on')


def test_poisoned_batch_stops_a_stop_run_naming_a_finite_checkpoint(tmp_path, monkeypatch):
  poison_batch(monkeypatch, bad=5)
  cfg = configs.load('configs/llama.py:tiny', RUN + [
      'train.steps=8', 'train.checkpoint_every_steps=2'])
  with pytest.raises(FloatingPointError, match='at step 5; stopping: the newest finite '
                     r'checkpoint \(parameters checked\) is .*checkpoints/4;'):
    loop.train_and_evaluate(cfg, str(tmp_path))
  assert sorted(saved_params(str(tmp_path))) == [2, 4]


def test_rollback_survives_a_poisoned_batch_and_skips_it(tmp_path, monkeypatch):
  calls = poison_batch(monkeypatch, bad=5)
  cfg = configs.load('configs/llama.py:tiny', RUN + [
      'train.steps=8', 'train.checkpoint_every_steps=2', 'train.on_divergence="rollback"',
      'train.rollback_lr_scale=0.5'])
  summary = loop.train_and_evaluate(cfg, str(tmp_path))
  assert summary['status'] == 'done' and summary['step'] == 8
  (record,) = summary['rollbacks']
  # Before the update that made step 5's parameters: checkpoint 2, not 4.
  assert record['at_step'] == 5 and record['restored'] == 2
  first, last = record['skipped_batches']
  assert first == 3 and last >= 5
  # Every batch fetched was trained on once, except the skipped ones: the
  # data went on past them instead of replaying them.
  assert len(calls) == 8 + (last - first + 1)
  assert all(np.isfinite(v) for v in summary['losses'].values())
  assert sorted(summary['losses']) == list(range(1, 9))
  saved = saved_params(str(tmp_path))
  assert 8 in saved and all(np.isfinite(x).all() for p in saved.values() for x in p)
  # The learning rate after the rollback is halved (constant schedule).
  assert summary['train']['train/learning_rate'] == pytest.approx(
      0.5 * cfg.train.learning_rate, rel=1e-6)


def test_spike_detector_matches_its_definition():
  rng = np.random.default_rng(0)
  losses = list(3 + 0.1 * rng.standard_normal(60))
  losses[40] = 3.0 + 5.0                        # a spike
  losses[50] = 3.25                             # 2.5 sigma: below k=4
  k = 4.0
  detector = loop.SpikeDetector(k, window=30, min_steps=20)
  got = [i for i, x in enumerate(losses) if detector(x)]
  # The reference: a loss is a spike if it exceeds mean + k std of the last
  # 30 non-spike losses before it (once 20 are known).
  history, want = [], []
  for i, x in enumerate(losses):
    window = history[-30:]
    if len(window) >= 20 and x > np.mean(window) + k * np.std(window):
      want.append(i)
      continue
    history.append(x)
  assert got == want == [40]
  assert detector.count == 1
  assert loop.SpikeDetector(None)(1e9) is None


def test_spike_rolls_back_a_rollback_run(tmp_path, monkeypatch):
  bad = 24
  real = sharding.global_batch
  calls = []

  def spiked(batch, batch_sharding):
    """Batch `bad` has shuffled targets: a finite loss far above the rest."""
    calls.append(1)
    if len(calls) == bad:
      targets = np.random.default_rng(0).integers(0, 256, batch['targets'].shape)
      batch = dict(batch, targets=targets.astype(batch['targets'].dtype))
    return real(batch, batch_sharding)

  monkeypatch.setattr(sharding, 'global_batch', spiked)
  cfg = configs.load('configs/llama.py:tiny', RUN + [
      'train.steps=26', 'train.checkpoint_every_steps=5', 'train.on_divergence="rollback"',
      'train.spike_threshold=3.0', 'train.learning_rate=0.01'])
  summary = loop.train_and_evaluate(cfg, str(tmp_path))
  assert summary['status'] == 'done' and summary['step'] == 26
  (record,) = summary['rollbacks']
  assert record['at_step'] == bad and record['restored'] == 20
  assert 'spike' in record['reason']
  assert summary['train']['train/spikes'] == 1.0
