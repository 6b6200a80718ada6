"""Flash attention for Hopper GPUs: Pallas kernels on the Mosaic GPU lowering.

The same FlashAttention-2 algorithm (Dao 2023) and the same masks as
`gpu_triton` (causal and sliding window with block skipping, GQA/MQA, packed
segments, ALiBi, logit soft-capping, memory tokens; sinks are added by
`flash.py` after the kernel; q/k and v head dims may differ), written for the
Mosaic GPU backend that JAX recommends for NVIDIA GPUs since the Triton
lowering was deprecated (jax 0.11). The mask, bias and soft-cap come from
`model.masking` through `flash.tile_logits`, the functions the XLA reference
uses.

What is Hopper-specific: the matmuls are warpgroup MMAs (`plgpu.wgmma`,
sm_90a) reading their operands from shared memory, and K/V (or Q/dO) tiles
arrive by TMA copies, double-buffered: the copy of the next tile is issued
before the current one is used, so loading overlaps the tensor-core work.
Each program is one warpgroup (128 threads).

Three kernels, as in `gpu_triton`:

- forward, grid (q blocks, batch, heads): a q tile in shared memory; a loop
  over the key blocks of `masking.kv_span` (memory blocks first), split into
  masked edges and a fully visible middle. Writes out and lse.
- dQ, grid (q blocks, batch, heads): the same loop, accumulating dQ.
- dK/dV, grid (kv blocks, batch, kv heads): K/V tiles stay in shared memory
  while Q, dO, lse and delta tiles of every head of the GQA group stream past
  over the q blocks of `masking.q_span`; the group's sum needs no atomics.

Layout limits: tiles are multiples of 64 rows (the warpgroup MMA's M), the
head dims are padded to multiples of 64 (one 128-byte swizzled row of
bf16), and inputs are bfloat16 or float16 (`model.kernels` sends float32 to
the Triton kernel). Segment ids, lse, delta and ALiBi slopes travel as 1-D
tiles of the q or kv block and are broadcast across the score tile in
registers.
"""

import functools
import inspect
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from model import masking
from model.kernels import flash

DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIM_MULTIPLE = 64
BLOCK_MULTIPLE = 64
_STAGES = 2      # TMA buffers per streamed operand

# jax 0.10 `plgpu.load(ref, idx, layout=)`; jax >= 0.11 `plgpu.load(ref, layout=)`.
_LOAD_TAKES_IDX = 'idx' in inspect.signature(plgpu.load).parameters


def default_blocks(head_dim):
  """(block_q, block_kv) for the forward and the backward kernels on Hopper.

  One warpgroup holds the [bq, h] float32 accumulator in registers (the
  forward) or two [bk, h] ones (dK, dV), hence 64-row tiles for the backward
  and for h = 256.
  """
  if head_dim <= 128:
    return (128, 64), (64, 64)
  return (64, 64), (64, 64)


def _load(ref, layout):
  if _LOAD_TAKES_IDX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _t(ref):
  """The transposed view of a 2-D shared-memory tile (an MMA operand)."""
  return ref.transpose((1, 0))


def _smem(shape, dtype):
  """A shared-memory tile for an MMA operand: 128-byte swizzled rows (64 bf16)."""
  row = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, row)),
                                              plgpu.SwizzleTransform(128)))


def _mma(spec, a, b, shape, acc=None):
  """acc + a @ b in float32 [shape]; b (and a unless it is in registers) in smem.

  On the device the product accumulates into `acc` in place (`ACC.init`);
  the GPU interpreter cannot discharge that form, so there a fresh product is
  added to acc, the same sum.
  """
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  if acc is None or spec.interpret:
    product = pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))
    return product if acc is None else acc + product
  return pl.run_state(lambda ref: plgpu.wgmma(ref, a, b))(plgpu.ACC.init(acc))


def _operand(spec, x, smem):
  """A register tile as the A operand of an MMA.

  On the device wgmma reads A from registers (no shared-memory round trip, as
  FlashAttention-3 keeps P); the GPU interpreter reads MMA operands only from
  shared memory, so there x is staged through `smem`.
  """
  if not spec.interpret:
    return x
  smem[...] = x
  plgpu.commit_smem()
  return smem


def _staging(spec, shape, dtype):
  """The scratch `_operand` needs: a tile in interpret mode, else None."""
  return _smem(shape, dtype) if spec.interpret else None


def _rows(x, shape, dim):
  """A [n] vector broadcast over a 2-D tile, its entries along `dim`."""
  return lax.broadcast_in_dim(x, shape, (dim,))


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _params():
  return plgpu.CompilerParams(approx_math=False)


def _interpret_kwargs(spec):
  return {} if not spec.interpret else dict(interpret=spec.interpret)


# --------------------------------------------------------------- loop structure


def _kv_steps(spec, q_start, bq, bk, num_kv_blocks, segments):
  """The key blocks a q tile visits: (mem, lo_b, hi_b, loops).

  Blocks [0, mem) (memory keys) then [lo_b, hi_b) (the causal/window band);
  loops: [(first, end, masked)] over block indices, covering both, as in
  `gpu_triton._kv_loops`.
  """
  lo, hi = masking.kv_span(q_start, q_start + bq, causal=spec.causal,
                           window=spec.window, kv_len=spec.kv_len)
  mem = min(-(-spec.num_memory // bk), num_kv_blocks)
  lo_b = jnp.maximum(lax.div(jnp.asarray(lo, jnp.int32), bk), mem)
  hi_b = flash.cdiv(jnp.asarray(hi, jnp.int32), bk)
  loops = [(0, mem, True)] if mem else []
  if segments:
    return mem, lo_b, hi_b, loops + [(lo_b, hi_b, True)]
  full_lo, full_hi = masking.kv_full_span(q_start, q_start + bq, causal=spec.causal,
                                          window=spec.window, kv_len=spec.kv_len)
  a = jnp.clip(flash.cdiv(jnp.maximum(full_lo, 0), bk), lo_b, hi_b)
  b = jnp.clip(lax.div(jnp.maximum(jnp.asarray(full_hi, jnp.int32), 0), bk), a, hi_b)
  if spec.num_memory:   # memory queries see only memory keys: no full tile
    a = jnp.where(q_start < spec.num_memory, hi_b, a)
    b = jnp.where(q_start < spec.num_memory, hi_b, b)
  return mem, lo_b, hi_b, loops + [(lo_b, a, True), (a, b, False), (b, hi_b, True)]


def _q_loops(spec, kv_start, bk, bq, segments):
  """The q blocks a kv tile visits: (lo_b, hi_b, loops) (`gpu_triton._q_loops`)."""
  lo_b, hi_b = flash.q_block_span(spec, kv_start, bk, bq)
  if segments:
    return lo_b, hi_b, [(lo_b, hi_b, True)]
  full_lo, full_hi = masking.q_full_span(kv_start, kv_start + bk, causal=spec.causal,
                                         window=spec.window, q_len=spec.q_len)
  full_lo = jnp.maximum(jnp.asarray(full_lo, jnp.int32), spec.num_memory)
  a = jnp.clip(flash.cdiv(full_lo, bq), lo_b, hi_b)
  b = jnp.clip(lax.div(jnp.maximum(jnp.asarray(full_hi, jnp.int32), 0), bq), a, hi_b)
  no_full = kv_start + bk > spec.kv_len
  if spec.num_memory:
    no_full = no_full | (kv_start < spec.num_memory)
  a, b = jnp.where(no_full, hi_b, a), jnp.where(no_full, hi_b, b)
  return lo_b, hi_b, [(lo_b, a, True), (a, b, False), (b, hi_b, True)]


class _Stream:
  """Double-buffered TMA copies of per-block slices into shared memory.

  `sources(block)` gives the GMEM slices of one step; `buffers` the smem
  buffers, each [_STAGES, ...]; `barriers` one TMA barrier per stage. A step
  waits on its stage's barrier; the copy of the next step is started first.
  """

  def __init__(self, sources, buffers, barriers):
    self.sources, self.buffers, self.barriers = sources, buffers, barriers

  def start(self, step, block):
    slot = lax.rem(step, _STAGES)
    for src, buf in zip(self.sources(block), self.buffers):
      plgpu.copy_gmem_to_smem(src, buf.at[slot], self.barriers.at[slot])

  def wait(self, step):
    slot = lax.rem(step, _STAGES)
    plgpu.barrier_wait(self.barriers.at[slot])
    return [buf.at[slot] for buf in self.buffers]


def _tile(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope, masked):
  """flash.tile_logits on a full-shape tile (every operand already [rows, cols])."""
  return flash.tile_logits(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope, masked=masked)


# -------------------------------------------------------------------------- forward


def forward(spec, q, k, v, q_seg, kv_seg, slopes):
  b, tp, n, h = q.shape
  sp, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kvh
  bq, bk = spec.block_q, spec.block_kv
  dtype = q.dtype
  segments = q_seg is not None
  alibi = slopes is not None
  # ALiBi: the head's slope as a [n, bq] row (one TMA row, broadcast in registers).
  slope_rows = None if not alibi else jnp.broadcast_to(slopes[:, None], (n, bq))

  def kernel(r):
    q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slope_ref = (
        r.get(x) for x in ('q', 'k', 'v', 'q_seg', 'kv_seg', 'slopes'))
    o_ref, lse_ref = r['out'], r['lse']
    q_smem, k_smem, v_smem, kvseg_smem, qseg_smem, slope_smem, o_smem, lse_smem = (
        r.get(x) for x in ('q_s', 'k_s', 'v_s', 'kvseg_s', 'qseg_s', 'slope_s', 'o_s',
                           'lse_s'))
    q_bar, kv_bar, p_smem = r['q_bar'], r['kv_bar'], r.get('p_s')
    qi, bi, hi = lax.axis_index('q'), lax.axis_index('b'), lax.axis_index('h')
    kv_head = lax.div(hi, jnp.asarray(g, hi.dtype))
    q_start = qi * bq
    rows = pl.ds(q_start, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem, q_bar.at[0])
    if segments:
      plgpu.copy_gmem_to_smem(qseg_ref.at[bi, rows], qseg_smem, q_bar.at[0])
    if alibi:
      plgpu.copy_gmem_to_smem(slope_ref.at[hi], slope_smem, q_bar.at[0])

    def sources(j):
      cols = pl.ds(j * bk, bk)
      srcs = [k_ref.at[bi, cols, kv_head], v_ref.at[bi, cols, kv_head]]
      return srcs + ([kvseg_ref.at[bi, cols]] if segments else [])
    stream = _Stream(sources, [k_smem, v_smem] + ([kvseg_smem] if segments else []),
                     kv_bar)

    mem, lo_b, hi_b, loops = _kv_steps(spec, q_start, bq, bk, sp // bk, segments)
    if mem:
      stream.start(0, 0)
    else:
      pl.when(lo_b < hi_b)(lambda: stream.start(0, lo_b))
    plgpu.barrier_wait(q_bar.at[0])

    shape = (bq, bk)
    layout = plgpu.Layout.WGMMA
    q_idx = q_start + _iota(shape, 0)
    q_seg = None if not segments else _rows(_load(qseg_smem, layout.reduce(1)), shape, 0)
    slope = None if not alibi else _rows(_load(slope_smem, layout.reduce(1)), shape, 0)

    def body(j, carry, masked):
      step, m, l, acc = carry
      nxt = jnp.where(j + 1 == mem, lo_b, j + 1)
      pl.when((j + 1 < mem) | (nxt < hi_b))(lambda: stream.start(step + 1, nxt))
      bufs = stream.wait(step)
      kv_idx = j * bk + _iota(shape, 1)
      kv_seg = None if not segments else _rows(_load(bufs[2], layout.reduce(0)), shape, 1)
      s = _mma(spec, q_smem, _t(bufs[0]), shape)
      _, logits, mask = _tile(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope, masked)
      # Online softmax (flash.softmax_step with [bq] row statistics).
      if mask is None:
        m_new = jnp.maximum(m, logits.max(axis=1))
        m_safe = m_new
        p = jnp.exp(logits - _rows(m_safe, shape, 0))
      else:
        m_new = jnp.maximum(m, jnp.where(mask, logits, -jnp.inf).max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.where(mask, jnp.exp(logits - _rows(m_safe, shape, 0)), 0.0)
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + p.sum(axis=1)
      acc = acc * _rows(alpha, (bq, hv), 0)
      acc = _mma(spec, _operand(spec, p.astype(dtype), p_smem), bufs[1], (bq, hv), acc)
      return step + 1, m_new, l, acc

    carry = (jnp.int32(0),
             plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), layout.reduce(1)),
             plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), layout.reduce(1)),
             plgpu.layout_cast(jnp.full((bq, hv), 0.0, jnp.float32), layout))
    for lo_, hi_, masked in loops:
      carry = lax.fori_loop(lo_, hi_, functools.partial(body, masked=masked), carry)
    _, m, l, acc = carry
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_smem[...] = (acc / _rows(l_safe, (bq, hv), 0)).astype(dtype)
    lse_smem[...] = jnp.where(seen, m, 0.0) + jnp.log(l_safe)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, rows, hi])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, rows])
    plgpu.wait_smem_to_gmem(0)

  scratch = dict(
      q_s=_smem((bq, h), dtype),
      k_s=_smem((_STAGES, bk, h), dtype),
      v_s=_smem((_STAGES, bk, hv), dtype),
      kvseg_s=plgpu.SMEM((_STAGES, bk), jnp.int32) if segments else None,
      qseg_s=plgpu.SMEM((bq,), jnp.int32) if segments else None,
      slope_s=plgpu.SMEM((bq,), jnp.float32) if alibi else None,
      o_s=_smem((bq, hv), dtype),
      lse_s=plgpu.SMEM((bq,), jnp.float32),
      p_s=_staging(spec, (bq, bk), dtype),
      # One arrival per TMA copy that signals the barrier.
      q_bar=plgpu.Barrier(num_arrivals=1 + segments + alibi, num_barriers=1),
      kv_bar=plgpu.Barrier(num_arrivals=2 + segments, num_barriers=_STAGES),
  )
  return _call(kernel, spec, 'ablax_mgpu_forward', (tp // bq, b, n), ('q', 'b', 'h'),
               dict(out=jax.ShapeDtypeStruct((b, tp, n, hv), dtype),
                    lse=jax.ShapeDtypeStruct((b, n, tp), jnp.float32)),
               scratch, dict(q=q, k=k, v=v, q_seg=q_seg, kv_seg=kv_seg, slopes=slope_rows))


def _call(kernel, spec, name, grid, grid_names, outs, scratch, ins):
  """plgpu.kernel over `grid`; the body gets one dict of refs by name (inputs,
  outputs, scratch; those given as None are absent)."""
  in_names = [key for key, val in ins.items() if val is not None]
  out_names = list(outs)
  scratch_names = [key for key, val in scratch.items() if val is not None]

  def body(*refs):
    return kernel(dict(zip(in_names + out_names + scratch_names, refs)))

  call = plgpu.kernel(
      body, out_type=[outs[key] for key in out_names],
      scratch_types=[scratch[key] for key in scratch_names],
      grid=grid, grid_names=grid_names, compiler_params=_params(),
      kernel_name=name, **_interpret_kwargs(spec))
  results = call(*(ins[key] for key in in_names))
  return tuple(results)
