"""pretrain -> SFT -> DPO on CPU, each stage from the previous one's workdir.

Tiny runs (d_model 32, 2 layers, 64-token rows, a few steps). The SFT run's
step-0 eval loss is recomputed independently (NumPy cross-entropy over the
eval batch's loss mask with the pretraining run's final parameters): equal
only if the SFT run started from exactly those parameters.
"""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

import configs
import model as model_lib
from align import loop as align_loop
from data import pipeline
from train import checkpoint as checkpoint_lib
from train import loop as train_loop
from train import mesh as mesh_lib
from train import optim
from train import step as step_lib

MODEL = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=2',
         'model.num_kv_heads=1', 'model.d_ff=64', 'model.max_seq_len=64']
RUN = ['train.seq_len=64', 'train.global_batch_size=8', 'train.warmup_steps=1',
       'train.log_every_steps=1']


def _eval_scalars(workdir, tag):
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars(tag)}


def _final_params(workdir, cfg):
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train)
  _, _, abstract, _ = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=3)
  state, step = ckpt.restore_latest(abstract)
  ckpt.close()
  return state['params'], step


def _masked_cross_entropy(cfg, params, batch):
  """Token-mean cross-entropy over `loss_mask`, the log-softmax in NumPy."""
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  graphdef, _, rest = nnx.split(decoder, nnx.Param, ...)
  decoder = nnx.merge(graphdef, jax.device_get(params), rest)
  logits, _ = decoder(batch['inputs'], segment_ids=batch['segment_ids'],
                      positions=batch['positions'])
  logits = np.asarray(logits, np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  mask = batch['loss_mask']
  return float((nll * mask).sum() / mask.sum())


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pre'))
  cfg = configs.load('configs/llama.py:tiny', MODEL + RUN + [
      'train.steps=3', 'train.eval_steps=0', 'train.checkpoint_every_steps=3'])
  train_loop.train_and_evaluate(cfg, workdir)
  return workdir, cfg


def _sft_cfg(init, *extra):
  return configs.load('configs/sft.py:tiny', MODEL + RUN + [
      f'train.init_checkpoint={init}', 'train.eval_steps=1', *extra])


def test_pretrain_sft_dpo(pretrained, tmp_path):
  pre, pre_cfg = pretrained
  pre_params, pre_step = _final_params(pre, pre_cfg)
  assert pre_step == 3

  # SFT from the pretraining workdir.
  sft = str(tmp_path / 'sft')
  cfg = _sft_cfg(pre, 'train.steps=2', 'train.eval_every_steps=2',
                 'train.checkpoint_every_steps=2')
  first = train_loop.train_and_evaluate(cfg, sft)
  assert sorted(first['losses']) == [1, 2]
  eval_loss = _eval_scalars(sft, 'eval/loss')
  assert sorted(eval_loss) == [0, 2]
  # Step 0 is evaluated with the pretraining run's final parameters.
  batch = next(pipeline.make_iterator(cfg, 'eval'))
  assert 0 < batch['loss_mask'].sum() < batch['loss_mask'].size   # responses only
  expected = _masked_cross_entropy(cfg, pre_params, batch)
  np.testing.assert_allclose(eval_loss[0], expected, rtol=1e-5)
  fresh = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
  fresh_params = nnx.split(fresh, nnx.Param, ...)[1]
  assert abs(_masked_cross_entropy(cfg, fresh_params, batch) - expected) > 1e-3
  sft_params, sft_step = _final_params(sft, cfg)
  assert sft_step == 2                          # a fresh step count
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       sft_params, pre_params)
  assert max(jax.tree.leaves(moved)) > 0

  # A resume ignores train.init_checkpoint (here a path that no longer
  # exists): the workdir, already at its last step, has nothing to do.
  gone = str(tmp_path / 'gone')
  shutil.copytree(pre, gone)
  cfg = _sft_cfg(gone, 'train.steps=2')
  shutil.rmtree(gone)
  second = train_loop.train_and_evaluate(cfg, sft)
  assert second['step'] == 2 and not second['losses']

  # DPO from the SFT workdir: its newest checkpoint is the reference.
  dpo = str(tmp_path / 'dpo')
  dpo_cfg = configs.load('configs/dpo.py:tiny', MODEL + [
      f'dpo.init_checkpoint={sft}', 'dpo.max_prompt_len=16', 'dpo.max_len=32',
      'train.global_batch_size=8', 'train.warmup_steps=1', 'train.steps=2',
      'train.eval_steps=1', 'train.eval_every_steps=2',
      'train.checkpoint_every_steps=2', 'train.log_every_steps=1'])
  summary = align_loop.train_and_evaluate(dpo_cfg, dpo)
  assert sorted(summary['losses']) == [1, 2]
  with open(os.path.join(dpo, 'reference.json')) as f:
    assert json.load(f)['checkpoint'] == os.path.join(sft, 'checkpoints', '2')
  # The policy starts as the SFT model: scored against itself, loss ln 2.
  assert abs(_eval_scalars(dpo, 'dpo_eval/loss')[0] - math.log(2)) < 1e-6


def test_init_checkpoint_of_another_model_is_refused(pretrained, tmp_path):
  pre, _ = pretrained
  cfg = _sft_cfg(pre, 'model.d_ff=96', 'train.steps=1')
  with pytest.raises(configs.ConfigError,
                     match=r'(?s)train.init_checkpoint.*model.d_ff: saved 64, now 96'):
    train_loop.train_and_evaluate(cfg, str(tmp_path / 'sft'))
  cfg = _sft_cfg(str(tmp_path / 'nowhere'), 'train.steps=1')
  with pytest.raises(configs.ConfigError, match='train.init_checkpoint=.*nowhere'):
    train_loop.train_and_evaluate(cfg, str(tmp_path / 'sft2'))
