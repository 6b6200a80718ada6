"""The multi-head attention layer: projections, QK-norm, RoPE, and the attention call.

Implements multi-head attention (Vaswani et al. 2017), grouped-query attention
(Ainslie et al. 2023, "GQA") and multi-query attention (Shazeer 2019), picked by
`num_kv_heads`; K/V keep their `num_kv_heads` heads all the way into
`attention_core`, which groups the queries instead of repeating K/V. Optional:
QK-norm (Dehghani et al. 2023; Qwen3), attention-logit soft-capping (Gemma 2),
a sliding window (Mistral; Gemma 2 alternates it with global layers), ALiBi
slopes, and learned memory tokens (their positions are handled by the decoder).

Two changes to the softmax attention itself, each a flag:
- `attention_gate` 'headwise' | 'elementwise': the attention output is
  multiplied by sigmoid(x W_g) before the output projection, x the layer's input,
  one gate per head or per (head, channel) (Qiu et al. 2025, "Gated Attention for
  Large Language Models"; Qwen3-Next's gate is the elementwise one).
- `attention_sinks`: one learned logit per head joins every softmax denominator,
  a key that every query sees and that carries no value (as GPT-OSS; Xiao et al.
  2023, "StreamingLLM", observed that trained models make such a sink themselves).

The layer is split into `project` (q/k/v with norms and rotary positions),
`attend` and `output`. Called with `cache=` (a `model.kv_cache.KVCache` from
`init_cache`) and `chunk=`, it writes the new K/V into the cache between the
first two and returns the updated cache with its output: a prefill attends
over its own columns (the training path), a decode step over the cache with
the reference attention and each slot's token index (`attention_indices`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention_core
from model import context_parallel
from model import kv_cache as kv_cache_lib
from model import masking
from model import mlp as mlp_lib
from model import mup
from model import norms
from model import positions as positions_lib


class Attention(nnx.Module):
  """x [b, t, d] -> [b, t, d]; `sliding_window` is this layer's window (None: global)."""

  def __init__(self, cfg_model, *, sliding_window: int | None = None, rngs: nnx.Rngs):
    d, n, kv = cfg_model.d_model, cfg_model.num_heads, cfg_model.num_kv_heads
    h = cfg_model.head_dim or d // n
    self.num_heads, self.num_kv_heads, self.head_dim = n, kv, h
    self.dtype = jnp.dtype(cfg_model.dtype)
    self.sliding_window = sliding_window
    self.position = cfg_model.position
    self.rope_theta = cfg_model.rope_theta
    self.rope_dim = positions_lib.rotary_dim(h, cfg_model.get('rope_fraction', 1.0))
    scaling = cfg_model.rope_scaling
    # Static module data must be hashable: keep the scaling as sorted items.
    self.rope_scaling = None if scaling is None else tuple(sorted(scaling.items()))
    self.scale = mup.attention_scale(cfg_model, h)
    self.logit_softcap = cfg_model.attn_logit_softcap
    self.impl = cfg_model.attention_impl
    self.context_parallel = cfg_model.get('context_parallel', 'allgather')
    self.block_q = cfg_model.get('attention_block_q')
    self.block_kv = cfg_model.get('attention_block_kv')
    self.use_bias = cfg_model.use_bias

    pdt = jnp.dtype(cfg_model.param_dtype)
    w_in = nnx.initializers.normal(mup.hidden_std(cfg_model, 0.02))
    w_out = nnx.initializers.normal(mup.hidden_std(cfg_model, mlp_lib.out_init_stddev(cfg_model)))
    self.wq = nnx.Param(w_in(rngs.params(), (d, n, h), pdt),
                        logical_axes=('embed', 'heads', 'head_dim'))
    self.wk = nnx.Param(w_in(rngs.params(), (d, kv, h), pdt),
                        logical_axes=('embed', 'kv_heads', 'head_dim'))
    self.wv = nnx.Param(w_in(rngs.params(), (d, kv, h), pdt),
                        logical_axes=('embed', 'kv_heads', 'head_dim'))
    self.wo = nnx.Param(w_out(rngs.params(), (n, h, d), pdt),
                        logical_axes=('heads', 'head_dim', 'embed'))
    if self.use_bias:
      self.bq = nnx.Param(jnp.zeros((n, h), pdt), logical_axes=('heads', 'head_dim'))
      self.bk = nnx.Param(jnp.zeros((kv, h), pdt), logical_axes=('kv_heads', 'head_dim'))
      self.bv = nnx.Param(jnp.zeros((kv, h), pdt), logical_axes=('kv_heads', 'head_dim'))
      self.bo = nnx.Param(jnp.zeros((d,), pdt), logical_axes=('embed',))
    self.qk_norm = cfg_model.qk_norm
    if self.qk_norm:
      # One norm over head_dim, shared by all heads (as Qwen3 and Gemma 3).
      self.q_norm = norms.make_norm(cfg_model, h)
      self.k_norm = norms.make_norm(cfg_model, h)
    self.gate = cfg_model.get('attention_gate', 'none')
    if self.gate == 'headwise':
      self.wg = nnx.Param(w_in(rngs.params(), (d, n), pdt), logical_axes=('embed', 'heads'))
    elif self.gate == 'elementwise':
      self.wg = nnx.Param(w_in(rngs.params(), (d, n, h), pdt),
                          logical_axes=('embed', 'heads', 'head_dim'))
    if cfg_model.get('attention_sinks', False):
      # Logit 0 at init: the sink starts as one more key of average score.
      self.sinks = nnx.Param(jnp.zeros((n,), pdt), logical_axes=('heads',))
    else:
      self.sinks = None

  def _proj(self, x, w, b):
    y = jnp.einsum('btd,dnh->btnh', x, w[...].astype(self.dtype))
    if self.use_bias:
      y = y + b[...].astype(self.dtype)
    return y

  def project(self, x, positions):
    """q [b, t, n, h] and k, v [b, t, kv, h], normed and rotated at positions [b, t].

    positions=None leaves q and k unrotated, for a cache that stores keys before
    RoPE and rotates them later with `rotate` (StreamingLLM's cache positions).
    """
    x = x.astype(self.dtype)
    bias = lambda name: getattr(self, name) if self.use_bias else None
    q = self._proj(x, self.wq, bias('bq'))
    k = self._proj(x, self.wk, bias('bk'))
    v = self._proj(x, self.wv, bias('bv'))
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if positions is not None:
      q, k = self.rotate(q, positions), self.rotate(k, positions)
    return q, k, v

  def rotate(self, x, positions):
    """RoPE on x [b, t, heads, h] at int positions [b, t]; x itself for other positions."""
    if self.position != 'rope':
      return x
    scaling = None if self.rope_scaling is None else dict(self.rope_scaling)
    cos, sin = positions_lib.rope_cos_sin(positions, self.rope_dim, self.rope_theta, scaling)
    return positions_lib.apply_rope(x, cos, sin)

  def attend(self, q, k, v, *, segment_ids=None, num_memory_tokens=0):
    """Causal attention of q over k, v; [b, t, n, h]."""
    slopes = None
    if self.position == 'alibi':
      slopes = masking.alibi_slopes(self.num_heads)
    return context_parallel.dot_product_attention(   # attention_core's below mesh.context > 1
        q, k, v, mode=self.context_parallel, impl=self.impl, segment_ids=segment_ids, causal=True,
        sliding_window=self.sliding_window, alibi_slopes=slopes,
        logit_softcap=self.logit_softcap, scale=self.scale,
        num_memory_tokens=num_memory_tokens, block_q=self.block_q,
        block_kv=self.block_kv, sink_logits=self.sink_logits())

  def sink_logits(self):
    """The per-head sink logits float32 [n], or None without sinks."""
    return None if self.sinks is None else self.sinks[...].astype(jnp.float32)

  def apply_gate(self, o, x):
    """o [b, t, n, h] times sigmoid(x W_g), x [b, t, d] the layer's input."""
    if self.gate == 'none':
      return o
    w = self.wg[...].astype(self.dtype)
    x = x.astype(self.dtype)
    if self.gate == 'headwise':
      g = jnp.einsum('btd,dn->btn', x, w)[..., None]     # [b, t, n, 1]
    else:
      g = jnp.einsum('btd,dnh->btnh', x, w)              # [b, t, n, h]
    return o * jax.nn.sigmoid(g.astype(jnp.float32)).astype(o.dtype)

  def output(self, o, x):
    """Gated heads back to the model width: o [b, t, n, h], input x [b, t, d] -> [b, t, d]."""
    o = self.apply_gate(o, x)
    y = jnp.einsum('btnh,nhd->btd', o.astype(self.dtype), self.wo[...].astype(self.dtype))
    if self.use_bias:
      y = y + self.bo[...].astype(self.dtype)
    return y

  def init_cache(self, batch, length, *, num_memory_tokens=0, streaming=None):
    """An empty `KVCache` for up to `length` tokens (ring: this layer's window)."""
    ring = kv_cache_lib.ring_for(self.sliding_window, length, num_memory_tokens, streaming)
    return kv_cache_lib.KVCache.empty(batch, ring, self.num_kv_heads, self.head_dim,
                                      self.dtype, streaming)

  def __call__(self, x, positions, segment_ids=None, num_memory_tokens=0, *,
               cache=None, chunk=None):
    """x [b, t, d] -> [b, t, d]; with a cache, (output, updated cache)."""
    if cache is not None:
      return self._cached(x, positions, segment_ids, num_memory_tokens, cache, chunk)
    with jax.named_scope('qkv'):
      q, k, v = self.project(x, positions)
    with jax.named_scope('attention'):
      o = self.attend(q, k, v, segment_ids=segment_ids,
                      num_memory_tokens=num_memory_tokens)
    with jax.named_scope('out'):
      return self.output(o, x)

  def _cached(self, x, positions, segment_ids, num_memory_tokens, cache, chunk):
    late = cache.rotate_late
    with jax.named_scope('qkv'):
      q, k, v = self.project(x, None if late else positions)
      if late:
        q = self.rotate(q, positions)
    cache = cache.write(k, v, chunk)
    with jax.named_scope('attention'):
      if chunk.prefill:
        if late:
          k = self.rotate(k, positions)
        o = self.attend(q, k, v, segment_ids=segment_ids,
                        num_memory_tokens=num_memory_tokens)
      else:
        q_idx, kv_idx, kv_seg, kv_pos = cache.attention_indices(chunk)
        k = self.rotate(cache.k, kv_pos) if late else cache.k
        o = self.attend_cache(q, k, cache.v, q_idx=q_idx, kv_idx=kv_idx,
                              kv_segment_ids=kv_seg, num_memory_tokens=num_memory_tokens)
    with jax.named_scope('out'):
      return self.output(o, x), cache

  def attend_cache(self, q, k, v, *, q_idx, kv_idx, kv_segment_ids, num_memory_tokens=0):
    """A decode step's attention of q over a cache's k, v at its slots' token indices."""
    slopes = masking.alibi_slopes(self.num_heads) if self.position == 'alibi' else None
    return attention_core.reference_attention(
        q, k, v, segment_ids=jnp.ones_like(q_idx), kv_segment_ids=kv_segment_ids,
        q_idx=q_idx, kv_idx=kv_idx, causal=True, sliding_window=self.sliding_window,
        alibi_slopes=slopes, logit_softcap=self.logit_softcap, scale=self.scale,
        num_memory_tokens=num_memory_tokens, sink_logits=self.sink_logits())


def attention_params(cfg_model) -> int:
  """Parameter count of one `Attention` (for `model.flops`)."""
  d, n, kv = cfg_model.d_model, cfg_model.num_heads, cfg_model.num_kv_heads
  h = cfg_model.head_dim or d // n
  count = 2 * d * n * h + 2 * d * kv * h
  if cfg_model.use_bias:
    count += n * h + 2 * kv * h + d
  if cfg_model.qk_norm:
    count += 2 * norms.norm_params(cfg_model.norm_type, h)
  count += gate_params(cfg_model)
  if cfg_model.get('attention_sinks', False):
    count += n
  return count


def gate_params(cfg_model) -> int:
  """Weights of the output gate W_g (also its matmul's weights per position)."""
  d, n = cfg_model.d_model, cfg_model.num_heads
  h = cfg_model.head_dim or d // n
  return {'none': 0, 'headwise': d * n,
          'elementwise': d * n * h}[cfg_model.get('attention_gate', 'none')]
