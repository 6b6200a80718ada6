"""Multi-token prediction (model/mtp.py, `Decoder.mtp_*`, `train.step.lm_loss`).

- With train.mtp_loss_weight = 0 the main loss, its metrics and the gradients
  of the main parameters equal those of the same model without MTP modules
  (float32, rtol 1e-6); with 0.3 the shared parameters' gradients change.
- Module k's logits equal a hand-built computation of the DeepSeek-V3
  equations (RMSNorm written out, concatenation [hidden; embedding], the
  projection, the module's block, its own norm and the tied head), rtol 1e-5.
- On the sequence 0, 1, 2, ... depth k's targets are the inputs + k + 1, so
  the target k + 1 ahead is checkable by value; targets past the row, across
  a document boundary (segment ids) or under a zero loss mask are masked; the
  logged mtp_loss_<k> is the NumPy mean of -log p(target) over the rest.
- The chunked head (train.loss_chunk_size) gives the same MTP losses.
- The parameter count includes the modules.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import configs
import model
from model import mtp as mtp_lib
from train import step as step_lib

SMALL = ['model.d_model=32', 'model.num_heads=2', 'model.num_kv_heads=2', 'model.d_ff=64']


def _decoder(spec, *overrides):
  cfg = configs.load(spec, SMALL + list(overrides))
  return cfg, model.Decoder(cfg.model, rngs=nnx.Rngs(0))


def _batch(b=2, t=12, seed=0, segments=None):
  tokens = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, 256)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': jnp.ones((b, t), jnp.float32)}
  if segments is not None:
    batch['segment_ids'] = jnp.asarray(segments, jnp.int32)
  return batch


def _loss_and_grads(decoder, train_cfg, batch):
  graphdef, params, rest = nnx.split(decoder, nnx.Param, ...)
  loss_fn = step_lib.lm_loss(train_cfg)
  def f(p):
    return loss_fn(nnx.merge(graphdef, p, rest), batch, None)
  # Eager: both models run the same op sequence for the main loss, so the
  # gradients agree to 1e-6 (a jitted program fuses each model differently).
  (objective, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
  return objective, metrics, dict(nnx.to_flat_state(grads))


@pytest.mark.parametrize('weight', [0.0, 0.3])
def test_zero_weight_leaves_the_main_loss_and_gradients_unchanged(weight):
  # DeepSeek tiny: a dense first layer, an MoE second one and an MoE MTP block.
  spec = 'configs/deepseek.py:tiny'
  cfg, with_mtp = _decoder(spec, 'model.mtp_depth=2', f'train.mtp_loss_weight={weight}')
  _, plain = _decoder(spec)
  # The MTP modules are built last: the main parameters initialise the same.
  mtp_params = dict(nnx.to_flat_state(nnx.state(with_mtp, nnx.Param)))
  for path, p in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(mtp_params[path][...]), np.asarray(p[...]))
  batch = _batch()
  np.testing.assert_array_equal(np.asarray(with_mtp(batch['inputs'])[0]),
                                np.asarray(plain(batch['inputs'])[0]))
  obj1, m1, g1 = _loss_and_grads(with_mtp, cfg.train, batch)
  obj0, m0, g0 = _loss_and_grads(plain, cfg.train, batch)
  for key in ('loss', 'weight', 'moe_aux_loss', 'moe_router_z_loss', 'moe_expert_load'):
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-6, atol=0, err_msg=key)
  assert float(m1['mtp_loss']) > 0 and 'mtp_loss_2' in m1
  assert any(p[0] == 'mtp' for p in g1)
  changed = []
  for path, g in g0.items():
    if weight == 0:
      np.testing.assert_allclose(np.asarray(g1[path][...]), np.asarray(g[...]),
                                 rtol=1e-6, atol=1e-9, err_msg=str(path))
    else:
      changed.append(not np.allclose(np.asarray(g1[path][...]), np.asarray(g[...]),
                                     rtol=1e-3, atol=0))
  if weight == 0:
    np.testing.assert_allclose(obj1, obj0, rtol=1e-6)
  else:
    assert any(changed) and obj1 > obj0    # the shared embedding and head learn from MTP


def _rms(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def test_module_logits_equal_the_hand_built_computation():
  cfg, decoder = _decoder('configs/llama.py:tiny', 'model.mtp_depth=2',
                         'model.tie_embeddings=True')
  tokens = _batch(t=10)['inputs']
  b, t = tokens.shape
  x, _ = decoder.hidden_states(tokens)
  hidden, _ = decoder.mtp_hidden_states(x, tokens)
  table = np.asarray(decoder.embed.embedding[...], np.float64)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  eps = cfg.model.norm_eps
  h = np.asarray(x, np.float64)
  for k, module in enumerate(decoder.mtp, start=1):
    ahead = np.zeros((b, t), np.int64)
    ahead[:, :t - k] = np.asarray(tokens)[:, k:]                # x_{i+k}, 0 past the row
    joined = np.concatenate([_rms(h, module.hidden_norm.scale[...], eps),
                             _rms(table[ahead], module.embed_norm.scale[...], eps)], -1)
    z = joined @ np.asarray(module.proj[...], np.float64)
    h, _ = module.block(jnp.asarray(z, jnp.float32), positions)   # the block itself
    h = np.asarray(h, np.float64)
    np.testing.assert_allclose(np.asarray(hidden[k - 1]), h, rtol=1e-5, atol=1e-5)
    want = _rms(h, module.out_norm.scale[...], eps) @ table.T
    np.testing.assert_allclose(np.asarray(decoder.mtp_logits(k, hidden[k - 1])), want,
                               rtol=1e-5, atol=1e-5)
  n = sum(v.size for v in jax.tree.leaves(nnx.state(decoder, nnx.Param)))
  assert n == model.count_params(cfg.model)


def test_targets_are_k_plus_one_ahead_and_boundaries_are_masked():
  t = 10
  seq = jnp.arange(t + 1, dtype=jnp.int32)[None]
  segments = [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]]           # a document starts at 6
  mask = np.ones((1, t), np.float32)
  mask[0, 5] = 0                                         # 6 is no target of 5 (packing)
  mask[0, 8] = 0                                         # an SFT-style zero weight
  batch = {'inputs': seq[:, :-1], 'targets': seq[:, 1:], 'loss_mask': jnp.asarray(mask),
           'segment_ids': jnp.asarray(segments, jnp.int32)}
  for k in (1, 2, 3):
    targets, m = step_lib.mtp_targets(batch, k)
    valid = np.asarray(m[0]) > 0
    i = np.arange(t)
    np.testing.assert_array_equal(np.asarray(targets[0])[valid], i[valid] + k + 1)
    want = np.array([i + k < t and segments[0][i] == segments[0][i + k] and mask[0, i + k] > 0
                     for i in range(t)])
    np.testing.assert_array_equal(valid, want)
  # k = 1: positions 0-3 (targets 2-5), 6 (target 8) and 8 (target 10, the
  # row's last token); not 4 (target 6 is in the next document), 5 (its
  # document ends), 7 (target 9 has weight 0) nor 9 (past the row).
  np.testing.assert_array_equal(np.flatnonzero(step_lib.mtp_targets(batch, 1)[1][0]),
                                [0, 1, 2, 3, 6, 8])

  # The logged loss is the mean of -log p over exactly those targets.
  cfg, decoder = _decoder('configs/llama.py:tiny', 'model.mtp_depth=2')
  _, metrics = step_lib.lm_loss(cfg.train)(decoder, batch, None)
  x, _ = decoder.hidden_states(batch['inputs'], segment_ids=batch['segment_ids'])
  hidden, _ = decoder.mtp_hidden_states(x, batch['inputs'], batch['segment_ids'])
  weight = float(np.sum(mask))
  for k in (1, 2):
    logp = jax.nn.log_softmax(decoder.mtp_logits(k, hidden[k - 1]).astype(jnp.float32))
    logp = np.asarray(logp, np.float64)[0]
    targets, m = step_lib.mtp_targets(batch, k)
    rows = np.flatnonzero(np.asarray(m[0]))
    want = -np.mean([logp[i, i + k + 1] for i in rows])
    np.testing.assert_allclose(float(metrics[f'mtp_loss_{k}']) / weight, want, rtol=1e-5)


def test_chunked_head_gives_the_same_mtp_losses():
  cfg, decoder = _decoder('configs/llama.py:tiny', 'model.mtp_depth=2')
  batch = _batch(t=12, segments=[[1] * 7 + [2] * 5] * 2)
  chunked = ml_collections.ConfigDict(cfg.train.to_dict())
  chunked.loss_chunk_size = 5
  obj, m = step_lib.lm_loss(cfg.train)(decoder, batch, None)
  obj_c, m_c = step_lib.lm_loss(chunked)(decoder, batch, None)
  np.testing.assert_allclose(obj_c, obj, rtol=1e-5)
  for key in ('loss', 'mtp_loss', 'mtp_loss_1', 'mtp_loss_2'):
    np.testing.assert_allclose(m_c[key], m[key], rtol=1e-5, err_msg=key)


def test_shift_left_pads_the_end():
  x = jnp.arange(6).reshape(1, 6)
  np.testing.assert_array_equal(np.asarray(mtp_lib.shift_left(x, 2, fill=-1)),
                                [[2, 3, 4, 5, -1, -1]])


def test_bad_mtp_fields_are_refused():
  with pytest.raises(configs.ConfigError, match='model.mtp_depth=-1'):
    configs.load('configs/llama.py:tiny', ['model.mtp_depth=-1'])
  with pytest.raises(configs.ConfigError, match='num_memory_tokens'):
    configs.load('configs/llama.py:tiny', ['model.mtp_depth=1', 'model.num_memory_tokens=2'])
  with pytest.raises(configs.ConfigError, match='train.mtp_loss_weight=-0.5'):
    configs.load('configs/llama.py:tiny', ['train.mtp_loss_weight=-0.5'])
