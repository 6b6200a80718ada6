"""Autoregressive sampling with a KV cache; `python -m train.sample`.

    python -m train.sample --workdir DIR --prompt TEXT [--prompt TEXT ...]
        [--max_new_tokens N --temperature T --top_k K --top_p P --seed S
         --streaming_sinks N --streaming_window W --speculative --stats]

Continues each prompt with the newest checkpoint of a training workdir (or of
one made by `python -m model.hf import`), tokenized with the run's tokenizer.
One prompt is printed, then its continuation token by token as it comes;
repeated --prompt flags make a batch, printed one line each at the end. For
example, after `python -m train --config configs/llama.py:tiny --workdir
/tmp/ablax_llama_tiny`:

    python -m train.sample --workdir /tmp/ablax_llama_tiny --prompt "def main(" \\
        --max_new_tokens 64 --temperature 0.8 --top_p 0.95

Prefill and decode run the decoder's own embeddings, blocks and head
(`model.Decoder.hidden_states(..., cache=, chunk=)`); each layer keeps its own
cache (`model.kv_cache`: ring buffers for sliding-window layers, StreamingLLM
sinks, memory tokens; an MLA layer keeps only its latent and rope key, a
`LatentCache`, and decodes in the absorbed form, `model.mla`). A prefill runs the memory tokens and the (left-padded)
prompts in one call, exactly the training forward, and writes into each ring
the tokens it will still need (the last `sliding_window` of a long prompt on
a window layer). Each new token is then one call of a `jax.jit`-compiled step
with fixed shapes and a donated cache, attending over the cache.

Streaming (`streaming_sinks=N`): StreamingLLM (Xiao et al. 2023). Every layer
keeps the first N tokens (the attention sinks) and a rolling window of the
last W tokens (`streaming_window`; default the model's `sliding_window`, else
`max_seq_len - N`), with positions re-assigned inside the cache, so positions
never pass N + W - 1 and generation can run for ever. The step's logits equal
those of the full model run on [sinks + last W tokens] with fresh positions
0..N+W-1 (exactly so for one layer; deeper layers keep the K/V computed when
each token came, as in the paper). A window layer keeps its own window over
cache positions, so it sees the sinks only while they are inside it. In
streaming mode a prompt longer than N + W is prefilled up to N + W tokens and
then fed token by token, so it is streamed exactly as a generated text.

`--stats` prints the cache's bytes per token (summed over layers, in the
cache dtype: `model.cache_numbers_per_token` x layers x bytes), its total for
the run and the decode tokens/s (`cache_stats`, `stats_lines`).

Self-speculative decoding (`--speculative`, `generate_speculative`; one
prompt, no streaming, no window layers shorter than the run): the model's
MTP modules (model.mtp_depth = D, `model.mtp`) draft D tokens after the
last accepted one, module k chaining on module k-1's hidden state and the
token drafted before; one cached forward of the main model over D + 1 new
columns (a multi-token chunk attending over the cache and itself by token
index) verifies them. Greedy keeps the longest prefix equal to the main
model's argmax, then its argmax (token-identical to plain greedy); with
temperature > 0, Leviathan et al. 2023's rule (`speculative_accept`) keeps
the main model's distribution. Rejected columns leave the cache
(`KVCache.truncate`). The MTP blocks keep no cache: each round reruns them
over the sequence so far (exact; D block passes per round). `--stats` then
adds the acceptance rate and tokens per main-model forward.

Decoding: greedy (temperature 0), or temperature sampling restricted to the
top-k tokens and/or the top-p nucleus (Holtzman et al. 2019). Generation
stops at EOS or after `max_new_tokens`; tokens are streamed to a callback
(the console for the command line) as they come.
"""

import functools
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import errors
from configs.errors import UserError
from model import decoder as decoder_lib
from model import kv_cache
from model import mtp as mtp_lib

Ring = kv_cache.Ring
Streaming = kv_cache.Streaming
cache_position = kv_cache.cache_position


class Generation(NamedTuple):
  """What `generate(..., full_output=True)` returns."""
  tokens: list          # per prompt, the new token ids (up to and with EOS)
  logits: np.ndarray    # float32 [batch, steps, vocab]: the logits each token was drawn from
  cache: Any            # the final cache: per layer, its cache (`model.kv_cache.KVCache`,
                        # `LatentCache` for MLA)
  decode_tokens: int    # tokens timed in decode_seconds (batch x steps after the first)
  decode_seconds: float  # wall time of those decode steps (the first, compiled, not counted)
  drafted: int = 0       # speculative: draft tokens proposed by the MTP modules
  accepted: int = 0      # speculative: of those, accepted by the main model
  forwards: int = 0      # speculative: main-model forwards (the prefill included)


class CacheStats(NamedTuple):
  """What `--stats` prints about a run's cache (`cache_stats`)."""
  bytes_per_token: int   # cached bytes per token, summed over layers
  total_bytes: int       # bytes of every layer's buffers for the run (all slots, all rows)
  dtype: str             # the cache dtype


def cache_stats(cache) -> CacheStats:
  """Bytes per token and in all of a cache (a tuple of layer caches); the slots'
  int32 token indices are bookkeeping and not counted."""
  per_token = sum(layer.bytes_per_token() for layer in cache)
  total = sum(layer.data_bytes() for layer in cache)
  return CacheStats(per_token, total, str(cache[0].data()[0].dtype))


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
  """One `Ring` per layer for sequences of up to `length` tokens (prompt + new);
  the rings `Decoder.init_cache` makes."""
  return tuple(
      kv_cache.ring_for(None if decoder_lib.is_global_layer(cfg_model, i)
                        else cfg_model.sliding_window,
                        length, cfg_model.num_memory_tokens, streaming)
      for i in range(cfg_model.num_layers))


def sample_logits(logits, rng, temperature=0.0, top_k=0, top_p=1.0):
  """Next tokens int32 [b] from logits [b, vocab]."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filtered_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def filtered_logits(logits, temperature, top_k=0, top_p=1.0):
  """float32 logits [b, vocab] of the distribution `sample_logits` draws from
  (temperature > 0): scaled by 1/T, -inf outside the top-k / top-p set."""
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
  return logits


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
             streaming_sinks=None, streaming_window=None, full_output=False,
             speculative=False):
  """Continues each prompt (a list of token ids); returns the new token lists.

  callback(step, tokens [b]) is called with each generated token as it comes.
  streaming_sinks=N (N >= 0) turns on StreamingLLM mode with a window of
  `streaming_window` tokens (see the module docstring). full_output=True
  returns a `Generation` (tokens, the logits of every step, the final cache).
  speculative=True: self-speculative decoding with the MTP modules
  (`generate_speculative`; one prompt, no streaming).
  """
  if speculative:
    if streaming_sinks is not None or streaming_window is not None:
      raise UserError('--speculative with --streaming_sinks is not supported: drop one of them')
    return generate_speculative(
        decoder, cfg_model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed, callback=callback,
        full_output=full_output)
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
  index = np.full((b, t), -1, np.int32)     # token index of each column; -1: padding
  for i, p in enumerate(prompts):
    tokens[i, pads[i]:] = p
    index[i, pads[i]:] = np.arange(len(p))
  # In streaming mode the prefill stops at sinks + window tokens (nothing is
  # evicted inside it); the rest of the prompt is streamed token by token.
  t0 = t if streaming is None else min(t, streaming.sinks + streaming.window)
  cache = decoder.init_cache(b, length, streaming)
  graphdef, state = nnx.split(decoder)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def prefill(state, cache, tokens, index):
    model = nnx.merge(graphdef, state)
    chunk = kv_cache.Chunk(index, prefill=True)
    segment_ids = (index >= 0).astype(jnp.int32)     # padding: segment 0, never seen
    x, _, cache = model.hidden_states(tokens, segment_ids, chunk.positions(streaming),
                                      cache=cache, chunk=chunk)
    return model.logits(x[:, -1:])[:, 0], cache

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(state, cache, token, j):
    """token [b] at token index j [b] (< 0: padding, not cached) -> (logits [b, vocab], cache)."""
    model = nnx.merge(graphdef, state)
    chunk = kv_cache.Chunk(j[:, None])
    x, _, cache = model.hidden_states(token[:, None], None, chunk.positions(streaming),
                                      cache=cache, chunk=chunk)
    return model.logits(x)[:, 0], cache

  pick = jax.jit(functools.partial(
      sample_logits, temperature=temperature, top_k=top_k, top_p=top_p))

  logits, cache = prefill(state, cache, jnp.asarray(tokens[:, :t0]),
                          jnp.asarray(index[:, :t0]))
  for c in range(t0, t):
    logits, cache = step(state, cache, jnp.asarray(tokens[:, c]), jnp.asarray(c - pads, jnp.int32))
  rng = jax.random.PRNGKey(seed)
  j = jnp.asarray(t - pads, jnp.int32)   # token index of the next token fed
  out = [[] for _ in range(b)]
  all_logits = []
  done = np.zeros(b, bool)
  timed_from = None
  for n in range(max_new_tokens):
    rng, key = jax.random.split(rng)
    token = pick(logits, key)
    if full_output:
      all_logits.append(np.asarray(logits, np.float32))
    host = np.asarray(token)
    if n == 1:   # the first decode step (compilation) is done
      timed_from = time.perf_counter()
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
    seconds = 0.0 if timed_from is None else time.perf_counter() - timed_from
    timed = 0 if timed_from is None else b * (n - 1)
    return Generation(out, np.stack(all_logits, axis=1), cache, timed, seconds)
  return out


def speculative_accept(p, q, drafts, rng):
  """Leviathan et al. 2023's rejection rule for one row.

  p: float [D+1, vocab], the main model's probabilities at the D draft
  positions and one past them; q: float [D, vocab], the draft's; drafts:
  int [D], drawn from q. Draft k is accepted with probability
  min(1, p_k(x)/q_k(x)); at the first rejection the token comes from
  norm(max(0, p_k - q_k)); if all are accepted, from p_D. Returns
  (n accepted, the next token): the emitted tokens drafts[:n] + [next] are
  distributed as the main model's own samples. rng: a `np.random.Generator`.
  """
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  vocab = p.shape[-1]
  for k, x in enumerate(np.asarray(drafts)):
    if rng.random() * q[k, x] < p[k, x]:       # u < p/q, without dividing by 0
      continue
    residual = np.maximum(p[k] - q[k], 0.0)
    total = residual.sum()
    residual = residual / total if total > 0 else p[k]
    return k, int(rng.choice(vocab, p=residual))
  return len(drafts), int(rng.choice(vocab, p=p[len(drafts)] / p[len(drafts)].sum()))


def greedy_accept(p_logits, drafts):
  """Greedy verification: (n, next) with n the longest prefix of drafts equal to
  the main model's argmax at their positions, next the argmax after it."""
  best = np.argmax(np.asarray(p_logits), axis=-1)
  n = 0
  while n < len(drafts) and drafts[n] == best[n]:
    n += 1
  return n, int(best[n])


def _softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = np.exp(x - x.max(axis=-1, keepdims=True))
  return x / x.sum(axis=-1, keepdims=True)


def check_speculative(cfg_model, batch: int, length: int, streaming_sinks=None):
  """Refuses what self-speculative decoding does not handle (UserError)."""
  depth = cfg_model.get('mtp_depth', 0)
  if not depth:
    raise UserError('--speculative drafts with the model\'s MTP modules, and this model has '
                    'none (model.mtp_depth=0): train with --config.model.mtp_depth=D '
                    '(and train.mtp_loss_weight > 0), or drop --speculative')
  if batch != 1:
    raise UserError(f'--speculative decodes one prompt at a time; got {batch} --prompt flags')
  if streaming_sinks is not None:
    raise UserError('--speculative with --streaming_sinks is not supported: drop one of them')
  window = cfg_model.sliding_window
  if window and window < length and not all(
      decoder_lib.is_global_layer(cfg_model, i) for i in range(cfg_model.num_layers)):
    raise UserError(f'--speculative with sliding-window layers (model.sliding_window={window} '
                    f'< prompt + max_new_tokens + mtp_depth = {length}) is not supported: '
                    'their rolling caches cannot take a multi-token verification chunk')


@functools.lru_cache(maxsize=8)
def _speculative_fns(graphdef, temperature, top_k, top_p):
  """The jitted steps of `generate_speculative`, kept across calls (tests and
  repeated prompts reuse the compilations)."""
  greedy = temperature <= 0
  filt = functools.partial(filtered_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def prefill(state, cache, tokens):
    model = nnx.merge(graphdef, state)
    index = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    chunk = kv_cache.Chunk(index, prefill=True)
    x, _, cache = model.hidden_states(tokens, None, index, cache=cache, chunk=chunk)
    return model.logits(x[:, -1:])[:, 0], x, cache

  @functools.partial(jax.jit, donate_argnums=(1,))
  def verify(state, cache, tokens, start):
    """tokens [1, D+1] at token indices start.. -> (logits [D+1, vocab], x, cache)."""
    model = nnx.merge(graphdef, state)
    index = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    chunk = kv_cache.Chunk(index)
    x, _, cache = model.hidden_states(tokens, None, index, cache=cache, chunk=chunk)
    return model.logits(x)[0], x, cache

  @jax.jit
  def draft(state, hidden, tokens, i, key):
    """MTP drafts after position i: hidden [1, L, d] main states (valid up to
    i), tokens [1, L] (valid up to i + 1) -> (drafts [D], draft logits [D, vocab])."""
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    h = hidden
    drafts, logits = [], []
    for k, module in enumerate(model.mtp, start=1):
      emb = model.embed_tokens(mtp_lib.shift_left(tokens, k), positions)
      h, _ = module(h, emb, positions)
      row = model.mtp_logits(k, jax.lax.dynamic_slice_in_dim(h, i, 1, axis=1))[:, 0]
      if greedy:
        x = jnp.argmax(row, axis=-1).astype(jnp.int32)
      else:
        key, sub = jax.random.split(key)
        row = filt(row)
        x = jax.random.categorical(sub, row, axis=-1).astype(jnp.int32)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, x[:, None], i + k + 1, axis=1)
      drafts.append(x[0])
      logits.append(row[0])
    return jnp.stack(drafts), jnp.stack(logits)

  rollback = jax.jit(lambda cache, seen: tuple(layer.truncate(seen) for layer in cache),
                     donate_argnums=(0,))
  pick = jax.jit(functools.partial(
      sample_logits, temperature=temperature, top_k=top_k, top_p=top_p))
  main_filter = jax.jit(filt)

  return prefill, verify, draft, rollback, pick, main_filter


def generate_speculative(decoder, cfg_model, prompts, *, max_new_tokens=32, temperature=0.0,
                         top_k=0, top_p=1.0, eos_id=None, seed=0, callback=None,
                         full_output=False, draft_fn=None):
  """Self-speculative decoding of one prompt with the model's MTP modules.

  Each round the D = model.mtp_depth modules draft D tokens after the last
  accepted one (module k chains on module k-1's hidden state and the
  embedding of the token drafted before), and one cached forward of the
  main model over D + 1 new columns (the pending token and the drafts)
  verifies them: greedy keeps the longest prefix equal to the main model's
  argmax, temperature > 0 uses `speculative_accept`. Rejected columns are
  dropped from the cache (`truncate`). The output is that of `generate`:
  token-identical when greedy, the same distribution otherwise.

  The MTP blocks have no cache: each round reruns them over the whole
  sequence so far (right-padded to a fixed length, causal), which is exact
  and simple, and costs D block passes over the sequence per round.
  draft_fn (tests): replaces the MTP draft, called as
  draft_fn(sequence so far (list), D) -> D tokens (greedy only).
  """
  check_sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                 top_k=top_k, top_p=top_p)
  depth = cfg_model.get('mtp_depth', 0)
  t = len(prompts[0]) if prompts else 0
  length = t + max_new_tokens + depth + 1
  check_speculative(cfg_model, len(prompts), length)
  if t < 1:
    raise ValueError('every prompt needs at least one token (e.g. BOS)')
  if cfg_model.position == 'learned' and length - 1 > cfg_model.max_seq_len:
    raise ValueError(
        f'prompt ({t}) + max_new_tokens ({max_new_tokens}) + mtp_depth ({depth}) needs '
        f'learned positions past model.max_seq_len={cfg_model.max_seq_len}')
  greedy = temperature <= 0
  cache = decoder.init_cache(1, length)
  graphdef, state = nnx.split(decoder)
  prefill, verify, draft, rollback, pick, main_filter = _speculative_fns(
      graphdef, temperature, top_k, top_p)
  seq = list(prompts[0])
  logits, x, cache = prefill(state, cache, jnp.asarray([seq], jnp.int32))
  hidden = jnp.zeros((1, length, cfg_model.d_model), x.dtype).at[:, :t].set(x)
  key = jax.random.PRNGKey(seed)
  rng = np.random.default_rng(seed)
  key, sub = jax.random.split(key)
  pending = int(np.asarray(pick(logits, sub))[0])
  out, all_logits = [pending], [np.asarray(logits[0], np.float32)]
  i = t - 1                # the last position whose main hidden state is known
  drafted = accepted = 0
  forwards = 1
  timed_from = timed_tokens = None

  def emit(tokens):
    for tok in tokens:
      if len(out) >= max_new_tokens or (eos_id is not None and out[-1] == eos_id):
        return
      out.append(tok)
      if callback is not None:
        callback(len(out) - 1, np.asarray([tok], np.int32))

  if callback is not None:
    callback(0, np.asarray([pending], np.int32))
  while len(out) < max_new_tokens and not (eos_id is not None and out[-1] == eos_id):
    if forwards == 2:                # the first round (compilation) is done
      timed_from, timed_tokens = time.perf_counter(), len(out)
    buf = np.zeros((1, length), np.int32)
    buf[0, :i + 2] = seq + [pending]
    key, sub = jax.random.split(key)
    if draft_fn is not None:
      drafts = np.asarray(draft_fn(seq + [pending], depth), np.int32)
      q_logits = None
    else:
      drafts, q_logits = draft(state, hidden, jnp.asarray(buf), i, sub)
      drafts = np.asarray(drafts)
    chunk = jnp.asarray([[pending] + drafts.tolist()], jnp.int32)
    p_logits, x, cache = verify(state, cache, chunk, jnp.int32(i + 1))
    forwards += 1
    hidden = jax.lax.dynamic_update_slice_in_dim(hidden, x, i + 1, axis=1)
    if greedy:
      n, nxt = greedy_accept(p_logits, drafts)
    else:
      p = _softmax64(main_filter(p_logits))
      q = _softmax64(q_logits)
      n, nxt = speculative_accept(p, q, drafts, rng)
    drafted += depth
    accepted += n
    cache = rollback(cache, jnp.asarray([i + 2 + n], jnp.int32))
    seq = seq + [pending] + drafts[:n].tolist()
    i += n + 1
    before = len(out)
    emit(drafts[:n].tolist() + [nxt])
    p_host = np.asarray(p_logits, np.float32)
    all_logits.extend(p_host[k] for k in range(len(out) - before))
    pending = nxt
  gen_tokens = [out]
  if full_output:
    seconds = 0.0 if timed_from is None else time.perf_counter() - timed_from
    timed = 0 if timed_from is None else len(out) - timed_tokens
    return Generation(gen_tokens, np.stack(all_logits)[None], cache, timed, seconds,
                      drafted, accepted, forwards)
  return gen_tokens


def define_flags():
  """The command line's flags (absl), defined only when run as a program."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None,
                      'A training workdir (or one made by `python -m model.hf import`); '
                      'its newest checkpoint, config.json and tokenizer are used.')
  flags.DEFINE_multi_string('prompt', None,
                            'Text to continue; repeat --prompt for a batch (left-padded, '
                            'one line per prompt in the output). A single prompt is '
                            'streamed to the console as it is generated.')
  flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate per prompt (stops '
                       'earlier at the tokenizer\'s end-of-text token).')
  flags.DEFINE_float('temperature', 0.0, 'Softmax temperature; 0 is greedy (argmax).')
  flags.DEFINE_integer('top_k', 0, 'Sample among the K most likely tokens only (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the smallest set of most likely '
                     'tokens whose probability reaches P (1: all).')
  flags.DEFINE_integer('seed', 0, 'Random seed of the sampling (temperature > 0).')
  flags.DEFINE_integer('streaming_sinks', None,
                       'StreamingLLM: keep the first N tokens (attention sinks) plus a '
                       'rolling window, positions re-assigned inside the cache, so '
                       'generation can run past model.max_seq_len in bounded memory.')
  flags.DEFINE_integer('streaming_window', None,
                       'The rolling window of --streaming_sinks (default: '
                       'model.sliding_window, else model.max_seq_len - N).')
  flags.DEFINE_boolean('speculative', False,
                       'Self-speculative decoding: the model\'s MTP modules (model.mtp_depth '
                       '= D) draft D tokens, one forward of the main model verifies them; '
                       'same output as without (greedy: token for token; sampling: the same '
                       'distribution, Leviathan et al. 2023). One --prompt, no streaming.')
  flags.DEFINE_boolean('stats', False,
                       'After the text, print the KV cache\'s bytes per token (summed '
                       'over layers, in the cache dtype), its total bytes for this run, '
                       'and decode tokens/s (the first, compiled, step not counted).')


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from data import tokenizers  # pylint: disable=g-import-not-at-top
  from train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value; '
                    'quote a prompt with spaces: --prompt "some text")')
  if not args.workdir:
    raise UserError('--workdir is required: the training workdir to sample from')
  if not args.prompt:
    raise UserError('--prompt is required: the text to continue (repeat it for a batch)')
  check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p)
  # The console shows the text: checkpoint loading's INFO lines stay out of it.
  logging.set_verbosity(logging.WARNING)
  cfg, decoder = workdir_lib.load_decoder(args.workdir)
  try:
    streaming_config(cfg.model, args.streaming_sinks, args.streaming_window)
  except ValueError as e:
    raise UserError(str(e)) from None
  if args.speculative:
    check_speculative(cfg.model, len(args.prompt), 1, args.streaming_sinks)
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
                 streaming_window=args.streaming_window, full_output=args.stats,
                 speculative=args.speculative)
  gen = out if args.stats else None
  if args.stats:
    out = gen.tokens
  if stream:
    sys.stdout.write('\n')
  else:
    for prompt, new in zip(args.prompt, out):
      print(prompt + tok.decode([x for x in new if x != tok.eos_id]))
  if gen is not None:
    print(stats_lines(cfg.model, gen))


def stats_lines(cfg_model, gen: Generation) -> str:
  """The `--stats` report of a `generate(..., full_output=True)` result."""
  st = cache_stats(gen.cache)
  kind = cfg_model.get('attention_type', 'standard')
  rows = gen.cache[0].data()[0].shape[0]
  rings = [layer for layer in gen.cache if hasattr(layer, 'ring')]
  recurrent = len(gen.cache) - len(rings)
  slots = sum(layer.ring.size for layer in rings)
  where = f'{rows} rows x {slots} slots over the attention layers'
  if recurrent:
    state = sum(layer.data_bytes() for layer in gen.cache if not hasattr(layer, 'ring'))
    where += (f'; {state} bytes of recurrent state and conv buffers in {recurrent} '
              'Gated DeltaNet layers, constant in the length')
  lines = [f'cache: {st.bytes_per_token} bytes/token ({kind}, {len(gen.cache)} layers, '
           f'{st.dtype}); {st.total_bytes} bytes in all ({where})']
  if gen.decode_tokens:
    lines.append(f'decode: {gen.decode_tokens / gen.decode_seconds:.1f} tokens/s '
                 f'({gen.decode_tokens} tokens in {gen.decode_seconds:.3f} s, batch {rows})')
  else:
    lines.append('decode: not timed (needs --max_new_tokens >= 3: the first step compiles)')
  if gen.forwards:
    rate = gen.accepted / gen.drafted if gen.drafted else 0.0
    new = len(gen.tokens[0])
    lines.append(f'speculative: acceptance rate {rate:.3f} ({gen.accepted} of {gen.drafted} '
                 f'draft tokens); {new / gen.forwards:.2f} tokens per main-model forward '
                 f'({new} tokens in {gen.forwards} forwards, the prefill included)')
  return '\n'.join(lines)


if __name__ == '__main__':
  define_flags()
  errors.run(main)
