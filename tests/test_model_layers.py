"""The decoder's building blocks against formulas and invariants.

Norms against their NumPy definitions; RoPE's relative-position property and
its scalings against what each paper says they do; the sinusoidal table
against Vaswani et al.'s formula; ALiBi slopes against the paper's values;
GQA/MQA against MHA with repeated K/V weights.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from model import attention
from model import masking
from model import norms
from model import positions


def _cfg(**overrides):
  m = base.model_config()
  m.d_model, m.num_heads, m.num_kv_heads, m.num_layers = 32, 4, 4, 1
  for key, value in overrides.items():
    m[key] = value
  return m


def test_rmsnorm_matches_formula():
  x = np.random.RandomState(0).normal(size=(2, 3, 8)).astype(np.float32)
  norm = norms.RMSNorm(8, eps=1e-6)
  norm.scale[...] = jnp.arange(1, 9, dtype=jnp.float32) / 4
  x64 = x.astype(np.float64)
  want = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-6) * (np.arange(1, 9) / 4)
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def test_layernorm_matches_formula():
  x = np.random.RandomState(1).normal(2.0, 3.0, size=(2, 3, 8)).astype(np.float32)
  norm = norms.LayerNorm(8, eps=1e-5)
  norm.scale[...] = jnp.linspace(0.5, 2.0, 8)
  norm.bias[...] = jnp.linspace(-1.0, 1.0, 8)
  x64 = x.astype(np.float64)
  mean = x64.mean(-1, keepdims=True)
  var = ((x64 - mean)**2).mean(-1, keepdims=True)
  want = (x64 - mean) / np.sqrt(var + 1e-5) * np.linspace(0.5, 2.0, 8) + np.linspace(-1, 1, 8)
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


def test_norm_in_bfloat16_returns_bfloat16_computed_in_float32():
  x = jnp.asarray([[[1000.0, 1001.0, 1002.0, 1003.0]]], jnp.bfloat16)
  y = norms.LayerNorm(4, eps=1e-5)(x)
  assert y.dtype == jnp.bfloat16
  xf = np.asarray(x, np.float64)
  want = (xf - xf.mean()) / np.sqrt(xf.var() + 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=1e-2)


def _rope(x, pos, **kw):
  cos, sin = positions.rope_cos_sin(jnp.asarray(pos)[None], x.shape[-1], 10000.0, **kw)
  return positions.apply_rope(jnp.asarray(x)[None], cos, sin)[0]


def test_rope_scores_depend_only_on_offset():
  rng = np.random.RandomState(2)
  q = rng.normal(size=(1, 1, 16)).astype(np.float32)
  k = rng.normal(size=(1, 1, 16)).astype(np.float32)
  def score(m, n):
    return float(jnp.sum(_rope(q, [m]) * _rope(k, [n])))
  for offset in (0, 1, 5, 17):
    scores = [score(n + offset, n) for n in (0, 3, 40, 100)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
  # And the score does change with the offset (the test above can fail).
  assert abs(score(5, 0) - score(0, 0)) > 1e-3


def test_rope_is_a_rotation_of_feature_pairs_i_and_i_plus_half():
  # Complex form: pair (x_i, x_{i+h/2}) rotated by pos * theta^(-2i/h).
  rng = np.random.RandomState(3)
  x = rng.normal(size=(5, 2, 8))
  pos = np.array([0, 1, 2, 7, 30])
  z = x[..., :4] + 1j * x[..., 4:]
  angle = pos[:, None, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)
  z = z * np.exp(1j * angle)
  want = np.concatenate([z.real, z.imag], -1)
  np.testing.assert_allclose(_rope(x.astype(np.float32), pos), want, rtol=1e-5, atol=1e-5)


def test_rope_linear_scaling_equals_rope_at_positions_divided_by_factor():
  x = np.random.RandomState(4).normal(size=(6, 2, 16)).astype(np.float32)
  pos = np.array([0, 1, 3, 10, 50, 127])
  scaled = _rope(x, pos, scaling={'type': 'linear', 'factor': 4.0})
  np.testing.assert_allclose(scaled, _rope(x, pos / 4.0), rtol=1e-5, atol=1e-5)


def test_rope_ntk_is_plain_inside_the_original_context_and_grows_the_base_beyond():
  x = np.random.RandomState(5).normal(size=(8, 1, 16)).astype(np.float32)
  scaling = {'type': 'ntk', 'factor': 2.0, 'original_max_seq_len': 16}
  short = np.arange(8)
  np.testing.assert_allclose(_rope(x, short, scaling=scaling), _rope(x, short), atol=1e-6)
  long = np.arange(24, 32)    # longest position 31: L = 32 > 16
  base = 10000.0 * (2.0 * 32 / 16 - 1.0) ** (16 / 14)
  cos, sin = positions.rope_cos_sin(jnp.asarray(long)[None], 16, base)
  want = positions.apply_rope(jnp.asarray(x)[None], cos, sin)[0]
  np.testing.assert_allclose(_rope(x, long, scaling=scaling), want, rtol=1e-5, atol=1e-5)


def test_rope_yarn_keeps_fast_frequencies_interpolates_slow_ones_scales_by_mscale():
  h, factor, original = 64, 8.0, 4096
  plain, _ = positions.rope_inv_freq(h, 10000.0)
  yarn, mscale = positions.rope_inv_freq(
      h, 10000.0, {'type': 'yarn', 'factor': factor, 'original_max_seq_len': original})
  wavelength = 2 * np.pi / plain
  # YaRN: dims turning more than beta_fast=32 times in the original context are
  # untouched; fewer than beta_slow=1 times are divided by the factor.
  fast = original / wavelength > 32
  slow = original / wavelength < 1
  assert fast.any() and slow.any()
  np.testing.assert_allclose(yarn[fast], plain[fast], rtol=1e-12)
  np.testing.assert_allclose(yarn[slow], plain[slow] / factor, rtol=1e-12)
  between = ~fast & ~slow
  assert np.all((yarn[between] <= plain[between]) & (yarn[between] >= plain[between] / factor))
  assert mscale == pytest.approx(0.1 * math.log(factor) + 1.0)
  # cos/sin carry the attention factor.
  cos, sin = positions.rope_cos_sin(
      jnp.zeros((1, 1), jnp.int32), h, 10000.0,
      {'type': 'yarn', 'factor': factor, 'original_max_seq_len': original})
  np.testing.assert_allclose(cos, mscale, rtol=1e-6)
  np.testing.assert_allclose(sin, 0.0, atol=1e-7)


def test_rope_llama3_bands():
  h, factor, original = 128, 8.0, 8192
  plain, _ = positions.rope_inv_freq(h, 500000.0)
  scaled, attn_factor = positions.rope_inv_freq(
      h, 500000.0, {'type': 'llama3', 'factor': factor, 'original_max_seq_len': original,
                    'low_freq_factor': 1.0, 'high_freq_factor': 4.0})
  wavelength = 2 * np.pi / plain
  high = wavelength < original / 4.0       # short wavelengths: unchanged
  low = wavelength > original / 1.0        # long wavelengths: divided by factor
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_allclose(scaled[high], plain[high])
  np.testing.assert_allclose(scaled[low], plain[low] / factor)
  mid = ~high & ~low
  assert np.all((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / factor))
  assert attn_factor == 1.0


def test_sinusoidal_matches_vaswani_formula():
  pos = np.array([[0, 1, 2, 9, 100]])
  d = 6
  table = positions.sinusoidal(jnp.asarray(pos), d)
  want = np.zeros((1, 5, d))
  for p in range(5):
    for i in range(d // 2):
      want[0, p, 2 * i] = math.sin(pos[0, p] / 10000 ** (2 * i / d))
      want[0, p, 2 * i + 1] = math.cos(pos[0, p] / 10000 ** (2 * i / d))
  np.testing.assert_allclose(table, want, atol=1e-5)


def test_alibi_slopes_are_the_papers():
  # Press et al. 2021: for 8 heads 1/2, 1/4, ..., 1/256.
  np.testing.assert_allclose(masking.alibi_slopes(8), [2.0**-i for i in range(1, 9)])
  # 12 heads: the 8-head slopes, then every other slope of the 16-head
  # sequence 2^(-0.5 i): 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
  want = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
  np.testing.assert_allclose(masking.alibi_slopes(12), want, rtol=1e-6)


def test_segment_positions_restart_per_document():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [5, 5, 2, 2, 2, 2, 7, 0]])
  want = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    for t in range(1, seg.shape[1]):
      want[r, t] = want[r, t - 1] + 1 if seg[r, t] == seg[r, t - 1] else 0
  np.testing.assert_array_equal(positions.segment_positions(jnp.asarray(seg)), want)


def test_learned_positions_refuse_inputs_longer_than_the_table():
  table = positions.LearnedPositions(_cfg(max_seq_len=8), rngs=nnx.Rngs(0))
  assert table(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 32)
  with pytest.raises(ValueError, match='max_seq_len=8'):
    table(jnp.zeros((1, 9), jnp.int32))


@jax.jit
def _attention_forward(graphdef, state, x, pos, seg):
  layer = nnx.merge(graphdef, state)
  return layer(x, pos, seg)


def _run_attention(layer, x, pos, seg):
  graphdef, state = nnx.split(layer)
  return _attention_forward(graphdef, state, x, pos, seg)


@pytest.mark.parametrize('num_kv_heads', [2, 1])   # GQA, then MQA
def test_grouped_query_attention_equals_mha_with_repeated_kv_weights(num_kv_heads):
  flags = dict(qk_norm=True, use_bias=True, position='rope')
  grouped = attention.Attention(_cfg(num_kv_heads=num_kv_heads, **flags), rngs=nnx.Rngs(0))
  mha = attention.Attention(_cfg(num_kv_heads=4, **flags), rngs=nnx.Rngs(1))
  rng = np.random.RandomState(6)
  for name in ('wk', 'wv', 'bk', 'bv', 'bq', 'bo'):
    getattr(grouped, name)[...] = rng.normal(size=getattr(grouped, name).shape) * 0.3
  group = 4 // num_kv_heads
  for name in ('wq', 'wo', 'bq', 'bo'):
    getattr(mha, name)[...] = getattr(grouped, name)[...]
  # Query head j reads K/V head j // group.
  mha.wk[...] = jnp.repeat(grouped.wk[...], group, axis=1)
  mha.wv[...] = jnp.repeat(grouped.wv[...], group, axis=1)
  mha.bk[...] = jnp.repeat(grouped.bk[...], group, axis=0)
  mha.bv[...] = jnp.repeat(grouped.bv[...], group, axis=0)
  for name in ('q_norm', 'k_norm'):
    getattr(mha, name).scale[...] = getattr(grouped, name).scale[...]
  x = jnp.asarray(rng.normal(size=(2, 10, 32)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  seg = jnp.asarray([[1] * 6 + [2] * 4, [1] * 10])
  want = _run_attention(mha, x, pos, seg)
  got = _run_attention(grouped, x, pos, seg)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # K/V projections are stored at num_kv_heads, never repeated.
  assert grouped.wk.shape == (32, num_kv_heads, 8)


def test_rope_linear_scaling_in_the_attention_layer():
  """The layer with linear factor 2 at positions p equals plain RoPE at p / 2."""
  scaled = attention.Attention(
      _cfg(rope_scaling={'type': 'linear', 'factor': 2.0}), rngs=nnx.Rngs(0))
  plain = attention.Attention(_cfg(), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(7).normal(size=(1, 6, 32)), jnp.float32)
  pos = jnp.arange(6)[None] * 3
  q1, k1, _ = scaled.project(x, pos)
  q2, k2, _ = plain.project(x, pos.astype(jnp.float32) / 2)
  np.testing.assert_allclose(q1, q2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(k1, k2, rtol=1e-5, atol=1e-5)
