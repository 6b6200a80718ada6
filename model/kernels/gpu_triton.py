"""Flash attention for GPUs: Pallas kernels on the Triton lowering.

FlashAttention-2 (Dao 2023) with everything the ablax decoder's attention has:
causal and sliding-window masks with block skipping, GQA/MQA by indexing the
shared K/V head, packed segments, ALiBi computed in-kernel (Press et al.
2021), logit soft-capping (Gemma 2) and learned memory tokens (Burtsev et al.
2020). The mask, bias and soft-cap come from `model.masking` through
`flash.tile_logits`, as in the TPU kernel and the XLA reference.

Three kernels, one program per (block, batch, head):

- forward, grid (q blocks, batch, heads): a q tile stays in registers while a
  loop streams key blocks; the loop bounds come from `masking.kv_span`, so
  tiles entirely outside the causal/window band are never loaded, and the
  memory blocks are visited first by a loop of their own. Writes out and lse.
- dK/dV, grid (kv blocks, batch, kv heads): a K/V tile accumulates over the
  heads of its GQA group and over the q blocks of `masking.q_span`; summing
  the group inside the program gives the shared head's gradient with no atomics
  and no repeated K/V.
- dQ, grid (q blocks, batch, heads): the forward loop again, accumulating dQ.

Triton needs power-of-two tile shapes: block sizes are powers of two >= 16 and
the wrapper pads each head dim to one (q/k's and v's may differ, as in MLA).
The Triton lowering is deprecated in favour of Mosaic GPU from jax 0.11;
`model.kernels` silences that warning once
and this module keeps to the backend interface of `flash.py`, so a Mosaic GPU
module can replace it behind `flash_attention`.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from model import masking
from model.kernels import flash

# The slopes reach the kernel as a [heads, _SLOPE_LANES] broadcast: a
# power-of-two vector load, reduced to a scalar in-kernel (Triton has no
# scalar-from-array load through a BlockSpec).
_SLOPE_LANES = 16


def default_blocks(head_dim):
  """(block_q, block_kv) for the forward and the backward kernels on a GPU.

  The forward keeps a [bq, h] accumulator in registers; the backward two
  [bk, h] accumulators (dK, dV), hence smaller tiles there and for h=256.
  """
  if head_dim <= 64:
    return (128, 64), (64, 64)
  if head_dim <= 128:
    return (128, 64), (64, 64)
  return (64, 32), (32, 32)


def _compiler_params(head_dim, backward=False):
  # Imported on first use, not at module import: the Triton lowering is
  # deprecated from jax 0.11 (see `model.kernels` for how its warning is handled).
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  num_warps = 4 if head_dim <= 64 else 8
  num_stages = 1 if (backward or head_dim > 128) else 2
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _slopes_arg(slopes):
  if slopes is None:
    return None
  return jnp.broadcast_to(slopes[:, None], (slopes.shape[0], _SLOPE_LANES))


def _kv_loops(spec, q_start, bq, bk, num_kv_blocks, segments):
  """The kv-block loops of a q tile, as [(first, end, masked)].

  The memory blocks first, then the causal/window band of `masking.kv_span`
  split into its masked edges and the middle that `masking.kv_full_span` proves
  fully visible (no mask arithmetic there). With segment ids every tile is
  masked.
  """
  lo, hi = masking.kv_span(q_start, q_start + bq, causal=spec.causal,
                           window=spec.window, kv_len=spec.kv_len)
  mem = min(-(-spec.num_memory // bk), num_kv_blocks)
  lo_b = jnp.maximum(lax.div(jnp.asarray(lo, jnp.int32), bk), mem)
  hi_b = flash.cdiv(jnp.asarray(hi, jnp.int32), bk)
  loops = [(0, mem, True)] if mem else []
  if segments:
    return loops + [(lo_b, hi_b, True)]
  full_lo, full_hi = masking.kv_full_span(q_start, q_start + bq, causal=spec.causal,
                                          window=spec.window, kv_len=spec.kv_len)
  a = jnp.clip(flash.cdiv(jnp.maximum(full_lo, 0), bk), lo_b, hi_b)
  b = jnp.clip(lax.div(jnp.maximum(jnp.asarray(full_hi, jnp.int32), 0), bk), a, hi_b)
  if spec.num_memory:   # memory queries see only memory keys: no full tile
    a = jnp.where(q_start < spec.num_memory, hi_b, a)
    b = jnp.where(q_start < spec.num_memory, hi_b, b)
  return loops + [(lo_b, a, True), (a, b, False), (b, hi_b, True)]


def _q_loops(spec, kv_start, bk, bq, segments):
  """The q-block loops of a kv tile, as [(first, end, masked)] (see `_kv_loops`).

  Every q block when the tile holds memory keys (all queries see those).
  """
  lo_b, hi_b = flash.q_block_span(spec, kv_start, bk, bq)
  if segments:
    return [(lo_b, hi_b, True)]
  full_lo, full_hi = masking.q_full_span(kv_start, kv_start + bk, causal=spec.causal,
                                         window=spec.window, q_len=spec.q_len)
  full_lo = jnp.maximum(jnp.asarray(full_lo, jnp.int32), spec.num_memory)
  a = jnp.clip(flash.cdiv(full_lo, bq), lo_b, hi_b)
  b = jnp.clip(lax.div(jnp.maximum(jnp.asarray(full_hi, jnp.int32), 0), bq), a, hi_b)
  # A kv tile with padding keys or memory keys stays masked throughout (memory
  # queries see only memory keys; the wrapper's padding must stay hidden).
  no_full = kv_start + bk > spec.kv_len
  if spec.num_memory:
    no_full = no_full | (kv_start < spec.num_memory)
  a, b = jnp.where(no_full, hi_b, a), jnp.where(no_full, hi_b, b)
  return [(lo_b, a, True), (a, b, False), (b, hi_b, True)]


def _run_loops(loops, body, carry):
  for first, end, masked in loops:
    carry = lax.fori_loop(first, end, functools.partial(body, masked=masked), carry)
  return carry


# -------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slope_ref, o_ref, lse_ref,
                    *, spec, block_kv):
  bq = q_ref.shape[0]
  bk = block_kv
  q_start = pl.program_id(0) * bq
  q = q_ref[...]
  q_idx = (q_start + jnp.arange(bq, dtype=jnp.int32))[:, None]
  q_seg = None if qseg_ref is None else qseg_ref[...][:, None]
  slope = None if slope_ref is None else jnp.max(slope_ref[...])

  def body(j, carry, masked):
    m, l, acc = carry
    kv_start = j * bk
    k = k_ref[pl.ds(kv_start, bk), :]
    v = v_ref[pl.ds(kv_start, bk), :]
    kv_idx = (kv_start + jnp.arange(bk, dtype=jnp.int32))[None, :]
    kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(kv_start, bk)][None, :]
    s = lax.dot_general(q, k, flash.NT, preferred_element_type=jnp.float32)
    _, logits, mask = flash.tile_logits(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope,
                                        masked=masked)
    return flash.softmax_step(m, l, acc, logits, mask, v)

  carry = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
           jnp.zeros((bq, v_ref.shape[-1]), jnp.float32))
  loops = _kv_loops(spec, q_start, bq, bk, k_ref.shape[0] // bk, qseg_ref is not None)
  out, lse = flash.finish(*_run_loops(loops, body, carry))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def forward(spec, q, k, v, q_seg, kv_seg, slopes):
  b, tp, n, h = q.shape
  sp, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kvh
  bq, bk = spec.block_q, spec.block_kv
  kernel = functools.partial(_forward_kernel, spec=spec, block_kv=bk)
  in_specs = [
      pl.BlockSpec((None, bq, None, h), lambda i, bi, hi: (bi, i, hi, 0)),
      pl.BlockSpec((None, sp, None, h), lambda i, bi, hi: (bi, 0, hi // g, 0)),
      pl.BlockSpec((None, sp, None, hv), lambda i, bi, hi: (bi, 0, hi // g, 0)),
      None if q_seg is None else pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
      None if kv_seg is None else pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)),
      None if slopes is None else pl.BlockSpec((None, _SLOPE_LANES),
                                               lambda i, bi, hi: (hi, 0)),
  ]
  out_specs = [
      pl.BlockSpec((None, bq, None, hv), lambda i, bi, hi: (bi, i, hi, 0)),
      pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
  ]
  out_shape = [jax.ShapeDtypeStruct((b, tp, n, hv), q.dtype),
               jax.ShapeDtypeStruct((b, n, tp), jnp.float32)]
  with jax.named_scope('flash_forward'):
    out, lse = pl.pallas_call(
        kernel, grid=(tp // bq, b, n), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_compiler_params(max(h, hv)),
        interpret=spec.interpret, name='ablax_flash_forward',
    )(q, k, v, q_seg, kv_seg, _slopes_arg(slopes))
  return out, lse


# ------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slope_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, spec, block_kv):
  bq, h = q_ref.shape      # q/k head dim; do and v have their own
  bk = block_kv
  q_start = pl.program_id(0) * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  q_idx = (q_start + jnp.arange(bq, dtype=jnp.int32))[:, None]
  q_seg = None if qseg_ref is None else qseg_ref[...][:, None]
  slope = None if slope_ref is None else jnp.max(slope_ref[...])

  def body(j, dq, masked):
    kv_start = j * bk
    k = k_ref[pl.ds(kv_start, bk), :]
    v = v_ref[pl.ds(kv_start, bk), :]
    kv_idx = (kv_start + jnp.arange(bk, dtype=jnp.int32))[None, :]
    kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(kv_start, bk)][None, :]
    s = lax.dot_general(q, k, flash.NT, preferred_element_type=jnp.float32)
    capped, logits, mask = flash.tile_logits(spec, s, q_idx, kv_idx, q_seg, kv_seg, slope,
                                             masked=masked)
    dp = lax.dot_general(do, v, flash.NT, preferred_element_type=jnp.float32)
    _, ds = flash.tile_grads(spec, capped, logits, mask, lse, delta, dp)
    return dq + lax.dot_general(ds.astype(k.dtype), k, flash.NN,
                                preferred_element_type=jnp.float32)

  loops = _kv_loops(spec, q_start, bq, bk, k_ref.shape[0] // bk, qseg_ref is not None)
  dq = _run_loops(loops, body, jnp.zeros((bq, h), jnp.float32))
  dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slope_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, spec, block_q, group):
  bk, h = k_ref.shape
  hv = v_ref.shape[-1]
  bq = block_q
  kv_start = pl.program_id(0) * bk
  k = k_ref[...]
  v = v_ref[...]
  kv_idx = (kv_start + jnp.arange(bk, dtype=jnp.int32))[None, :]
  kv_seg = None if kvseg_ref is None else kvseg_ref[...][None, :]
  loops = _q_loops(spec, kv_start, bk, bq, qseg_ref is not None)

  def head_body(r, carry):
    slope = None if slope_ref is None else jnp.max(slope_ref[r, :])

    def q_body(i, carry, masked):
      dk, dv = carry
      q_start = i * bq
      rows = pl.ds(q_start, bq)
      q = q_ref[rows, r, :]
      do = do_ref[rows, r, :]
      lse = lse_ref[r, rows][:, None]
      delta = delta_ref[r, rows][:, None]
      q_idx = (q_start + jnp.arange(bq, dtype=jnp.int32))[:, None]
      q_seg = None if qseg_ref is None else qseg_ref[rows][:, None]
      s = lax.dot_general(q, k, flash.NT, preferred_element_type=jnp.float32)
      capped, logits, mask = flash.tile_logits(spec, s, q_idx, kv_idx, q_seg, kv_seg,
                                               slope, masked=masked)
      dp = lax.dot_general(do, v, flash.NT, preferred_element_type=jnp.float32)
      p, ds = flash.tile_grads(spec, capped, logits, mask, lse, delta, dp)
      dv = dv + lax.dot_general(p.astype(do.dtype), do, flash.TN,
                                preferred_element_type=jnp.float32)
      dk = dk + lax.dot_general(ds.astype(q.dtype), q, flash.TN,
                                preferred_element_type=jnp.float32)
      return dk, dv

    return _run_loops(loops, q_body, carry)

  zeros = (jnp.zeros((bk, h), jnp.float32), jnp.zeros((bk, hv), jnp.float32))
  dk, dv = lax.fori_loop(0, group, head_body, zeros)
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(spec, q, k, v, q_seg, kv_seg, slopes, out, lse, dout):
  b, tp, n, h = q.shape
  sp, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  g = n // kvh
  bq, bk = spec.bwd_block_q, spec.bwd_block_kv
  with jax.named_scope('flash_backward_delta'):
    # delta = rowsum(dO * O), [b, n, t] like lse; an elementwise pass XLA fuses.
    delta = jnp.einsum('btnh,btnh->bnt', out.astype(jnp.float32),
                       dout.astype(jnp.float32))
  slopes_arg = _slopes_arg(slopes)
  params = _compiler_params(max(h, hv), backward=True)

  q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, hi: (bi, i, hi, 0))
  do_spec = pl.BlockSpec((None, bq, None, hv), lambda i, bi, hi: (bi, i, hi, 0))
  k_full = pl.BlockSpec((None, sp, None, h), lambda i, bi, hi: (bi, 0, hi // g, 0))
  v_full = pl.BlockSpec((None, sp, None, hv), lambda i, bi, hi: (bi, 0, hi // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  with jax.named_scope('flash_backward_dq'):
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, block_kv=bk),
        grid=(tp // bq, b, n),
        in_specs=[
            q_spec, k_full, v_full,
            None if q_seg is None else pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
            None if kv_seg is None else pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)),
            None if slopes is None else pl.BlockSpec((None, _SLOPE_LANES),
                                                     lambda i, bi, hi: (hi, 0)),
            do_spec, row_spec, row_spec,
        ],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=spec.interpret, name='ablax_flash_dq',
    )(q, k, v, q_seg, kv_seg, slopes_arg, dout, lse, delta)

  # dK/dV: one program per (kv block, batch, kv head) sees all q rows of its group.
  k_spec = pl.BlockSpec((None, bk, None, h), lambda j, bi, kh: (bi, j, kh, 0))
  v_spec = pl.BlockSpec((None, bk, None, hv), lambda j, bi, kh: (bi, j, kh, 0))
  group_q = pl.BlockSpec((None, tp, g, h), lambda j, bi, kh: (bi, 0, kh, 0))
  group_do = pl.BlockSpec((None, tp, g, hv), lambda j, bi, kh: (bi, 0, kh, 0))
  group_rows = pl.BlockSpec((None, g, tp), lambda j, bi, kh: (bi, kh, 0))
  with jax.named_scope('flash_backward_dkv'):
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, block_q=bq, group=g),
        grid=(sp // bk, b, kvh),
        in_specs=[
            group_q, k_spec, v_spec,
            None if q_seg is None else pl.BlockSpec((None, tp), lambda j, bi, kh: (bi, 0)),
            None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, bi, kh: (bi, j)),
            None if slopes is None else pl.BlockSpec((g, _SLOPE_LANES),
                                                     lambda j, bi, kh: (kh, 0)),
            group_do, group_rows, group_rows,
        ],
        out_specs=[k_spec, v_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=spec.interpret, name='ablax_flash_dkv',
    )(q, k, v, q_seg, kv_seg, slopes_arg, dout, lse, delta)
  return dq, dk, dv
