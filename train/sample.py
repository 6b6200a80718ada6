"""Autoregressive sampling with a KV cache; `python -m train.sample`.

    python -m train.sample --workdir DIR --prompt TEXT [--max_new_tokens N
        --temperature T --top_k K --top_p P --streaming_sinks N
        --streaming_window W]

The cache holds, per layer, K/V of the `num_kv_heads` heads only (GQA/MQA
queries are grouped onto them, as in `model.attention_core`). Each layer's
buffer is a `Ring` of slots: the `num_memory_tokens` learned memory tokens
(written once, always visible), then, in streaming mode, the attention sinks,
then a rolling part where token j of a sequence (its index in its own prompt
and continuation) is written at slot `j % rolling` of that part:
- global layers roll over `prompt + max_new_tokens` slots, i.e. never;
- sliding-window layers (every layer unless `global_layer_interval` makes it
  global) roll over `sliding_window` slots (Mistral's rolling buffer, Jiang
  et al. 2023), so their memory does not grow with the generation length.
Each slot remembers which token it holds, so the masks, ALiBi distances and
positions are computed from token indices, exactly as in training
(`model.masking.visible`: causal, sliding window, memory keys always
visible, padding and empty slots invisible), whatever the slot order.

A prefill runs the memory and the (left-padded) prompts in one call, attending
over the whole prompt with the training mask, and writes into each ring the
tokens it will still need (the last `sliding_window` of a long prompt on a
window layer). Each new token is then one call of a `jax.jit`-compiled step
with fixed shapes and a donated cache.

Streaming (`streaming_sinks=N`): StreamingLLM (Xiao et al. 2023, "Efficient
Streaming Language Models with Attention Sinks"). Every layer keeps the first
N tokens (the attention sinks) and a rolling window of the last W tokens
(`streaming_window`; default the model's `sliding_window`, else
`max_seq_len - N`), and positions are re-assigned inside the cache: once
more than N + W tokens have been seen, the sinks keep positions 0..N-1 and
the window takes N..N+W-1, so positions never pass N + W - 1 and generation
can run for ever. The step's logits equal those of the full model run on
[sinks + last W tokens] with fresh positions 0..N+W-1 (exactly so for one
layer; deeper layers keep the K/V computed when each token came, as in the
paper). Keys are stored before RoPE and rotated at attention time by their
cache positions (the paper's choice; re-rotating stored keys every step would
accumulate rounding); ALiBi distances and learned/sinusoidal positions use
cache positions too. A window layer keeps its own window over cache
positions, so it sees the sinks only while they are inside it. In streaming
mode a prompt longer than N + W is prefilled up to N + W tokens and then
fed token by token, so it is streamed exactly as a generated text.

Decoding: greedy (temperature 0), or temperature sampling restricted to the
top-k tokens and/or the top-p nucleus (Holtzman et al. 2019). Generation
stops at EOS or after `max_new_tokens`; tokens are streamed to a callback
(the console for the command line) as they come.
"""

import functools
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import errors
from configs.errors import UserError
from model import decoder as decoder_lib
from model import masking


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
    xp = jnp if isinstance(j, jax.Array) else np
    return self.memory + xp.where(
        j < self.sinks, j, self.sinks + (j - self.sinks) % self.rolling)


class Streaming(NamedTuple):
  """StreamingLLM's cache: `sinks` first tokens and the last `window` ones."""
  sinks: int
  window: int


class Generation(NamedTuple):
  """What `generate(..., full_output=True)` returns."""
  tokens: list          # per prompt, the new token ids (up to and with EOS)
  logits: np.ndarray    # float32 [batch, steps, vocab]: the logits each token was drawn from
  cache: Any            # the final cache (see `init_cache`)


def streaming_config(cfg_model, sinks=None, window=None):
  """The `Streaming` of the flags, None when off; ValueError on bad values."""
  if sinks is None:
    if window is not None:
      raise ValueError('streaming_window is set but streaming_sinks is not: the '
                       'window is that of StreamingLLM mode (streaming_sinks=N, N >= 0)')
    return None
  if sinks < 0:
    raise ValueError(f'streaming_sinks={sinks}: must be >= 0')
  if window is None:
    window = cfg_model.sliding_window or cfg_model.max_seq_len - sinks
  if window < 1:
    raise ValueError(f'streaming_window={window} (streaming_sinks={sinks}, model.max_seq_len='
                     f'{cfg_model.max_seq_len}): must be >= 1')
  return Streaming(int(sinks), int(window))


def cache_layout(cfg_model, length: int, streaming: Streaming | None = None):
  """One `Ring` per layer for sequences of up to `length` tokens (prompt + new)."""
  m = cfg_model.num_memory_tokens
  if streaming is not None:
    # Fewer slots than sinks + window when the generation is shorter.
    rolling = max(1, min(streaming.window, length - streaming.sinks))
    return tuple(Ring(m, streaming.sinks, rolling) for _ in range(cfg_model.num_layers))
  rings = []
  for i in range(cfg_model.num_layers):
    if decoder_lib.is_global_layer(cfg_model, i):
      rings.append(Ring(m, 0, length))
    else:
      rings.append(Ring(m, 0, min(cfg_model.sliding_window, length)))
  return tuple(rings)


def init_cache(cfg_model, batch: int, length: int, *, streaming_sinks=None,
               streaming_window=None):
  """Per layer, K/V [batch, ring.size, kv_heads, head_dim] and `pos` int32 [batch, ring.size].

  `pos` is the token index held by each slot: -1 while empty, 0 on memory slots.
  """
  streaming = streaming_config(cfg_model, streaming_sinks, streaming_window)
  return _empty_cache(cfg_model, batch, cache_layout(cfg_model, length, streaming))


def _empty_cache(cfg_model, batch, layout):
  h = cfg_model.head_dim or cfg_model.d_model // cfg_model.num_heads
  dtype = jnp.dtype(cfg_model.dtype)
  layers = []
  for ring in layout:
    shape = (batch, ring.size, cfg_model.num_kv_heads, h)
    layers.append({'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
                   'pos': jnp.full((batch, ring.size), -1, jnp.int32)})
  return {'layers': layers}


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


def _attend(attn, q, k, v, q_idx, kv_idx, kv_seg, num_memory):
  """q [b, t, n, h] at indices q_idx [b, t] over k, v [b, s, kv, h] at kv_idx [b, s].

  Indices count memory first (as `model.masking`); keys with kv_seg 0 are
  invisible.
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  scale = h ** -0.5 if attn.scale is None else attn.scale
  qf = q.astype(jnp.float32).reshape(b, t, kv, g, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', qf, k.astype(jnp.float32)) * scale
  logits = masking.softcap(logits, attn.logit_softcap)
  qi = q_idx[:, None, None, :, None]    # [b, 1, 1, t, 1]
  ki = kv_idx[:, None, None, None, :]   # [b, 1, 1, 1, s]
  if attn.position == 'alibi':
    slopes = jnp.asarray(masking.alibi_slopes(n)).reshape(kv, g)[None, :, :, None, None]
    logits = logits + masking.alibi_bias(slopes, qi, ki, num_memory)
  mask = masking.visible(qi, ki, jnp.ones_like(qi), kv_seg[:, None, None, None, :],
                         causal=True, window=attn.sliding_window, num_memory=num_memory)
  sinks = attn.sink_logits()
  if sinks is not None:
    sinks = sinks.reshape(kv, g)[None, :, :, None, None]
  probs = masking.softmax_with_sinks(logits, mask, sinks)
  o = jnp.einsum('bkgts,bskh->btkgh', probs, v.astype(jnp.float32))
  return o.reshape(b, t, n, h).astype(q.dtype)


def _run_blocks(decoder, x, attn_fn):
  """The decoder's blocks with attention replaced by attn_fn(layer_index, attn, y)."""
  for i, block in enumerate(decoder.blocks):
    attn = functools.partial(attn_fn, i, block.attn)
    ffn = lambda y, block=block: block._ffn(y)[0]  # pylint: disable=protected-access
    dtype = x.dtype
    with jax.named_scope(f'layer_{i}'):
      if block.norm_position == 'pre':
        x = x + attn(block.attn_norm(x)).astype(dtype)
        x = x + ffn(block.mlp_norm(x)).astype(dtype)
      elif block.norm_position == 'post':
        x = block.attn_norm(x + attn(x).astype(dtype))
        x = block.mlp_norm(x + ffn(x).astype(dtype))
      else:
        x = x + block.attn_out_norm(attn(block.attn_norm(x))).astype(dtype)
        x = x + block.mlp_out_norm(ffn(block.mlp_norm(x))).astype(dtype)
  return x


def _prefill_dest(ring, pads, width):
  """Slots int32 [b, memory + width] for the prefill's columns; ring.size = not kept.

  Column c of row i is token j = c - pads[i]; padding is dropped, and so are
  the tokens a later column of the same chunk overwrites (scatter indices
  must be unique).
  """
  m = ring.memory
  j = np.arange(width)[None, :] - np.asarray(pads)[:, None]   # [b, width]
  last = width - 1 - np.asarray(pads)[:, None]
  keep = (j >= 0) & ((j < ring.sinks) | (j > last - ring.rolling))
  dest = np.where(keep, ring.slot(np.maximum(j, 0)), ring.size)
  memory = np.broadcast_to(np.arange(m), (len(pads), m))
  return np.concatenate([memory, dest], axis=1).astype(np.int32)


def _prefill(decoder, layout, streaming, cache, tokens, positions, seg, dests):
  """Memory + tokens [b, t] (positions, seg [b, t]) from an empty cache.

  Attends over the chunk itself; returns (logits of the last column [b, vocab], cache).
  """
  b, t = tokens.shape
  m = decoder.num_memory_tokens
  x = decoder.embed_tokens(tokens, positions)
  if m:
    memory = jnp.broadcast_to(decoder.memory[...].astype(decoder.dtype), (b, m, decoder.d_model))
    x = jnp.concatenate([memory, x], axis=1)
    positions = jnp.concatenate([jnp.zeros((b, m), positions.dtype), positions], axis=1)
    seg = jnp.concatenate([jnp.ones((b, m), seg.dtype), seg], axis=1)
  # Masks and ALiBi run on column indices: distances between real tokens are
  # those of their token indices, and padding has segment 0.
  idx = jnp.broadcast_to(jnp.arange(m + t), (b, m + t))
  rows = jnp.arange(b)[:, None]
  new_layers = [None] * len(layout)

  def attn_fn(i, attn, y):
    layer, dest = cache['layers'][i], dests[layout[i]]
    if streaming is None:
      q, k, v = attn.project(y, positions)
      k_store = k
    else:
      q, k_store, v = attn.project(y, None)
      q, k = attn.rotate(q, positions), attn.rotate(k_store, positions)
    new_layers[i] = {
        'k': layer['k'].at[rows, dest].set(k_store.astype(layer['k'].dtype), mode='drop'),
        'v': layer['v'].at[rows, dest].set(v.astype(layer['v'].dtype), mode='drop'),
        'pos': layer['pos'].at[rows, dest].set(positions, mode='drop')}
    return attn.output(_attend(attn, q, k, v, idx, idx, seg, m), y)

  x = _run_blocks(decoder, x, attn_fn)
  logits = decoder.logits(x[:, -1:])[:, 0]
  return logits, {'layers': new_layers}


def _step(decoder, layout, streaming, cache, token, j):
  """One token per row, token [b] at token index j [b] (< 0: padding, not written).

  Returns (logits [b, vocab], cache).
  """
  b = token.shape[0]
  m = decoder.num_memory_tokens
  rows = jnp.arange(b)
  seen = j + 1
  q_pos = cache_position(j, seen, streaming)                       # [b]
  x = decoder.embed_tokens(token[:, None], jnp.maximum(q_pos, 0)[:, None])
  new_layers = [None] * len(layout)

  def attn_fn(i, attn, y):
    layer, ring = cache['layers'][i], layout[i]
    dest = jnp.where(j >= 0, ring.slot(jnp.maximum(j, 0)), ring.size)
    q, k, v = attn.project(y, None if streaming else jnp.maximum(q_pos, 0)[:, None])
    k_all = layer['k'].at[rows, dest].set(k[:, 0].astype(layer['k'].dtype), mode='drop')
    v_all = layer['v'].at[rows, dest].set(v[:, 0].astype(layer['v'].dtype), mode='drop')
    pos = layer['pos'].at[rows, dest].set(j, mode='drop')       # [b, s]
    new_layers[i] = {'k': k_all, 'v': v_all, 'pos': pos}
    slots = jnp.arange(ring.size)[None, :]
    is_memory = slots < m
    kv_pos = jnp.where(is_memory | (pos < 0), 0, cache_position(pos, seen[:, None], streaming))
    kv_idx = jnp.where(is_memory, slots, m + kv_pos)
    kv_seg = (is_memory | (pos >= 0)).astype(jnp.int32)
    if streaming is not None:
      # Keys were stored unrotated: rotate them at their cache positions now.
      q = attn.rotate(q, jnp.maximum(q_pos, 0)[:, None])
      k_all = attn.rotate(k_all, kv_pos)
    o = _attend(attn, q, k_all, v_all, (m + q_pos)[:, None], kv_idx, kv_seg, m)
    return attn.output(o, y)

  x = _run_blocks(decoder, x, attn_fn)
  return decoder.logits(x)[:, 0], {'layers': new_layers}


def sample_logits(logits, rng, temperature=0.0, top_k=0, top_p=1.0):
  """Next tokens int32 [b] from logits [b, vocab]."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always).
    keep = cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_sampling(*, max_new_tokens, temperature, top_k, top_p) -> None:
  """Refuses sampling settings that would be ignored or produce garbage."""
  if max_new_tokens < 1:
    raise UserError(f'--max_new_tokens={max_new_tokens}: must be >= 1')
  if not temperature >= 0:
    raise UserError(f'--temperature={temperature}: must be >= 0 (0 is greedy)')
  if top_k < 0:
    raise UserError(f'--top_k={top_k}: must be >= 0 (0 keeps every token)')
  if not 0 < top_p <= 1:
    raise UserError(f'--top_p={top_p}: must be in (0, 1] (1 keeps every token)')


def generate(decoder, cfg_model, prompts, *, max_new_tokens=32, temperature=0.0,
             top_k=0, top_p=1.0, eos_id=None, seed=0, callback=None,
             streaming_sinks=None, streaming_window=None, full_output=False):
  """Continues each prompt (a list of token ids); returns the new token lists.

  callback(step, tokens [b]) is called with each generated token as it comes.
  streaming_sinks=N (N >= 0) turns on StreamingLLM mode with a window of
  `streaming_window` tokens (see the module docstring). full_output=True
  returns a `Generation` (tokens, the logits of every step, the final cache).
  """
  check_sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                 top_k=top_k, top_p=top_p)
  streaming = streaming_config(cfg_model, streaming_sinks, streaming_window)
  b = len(prompts)
  t = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) < 1:
    raise ValueError('every prompt needs at least one token (e.g. BOS)')
  length = t + max_new_tokens
  # The last token drawn is never fed back, hence the -2.
  last_position = length - 2 if streaming is None else min(
      length - 2, streaming.sinks + streaming.window - 1)
  if cfg_model.position == 'learned' and last_position >= cfg_model.max_seq_len:
    raise ValueError(
        f'prompt ({t}) + max_new_tokens ({max_new_tokens}) needs learned position '
        f'{last_position}, past model.max_seq_len={cfg_model.max_seq_len}; use '
        'streaming_sinks (positions then stay below sinks + window)')
  pads = np.asarray([t - len(p) for p in prompts])
  tokens = np.zeros((b, t), np.int32)
  seg = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, pads[i]:] = p
    seg[i, pads[i]:] = 1
    positions[i, pads[i]:] = np.arange(len(p))
  # In streaming mode the prefill stops at sinks + window tokens (nothing is
  # evicted inside it); the rest of the prompt is streamed token by token.
  t0 = t if streaming is None else min(t, streaming.sinks + streaming.window)
  layout = cache_layout(cfg_model, length, streaming)
  dests = {ring: jnp.asarray(_prefill_dest(ring, pads, t0)) for ring in set(layout)}
  cache = _empty_cache(cfg_model, b, layout)
  graphdef, state = nnx.split(decoder)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def prefill(state, cache, tokens, positions, seg, dests):
    model = nnx.merge(graphdef, state)
    return _prefill(model, layout, streaming, cache, tokens, positions, seg, dests)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(state, cache, token, j):
    model = nnx.merge(graphdef, state)
    return _step(model, layout, streaming, cache, token, j)

  pick = jax.jit(functools.partial(
      sample_logits, temperature=temperature, top_k=top_k, top_p=top_p))

  logits, cache = prefill(state, cache, jnp.asarray(tokens[:, :t0]),
                          jnp.asarray(positions[:, :t0]), jnp.asarray(seg[:, :t0]), dests)
  for c in range(t0, t):
    logits, cache = step(state, cache, jnp.asarray(tokens[:, c]), jnp.asarray(c - pads, jnp.int32))
  rng = jax.random.PRNGKey(seed)
  j = jnp.asarray(t - pads, jnp.int32)   # token index of the next token fed
  out = [[] for _ in range(b)]
  all_logits = []
  done = np.zeros(b, bool)
  for n in range(max_new_tokens):
    rng, key = jax.random.split(rng)
    token = pick(logits, key)
    if full_output:
      all_logits.append(np.asarray(logits, np.float32))
    host = np.asarray(token)
    for i in range(b):
      if not done[i]:
        out[i].append(int(host[i]))
        done[i] = eos_id is not None and host[i] == eos_id
    if callback is not None:
      callback(n, host)
    if done.all() or n == max_new_tokens - 1:
      break
    logits, cache = step(state, cache, token, j)
    j = j + 1
  if full_output:
    return Generation(out, np.stack(all_logits, axis=1), cache)
  return out


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  from data import tokenizers  # pylint: disable=g-import-not-at-top
  from train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m train.sample')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--prompt', action='append', required=True,
                      help='repeat for a batch of prompts')
  parser.add_argument('--max_new_tokens', type=int, default=64)
  parser.add_argument('--temperature', type=float, default=0.0)
  parser.add_argument('--top_k', type=int, default=0)
  parser.add_argument('--top_p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--streaming_sinks', type=int, default=None,
                      help='StreamingLLM: keep the first N tokens plus a rolling window, '
                           'with positions re-assigned inside the cache')
  parser.add_argument('--streaming_window', type=int, default=None,
                      help='the rolling window of --streaming_sinks (default: '
                           'model.sliding_window, else model.max_seq_len - N)')
  args = parser.parse_args(argv)
  check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p)
  cfg, decoder = workdir_lib.load_decoder(args.workdir)
  try:
    streaming_config(cfg.model, args.streaming_sinks, args.streaming_window)
  except ValueError as e:
    raise UserError(str(e)) from None
  tok = tokenizers.get_tokenizer(cfg.data.tokenizer)
  prompts = [tok.encode(p) for p in args.prompt]
  if tok.bos_id is not None:
    prompts = [[tok.bos_id] + p for p in prompts]
  stream = len(prompts) == 1
  if stream:
    sys.stdout.write(args.prompt[0])

  def show(_, tokens):
    if stream and tokens[0] != tok.eos_id:
      sys.stdout.write(tok.decode([int(tokens[0])]))
      sys.stdout.flush()

  out = generate(decoder, cfg.model, prompts, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 eos_id=tok.eos_id, seed=args.seed, callback=show,
                 streaming_sinks=args.streaming_sinks,
                 streaming_window=args.streaming_window)
  if stream:
    sys.stdout.write('\n')
  else:
    for prompt, new in zip(args.prompt, out):
      print(prompt + tok.decode([x for x in new if x != tok.eos_id]))


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
