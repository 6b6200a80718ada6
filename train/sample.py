"""Autoregressive sampling with a KV cache; `python -m train.sample`.

    python -m train.sample --workdir DIR --prompt TEXT [--max_new_tokens N
        --temperature T --top_k K --top_p P]

The cache holds, per layer, K/V of the `num_kv_heads` heads only (GQA/MQA
queries are grouped onto them, as in `model.attention_core`) for every slot
of the sequence the attention sees: the `num_memory_tokens` learned memory
tokens, the (left-padded) prompts, then the generated tokens. A prefill
writes the memory and the prompt in one call; each new token is then one call
of a `jax.jit`-compiled step with fixed shapes that writes its K/V at its slot
and attends over the whole buffer under the same mask rules as training
(`model.masking.visible`: causal, sliding window by slot distance, memory
keys always visible, padding invisible) and the same ALiBi bias, RoPE
positions, QK-norm and soft-caps. Sliding-window layers use the full-length
buffer with the window mask (not a rolling buffer).

Decoding: greedy (temperature 0), or temperature sampling restricted to the
top-k tokens and/or the top-p nucleus (Holtzman et al. 2019). Generation
stops at EOS or after `max_new_tokens`; tokens are streamed to a callback
(the console for the command line) as they come.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import masking
from model import mlp as mlp_lib  # pylint: disable=unused-import


def _cached_attention(attn, q, k_all, v_all, q_idx, kv_seg, num_memory):
  """q [b, t, n, h] at slot indices q_idx [t] over the cache [b, S, kv, h]."""
  b, t, n, h = q.shape
  s, kv = k_all.shape[1], k_all.shape[2]
  g = n // kv
  scale = h ** -0.5 if attn.scale is None else attn.scale
  qf = q.astype(jnp.float32).reshape(b, t, kv, g, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', qf, k_all.astype(jnp.float32)) * scale
  logits = masking.softcap(logits, attn.logit_softcap)
  kv_idx = jnp.arange(s)[None, :]
  qi = q_idx[:, None]
  if attn.position == 'alibi':
    slopes = jnp.asarray(masking.alibi_slopes(n)).reshape(kv, g)[None, :, :, None, None]
    logits = logits + masking.alibi_bias(slopes, qi, kv_idx, num_memory)
  # Real (non-pad, written) keys carry segment 1; queries are segment 1.
  mask = masking.visible(qi, kv_idx, jnp.ones_like(qi), kv_seg[:, None, :],
                         causal=True, window=attn.sliding_window, num_memory=num_memory)
  logits = jnp.where(mask[:, None, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum('bkgts,bskh->btkgh', probs, v_all.astype(jnp.float32))
  return o.reshape(b, t, n, h).astype(q.dtype)


def _forward_chunk(decoder, cache, tokens, positions, start, chunk_seg, with_memory):
  """Runs tokens [b, t] at cache slots start.. (memory first when `with_memory`).

  Returns (logits of the last slot [b, vocab], new cache).
  """
  b, t = tokens.shape
  m = decoder.num_memory_tokens
  x = decoder.embed_tokens(tokens, positions)
  if with_memory and m:
    memory = jnp.broadcast_to(decoder.memory[...].astype(decoder.dtype), (b, m, decoder.d_model))
    x = jnp.concatenate([memory, x], axis=1)
    positions = jnp.concatenate([jnp.zeros((b, m), positions.dtype), positions], axis=1)
    chunk_seg = jnp.concatenate([jnp.ones((b, m), chunk_seg.dtype), chunk_seg], axis=1)
  width = x.shape[1]
  q_idx = start + jnp.arange(width)
  kv_seg = jax.lax.dynamic_update_slice(cache['seg'], chunk_seg, (0, start))
  new_layers = []
  for block, layer in zip(decoder.blocks, cache['layers']):
    def attn_fn(y, block=block, layer=layer):
      q, k, v = block.attn.project(y, positions)
      k_all = jax.lax.dynamic_update_slice(layer['k'], k.astype(layer['k'].dtype), (0, start, 0, 0))
      v_all = jax.lax.dynamic_update_slice(layer['v'], v.astype(layer['v'].dtype), (0, start, 0, 0))
      new_layers.append({'k': k_all, 'v': v_all})
      o = _cached_attention(block.attn, q, k_all, v_all, q_idx, kv_seg, m)
      return block.attn.output(o)
    dtype = x.dtype
    ffn = lambda y, block=block: block._ffn(y)[0]  # pylint: disable=protected-access
    if block.norm_position == 'pre':
      x = x + attn_fn(block.attn_norm(x)).astype(dtype)
      x = x + ffn(block.mlp_norm(x)).astype(dtype)
    elif block.norm_position == 'post':
      x = block.attn_norm(x + attn_fn(x).astype(dtype))
      x = block.mlp_norm(x + ffn(x).astype(dtype))
    else:
      x = x + block.attn_out_norm(attn_fn(block.attn_norm(x))).astype(dtype)
      x = x + block.mlp_out_norm(ffn(block.mlp_norm(x))).astype(dtype)
  logits = decoder.logits(x[:, width - 1:])[:, 0]
  return logits, {'layers': new_layers, 'seg': kv_seg}


def init_cache(cfg_model, batch: int, length: int):
  """Zero K/V buffers [batch, memory + length, kv_heads, head_dim] per layer."""
  h = cfg_model.head_dim or cfg_model.d_model // cfg_model.num_heads
  slots = cfg_model.num_memory_tokens + length
  shape = (batch, slots, cfg_model.num_kv_heads, h)
  dtype = jnp.dtype(cfg_model.dtype)
  return {'layers': [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
                     for _ in range(cfg_model.num_layers)],
          'seg': jnp.zeros((batch, slots), jnp.int32)}


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


def generate(decoder, cfg_model, prompts, *, max_new_tokens=32, temperature=0.0,
             top_k=0, top_p=1.0, eos_id=None, seed=0, callback=None):
  """Continues each prompt (a list of token ids); returns the new token lists.

  callback(step, tokens [b]) is called with each generated token as it comes.
  """
  b = len(prompts)
  t = max(len(p) for p in prompts)
  pads = [t - len(p) for p in prompts]
  tokens = np.zeros((b, t), np.int32)
  seg = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, pads[i]:] = p
    seg[i, pads[i]:] = 1
    positions[i, pads[i]:] = np.arange(len(p))
  m = cfg_model.num_memory_tokens
  cache = init_cache(cfg_model, b, t + max_new_tokens)
  graphdef, state = nnx.split(decoder)

  @jax.jit
  def prefill(state, cache, tokens, positions, seg):
    model = nnx.merge(graphdef, state)
    return _forward_chunk(model, cache, tokens, positions, 0, seg, True)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(state, cache, token, position, slot, rng):
    model = nnx.merge(graphdef, state)
    logits, cache = _forward_chunk(model, cache, token[:, None], position[:, None], slot,
                                   jnp.ones((b, 1), jnp.int32), False)
    return sample_logits(logits, rng, temperature, top_k, top_p), cache

  logits, cache = prefill(state, cache, jnp.asarray(tokens), jnp.asarray(positions),
                          jnp.asarray(seg))
  rng = jax.random.PRNGKey(seed)
  rng, key = jax.random.split(rng)
  token = sample_logits(logits, key, temperature, top_k, top_p)
  position = jnp.asarray(positions[:, -1] + 1)
  out = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  for j in range(max_new_tokens):
    host = np.asarray(token)
    for i in range(b):
      if not done[i]:
        out[i].append(int(host[i]))
        done[i] = eos_id is not None and host[i] == eos_id
    if callback is not None:
      callback(j, host)
    if done.all() or j == max_new_tokens - 1:
      break
    rng, key = jax.random.split(rng)
    token, cache = step(state, cache, token, position, jnp.int32(m + t + j), key)
    position = position + 1
  return out


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  from data import tokenizers  # pylint: disable=g-import-not-at-top
  from model import hf  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m train.sample')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--prompt', action='append', required=True,
                      help='repeat for a batch of prompts')
  parser.add_argument('--max_new_tokens', type=int, default=64)
  parser.add_argument('--temperature', type=float, default=0.0)
  parser.add_argument('--top_k', type=int, default=0)
  parser.add_argument('--top_p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  cfg, decoder = hf.load_workdir(args.workdir)
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
                 eos_id=tok.eos_id, seed=args.seed, callback=show)
  if stream:
    sys.stdout.write('\n')
  else:
    for prompt, new in zip(args.prompt, out):
      print(prompt + tok.decode([x for x in new if x != tok.eos_id]))


if __name__ == '__main__':
  main()
