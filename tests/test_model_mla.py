"""Multi-head latent attention (model/mla.py) against DeepSeek-V2's equations.

The reference is written from the paper (DeepSeek-AI 2024, "DeepSeek-V2",
section 2.1, eqs. 9-19 with the decoupled RoPE), in NumPy float64, with RoPE as
complex rotations of the (i, i + d_r/2) feature pairs (ablax's documented
layout). Then: causality and packed documents, the weight-absorbed decode form
(in NumPy, and `MLAttention.absorbed_attend` against the layer's own forward),
the flash kernel against the XLA path, hand counts of parameters, FLOPs and
cache sizes, and the config refusals.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model
from model import mla
from model import positions as positions_lib

D, N, RQ, R, DN, DR, DV = 32, 4, 24, 20, 12, 8, 10
SMALL = ['model.vocab_size=64', f'model.d_model={D}', f'model.num_heads={N}',
         f'model.num_kv_heads={N}', 'model.d_ff=64', 'model.max_seq_len=64',
         'model.attention_type=mla', f'model.mla_kv_lora_rank={R}',
         f'model.mla_qk_nope_head_dim={DN}', f'model.mla_qk_rope_head_dim={DR}',
         f'model.mla_v_head_dim={DV}', 'model.attention_impl=xla']


def _cfg(*overrides):
  return configs.load('configs/base.py', SMALL + list(overrides)).model


def _layer(cfg_model, seed=0, **kwargs):
  """An MLAttention whose parameters are N(0, 1)/sqrt(fan-in) (norm scales 1 +
  N(0, 0.3)): sharper than the init, so the softmax is far from uniform."""
  layer = mla.MLAttention(cfg_model, rngs=nnx.Rngs(0), **kwargs)
  rng = np.random.RandomState(seed)
  for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    x = var.get_value()
    if x.ndim == 1:
      value = 1 + 0.3 * rng.normal(size=x.shape)
    else:
      value = 1.5 * rng.normal(size=x.shape) / np.sqrt(x.shape[0])
    var.set_value(jnp.asarray(value, x.dtype))
  return layer


def _call(layer, method='__call__', *args, **kwargs):
  """layer.method(*args, **kwargs) under jit (eager dispatch is slow on CPU)."""
  graph, state = nnx.split(layer)
  fn = lambda state, *a: getattr(nnx.merge(graph, state), method)(*a, **kwargs)
  return jax.jit(fn)(state, *args)


def _params(layer):
  return {'.'.join(map(str, path)): np.asarray(var.get_value(), np.float64)
          for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


# ------------------------------------------------------------ the NumPy MLA


def np_rms(x, g, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g


def np_rope(x, pos, inv_freq):
  """Rotates the pairs (x_i, x_{i+d/2}) of x [t, ..., d] by pos_t * inv_freq_i,
  as the complex product (x_i + j x_{i+d/2}) e^{j pos_t inv_freq_i}."""
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  angle = pos.reshape((-1,) + (1,) * (x.ndim - 1)) * inv_freq
  z = z * np.exp(1j * angle)
  return np.concatenate([z.real, z.imag], axis=-1)


def np_mla(p, x, *, q_lora, inv_freq=None, mscale=1.0, seg=None):
  """DeepSeek-V2 eqs. 9-19 for one sequence x [t, d]; positions restart per segment.

  Returns (u [t, d], and the pieces the absorbed form needs)."""
  t = x.shape[0]
  seg = np.ones(t, int) if seg is None else seg
  pos = np.array([sum(seg[j] == seg[i] for j in range(i)) for i in range(t)], float)
  if inv_freq is None:
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, DR, 2) / DR)
  # Queries (eqs. 12-15): c^Q = x W^DQ (normed), q^C = c^Q W^UQ, q^R = RoPE(c^Q W^QR).
  if q_lora:
    c_q = np_rms(x @ p['wq_a'], p['q_a_norm.scale'])
    q = np.einsum('tr,rnh->tnh', c_q, p['wq_b'])
  else:
    q = np.einsum('td,dnh->tnh', x, p['wq'])
  q_c, q_r = q[..., :DN], np_rope(q[..., DN:], pos, inv_freq)
  # Keys and values (eqs. 9-11, 16-17): c^KV = x W^DKV (normed), k^C = c^KV W^UK,
  # v^C = c^KV W^UV, k^R = RoPE(x W^KR), one k^R for all heads.
  w_dkv, w_kr = p['wkv_a'][:, :R], p['wkv_a'][:, R:]
  c_kv = np_rms(x @ w_dkv, p['kv_a_norm.scale'])
  k_c = np.einsum('tr,rnh->tnh', c_kv, p['wk_b'])
  v = np.einsum('tr,rnh->tnh', c_kv, p['wv_b'])
  k_r = np_rope(x @ w_kr, pos, inv_freq)                                  # [t, DR]
  # Attention (eqs. 18-19): q_i = [q^C; q^R], k_j = [k^C; k^R], scale 1/sqrt(d_h + d_h^R).
  scores = (np.einsum('inh,jnh->nij', q_c, k_c) + np.einsum('inh,jh->nij', q_r, k_r))
  scores = scores * mscale ** 2 / np.sqrt(DN + DR)
  visible = np.array([[j <= i and seg[i] == seg[j] for j in range(t)] for i in range(t)])
  scores = np.where(visible, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum('nij,jnh->inh', probs, v)
  u = np.einsum('tnh,nhd->td', o, p['wo'])
  return u, dict(q_c=q_c, q_r=q_r, c_kv=c_kv, k_r=k_r, visible=visible, o=o)


def _x(seed, b=2, t=12):
  return np.random.default_rng(seed).standard_normal((b, t, D))


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _assert_close(actual, expected, tol, name=''):
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol,
                             atol=tol * np.abs(expected).max(), err_msg=name)


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize('q_lora', [0, RQ])
def test_layer_matches_the_papers_equations(q_lora):
  """float32 layer vs float64 equations, 2e-5 of the output's scale."""
  cfg = _cfg(f'model.mla_q_lora_rank={q_lora}')
  layer = _layer(cfg)
  x = _x(1)
  got = _call(layer, '__call__', jnp.asarray(x, jnp.float32), _positions(*x.shape[:2]))
  p = _params(layer)
  for row in range(x.shape[0]):
    want, _ = np_mla(p, x[row], q_lora=q_lora)
    _assert_close(got[row], want, 2e-5, f'row {row}')


def test_yarn_scales_the_whole_logit_by_mscale_squared():
  """YaRN factor 4: rope on the yarn frequencies, and every logit (nope part
  too) times (0.1 ln 4 + 1)^2, with cos/sin themselves unscaled (DeepSeek's
  mscale = mscale_all_dim)."""
  scaling = {'type': 'yarn', 'factor': 4.0, 'original_max_seq_len': 16}
  cfg = _cfg(f'model.rope_scaling={scaling}')
  layer = _layer(cfg, seed=3)
  x = _x(2, b=1)
  got = _call(layer, '__call__', jnp.asarray(x, jnp.float32), _positions(*x.shape[:2]))
  inv_freq, _ = positions_lib.rope_inv_freq(DR, 10000.0, scaling)
  want, _ = np_mla(_params(layer), x[0], q_lora=0, inv_freq=inv_freq,
                   mscale=0.1 * math.log(4.0) + 1)
  _assert_close(got[0], want, 2e-5)


def test_causal_and_packed_documents_stay_apart():
  """A change at token j leaves outputs before j alone; with segment ids, a
  document's outputs equal those of the document run alone (positions restart),
  and equal the NumPy reference of the packed row."""
  cfg = _cfg(f'model.mla_q_lora_rank={RQ}')
  layer = _layer(cfg, seed=4)
  x = _x(5, b=1, t=14)
  pos = _positions(1, 14)
  base = _call(layer, '__call__', jnp.asarray(x, jnp.float32), pos)
  changed = x.copy()
  changed[0, 9] += 3.0
  after = _call(layer, '__call__', jnp.asarray(changed, jnp.float32), pos)
  np.testing.assert_array_equal(np.asarray(after[0, :9]), np.asarray(base[0, :9]))
  assert float(jnp.abs(after[0, 9:] - base[0, 9:]).max()) > 1e-3

  seg = np.array([1] * 5 + [2] * 9)
  seg_j = jnp.asarray(seg[None], jnp.int32)
  packed = _call(layer, '__call__', jnp.asarray(x, jnp.float32),
                 positions_lib.segment_positions(seg_j), seg_j)
  alone = _call(layer, '__call__', jnp.asarray(x[:, 5:], jnp.float32), _positions(1, 9))
  _assert_close(packed[0, 5:], alone[0], 1e-5, 'second document')
  want, _ = np_mla(_params(layer), x[0], q_lora=RQ, seg=seg)
  _assert_close(packed[0], want, 2e-5, 'numpy packed')


def test_absorbed_form_equals_naive_form_in_numpy():
  """Section 2.1.2 in float64: with W^UK absorbed into the query and W^UV into
  the output, attention over the cached (c^KV, k^R) alone gives the naive
  output at every position, to 1e-12."""
  cfg = _cfg(f'model.mla_q_lora_rank={RQ}')
  p = _params(_layer(cfg, seed=6))
  x = _x(7, b=1, t=10)[0]
  u, parts = np_mla(p, x, q_lora=RQ)
  q_abs = np.einsum('tnh,rnh->tnr', parts['q_c'], p['wk_b'])      # q^C W^UK^T
  scores = (np.einsum('inr,jr->nij', q_abs, parts['c_kv'])
            + np.einsum('inh,jh->nij', parts['q_r'], parts['k_r'])) / np.sqrt(DN + DR)
  scores = np.where(parts['visible'], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o_latent = np.einsum('nij,jr->inr', probs, parts['c_kv'])       # [t, n, r]
  w_ov = np.einsum('rnh,nhd->nrd', p['wv_b'], p['wo'])            # W^UV absorbed into W^O
  u_abs = np.einsum('tnr,nrd->td', o_latent, w_ov)
  np.testing.assert_allclose(u_abs, u, rtol=1e-12, atol=1e-12 * np.abs(u).max())


@pytest.mark.parametrize('extras', [
    [],
    ['model.sliding_window=4', 'model.attention_sinks=True', 'model.attn_logit_softcap=5.0',
     'model.attention_gate=headwise'],
])
def test_absorbed_attend_on_the_latent_cache_equals_the_forward(extras):
  """`MLAttention.absorbed_attend` over the latent cache (c_kv, k_r from
  `latent`) equals the layer's forward: the last position alone (a decode
  step, q_idx = [t - 1]) and all positions; also with a window, sinks,
  soft-cap and a gate."""
  cfg = _cfg(f'model.mla_q_lora_rank={RQ}', *extras)
  layer = _layer(cfg, seed=8, sliding_window=cfg.sliding_window)
  x = jnp.asarray(_x(9, t=11), jnp.float32)
  b, t = x.shape[:2]
  pos = _positions(b, t)
  full = _call(layer, '__call__', x, pos)
  c_kv, k_rope = _call(layer, 'latent', x, pos)
  assert c_kv.shape == (b, t, R) and k_rope.shape == (b, t, DR)
  q = layer.queries(x[:, -1:], pos[:, -1:])
  o = layer.absorbed_attend(q, c_kv, k_rope, q_idx=jnp.array([t - 1]), kv_idx=jnp.arange(t))
  _assert_close(layer.output(o, x[:, -1:])[:, 0], full[:, -1], 1e-5, 'decode step')
  o_all = layer.absorbed_attend(layer.queries(x, pos), c_kv, k_rope)
  _assert_close(layer.output(o_all, x), full, 1e-5, 'all positions')


def test_pallas_kernel_matches_xla_through_the_layer():
  """The flash kernel (interpret mode) with q/k head dim 20 and v head dim 10,
  forward and gradients of the layer's parameters, vs the XLA reference."""
  cfg = _cfg()
  x = jnp.asarray(_x(10, b=1, t=24), jnp.float32)
  pos = _positions(1, 24)
  results = []
  for impl in ('xla', 'pallas'):
    cfg.attention_impl = impl
    layer = _layer(cfg, seed=11)
    graph, params = nnx.split(layer)
    loss = lambda prm: jnp.sum(jnp.sin(nnx.merge(graph, prm)(x, pos)))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (lx, gx), (lp, gp) = results
  _assert_close(lp, lx, 1e-5, 'loss')
  for (path, a), (_, e) in zip(nnx.to_flat_state(gp), nnx.to_flat_state(gx)):
    _assert_close(a.get_value(), e.get_value(), 1e-4, str(path))


def test_decoder_with_mla_composes_with_memory_windows_and_packing():
  """A decoder with memory tokens, alternating windows and packed rows: the
  built parameter count equals `count_params`; a document's logits do not
  depend on the other document of its row."""
  cfg = _cfg(f'model.mla_q_lora_rank={RQ}', 'model.num_memory_tokens=2',
             'model.sliding_window=3', 'model.global_layer_interval=2')
  dec = model.Decoder(cfg, rngs=nnx.Rngs(1))
  built = sum(v.size for v in jax.tree.leaves(nnx.state(dec, nnx.Param)))
  assert built == model.count_params(cfg)
  tokens = jnp.asarray(np.random.default_rng(12).integers(0, 64, (1, 12)), jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  other = tokens.at[0, :5].set((tokens[0, :5] + 7) % 64)
  a, _ = _call(dec, '__call__', tokens, seg)
  b, _ = _call(dec, '__call__', other, seg)
  np.testing.assert_allclose(np.asarray(a[0, 5:]), np.asarray(b[0, 5:]), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(a[0, :5] - b[0, :5]).max()) > 1e-3


def test_counts_by_hand():
  """Parameters, training FLOPs and cache numbers from the architecture, by hand."""
  cfg = _cfg(f'model.mla_q_lora_rank={RQ}')
  d, n, v, ff, layers = D, N, 64, 64, 2
  attn_weights = (d * RQ + RQ * n * (DN + DR)        # W_DQ, W_UQ (with the rope part)
                  + d * (R + DR)                     # W_DKV and W_KR
                  + R * n * DN + R * n * DV          # W_UK, W_UV
                  + n * DV * d)                      # W_O
  attn = attn_weights + RQ + R                       # the two latent RMSNorm scales
  mlp = 3 * d * ff                                   # SwiGLU
  per_layer = attn + mlp + 2 * d                     # two block norms
  assert model.count_params(cfg) == v * d + layers * per_layer + d
  t = 16
  pairs = t * (t + 1) // 2
  forward = layers * (2 * (attn_weights + mlp) + 2 * n * (DN + DR + DV) * pairs / t) + 2 * d * v
  assert model.flops_per_token(cfg, t) == pytest.approx(3 * forward, rel=1e-12)
  assert model.cache_numbers_per_token(cfg) == R + DR
  std = configs.load('configs/base.py', ['model.num_heads=4', 'model.num_kv_heads=2',
                                         'model.d_model=64']).model
  assert model.cache_numbers_per_token(std) == 2 * 2 * 16


@pytest.mark.parametrize('override, names', [
    ('model.num_kv_heads=2', 'model.num_kv_heads'),
    ('model.head_dim=8', 'model.head_dim'),
    ('model.qk_norm=True', 'model.qk_norm'),
    ('model.use_bias=True', 'model.use_bias'),
    ('model.attention_impl=cudnn', "attention_impl='cudnn'"),
    ('model.mla_qk_rope_head_dim=7', 'model.mla_qk_rope_head_dim'),
    ('model.mla_kv_lora_rank=0', 'model.mla_kv_lora_rank'),
    ('model.attention_type=latent', 'model.attention_type'),
])
def test_config_refusals_name_the_field(override, names):
  with pytest.raises(configs.ConfigError, match=names.replace('.', r'\.')):
    configs.load('configs/base.py', SMALL + [override])


def test_export_refuses_mla():
  """MLA exports only as DeepSeek-V3, which needs its MoE: a dense MLA model is
  refused, naming attention_type (tests/test_hf_parity.py has the DeepSeek-V3 export)."""
  from model import hf  # pylint: disable=import-outside-toplevel
  cfg = _cfg()
  with pytest.raises(hf.HFError, match='attention_type'):
    hf.model_config_to_hf(cfg)
