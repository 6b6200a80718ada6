"""`train.loss_chunk_size` is a performance switch: the chunked head gives the
unchunked loss, metrics and gradients (float32, 1e-5), for chunk sizes that do
and do not divide the sequence, with the z-loss, tied embeddings, the final
soft-cap, muP's readout multiplier, packed rows with SFT loss weights, and for
DPO's per-token log-probs.

The reference is the unchunked path, which tests/test_train_step.py checks
against a NumPy cross-entropy.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import configs
import model
from align import losses as align_losses
from train import step as step_lib

B, T, VOCAB = 2, 10, 97
TOL = dict(rtol=1e-5, atol=1e-5)


def _model_cfg(*overrides):
  return configs.load('configs/llama.py:tiny',
                      ['model.num_layers=1', f'model.vocab_size={VOCAB}',
                       *overrides]).model


def _batch(packed: bool):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': (rng.random((B, T)) < 0.8).astype(np.float32)}
  if packed:
    # Two rows of packed documents, a padding tail, and SFT-style weights
    # (prompt tokens 0, response tokens weighted).
    batch['segment_ids'] = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0],
                                     [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
    weights = rng.choice([0.0, 0.5, 1.0, 2.0], (B, T)).astype(np.float32)
    batch['loss_mask'] = weights * (batch['segment_ids'] > 0)
  return jax.tree.map(jnp.asarray, batch)


def _lm_loss_and_grads(cfg_model, batch, chunk_size, z_loss_weight=0.0):
  decoder = model.Decoder(cfg_model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(decoder)
  loss_fn = step_lib.lm_loss(ml_collections.ConfigDict(dict(
      z_loss_weight=z_loss_weight, loss_chunk_size=chunk_size)))

  def objective(p):
    return loss_fn(nnx.merge(graphdef, p), batch, None)

  (total, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return total, metrics, grads


def _assert_same(reference, chunked):
  total_ref, metrics_ref, grads_ref = reference
  total, metrics, grads = chunked
  np.testing.assert_allclose(total, total_ref, **TOL)
  assert metrics.keys() == metrics_ref.keys()
  for key in metrics_ref:
    np.testing.assert_allclose(metrics[key], metrics_ref[key], **TOL, err_msg=key)
  flat_ref = dict(nnx.to_flat_state(grads_ref))
  flat = dict(nnx.to_flat_state(grads))
  assert flat.keys() == flat_ref.keys()
  for path, g in flat_ref.items():
    np.testing.assert_allclose(flat[path][...], g[...], **TOL, err_msg=str(path))


@pytest.fixture(scope='module')
def untied_reference():
  return _lm_loss_and_grads(_model_cfg(), _batch(packed=False), None, z_loss_weight=1e-2)


# 4 leaves a ragged last chunk (10 = 4 + 4 + 2); 5 divides; 32 > seq is one chunk.
@pytest.mark.parametrize('chunk_size', [4, 5, 32])
def test_chunked_lm_loss_and_grads_equal_unchunked_with_z_loss(untied_reference, chunk_size):
  chunked = _lm_loss_and_grads(_model_cfg(), _batch(packed=False), chunk_size,
                               z_loss_weight=1e-2)
  assert 'z_loss' in chunked[1]
  _assert_same(untied_reference, chunked)


def test_chunked_loss_with_tied_softcapped_mup_head_and_packed_sft_weights():
  # The head's every step: tied embeddings (Embed.unembed), muP's 1/m readout
  # multiplier, the Gemma 2 soft-cap; packed rows with float loss weights.
  cfg = _model_cfg('model.tie_embeddings=True', 'model.final_logit_softcap=3.0',
                   'model.mup_base_width=32')
  batch = _batch(packed=True)
  reference = _lm_loss_and_grads(cfg, batch, None, z_loss_weight=1e-3)
  _assert_same(reference, _lm_loss_and_grads(cfg, batch, 3, z_loss_weight=1e-3))


def test_chunked_dpo_token_logps_and_grads_equal_unchunked():
  decoder = model.Decoder(_model_cfg(), rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(decoder)
  side = dict(_batch(packed=True))
  side['positions'] = None

  def logps(p, chunk_size):
    return align_losses.token_logps(nnx.merge(graphdef, p), side, chunk_size)

  values = {}
  for chunk_size in (None, 4):
    f = jax.jit(lambda p, c=chunk_size: (logps(p, c), jax.grad(
        lambda q: jnp.sum(logps(q, c) * jnp.arange(T)))(p)))
    values[chunk_size] = f(params)
  np.testing.assert_allclose(values[4][0], values[None][0], **TOL)
  for path, g in dict(nnx.to_flat_state(values[None][1])).items():
    np.testing.assert_allclose(dict(nnx.to_flat_state(values[4][1]))[path][...], g[...],
                               **TOL, err_msg=str(path))


@pytest.mark.parametrize('value', ['0', '-4', '2.5'])
def test_loss_chunk_size_must_be_none_or_positive_int(value):
  with pytest.raises(configs.ConfigError, match='train.loss_chunk_size'):
    configs.validate(configs.load('configs/llama.py:tiny',
                                  [f'train.loss_chunk_size={value}']))


def test_chunked_loss_compiles_to_less_memory_than_the_logits():
  # XLA's plan for value_and_grad of the loss: unchunked it holds the float32
  # logits and their gradient ([b, t, vocab] each); chunked only one chunk's
  # (b x 16 positions), so the temporaries shrink by at least the logits.
  cfg = _model_cfg('model.vocab_size=8192')
  b, t, vocab = 2, 128, 8192
  decoder = model.Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(decoder)
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens,
           'loss_mask': jax.ShapeDtypeStruct((b, t), jnp.float32)}

  def temp_bytes(chunk_size):
    loss_fn = step_lib.lm_loss(ml_collections.ConfigDict(dict(loss_chunk_size=chunk_size)))
    grad_fn = jax.grad(lambda p, batch: loss_fn(nnx.merge(graphdef, p), batch, None)[0])
    return jax.jit(grad_fn).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = b * t * vocab * 4
  unchunked, chunked = temp_bytes(None), temp_bytes(16)
  assert unchunked >= logits_bytes
  assert unchunked - chunked >= logits_bytes, (unchunked, chunked)


def test_chunked_step_on_a_data_fsdp_tensor_mesh_equals_unchunked(capfd):
  # The trainer's own step, sharded over 8 CPU devices: chunks keep the batch split, so the same metrics come out and XLA never
  # has to replicate a tensor to reshard it.
  from train import mesh as mesh_lib
  from train import optim
  from train import sharding
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (4, 17)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': (rng.random((4, 16)) < 0.8).astype(np.float32),
           'segment_ids': np.ones((4, 16), np.int32)}
  metrics = {}
  capfd.readouterr()
  for chunk in (None, 5):
    cfg = configs.load('configs/llama.py:tiny', [
        'model.num_layers=1', f'model.vocab_size={VOCAB}', 'mesh.data=2', 'mesh.fsdp=2',
        'mesh.tensor=2', 'train.global_batch_size=4', 'train.seq_len=16',
        'train.z_loss_weight=0.01',
        f'train.loss_chunk_size={chunk}'])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    optimizer, schedule = optim.make_optimizer(cfg.train, cfg.model)
    graphdef, state, shardings = step_lib.create_train_state(
        lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
    train_step = step_lib.make_train_step(
        step_lib.lm_loss(cfg.train), optimizer, graphdef=graphdef,
        state_shardings=shardings, mesh=mesh, schedule=schedule)
    _, metrics[chunk] = train_step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  assert 'Involuntary full rematerialization' not in capfd.readouterr().err
  for key in ('loss', 'z_loss', 'grad_norm', 'weight'):
    np.testing.assert_allclose(metrics[5][key], metrics[None][key], **TOL, err_msg=key)
