"""Attention masks, ALiBi bias and logit soft-capping as plain elementwise functions.

The XLA reference attention and every Pallas kernel call these same functions on
index arrays (full matrices in the reference, one tile inside a kernel), so the
paths cannot drift apart. Index convention: query and key/value indices count
from the start of the sequence the attention sees, which begins with the
`num_memory` learned memory tokens (Burtsev et al. 2020, "Memory Transformer";
Darcet et al. 2023, "Vision Transformers Need Registers").

- Memory keys/values (index < num_memory) are visible to every query.
- Memory queries see only memory keys (they must not leak later tokens into
  the memory that earlier tokens read).
- Other pairs: causal, inside the sliding window, same segment.

ALiBi: Press et al. 2021, "Train Short, Test Long". Soft-capping: Gemma 2.
Learned attention sinks (GPT-OSS): `softmax_with_sinks`.
"""

import math

import jax.numpy as jnp
import numpy as np


def visible(q_idx, kv_idx, q_seg=None, kv_seg=None, *, causal=True, window=None,
            num_memory=0):
  """Boolean mask, broadcasting over its inputs; True where q may attend kv.

  Args:
    q_idx, kv_idx: integer index arrays (broadcastable, e.g. [T, 1] and [1, S]).
    q_seg, kv_seg: segment ids of the same shapes, or None (one segment).
    causal: kv_idx <= q_idx.
    window: None, or w: q_idx - kv_idx < w (the query and the w-1 before it).
    num_memory: leading memory tokens, always visible, never attending out.
  """
  mask = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), bool)
  if causal:
    mask = mask & (kv_idx <= q_idx)
  if window is not None:
    mask = mask & (q_idx - kv_idx < window)
    if not causal:
      mask = mask & (kv_idx - q_idx < window)
  if q_seg is not None and kv_seg is not None:
    mask = mask & (q_seg == kv_seg)
  if num_memory:
    # Written with comparisons and |, & only (no select of a constant, no
    # logical not): the Mosaic GPU lowering has no 1-bit registers for those.
    mask = (kv_idx < num_memory) | (mask & (q_idx >= num_memory))
  return mask


def alibi_bias(slopes, q_idx, kv_idx, num_memory=0):
  """ALiBi bias -slope * |q - kv|; zero on memory keys. slopes broadcasts over heads."""
  distance = jnp.abs(q_idx - kv_idx).astype(jnp.float32)
  bias = -slopes * distance
  if num_memory:
    bias = jnp.where(kv_idx < num_memory, 0.0, bias)
  return bias


def softcap(logits, cap):
  """cap * tanh(logits / cap), or logits unchanged when cap is None."""
  if cap is None:
    return logits
  return cap * jnp.tanh(logits / cap)


def softcap_grad(capped, cap):
  """d softcap / d logits written in terms of the capped value: 1 - (capped/cap)^2."""
  if cap is None:
    return jnp.ones_like(capped)
  return 1.0 - jnp.square(capped / cap)


def softmax_with_sinks(logits, mask, sinks=None):
  """Softmax over the last axis of logits where mask, with an optional sink.

  p_j = exp(l_j) / (exp(s) + sum_k exp(l_k)): the sink s (broadcasting over
  logits without the last axis, e.g. one per head) is a key every query sees
  whose value is zero, so a row's weights sum to less than one. Masked entries
  get 0; a row with nothing visible gets all zeros, never NaN.
  """
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  if sinks is not None:
    row_max = jnp.maximum(row_max, sinks)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if sinks is not None:
    denom = denom + jnp.exp(sinks - row_max)
  return p / jnp.where(denom == 0, 1.0, denom)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The per-head slopes of the ALiBi paper, float32 [num_heads].

  For 2^k heads: 2^(-8 i / n), i = 1..n. Otherwise the paper's recipe: the slopes
  of the closest smaller power of two, then every other slope of twice that.
  """
  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    slopes = power_of_two(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, np.float32)


# Block skipping. A flash-attention kernel visits a (query block, key block)
# tile only if some pair in it may be visible, and skips the mask arithmetic on
# tiles where every pair is. The spans below bound, from the causal and window
# rules alone, which non-memory keys a run of queries can see (`kv_span`) or
# all see (`kv_full_span`), and likewise for queries (`q_span`,
# `q_full_span`); memory keys (index < num_memory) are visible to every query
# and are visited separately. The bounds work on Python ints and on traced
# int32 scalars (a kernel's program ids). A kernel applies `visible` inside
# every tile that is not provably full.


def kv_span(q_start, q_end, *, causal=True, window=None, kv_len):
  """[lo, hi): the keys that queries q_start..q_end-1 may see (memory aside)."""
  lo, hi = 0, kv_len
  if causal:
    hi = jnp.minimum(hi, q_end)
  elif window is not None:
    hi = jnp.minimum(hi, q_end + window - 1)
  if window is not None:
    lo = jnp.maximum(lo, q_start - window + 1)
  return lo, hi


def q_span(kv_start, kv_end, *, causal=True, window=None, q_len):
  """[lo, hi): the queries that may see keys kv_start..kv_end-1 (memory aside)."""
  lo, hi = 0, q_len
  if causal:
    lo = jnp.maximum(lo, kv_start)
  elif window is not None:
    lo = jnp.maximum(lo, kv_start - window + 1)
  if window is not None:
    hi = jnp.minimum(hi, kv_end + window - 1)
  return lo, hi


def kv_full_span(q_start, q_end, *, causal=True, window=None, kv_len):
  """[lo, hi): the keys that every query q_start..q_end-1 sees (memory aside; may be empty)."""
  lo, hi = 0, kv_len
  if causal:
    hi = jnp.minimum(hi, q_start + 1)
  elif window is not None:
    hi = jnp.minimum(hi, q_start + window)
  if window is not None:
    lo = jnp.maximum(lo, q_end - window)
  return lo, hi


def q_full_span(kv_start, kv_end, *, causal=True, window=None, q_len):
  """[lo, hi): the queries that see every key kv_start..kv_end-1 (memory aside; may be empty)."""
  lo, hi = 0, q_len
  if causal:
    lo = jnp.maximum(lo, kv_end - 1)
  elif window is not None:
    lo = jnp.maximum(lo, kv_end - window)
  if window is not None:
    hi = jnp.minimum(hi, kv_start + window)
  return lo, hi


def tile_full(q_start, q_end, kv_start, kv_end, *, causal=True, window=None,
              num_memory=0, kv_len):
  """Whether every pair of the tile is visible when segments are ignored.

  True only when `visible` (without segment ids) is True on the whole tile and
  every key is below kv_len, so a kernel may skip the mask there.
  """
  lo, hi = kv_full_span(q_start, q_end, causal=causal, window=window, kv_len=kv_len)
  full = (lo <= kv_start) & (kv_end <= hi)
  if num_memory:
    # Memory keys are visible to all; memory queries see nothing else.
    full = jnp.where(kv_end <= num_memory, kv_end <= kv_len,
                     full & (q_start >= num_memory))
  return full


def tile_visible(q_start, q_end, kv_start, kv_end, *, causal=True, window=None,
                 num_memory=0):
  """Whether the tile [q_start, q_end) x [kv_start, kv_end) may hold a visible pair.

  False only when `visible` is False on every element of the tile, so a kernel
  may skip the tile (no load, no matmul).
  """
  lo, hi = kv_span(q_start, q_end, causal=causal, window=window, kv_len=kv_end)
  in_span = (jnp.maximum(lo, kv_start) < hi)
  if num_memory:
    in_span = in_span | (kv_start < num_memory)
  return in_span
