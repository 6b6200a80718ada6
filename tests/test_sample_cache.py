"""train.sample caches: rolling window buffers and StreamingLLM sinks.

References are the plain model (`model.Decoder`) run on whole sequences: for
the rolling buffer, the full sequence so far; for StreamingLLM, the sinks plus
the last W tokens with fresh positions 0.., which is the definition of its
position re-assignment. Sequences are right-padded to one length so that a
single jitted forward serves every step (causal attention: the logits at a
position do not depend on later tokens).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from train import sample


def _decoder(overrides, seed=1):
  cfg = configs.load('configs/llama.py:tiny', [
      'model.vocab_size=64', 'model.d_model=32', 'model.num_heads=4', 'model.d_ff=64',
      'model.max_seq_len=64', 'train.seq_len=16'] + overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(seed))
  # Larger weights than the init, so that the argmax depends on the context.
  for _, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    if var.get_value().ndim > 1:
      var.set_value(var.get_value() * 8.0)
  return cfg, decoder


def _forward(decoder):
  graphdef, state = nnx.split(decoder)

  @jax.jit
  def run(tokens):
    return nnx.merge(graphdef, state)(tokens)[0]
  return lambda tokens: np.asarray(run(jnp.asarray(tokens, jnp.int32)))


def _last_logits(forward, seqs, width):
  """float32 [len(seqs), vocab]: logits after the last token of each sequence."""
  buf = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    buf[i, :len(s)] = s
  logits = forward(buf)
  return np.stack([logits[i, len(s) - 1] for i, s in enumerate(seqs)])


def _greedy_full(decoder, prompts, n):
  """Greedy continuations, each token from a full forward of the sequence so far."""
  forward = _forward(decoder)
  seqs = [list(p) for p in prompts]
  width = max(map(len, prompts)) + n
  for _ in range(n):
    nxt = _last_logits(forward, seqs, width).argmax(-1)
    for s, tok in zip(seqs, nxt):
      s.append(int(tok))
  return [s[len(p):] for s, p in zip(seqs, prompts)]


def _head_dim(cfg):
  return cfg.model.head_dim or cfg.model.d_model // cfg.model.num_heads


@pytest.mark.parametrize('overrides,prompt_lens', [
    # GQA + window + RoPE; one prompt longer than the window (a long prefill).
    (['model.num_kv_heads=2', 'model.sliding_window=8'], (5, 12)),
    # Every second layer global: it keeps the full cache.
    (['model.num_kv_heads=2', 'model.sliding_window=8', 'model.global_layer_interval=2'], (5, 3)),
    # ALiBi distances and always-visible memory tokens with a rolling window.
    (['model.position=alibi', 'model.num_memory_tokens=2', 'model.sliding_window=8'], (5, 10)),
])
def test_rolling_window_greedy_equals_full_forward(overrides, prompt_lens):
  cfg, decoder = _decoder(overrides)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 64, size=n).tolist() for n in prompt_lens]
  n = 30  # runs far past the window of 8
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=n, full_output=True)
  assert got.tokens == _greedy_full(decoder, prompts, n)
  assert all(len(set(new)) > 3 for new in got.tokens)
  # Window layers hold memory + window slots, whatever the generation length;
  # global layers the whole sequence.
  m, kv, h = cfg.model.num_memory_tokens, cfg.model.num_kv_heads, _head_dim(cfg)
  for i, layer in enumerate(got.cache):
    is_global = cfg.model.global_layer_interval and (i + 1) % cfg.model.global_layer_interval == 0
    slots = m + (max(prompt_lens) + n if is_global else 8)
    assert layer.k.shape == layer.v.shape == (2, slots, kv, h)


@pytest.mark.parametrize('overrides,prompt_lens', [
    # A prompt longer than sinks + window is streamed through the cache.
    (['model.num_kv_heads=1'], (11, 3)),
    (['model.position=alibi', 'model.num_memory_tokens=2'], (6, 2)),
    # A window layer keeps its window (4) over cache positions.
    (['model.sliding_window=4'], (9, 5)),
])
def test_streaming_logits_equal_full_forward_on_sinks_and_window(overrides, prompt_lens):
  # One layer: its cached K/V depend on the token alone (positions enter via
  # RoPE at attention time or ALiBi), so the cache must give exactly the model
  # on [sinks + last W tokens] at positions 0..N+W-1.
  cfg, decoder = _decoder(['model.num_layers=1'] + overrides)
  sinks, window, n = 2, 6, 20
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 64, size=k).tolist() for k in prompt_lens]
  # Sampled (temperature 1), so that the text does not settle into a loop.
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=n, full_output=True,
                        temperature=1.0, streaming_sinks=sinks, streaming_window=window)
  seqs = []
  for prompt, new in zip(prompts, got.tokens):
    assert len(new) == n
    full = prompt + new
    for s in range(n):
      seen = full[:len(prompt) + s]
      seqs.append(seen[:sinks] + seen[max(sinks, len(seen) - window):])
  want = _last_logits(_forward(decoder), seqs, sinks + window).reshape(2, n, -1)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got.logits, want, rtol=0, atol=2e-5 * scale)
  # The text runs well past sinks + window, so the window has rolled.
  assert all(len(set(new[sinks + window:])) > 3 for new in got.tokens)


def test_streaming_equals_plain_cache_until_eviction():
  # RoPE on keys stored unrotated (streaming) vs rotated when written (plain).
  cfg, decoder = _decoder(['model.num_memory_tokens=2', 'model.sliding_window=8',
                           'model.global_layer_interval=2'])
  prompts = [[3, 7, 1, 9, 2], [5, 6, 8]]
  # 5 + 19 = 24 tokens fed, within sinks + window = 4 + 20: nothing is evicted.
  kw = dict(max_new_tokens=20, full_output=True)
  plain = sample.generate(decoder, cfg.model, prompts, **kw)
  streamed = sample.generate(decoder, cfg.model, prompts, streaming_sinks=4,
                             streaming_window=20, **kw)
  assert streamed.tokens == plain.tokens
  np.testing.assert_allclose(streamed.logits, plain.logits, rtol=0,
                             atol=1e-5 * np.abs(plain.logits).max())


@pytest.mark.parametrize('position', ['rope', 'learned'])
def test_streaming_runs_past_max_seq_len_in_a_bounded_cache(position):
  # A learned position table of 16 rows: without re-assigned positions the
  # lookups past row 15 would be out of bounds (NaN).
  cfg, decoder = _decoder([f'model.position={position}', 'model.max_seq_len=16',
                           'model.num_memory_tokens=1'])
  sinks = 2
  got = sample.generate(decoder, cfg.model, [[1, 2, 3], [4]], max_new_tokens=48,
                        streaming_sinks=sinks, full_output=True)
  assert got.logits.shape == (2, 48, 64)
  assert np.isfinite(got.logits).all()
  # Default window: max_seq_len - sinks; the cache never holds more.
  kv, h = cfg.model.num_kv_heads, _head_dim(cfg)
  for layer in got.cache:
    assert layer.k.shape == layer.v.shape == (2, 1 + 16, kv, h)
    assert layer.index.shape == (2, 1 + 16)


def test_cache_layout_sizes():
  cfg, _ = _decoder(['model.sliding_window=8', 'model.global_layer_interval=2',
                     'model.num_memory_tokens=3', 'model.num_layers=4'])
  layout = sample.cache_layout(cfg.model, 100)
  assert [r.size for r in layout] == [3 + 8, 3 + 100, 3 + 8, 3 + 100]
  # Streaming: every layer sinks + window, default window = sliding_window.
  stream = sample.streaming_config(cfg.model, 4)
  assert stream == sample.Streaming(4, 8)
  assert [r.size for r in sample.cache_layout(cfg.model, 100, stream)] == [3 + 4 + 8] * 4
  # The ring visits every rolling slot once per `rolling` tokens, sinks stay put.
  ring = sample.Ring(3, 4, 8)
  slots = ring.slot(np.arange(4 + 3 * 8))
  np.testing.assert_array_equal(slots[:4], 3 + np.arange(4))
  np.testing.assert_array_equal(np.sort(slots[4:12]), 3 + 4 + np.arange(8))
  np.testing.assert_array_equal(slots[12:20], slots[4:12])


def test_cache_positions_are_contiguous():
  # Independent statement of the re-assignment: after `seen` tokens the kept
  # tokens are the sinks and the last W, at positions 0, 1, ..., len - 1.
  stream = sample.Streaming(3, 5)
  for seen in range(1, 20):
    kept = [j for j in range(seen) if j < 3 or j >= seen - 5]
    pos = np.asarray(sample.cache_position(jnp.asarray(kept), seen, stream))
    np.testing.assert_array_equal(pos, np.arange(len(kept)))
  np.testing.assert_array_equal(sample.cache_position(np.arange(7), 7, None), np.arange(7))


def test_bad_streaming_flags_and_learned_overflow_are_refused():
  cfg, decoder = _decoder(['model.position=learned', 'model.max_seq_len=16'])
  with pytest.raises(ValueError, match='streaming_sinks is not'):
    sample.generate(decoder, cfg.model, [[1, 2]], streaming_window=4)
  with pytest.raises(ValueError, match='streaming_sinks=-1'):
    sample.generate(decoder, cfg.model, [[1, 2]], streaming_sinks=-1)
  with pytest.raises(ValueError, match='max_seq_len=16'):
    sample.generate(decoder, cfg.model, [[1, 2]], max_new_tokens=20)


def _logits_of_full_forward(decoder, prompts, new_tokens):
  """float32 [batch, steps, vocab]: for each step s, the plain decoder's logits
  after prompt + the first s new tokens (the next-token logits sampling drew from)."""
  forward = _forward(decoder)
  n = len(new_tokens[0])
  width = max(map(len, prompts)) + n
  seqs = [p + new[:s] for s in range(n) for p, new in zip(prompts, new_tokens)]
  return _last_logits(forward, seqs, width).reshape(n, len(prompts), -1).transpose(1, 0, 2)


@pytest.mark.parametrize('overrides', [
    # Post-norm with layernorm; memory tokens and ALiBi; a window layer (4)
    # under the prompt length, then a global layer.
    ['model.norm_position=post', 'model.norm_type=layernorm', 'model.num_memory_tokens=2',
     'model.position=alibi', 'model.sliding_window=4', 'model.global_layer_interval=2'],
    # Sandwich norms; MoE layers (dropless, top-2 of 4, a shared expert);
    # learned positions, QK-norm, biases, tied head and both soft-caps.
    ['model.norm_position=sandwich', 'model.num_experts=4', 'model.experts_per_token=2',
     'model.moe_d_ff=32', 'model.num_shared_experts=1', 'model.position=learned',
     'model.qk_norm=True', 'model.use_bias=True', 'model.tie_embeddings=True',
     'model.attn_logit_softcap=20.0', 'model.final_logit_softcap=30.0'],
    # Pre-norm, RoPE, GQA, MoE on the second layer only (top-1).
    ['model.num_kv_heads=2', 'model.num_experts=4', 'model.experts_per_token=1',
     'model.moe_d_ff=32', 'model.moe_layer_interval=2', 'model.num_layers=3'],
])
def test_cached_logits_equal_the_decoders_at_every_step(overrides):
  # The sampler runs the decoder's own blocks: at every step (the prefill's
  # last column, then each cached step) its logits are the plain decoder's on
  # the sequence so far, whatever the norm placement, positions, memory
  # tokens, window/global layers or MoE layers; left-padded prompts included.
  cfg, decoder = _decoder(overrides)
  prompts = [[5, 17, 3], [9, 2, 60, 33, 41, 7, 12]]
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=6, full_output=True)
  want = _logits_of_full_forward(decoder, prompts, got.tokens)
  # float32; the cached and full paths sum in different orders (see
  # test_model_attention_variants for the 1e-4 of the largest logit).
  np.testing.assert_allclose(got.logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
  assert all(len(set(new)) > 1 for new in got.tokens)
