"""The training loop in process: TensorBoard event files and a real TensorBoard
server, checkpoints that cannot be loaded, a refused config, NaN stops."""

import glob
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import configs
import model as model_lib
from data import pipeline
from train import checkpoint as checkpoint_lib
from train import loop
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optim
from train import sharding
from train import step as step_lib
from train import workdir as workdir_lib

CONTRACT_TAGS = {
    'train/loss', 'train/learning_rate', 'train/grad_norm', 'train/tokens_per_second',
    'train/mfu', 'eval/loss', 'eval/perplexity', 'train/moe_aux_loss',
    'train/moe_router_z_loss', 'train/moe_expert_load_max'}

MOE_RUN = ['model.num_layers=1', 'train.seq_len=32', 'train.global_batch_size=8',
           'train.steps=6', 'train.warmup_steps=2', 'train.log_every_steps=2',
           'train.eval_every_steps=3', 'train.eval_steps=1',
           'train.checkpoint_every_steps=3', 'train.keep_checkpoints=5']


def scalars(workdir):
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()['scalars']}


@pytest.fixture(scope='module')
def moe_run(tmp_path_factory):
  """A 6-step MoE run (checkpoints at 3 and 6, eval at 0, 3, 6)."""
  workdir = str(tmp_path_factory.mktemp('moe_run'))
  cfg = configs.load('configs/mixtral.py:tiny', MOE_RUN)
  summary = loop.train_and_evaluate(cfg, workdir)
  return cfg, workdir, summary


def test_run_writes_config_checkpoints_and_falls(moe_run):
  cfg, workdir, summary = moe_run
  assert summary['status'] == 'done' and summary['step'] == 6
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['model']['num_experts'] == 8 and saved['train']['steps'] == 6
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))) == [3, 6]
  assert summary['losses'][6] < summary['losses'][1]


def test_event_files_hold_every_contract_tag(moe_run):
  _, workdir, summary = moe_run
  got = scalars(workdir)
  assert CONTRACT_TAGS <= got.keys()
  assert sorted(got['train/loss']) == [2, 4, 6]
  for step, value in got['train/loss'].items():
    assert value == np.float32(summary['losses'][step])
  assert sorted(got['eval/loss']) == [0, 3, 6]
  for step, loss in got['eval/loss'].items():
    assert got['eval/perplexity'][step] == pytest.approx(np.exp(loss), rel=1e-5)
  assert got['eval/loss'][6] < got['eval/loss'][0]
  # 1.0 is a perfectly balanced router; 8 experts is the most it can be.
  assert all(1.0 <= v <= 8.0 for v in got['train/moe_expert_load_max'].values())
  # MFU is tokens/s x the model's training FLOPs per token over the peak (the
  # CPU rate the loop measured, cached for this process).
  cfg = configs.load('configs/mixtral.py:tiny', MOE_RUN)
  flops = model_lib.flops_per_token(cfg.model, cfg.train.seq_len)
  assert sorted(got['train/mfu']) == sorted(got['train/tokens_per_second']) == [2, 4, 6]
  for step, tps in got['train/tokens_per_second'].items():
    assert tps > 0
    assert got['train/mfu'][step] == pytest.approx(
        tps * flops / metrics_lib.peak_flops(), rel=1e-6)
  # The learning rate is the schedule's at that step.
  schedule = optim.make_schedule(configs.load('configs/mixtral.py:tiny', MOE_RUN).train)
  for step, lr in got['train/learning_rate'].items():
    assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-6)


def test_mfu_is_achieved_model_flops_over_the_peak():
  # 2,000 tokens/s of a model spending 3e9 FLOPs per token is 6e12 FLOP/s:
  # 60 % of a 1e13 FLOP/s peak, 0.6 % of a 1 PFLOP/s one.
  assert metrics_lib.mfu(2000.0, 3e9, 1e13) == pytest.approx(0.6, rel=1e-12)
  assert metrics_lib.mfu(2000.0, 3e9, 1e15) == pytest.approx(0.006, rel=1e-12)
  assert metrics_lib.mfu(2000.0, 3e9, math.inf) == 0.0     # unknown device


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_tensorboard_server_serves_train_loss(moe_run):
  _, workdir, summary = moe_run
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, '-m', 'tensorboard.main', '--logdir', workdir,
       '--host', '127.0.0.1', '--port', str(port), '--load_fast', 'false'],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  url = (f'http://127.0.0.1:{port}/data/plugin/scalars/scalars?' +
         urllib.parse.urlencode({'run': '.', 'tag': 'train/loss'}))
  points, deadline = None, time.monotonic() + 90
  try:
    while time.monotonic() < deadline:
      assert server.poll() is None, server.stderr.read().decode()[-2000:]
      try:
        with urllib.request.urlopen(url, timeout=5) as response:
          points = json.loads(response.read())
        if len(points) == 3:
          break
      except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        pass
      time.sleep(0.5)
  finally:
    server.terminate()
    server.wait(timeout=30)
  assert points is not None, 'tensorboard did not answer in 90 s'
  # [wall_time, step, value] per point.
  assert [p[1] for p in points] == [2, 4, 6]
  for _, step, value in points:
    assert value == pytest.approx(summary['losses'][step], rel=1e-6)


def test_truncated_checkpoint_is_skipped_with_a_warning(moe_run, tmp_path, caplog):
  cfg, workdir, _ = moe_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  # Truncate the newest checkpoint by hand: its array data is gone.
  for path in glob.glob(os.path.join(copy, 'checkpoints', '6', 'state', 'd', '*')):
    os.remove(path)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train)
  import model  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  it = pipeline.make_iterator(cfg, 'train')
  ckpt = checkpoint_lib.Checkpointer(copy, every_steps=3, keep=5)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest(abstract, it)
  ckpt.close()
  assert step == 3 and int(state['step']) == 3
  assert 'checkpoints/6 cannot be loaded' in caplog.text
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['3']
  assert os.listdir(os.path.join(copy, 'checkpoints.skipped'))[0].startswith('6.')
  # The data iterator is back at step 3: its next batch is the 4th batch.
  fresh = pipeline.make_iterator(cfg, 'train')
  fourth = [next(fresh) for _ in range(4)][-1]
  resumed = next(it)
  it.close()
  fresh.close()
  for key in fourth:
    np.testing.assert_array_equal(resumed[key], fourth[key])


def test_no_loadable_checkpoint_is_an_error_that_moves_nothing(moe_run, tmp_path):
  cfg, workdir, _ = moe_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  for step in ('3', '6'):
    for path in glob.glob(os.path.join(copy, 'checkpoints', step, 'state', 'd', '*')):
      os.remove(path)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train)
  import model  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  ckpt = checkpoint_lib.Checkpointer(copy, every_steps=3, keep=5)
  with pytest.raises(workdir_lib.CheckpointError, match=r'steps 6, 3\); the newest, 6'):
    ckpt.restore_latest(abstract)
  ckpt.close()
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['3', '6']


def test_resume_with_clipping_switched_off_keeps_the_state_structure(moe_run):
  cfg, _, _ = moe_run
  on = configs.load('configs/mixtral.py:tiny', MOE_RUN)
  off = configs.load('configs/mixtral.py:tiny', MOE_RUN + ['train.grad_clip_norm=0.0'])
  import model  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(cfg.mesh)
  structures = []
  for c in (on, off):
    optimizer, _ = optim.make_optimizer(c.train)
    _, _, abstract, _ = step_lib.train_state_spec(
        lambda c=c: model.Decoder(c.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
    structures.append(jax.tree.structure(abstract))
  assert structures[0] == structures[1]


def test_config_with_a_different_model_is_refused(moe_run):
  _, workdir, _ = moe_run
  cfg = configs.load('configs/mixtral.py:tiny',
                     MOE_RUN + ['model.d_model=32', 'model.num_experts=4',
                                'model.attention_impl="xla"', 'train.steps=9'])
  with pytest.raises(configs.ConfigError) as e:
    loop.train_and_evaluate(cfg, workdir)
  message = str(e.value)
  assert 'model.d_model: saved 64, now 32' in message
  assert 'model.num_experts: saved 8, now 4' in message
  assert 'attention_impl' not in message and 'train.steps' not in message


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
  bad_step = 4
  real = sharding.global_batch
  calls = []

  def poisoned(batch, batch_sharding):
    """The real batches, with a NaN in the loss mask of the 4th (train only)."""
    calls.append(1)
    if len(calls) == bad_step:
      batch = dict(batch, loss_mask=batch['loss_mask'] * np.float32('nan'))
    return real(batch, batch_sharding)

  monkeypatch.setattr(sharding, 'global_batch', poisoned)
  cfg = configs.load('configs/llama.py:tiny', [
      'model.num_layers=1', 'train.seq_len=32', 'train.steps=8',
      'train.checkpoint_every_steps=1', 'train.keep_checkpoints=10',
      'train.log_every_steps=1', 'train.eval_steps=0'])
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=f'at step {bad_step}; stopping'):
    loop.train_and_evaluate(cfg, workdir)
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert saved == list(range(1, bad_step))
  assert sorted(scalars(workdir)['train/loss']) == list(range(1, bad_step))


def test_restore_params_reads_only_the_parameters(moe_run):
  cfg, workdir, _ = moe_run
  import model  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(cfg.mesh)
  # A different optimizer (no clipping: another state structure) still loads.
  train_cfg = cfg.train.copy_and_resolve_references()
  train_cfg.grad_clip_norm = 0.0
  optimizer, _ = optim.make_optimizer(train_cfg)
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  params, step = workdir_lib.restore_params(workdir, abstract['params'])
  assert step == 6
  earlier = workdir_lib.restore_params(
      os.path.join(workdir, 'checkpoints', '3'), abstract['params'])[0]
  saved = ocp_restore(os.path.join(workdir, 'checkpoints', '6', 'state'))['params']
  for (path, got), want, target in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree.leaves(saved),
                                       jax.tree.leaves(abstract['params'])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                  err_msg=jax.tree_util.keystr(path))
    assert got.sharding == target.sharding
  # A step folder names that step's parameters.
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(earlier),
                                                      jax.tree.leaves(params)))


def ocp_restore(path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(path)


def test_evaluate_gives_the_runs_eval_loss(moe_run):
  _, workdir, summary = moe_run
  from train import evaluate  # pylint: disable=g-import-not-at-top
  got = scalars(workdir)
  newest = evaluate.evaluate(workdir)
  assert newest['step'] == 6
  assert newest['loss'] == pytest.approx(got['eval/loss'][6], rel=1e-6)
  assert newest['perplexity'] == pytest.approx(got['eval/perplexity'][6], rel=1e-6)
  earlier = evaluate.evaluate(workdir, checkpoint=3)
  assert earlier['loss'] == pytest.approx(got['eval/loss'][3], rel=1e-6)
  with pytest.raises(FileNotFoundError, match='no checkpoint 4 .* there are: 3, 6'):
    evaluate.evaluate(workdir, checkpoint=4)


def test_skipped_checkpoint_reason_is_readable():
  """Orbax's read errors end in a pybind11 bound-method repr; the warning gives
  the chained tensorstore error instead."""
  try:
    try:
      raise ValueError('OUT_OF_RANGE: Error reading "params.embed/0.0" in OCDBT '
                       'database: Requested byte range [0, 7634) is not valid')
    except ValueError as cause:
      raise Exception(  # pylint: disable=broad-exception-raised
          'Encountered error while reading array index: (slice(0, 64, 1),). See '
          'full TensorStore details: <bound method pybind11_detail.spec of '
          'TensorStore({\n  "driver": "zarr"\n})>') from cause
  except Exception as e:  # pylint: disable=broad-except
    reason = checkpoint_lib._reason(e)  # pylint: disable=protected-access
  assert '<bound method' not in reason
  assert reason.startswith('Exception: Encountered error while reading array index')
  assert 'Error reading "params.embed/0.0"' in reason
