"""Differential attention (Ye et al. 2024, "Differential Transformer", section 2.1).

`model.attention_type='differential'` puts `DifferentialAttention` in every
block. The layer keeps standard attention's projections and shapes (W_q
[d, n, h], W_k and W_v [d, kv, h], W_o [n, h, d]) and pairs its n heads into
n/2 differential heads, as transformers' DiffLlama does. For differential head
j < n/2, with query heads j and j + n/2 and their (GQA) key/value heads:

  A1 = softmax(scale q_j k_j^T),  A2 = softmax(scale q_{j+n/2} k_{j+n/2}^T)
  V' = [v_j, v_{j+n/2}]                     (the two value heads side by side: dim 2h)
  o_j = (1 - lambda_init) RMSNorm_2h((A1 - lambda A2) V')
  lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init
  lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)),  l = 1, ..., L the layer

The paper's per-head dims (d for q/k, 2d for v, h = d_model / 2d heads) are
these: its head is our differential head, q/k of dim h, v of dim 2h. The
paper's l is 1-based; DiffLlama writes 0.8 - 0.6 exp(-0.3 layer_idx) with a
0-based layer_idx: the same numbers (lambda_init = 0.2 in the first layer),
which is what `lambda_init` computes from ablax's 0-based layer index. The
lambda vectors (of dim h, shared by the heads of a layer) start at N(0, 0.1^2)
as both. The per-head norm is an RMSNorm over each differential head's 2h
outputs without a learned scale (DiffLlama; the paper's code has one: its
`subln` gain, initialised to 1). The outputs [b, t, n/2, 2h] are read back as
[b, t, n, h] for W_o (differential head j's 2h features are rows 2j, 2j + 1 of
W_o), the order DiffLlama's o_proj sees them in.

The two maps are two calls of the ordinary attention kernel (xla or pallas,
with a value head dim 2h different from the q/k head dim h), sharing V'. With
kv key/value heads (kv even) query heads [0, n/2) use kv heads [0, kv/2) and
[n/2, n) use [kv/2, kv), so each call is GQA with the same group size; an odd
kv (MQA) repeats every K/V head twice first. Windows, segment ids, memory
tokens and the soft-cap apply to both maps; ALiBi gives both maps of
differential head j the slope j of n/2 heads; sinks are one per query head
(each map's softmax has its own). The elementwise output gate multiplies the
normed output channel by channel; the headwise gate is refused (it would gate
half a differential head). The KV cache is the standard one: K and V are
cached per layer as for `Attention`; a decode step runs the same two maps
through `attend_cache`.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention as attention_lib
from model import attention_core
from model import context_parallel
from model import masking

LAMBDA_STD = 0.1   # the lambda vectors' initial standard deviation (paper and DiffLlama)


def lambda_init(layer_index: int) -> float:
  """0.8 - 0.6 exp(-0.3 (l - 1)) for the 1-based layer l = layer_index + 1."""
  return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DifferentialAttention(attention_lib.Attention):
  """x [b, t, d] -> [b, t, d]; `layer_index` (0-based) sets lambda_init."""

  def __init__(self, cfg_model, *, layer_index: int = 0, sliding_window: int | None = None,
               rngs: nnx.Rngs):
    super().__init__(cfg_model, sliding_window=sliding_window, rngs=rngs)
    h = self.head_dim
    self.lambda_init = lambda_init(layer_index)
    self.norm_eps = cfg_model.norm_eps
    pdt = jnp.dtype(cfg_model.param_dtype)
    init = nnx.initializers.normal(LAMBDA_STD)
    self.lambda_q1 = nnx.Param(init(rngs.params(), (h,), pdt), logical_axes=('head_dim',))
    self.lambda_k1 = nnx.Param(init(rngs.params(), (h,), pdt), logical_axes=('head_dim',))
    self.lambda_q2 = nnx.Param(init(rngs.params(), (h,), pdt), logical_axes=('head_dim',))
    self.lambda_k2 = nnx.Param(init(rngs.params(), (h,), pdt), logical_axes=('head_dim',))

  def lambda_full(self):
    """The layer's lambda, a float32 scalar."""
    dot = lambda a, b: jnp.sum(a[...].astype(jnp.float32) * b[...].astype(jnp.float32))
    return (jnp.exp(dot(self.lambda_q1, self.lambda_k1))
            - jnp.exp(dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)

  def differential(self, attention, q, k, v):
    """Two maps of `attention(q, k, v, slopes, sinks)` -> their normed difference.

    q [b, t, n, h], k and v [b, s, kv, h]; returns [b, t, n, h] (the n/2 heads
    of 2h features, read as n heads of h).
    """
    b, t, n, h = q.shape
    if k.shape[2] % 2:
      k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    half_q, half_kv = n // 2, k.shape[2] // 2
    v2 = jnp.concatenate([v[:, :, :half_kv], v[:, :, half_kv:]], axis=-1)  # [b, s, kv/2, 2h]
    slopes = masking.alibi_slopes(half_q) if self.position == 'alibi' else None
    sinks = self.sink_logits()
    sink = lambda i: None if sinks is None else sinks[i * half_q:(i + 1) * half_q]
    o1 = attention(q[:, :, :half_q], k[:, :, :half_kv], v2, slopes, sink(0))
    o2 = attention(q[:, :, half_q:], k[:, :, half_kv:], v2, slopes, sink(1))
    o = o1.astype(jnp.float32) - self.lambda_full() * o2.astype(jnp.float32)
    o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + self.norm_eps)
    o = (1.0 - self.lambda_init) * o                                 # [b, t, n/2, 2h]
    return o.astype(q.dtype).reshape(b, t, n, h)

  def attend(self, q, k, v, *, segment_ids=None, num_memory_tokens=0):
    """Causal differential attention of q [b, t, n, h] over k, v [b, t, kv, h]."""
    def attention(q, k, v, slopes, sinks):
      return context_parallel.dot_product_attention(   # attention_core's below mesh.context > 1
          q, k, v, mode=self.context_parallel, impl=self.impl, segment_ids=segment_ids, causal=True,
          sliding_window=self.sliding_window, alibi_slopes=slopes,
          logit_softcap=self.logit_softcap, scale=self.scale,
          num_memory_tokens=num_memory_tokens, block_q=self.block_q,
          block_kv=self.block_kv, sink_logits=sinks)
    return self.differential(attention, q, k, v)

  def attend_cache(self, q, k, v, *, q_idx, kv_idx, kv_segment_ids, num_memory_tokens=0):
    """A decode step's differential attention over a cache's k, v."""
    def attention(q, k, v, slopes, sinks):
      return attention_core.reference_attention(
          q, k, v, segment_ids=jnp.ones_like(q_idx), kv_segment_ids=kv_segment_ids,
          q_idx=q_idx, kv_idx=kv_idx, causal=True, sliding_window=self.sliding_window,
          alibi_slopes=slopes, logit_softcap=self.logit_softcap, scale=self.scale,
          num_memory_tokens=num_memory_tokens, sink_logits=sinks)
    return self.differential(attention, q, k, v)


def differential_params(cfg_model) -> int:
  """Parameter count of one `DifferentialAttention`: `Attention`'s and 4 lambda vectors."""
  return attention_lib.attention_params(cfg_model) + 4 * _head_dim(cfg_model)


def pair_width(cfg_model) -> int:
  """Multiply-adds per (query, visible key) pair: n query heads, q.k over h, p.v over 2h."""
  return 3 * cfg_model.num_heads * _head_dim(cfg_model)


def _head_dim(cfg_model) -> int:
  return cfg_model.head_dim or cfg_model.d_model // cfg_model.num_heads


def is_differential(cfg_model) -> bool:
  return cfg_model.get('attention_type', 'standard') == 'differential'
