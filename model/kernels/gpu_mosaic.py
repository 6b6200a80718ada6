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

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from model import masking
from model.kernels import flash
from model.kernels import gpu_triton   # its loop bounds; no Triton import

_STAGES = 2      # TMA buffers per streamed operand

# jax 0.10 `plgpu.load(ref, idx, layout=)`; jax >= 0.11 `plgpu.load(ref, layout=)`.
_LOAD_TAKES_IDX = 'idx' in inspect.signature(plgpu.load).parameters


def default_blocks(head_dim):
  """(block_q, block_kv) for the forward and the backward kernels on Hopper.

  One warpgroup keeps its float32 accumulators in registers (255 per thread,
  a [64, 128] tile is 64 of them): the forward holds out [bq, hv] and the
  score tile [bq, bk], the dK/dV kernel dK and dV [bk, h] plus two [bk, bq]
  tiles. Hence bq = 128 only for head dims <= 64. Untuned: bench/gpu_check.py
  measures them.
  """
  if head_dim <= 64:
    return (128, 64), (64, 64)
  if head_dim <= 128:
    return (64, 128), (64, 64)
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
  # Exact exp/log/tanh: the kernel must match the reference to bf16 rounding;
  # approx_math=True (FlashAttention-3's fast exp2) is a tuning option to
  # measure, not a default.
  return plgpu.CompilerParams(approx_math=False)


def _interpret_kwargs(spec):
  return {} if not spec.interpret else dict(interpret=spec.interpret)


# --------------------------------------------------------------- loop structure


def _kv_steps(spec, q_start, bq, bk, num_kv_blocks, segments):
  """The key blocks a q tile visits: (mem, lo_b, hi_b, loops).

  `gpu_triton._kv_loops` (memory blocks [0, mem), then the causal/window band
  [lo_b, hi_b) split into masked edges and a fully visible middle), with the
  bounds the TMA prefetch needs to find each step's successor.
  """
  loops = gpu_triton._kv_loops(spec, q_start, bq, bk, num_kv_blocks, segments)  # pylint: disable=protected-access
  mem = loops[0][1] if spec.num_memory else 0
  band = loops[1:] if spec.num_memory else loops
  return mem, band[0][0], band[-1][1], loops


def _q_loops(spec, kv_start, bk, bq, segments):
  """The q blocks a kv tile visits: (lo_b, hi_b, loops) (`gpu_triton._q_loops`)."""
  loops = gpu_triton._q_loops(spec, kv_start, bk, bq, segments)  # pylint: disable=protected-access
  return loops[0][0], loops[-1][1], loops


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


# ------------------------------------------------------------------------- backward


def _dq(spec, q, k, v, q_seg, kv_seg, slope_rows, dout, lse, delta):
  b, tp, n, h = q.shape
  sp, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kvh
  bq, bk = spec.bwd_block_q, spec.bwd_block_kv
  dtype = q.dtype
  segments, alibi = q_seg is not None, slope_rows is not None

  def kernel(r):
    qi, bi, hi = lax.axis_index('q'), lax.axis_index('b'), lax.axis_index('h')
    kv_head = lax.div(hi, jnp.asarray(g, hi.dtype))
    q_start = qi * bq
    rows = pl.ds(q_start, bq)
    bar = r['q_bar'].at[0]
    plgpu.copy_gmem_to_smem(r['q'].at[bi, rows, hi], r['q_s'], bar)
    plgpu.copy_gmem_to_smem(r['do'].at[bi, rows, hi], r['do_s'], bar)
    plgpu.copy_gmem_to_smem(r['lse'].at[bi, hi, rows], r['lse_s'], bar)
    plgpu.copy_gmem_to_smem(r['delta'].at[bi, hi, rows], r['delta_s'], bar)
    if segments:
      plgpu.copy_gmem_to_smem(r['q_seg'].at[bi, rows], r['qseg_s'], bar)
    if alibi:
      plgpu.copy_gmem_to_smem(r['slopes'].at[hi], r['slope_s'], bar)

    def sources(j):
      cols = pl.ds(j * bk, bk)
      srcs = [r['k'].at[bi, cols, kv_head], r['v'].at[bi, cols, kv_head]]
      return srcs + ([r['kv_seg'].at[bi, cols]] if segments else [])
    stream = _Stream(sources, [r['k_s'], r['v_s']] + ([r['kvseg_s']] if segments else []),
                     r['kv_bar'])
    mem, lo_b, hi_b, loops = _kv_steps(spec, q_start, bq, bk, sp // bk, segments)
    if mem:
      stream.start(0, 0)
    else:
      pl.when(lo_b < hi_b)(lambda: stream.start(0, lo_b))
    plgpu.barrier_wait(bar)

    shape, layout = (bq, bk), plgpu.Layout.WGMMA
    row = lambda name: _rows(_load(r[name], layout.reduce(1)), shape, 0)
    q_idx = q_start + _iota(shape, 0)
    q_seg = row('qseg_s') if segments else None
    slope = row('slope_s') if alibi else None
    lse_t, delta_t = row('lse_s'), row('delta_s')

    def body(j, carry, masked):
      step, dq = carry
      nxt = jnp.where(j + 1 == mem, lo_b, j + 1)
      pl.when((j + 1 < mem) | (nxt < hi_b))(lambda: stream.start(step + 1, nxt))
      bufs = stream.wait(step)
      kv_idx = j * bk + _iota(shape, 1)
      kv_seg = None if not segments else _rows(_load(bufs[2], layout.reduce(0)), shape, 1)
      s = _mma(spec, r['q_s'], _t(bufs[0]), shape)
      capped, logits, mask = _tile(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope, masked)
      dp = _mma(spec, r['do_s'], _t(bufs[1]), shape)
      _, ds = flash.tile_grads(spec, capped, logits, mask, lse_t, delta_t, dp)
      dq = _mma(spec, _operand(spec, ds.astype(dtype), r.get('p_s')), bufs[0], (bq, h), dq)
      return step + 1, dq

    carry = (jnp.int32(0), plgpu.layout_cast(jnp.full((bq, h), 0.0, jnp.float32), layout))
    for lo_, hi_, masked in loops:
      carry = lax.fori_loop(lo_, hi_, functools.partial(body, masked=masked), carry)
    r['q_s'][...] = (carry[1] * spec.scale).astype(dtype)    # q's tile is free now
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(r['q_s'], r['dq'].at[bi, rows, hi])
    plgpu.wait_smem_to_gmem(0)

  scratch = dict(
      q_s=_smem((bq, h), dtype), do_s=_smem((bq, hv), dtype),
      lse_s=plgpu.SMEM((bq,), jnp.float32), delta_s=plgpu.SMEM((bq,), jnp.float32),
      qseg_s=plgpu.SMEM((bq,), jnp.int32) if segments else None,
      slope_s=plgpu.SMEM((bq,), jnp.float32) if alibi else None,
      k_s=_smem((_STAGES, bk, h), dtype), v_s=_smem((_STAGES, bk, hv), dtype),
      kvseg_s=plgpu.SMEM((_STAGES, bk), jnp.int32) if segments else None,
      p_s=_staging(spec, (bq, bk), dtype),
      q_bar=plgpu.Barrier(num_arrivals=4 + segments + alibi, num_barriers=1),
      kv_bar=plgpu.Barrier(num_arrivals=2 + segments, num_barriers=_STAGES),
  )
  return _call(kernel, spec, 'ablax_mgpu_dq', (tp // bq, b, n), ('q', 'b', 'h'),
               dict(dq=jax.ShapeDtypeStruct(q.shape, dtype)), scratch,
               dict(q=q, k=k, v=v, q_seg=q_seg, kv_seg=kv_seg, slopes=slope_rows,
                    do=dout, lse=lse, delta=delta))[0]


def _dkv(spec, q, k, v, q_seg, kv_seg, slope_rows, dout, lse, delta):
  b, tp, n, h = q.shape
  sp, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kvh
  bq, bk = spec.bwd_block_q, spec.bwd_block_kv
  dtype = q.dtype
  segments, alibi = q_seg is not None, slope_rows is not None

  def kernel(r):
    ki, bi, kh = lax.axis_index('kv'), lax.axis_index('b'), lax.axis_index('h')
    kv_start = ki * bk
    cols = pl.ds(kv_start, bk)
    bar = r['kv_bar'].at[0]
    plgpu.copy_gmem_to_smem(r['k'].at[bi, cols, kh], r['k_s'], bar)
    plgpu.copy_gmem_to_smem(r['v'].at[bi, cols, kh], r['v_s'], bar)
    if segments:
      plgpu.copy_gmem_to_smem(r['kv_seg'].at[bi, cols], r['kvseg_s'], bar)

    def sources(step_block):
      head, i = step_block
      rows, hi = pl.ds(i * bq, bq), kh * g + head
      srcs = [r['q'].at[bi, rows, hi], r['do'].at[bi, rows, hi],
              r['lse'].at[bi, hi, rows], r['delta'].at[bi, hi, rows]]
      srcs += [r['q_seg'].at[bi, rows]] if segments else []
      return srcs + ([r['slopes'].at[hi]] if alibi else [])
    names = ['q_s', 'do_s', 'lse_s', 'delta_s'] + (['qseg_s'] if segments else [])
    stream = _Stream(sources, [r[x] for x in names + (['slope_s'] if alibi else [])],
                     r['q_bar'])
    lo_b, hi_b, loops = _q_loops(spec, kv_start, bk, bq, segments)
    pl.when(lo_b < hi_b)(lambda: stream.start(0, (0, lo_b)))
    plgpu.barrier_wait(bar)

    # The score tile transposed, [bk, bq]: its rows are keys, its columns queries.
    shape, layout = (bk, bq), plgpu.Layout.WGMMA
    col = lambda ref: _rows(_load(ref, layout.reduce(0)), shape, 1)
    kv_idx = kv_start + _iota(shape, 0)
    kv_seg = None if not segments else _rows(_load(r['kvseg_s'], layout.reduce(1)), shape, 0)

    def body(i, carry, head, masked):
      step, dk, dv = carry
      last = i + 1 == hi_b
      nxt = (jnp.where(last, head + 1, head), jnp.where(last, lo_b, i + 1))
      pl.when((i + 1 < hi_b) | (head + 1 < g))(lambda: stream.start(step + 1, nxt))
      bufs = dict(zip(names + (['slope_s'] if alibi else []), stream.wait(step)))
      q_idx = i * bq + _iota(shape, 1)
      q_seg = col(bufs['qseg_s']) if segments else None
      slope = col(bufs['slope_s']) if alibi else None
      s_t = _mma(spec, r['k_s'], _t(bufs['q_s']), shape)
      capped, logits, mask = _tile(spec, s_t, q_idx, kv_idx, q_seg, kv_seg, slope, masked)
      dp_t = _mma(spec, r['v_s'], _t(bufs['do_s']), shape)
      p_t, ds_t = flash.tile_grads(spec, capped, logits, mask, col(bufs['lse_s']),
                                   col(bufs['delta_s']), dp_t)
      dv = _mma(spec, _operand(spec, p_t.astype(dtype), r.get('p_s')), bufs['do_s'],
                (bk, hv), dv)
      dk = _mma(spec, _operand(spec, ds_t.astype(dtype), r.get('p_s')), bufs['q_s'],
                (bk, h), dk)
      return step + 1, dk, dv

    carry = (jnp.int32(0),
             plgpu.layout_cast(jnp.full((bk, h), 0.0, jnp.float32), layout),
             plgpu.layout_cast(jnp.full((bk, hv), 0.0, jnp.float32), layout))
    for head in range(g):     # the GQA group's heads share this K/V tile
      for lo_, hi_, masked in loops:
        carry = lax.fori_loop(lo_, hi_, functools.partial(body, head=head, masked=masked),
                              carry)
    _, dk, dv = carry
    r['k_s'][...] = (dk * spec.scale).astype(dtype)     # K/V tiles are free now
    r['v_s'][...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(r['k_s'], r['dk'].at[bi, cols, kh])
    plgpu.copy_smem_to_gmem(r['v_s'], r['dv'].at[bi, cols, kh])
    plgpu.wait_smem_to_gmem(0)

  scratch = dict(
      k_s=_smem((bk, h), dtype), v_s=_smem((bk, hv), dtype),
      kvseg_s=plgpu.SMEM((bk,), jnp.int32) if segments else None,
      q_s=_smem((_STAGES, bq, h), dtype), do_s=_smem((_STAGES, bq, hv), dtype),
      lse_s=plgpu.SMEM((_STAGES, bq), jnp.float32),
      delta_s=plgpu.SMEM((_STAGES, bq), jnp.float32),
      qseg_s=plgpu.SMEM((_STAGES, bq), jnp.int32) if segments else None,
      slope_s=plgpu.SMEM((_STAGES, bq), jnp.float32) if alibi else None,
      p_s=_staging(spec, (bk, bq), dtype),
      kv_bar=plgpu.Barrier(num_arrivals=2 + segments, num_barriers=1),
      q_bar=plgpu.Barrier(num_arrivals=4 + segments + alibi, num_barriers=_STAGES),
  )
  return _call(kernel, spec, 'ablax_mgpu_dkv', (sp // bk, b, kvh), ('kv', 'b', 'h'),
               dict(dk=jax.ShapeDtypeStruct(k.shape, dtype),
                    dv=jax.ShapeDtypeStruct(v.shape, dtype)), scratch,
               dict(q=q, k=k, v=v, q_seg=q_seg, kv_seg=kv_seg, slopes=slope_rows,
                    do=dout, lse=lse, delta=delta))


def backward(spec, q, k, v, q_seg, kv_seg, slopes, out, lse, dout):
  n = q.shape[2]
  with jax.named_scope('flash_backward_delta'):
    delta = jnp.einsum('btnh,btnh->bnt', out.astype(jnp.float32),
                       dout.astype(jnp.float32))
  slope_rows = None if slopes is None else jnp.broadcast_to(slopes[:, None],
                                                           (n, spec.bwd_block_q))
  with jax.named_scope('flash_backward_dq'):
    dq = _dq(spec, q, k, v, q_seg, kv_seg, slope_rows, dout, lse, delta)
  with jax.named_scope('flash_backward_dkv'):
    dk, dv = _dkv(spec, q, k, v, q_seg, kv_seg, slope_rows, dout, lse, delta)
  return dq, dk, dv
