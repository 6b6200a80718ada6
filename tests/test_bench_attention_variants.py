"""bench/attention.py's variants: what they time is what the layer computes."""

import jax
import jax.numpy as jnp
import numpy as np

from bench import attention as bench_attention


def _np_attention(q, k, v, sinks=None):
  """Causal softmax attention in float64; sinks join each row's denominator."""
  b, s, h, d = q.shape
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d)
  logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  if sinks is not None:
    m = np.maximum(m, sinks[None, :, None, None])
  e = np.exp(logits - m)
  den = e.sum(-1, keepdims=True)
  if sinks is not None:
    den = den + np.exp(sinks[None, :, None, None] - m)
  return np.einsum('bhqk,bkhd->bqhd', e / den, v)


def test_sink_and_gate_variants_compute_the_formulas():
  b, s, h, d = 2, 8, 2, 4
  q, k, v = (np.asarray(jax.random.normal(key, (b, s, h, d)), np.float64)
             for key in jax.random.split(jax.random.key(0), 3))
  xla = bench_attention._impls(causal=True)['xla']
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  fn, (sinks,) = bench_attention._variant('xla', 'sinks', xla, b, s, h, d, jnp.float32)
  got = fn(f32(q), f32(k), f32(v), sinks)
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, np.asarray(sinks)),
                             atol=1e-5, rtol=0)

  fn, (x, own) = bench_attention._variant('xla', 'gate_headwise', xla, b, s, h, d, jnp.float32)
  wg = np.asarray(jax.tree.leaves(own)[0], np.float64)           # [h*d, h]
  gate = 1 / (1 + np.exp(-np.einsum('btd,dn->btn', np.asarray(x, np.float64), wg)))
  got = fn(f32(q), f32(k), f32(v), x, own)
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v) * gate[..., None],
                             atol=1e-5, rtol=0)


def test_every_variant_row_is_measured(capsys):
  bench_attention.main(['--seq', '16', '--head_dims', '8', '--width', '16', '--tokens', '16',
                        '--impls', 'xla', '--dtype', 'float32', '--iters', '1', '--variants',
                        ','.join(bench_attention.VARIANTS)])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| 16 |')]
  assert [row.split(' | ')[4] for row in rows] == list(bench_attention.VARIANTS)
  assert not any('failed' in row or 'unknown' in row for row in rows), rows
