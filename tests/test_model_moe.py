"""The MoE layer (`model/moe.py`) against NumPy references of routing, dropping and losses.

Every reference here is float64 NumPy written from the definitions in the
module docstring (top-k of a softmax, choice-major capacity rule, Switch
load-balancing loss, ST-MoE z-loss), evaluated with the layer's own weights.
Float32 comparisons use rtol=atol=1e-5 unless stated.
"""

import functools
import math

import jax
import jax.extend
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from model import mlp
from model import moe

TOL = dict(rtol=1e-5, atol=1e-5)


def _cfg(**overrides):
  m = base.model_config()
  m.d_model, m.d_ff = 32, 48
  m.num_experts, m.experts_per_token = 4, 2
  for key, value in overrides.items():
    m[key] = value
  return m


def _layer(cfg, impl='auto', seed=0, bias_scale=0.1):
  """An MoE layer with O(1) test weights: N(0, 1/fan_in) matrices, N(0, bias_scale²) biases.

  (The layer's own initialisation, N(0, 0.02), would make every output tiny
  and the fixed tolerances below meaningless.)
  """
  layer = moe.MoE(cfg, rngs=nnx.Rngs(seed), grouped_matmul=impl)
  rng = np.random.default_rng(seed + 100)
  for _, p in sorted(nnx.to_flat_state(nnx.state(layer, nnx.Param)), key=lambda kv: str(kv[0])):
    shape = p[...].shape
    scale = bias_scale if p[...].ndim == 1 or p.logical_axes[-2] == 'experts' else (
        shape[-2] ** -0.5)
    p[...] = jnp.asarray(scale * rng.standard_normal(shape), p[...].dtype)
  return layer


@functools.partial(jax.jit, static_argnums=0)
def _jit_apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _apply(layer, x):
  """The layer's forward under one jit (much faster than op-by-op on CPU)."""
  return _jit_apply(*nnx.split(layer), jnp.asarray(x))


def _np(p):
  return np.asarray(p[...], np.float64)


def _act(name, h):
  if name == 'silu':
    return h / (1 + np.exp(-h))
  if name == 'relu':
    return np.maximum(h, 0)
  if name == 'gelu':
    erf = np.vectorize(math.erf)
    return 0.5 * h * (1 + erf(h / np.sqrt(2)))
  if name == 'gelu_tanh':
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  raise ValueError(name)


def _np_mlp(cfg, x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
  """One (dense) MLP in float64: x [..., d]."""
  up = x @ w_up + (0 if b_up is None else b_up)
  if cfg.mlp_gated:
    h = _act(cfg.mlp_activation, x @ w_gate + (0 if b_gate is None else b_gate)) * up
  else:
    h = _act(cfg.mlp_activation, up)
  return h @ w_down + (0 if b_down is None else b_down)


def _np_expert(cfg, layer, e, x):
  get = lambda name: _np(getattr(layer, name))[e] if hasattr(layer, name) else None
  return _np_mlp(cfg, x, get('w_gate'), get('w_up'), get('w_down'),
                 get('b_gate'), get('b_up'), get('b_down'))


def _np_shared(cfg, layer, x):
  get = lambda name: _np(getattr(layer.shared, name)) if hasattr(layer.shared, name) else None
  if cfg.mlp_gated:
    return _np_mlp(cfg, x, get('wi_gate'), get('wi_up'), get('wo'),
                   get('bi_gate'), get('bi_up'), get('bo'))
  return _np_mlp(cfg, x, None, get('wi'), get('wo'), None, get('bi'), get('bo'))


def _np_route(cfg, layer, xf):
  """Float64 router: probabilities [n, E], top-k experts [n, k] and weights [n, k]."""
  logits = xf @ _np(layer.router)
  z = logits - logits.max(-1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  # Highest probability first; ties to the lower expert index.
  experts = np.argsort(-probs, axis=-1, kind='stable')[:, :cfg.experts_per_token]
  weights = np.take_along_axis(probs, experts, axis=-1)
  if cfg.moe_renormalize:
    weights = weights / weights.sum(-1, keepdims=True)
  return logits, probs, experts, weights


def _np_keep(experts, num_experts, capacity_factor):
  """The dropping rule, as a loop: choice-major, then token order, C slots each."""
  n, k = experts.shape
  if capacity_factor is None:
    return np.ones((n, k), bool)
  c = min(math.ceil(capacity_factor * n * k / num_experts), n)
  used = np.zeros(num_experts, int)
  keep = np.zeros((n, k), bool)
  for j in range(k):
    for t in range(n):
      e = experts[t, j]
      if used[e] < c:
        keep[t, j] = True
        used[e] += 1
  return keep


def _np_moe(cfg, layer, x):
  """The layer's output, token by token, evaluating each kept chosen expert directly."""
  b, t, d = x.shape
  xf = np.asarray(x, np.float64).reshape(b * t, d)
  _, probs, experts, weights = _np_route(cfg, layer, xf)
  keep = _np_keep(experts, cfg.num_experts, cfg.moe_capacity_factor)
  y = np.zeros_like(xf)
  for tok in range(b * t):
    for j in range(cfg.experts_per_token):
      if keep[tok, j]:
        y[tok] += weights[tok, j] * _np_expert(cfg, layer, experts[tok, j], xf[tok])
  if cfg.num_shared_experts:
    y += _np_shared(cfg, layer, xf)
  return y.reshape(b, t, d), probs, experts, keep


def _inputs(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _assert_clear_topk(probs, k):
  # The float32 layer and the float64 reference must not disagree on a near tie.
  s = np.sort(probs, axis=-1)[:, ::-1]
  assert np.min(s[:, k - 1] - s[:, k]) > 1e-4, 'test input has a near tie in top-k'


# -- one expert is a dense MLP ------------------------------------------------

@pytest.mark.parametrize('activation,gated,use_bias', [
    ('silu', True, False), ('gelu', False, True), ('gelu_tanh', True, True),
    ('relu', False, False)])
def test_one_expert_top1_equals_dense_mlp(activation, gated, use_bias):
  cfg = _cfg(num_experts=1, experts_per_token=1, mlp_activation=activation,
             mlp_gated=gated, use_bias=use_bias)
  layer = _layer(cfg)
  x = _inputs((2, 8, cfg.d_model))
  y, aux = _apply(layer, x)
  want = _np_expert(cfg, layer, 0, np.asarray(x, np.float64))
  np.testing.assert_allclose(np.asarray(y), want, **TOL)
  # And the decoder's dense MLP holding expert 0's weights computes the same.
  dense = mlp.MLP(cfg, rngs=nnx.Rngs(0))
  names = {'w_gate': 'wi_gate', 'w_up': 'wi_up' if gated else 'wi', 'w_down': 'wo',
           'b_gate': 'bi_gate', 'b_up': 'bi_up' if gated else 'bi', 'b_down': 'bo'}
  for ours, theirs in names.items():
    if hasattr(layer, ours):
      getattr(dense, theirs)[...] = getattr(layer, ours)[...][0]
  np.testing.assert_allclose(np.asarray(dense(x)), np.asarray(y), **TOL)
  # A single expert takes everything, which is exactly "balanced".
  np.testing.assert_allclose(np.asarray(aux['moe_expert_load']), [1.0])
  np.testing.assert_allclose(float(aux['moe_aux_loss']), 1.0, rtol=1e-6)


# -- dropless routing equals a loop over tokens ---------------------------------

DROPLESS_CASES = {
    'mixtral': dict(num_experts=4, experts_per_token=2),
    'top3_relu_bias_no_renorm': dict(num_experts=6, experts_per_token=3, mlp_activation='relu',
                                     mlp_gated=False, use_bias=True, moe_renormalize=False),
    'deepseek_shared': dict(num_experts=8, experts_per_token=2, num_shared_experts=2,
                            moe_d_ff=16, use_bias=True),
    'top1_gelu': dict(num_experts=5, experts_per_token=1, mlp_activation='gelu_tanh'),
}


# 'blocked' (the CPU/GPU default) on every case; 'ragged' (TPU) on the cases
# whose routed experts differ (the shared MLP does not depend on the impl).
@pytest.mark.parametrize('case,impl', [(c, 'blocked') for c in sorted(DROPLESS_CASES)] + [
    ('mixtral', 'ragged'), ('top3_relu_bias_no_renorm', 'ragged')])
def test_dropless_equals_token_loop(case, impl):
  cfg = _cfg(**DROPLESS_CASES[case])
  layer = _layer(cfg, impl)
  x = _inputs((2, 12, cfg.d_model))
  y, aux = _apply(layer, x)
  want, probs, experts, _ = _np_moe(cfg, layer, x)
  _assert_clear_topk(probs, cfg.experts_per_token)
  np.testing.assert_allclose(np.asarray(y), want, **TOL)
  assert y.shape == x.shape and y.dtype == x.dtype
  load = np.bincount(experts.ravel(), minlength=cfg.num_experts) / experts.size
  np.testing.assert_allclose(np.asarray(aux['moe_expert_load']), load, rtol=1e-6)


def test_shared_experts_are_one_wide_mlp_equal_to_a_sum_of_mlps():
  cfg = _cfg(num_shared_experts=3, moe_d_ff=8)
  layer = _layer(cfg)
  assert layer.shared.wi_up[...].shape == (cfg.d_model, 3 * 8)
  x = np.asarray(_inputs((1, 4, cfg.d_model)), np.float64)
  wg, wu, wd = (_np(layer.shared.wi_gate), _np(layer.shared.wi_up), _np(layer.shared.wo))
  parts = sum(_np_mlp(cfg, x, wg[:, s * 8:(s + 1) * 8], wu[:, s * 8:(s + 1) * 8],
                      wd[s * 8:(s + 1) * 8]) for s in range(3))
  routed = _np_moe(_cfg(num_shared_experts=0, moe_d_ff=8), layer, x)[0]
  y, _ = _apply(layer, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(y), routed + parts, **TOL)


# -- losses -------------------------------------------------------------------

def _np_losses(cfg, layer, x):
  xf = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
  logits, probs, experts, _ = _np_route(cfg, layer, xf)
  e = cfg.num_experts
  f = np.bincount(experts.ravel(), minlength=e) / experts.size     # routed fraction
  p = probs.mean(0)                                                # mean probability
  m = logits.max(-1)
  lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
  return e * np.sum(f * p), np.mean(lse ** 2), f


def test_load_balance_loss_is_one_for_a_uniform_router():
  cfg = _cfg(num_experts=8, experts_per_token=2)
  layer = _layer(cfg)
  layer.router[...] = jnp.zeros_like(layer.router[...])
  x = _inputs((2, 16, cfg.d_model))
  _, aux = _apply(layer, x)
  want_aux, want_z, want_load = _np_losses(cfg, layer, x)
  assert want_aux == pytest.approx(1.0, abs=1e-12)
  np.testing.assert_allclose(float(aux['moe_aux_loss']), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(aux['moe_router_z_loss']), want_z, rtol=1e-6)
  assert want_z == pytest.approx(math.log(8) ** 2)
  # All-equal probabilities tie; top_k then takes the lowest expert indices.
  np.testing.assert_allclose(np.asarray(aux['moe_expert_load']), want_load, rtol=1e-6)


@pytest.mark.parametrize('k', [1, 2])
def test_load_balance_loss_above_one_for_a_skewed_router(k):
  cfg = _cfg(num_experts=4, experts_per_token=k)
  layer = _layer(cfg)
  router = np.asarray(layer.router[...]).copy()
  router[0, 0] += 3.0                               # feature 0 pulls towards expert 0
  layer.router[...] = jnp.asarray(router)
  x = np.array(_inputs((2, 16, cfg.d_model)))
  x[..., 0] = np.abs(x[..., 0]) + 1.0
  _, aux = _apply(layer, x)
  want_aux, want_z, want_load = _np_losses(cfg, layer, x)
  assert want_aux > 1.2
  np.testing.assert_allclose(float(aux['moe_aux_loss']), want_aux, rtol=1e-5)
  np.testing.assert_allclose(float(aux['moe_router_z_loss']), want_z, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux['moe_expert_load']), want_load, rtol=1e-6)
  np.testing.assert_allclose(float(np.max(aux['moe_expert_load'])) * 4, want_load.max() * 4,
                             rtol=1e-6)


# -- capacity dropping ------------------------------------------------------------

def _controlled_layer(cfg, logits_per_token):
  """A layer whose router logits are the first E input features (router = [I; 0])."""
  layer = _layer(cfg, bias_scale=0.0)
  e, d = cfg.num_experts, cfg.d_model
  router = np.zeros((d, e), np.float32)
  router[:e, :e] = np.eye(e)
  layer.router[...] = jnp.asarray(router)
  n = logits_per_token.shape[0]
  x = np.array(_inputs((n, d), seed=3))
  x[:, :e] = logits_per_token
  return layer, x.reshape(2, n // 2, d)


# Preferred experts per token (first choice, second choice); b=2, t=5.
PREFS = np.array([[0, 1], [0, 2], [1, 0], [0, 3], [0, 1],
                  [2, 0], [0, 1], [3, 0], [0, 2], [1, 3]])


def _prefs_to_logits(prefs, e):
  logits = np.zeros((len(prefs), e), np.float32)
  logits[np.arange(len(prefs)), prefs[:, 0]] = 4.0
  logits[np.arange(len(prefs)), prefs[:, 1]] = 2.0
  return logits


@pytest.mark.parametrize('capacity_factor', [1.0, 0.7, 3.0])
def test_capacity_drops_exactly_the_over_capacity_assignments(capacity_factor):
  cfg = _cfg(num_experts=4, experts_per_token=2, moe_capacity_factor=capacity_factor)
  layer, x = _controlled_layer(cfg, _prefs_to_logits(PREFS, 4))
  y, aux = _apply(layer, x)
  want, _, experts, keep = _np_moe(cfg, layer, x)
  np.testing.assert_array_equal(experts, PREFS)          # routing is as constructed
  np.testing.assert_allclose(np.asarray(y), want, **TOL)
  n, k, e = 10, 2, 4
  c = min(math.ceil(capacity_factor * n * k / e), n)
  assert moe.capacity(n, e, k, capacity_factor) == c
  if capacity_factor == 1.0:
    # C = 5: expert 0 is the first choice of tokens 0,1,3,4,6,8 -> token 8's
    # first choice is dropped; all second choices to expert 0 (tokens 2,5,7)
    # come after and are dropped too.
    dropped = {(8, 0), (2, 1), (5, 1), (7, 1)}
    assert {tuple(a) for a in np.argwhere(~keep)} == dropped
  if capacity_factor == 3.0:
    assert keep.all()
  else:
    assert not keep.all()
    # Dropped assignments change the output (the test sees the rule at work).
    dropless, _ = _apply(_controlled_layer(_cfg(), _prefs_to_logits(PREFS, 4))[0], x)
    hit = ~keep.all(axis=1)
    assert np.abs(np.asarray(y - dropless)).reshape(n, -1)[hit].max() > 1e-3
  # The load statistics describe the router's choices, before dropping.
  load = np.bincount(PREFS.ravel(), minlength=e) / PREFS.size
  np.testing.assert_allclose(np.asarray(aux['moe_expert_load']), load, rtol=1e-6)


def test_sort_by_expert_positions_follow_rank_order():
  ids = np.array([2, 0, 2, 1, 0, 2, 2, 0], np.int32)
  order, counts, position = moe.sort_by_expert(jnp.asarray(ids), 4)
  np.testing.assert_array_equal(np.asarray(counts), np.bincount(ids, minlength=4))
  want = np.array([sum(ids[:i] == ids[i]) for i in range(len(ids))])
  np.testing.assert_array_equal(np.asarray(position), want)
  np.testing.assert_array_equal(ids[np.asarray(order)], np.sort(ids, kind='stable'))


# -- gradients, jit, dtypes ------------------------------------------------------

def _dense_reference(layer, cfg, x, keep=None):
  """Every expert on every token, masked by the top-k weights: a second, dense
  implementation whose gradients the sparse layer must reproduce. `keep`
  [n, k] (None: all) zeroes the dropped assignments' weights."""
  xf = x.reshape(-1, cfg.d_model)
  logits = xf @ layer.router[...]
  probs = jax.nn.softmax(logits, axis=-1)
  w, idx = lax.top_k(probs, cfg.experts_per_token)
  if cfg.moe_renormalize:
    w = w / w.sum(-1, keepdims=True)
  if keep is not None:
    w = w * keep
  gate = jnp.zeros_like(probs).at[jnp.arange(xf.shape[0])[:, None], idx].set(w)   # [n, E]
  act = jax.nn.silu                            # the config below is SwiGLU
  h = act(jnp.einsum('nd,edf->enf', xf, layer.w_gate[...])) * jnp.einsum(
      'nd,edf->enf', xf, layer.w_up[...])
  out = jnp.einsum('enf,efd->end', h, layer.w_down[...])
  y = jnp.einsum('end,ne->nd', out, gate)
  load = jnp.bincount(idx.ravel(), length=cfg.num_experts) / idx.size
  aux = cfg.num_experts * jnp.sum(load * probs.mean(0))
  z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  return y.reshape(x.shape), aux, z


def _objective(y, aux, z):
  return jnp.sum(jnp.sin(y)) + 0.1 * aux + 0.01 * z


@pytest.mark.parametrize('impl', ['ragged', 'blocked'])
def test_gradients_flow_under_jit_and_match_dense_reference(impl):
  cfg = _cfg(num_experts=4, experts_per_token=2)
  layer = _layer(cfg, impl)
  graphdef, params = nnx.split(layer, nnx.Param)
  x = _inputs((2, 8, cfg.d_model))

  @jax.jit
  def sparse_loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return _objective(y, aux['moe_aux_loss'], aux['moe_router_z_loss'])

  @jax.jit
  def dense_loss(params, x):
    return _objective(*_dense_reference(nnx.merge(graphdef, params), cfg, x))

  loss, (grads, gx) = jax.value_and_grad(sparse_loss, argnums=(0, 1))(params, x)
  want_loss, (want_grads, gx_want) = jax.value_and_grad(dense_loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for name in ('router', 'w_gate', 'w_up', 'w_down'):
    g = np.asarray(grads[name][...])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name
    np.testing.assert_allclose(g, np.asarray(want_grads[name][...]), rtol=1e-4, atol=1e-5,
                               err_msg=name)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('capacity_factor', [1.0])
def test_gradients_with_capacity_equal_the_dense_reference_with_the_same_keep_set(
    capacity_factor):
  cfg = _cfg(num_experts=4, experts_per_token=2, moe_capacity_factor=capacity_factor)
  layer = _layer(cfg)
  graphdef, params = nnx.split(layer, nnx.Param)
  x = _inputs((2, 8, cfg.d_model), seed=5)
  xf = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
  _, probs, experts, _ = _np_route(cfg, layer, xf)
  _assert_clear_topk(probs, cfg.experts_per_token)
  # The keep set of the NumPy dropping rule, fixed: near these inputs the
  # routing, and so the drops, do not change, so the layer's gradient is the
  # gradient of the dense layer with these assignments' weights zeroed.
  keep = _np_keep(experts, cfg.num_experts, capacity_factor)
  assert not keep.all()

  @jax.jit
  def sparse_loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return _objective(y, aux['moe_aux_loss'], aux['moe_router_z_loss'])

  @jax.jit
  def dense_loss(params, x):
    return _objective(*_dense_reference(nnx.merge(graphdef, params), cfg, x,
                                        jnp.asarray(keep, jnp.float32)))

  loss, (grads, gx) = jax.value_and_grad(sparse_loss, argnums=(0, 1))(params, x)
  want_loss, (want_grads, gx_want) = jax.value_and_grad(dense_loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for name in ('router', 'w_gate', 'w_up', 'w_down'):
    np.testing.assert_allclose(np.asarray(grads[name][...]), np.asarray(want_grads[name][...]),
                               rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_want), rtol=1e-4, atol=1e-5)


def test_gradients_with_capacity_and_shared_experts_are_finite_and_nonzero():
  cfg = _cfg(num_experts=4, experts_per_token=2, moe_capacity_factor=1.0,
             num_shared_experts=1, use_bias=True)
  layer = _layer(cfg)
  graphdef, params = nnx.split(layer, nnx.Param)

  @jax.jit
  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return _objective(y, aux['moe_aux_loss'], aux['moe_router_z_loss'])

  grads = jax.grad(loss)(params, _inputs((2, 8, cfg.d_model)))
  for name, g in nnx.to_flat_state(grads):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


def test_compute_dtype_and_output_dtype():
  cfg32 = _cfg(num_shared_experts=1)
  layer32 = _layer(cfg32)
  x = _inputs((2, 8, cfg32.d_model))
  y32, _ = _apply(layer32, x)
  cfg16 = _cfg(num_shared_experts=1, dtype='bfloat16')
  layer16 = _layer(cfg16)
  y16, aux16 = _apply(layer16, x)          # float32 in, bfloat16 compute
  assert y16.dtype == jnp.float32 and aux16['moe_aux_loss'].dtype == jnp.float32
  # Same weights (same seed), bfloat16 compute: within bfloat16's precision.
  np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), rtol=0.05, atol=0.05)
  # Close, not equal: model.dtype was used, and the layer's program computes in bf16.
  assert float(np.abs(np.asarray(y16) - np.asarray(y32)).max()) > 1e-6
  graphdef, state = nnx.split(layer16)
  assert 'bf16' in str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x)[0])(state))
  graphdef, state = nnx.split(layer32)
  assert 'bf16' not in str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x)[0])(state))
  yb, _ = _apply(layer16, x.astype(jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16


def test_sharded_over_data_and_expert_axes_equals_unsharded():
  # Experts over an `expert` mesh axis, tokens over `data` (8 fake CPU devices,
  # Auto axis types as the trainer's jit uses): same outputs and gradients.
  cfg = _cfg(num_experts=4, experts_per_token=2, num_shared_experts=1)
  layer = _layer(cfg)
  graphdef, params = nnx.split(layer, nnx.Param)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'expert'))
  rules = {'experts': 'expert'}
  def shard(v):
    spec = jax.sharding.PartitionSpec(*[rules.get(a) for a in v.logical_axes])
    return v.replace(jax.device_put(v[...], jax.sharding.NamedSharding(mesh, spec)))
  sharded = jax.tree.map(shard, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert sharded['w_up'][...].sharding.spec[0] == 'expert'
  x = _inputs((4, 8, cfg.d_model))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))

  @jax.jit
  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return _objective(y, aux['moe_aux_loss'], aux['moe_router_z_loss'])

  want, want_grads = jax.value_and_grad(loss)(params, x)
  got, grads = jax.value_and_grad(loss)(sharded, xs)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for (path, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads)):
    np.testing.assert_allclose(np.asarray(g[...]), np.asarray(w[...]), rtol=1e-4, atol=1e-5,
                               err_msg=str(path))


# -- FLOPs scale with k, not E ----------------------------------------------------

def _flops(cfg, impl, tokens=256):
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0), grouped_matmul=impl)
  graphdef, state = nnx.split(layer)
  fn = lambda state, x: nnx.merge(graphdef, state)(x)[0]
  x = jnp.ones((1, tokens, cfg.d_model), jnp.float32)
  cost = jax.jit(fn).lower(state, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops']


def test_blocked_flops_scale_with_k_not_num_experts():
  n, d, f = 256, 32, 64
  expert_flops = lambda k: 2 * 3 * n * k * d * f        # three matmuls per routed row
  e4k1 = _flops(_cfg(num_experts=4, experts_per_token=1, d_ff=f), 'blocked')
  e16k1 = _flops(_cfg(num_experts=16, experts_per_token=1, d_ff=f), 'blocked')
  e16k4 = _flops(_cfg(num_experts=16, experts_per_token=4, d_ff=f), 'blocked')
  # Running every expert on every token would cost E/k times expert_flops(k).
  assert expert_flops(1) <= e4k1 < 2 * expert_flops(1)
  assert expert_flops(1) <= e16k1 < 2 * expert_flops(1)
  assert expert_flops(4) <= e16k4 < 2 * expert_flops(4)
  assert 3.0 < e16k4 / e16k1 < 5.0


def test_capacity_flops_scale_with_capacity_factor_not_num_experts():
  n, d, f = 256, 32, 64
  expert_flops = lambda rows: 2 * 3 * rows * d * f
  for e, k in ((4, 1), (16, 1), (16, 4)):
    cfg = _cfg(num_experts=e, experts_per_token=k, d_ff=f, moe_capacity_factor=1.25)
    rows = e * moe.capacity(n, e, k, 1.25)
    assert expert_flops(rows) <= _flops(cfg, 'auto') < 1.5 * expert_flops(rows)


@pytest.mark.parametrize('k', [1, 3])
def test_ragged_dot_multiplies_tokens_times_k_rows(k):
  # XLA's CPU lowering of ragged_dot is dense, so count the rows the grouped
  # matmul is asked for in the jaxpr (forward and backward) instead of flops.
  cfg = _cfg(num_experts=8, experts_per_token=k)
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0), grouped_matmul='ragged')
  graphdef, state = nnx.split(layer)
  x = jnp.ones((2, 16, cfg.d_model))
  loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x)[0])
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(state, x)

  def eqns(jaxpr):       # every equation, inside nested jit/custom-rule bodies too
    for eqn in jaxpr.eqns:
      yield eqn
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            sub = sub.jaxpr
          if isinstance(sub, jax.extend.core.Jaxpr):
            yield from eqns(sub)
  ragged = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == 'ragged_dot_general']
  # Three forward grouped matmuls, the gradient into the hidden activations
  # (through w_down), and three weight gradients.
  assert len(ragged) == 7
  for eqn in ragged:
    # The ragged (grouped) dimension is the assignment axis: N = tokens * k rows
    # in the forward products and in the contracted axis of the weight gradients.
    lhs = eqn.invars[0].aval
    (ragged_dim,) = eqn.params['ragged_dot_dimension_numbers'].lhs_ragged_dimensions
    assert lhs.shape[ragged_dim] == 2 * 16 * k
  dots = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
  for eqn in dots:    # the only dense products are the router's [n, d] x [d, E]
    assert cfg.d_ff not in eqn.outvars[0].aval.shape


# -- parameters ----------------------------------------------------------------

def test_parameters_carry_logical_axes():
  cfg = _cfg(num_shared_experts=2, use_bias=True)
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
  f, d, e = cfg.d_ff, cfg.d_model, cfg.num_experts
  want = {
      'router': ((d, e), ('embed', None)),
      'w_gate': ((e, d, f), ('experts', 'embed', 'mlp')),
      'w_up': ((e, d, f), ('experts', 'embed', 'mlp')),
      'w_down': ((e, f, d), ('experts', 'mlp', 'embed')),
      'b_gate': ((e, f), ('experts', 'mlp')),
      'b_up': ((e, f), ('experts', 'mlp')),
      'b_down': ((e, d), ('experts', 'embed')),
      'shared.wi_gate': ((d, 2 * f), ('embed', 'mlp')),
      'shared.wi_up': ((d, 2 * f), ('embed', 'mlp')),
      'shared.wo': ((2 * f, d), ('mlp', 'embed')),
      'shared.bi_gate': ((2 * f,), ('mlp',)),
      'shared.bi_up': ((2 * f,), ('mlp',)),
      'shared.bo': ((d,), ('embed',)),
  }
  got = {'.'.join(map(str, path)): (v[...].shape, v.logical_axes)
         for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  assert got == want


def test_moe_d_ff_overrides_d_ff_and_bad_configs_are_refused():
  layer = moe.MoE(_cfg(moe_d_ff=24), rngs=nnx.Rngs(0))
  assert layer.w_up[...].shape == (4, 32, 24)
  with pytest.raises(ValueError, match='experts_per_token'):
    moe.MoE(_cfg(experts_per_token=5), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_experts'):
    moe.MoE(_cfg(num_experts=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='grouped_matmul'):
    moe.MoE(_cfg(), rngs=nnx.Rngs(0), grouped_matmul='dense')
