"""The flags Qwen3-Next needs (issue 17), each against its formula in NumPy.

- `model.rope_fraction` (partial rotary; GPT-NeoX, Qwen3-Next): with r =
  int(head_dim * fraction), feature i < r/2 pairs with i + r/2 and both turn
  by the angle pos * theta^(-2i/r); features r.. pass through.
- `model.gdn_num_v_heads`: Gated DeltaNet with n_v = g n q/k heads; value head
  j reads q/k head j // g (its own v, state, decay, write strength, gate).
- `model.moe_shared_expert_gate`: y = routed(x) + sigmoid(x . w) shared(x).
And the config checks of the three fields.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from model import attention
from model import flops
from model import gdn
from model import moe
from tests.test_model_gdn import delta_rule_reference

BASE = ['model.vocab_size=64', 'model.d_model=16', 'model.num_heads=2',
        'model.num_kv_heads=2', 'model.d_ff=32', 'model.attention_impl=xla']


def _cfg(*overrides):
  return configs.load('configs/base.py', BASE + list(overrides)).model


# -- partial rotary ---------------------------------------------------------------


def rope_reference(x, pos, fraction, theta):
  """NumPy float64: x [b, t, n, h], int positions [b, t]."""
  h = x.shape[-1]
  r = int(h * fraction)
  out = x.astype(np.float64).copy()
  for i in range(r // 2):
    angle = pos * theta ** (-2.0 * i / r)                  # [b, t]
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
    a, b = x[..., i], x[..., i + r // 2]
    out[..., i] = a * c - b * s
    out[..., i + r // 2] = b * c + a * s
  return out


@pytest.mark.parametrize('fraction,head_dim', [(0.25, 16), (0.5, 12), (1.0, 8)])
def test_partial_rotary_equals_the_formula(fraction, head_dim):
  cfg = _cfg(f'model.head_dim={head_dim}', f'model.rope_fraction={fraction}',
             'model.rope_theta=100.0')
  layer = attention.Attention(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 2, head_dim))
  pos = np.stack([np.arange(9), np.arange(9) + 30])
  got = layer.rotate(jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32))
  want = rope_reference(x, pos, fraction, 100.0)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  r = int(head_dim * fraction)
  np.testing.assert_array_equal(np.asarray(got)[..., r:], x[..., r:].astype(np.float32))


def test_partial_rotary_scores_depend_on_the_offset_only():
  """q . k after rotation depends on the two positions through their
  difference (the rotated part) and not at all (the rest)."""
  cfg = _cfg('model.head_dim=16', 'model.rope_fraction=0.25')
  layer = attention.Attention(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32) for _ in range(2))
  at = lambda x, p: layer.rotate(x, jnp.full((1, 1), p, jnp.int32))
  score = lambda i, j: np.asarray(jnp.sum(at(q, i) * at(k, j), axis=-1))
  np.testing.assert_allclose(score(7, 3), score(27, 23), atol=1e-4, rtol=0)
  assert np.abs(score(7, 3) - score(7, 4)).max() > 1e-3


# -- Gated DeltaNet value heads ------------------------------------------------------


D, NK, NV, DK, DV, KW = 16, 2, 4, 8, 6, 4


def _gdn_layer():
  cfg = _cfg('model.layer_pattern=L', f'model.gdn_num_heads={NK}',
             f'model.gdn_num_v_heads={NV}', f'model.gdn_head_dim={DK}',
             f'model.gdn_v_head_dim={DV}', f'model.gdn_conv_width={KW}')
  layer = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    x = var.get_value()
    value = (1 + 0.3 * rng.normal(size=x.shape) if x.ndim == 1
             else 1.5 * rng.normal(size=x.shape) / np.sqrt(x.shape[0]))
    var.set_value(jnp.asarray(value, x.dtype))
  return cfg, layer


def gdn_value_heads_reference(layer, x):
  """NumPy float64, from the equations of model/gdn.py with grouped heads."""
  p = lambda name: np.asarray(getattr(layer, name).get_value(), np.float64)
  b, t, _ = x.shape
  silu = lambda z: z / (1 + np.exp(-z))
  proj = lambda w: np.einsum('btd,dnh->btnh', x, p(w)).reshape(b, t, -1)
  pre = np.concatenate([proj('wq'), proj('wk'), proj('wv')], axis=-1)
  w = p('conv')
  conv = sum(w[i] * np.pad(pre, ((0, 0), (KW - 1 - i, 0), (0, 0)))[:, :t] for i in range(KW))
  y = silu(conv)
  q = y[..., :NK * DK].reshape(b, t, NK, DK)
  k = y[..., NK * DK:2 * NK * DK].reshape(b, t, NK, DK)
  v = y[..., 2 * NK * DK:].reshape(b, t, NV, DV)
  q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6) / math.sqrt(DK)
  k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
  group = np.arange(NV) // (NV // NK)                      # value head -> its q/k head
  q, k = q[:, :, group], k[:, :, group]
  a = np.einsum('btd,dn->btn', x, p('wa')) + p('dt_bias')
  alpha = np.exp(-np.exp(p('a_log')) * np.log1p(np.exp(a)))
  beta = 1 / (1 + np.exp(-np.einsum('btd,dn->btn', x, p('wb'))))
  o = delta_rule_reference(q, k, v, alpha, beta, np.ones((b, t), np.int32))
  scale = np.asarray(layer.o_norm.scale.get_value(), np.float64)
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * scale
  o = o * silu(np.einsum('btd,dnh->btnh', x, p('wg')))
  return np.einsum('btnh,nhd->btd', o, p('wo'))


def test_gdn_value_heads_equal_their_equations():
  cfg, layer = _gdn_layer()
  assert layer.wv.get_value().shape == (D, NV, DV) and layer.wq.get_value().shape == (D, NK, DK)
  x = np.random.default_rng(2).normal(size=(2, 20, D))
  got = layer(jnp.asarray(x, jnp.float32), None)
  want = gdn_value_heads_reference(layer, x)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)
  n_params = sum(a.size for a in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n_params == gdn.gdn_params(cfg)


# -- gated shared expert ---------------------------------------------------------------


def moe_reference(layer, x, k):
  """NumPy float64: softmax top-k renormalised routed experts + gated shared MLP."""
  p = lambda v: np.asarray(v.get_value(), np.float64)
  silu = lambda z: z / (1 + np.exp(-z))
  xf = x.reshape(-1, x.shape[-1])
  logits = xf @ p(layer.router)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.zeros_like(xf)
  for n in range(xf.shape[0]):
    top = np.argsort(-probs[n])[:k]
    weights = probs[n, top] / probs[n, top].sum()
    for e, wt in zip(top, weights):
      hidden = silu(xf[n] @ p(layer.w_gate)[e]) * (xf[n] @ p(layer.w_up)[e])
      y[n] += wt * hidden @ p(layer.w_down)[e]
  s = layer.shared
  shared = (silu(xf @ p(s.wi_gate)) * (xf @ p(s.wi_up))) @ p(s.wo)
  gate = 1 / (1 + np.exp(-(xf @ p(layer.shared_gate))))
  return (y + gate[:, None] * shared).reshape(x.shape)


def test_shared_expert_gate_equals_the_formula():
  cfg = _cfg('model.num_experts=4', 'model.experts_per_token=2',
             'model.num_shared_experts=1', 'model.moe_d_ff=8',
             'model.moe_shared_expert_gate=True')
  layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(3)
  layer.router.set_value(jnp.asarray(rng.normal(size=(16, 4)), jnp.float32))
  layer.shared_gate.set_value(jnp.asarray(rng.normal(size=(16,)) * 0.5, jnp.float32))
  x = rng.normal(size=(2, 5, 16))
  got, _ = layer(jnp.asarray(x, jnp.float32))
  want = moe_reference(layer, x, 2)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)
  n_params = sum(a.size for a in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n_params == flops.moe_params(cfg)


# -- config checks -----------------------------------------------------------------------


@pytest.mark.parametrize('overrides,match', [
    (['model.rope_fraction=0.0'], r'rope_fraction=0.0: must be in \(0, 1\]'),
    (['model.rope_fraction=1.5'], 'rope_fraction=1.5'),
    (['model.rope_fraction=0.1'], 'rotates int'),             # 8 * 0.1 -> 0 features
    (['model.rope_fraction=0.375'], '= 3 features'),          # odd count
    (['model.rope_fraction=0.5', "model.position='alibi'"], "position='alibi'"),
    (['model.rope_fraction=0.5', "model.attention_type='mla'", 'model.num_heads=2',
      'model.num_kv_heads=2'], 'mla_qk_rope_head_dim'),
    (['model.layer_pattern=LA', 'model.gdn_num_heads=2', 'model.gdn_num_v_heads=3'],
     'gdn_num_v_heads=3'),
    (['model.num_experts=4', 'model.moe_shared_expert_gate=True'],
     'moe_shared_expert_gate=True with model.num_shared_experts=0'),
])
def test_new_fields_are_checked(overrides, match):
  with pytest.raises(configs.UserError, match=match):
    _cfg(*overrides)
