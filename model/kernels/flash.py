"""Flash attention: the part every backend shares.

Implements exact attention in O(N) memory by tiling (Dao et al. 2022,
"FlashAttention"; Dao 2023, "FlashAttention-2"): the forward pass streams key
blocks past a query block with an online softmax (Milakov & Gimelshein 2018)
and saves only the output and the per-row log-sum-exp; the backward pass
recomputes each score tile from that log-sum-exp.

This module holds what does not depend on the accelerator:

- `Spec`, the static description of one call (flags, true lengths, blocks);
- the tile math (`tile_logits`, `softmax_step`, `finish`, `tile_grads`),
  which calls `model.masking` for the mask, the ALiBi bias and the soft-cap, the
  same functions the XLA reference uses, so no kernel can drift from it;
- `attention`, the wrapper: checks, head-dim and sequence padding (padded keys
  are masked by index >= true length; padded queries are sliced off), and the
  `jax.custom_vjp` that joins a backend's forward and backward kernels.

A backend is a module with two functions over padded arrays in the layout
q [b, t, n, h], k [b, s, kv, h], v [b, s, kv, hv], segment ids [b, t] / [b, s],
slopes [n]; the value head dim hv may differ from the query/key head dim h
(MLA: 192 vs 128 in DeepSeek-V3), so out and dout are [b, t, n, hv]:

  forward(spec, q, k, v, q_seg, kv_seg, slopes) -> (out [b,t,n,hv], lse [b,n,t] f32)
  backward(spec, q, k, v, q_seg, kv_seg, slopes, out, lse, dout)
      -> (dq, dk, dv)

`gpu_triton` (Pallas on the Triton lowering), `gpu_mosaic` (Pallas on Mosaic
GPU, Hopper) and `tpu_mosaic` (Pallas Mosaic TPU) are the three today; see
docs/attention.md.
"""

import dataclasses
import functools
import importlib
import math
from typing import Any

import jax
import jax.numpy as jnp

from model import masking

BACKENDS = ('gpu_triton', 'gpu_mosaic', 'tpu_mosaic')


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static arguments of one flash-attention call (hashable: it keys the jit cache)."""
  causal: bool
  window: int | None
  softcap: float | None
  scale: float
  num_memory: int
  q_len: int          # true lengths; the arrays a backend sees are padded
  kv_len: int
  block_q: int         # forward tiles
  block_kv: int
  bwd_block_q: int     # backward tiles (dQ and dK/dV kernels)
  bwd_block_kv: int
  backend: str
  interpret: Any = False   # False, True (generic interpreter) or pltpu.InterpretParams

  def mask_kwargs(self):
    return dict(causal=self.causal, window=self.window, num_memory=self.num_memory)


# --------------------------------------------------------------------------- tiles


def cdiv(a, b):
  """Ceiling division of traced int32 block indices."""
  return jax.lax.div(a + b - 1, b)


def q_block_span(spec, kv_start, bk, bq):
  """[first, end) q blocks that see any key of the kv tile at `kv_start`.

  Every q block when the tile holds memory keys (all queries see those).
  """
  lo, hi = masking.q_span(kv_start, kv_start + bk, causal=spec.causal,
                          window=spec.window, q_len=spec.q_len)
  lo, hi = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
  if spec.num_memory:
    has_memory = kv_start < spec.num_memory
    lo = jnp.where(has_memory, 0, lo)
    hi = jnp.where(has_memory, spec.q_len, hi)
  return jax.lax.div(lo, bq), cdiv(hi, bq)


def tile_logits(spec, s, q_idx, kv_idx, q_seg=None, kv_seg=None, slope=None, *,
                masked=True):
  """One score tile, as the reference computes it, plus its mask.

  Args:
    s: raw q.k products, float32 [bq, bk].
    q_idx, kv_idx: int indices broadcastable to [bq, bk] (e.g. [bq, 1], [1, bk]).
    q_seg, kv_seg: segment ids broadcastable likewise, or None.
    slope: this head's ALiBi slope (scalar or broadcastable), or None.
    masked: False on a tile that `masking.tile_full` proved fully visible
      (and without segments): the mask is then skipped.
  Returns:
    capped: the soft-capped scaled logits before the bias (the soft-cap
      derivative is written in terms of it), float32 [bq, bk];
    logits: capped + ALiBi bias;
    mask: bool [bq, bk], False where the pair is not visible or the key is
      padding; None when not masked.
  """
  capped = masking.softcap(s * spec.scale, spec.softcap)
  logits = capped
  if slope is not None:
    logits = logits + masking.alibi_bias(slope, q_idx, kv_idx, spec.num_memory)
  if not masked:
    return capped, jnp.broadcast_to(logits, s.shape), None
  mask = masking.visible(q_idx, kv_idx, q_seg, kv_seg, **spec.mask_kwargs())
  mask = jnp.broadcast_to(mask & (kv_idx < spec.kv_len), s.shape)
  return capped, jnp.broadcast_to(logits, s.shape), mask


def softmax_step(m, l, acc, logits, mask, v):
  """One online-softmax update with a key block.

  m, l: running row max and row sum, float32 [bq, 1]; acc: float32 [bq, h]
  (unnormalised output); logits, mask: [bq, bk] (mask None: all visible);
  v: [bk, h]. A row that has seen no visible key keeps m = -inf, l = 0,
  acc = 0; the arithmetic below never forms inf - inf, so no NaN appears.
  """
  if mask is None:
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))   # finite
    m_safe = m_new
    p = jnp.exp(logits - m_safe)
  else:
    m_tile = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=1, keepdims=True)
    m_new = jnp.maximum(m, m_tile)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.where(mask, jnp.exp(logits - m_safe), 0.0)
  alpha = jnp.exp(m - m_safe)                     # 0 while m was -inf
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  # p goes to the matmul in v's dtype (bf16 inputs: bf16 x bf16 -> f32 on the
  # tensor core, as every flash kernel does); float32 stays exact.
  pv = jax.lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
  acc = alpha * acc + pv
  return m_new, l, acc


def finish(m, l, acc):
  """Normalised output and log-sum-exp of rows; rows that saw nothing get 0 and 0."""
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  out = acc / l_safe
  lse = jnp.where(seen, m, 0.0) + jnp.log(l_safe)
  return out, lse


def tile_grads(spec, capped, logits, mask, lse, delta, dp):
  """Probabilities and d(raw scores) of a tile in the backward pass.

  P = exp(logits - lse) (zero where masked), dS = P * (dP - delta) with
  delta = rowsum(dO * O) (Dao 2023, eq. in section 2.2), then through the
  soft-cap: d raw = dS * (1 - (capped/cap)^2); the factor `scale` is applied by
  the caller once per accumulated block.
  lse, delta: float32 [bq, 1]; dp = dO . V^T, float32 [bq, bk]; mask None:
  all visible.
  """
  p = jnp.exp(logits - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  ds = p * (dp - delta)
  if spec.softcap is not None:
    ds = ds * masking.softcap_grad(capped, spec.softcap)
  return p, ds


# dot_general dimension numbers: NN = a @ b, NT = a @ b.T, TN = a.T @ b.
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


# ------------------------------------------------------------------------- wrapper


def backend_module(name):
  """The kernel module of backend `name` (imported on first use)."""
  if name not in BACKENDS:
    raise ValueError(f'flash attention backend {name!r}: must be one of {BACKENDS}')
  return importlib.import_module(f'model.kernels.{name}')


def _with_sinks(out, lse, sinks):
  """Adds a sink logit per head to every row's denominator, after the kernel.

  With Z the kernel's row sum (lse = log Z) and s the sink, the output becomes
  out * Z / (Z + e^s) and lse becomes log(Z + e^s); rows that saw nothing keep
  their zero output. The backward kernels then need nothing new: with this lse
  they form the sink-inclusive probabilities, and delta = rowsum(dO * out) is
  still the right correction because the sink carries no value.
  """
  if sinks is None:
    return out, lse
  lse_sink = jnp.logaddexp(lse, sinks[None, :, None])               # [b, n, t]
  factor = jnp.exp(lse - lse_sink).transpose(0, 2, 1)[..., None]    # [b, t, n, 1]
  return (out.astype(jnp.float32) * factor).astype(out.dtype), lse_sink


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, q, k, v, q_seg, kv_seg, slopes, sinks):
  out, lse = backend_module(spec.backend).forward(spec, q, k, v, q_seg, kv_seg, slopes)
  return _with_sinks(out, lse, sinks)[0]


def _flash_fwd(spec, q, k, v, q_seg, kv_seg, slopes, sinks):
  out, lse = backend_module(spec.backend).forward(spec, q, k, v, q_seg, kv_seg, slopes)
  out, lse = _with_sinks(out, lse, sinks)
  return out, (q, k, v, q_seg, kv_seg, slopes, sinks, out, lse)


def _flash_bwd(spec, res, dout):
  q, k, v, q_seg, kv_seg, slopes, sinks, out, lse = res
  dq, dk, dv = backend_module(spec.backend).backward(
      spec, q, k, v, q_seg, kv_seg, slopes, out, lse, dout)
  dsinks = None
  if sinks is not None:
    # d loss / d s = sum over rows of P_sink * (dP_sink - delta), dP_sink = 0
    # (no value): -sum_rows exp(s - lse) * rowsum(dO * out).
    delta = jnp.einsum('btnh,btnh->bnt', out.astype(jnp.float32), dout.astype(jnp.float32))
    p_sink = jnp.exp(sinks[None, :, None] - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 2))
  # Segment ids are integers and the ALiBi slopes are fixed constants (the
  # wrapper stops their gradient): no cotangent for either.
  return dq, dk, dv, None, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(x, m):
  return -(-x // m) * m


def attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None,
              alibi_slopes=None, logit_softcap=None, scale=None, num_memory_tokens=0,
              block_q, block_kv, backend, bwd_block_q=None, bwd_block_kv=None,
              interpret=False, head_dim_multiple=1, sink_logits=None):
  """Flash attention with `backend` (one of `BACKENDS`); semantics of
  `model.attention_core.reference_attention`.

  block_q, block_kv: the forward tile sizes (chosen and checked by the caller);
  bwd_block_q, bwd_block_kv: the backward ones (default: the forward ones).
  head_dim_multiple: pad the head dims (q/k's and v's, each on its own) with
    zeros up to a multiple of this (or the next power of two when it is 0) for
    backends with layout limits; zeros in q and k do not change q.k, zero
    columns of v give zero columns of the output.
  v may have its own head dim (out is [b, t, n, v's head dim]); `scale`
  defaults to 1/sqrt(q's head dim).
  sink_logits: None or float [num_heads], learned attention sinks (differentiable).
  """
  backend_module(backend)
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, '
                     f'{k.shape}, {v.shape}')
  b, t, n, h = q.shape
  s, kvh, hv = k.shape[1], k.shape[2], v.shape[3]
  if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f'k {k.shape} and v {v.shape} must be [batch={b}, kv_len, '
                     f'kv_heads, head_dim] with k\'s head_dim={h} (q\'s); v\'s '
                     'head dim may differ')
  if n % kvh:
    raise ValueError(f'num_heads={n} must be a multiple of num_kv_heads={kvh}')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}')
  if segment_ids is not None and (segment_ids.shape != (b, t) or t != s):
    raise ValueError(f'segment_ids {segment_ids.shape} must be [batch={b}, seq={t}] '
                     f'with q_len == kv_len (got kv_len {s})')
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f'sliding_window={sliding_window} must be >= 1')
  if not 0 <= num_memory_tokens <= s:
    raise ValueError(f'num_memory_tokens={num_memory_tokens} must be in [0, kv_len={s}]')

  spec = Spec(
      causal=bool(causal), window=None if sliding_window is None else int(sliding_window),
      softcap=None if logit_softcap is None else float(logit_softcap),
      scale=float(h ** -0.5 if scale is None else scale),
      num_memory=int(num_memory_tokens), q_len=t, kv_len=s,
      block_q=int(block_q), block_kv=int(block_kv),
      bwd_block_q=int(bwd_block_q or block_q), bwd_block_kv=int(bwd_block_kv or block_kv),
      backend=backend, interpret=interpret)

  with jax.named_scope('flash_attention_pad'):
    pad_dim = lambda d: (max(16, 1 << (d - 1).bit_length()) if head_dim_multiple == 0
                         else _round_up(d, head_dim_multiple))
    hp, hvp = pad_dim(h), pad_dim(hv)
    tp = _round_up(t, math.lcm(spec.block_q, spec.bwd_block_q))
    sp = _round_up(s, math.lcm(spec.block_kv, spec.bwd_block_kv))
    q_p = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, hp - h)))
    k_p = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))
    v_p = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, hvp - hv)))
    q_seg = kv_seg = None
    if segment_ids is not None:
      seg = segment_ids.astype(jnp.int32)
      q_seg = jnp.pad(seg, ((0, 0), (0, tp - t)))
      kv_seg = jnp.pad(seg, ((0, 0), (0, sp - s)))
    slopes = None
    if alibi_slopes is not None:
      slopes = jax.lax.stop_gradient(jnp.asarray(alibi_slopes, jnp.float32).reshape(n))

    sinks = None if sink_logits is None else jnp.asarray(sink_logits, jnp.float32).reshape(n)

  out = _flash(spec, q_p, k_p, v_p, q_seg, kv_seg, slopes, sinks)
  return out[:, :t, :, :hv]


# ------------------------------------------------------------- one block pair
#
# Context parallelism (model/context_parallel.py) attends a chunk of queries to
# one chunk of keys at a time and merges the chunks' outputs by their
# log-sum-exps (an online softmax across chunks). It calls the backend's
# kernels directly, not through `_flash`: the forward needs each chunk's lse,
# and the backward runs each chunk with the merged output and lse (then P =
# exp(s - lse) is the whole row's softmax and delta = rowsum(dO * O) the whole
# row's correction, so a chunk's dq, dk, dv are its share of the full ones).


def block_spec(*, causal, softcap, scale, q_len, kv_len, blocks, backend, interpret):
  """The `Spec` of one chunk pair: q_len x kv_len, no window, ALiBi or memory
  (their masks depend on the chunks' global offsets, which a kernel does not
  take); blocks = (block_q, block_kv, bwd_block_q, bwd_block_kv)."""
  return Spec(causal=bool(causal), window=None,
              softcap=None if softcap is None else float(softcap), scale=float(scale),
              num_memory=0, q_len=q_len, kv_len=kv_len, block_q=blocks[0],
              block_kv=blocks[1], bwd_block_q=blocks[2], bwd_block_kv=blocks[3],
              backend=backend, interpret=interpret)


def _pad_chunk(x, rows, head_multiple):
  """x [b, t, ...(, h)] zero-padded to `rows` positions and the head dim rounded."""
  widths = [(0, 0), (0, rows - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  if x.ndim == 4 and head_multiple != 1:
    d = x.shape[3]
    dp = (max(16, 1 << (d - 1).bit_length()) if head_multiple == 0
          else _round_up(d, head_multiple))
    widths[3] = (0, dp - d)
  return jnp.pad(x, widths)


def _chunk_rows(spec):
  tp = _round_up(spec.q_len, math.lcm(spec.block_q, spec.bwd_block_q))
  sp = _round_up(spec.kv_len, math.lcm(spec.block_kv, spec.bwd_block_kv))
  return tp, sp


def chunk_forward(spec, q, k, v, q_seg, kv_seg, head_dim_multiple=1):
  """(out [b, t, n, hv] in q's dtype, lse [b, n, t] float32) of one chunk pair.

  A row that sees no key of the chunk gets out 0 and lse 0 (`finish`); the
  caller, which knows the segments, masks such rows out of its merge.
  """
  t, hv = q.shape[1], v.shape[3]
  tp, sp = _chunk_rows(spec)
  pad_q = lambda x: _pad_chunk(x, tp, head_dim_multiple)
  pad_kv = lambda x: _pad_chunk(x, sp, head_dim_multiple)
  out, lse = backend_module(spec.backend).forward(
      spec, pad_q(q), pad_kv(k), pad_kv(v), None if q_seg is None else pad_q(q_seg),
      None if kv_seg is None else pad_kv(kv_seg), None)
  return out[:, :t, :, :hv], lse[:, :, :t]


def chunk_backward(spec, q, k, v, q_seg, kv_seg, out, lse, dout, head_dim_multiple=1):
  """(dq, dk, dv) of one chunk pair, given the merged row output and lse."""
  t, s, h, hv = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
  tp, sp = _chunk_rows(spec)
  pad_q = lambda x: _pad_chunk(x, tp, head_dim_multiple)
  pad_kv = lambda x: _pad_chunk(x, sp, head_dim_multiple)
  dq, dk, dv = backend_module(spec.backend).backward(
      spec, pad_q(q), pad_kv(k), pad_kv(v), None if q_seg is None else pad_q(q_seg),
      None if kv_seg is None else pad_kv(kv_seg), None, pad_q(out),
      jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t))), pad_q(dout))
  return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :hv]
