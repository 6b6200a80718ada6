"""GPT-OSS's MLP and router flags (model/mlp.py, model/moe.py), against NumPy.

- `mlp_activation='clamped_swiglu'` in the dense MLP: a NumPy float64
  reference written from the formula (g = min(x W_g + b_g, limit),
  u = clip(x W_u + b_u, -limit, limit), h = (u + 1) g sigmoid(alpha g),
  y = h W_o + b_o), with weights large enough that both clamps act.
- The MoE with `moe_router_bias`, biased experts (`use_bias`) and the clamped
  SwiGLU: a NumPy reference of GPT-OSS's routing as its model card states it
  (logits x W_r + b, the top k logits, a softmax over those k only), which
  ablax computes as a softmax over all experts renormalised over the k
  chosen; the bias is large enough to change the choices.
- The expert-parallel (all_to_all) path equals the global one with the router
  bias (it travels into shard_map as its own input).
- Config validation names the field; the `gpt_oss` preset builds, counts its
  parameters and takes a gradient step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from configs import base
from model import mlp as mlp_lib
from model import moe
from tests import test_model_moe_ep as ep
from tests import test_model_presets as presets

TOL = dict(rtol=1e-5, atol=1e-6)


def _np_clamped_swiglu(gate, up, alpha, limit):
  gate = np.minimum(gate, limit)
  up = np.clip(up, -limit, limit)
  return (up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))


def _cfg(**overrides):
  m = base.model_config()
  m.d_model, m.d_ff = 16, 24
  m.mlp_activation, m.use_bias = 'clamped_swiglu', True
  m.mlp_swiglu_alpha, m.mlp_swiglu_limit = 1.3, 0.9
  for key, value in overrides.items():
    m[key] = value
  configs.validate_model(m)
  return m


def _draw(module, seed, scale=0.5):
  """Every Param of `module` drawn N(0, scale^2): pre-activations of O(1-2)."""
  rng = np.random.default_rng(seed)
  for _, p in sorted(nnx.to_flat_state(nnx.state(module, nnx.Param)), key=lambda kv: str(kv[0])):
    p[...] = jnp.asarray(scale * rng.standard_normal(p[...].shape), jnp.float32)


def _np(p):
  return np.asarray(p[...], np.float64)


def test_clamped_swiglu_dense_mlp_matches_the_formula():
  m = _cfg()
  layer = mlp_lib.MLP(m, rngs=nnx.Rngs(0))
  _draw(layer, 1)
  x = np.random.default_rng(2).standard_normal((2, 5, 16))
  gate = x @ _np(layer.wi_gate) + _np(layer.bi_gate)
  up = x @ _np(layer.wi_up) + _np(layer.bi_up)
  # Both clamps act on this draw (and not everywhere).
  assert 0 < np.mean(gate > 0.9) < 1 and 0 < np.mean(np.abs(up) > 0.9) < 1
  want = _np_clamped_swiglu(gate, up, 1.3, 0.9) @ _np(layer.wo) + _np(layer.bo)
  got = layer(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_clamped_swiglu_is_not_the_plain_swiglu():
  """The same weights with mlp_activation='silu' give another function: the
  clamps and the + 1 matter (a check that the reference above can fail)."""
  layer = mlp_lib.MLP(_cfg(), rngs=nnx.Rngs(0))
  plain = mlp_lib.MLP(_cfg(mlp_activation='silu', mlp_swiglu_alpha=1.702,
                           mlp_swiglu_limit=7.0), rngs=nnx.Rngs(0))
  _draw(layer, 1)
  _draw(plain, 1)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 16)), jnp.float32)
  assert np.max(np.abs(np.asarray(layer(x)) - np.asarray(plain(x)))) > 0.1


def _moe_reference(layer, x, alpha, limit):
  """GPT-OSS's MoE in float64: top-k of the biased logits, softmax over them."""
  xf = np.asarray(x, np.float64).reshape(-1, layer.d_model)
  logits = xf @ _np(layer.router) + _np(layer.router_bias)
  k = layer.experts_per_token
  experts = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  top = np.take_along_axis(logits, experts, axis=-1)
  weights = np.exp(top - top.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.zeros_like(xf)
  for t in range(xf.shape[0]):
    for j in range(k):
      e = experts[t, j]
      gate = xf[t] @ _np(layer.w_gate)[e] + _np(layer.b_gate)[e]
      up = xf[t] @ _np(layer.w_up)[e] + _np(layer.b_up)[e]
      h = _np_clamped_swiglu(gate, up, alpha, limit)
      y[t] += weights[t, j] * (h @ _np(layer.w_down)[e] + _np(layer.b_down)[e])
  return y.reshape(x.shape), experts, xf @ _np(layer.router)


def test_moe_with_router_bias_and_biased_experts_matches_the_reference():
  m = _cfg(num_experts=4, experts_per_token=2, moe_router_bias=True)
  layer = moe.MoE(m, rngs=nnx.Rngs(0))
  _draw(layer, 3)
  layer.router_bias[...] = jnp.asarray([1.5, -1.0, 0.0, 0.8], jnp.float32)
  x = np.random.default_rng(4).standard_normal((2, 6, 16))
  want, experts, unbiased = _moe_reference(layer, x, 1.3, 0.9)
  # The bias changes some tokens' experts: a dropped bias would show.
  chosen = np.sort(experts, -1)
  assert (chosen != np.sort(np.argsort(-unbiased, -1)[:, :2], -1)).any()
  got, aux = layer(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)
  # The router statistics see the biased logits too.
  load = np.bincount(experts.reshape(-1), minlength=4) / experts.size
  np.testing.assert_allclose(np.asarray(aux['moe_expert_load']), load, rtol=0, atol=1e-7)


def test_router_bias_is_a_trained_parameter_and_off_by_default():
  plain = moe.MoE(_cfg(num_experts=4), rngs=nnx.Rngs(0))
  assert plain.router_bias is None
  assert 'router_bias' not in nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  layer = moe.MoE(_cfg(num_experts=4, moe_router_bias=True), rngs=nnx.Rngs(0))
  _draw(layer, 3)
  graphdef, params = nnx.split(layer, nnx.Param)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, 16)), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2))(params)
  assert np.abs(np.asarray(grads['router_bias'][...])).max() > 0


def test_all_to_all_equals_global_path_with_the_router_bias():
  kw = dict(moe_router_bias=True, use_bias=True, mlp_activation='clamped_swiglu',
            mlp_swiglu_limit=0.5)
  bias = jnp.asarray(np.random.default_rng(9).standard_normal(8), jnp.float32)
  x = ep._inputs()
  glob = ep._layer(ep._cfg(moe_dispatch='global', **kw))
  glob.router_bias[...] = bias
  want = ep._value_and_grads(glob, x)
  layer = ep._layer(ep._cfg(moe_dispatch='all_to_all', **kw))
  layer.router_bias[...] = bias
  got = ep._value_and_grads(layer, x, ep._mesh(dict(data=2, expert=4)))
  ep._assert_same(got, want)


@pytest.mark.parametrize('overrides,message', [
    (dict(mlp_gated=False), "'clamped_swiglu' with model.mlp_gated=False"),
    (dict(mlp_swiglu_alpha=0.0), 'model.mlp_swiglu_alpha=0.0: must be a positive number'),
    (dict(mlp_swiglu_limit=-1.0), 'model.mlp_swiglu_limit=-1.0: must be a positive number'),
    (dict(mlp_activation='silu'), "they only act with mlp_activation='clamped_swiglu'"),
    (dict(moe_router_bias=True, num_experts=0), 'moe_router_bias=True with model.num_experts=0'),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(configs.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    _cfg(**overrides)


def test_gpt_oss_preset_builds_counts_and_steps():
  cfg = configs.load('configs/gpt_oss.py')
  m = cfg.model
  assert (m.attention_sinks, m.use_bias, m.moe_router_bias, m.mlp_activation,
          m.global_layer_interval) == (True, True, True, 'clamped_swiglu', 2)
  presets.test_tiny_preset_builds_runs_and_takes_a_gradient_step('gpt_oss')
