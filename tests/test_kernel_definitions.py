"""Attention against an implementation written from the definitions alone.

`definition_attention` below uses no code of `model/` (not `masking.py`): per
query head and query position it lists the keys the papers allow, adds the
ALiBi bias, soft-caps, and takes a softmax. It is written with jax.numpy only
so that autodiff gives its gradients. Both the XLA reference attention and the
Pallas GPU kernel (interpret mode, tiny shapes) must equal it on the features
where a shared helper could hide a shared mistake: ALiBi under GQA (which
slope goes to which query head), a sliding window with segment ids and memory
tokens, and soft-capping. Tolerances, float32: outputs 1e-5, gradients 1e-4,
relative to each tensor's scale (as tests/test_kernel_flash.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention_core
from model import masking
from model.kernels import flash

# Press et al. 2021, section 3: for n heads (a power of two) the slopes are the
# geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^-8; for 6 heads, the 4-head
# slopes followed by every other 8-head slope (2^-1, 2^-3).
PUBLISHED_SLOPES = {
    4: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8],
    6: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3],
    8: [2.0**-i for i in range(1, 9)],
}


def test_alibi_slopes_are_the_papers():
  for n, want in PUBLISHED_SLOPES.items():
    np.testing.assert_allclose(masking.alibi_slopes(n), want, rtol=1e-7)


def definition_attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None,
                         alibi_slopes=None, logit_softcap=None, num_memory_tokens=0):
  """q [b, t, n, h], k/v [b, t, kv, h] -> [b, t, n, h], from the definitions.

  - GQA: query head i reads key/value head i // (n / kv) (consecutive query
    heads share one kv head).
  - The first `num_memory_tokens` positions are memory: every query sees
    them; a memory query sees only them.
  - Other pairs: key j is visible to query i if j <= i (causal), i - j < w
    (sliding window w; also j - i < w when not causal), and both are in the
    same segment.
  - Logits: q·k / sqrt(h), then cap·tanh(logit / cap), then ALiBi's
    -slope_i · |i - j| for non-memory keys, slope_i that of query head i.
  - A query that sees nothing outputs zeros.
  """
  b, t, n, h = q.shape
  group = n // k.shape[2]
  m = num_memory_tokens
  pos = np.arange(t)
  i, j = pos[:, None], pos[None, :]
  outs = []
  for row in range(b):
    seg = np.zeros(t, int) if segment_ids is None else np.asarray(segment_ids[row])
    ordinary = seg[:, None] == seg[None, :]
    if causal:
      ordinary &= j <= i
    if sliding_window is not None:
      ordinary &= (i - j < sliding_window)
      if not causal:
        ordinary &= (j - i < sliding_window)
    allowed = np.where(j < m, True, ordinary & (i >= m))          # [t, t]
    heads = []
    for head in range(n):
      kv = head // group
      logits = q[row, :, head] @ k[row, :, kv].T / np.sqrt(h)      # [t, t]
      if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
      if alibi_slopes is not None:
        bias = -float(alibi_slopes[head]) * np.abs(i - j)
        logits = logits + np.where(j < m, 0.0, bias)
      logits = jnp.where(allowed, logits, -jnp.inf)
      top = jnp.max(jnp.where(allowed, logits, 0.0), axis=1, keepdims=True)
      weights = jnp.where(allowed, jnp.exp(logits - top), 0.0)
      total = jnp.sum(weights, axis=1, keepdims=True)
      probs = weights / jnp.where(total > 0, total, 1.0)
      heads.append(probs @ v[row, :, kv])
    outs.append(jnp.stack(heads, axis=1))
  return jnp.stack(outs)


def _segments(rng, b, t, m):
  """Memory positions in segment 1 with the first document; 2-3 documents a
  row; the second row ends in padding (segment 0)."""
  seg = np.ones((b, t), np.int32)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(m + 4, t - 4), size=2, replace=False))
    seg[row] = 1 + np.searchsorted(cuts, np.arange(t), side='right')
  seg[-1, t - 6:] = 0
  return seg


CASES = {
    'alibi_gqa': dict(heads=(4, 2), kwargs=dict(alibi_slopes=PUBLISHED_SLOPES[4])),
    'alibi_gqa_6_heads_noncausal': dict(
        heads=(6, 2), kwargs=dict(alibi_slopes=PUBLISHED_SLOPES[6], causal=False)),
    'window_segments_memory': dict(
        heads=(4, 1), segments=True,
        kwargs=dict(sliding_window=8, num_memory_tokens=4)),
    'window_segments_memory_alibi_noncausal': dict(
        heads=(2, 2), segments=True,
        kwargs=dict(sliding_window=6, num_memory_tokens=3, causal=False,
                    alibi_slopes=[0.5, 0.125])),
    'softcap_gqa': dict(heads=(4, 2), q_scale=4.0, kwargs=dict(logit_softcap=5.0)),
}


def _inputs(case, seed, t=48, h=16):
  n, kvh = case['heads']
  b = 2 if case.get('segments') else 1
  rng = np.random.default_rng(seed)
  q, k, v, do = (rng.standard_normal(shape).astype(np.float32) for shape in
                 ((b, t, n, h), (b, t, kvh, h), (b, t, kvh, h), (b, t, n, h)))
  q *= case.get('q_scale', 1.0)
  kwargs = {'causal': True, **case['kwargs']}
  if 'alibi_slopes' in kwargs:
    kwargs['alibi_slopes'] = np.asarray(kwargs['alibi_slopes'], np.float32)
  if case.get('segments'):
    kwargs['segment_ids'] = _segments(rng, b, t, kwargs.get('num_memory_tokens', 0))
  return [jnp.asarray(x) for x in (q, k, v, do)], kwargs


def _out_and_grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def _assert_close(actual, expected, tol, name):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert np.isfinite(actual).all(), name
  np.testing.assert_allclose(actual, expected, rtol=tol,
                             atol=tol * float(np.abs(expected).max()), err_msg=name)


def _gpu_kernel(q, k, v, segment_ids=None, **kw):
  return flash.attention(q, k, v, segment_ids=None if segment_ids is None
                         else jnp.asarray(segment_ids), block_q=16, block_kv=16,
                         bwd_block_q=16, bwd_block_kv=16, backend='gpu_triton',
                         interpret=True, head_dim_multiple=0, **kw)


def _xla_reference(q, k, v, segment_ids=None, **kw):
  return attention_core.reference_attention(
      q, k, v, segment_ids=None if segment_ids is None else jnp.asarray(segment_ids), **kw)


@pytest.mark.parametrize('name', list(CASES))
def test_reference_and_kernel_equal_the_definitions(name):
  (q, k, v, do), kwargs = _inputs(CASES[name], seed=len(name))
  want = _out_and_grads(lambda q, k, v: definition_attention(q, k, v, **kwargs), q, k, v, do)
  if 'logit_softcap' in kwargs:            # the cap bites: logits reach twice it
    assert float(jnp.max(jnp.abs(q[0, :, 0] @ k[0, :, 0].T))) / 4 > 2 * 5.0
  for impl_name, impl in (('xla', _xla_reference), ('pallas', _gpu_kernel)):
    got = jax.jit(lambda q, k, v, do: _out_and_grads(
        lambda q, k, v: impl(q, k, v, **kwargs), q, k, v, do))(q, k, v, do)
    for part, a, e, tol in zip(('out', 'dq', 'dk', 'dv'), got, want,
                               (1e-5, 1e-4, 1e-4, 1e-4)):
      _assert_close(a, e, tol, f'{impl_name} {part} {name}')
