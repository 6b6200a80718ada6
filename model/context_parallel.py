"""Context parallelism: attention over a sequence split across the `context` mesh axis.

With `mesh.context = c > 1` the trainer splits the residual stream's sequence
dimension over c devices (logical axis `sequence`), so every activation
outside attention is 1/c per device. Attention is the one place where
positions meet; `dot_product_attention` below runs it under `jax.shard_map`
over the trainer's mesh, each device computing the queries of its own
contiguous block of positions, in one of two ways (`model.context_parallel`):

- `allgather`: each device all-gathers K and V (and the key segment ids)
  over `context` and attends its queries over the whole sequence at their
  global positions (as Llama 3's context parallelism, Dubey et al. 2024).
  Simple; K/V of the whole sequence live on every device for the layer.
- `ring`: K/V blocks travel round the context ring with `ppermute`; each
  device folds one block at a time into an online softmax (running max,
  denominator and weighted sum, as flash attention), so it never holds more
  than two K/V blocks (ring attention, Liu et al. 2023). A block that no
  local query can see (later positions, keys outside a sliding window) is
  skipped with `lax.cond`. The causal order is plain, not load-balanced:
  the device holding the last positions folds every block while the first
  skips all but its own, so step time is that of the last device.

Both use global query and key indices, so the causal mask, sliding windows,
segment ids, ALiBi distances, memory tokens (the first `num_memory_tokens`
positions), logit soft-capping, GQA/MQA and attention sinks are those of
`attention_core.reference_attention`, which they equal to float rounding. A
sequence that does not divide by c (memory tokens add to it) is padded at
the end with keys of their own segment, which no real query sees.

Heads stay split over `tensor` when both query and KV heads divide by it. The
computation inside is the XLA one (float32 logits); `attention_impl`
'pallas' and 'cudnn' are refused with context parallelism, 'auto' uses it.
Outside the trainer's sharding context, or with c = 1, this is
`attention_core.dot_product_attention`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model import attention_core
from model import masking
from model import partitioning

AXIS = 'context'
MODES = ('allgather', 'ring')


def context_size() -> int:
  """The size of the installed mesh's `context` axis (1 outside the trainer)."""
  mesh = partitioning.current_mesh()
  return 1 if mesh is None else int(dict(mesh.shape).get(AXIS, 1))


def dot_product_attention(q, k, v, *, mode='allgather', impl='xla', segment_ids=None,
                          causal=True, sliding_window=None, alibi_slopes=None,
                          logit_softcap=None, scale=None, num_memory_tokens=0,
                          block_q=None, block_kv=None, sink_logits=None):
  """`attention_core.dot_product_attention`, split over `context` when it is > 1."""
  kwargs = dict(segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
                alibi_slopes=alibi_slopes, logit_softcap=logit_softcap, scale=scale,
                num_memory_tokens=num_memory_tokens, sink_logits=sink_logits)
  c = context_size()
  if c == 1:
    return attention_core.dot_product_attention(q, k, v, impl=impl, block_q=block_q,
                                                block_kv=block_kv, **kwargs)
  if mode not in MODES:
    raise ValueError(f'model.context_parallel={mode!r}: must be one of {", ".join(MODES)}')
  if impl not in ('auto', 'xla'):
    raise ValueError(f'model.attention_impl={impl!r} has no context-parallel path '
                     f'(mesh.context={c}); use attention_impl=xla or auto')
  return _sharded(q, k, v, mode=mode, mesh=partitioning.current_mesh(), c=c, **kwargs)


def _axes(spec_entry):
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _sharded(q, k, v, *, mode, mesh, c, segment_ids, causal, sliding_window,
             alibi_slopes, logit_softcap, scale, num_memory_tokens, sink_logits):
  b, t, n, h = q.shape
  kvh = k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  pad = (-t) % c
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if pad:
    # Padding keys get a segment of their own: no real query sees them.
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v = widen(q), widen(k), widen(v)
    seg = jnp.concatenate([seg, jnp.full((b, pad), jnp.min(seg) - 1, jnp.int32)], axis=1)
  # Batch and heads split as the trainer's rules split them elsewhere.
  q_spec = partitioning.partition_spec(('batch', None, 'heads', None), q.shape) or P()
  kv_spec = partitioning.partition_spec(('batch', None, 'kv_heads', None), k.shape) or P()
  batch = q_spec[0] if len(q_spec) > 0 else None
  heads = q_spec[2] if len(q_spec) > 2 else None
  kv_heads = kv_spec[2] if len(kv_spec) > 2 else None
  if heads is None or kv_heads is None or _axes(heads) != _axes(kv_heads):
    heads = kv_heads = None
  x_spec = P(batch, AXIS, heads, None)
  extras, extra_specs = {}, {}
  if alibi_slopes is not None:
    extras['slopes'], extra_specs['slopes'] = jnp.asarray(alibi_slopes, jnp.float32), P(heads)
  if sink_logits is not None:
    extras['sinks'], extra_specs['sinks'] = jnp.asarray(sink_logits, jnp.float32), P(heads)

  local = functools.partial(
      _ring_local if mode == 'ring' else _allgather_local, c=c, causal=causal,
      window=sliding_window, softcap=logit_softcap, scale=scale,
      num_memory=num_memory_tokens)
  out = jax.shard_map(
      local, mesh=mesh,
      in_specs=(x_spec, x_spec, x_spec, P(batch, AXIS), extra_specs),
      out_specs=x_spec)(q, k, v, seg, extras)
  return out[:, :t] if pad else out


def _allgather_local(q, k, v, seg, extras, *, c, causal, window, softcap, scale,
                     num_memory):
  """One device: its queries [b, t/c, n, h] over the gathered K/V [b, t, kv, h]."""
  del c
  tl = q.shape[1]
  start = jax.lax.axis_index(AXIS) * tl
  gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
  k_all, v_all, seg_all = gather(k), gather(v), gather(seg)
  return attention_core.reference_attention(
      q, k_all, v_all, segment_ids=seg, kv_segment_ids=seg_all, causal=causal,
      sliding_window=window, alibi_slopes=extras.get('slopes'), logit_softcap=softcap,
      scale=scale, num_memory_tokens=num_memory, q_idx=start + jnp.arange(tl),
      kv_idx=jnp.arange(k_all.shape[1]), sink_logits=extras.get('sinks'))


def _ring_local(q, k, v, seg, extras, *, c, causal, window, softcap, scale, num_memory):
  """One device: its queries over the K/V blocks passed round the ring.

  At step s this device holds the block of device (i - s) mod c; it folds
  that block into a running (max, denominator, weighted sum) per query row,
  unless no query here can see it, and hands the block on to device i + 1.
  """
  b, tl, n, h = q.shape
  kvh = k.shape[2]
  g = n // kvh
  i = jax.lax.axis_index(AXIS)
  q_idx = (i * tl + jnp.arange(tl))[:, None]                        # [tl, 1]
  qf = q.astype(jnp.float32).reshape(b, tl, kvh, g, h)
  q_seg = seg[:, None, None, :, None]
  slopes = extras.get('slopes')
  if slopes is not None:
    slopes = slopes.reshape(kvh, g, 1, 1)
  shift = [(j, (j + 1) % c) for j in range(c)]

  def fold(state, block):
    """Folds one K/V block (from device `src`) into the running softmax."""
    m_raw, m_ref, denom, acc = state
    k, v, kv_seg, src = block
    kv_idx = (src * tl + jnp.arange(tl))[None, :]                   # [1, tl]
    logits = jnp.einsum('btkgh,bskh->bkgts', qf, k.astype(jnp.float32)) * scale
    logits = masking.softcap(logits, softcap)
    if slopes is not None:
      logits = logits + masking.alibi_bias(slopes, q_idx, kv_idx, num_memory)
    mask = masking.visible(q_idx, kv_idx, q_seg, kv_seg[:, None, None, None, :],
                           causal=causal, window=window, num_memory=num_memory)
    logits = jnp.where(mask, logits, -jnp.inf)
    new_raw = jnp.maximum(m_raw, jnp.max(logits, axis=-1))
    new_ref = jnp.where(jnp.isfinite(new_raw), new_raw, 0.0)
    alpha = jnp.where(jnp.isfinite(m_raw), jnp.exp(m_ref - new_ref), 0.0)
    p = jnp.where(mask, jnp.exp(logits - new_ref[..., None]), 0.0)
    denom = alpha * denom + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum('bkgts,bskh->bkgth', p, v.astype(jnp.float32))
    return new_raw, new_ref, denom, acc

  # Running max (-inf until a key is seen), its finite stand-in, denominator
  # and weighted sum, per query row.
  state = (jnp.full((b, kvh, g, tl), -jnp.inf, jnp.float32),
           jnp.zeros((b, kvh, g, tl), jnp.float32),
           jnp.zeros((b, kvh, g, tl), jnp.float32),
           jnp.zeros((b, kvh, g, tl, h), jnp.float32))
  # Step 0 is the device's own block, which always holds a visible pair.
  state = fold(state, (k, v, seg, i))
  for s in range(1, c):
    k, v, seg = (jax.lax.ppermute(x, AXIS, shift) for x in (k, v, seg))
    src = (i - s) % c
    # Skip a block no query here can see (later positions under the causal
    # mask, keys beyond a sliding window): no matmul, no exp.
    seen = masking.tile_visible(i * tl, (i + 1) * tl, src * tl, (src + 1) * tl,
                                causal=causal, window=window, num_memory=num_memory)
    state = jax.lax.cond(seen, fold, lambda st, _: st, state, (k, v, seg, src))
  m_raw, m_ref, denom, acc = state

  sinks = extras.get('sinks')
  if sinks is not None:
    # The sink joins the denominator with no value (masking.softmax_with_sinks).
    sinks = sinks.reshape(kvh, g, 1)
    top = jnp.maximum(m_ref, sinks)
    rescale = jnp.exp(m_ref - top)
    acc = acc * rescale[..., None]
    denom = denom * rescale + jnp.exp(sinks - top)
  out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]         # [b, kv, g, tl, h]
  return jnp.moveaxis(out, 3, 1).reshape(b, tl, n, h).astype(q.dtype)
