"""The memory planner (`train/plan.py`) against the real sharded train step on
8 fake CPU devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from train import mesh as mesh_lib
from train import optim
from train import plan as plan_lib
from train import sharding
from train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ['model.num_layers=2', 'train.global_batch_size=8', 'train.seq_len=32',
             'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2']


def _cfg(extra=()):
  return configs.load('configs/llama.py:tiny', OVERRIDES + list(extra))


def _device0_bytes(tree) -> int:
  """Bytes device 0 really holds of a tree of placed arrays."""
  device = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


@pytest.fixture(scope='module')
def planned():
  cfg = _cfg()
  return cfg, plan_lib.plan(cfg, 8, 'cpu')


def test_state_bytes_equal_what_the_devices_hold(planned):
  cfg, result = planned
  t = cfg.train
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(t, cfg.model)
  _, state, _ = step_lib.create_train_state(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed)), optimizer, mesh, t.seed)
  assert result['params'] == _device0_bytes(state['params'])
  assert result['opt_state'] == _device0_bytes(state['opt_state'])
  # Sharding does split: device 0 holds less than the whole model.
  whole = model_lib.count_params(cfg.model) * 4
  assert result['params'] < whole


def test_peak_within_10_percent_of_the_compiled_real_step(planned):
  cfg, result = planned
  t = cfg.train
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, schedule = optim.make_optimizer(t, cfg.model)
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed)), optimizer, mesh, t.seed)
  train_step = step_lib.make_train_step(
      step_lib.lm_loss(t), optimizer, graphdef=graphdef, state_shardings=shardings,
      mesh=mesh, grad_accum_steps=t.grad_accum_steps, schedule=schedule)
  rng = np.random.default_rng(0)
  shape = (t.global_batch_size, t.seq_len)
  batch = {'inputs': rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
           'targets': rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
           'segment_ids': np.ones(shape, np.int32),
           'positions': np.tile(np.arange(t.seq_len, dtype=np.int32), (shape[0], 1)),
           'loss_mask': np.ones(shape, np.float32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  stats = train_step.lower(state, batch).compile().memory_analysis()
  real = (stats.argument_size_in_bytes + stats.output_size_in_bytes -
          stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  assert abs(result['peak'] - real) <= 0.1 * real, (result['peak'], real)
  # The arguments the planner counted by hand are the executable's arguments.
  counted = result['params'] + result['opt_state'] + result['other_state'] + result['batch']
  assert counted == stats.argument_size_in_bytes
  assert result['fits'] and result['mesh'] == {'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 2, 'expert': 1}


def test_flops_near_the_analytic_count(planned):
  _, result = planned
  assert 0.5 < result['flops'] / result['model_flops'] < 2.0


@pytest.mark.parametrize('scan', [False, True])
def test_data_parallel_all_reduces_every_gradient(scan):
  # Scanned, the layers' gradient all-reduces sit in the loop body once and
  # run once per layer (the loop's trip count).
  cfg = _cfg(['mesh.data=8', 'mesh.fsdp=1', 'mesh.tensor=1', f'model.scan_layers={scan}'])
  result = plan_lib.plan(cfg, 8, 'cpu')
  grads_f32 = model_lib.count_params(cfg.model) * 4
  assert result['collectives']['all-reduce']['bytes'] >= grads_f32
  assert result['collectives']['all-gather']['count'] == 0   # nothing is sharded


def test_collective_bytes_reads_hlo_text():
  hlo = '\n'.join([
      '  %all-reduce.3 = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %p), channel_id=1',
      '  %ags = (bf16[2,3]{1,0}, bf16[4,3]{1,0}) all-gather-start(bf16[2,3]{1,0} %x)',
      '  %agd = bf16[4,3]{1,0} all-gather-done((bf16[2,3]{1,0}, bf16[4,3]{1,0}) %ags)',
      '  %cp = s32[16]{0} collective-permute(s32[16]{0} %y), source_target_pairs={{0,1}}',
      '  %fusion.1 = f32[8]{0} fusion(f32[8]{0} %z), calls=%all-reduce_computation',
  ])
  out = plan_lib.collective_bytes(hlo)
  assert out['all-reduce'] == {'count': 1, 'bytes': 8 * 4 * 4}
  assert out['all-gather'] == {'count': 1, 'bytes': 4 * 3 * 2}
  assert out['collective-permute'] == {'count': 1, 'bytes': 16 * 4}
  assert out['reduce-scatter']['count'] == 0


def test_collective_bytes_count_loop_bodies_by_trip_count():
  """A collective in a while body (a scan over 12 layers, nested in a loop
  of 3 microbatches) counts 36 times; one in the entry computation once."""
  trips = lambda n: 'backend_config={"known_trip_count":{"n":"%d"}}' % n
  hlo = '\n'.join([
      '%layer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {',
      '  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), channel_id=1',
      '}',
      '%layer_cond (p: (s32[], f32[4])) -> pred[] {',
      '  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT',
      '}',
      '%micro_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {',
      '  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%layer_cond, '
      'body=%layer_body, ' + trips(12),
      '}',
      '%micro_cond (p: (s32[], f32[4])) -> pred[] {',
      '  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT',
      '}',
      'ENTRY %main (a: f32[4]) -> f32[4] {',
      '  %w2 = (s32[], f32[4]) while((s32[], f32[4]) %t0), condition=%micro_cond, '
      'body=%micro_body, ' + trips(3),
      '  %ag = f32[8]{0} all-gather(f32[4]{0} %a), dimensions={0}',
      '}',
  ])
  out = plan_lib.collective_bytes(hlo)
  assert out['all-reduce'] == {'count': 36, 'bytes': 36 * 4 * 4}
  assert out['all-gather'] == {'count': 1, 'bytes': 8 * 4}


def test_does_not_fit_names_the_biggest_consumers(planned):
  cfg, _ = planned
  result = plan_lib.plan(cfg, 8, 'h100', device_memory_gb=1e-4)
  assert not result['fits']
  figures = {'activations and temporaries': result['temp'],
             'optimizer state': result['opt_state'], 'parameters': result['params']}
  biggest = max(figures, key=figures.get)
  assert result['consumers'][0] == (biggest, figures[biggest])
  line = plan_lib.report(result).splitlines()[-1]
  assert line.startswith('does not fit') and biggest in line


def test_command_line_exit_status():
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)          # the command sets its own device count
  proc = subprocess.run(
      [sys.executable, '-m', 'train.plan', '--config', 'configs/llama.py:tiny',
       '--config.model.num_layers=1', '--config.train.global_batch_size=4',
       '--config.train.seq_len=16', '--config.mesh.fsdp=4', '--config.mesh.data=1',
       '--devices', '4', '--device_kind', 'tpu_v5e', '--device_memory_gb=0.0001'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == plan_lib.EXIT_DOES_NOT_FIT, proc.stderr[-2000:]
  assert 'mesh fsdp=4' in proc.stdout and 'does not fit' in proc.stdout
  proc = subprocess.run(
      [sys.executable, '-m', 'train.plan', '--config', 'configs/llama.py:tiny',
       '--devices', '4', '--device_kind', 'h900'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'ablax: --device_kind=' in proc.stderr
