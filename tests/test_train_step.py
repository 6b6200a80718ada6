"""The train step: the loss against NumPy, gradient accumulation against one big
batch, and mixed precision."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import configs
import model
from data import pipeline
from train import mesh as mesh_lib
from train import sharding
from train import step as step_lib


def numpy_loss(logits, targets, mask, z_weight):
  logits = logits.astype(np.float64)
  peak = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
  target = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  ce = ((lse - target) * mask).sum() / mask.sum()
  z = (lse**2 * mask).sum() / mask.sum()
  return ce, z


class FixedLogits:
  """A stand-in model returning given logits and MoE statistics."""

  def __init__(self, logits, aux):
    self.logits, self.aux = logits, aux

  def __call__(self, tokens, segment_ids=None, positions=None):
    del tokens, segment_ids, positions
    return self.logits, self.aux


def test_lm_loss_is_token_mean_cross_entropy_plus_weighted_extras():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (3, 5)).astype(np.int32)
  mask = (rng.random((3, 5)) < 0.7).astype(np.float32)
  aux = {'moe_aux_loss': jnp.float32(1.25), 'moe_router_z_loss': jnp.float32(0.5),
         'moe_expert_load': jnp.array([0.5, 0.25, 0.25])}
  cfg = ml_collections.ConfigDict(dict(z_loss_weight=1e-2, moe_aux_loss_weight=0.1,
                                       moe_router_z_loss_weight=0.01))
  batch = {'inputs': targets, 'targets': targets, 'loss_mask': mask}
  total, metrics = step_lib.lm_loss(cfg)(FixedLogits(jnp.asarray(logits), aux), batch, None)
  ce, z = numpy_loss(logits, targets, mask, 1e-2)
  weight = mask.sum()
  assert float(metrics['weight']) == weight
  assert float(metrics['loss']) / weight == pytest.approx(ce, rel=1e-6)
  assert float(metrics['z_loss']) / weight == pytest.approx(z, rel=1e-6)
  assert float(total) / weight == pytest.approx(ce + 1e-2 * z + 0.1 * 1.25 + 0.01 * 0.5,
                                                rel=1e-6)
  np.testing.assert_allclose(np.asarray(metrics['moe_expert_load']) / weight,
                             [0.5, 0.25, 0.25], rtol=1e-6)


def one_step(cfg, mesh, batch, accum, state0, programs=None):
  """One train step with SGD(lr=1): the parameter change is minus the gradient.

  Appends the step's lowered StableHLO text to `programs` if given.
  """
  optimizer = optax.sgd(1.0)
  graphdef, init, _, shardings = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, seed=0)
  if state0 is None:
    state0 = jax.device_get(jax.jit(init)())
  state = jax.device_put(state0, shardings)
  before = state0['params']
  train_step = step_lib.make_train_step(step_lib.lm_loss(cfg.train), optimizer,
                                        graphdef=graphdef, state_shardings=shardings,
                                        mesh=mesh, grad_accum_steps=accum)
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  if programs is not None:
    programs.append(train_step.lower(state, batch).as_text())
  state, metrics = train_step(state, batch)
  grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state['params']))
  return jax.device_get(metrics), grads, state0


def test_grad_accumulation_4x2_equals_one_batch_of_8():
  cfg = configs.load('configs/llama.py:tiny', [
      'train.seq_len=32', 'train.global_batch_size=8', 'model.num_layers=1',
      'train.z_loss_weight=1e-3'])
  it = pipeline.make_iterator(cfg, 'train')
  batch = next(it)
  it.close()
  # Uneven target counts per microbatch: token weighting must not average
  # the microbatch means.
  batch['loss_mask'] = batch['loss_mask'].copy()
  batch['loss_mask'][0, 3:] = 0.0
  batch['loss_mask'][5, 20:] = 0.0
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2)), jax.devices()[:2])
  whole, grads_whole, state0 = one_step(cfg, mesh, batch, 1, None)
  micro, grads_micro, _ = one_step(cfg, mesh, batch, 4, state0)
  for key in ('loss', 'z_loss', 'objective', 'weight', 'grad_norm'):
    assert micro[key] == pytest.approx(whole[key], rel=2e-6), key
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_micro)[0],
                          jax.tree.leaves(grads_whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # And the summed microbatch means would differ: the check above can fail.
  assert whole['weight'] < batch['loss_mask'].size


def test_bfloat16_compute_stays_close_to_float32():
  base = ['train.seq_len=32', 'train.global_batch_size=8', 'model.num_layers=1']
  cfg32 = configs.load('configs/llama.py:tiny', base)
  cfg16 = configs.load('configs/llama.py:tiny', base + ['model.dtype="bfloat16"'])
  it = pipeline.make_iterator(cfg32, 'train')
  batch = next(it)
  it.close()
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1)), jax.devices()[:1])
  programs = []
  m32, g32, state0 = one_step(cfg32, mesh, batch, 1, None, programs)
  m16, g16, _ = one_step(cfg16, mesh, batch, 1, state0, programs)
  assert m16['loss'] == pytest.approx(m32['loss'], rel=1e-2)
  assert m16['grad_norm'] == pytest.approx(m32['grad_norm'], rel=5e-2)
  # Close but not equal (the same state and batch): model.dtype reached the
  # step, whose program computes in bf16 where the float32 one has none.
  assert m16['loss'] != m32['loss']
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g16),
                                                        jax.tree.leaves(g32))) > 0
  assert 'bf16' not in programs[0] and 'bf16' in programs[1]
  # Parameters (and so their gradients) stay float32 under bfloat16 compute.
  assert {x.dtype for x in jax.tree.leaves(g16)} == {np.dtype(np.float32)}
