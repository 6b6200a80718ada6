"""Scaled dot-product attention: the XLA reference and the dispatch to kernels.

`dot_product_attention` is what the decoder's attention layer calls. With
`impl='xla'` it runs the reference below (plain jnp; the numerics every kernel
is tested against); `'pallas'` runs ablax's flash-attention kernel
(`model/kernels/`), `'cudnn'` jax's cuDNN path, and `'auto'` picks the kernel on
GPU/TPU and the reference on CPU.

GQA/MQA: queries are grouped as [batch, seq, kv_heads, group, head_dim] and
contracted against the shared K/V head, so K/V are never repeated in memory.
"""

import jax
import jax.numpy as jnp

from model import masking

IMPLS = ('auto', 'xla', 'pallas', 'cudnn')


def reference_attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None,
                        alibi_slopes=None, logit_softcap=None, scale=None,
                        num_memory_tokens=0, q_idx=None, kv_idx=None,
                        kv_segment_ids=None, sink_logits=None):
  """Attention computed in full, in float32.

  Args:
    q: [batch, q_len, num_heads, head_dim].
    k: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0.
    v: [batch, kv_len, num_kv_heads, v_head_dim]; v_head_dim may differ from
      head_dim (MLA).
    segment_ids: None or int [batch, q_len] (also the kv segments when
      kv_segment_ids is None; then q_len == kv_len).
    causal, sliding_window, num_memory_tokens: see `masking.visible`.
    alibi_slopes: None or float [num_heads].
    logit_softcap: None or cap (applied after scaling, before bias and mask).
    scale: None means 1/sqrt(head_dim).
    q_idx, kv_idx: None, or int [q_len] / [kv_len] indices in the attention
      sequence, or [batch, q_len] / [batch, kv_len] when they differ by row
      (a KV-cache step: `model.kv_cache.KVCache.attention_indices`); default
      arange.
    sink_logits: None or float [num_heads]: each head's learned sink logit,
      one more term exp(sink) in every row's softmax denominator, with no value
      (`masking.softmax_with_sinks`).
  Returns:
    [batch, q_len, num_heads, v_head_dim] in q's dtype. A query that sees no key
    (e.g. padding in its own segment of nothing) gets zeros, never NaN.
  """
  b, t, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  g = n // kvh
  scale = h ** -0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(b, t, kvh, g, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', qf, k.astype(jnp.float32)) * scale
  logits = masking.softcap(logits, logit_softcap)

  q_idx = jnp.arange(t) if q_idx is None else q_idx
  kv_idx = jnp.arange(s) if kv_idx is None else kv_idx
  if jnp.ndim(q_idx) == 2:                # per row: [b, 1, 1, t, 1], [b, 1, 1, 1, s]
    qi, ki = q_idx[:, None, None, :, None], kv_idx[:, None, None, None, :]
  else:
    qi, ki = q_idx[:, None], kv_idx[None, :]                # [t, 1], [1, s]
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(kvh, g, 1, 1)
    logits = logits + masking.alibi_bias(slopes, qi, ki, num_memory_tokens)
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  q_seg = None if segment_ids is None else segment_ids[:, None, None, :, None]
  kv_seg = None if kv_segment_ids is None else kv_segment_ids[:, None, None, None, :]
  mask = masking.visible(qi, ki, q_seg, kv_seg, causal=causal, window=sliding_window,
                         num_memory=num_memory_tokens)
  mask = jnp.broadcast_to(mask, logits.shape)

  sinks = None
  if sink_logits is not None:
    sinks = jnp.asarray(sink_logits, jnp.float32).reshape(kvh, g, 1, 1)
  p = masking.softmax_with_sinks(logits, mask, sinks)
  out = jnp.einsum('bkgts,bskh->btkgh', p, v.astype(jnp.float32))
  return out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)


def resolve_impl(impl: str) -> str:
  """'auto' -> 'pallas' on GPU/TPU, 'xla' on CPU."""
  if impl not in IMPLS:
    raise ValueError(f'model.attention_impl={impl!r}: must be one of {", ".join(IMPLS)}')
  if impl == 'auto':
    return 'xla' if jax.default_backend() == 'cpu' else 'pallas'
  return impl


def dot_product_attention(q, k, v, *, impl='xla', segment_ids=None, causal=True,
                          sliding_window=None, alibi_slopes=None, logit_softcap=None,
                          scale=None, num_memory_tokens=0, block_q=None, block_kv=None,
                          sink_logits=None):
  """Attention with the implementation `impl`; arguments as `reference_attention`.

  cuDNN has no sink term: with sink_logits, 'cudnn' is refused
  (configs.validate_model says so at load).
  """
  kwargs = dict(segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
                alibi_slopes=alibi_slopes, logit_softcap=logit_softcap, scale=scale,
                num_memory_tokens=num_memory_tokens)
  impl = resolve_impl(impl)
  if impl == 'xla':
    return reference_attention(q, k, v, sink_logits=sink_logits, **kwargs)
  if impl == 'pallas':
    from model import kernels  # pylint: disable=import-outside-toplevel
    return kernels.flash_attention(q, k, v, block_q=block_q, block_kv=block_kv,
                                   sink_logits=sink_logits, **kwargs)
  if sink_logits is not None:
    raise ValueError('attention sinks have no cuDNN path; use attention_impl=xla or pallas')
  from model.kernels import cudnn  # pylint: disable=import-outside-toplevel
  return cudnn.attention(q, k, v, **kwargs)
