"""The Pallas flash-attention kernels against the XLA reference attention.

Both kernels run on CPU: the GPU (Triton) kernel under Pallas' generic
interpreter, the TPU (Mosaic) kernel under TPU interpret mode
(`pltpu.InterpretParams`, which also simulates VMEM scratch and fills fresh
buffers with NaN, so an uninitialised read shows).

The flag grid of issue 4 (causal x window x MHA/GQA/MQA x segments x ALiBi x
soft-cap x memory tokens x length 128/200 x head dim 64/128) is covered
pairwise: every pair of levels of every two flags appears in at least one case
(`test_grid_covers_every_pair` checks the tables). The full cross product
(768 cases) would take an hour in interpret mode.

Tolerances, float32: outputs within 1e-5 and gradients (dq, dk, dv) within
1e-4, relative: |x - ref| <= tol * (|ref| + max|ref|), elementwise, i.e. an
elementwise rtol plus an atol of tol times the tensor's scale, so entries near
zero are judged against the scale of their tensor.
"""

import itertools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention_core
from model import kernels
from model import masking
from model.kernels import flash

OUT_TOL, GRAD_TOL = 1e-5, 1e-4

# -------------------------------------------------------------------- the grid

FACTORS = dict(causal=(True, False), window=(None, 24), heads=('mha', 'gqa', 'mqa'),
               segments=(False, True), alibi=(False, True), softcap=(None, 20.0),
               memory=(0, 4), length=(128, 200), head_dim=(64, 128))
HEADS = dict(mha=(2, 2), gqa=(4, 2), mqa=(3, 1))   # (num_heads, num_kv_heads)


def _case(causal, window, heads, segments, alibi, softcap, memory, length, head_dim):
  return dict(causal=causal, window=window, heads=heads, segments=segments, alibi=alibi,
              softcap=softcap, memory=memory, length=length, head_dim=head_dim)


# Two pairwise (all-pairs) designs, found by a greedy search; each alone covers
# every pair of levels, the second gives other triples.
PAIRWISE_A = [
    _case(False, 24, 'gqa', False, False, None, 4, 200, 128),
    _case(True, None, 'gqa', True, True, 20.0, 0, 128, 64),
    _case(False, None, 'mqa', False, False, None, 0, 128, 64),
    _case(True, 24, 'mqa', True, True, 20.0, 4, 200, 128),
    _case(True, None, 'mha', False, False, 20.0, 0, 200, 128),
    _case(False, 24, 'mha', True, True, None, 4, 128, 128),
    _case(True, None, 'mha', False, True, None, 4, 200, 64),
    _case(False, 24, 'mha', True, False, 20.0, 0, 128, 64),
]
PAIRWISE_B = [
    _case(False, None, 'mqa', True, True, 20.0, 4, 200, 64),
    _case(True, 24, 'mqa', False, False, None, 0, 128, 128),
    _case(True, None, 'gqa', False, True, 20.0, 0, 200, 128),
    _case(False, 24, 'mha', True, False, None, 4, 200, 128),
    _case(False, 24, 'gqa', True, True, None, 0, 128, 64),
    _case(True, None, 'mha', False, True, 20.0, 4, 128, 64),
    _case(False, 24, 'gqa', False, False, 20.0, 4, 128, 64),
    _case(True, None, 'mha', True, False, None, 0, 128, 64),
]

# GPU tiles (fwd q, fwd kv, bwd q, bwd kv), cycled over the cases: several
# blocks per sequence, blocks narrower than the window, fwd != bwd tiles
# (padding to a common multiple).
GPU_BLOCKS = [(64, 32, 32, 64), (32, 64, 64, 32), (128, 64, 64, 128), (32, 32, 32, 32)]


def _covered_pairs(cases):
  return {((a, c[a]), (b, c[b])) for c in cases for a, b in itertools.combinations(FACTORS, 2)}


def _all_pairs():
  return {((a, va), (b, vb)) for a, b in itertools.combinations(FACTORS, 2)
          for va in FACTORS[a] for vb in FACTORS[b]}


def test_grid_covers_every_pair():
  for cases in (PAIRWISE_A, PAIRWISE_B):
    assert all(set(c) == set(FACTORS) for c in cases)
    assert all(c[f] in FACTORS[f] for c in cases for f in FACTORS)
    assert _covered_pairs(cases) == _all_pairs()


# ------------------------------------------------------------------- helpers


def _segments(rng, batch, length):
  """Packed documents 1, 2, ... at random cuts; row 0 ends in padding (id 0)."""
  seg = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(8, length - 8), size=rng.integers(1, 4),
                              replace=False))
    seg[row] = 1 + np.searchsorted(cuts, np.arange(length), side='right')
  seg[0, length - length // 8:] = 0
  return jnp.asarray(seg)


def _inputs(case, seed, dtype=jnp.float32, v_head_dim=None):
  n, kvh = HEADS[case['heads']]
  t, h = case['length'], case['head_dim']
  hv = v_head_dim or h
  b = 2 if case['segments'] else 1
  rng = np.random.default_rng(seed)
  q, k, v, do = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in
                 ((b, t, n, h), (b, t, kvh, h), (b, t, kvh, hv), (b, t, n, hv)))
  kwargs = dict(
      segment_ids=_segments(rng, b, t) if case['segments'] else None,
      causal=case['causal'], sliding_window=case['window'],
      alibi_slopes=masking.alibi_slopes(n) if case['alibi'] else None,
      logit_softcap=case['softcap'], num_memory_tokens=case['memory'])
  return (q, k, v, do), kwargs


def _out_and_grads(fn, q, k, v, do):
  """(out, dq, dk, dv) of fn at q, k, v for the output cotangent do."""
  @jax.jit
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))
  return run(q, k, v, do)


def assert_close(actual, expected, tol, name=''):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert np.isfinite(actual).all(), f'{name}: non-finite values'
  np.testing.assert_allclose(actual, expected, rtol=tol,
                             atol=tol * float(np.abs(expected).max()), err_msg=name)


def check_against_reference(attn, case, seed, out_tol=OUT_TOL, grad_tol=GRAD_TOL,
                            dtype=jnp.float32, v_head_dim=None):
  (q, k, v, do), kwargs = _inputs(case, seed, dtype, v_head_dim)
  got = _out_and_grads(lambda q, k, v: attn(q, k, v, **kwargs), q, k, v, do)
  want = _out_and_grads(
      lambda q, k, v: attention_core.reference_attention(q, k, v, **kwargs), q, k, v, do)
  for name, a, e, tol in zip(('out', 'dq', 'dk', 'dv'), got, want,
                             (out_tol, grad_tol, grad_tol, grad_tol)):
    assert a.dtype == e.dtype == dtype, name
    assert a.shape == e.shape, name
    assert_close(a, e, tol, f'{name} {case}')


def gpu_kernel(blocks):
  bq, bk, bq_bwd, bk_bwd = blocks
  return lambda q, k, v, **kw: flash.attention(
      q, k, v, block_q=bq, block_kv=bk, bwd_block_q=bq_bwd, bwd_block_kv=bk_bwd,
      backend='gpu_triton', interpret=True, **kw)


def tpu_kernel(bq=128, bk=128):
  return lambda q, k, v, **kw: flash.attention(
      q, k, v, block_q=bq, block_kv=bk, backend='tpu_mosaic',
      interpret=pltpu.InterpretParams(), **kw)


# ------------------------------------------------------------------ GPU kernel


@pytest.mark.parametrize('index', range(len(PAIRWISE_A + PAIRWISE_B)))
def test_gpu_kernel_matches_reference(index):
  case = (PAIRWISE_A + PAIRWISE_B)[index]
  check_against_reference(gpu_kernel(GPU_BLOCKS[index % len(GPU_BLOCKS)]), case, seed=index)


def test_gpu_kernel_head_dim_256_and_padded_head_dim():
  case = _case(True, 24, 'gqa', True, True, 20.0, 4, 200, 256)
  check_against_reference(gpu_kernel((32, 32, 32, 32)), case, seed=100)
  # A head dim the Triton tiles cannot take (48) is zero-padded to 64 inside.
  case = _case(True, None, 'gqa', False, True, None, 0, 72, 48)
  check_against_reference(
      lambda q, k, v, **kw: flash.attention(
          q, k, v, block_q=32, block_kv=16, backend='gpu_triton', interpret=True,
          head_dim_multiple=0, **kw), case, seed=101)


def test_gpu_kernel_bfloat16():
  # bf16 inputs: the kernel rounds P and dS to bf16 before their matmuls (as
  # every flash kernel does, to use the bf16 tensor cores) while the reference
  # keeps them in float32, and both round the result to bf16, whose unit
  # roundoff is 2^-9 ~ 2e-3. Allow a few ulps of the tensor's scale: 2e-2.
  case = _case(True, 24, 'gqa', True, True, 20.0, 4, 200, 64)
  check_against_reference(gpu_kernel((64, 32, 32, 64)), case, seed=102,
                          out_tol=2e-2, grad_tol=2e-2, dtype=jnp.bfloat16)


def _numpy_attention(q, k, v, scale):
  """Causal softmax(q k^T scale) v in float64, any v head dim; [b, t, n, h]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  t = q.shape[1]
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum('btnh,bsnh->bnts', q, k) * scale
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnts,bsnh->btnh', p, v)


@pytest.mark.parametrize('backend', ['xla', 'gpu_triton', 'tpu_mosaic'])
def test_value_head_dim_differs_from_query_key_head_dim(backend):
  """q/k head dim 48, v head dim 32 (MLA's split; 192 vs 128 in DeepSeek-V3).

  The XLA reference first against a float64 NumPy softmax (plain causal
  case), then each kernel against the reference, forward and gradients, with
  GQA, segments, ALiBi, soft-cap and memory tokens. The GPU kernel pads the
  two head dims to different powers of two (64 and 32).
  """
  case = _case(True, None, 'gqa', True, True, 20.0, 4, 72, 48)
  if backend == 'xla':
    (q, k, v, _), _ = _inputs(case, seed=400, v_head_dim=32)
    out = attention_core.reference_attention(q, k, v, causal=True)
    assert out.shape == (*q.shape[:3], 32)
    assert_close(out, _numpy_attention(q, k, v, 48 ** -0.5), OUT_TOL, 'reference')
    return
  if backend == 'gpu_triton':
    attn = lambda q, k, v, **kw: flash.attention(
        q, k, v, block_q=32, block_kv=16, bwd_block_q=16, bwd_block_kv=32,
        backend='gpu_triton', interpret=True, head_dim_multiple=0, **kw)
  else:
    attn = tpu_kernel()
  check_against_reference(attn, case, seed=401, v_head_dim=32)


# ------------------------------------------------------------------ TPU kernel


@pytest.mark.parametrize('index', range(len(PAIRWISE_A)))
def test_tpu_kernel_matches_reference(index):
  blocks = (256, 128) if index == 0 else (128, 128)
  check_against_reference(tpu_kernel(*blocks), PAIRWISE_A[index], seed=200 + index)


def test_tpu_kernel_bfloat16():
  # Tolerance as in test_gpu_kernel_bfloat16.
  case = _case(True, 24, 'mqa', True, True, 20.0, 4, 200, 128)
  check_against_reference(tpu_kernel(), case, seed=210, out_tol=2e-2, grad_tol=2e-2,
                          dtype=jnp.bfloat16)


# ------------------------------------------------- skipping and empty rows


@pytest.mark.parametrize('backend, length, window, blocks', [
    ('gpu_triton', 200, 70, (32, 16, 16, 32)),
    ('tpu_mosaic', 400, 260, (128, 128)),
])
@pytest.mark.parametrize('causal', [True, False])
def test_interior_tiles_run_unmasked(backend, length, window, blocks, causal):
  """A window wider than the tiles leaves whole tiles inside the band, where the
  kernels skip the mask (`masking.tile_full`): with memory tokens, padding of
  the last block, ALiBi, soft-cap and GQA, they must still agree with the
  reference. (The pairwise grid's windows are narrower than its tiles.)"""
  case = _case(causal, window, 'gqa', False, True, 20.0, 4, length, 64)
  attn = gpu_kernel(blocks) if backend == 'gpu_triton' else tpu_kernel(*blocks)
  check_against_reference(attn, case, seed=300 + causal)


def _kernel(backend):
  return gpu_kernel((64, 64, 64, 64)) if backend == 'gpu_triton' else tpu_kernel(128, 128)


@pytest.mark.parametrize('backend', ['gpu_triton', 'tpu_mosaic'])
def test_tiles_outside_the_window_are_skipped(backend):
  """Tiles outside the causal window band are skipped, not merely masked.

  Keys and values 128..255 are NaN. Queries 384..511 cannot see them (window
  40), and no tile of theirs holds them, so their outputs, their dq, and the
  dk/dv of keys 384..511 (which only those queries see) stay finite and exact
  only if those tiles are never fed to a matmul (where 0 * NaN = NaN). The
  memory block (keys 0..3, visible to all) must still be visited: the
  comparison with the reference would fail without it.
  """
  t, w, mem = 512, 40, 4
  rng = np.random.default_rng(7)
  q, k, v, do = (jnp.asarray(rng.standard_normal((1, t, 2, 64)), jnp.float32)
                 for _ in range(4))
  poison = (jnp.arange(t) >= 128) & (jnp.arange(t) < 256)
  poison = poison[None, :, None, None]
  kwargs = dict(causal=True, sliding_window=w, num_memory_tokens=mem)
  got = _out_and_grads(
      lambda q, k, v: _kernel(backend)(q, k, v, **kwargs),
      q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), do)
  want = _out_and_grads(
      lambda q, k, v: attention_core.reference_attention(q, k, v, **kwargs),
      q, jnp.where(poison, 0.0, k), jnp.where(poison, 0.0, v), do)
  rows = slice(384, t)
  for name, a, e, tol in zip(('out', 'dq', 'dk', 'dv'), got, want,
                             (OUT_TOL, GRAD_TOL, GRAD_TOL, GRAD_TOL)):
    assert_close(a[:, rows], e[:, rows], tol, f'{name}[384:]')


@pytest.mark.parametrize('backend', ['gpu_triton', 'tpu_mosaic'])
def test_rows_that_see_nothing_are_zero_without_nan(backend):
  """Queries with no visible key output 0 and pass back zero gradients, no NaN.

  160 queries against 64 keys, non-causal window 16: queries 79.. see nothing.
  Padding rows of packed batches (segment 0) are covered by the grid cases.
  """
  rng = np.random.default_rng(8)
  q, do = (jnp.asarray(rng.standard_normal((1, 160, 2, 64)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((1, 64, 1, 64)), jnp.float32) for _ in range(2))
  kwargs = dict(causal=False, sliding_window=16)
  got = _out_and_grads(lambda q, k, v: _kernel(backend)(q, k, v, **kwargs), q, k, v, do)
  want = _out_and_grads(
      lambda q, k, v: attention_core.reference_attention(q, k, v, **kwargs), q, k, v, do)
  assert float(jnp.abs(want[0][:, 79:]).max()) == 0.0   # the reference's own rule
  assert float(jnp.abs(got[0][:, 79:]).max()) == 0.0
  assert float(jnp.abs(got[1][:, 79:]).max()) == 0.0
  for name, a, e, tol in zip(('out', 'dq', 'dk', 'dv'), got, want,
                             (OUT_TOL, GRAD_TOL, GRAD_TOL, GRAD_TOL)):
    assert_close(a, e, tol, name)
