"""The DPO stage end to end on CPU: from a pretraining workdir to a DPO workdir.

One tiny pretraining run (a few steps of `train.loop.train_and_evaluate`) is
shared by the tests; each DPO run is a few steps.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import configs
import model as model_lib
from align import data as data_lib
from align import loop
from flax import nnx
from train import checkpoint as checkpoint_lib
from train import loop as train_loop
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optim
from train import sharding
from train import step as step_lib
from train import workdir as workdir_lib
from tests import kill_resume

MODEL = ['model.d_model=32', 'model.num_layers=1', 'model.num_heads=2',
         'model.num_kv_heads=1', 'model.d_ff=64', 'model.max_seq_len=32']


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  cfg = configs.load('configs/llama.py:tiny', MODEL + [
      'train.steps=3', 'train.seq_len=32', 'train.global_batch_size=8',
      'train.eval_steps=0', 'train.checkpoint_every_steps=3', 'train.warmup_steps=1'])
  train_loop.train_and_evaluate(cfg, workdir)
  return workdir, cfg


def _dpo_cfg(init, *extra):
  return configs.load('configs/dpo.py:tiny', MODEL + [
      f'dpo.init_checkpoint={init}', 'dpo.max_prompt_len=16', 'dpo.max_len=32',
      'train.global_batch_size=8', 'train.warmup_steps=1', 'train.eval_steps=1',
      'train.log_every_steps=1', *extra])


def _scalars(workdir):
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)}
          for tag in acc.Tags()['scalars']}


def test_dpo_end_to_end_resume_and_train_loads_the_policy(pretrained, tmp_path):
  init, pre_cfg = pretrained
  workdir = str(tmp_path / 'dpo')
  # A constant schedule: stopping at step 2 of 3 changes nothing else.
  constant = 'train.lr_schedule=constant'
  cfg = _dpo_cfg(init, 'train.steps=2', 'train.eval_every_steps=2',
                 'train.checkpoint_every_steps=2', constant)
  first = loop.train_and_evaluate(cfg, workdir)
  assert first['step'] == 2 and sorted(first['losses']) == [1, 2]
  with open(os.path.join(workdir, 'reference.json')) as f:
    assert json.load(f)['checkpoint'] == os.path.join(init, 'checkpoints', '3')

  # Resume to step 3 from the checkpoint at step 2.
  cfg = _dpo_cfg(init, 'train.steps=3', 'train.eval_every_steps=3',
                 'train.checkpoint_every_steps=3', constant)
  second = loop.train_and_evaluate(cfg, workdir)
  assert sorted(second['losses']) == [3]
  # Bitwise the run that went straight to step 3 (without evals, which touch
  # neither the state nor the training data).
  straight = loop.train_and_evaluate(
      _dpo_cfg(init, 'train.steps=3', 'train.eval_steps=0',
               'train.checkpoint_every_steps=3', constant), str(tmp_path / 'straight'))
  assert second['losses'][3] == straight['losses'][3]
  a, b = (workdir_lib.restore_params(d, _abstract_params(init))[0]
          for d in (workdir, str(tmp_path / 'straight')))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)

  scalars = _scalars(workdir)
  for prefix in ('dpo', 'dpo_eval'):
    for name in ('loss', 'rewards_chosen', 'rewards_rejected', 'reward_accuracy',
                 'reward_margin', 'logps_chosen', 'logps_rejected'):
      assert f'{prefix}/{name}' in scalars, f'{prefix}/{name}'
  assert sorted(scalars['dpo/loss']) == [1, 2, 3]
  # Eval at step 0 scores the policy against itself: loss ln 2, rewards 0.
  assert abs(scalars['dpo_eval/loss'][0] - math.log(2)) < 1e-6
  assert scalars['dpo_eval/rewards_chosen'][0] == 0
  assert scalars['dpo_eval/rewards_rejected'][0] == 0
  assert scalars['dpo_eval/reward_accuracy'][0] == 0.5
  assert sorted(scalars['dpo_eval/loss']) == [0, 2, 3]
  # Throughput from the end of step 1 (the compiling one) to step 2; MFU counts
  # the policy's training FLOPs and the in-step reference's forward (a third).
  assert sorted(scalars['dpo/tokens_per_second']) == [2]
  _check_mfu(scalars, cfg, reference_forward=True)

  # The pretraining code restores the DPO checkpoint with its own state spec.
  mesh = mesh_lib.make_mesh(pre_cfg.mesh)
  optimizer, _ = optim.make_optimizer(pre_cfg.train)
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model_lib.Decoder(pre_cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=3)
  state, step = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 3 and int(state['step']) == 3
  reference = checkpoint_lib.Checkpointer(init, every_steps=1, keep=3)
  ref_state, _ = reference.restore_latest(abstract)
  reference.close()
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       state['params'], ref_state['params'])
  assert max(jax.tree.leaves(moved)) > 0     # the policy did train


def test_dpo_killed_and_resumed_is_bitwise_the_straight_run(pretrained, tmp_path):
  """`python -m align` with the reference in the step and 2 microbatches,
  SIGKILLed after its step-2 checkpoint and resumed to 6: the losses, the
  state and the data position are the straight run's, bitwise."""
  init, _ = pretrained
  flags = ['--config', 'configs/dpo.py:tiny', *[f'--config.{o}' for o in MODEL + [
      f'dpo.init_checkpoint={init}', 'dpo.max_prompt_len=16', 'dpo.max_len=32',
      'train.global_batch_size=8', 'train.grad_accum_steps=2', 'train.warmup_steps=1',
      'train.lr_schedule=constant', 'train.eval_steps=0', 'train.log_every_steps=1',
      'train.checkpoint_every_steps=2']]]
  env = kill_resume.environment(tmp_path / 'jax_cache', devices=2)
  command = lambda w, steps: kill_resume.command('align', flags, w, steps)
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  kill_resume.run(command(straight, 6), env)
  resumed = kill_resume.kill_and_resume(command, killed, kill_after=2, steps=6, env=env,
                                        log_path=tmp_path / 'killed.log')
  assert 'resumed from' in resumed and 'reference: ' in resumed
  losses = kill_resume.scalars(straight, 'dpo/loss')
  assert sorted(losses) == list(range(1, 7))
  assert kill_resume.scalars(killed, 'dpo/loss') == losses          # float32, bitwise
  kill_resume.assert_same_state(kill_resume.saved_state(straight, 6),
                                kill_resume.saved_state(killed, 6))
  assert kill_resume.data_positions(straight, 6) == kill_resume.data_positions(killed, 6)
  with open(killed / 'reference.json') as f:
    assert json.load(f)['checkpoint'] == os.path.join(init, 'checkpoints', '3')


def _abstract_params(init):
  cfg = _dpo_cfg(init)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train)
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  return abstract['params']


def _check_mfu(scalars, cfg, *, reference_forward):
  flops = model_lib.flops_per_token(cfg.model, cfg.dpo.max_len)
  flops *= 4 / 3 if reference_forward else 1
  peak = metrics_lib.peak_flops()      # the same cached CPU rate the loop used
  for step, tps in scalars['dpo/tokens_per_second'].items():
    assert tps > 0
    assert scalars['dpo/mfu'][step] == pytest.approx(tps * flops / peak, rel=1e-6)


def _record_reference(monkeypatch):
  """Records, per train step, how many reference arrays the step received
  (`passed`), and every reference the loop loaded (`loaded`)."""
  passed, loaded = [], []
  real_make_step, real_load = step_lib.make_train_step, loop.load_reference

  def recording_make_step(*args, **kwargs):
    train_step = real_make_step(*args, **kwargs)
    def train(state, batch, frozen):
      passed.append(len(jax.tree.leaves(frozen)))
      return train_step(state, batch, frozen)
    return train

  def recording_load(*args):
    params, model_state = real_load(*args)
    loaded.append(params)
    return params, model_state

  monkeypatch.setattr(step_lib, 'make_train_step', recording_make_step)
  monkeypatch.setattr(loop, 'load_reference', recording_load)
  return passed, loaded


@pytest.mark.parametrize('kind', ['orpo'])
def test_reference_free_losses_hold_no_reference(pretrained, tmp_path, monkeypatch, kind):
  init, _ = pretrained
  passed, loaded = _record_reference(monkeypatch)
  workdir = str(tmp_path / kind)
  cfg = _dpo_cfg(init, f'dpo.loss={kind}', 'train.steps=2', 'train.eval_steps=0',
                 'train.checkpoint_every_steps=2')
  summary = loop.train_and_evaluate(cfg, workdir)
  # The init checkpoint only starts the policy, then leaves the devices.
  assert passed == [0, 0] and len(loaded) == 1
  assert all(x.is_deleted() for x in jax.tree.leaves(loaded[0]))
  assert all(np.isfinite(v) for v in summary['losses'].values())
  scalars = _scalars(workdir)
  assert sorted(scalars['dpo/mfu']) == [2]
  _check_mfu(scalars, cfg, reference_forward=False)


def _run_steps(cfg, devices, batches):
  """Two DPO steps on a mesh over `devices`; returns metrics, params, reference."""
  cfg.mesh.data = len(devices)
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  model_fn = lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  optimizer, schedule = optim.make_optimizer(cfg.train)
  graphdef, _, _, shardings = step_lib.train_state_spec(model_fn, optimizer, mesh, 0)
  init_workdir, step_dir = loop.resolve_init_checkpoint(cfg.dpo.init_checkpoint)
  reference, model_state = loop.load_reference(cfg, step_dir, init_workdir, mesh,
                                               shardings['params'], model_fn)
  before = jax.tree.map(np.array, reference)
  state = jax.jit(lambda p, ms: step_lib.new_train_state(
      jax.tree.map(jax.numpy.copy, p), ms, optimizer, 0), out_shardings=shardings)(
          reference, model_state)
  train_step = step_lib.make_train_step(
      loop.make_loss_fn(cfg, 'step'), optimizer, graphdef=graphdef,
      state_shardings=shardings, mesh=mesh, grad_accum_steps=cfg.train.grad_accum_steps,
      schedule=schedule, frozen_shardings={'reference': shardings['params']})
  metrics = []
  for batch in batches:
    state, m = train_step(state, loop.device_batch(batch, sharding.batch_sharding(mesh)),
                          {'reference': reference})
    metrics.append(jax.device_get(m))
  return metrics, jax.tree.map(np.array, state['params']), before, reference


def test_sharded_and_accumulated_match_one_device_and_reference_is_frozen(pretrained):
  init, _ = pretrained
  cfg = _dpo_cfg(init, 'train.steps=2', 'mesh.data=1')
  it = data_lib.make_iterator(cfg, 'train')
  batches = [next(it), next(it)]
  one, params_one, before, reference = _run_steps(cfg, jax.devices()[:1], batches)
  # Gradients flow only into the policy: the reference is bitwise unchanged.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               reference, before)
  assert one[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)
  eight, params_eight, before8, reference8 = _run_steps(cfg, jax.devices()[:8], batches)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               reference8, before8)
  for a, b in zip(one, eight):
    for k in ('loss', 'reward_accuracy', 'reward_margin', 'logps_chosen', 'grad_norm'):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params_one, params_eight)
  # Gradient accumulation over 2 microbatches gives the same steps.
  cfg.train.grad_accum_steps = 2
  accum, params_accum, _, _ = _run_steps(cfg, jax.devices()[:1], batches)
  for a, b in zip(one, accum):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params_one, params_accum)
  # And the policy moved away from the reference.
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(params_one),
                                            jax.tree.leaves(before)))


def test_init_checkpoint_of_another_model_is_refused(pretrained, tmp_path):
  init, _ = pretrained
  cfg = _dpo_cfg(init, 'train.steps=1', 'model.d_ff=96')
  with pytest.raises(configs.ConfigError, match='model.d_ff'):
    loop.train_and_evaluate(cfg, str(tmp_path / 'x'))
  with pytest.raises(configs.ConfigError, match='init_checkpoint'):
    loop.resolve_init_checkpoint(str(tmp_path))


def _write_pairs(path, count, seed):
  rng = np.random.RandomState(seed)
  words = ['alpha', 'beta', 'gamma', 'delta', 'eps', 'zeta', 'eta', 'theta']
  say = lambda n: ' '.join(rng.choice(words, n))
  with open(path, 'w') as f:
    for i in range(count):
      f.write(json.dumps({'prompt': f'{i}: {say(3)}', 'chosen': say(4),
                          'rejected': say(2)}) + '\n')
  return str(path)


def test_precomputed_reference_gives_the_same_steps_without_holding_it(
    pretrained, tmp_path, monkeypatch):
  init, _ = pretrained
  data = [f'dpo.train_files={_write_pairs(tmp_path / "train.jsonl", 40, 0)}',
          f'dpo.eval_files={_write_pairs(tmp_path / "eval.jsonl", 12, 1)}',
          'train.steps=3', 'train.eval_every_steps=3', 'train.checkpoint_every_steps=3',
          'train.grad_accum_steps=2']
  passed, loaded = _record_reference(monkeypatch)
  # The reference in the step, one microbatch at a time.
  off = loop.train_and_evaluate(_dpo_cfg(init, *data), str(tmp_path / 'off'))
  assert passed == [len(jax.tree.leaves(loaded[0]))] * 3 and passed[0] > 0
  passed.clear()
  loaded.clear()
  workdir = str(tmp_path / 'on')
  on = loop.train_and_evaluate(_dpo_cfg(init, *data, 'dpo.precompute_reference=True'),
                               workdir)
  # Not passed to the steps, and gone from the devices once scored.
  assert passed == [0, 0, 0] and len(loaded) == 1
  assert all(x.is_deleted() for x in jax.tree.leaves(loaded[0]))
  for step in (1, 2, 3):
    np.testing.assert_allclose(on['losses'][step], off['losses'][step], rtol=1e-5)
  for tag, value in off['eval'].items():
    np.testing.assert_allclose(on['eval'][tag], value, rtol=1e-4, atol=1e-5, err_msg=tag)
  scalars = _scalars(workdir)
  assert abs(scalars['dpo_eval/loss'][0] - math.log(2)) < 1e-5

  # The saved values are the init model's sequence log-probs, pair by pair.
  cfg = _dpo_cfg(init, *data)
  with np.load(os.path.join(workdir, loop.REFERENCE_FILE)) as saved:
    table = {k: saved[k] for k in saved.files}
  assert table['train_chosen'].shape == (40,) and table['eval_chosen'].shape == (8,)
  decoder, _ = _init_decoder(cfg, init)
  rows = next(data_lib.ordered_batches(cfg, 'train', 40))
  np.testing.assert_array_equal(rows['pair_index'], np.arange(40))
  for side in ('chosen', 'rejected'):
    logits, _ = decoder(rows[f'{side}_inputs'], segment_ids=rows[f'{side}_segment_ids'],
                        positions=rows[f'{side}_positions'])
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    target = np.take_along_axis(logp, rows[f'{side}_targets'][..., None], -1)[..., 0]
    want = (target * rows[f'{side}_loss_mask']).sum(-1)
    np.testing.assert_allclose(table[f'train_{side}'], want, rtol=1e-5, atol=1e-4)

  # A resume reads the saved values: no reference is loaded or run again.
  def refuse(*args):
    raise AssertionError('the reference was loaded again')
  monkeypatch.setattr(loop, 'load_reference', refuse)
  monkeypatch.setattr(loop, 'precompute_reference', refuse)
  more = loop.train_and_evaluate(
      _dpo_cfg(init, *data[:2], 'train.steps=4', 'train.grad_accum_steps=2',
               'train.eval_every_steps=4', 'train.checkpoint_every_steps=4',
               'dpo.precompute_reference=True'), workdir)
  assert sorted(more['losses']) == [4] and np.isfinite(more['losses'][4])


def _init_decoder(cfg, init):
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train)
  graphdef, _, abstract, _ = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  params, step = workdir_lib.restore_params(init, abstract['params'])
  return nnx.merge(graphdef, jax.device_get(params), abstract['model_state']), step


def test_precompute_and_reference_free_are_exclusive(pretrained):
  init, _ = pretrained
  with pytest.raises(configs.ConfigError, match='precompute_reference'):
    _dpo_cfg(init, 'dpo.precompute_reference=True', 'dpo.reference_free=True')
