"""What each layer keeps between decoding calls, and where a call's columns go.

A cached decoder call (`Decoder.hidden_states(..., cache=, chunk=)`) runs the
decoder's own embeddings and blocks on a chunk of new columns; each layer
reads and returns its own cache object, which the layer chooses
(`Attention.init_cache` returns a `KVCache`, `MLAttention.init_cache` a
`LatentCache` of the latent and the rope key; a layer with another state, a
recurrent one, returns its own pytree). The `Chunk` says
which token of each sequence every column is, the same for all layers.

`KVCache` holds K/V of the `num_kv_heads` heads only (GQA/MQA queries are
grouped onto them, as in `model.attention_core`). Its buffer is a `Ring` of
slots: the `num_memory_tokens` learned memory tokens (written once, always
visible), then, in streaming mode, the attention sinks, then a rolling part
where token j of a sequence (its index in its own prompt and continuation) is
written at slot `j % rolling` of that part:
- global layers roll over `prompt + max_new_tokens` slots, i.e. never;
- sliding-window layers roll over `sliding_window` slots (Mistral's rolling
  buffer, Jiang et al. 2023), so their memory does not grow with the length.
Each slot remembers which token it holds, so the masks, ALiBi distances and
positions are computed from token indices, exactly as in training
(`model.masking.visible`), whatever the slot order.

Streaming (`Streaming(sinks=N, window=W)`): StreamingLLM (Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks"). Every layer keeps
the first N tokens and a rolling window of the last W, and positions are
re-assigned inside the cache (`cache_position`): once more than N + W tokens
have been seen, the sinks keep positions 0..N-1 and the window takes
N..N+W-1. Keys are then stored before RoPE and rotated at attention time by
their cache positions (the paper's choice; re-rotating stored keys every step
would accumulate rounding).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class Ring(NamedTuple):
  """Static layout of one layer's cache buffer: [memory | sinks | rolling] slots.

  Token j is kept at slot `memory + j` while j < sinks, else at
  `memory + sinks + (j - sinks) % rolling`.
  """
  memory: int
  sinks: int
  rolling: int

  @property
  def size(self) -> int:
    return self.memory + self.sinks + self.rolling

  def slot(self, j):
    """The slot of token index j (int array, numpy or jax; j >= 0)."""
    xp = np if isinstance(j, np.ndarray) else jnp
    return self.memory + xp.where(
        j < self.sinks, j, self.sinks + (j - self.sinks) % self.rolling)


class Streaming(NamedTuple):
  """StreamingLLM's cache: `sinks` first tokens and the last `window` ones."""
  sinks: int
  window: int


def ring_for(sliding_window, length: int, num_memory: int = 0,
             streaming: Streaming | None = None) -> Ring:
  """The ring of a layer with window `sliding_window` (None: global) for up to
  `length` tokens (prompt + new)."""
  if streaming is not None:
    # Fewer slots than sinks + window when the generation is shorter.
    return Ring(num_memory, streaming.sinks,
                max(1, min(streaming.window, length - streaming.sinks)))
  if sliding_window is None:
    return Ring(num_memory, 0, length)
  return Ring(num_memory, 0, min(sliding_window, length))


def cache_position(j, seen, streaming: Streaming | None):
  """Position of token j once `seen` tokens have come (StreamingLLM's re-assignment).

  Outside streaming mode, or while seen <= sinks + window, that is j itself;
  later the window's tokens shift down so that the latest is at
  sinks + window - 1.
  """
  if streaming is None:
    return j
  shift = jnp.maximum(seen - streaming.sinks - streaming.window, 0)
  return jnp.where(j < streaming.sinks, j, j - shift)


@struct.dataclass
class Chunk:
  """The columns of one cached call, the same for every layer.

  tokens: int32 [b, c], the token index of each column in its own sequence;
    -1 for padding (left padding of a batch of prompts), which is not cached.
  prefill: the first call, from an empty cache: the decoder prepends its
    memory tokens and each layer attends over the chunk itself (the training
    path, any `attention_impl`). Later calls attend over the cache.
    A later chunk may hold several new columns per row (speculative
    decoding's verification): each attends over the cache and the chunk's
    earlier columns by token index, causally. On a global ring that is exact;
    a rolling ring smaller than the chunk's span would lose keys a column
    still needs, so speculative decoding refuses window layers.
  """
  tokens: jax.Array
  prefill: bool = struct.field(pytree_node=False, default=False)

  def seen(self):
    """int32 [b]: tokens of each sequence seen once this chunk is in."""
    return self.tokens[:, -1] + 1

  def positions(self, streaming: Streaming | None):
    """int32 [b, c]: the positions of the columns (0 on padding)."""
    seen = self.seen()[:, None]
    return jnp.maximum(cache_position(self.tokens, seen, streaming), 0)


class _RingSlots:
  """What every ring-buffered cache shares: where a chunk's columns go and the
  attention indices of its slots (fields `index`, `ring`, `streaming`)."""

  @property
  def rotate_late(self) -> bool:
    """Whether keys are stored before RoPE (their positions change: streaming)."""
    return self.streaming is not None

  def _put(self, chunk: Chunk, **arrays):
    """The cache with each named buffer's chunk columns [b, c, ...] in their slots.

    A prefill's columns start with the memory tokens'. Padding is dropped,
    and so are the tokens a later column of the same chunk overwrites (the
    start of a prompt longer than a window layer's ring).
    """
    ring = self.ring
    j = chunk.tokens
    last = j[:, -1:]
    keep = (j >= 0) & ((j < ring.sinks) | (j > last - ring.rolling))
    dest = jnp.where(keep, ring.slot(jnp.maximum(j, 0)), ring.size)
    held = j
    if chunk.prefill and ring.memory:
      b = j.shape[0]
      memory = jnp.broadcast_to(jnp.arange(ring.memory, dtype=dest.dtype), (b, ring.memory))
      dest = jnp.concatenate([memory, dest], axis=1)
      held = jnp.concatenate([jnp.zeros((b, ring.memory), j.dtype), j], axis=1)
    rows = jnp.arange(j.shape[0])[:, None]
    put = lambda buf, x: buf.at[rows, dest].set(x.astype(buf.dtype), mode='drop')
    new = {name: put(getattr(self, name), x) for name, x in arrays.items()}
    return self.replace(index=put(self.index, held), **new)

  def attention_indices(self, chunk: Chunk):
    """Indices for `reference_attention` of the chunk's queries over the cache.

    Returns q_idx [b, c], kv_idx [b, s], kv_segment_ids [b, s] (0 on empty
    slots) and kv_positions [b, s] (the slots' cache positions). Indices count
    the memory tokens first, as `model.masking` does.
    """
    m = self.ring.memory
    seen = chunk.seen()[:, None]
    q_idx = m + cache_position(chunk.tokens, seen, self.streaming)
    slots = jnp.arange(self.ring.size)[None, :]
    is_memory = slots < m
    kv_pos = jnp.where(is_memory | (self.index < 0), 0,
                       cache_position(self.index, seen, self.streaming))
    kv_idx = jnp.where(is_memory, slots, m + kv_pos)
    kv_seg = (is_memory | (self.index >= 0)).astype(jnp.int32)
    return q_idx, kv_idx, kv_seg, kv_pos

  def truncate(self, seen):
    """The cache with the slots of token indices >= seen [b] marked empty (-1):
    speculative decoding's rollback of rejected draft tokens. Memory slots
    (index 0) stay; the buffers keep their stale numbers, never read again."""
    return self.replace(index=jnp.where(self.index >= seen[:, None], -1, self.index))

  def data_bytes(self) -> int:
    """Bytes of the cached numbers (not the slots' token indices)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in self.data())

  def bytes_per_token(self) -> int:
    """Bytes one more cached token adds (per row)."""
    return sum(int(np.prod(x.shape[2:])) * x.dtype.itemsize for x in self.data())


@struct.dataclass
class KVCache(_RingSlots):
  """One attention layer's keys and values, kept in a `Ring` of slots.

  k, v: [b, ring.size, kv_heads, head_dim] in the compute dtype (keys before
    RoPE in streaming mode, rotated otherwise).
  index: int32 [b, ring.size]: the token index each slot holds; -1 while
    empty, 0 on memory slots.
  """
  k: jax.Array
  v: jax.Array
  index: jax.Array
  ring: Ring = struct.field(pytree_node=False)
  streaming: Streaming | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def empty(cls, batch, ring, kv_heads, head_dim, dtype, streaming=None):
    shape = (batch, ring.size, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.full((batch, ring.size), -1, jnp.int32), ring, streaming)

  def data(self):
    return (self.k, self.v)

  def write(self, k, v, chunk: Chunk):
    """The cache with the chunk's k, v [b, c, kv, h] in their slots (see `_put`)."""
    return self._put(chunk, k=k, v=v)


@struct.dataclass
class LatentCache(_RingSlots):
  """One MLA layer's cache (`model.mla`): the latent and the shared rope key.

  c_kv: [b, ring.size, kv_lora_rank], the normed latent.
  k_rope: [b, ring.size, qk_rope_head_dim], rotated (before RoPE in
    streaming mode, rotated at attention time by the slots' cache positions).
  index: as `KVCache.index`. The ring is the same as a `KVCache`'s would be
  (window layers roll, memory tokens first, streaming sinks).
  """
  c_kv: jax.Array
  k_rope: jax.Array
  index: jax.Array
  ring: Ring = struct.field(pytree_node=False)
  streaming: Streaming | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def empty(cls, batch, ring, rank, rope_dim, dtype, streaming=None):
    return cls(jnp.zeros((batch, ring.size, rank), dtype),
               jnp.zeros((batch, ring.size, rope_dim), dtype),
               jnp.full((batch, ring.size), -1, jnp.int32), ring, streaming)

  def data(self):
    return (self.c_kv, self.k_rope)

  def write(self, c_kv, k_rope, chunk: Chunk):
    """The cache with the chunk's c_kv [b, c, r] and k_rope [b, c, d_r] in their slots."""
    return self._put(chunk, c_kv=c_kv, k_rope=k_rope)


@struct.dataclass
class RecurrentCache:
  """One Gated DeltaNet layer's decoding state (`model.gdn`): constant size.

  state: float32 [b, heads, dk, dv], the delta-rule state H = S^T.
  conv: [b, conv_width - 1, channels] in the compute dtype, the last conv
    inputs (pre-convolution q|k|v projections) of each sequence; zeros before
    its first token.
  Padding columns (token index -1) change neither.
  """
  state: jax.Array
  conv: jax.Array

  @classmethod
  def empty(cls, batch, heads, dk, dv, conv_width, channels, dtype):
    return cls(jnp.zeros((batch, heads, dk, dv), jnp.float32),
               jnp.zeros((batch, conv_width - 1, channels), dtype))

  def data(self):
    return (self.state, self.conv)

  def data_bytes(self) -> int:
    """Bytes of the state and the conv buffer: the same at every length."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in self.data())

  def bytes_per_token(self) -> int:
    """0: the recurrent state does not grow with the sequence."""
    return 0

  def after_prefill(self, state, conv_inputs, chunk: Chunk):
    """The cache after a prefill: its final state and the last conv inputs
    [b, c, channels] of the chunk, zero on padding columns."""
    keep = self.conv.shape[1]
    x = jnp.where((chunk.tokens >= 0)[..., None], conv_inputs, 0).astype(self.conv.dtype)
    x = jnp.concatenate([self.conv, x], axis=1)[:, -keep:] if keep else self.conv
    return self.replace(state=state.astype(jnp.float32), conv=x)
