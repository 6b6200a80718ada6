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
MODES = ('allgather', 'ring', 'ring_contiguous')


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
             alibi_slopes, logit_softcap, scale, num_memory_tokens, sink_logits,
             kernel=None, count_folds=False):
  """Pads, splits and runs `mode` under shard_map.

  kernel: None (the XLA fold) or a `_KernelCall` (the flash kernel per block).
  count_folds: also return the number of (query chunk, key chunk) pairs each
    device folded in, [c] (how the tests see the ring's balance).
  """
  b, t, n, h = q.shape
  scale = h ** -0.5 if scale is None else scale
  parts = 2 if (mode == 'ring' and causal) else 1
  pad = (-t) % (c * parts)
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

  mask = dict(causal=causal, window=sliding_window, num_memory=num_memory_tokens)
  local = functools.partial(_local, c=c, parts=parts, gather=mode == 'allgather', mask=mask,
                            softcap=logit_softcap, scale=scale, kernel=kernel)
  out, folds = jax.shard_map(
      local, mesh=mesh,
      in_specs=(x_spec, x_spec, x_spec, P(batch, AXIS), extra_specs),
      out_specs=(x_spec, P(AXIS)))(q, k, v, seg, extras)
  out = out[:, :t] if pad else out
  return (out, folds) if count_folds else out


# ------------------------------------------------------------- the zigzag layout
#
# The sequence is cut into 2c chunks. The trainer's layout gives device d the
# contiguous chunks 2d and 2d + 1; the load-balanced one gives it chunks d and
# 2c - 1 - d, an early and a late one, so under the causal mask every device
# has the same number of visible (query chunk, key chunk) pairs. Each device
# holds one even and one odd chunk in both layouts, so the change is two
# collective-permutes: one of the even chunks, one of the odd ones.


def _zigzag_home(chunk, c):
  """The device that holds `chunk` in the load-balanced layout."""
  return chunk if chunk < c else 2 * c - 1 - chunk


def _to_zigzag(x, c):
  """[b, 2h, ...] contiguous chunks (2d, 2d+1) -> zigzag chunks (d, 2c-1-d)."""
  hc = x.shape[1] // 2
  even = jax.lax.ppermute(x[:, :hc], AXIS, [(d, _zigzag_home(2 * d, c)) for d in range(c)])
  odd = jax.lax.ppermute(x[:, hc:], AXIS, [(d, _zigzag_home(2 * d + 1, c)) for d in range(c)])
  # Device d's early chunk d is the even one when d is even.
  d_even = jax.lax.axis_index(AXIS) % 2 == 0
  return jnp.where(d_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))


def _from_zigzag(x, c):
  """The inverse of `_to_zigzag`."""
  hc = x.shape[1] // 2
  first, second = x[:, :hc], x[:, hc:]
  d_even = jax.lax.axis_index(AXIS) % 2 == 0
  even = jnp.where(d_even, first, second)
  odd = jnp.where(d_even, second, first)
  even = jax.lax.ppermute(even, AXIS, [(_zigzag_home(2 * d, c), d) for d in range(c)])
  odd = jax.lax.ppermute(odd, AXIS, [(_zigzag_home(2 * d + 1, c), d) for d in range(c)])
  return jnp.concatenate([even, odd], 1)


def _chunk_ids(d, c, parts):
  """The global chunk indices (chunk length t / (c * parts)) device d holds."""
  return (d,) if parts == 1 else (d, 2 * c - 1 - d)


# ---------------------------------------------------------------- one device


def _local(q, k, v, seg, extras, *, c, parts, gather, mask, softcap, scale, kernel):
  """One device: its queries over every K/V block, block by block.

  allgather (`gather`): K/V of the whole sequence are all-gathered and the
  blocks are slices of it; ring: at step s this device holds the block of
  device (i - s) mod c and hands it on to device i + 1 afterwards. Within a
  block, each (query chunk, key chunk) pair that may hold a visible pair is
  folded into a running online softmax per query row (max, denominator,
  weighted sum, as flash attention); the others are skipped with `lax.cond`
  (no matmul, no exp).
  """
  i = jax.lax.axis_index(AXIS)
  if parts == 2:
    q, k, v, seg = (_to_zigzag(x, c) for x in (q, k, v, seg))
  b, tl, n, h = q.shape
  hc = tl // parts
  own = _chunk_ids(i, c, parts)
  q_idx = [own[a] * hc + jnp.arange(hc) for a in range(parts)]
  piece = lambda x, a: x[:, a * hc:(a + 1) * hc]
  if gather:
    k_all, v_all, seg_all = (jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
                             for x in (k, v, seg))
  block = lambda x_all, src: jax.lax.dynamic_slice_in_dim(x_all, src * tl, tl, axis=1)
  shift = [(j, (j + 1) % c) for j in range(c)]
  if kernel is not None:
    return kernel.run(q, k, v, seg, extras, c=c, parts=parts, gather=gather, mask=mask,
                      softcap=softcap, scale=scale)
  if gather:
    # The XLA path attends the local queries over the gathered sequence at once.
    out = attention_core.reference_attention(
        q, k_all, v_all, segment_ids=seg, kv_segment_ids=seg_all, causal=mask['causal'],
        sliding_window=mask['window'], alibi_slopes=extras.get('slopes'),
        logit_softcap=softcap, scale=scale, num_memory_tokens=mask['num_memory'],
        q_idx=q_idx[0], kv_idx=jnp.arange(k_all.shape[1]), sink_logits=extras.get('sinks'))
    return out, jnp.full((1,), c, jnp.int32)

  fold = functools.partial(_fold, mask=mask, softcap=softcap, scale=scale,
                           slopes=extras.get('slopes'))
  states = [_empty_state(b, k.shape[2], n // k.shape[2], hc, v.shape[3]) for _ in range(parts)]
  folds = jnp.zeros((), jnp.int32)
  for s in range(c):
    src = (i - s) % c
    if gather:
      kb, vb, segb = block(k_all, src), block(v_all, src), block(seg_all, src)
    else:
      if s:
        kb, vb, segb = (jax.lax.ppermute(x, AXIS, shift) for x in (kb, vb, segb))
      else:
        kb, vb, segb = k, v, seg
    theirs = _chunk_ids(src, c, parts)
    for a in range(parts):
      for e in sorted(range(parts), key=lambda e: e != a):     # the diagonal first
        kv_idx = theirs[e] * hc + jnp.arange(hc)
        operands = (piece(q, a), q_idx[a], piece(seg, a), piece(kb, e), piece(vb, e),
                    kv_idx, piece(segb, e))
        if s == 0 and a == e and not gather:
          # Each chunk's diagonal pair holds a visible pair (query = key).
          states[a] = fold(states[a], *operands)
          folds += 1
          continue
        seen = masking.tile_visible(own[a] * hc, (own[a] + 1) * hc, theirs[e] * hc,
                                    (theirs[e] + 1) * hc, **mask)
        states[a] = jax.lax.cond(seen, lambda st, *o: fold(st, *o), lambda st, *o: st,
                                 states[a], *operands)
        folds += seen.astype(jnp.int32)
  out = jnp.concatenate([_finish(st, extras.get('sinks'), q.dtype) for st in states], 1)
  if parts == 2:
    out = _from_zigzag(out, c)
  return out, folds[None]


def _empty_state(b, kvh, g, rows, hv):
  """Running max (-inf until a key is seen), its finite stand-in, denominator
  and weighted sum, per query row."""
  return (jnp.full((b, kvh, g, rows), -jnp.inf, jnp.float32),
          jnp.zeros((b, kvh, g, rows), jnp.float32),
          jnp.zeros((b, kvh, g, rows), jnp.float32),
          jnp.zeros((b, kvh, g, rows, hv), jnp.float32))


def _fold(state, q, q_idx, q_seg, k, v, kv_idx, kv_seg, *, mask, softcap, scale, slopes):
  """Folds one key chunk into the running softmax of one query chunk."""
  m_raw, m_ref, denom, acc = state
  b, rows, n, h = q.shape
  kvh = k.shape[2]
  g = n // kvh
  qi, ki = q_idx[:, None], kv_idx[None, :]                          # [rows, 1], [1, cols]
  qf = q.astype(jnp.float32).reshape(b, rows, kvh, g, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', qf, k.astype(jnp.float32)) * scale
  logits = masking.softcap(logits, softcap)
  if slopes is not None:
    logits = logits + masking.alibi_bias(slopes.reshape(kvh, g, 1, 1), qi, ki,
                                         mask['num_memory'])
  visible = masking.visible(qi, ki, q_seg[:, None, None, :, None],
                            kv_seg[:, None, None, None, :], **mask)
  logits = jnp.where(visible, logits, -jnp.inf)
  new_raw = jnp.maximum(m_raw, jnp.max(logits, axis=-1))
  new_ref = jnp.where(jnp.isfinite(new_raw), new_raw, 0.0)
  alpha = jnp.where(jnp.isfinite(m_raw), jnp.exp(m_ref - new_ref), 0.0)
  p = jnp.where(visible, jnp.exp(logits - new_ref[..., None]), 0.0)
  denom = alpha * denom + jnp.sum(p, axis=-1)
  acc = alpha[..., None] * acc + jnp.einsum('bkgts,bskh->bkgth', p, v.astype(jnp.float32))
  return new_raw, new_ref, denom, acc


def _finish(state, sinks, dtype):
  """The normalised output [b, rows, n, hv] of a running softmax."""
  _, m_ref, denom, acc = state
  b, kvh, g, rows, hv = acc.shape
  if sinks is not None:
    # The sink joins the denominator with no value (masking.softmax_with_sinks).
    sinks = sinks.reshape(kvh, g, 1)
    top = jnp.maximum(m_ref, sinks)
    rescale = jnp.exp(m_ref - top)
    acc = acc * rescale[..., None]
    denom = denom * rescale + jnp.exp(sinks - top)
  out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]         # [b, kv, g, rows, hv]
  return jnp.moveaxis(out, 3, 1).reshape(b, rows, kvh * g, hv).astype(dtype)
