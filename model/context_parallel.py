"""Context parallelism: attention over a sequence split across the `context` mesh axis.

With `mesh.context = c > 1` the trainer splits the residual stream's sequence
dimension over c devices (logical axis `sequence`), so every activation
outside attention is 1/c per device. Attention is the one place where
positions meet; `dot_product_attention` below runs it under `jax.shard_map`
over the trainer's mesh, each device computing the queries it holds, in one
of three ways (`model.context_parallel`):

- `allgather`: each device all-gathers K and V (and the key segment ids)
  over `context` and attends its contiguous block of queries over the whole
  sequence at their global positions (as Llama 3's context parallelism,
  Dubey et al. 2024). Simple; K/V of the whole sequence live on every device
  for the layer.
- `ring`: K/V blocks travel round the context ring with `ppermute`; each
  device folds one block at a time into an online softmax (running max,
  denominator and weighted sum, as flash attention), so it never holds more
  than two K/V blocks (ring attention, Liu et al. 2023). Under the causal
  mask the order is load-balanced ("zigzag", as Megatron-LM's and Llama 3's
  context parallelism lay the sequence out): the sequence is cut into 2c
  chunks and device d takes chunks d and 2c-1-d, one early and one late, so
  every device folds the same 2c + 1 visible (query chunk, key chunk) pairs
  of half-size chunks, every ring step costs the same on every device, and
  pairs no query can see are skipped (`lax.cond`: no matmul, no exp). The
  layout change is inside the layer: two collective-permutes per array in
  (q, k, v, segment ids) and two for the output, on top of the ring's c - 1
  hand-ons of K, V and segment ids.
- `ring_contiguous`: the same ring on the trainer's contiguous layout: the
  device holding the last positions folds all c blocks while the first
  skips all but its own, so a step takes as long as the last device's work;
  kept for comparison (and used for non-causal attention by `ring`, where
  the order makes no difference).

All use global query and key indices, so the causal mask, sliding windows,
segment ids, ALiBi distances, memory tokens (the first `num_memory_tokens`
positions), logit soft-capping, GQA/MQA and attention sinks are those of
`attention_core.reference_attention`, which they equal to float rounding. A
sequence that does not divide by c (2c for `ring`; memory tokens add to it)
is padded at the end with keys of their own segment, which no real query
sees.

Heads stay split over `tensor` when both query and KV heads divide by it.
`attention_impl`: 'xla' and 'auto' compute in jnp (float32 logits); 'pallas'
calls the flash kernel (`model/kernels/flash.py`, `chunk_forward` and
`chunk_backward`) once per visible chunk pair and merges the chunks by their
log-sum-exps; its backward runs the kernel's backward per chunk with the
merged output and lse. The kernel takes no index offsets, so with a sliding
window, ALiBi or memory tokens 'pallas' is refused (use 'xla' or 'auto');
'cudnn' is refused. Outside the trainer's sharding context, or with c = 1,
this is `attention_core.dot_product_attention`.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model import attention_core
from model import masking
from model import partitioning
from model.kernels import flash

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
  if impl == 'cudnn':
    raise ValueError(f"model.attention_impl='cudnn' has no context-parallel path "
                     f'(mesh.context={c}); use attention_impl=xla, auto or pallas')
  if impl == 'pallas':
    why = kernel_unsupported(**kwargs)
    if why:
      raise ValueError(f"model.attention_impl='pallas' with mesh.context={c}: the flash "
                       f'kernel has no context-parallel path with {why} (its mask depends '
                       'on global offsets the kernel does not take); use attention_impl=xla '
                       'or auto')
  return _sharded(q, k, v, mode=mode, mesh=partitioning.current_mesh(), c=c,
                  impl='pallas' if impl == 'pallas' else 'xla', block_q=block_q,
                  block_kv=block_kv, **kwargs)


def _axes(spec_entry):
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _sharded(q, k, v, *, mode, mesh, c, segment_ids, causal, sliding_window,
             alibi_slopes, logit_softcap, scale, num_memory_tokens, sink_logits,
             impl='xla', block_q=None, block_kv=None, count_folds=False):
  """Pads, splits and runs `mode` under shard_map.

  impl: 'xla' (the online softmax in jnp) or 'pallas' (the flash kernel per
    chunk pair; block_q, block_kv as `kernels.flash_attention`).
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
  kernel = None
  if impl == 'pallas':
    kernel = _plan_kernel(c=c, parts=parts, gather=mode == 'allgather', causal=causal,
                          segments=segment_ids is not None or pad > 0, softcap=logit_softcap,
                          scale=scale, rows=(t + pad) // (c * parts),
                          head_dim=max(h, v.shape[3]), block_q=block_q, block_kv=block_kv)
  local = functools.partial(_local, c=c, parts=parts, gather=mode == 'allgather', mask=mask,
                            softcap=logit_softcap, scale=scale, kernel=kernel)
  out, folds = jax.shard_map(
      local, mesh=mesh,
      in_specs=(x_spec, x_spec, x_spec, P(batch, AXIS), extra_specs),
      out_specs=(x_spec, P(AXIS)),
      # The kernel's custom VJP and Pallas calls carry no varying-axis types.
      check_vma=kernel is None)(q, k, v, seg, extras)
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
  """One device: its queries over every K/V block; returns (out, folds [1]).

  allgather (`gather`): K/V of the whole sequence are all-gathered; the XLA
  path attends to them at once, the kernel path block by block. Ring: at
  step s this device holds the block of device (i - s) mod c and hands it on
  to device i + 1 afterwards. Within a block, each (query chunk, key chunk)
  pair that may hold a visible pair is folded into a running online softmax
  per query row (max, denominator, weighted sum, as flash attention); the
  others are skipped with `lax.cond` (no matmul, no exp).
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
  if kernel is not None:
    kv = (k_all, v_all, seg_all) if gather else (k, v, seg)
    out = _kernel_attention(kernel, q, seg, *kv, extras.get('sinks'))
    if parts == 2:
      out = _from_zigzag(out, c)
    return out, jnp.zeros((1,), jnp.int32)     # folds are counted on the XLA path only
  if gather:
    # The XLA path attends the local queries over the gathered sequence at once.
    out = attention_core.reference_attention(
        q, k_all, v_all, segment_ids=seg, kv_segment_ids=seg_all, causal=mask['causal'],
        sliding_window=mask['window'], alibi_slopes=extras.get('slopes'),
        logit_softcap=softcap, scale=scale, num_memory_tokens=mask['num_memory'],
        q_idx=q_idx[0], kv_idx=jnp.arange(k_all.shape[1]), sink_logits=extras.get('sinks'))
    return out, jnp.full((1,), c, jnp.int32)

  shift = [(j, (j + 1) % c) for j in range(c)]
  fold = functools.partial(_fold, mask=mask, softcap=softcap, scale=scale,
                           slopes=extras.get('slopes'))
  states = [_empty_state(b, k.shape[2], n // k.shape[2], hc, v.shape[3]) for _ in range(parts)]
  folds = jnp.zeros((), jnp.int32)
  for s in range(c):
    src = (i - s) % c
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
        if s == 0 and a == e:
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
  # The running max only shifts the exponents (the result does not depend on
  # it): no gradient through it, and no -inf ever reaches an exp, so no
  # 0 * inf in the backward pass whatever XLA fuses.
  tile_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1)
  new_raw = jax.lax.stop_gradient(jnp.maximum(m_raw, tile_max))
  new_ref = jnp.where(jnp.isfinite(new_raw), new_raw, 0.0)
  alpha = jnp.where(jnp.isfinite(m_raw), jnp.exp(m_ref - new_ref), 0.0)
  shifted = jnp.where(visible, logits - new_ref[..., None], 0.0)
  p = jnp.where(visible, jnp.exp(shifted), 0.0)
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


# ------------------------------------------------------ the flash kernel per chunk
#
# With attention_impl='pallas' each (query chunk, key chunk) pair that the
# XLA path would fold is one call of the flash kernel (model/kernels/flash.py,
# `chunk_forward`), which returns the chunk's output and row log-sum-exp; the
# chunks merge by their lse (o = sum_j o_j exp(lse_j - lse), lse =
# logaddexp_j lse_j). The backward pass runs the kernel's backward on each
# chunk with the merged output and lse (`chunk_backward`); in the ring, each
# block's dK/dV accumulators travel with it and take one more hand-on home.
# The kernel takes no index offsets, so a chunk pair is either a diagonal one
# (same chunk: the causal mask in local indices is the global one) or a full
# one (an earlier chunk: every key visible but for segments); sliding
# windows, ALiBi and memory tokens, whose masks depend on the global offset,
# stay on the XLA path.


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of the kernel path on one device."""
  c: int
  parts: int
  gather: bool
  causal: bool
  segments: bool        # segment ids (or padding) present: rows may see nothing in a chunk
  softcap: Any
  scale: float
  backend: str
  interpret: Any
  head_dim_multiple: int
  blocks: tuple         # (block_q, block_kv, bwd_block_q, bwd_block_kv)

  def spec(self, causal, rows):
    return flash.block_spec(causal=causal, softcap=self.softcap, scale=self.scale,
                            q_len=rows, kv_len=rows, blocks=self.blocks,
                            backend=self.backend, interpret=self.interpret)


def kernel_unsupported(*, sliding_window=None, alibi_slopes=None, num_memory_tokens=0,
                       **unused):
  """Why the flash kernel cannot run under context parallelism, or None."""
  del unused
  if sliding_window is not None:
    return 'a sliding window'
  if alibi_slopes is not None:
    return 'ALiBi'
  if num_memory_tokens:
    return 'memory tokens'
  return None


def _plan_kernel(*, c, parts, gather, causal, segments, softcap, scale, rows, head_dim,
                 block_q, block_kv):
  from model import kernels  # pylint: disable=import-outside-toplevel
  backend, interpret, multiple = kernels._backend()  # pylint: disable=protected-access
  fwd, bwd = kernels.block_sizes(backend, head_dim, rows, rows, block_q, block_kv)
  return _Plan(c=c, parts=parts, gather=gather, causal=causal, segments=segments,
               softcap=softcap, scale=scale, backend=backend, interpret=interpret,
               head_dim_multiple=multiple, blocks=(*fwd, *bwd))


def _kind(plan, s, a, e, q_chunk, kv_chunk):
  """0: diagonal (causal kernel), 1: full (non-causal kernel), 2: skip; a
  Python int when known at trace time."""
  if not plan.causal:
    return 1
  if not plan.gather:
    if s == 0 and a == e:
      return 0
    # The ring meets its own chunks only there: the key chunk is earlier or later.
    return jnp.where(kv_chunk < q_chunk, 1, 2)
  return jnp.where(kv_chunk == q_chunk, 0, jnp.where(kv_chunk < q_chunk, 1, 2))


def _run(kind, branches):
  return branches[kind]() if isinstance(kind, int) else jax.lax.switch(kind, branches)


def _any_match(q_seg, kv_seg):
  """[b, rows]: whether each query's segment occurs among the chunk's keys."""
  keys = jnp.sort(kv_seg, axis=-1)
  at = jax.vmap(jnp.searchsorted)(keys, q_seg)
  return jnp.take_along_axis(keys, jnp.minimum(at, keys.shape[1] - 1), axis=1) == q_seg


def _merge(o, lse, o_b, lse_b):
  """Two partial softmaxes [b, rows, n, hv] with their lse [b, n, rows] as one."""
  new = jnp.logaddexp(lse, lse_b)
  ref = jnp.where(jnp.isfinite(new), new, 0.0)
  weight = lambda x: jnp.exp(x - ref).transpose(0, 2, 1)[..., None]
  return o * weight(lse) + o_b * weight(lse_b), new


def _block(plan, s, src, gathered, held):
  """The K/V arrays of step s: slices of the gathered ones (allgather), or the
  ring's `held` tuple (K, V, segments, and what travels with them) handed on
  one device."""
  if plan.gather:
    tl = gathered[0].shape[1] // plan.c
    return tuple(jax.lax.dynamic_slice_in_dim(x, src * tl, tl, axis=1) for x in gathered)
  if s:
    shift = [(j, (j + 1) % plan.c) for j in range(plan.c)]
    return tuple(jax.lax.ppermute(x, AXIS, shift) for x in held)
  return held


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_attention(plan, q, q_seg, k, v, kv_seg, sinks):
  return _kernel_forward(plan, q, q_seg, k, v, kv_seg, sinks)[0]


def _kernel_forward(plan, q, q_seg, k, v, kv_seg, sinks):
  i = jax.lax.axis_index(AXIS)
  b, tl, n, _ = q.shape
  hv = v.shape[3]
  hc = tl // plan.parts
  own = _chunk_ids(i, plan.c, plan.parts)
  piece = lambda x, a: x[:, a * hc:(a + 1) * hc]
  segs = lambda x: x if plan.segments else None
  o = [jnp.zeros((b, hc, n, hv), jnp.float32) for _ in range(plan.parts)]
  lse = [jnp.full((b, n, hc), -jnp.inf, jnp.float32) for _ in range(plan.parts)]
  held = (k, v, kv_seg)
  for s in range(plan.c):
    src = (i - s) % plan.c
    kb, vb, sb = held = _block(plan, s, src, (k, v, kv_seg), held)
    theirs = _chunk_ids(src, plan.c, plan.parts)
    for a in range(plan.parts):
      for e in range(plan.parts):
        qa, qsa, ke, ve, se = piece(q, a), piece(q_seg, a), piece(kb, e), piece(vb, e), piece(sb, e)

        def attend(causal, qa=qa, qsa=qsa, ke=ke, ve=ve, se=se):
          out_b, lse_b = flash.chunk_forward(plan.spec(causal, hc), qa, ke, ve, segs(qsa),
                                             segs(se), plan.head_dim_multiple)
          if plan.segments and not causal:
            # A row whose segment is not in the chunk saw nothing (lse 0 from the kernel).
            lse_b = jnp.where(_any_match(qsa, se)[:, None, :], lse_b, -jnp.inf)
          return out_b.astype(jnp.float32), lse_b

        skip = lambda: (jnp.zeros((b, hc, n, hv), jnp.float32),
                        jnp.full((b, n, hc), -jnp.inf, jnp.float32))
        out_b, lse_b = _run(_kind(plan, s, a, e, own[a], theirs[e]),
                            [lambda: attend(True), lambda: attend(False), skip])
        o[a], lse[a] = _merge(o[a], lse[a], out_b, lse_b)
  o, lse = jnp.concatenate(o, 1), jnp.concatenate(lse, 2)
  if sinks is not None:
    # The sink joins every row's denominator with no value (flash._with_sinks).
    with_sink = jnp.logaddexp(lse, sinks[None, :, None])
    o = o * jnp.exp(lse - with_sink).transpose(0, 2, 1)[..., None]
    lse = with_sink
  out = o.astype(q.dtype)
  return out, (q, q_seg, k, v, kv_seg, sinks, out, lse)


def _kernel_backward(plan, res, dout):
  q, q_seg, k, v, kv_seg, sinks, out, lse = res
  i = jax.lax.axis_index(AXIS)
  tl = q.shape[1]
  hc = tl // plan.parts
  own = _chunk_ids(i, plan.c, plan.parts)
  piece = lambda x, a: x[:, a * hc:(a + 1) * hc]
  segs = lambda x: x if plan.segments else None
  dq = [jnp.zeros(piece(q, a).shape, jnp.float32) for a in range(plan.parts)]
  f32 = lambda x: x.astype(jnp.float32)
  # The gathered dK/dV (allgather), or the travelling ones (ring).
  dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  held = (k, v, kv_seg, dk, dv)
  for s in range(plan.c):
    src = (i - s) % plan.c
    if plan.gather:
      kb, vb, sb = _block(plan, s, src, (k, v, kv_seg), None)
      dkb, dvb = jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32)
    else:
      kb, vb, sb, dkb, dvb = _block(plan, s, src, None, held)
    theirs = _chunk_ids(src, plan.c, plan.parts)
    for a in range(plan.parts):
      for e in range(plan.parts):
        args = (piece(q, a), piece(kb, e), piece(vb, e), segs(piece(q_seg, a)),
                segs(piece(sb, e)), piece(out, a), lse[:, :, a * hc:(a + 1) * hc],
                piece(dout, a))

        def grads(causal, args=args):
          return tuple(map(f32, flash.chunk_backward(plan.spec(causal, hc), *args,
                                                      plan.head_dim_multiple)))

        skip = lambda e=e: (jnp.zeros(dq[0].shape, jnp.float32),
                            jnp.zeros(piece(dkb, e).shape, jnp.float32),
                            jnp.zeros(piece(dvb, e).shape, jnp.float32))
        dq_ae, dk_ae, dv_ae = _run(_kind(plan, s, a, e, own[a], theirs[e]),
                                   [lambda: grads(True), lambda: grads(False), skip])
        dq[a] = dq[a] + dq_ae
        dkb = dkb.at[:, e * hc:(e + 1) * hc].add(dk_ae)
        dvb = dvb.at[:, e * hc:(e + 1) * hc].add(dv_ae)
    if plan.gather:
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
          acc, jax.lax.dynamic_slice_in_dim(acc, src * tl, tl, axis=1) + x, src * tl, axis=1)
      dk, dv = add(dk, dkb), add(dv, dvb)
    else:
      held = (kb, vb, sb, dkb, dvb)
      dk, dv = dkb, dvb
  if not plan.gather:
    # Each block's accumulators sit one device before its home: hand them on.
    shift = [(j, (j + 1) % plan.c) for j in range(plan.c)]
    dk, dv = (jax.lax.ppermute(x, AXIS, shift) for x in (dk, dv))
  dsinks = None
  if sinks is not None:
    # As flash._flash_bwd: -sum over rows of P_sink * rowsum(dO * O).
    delta = jnp.einsum('btnh,btnh->bnt', f32(out), f32(dout))
    dsinks = -jnp.sum(jnp.exp(sinks[None, :, None] - lse) * delta, axis=(0, 2))
  return (jnp.concatenate(dq, 1).astype(q.dtype), None, dk.astype(k.dtype),
          dv.astype(v.dtype), None, dsinks)


_kernel_attention.defvjp(_kernel_forward, _kernel_backward)
