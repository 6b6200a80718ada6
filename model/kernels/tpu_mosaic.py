"""Flash attention for TPUs: Pallas kernels on the Mosaic lowering.

The same algorithm and the same tile math (`flash.tile_logits`, which calls
`model.masking`) as the GPU kernel, laid out for the TPU's pipeline: Pallas
moves one (q block, kv block) pair into VMEM per grid step, the kv dimension
is the last, sequential ("arbitrary") grid axis, and the running max, sum and
output live in VMEM scratch across it (FlashAttention-2, Dao 2023).

Block skipping: a grid step whose tile `masking.tile_visible` rules out does
no work (`pl.when`), and its index map points at a block the pipeline already
holds or fetches next (clamped with `masking.kv_span` / `masking.q_span`), so
the skipped step moves no data either. Memory-token blocks are always visited.

Layout: heads-major inside the kernels (q [b, n, t, h], k/v [b, kv, s, h]) so
every block is a dense [rows, head_dim] tile (v, out and dout with their own
head dim, which may differ from q/k's as in MLA); segment ids are broadcast to
lane/sublane tiles ([t, 128] for queries, [8, s] for keys), per-row
statistics are kept 128 lanes wide, the ALiBi slopes are read from SMEM. Block
sizes are multiples of 128.

Kernels:
- forward, grid (b, heads, q blocks, kv blocks): out and lse;
- dQ, grid (b, heads, q blocks, kv blocks);
- dK/dV, grid (b, kv heads, kv blocks, group x q blocks): the sequential axis
  walks the q blocks of every head of the GQA group, so the shared head's dK and
  dV accumulate in one scratch with no repeated K/V.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from model import masking
from model.kernels import flash

LANES = 128
SUBLANES = 8


def default_blocks(head_dim):
  """(block_q, block_kv) for the forward and the backward kernels on a TPU."""
  if head_dim <= 128:
    return (512, 512), (512, 512)
  return (256, 512), (256, 256)


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _kv_block(spec, bq, bk, i, j, num_kv_blocks):
  """Block index the pipeline loads at kv step j of q block i, and whether step j runs.

  Steps outside the visible band load the nearest visible block instead (no new
  DMA when it is the block just used or the one needed next).
  """
  q_start = i * bq
  lo, hi = masking.kv_span(q_start, q_start + bq, causal=spec.causal, window=spec.window,
                           kv_len=spec.kv_len)
  mem = min(-(-spec.num_memory // bk), num_kv_blocks)
  lo_b = jnp.maximum(lax.div(jnp.asarray(lo, jnp.int32), bk), mem)
  hi_b = flash.cdiv(jnp.asarray(hi, jnp.int32), bk)
  runs = (j < mem) | ((j >= lo_b) & (j < hi_b))
  block = jnp.where(j < mem, j, jnp.minimum(jnp.maximum(j, lo_b), hi_b - 1))
  return jnp.clip(block, 0, num_kv_blocks - 1), runs


def _q_block(spec, bq, bk, j, i, num_q_blocks):
  """As `_kv_block` for the dK/dV kernel: q block loaded at q step i of kv block j."""
  kv_start = j * bk
  lo_b, hi_b = flash.q_block_span(spec, kv_start, bk, bq)
  runs = (i >= lo_b) & (i < hi_b)
  block = jnp.minimum(jnp.maximum(i, lo_b), hi_b - 1)
  return jnp.clip(block, 0, num_q_blocks - 1), runs


def _tile_inputs(spec, q_start, kv_start, bq, bk, qseg_ref, kvseg_ref, slopes_ref, head):
  """Index tiles, segment tiles and the slope of one (q block, kv block) tile."""
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  q_seg = None if qseg_ref is None else qseg_ref[...][:, :1]      # [bq, 1]
  kv_seg = None if kvseg_ref is None else kvseg_ref[...][:1, :]   # [1, bk]
  slope = None if slopes_ref is None else slopes_ref[head]
  return q_idx, kv_idx, q_seg, kv_seg, slope


def _when_visible(spec, runs, q_start, kv_start, bq, bk, segments, step):
  """Run step(masked) on a visible tile: unmasked where `masking.tile_full` allows."""
  if segments:
    pl.when(runs)(functools.partial(step, True))
    return
  full = masking.tile_full(q_start, q_start + bq, kv_start, kv_start + bk,
                           kv_len=spec.kv_len, **spec.mask_kwargs())
  pl.when(runs & full)(functools.partial(step, False))
  pl.when(runs & jnp.logical_not(full))(functools.partial(step, True))


def _segment_args(q_seg, kv_seg):
  if q_seg is None:
    return None, None
  b, tp = q_seg.shape
  sp = kv_seg.shape[1]
  return (jnp.broadcast_to(q_seg[:, :, None], (b, tp, LANES)),
          jnp.broadcast_to(kv_seg[:, None, :], (b, SUBLANES, sp)))


# -------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slopes_ref, o_ref, lse_ref,
                    m_sc, l_sc, acc_sc, *, spec, num_kv_blocks):
  head, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  _, runs = _kv_block(spec, bq, bk, i, j, num_kv_blocks)
  q_start, kv_start = i * bq, j * bk

  def step(masked):
    q_idx, kv_idx, q_seg, kv_seg, slope = _tile_inputs(
        spec, q_start, kv_start, bq, bk, qseg_ref, kvseg_ref, slopes_ref, head)
    s = lax.dot_general(q_ref[...], k_ref[...], flash.NT, preferred_element_type=jnp.float32)
    _, logits, mask = flash.tile_logits(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope,
                                        masked=masked)
    m, l, acc = flash.softmax_step(m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...],
                                   logits, mask, v_ref[...])
    m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l, l_sc.shape)
    acc_sc[...] = acc

  _when_visible(spec, runs, q_start, kv_start, bq, bk, qseg_ref is not None, step)

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    out, lse = flash.finish(m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def forward(spec, q, k, v, q_seg, kv_seg, slopes):
  b, tp, n, h = q.shape
  sp, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kvh
  bq, bk = spec.block_q, spec.block_kv
  nq, nk = tp // bq, sp // bk
  qt = jnp.transpose(q, (0, 2, 1, 3))          # [b, n, t, h]
  kt = jnp.transpose(k, (0, 2, 1, 3))          # [b, kv, s, h]
  vt = jnp.transpose(v, (0, 2, 1, 3))
  qseg_arg, kvseg_arg = _segment_args(q_seg, kv_seg)

  def kv_map(bi, hi, i, j):
    return bi, hi // g, _kv_block(spec, bq, bk, i, j, nk)[0], 0

  in_specs = [
      pl.BlockSpec((None, None, bq, h), lambda bi, hi, i, j: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, bk, h), kv_map),
      pl.BlockSpec((None, None, bk, hv), kv_map),
      None if q_seg is None else pl.BlockSpec((None, bq, LANES),
                                              lambda bi, hi, i, j: (bi, i, 0)),
      None if kv_seg is None else pl.BlockSpec(
          (None, SUBLANES, bk), lambda bi, hi, i, j: (bi, 0, _kv_block(spec, bq, bk, i, j, nk)[0])),
      None if slopes is None else pl.BlockSpec(memory_space=pltpu.SMEM),
  ]
  out_specs = [
      pl.BlockSpec((None, None, bq, hv), lambda bi, hi, i, j: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, bq, LANES), lambda bi, hi, i, j: (bi, hi, i, 0)),
  ]
  out_shape = [jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype),
               jax.ShapeDtypeStruct((b, n, tp, LANES), jnp.float32)]
  with jax.named_scope('flash_forward'):
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec, num_kv_blocks=nk),
        grid=(b, n, nq, nk), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, hv), jnp.float32)],
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL,
                                pltpu.ARBITRARY),
        interpret=spec.interpret, name='ablax_flash_forward_tpu',
    )(qt, kt, vt, qseg_arg, kvseg_arg, slopes)
  return jnp.transpose(out, (0, 2, 1, 3)), lse[..., 0]


# ------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slopes_ref, do_ref, lse_ref,
               delta_ref, dq_ref, dq_sc, *, spec, num_kv_blocks):
  head, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  _, runs = _kv_block(spec, bq, bk, i, j, num_kv_blocks)
  q_start, kv_start = i * bq, j * bk

  def step(masked):
    q_idx, kv_idx, q_seg, kv_seg, slope = _tile_inputs(
        spec, q_start, kv_start, bq, bk, qseg_ref, kvseg_ref, slopes_ref, head)
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, flash.NT, preferred_element_type=jnp.float32)
    capped, logits, mask = flash.tile_logits(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope,
                                             masked=masked)
    dp = lax.dot_general(do_ref[...], v_ref[...], flash.NT, preferred_element_type=jnp.float32)
    lse = lse_ref[0][:, None]
    delta = delta_ref[0][:, None]
    _, ds = flash.tile_grads(spec, capped, logits, mask, lse, delta, dp)
    dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, flash.NN,
                                  preferred_element_type=jnp.float32)

  _when_visible(spec, runs, q_start, kv_start, bq, bk, qseg_ref is not None, step)

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slopes_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, spec, num_q_blocks, group):
  kh, j, r = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  bk, bq = k_ref.shape[0], q_ref.shape[0]
  head, i = kh * group + r // num_q_blocks, r % num_q_blocks

  @pl.when(r == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  _, runs = _q_block(spec, bq, bk, j, i, num_q_blocks)
  q_start, kv_start = i * bq, j * bk

  def step(masked):
    q_idx, kv_idx, q_seg, kv_seg, slope = _tile_inputs(
        spec, q_start, kv_start, bq, bk, qseg_ref, kvseg_ref, slopes_ref, head)
    q, do = q_ref[...], do_ref[...]
    s = lax.dot_general(q, k_ref[...], flash.NT, preferred_element_type=jnp.float32)
    capped, logits, mask = flash.tile_logits(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope,
                                             masked=masked)
    dp = lax.dot_general(do, v_ref[...], flash.NT, preferred_element_type=jnp.float32)
    lse = lse_ref[0][:, None]
    delta = delta_ref[0][:, None]
    p, ds = flash.tile_grads(spec, capped, logits, mask, lse, delta, dp)
    dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, flash.TN,
                                  preferred_element_type=jnp.float32)
    dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, flash.TN,
                                  preferred_element_type=jnp.float32)

  _when_visible(spec, runs, q_start, kv_start, bq, bk, qseg_ref is not None, step)

  @pl.when(r == group * num_q_blocks - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(spec, q, k, v, q_seg, kv_seg, slopes, out, lse, dout):
  b, tp, n, h = q.shape
  sp, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kvh
  bq, bk = spec.bwd_block_q, spec.bwd_block_kv
  nq, nk = tp // bq, sp // bk
  with jax.named_scope('flash_backward_delta'):
    delta = jnp.einsum('btnh,btnh->bnt', out.astype(jnp.float32), dout.astype(jnp.float32))
  # Row statistics as [b, n, 1, t]: a [1, bq] block per step, turned into a
  # column in-kernel.
  lse_rows, delta_rows = lse[:, :, None, :], delta[:, :, None, :]
  qt, dot_ = jnp.transpose(q, (0, 2, 1, 3)), jnp.transpose(dout, (0, 2, 1, 3))
  kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
  qseg_arg, kvseg_arg = _segment_args(q_seg, kv_seg)
  slope_spec = None if slopes is None else pl.BlockSpec(memory_space=pltpu.SMEM)

  # dQ: the forward's iteration.
  def kv_map(bi, hi, i, j):
    return bi, hi // g, _kv_block(spec, bq, bk, i, j, nk)[0], 0

  q_spec = pl.BlockSpec((None, None, bq, h), lambda bi, hi, i, j: (bi, hi, i, 0))
  do_spec = pl.BlockSpec((None, None, bq, hv), lambda bi, hi, i, j: (bi, hi, i, 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, j: (bi, hi, 0, i))
  with jax.named_scope('flash_backward_dq'):
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, num_kv_blocks=nk),
        grid=(b, n, nq, nk),
        in_specs=[
            q_spec, pl.BlockSpec((None, None, bk, h), kv_map),
            pl.BlockSpec((None, None, bk, hv), kv_map),
            None if q_seg is None else pl.BlockSpec((None, bq, LANES),
                                                    lambda bi, hi, i, j: (bi, i, 0)),
            None if kv_seg is None else pl.BlockSpec(
                (None, SUBLANES, bk),
                lambda bi, hi, i, j: (bi, 0, _kv_block(spec, bq, bk, i, j, nk)[0])),
            slope_spec, do_spec, row_spec, row_spec,
        ],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL,
                                pltpu.ARBITRARY),
        interpret=spec.interpret, name='ablax_flash_dq_tpu',
    )(qt, kt, vt, qseg_arg, kvseg_arg, slopes, dot_, lse_rows, delta_rows)

  # dK/dV: the sequential axis r walks (head of the group, q block) pairs.
  def q_map(bi, kh, j, r):
    return bi, kh * g + r // nq, _q_block(spec, bq, bk, j, r % nq, nq)[0], 0

  def row_map(bi, kh, j, r):
    return bi, kh * g + r // nq, 0, _q_block(spec, bq, bk, j, r % nq, nq)[0]

  k_spec = pl.BlockSpec((None, None, bk, h), lambda bi, kh, j, r: (bi, kh, j, 0))
  v_spec = pl.BlockSpec((None, None, bk, hv), lambda bi, kh, j, r: (bi, kh, j, 0))
  with jax.named_scope('flash_backward_dkv'):
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, num_q_blocks=nq, group=g),
        grid=(b, kvh, nk, g * nq),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), q_map), k_spec, v_spec,
            None if q_seg is None else pl.BlockSpec(
                (None, bq, LANES),
                lambda bi, kh, j, r: (bi, _q_block(spec, bq, bk, j, r % nq, nq)[0], 0)),
            None if kv_seg is None else pl.BlockSpec((None, SUBLANES, bk),
                                                     lambda bi, kh, j, r: (bi, 0, j)),
            slope_spec, pl.BlockSpec((None, None, bq, hv), q_map),
            pl.BlockSpec((None, None, 1, bq), row_map),
            pl.BlockSpec((None, None, 1, bq), row_map),
        ],
        out_specs=[k_spec, v_spec],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype),
                   jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, hv), jnp.float32)],
        compiler_params=_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL,
                                pltpu.ARBITRARY),
        interpret=spec.interpret, name='ablax_flash_dkv_tpu',
    )(qt, kt, vt, qseg_arg, kvseg_arg, slopes, dot_, lse_rows, delta_rows)
  return (dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3))
