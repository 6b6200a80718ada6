"""train.sample with MLA: the latent cache (`model.kv_cache.LatentCache`) and --stats.

The reference is the plain decoder (`model.Decoder`, naive MLA over per-head
keys and values) run on whole sequences: the cached sampler, which keeps only
c_kv and k_r per token and decodes in the absorbed form, must give its logits
at every step. Weights are sharper than the init so that the argmax depends on
the context.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from model import kv_cache
from train import sample
from tests import test_sample_cache as plain

R, DR = 20, 8
MLA = ['model.vocab_size=64', 'model.d_model=32', 'model.num_heads=4', 'model.num_kv_heads=4',
       'model.d_ff=64', 'model.max_seq_len=64', 'model.attention_type=mla',
       f'model.mla_kv_lora_rank={R}', 'model.mla_qk_nope_head_dim=12',
       f'model.mla_qk_rope_head_dim={DR}', 'model.mla_v_head_dim=10',
       'model.attention_impl=xla']


def _decoder(overrides, seed=1):
  cfg = configs.load('configs/base.py', MLA + overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(seed))
  rng = np.random.RandomState(seed)
  for _, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    x = var.get_value()
    if x.ndim > 1:
      var.set_value(jnp.asarray(1.5 * rng.normal(size=x.shape) / np.sqrt(x.shape[0]), x.dtype))
  return cfg, decoder


@pytest.mark.parametrize('overrides', [
    # No query compression; a window layer (4, under the longer prompt) then a
    # global one; memory tokens.
    ['model.sliding_window=4', 'model.global_layer_interval=2', 'model.num_memory_tokens=2'],
    # Query compression, every layer on a window of 5 (a rolling latent ring).
    ['model.mla_q_lora_rank=24', 'model.sliding_window=5'],
])
def test_cached_mla_logits_equal_the_decoders_at_every_step(overrides):
  cfg, decoder = _decoder(overrides)
  prompts = [[5, 17, 3], [9, 2, 60, 33, 41, 7, 12]]     # left-padded batch
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=6, full_output=True)
  assert all(isinstance(c, kv_cache.LatentCache) for c in got.cache)
  want = plain._logits_of_full_forward(decoder, prompts, got.tokens)
  np.testing.assert_allclose(got.logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
  assert all(len(set(new)) > 1 for new in got.tokens)


def test_mla_greedy_equals_greedy_by_full_forwards():
  cfg, decoder = _decoder(['model.mla_q_lora_rank=24', 'model.sliding_window=6',
                           'model.global_layer_interval=2'])
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 64, size=n).tolist() for n in (4, 9)]
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=12)
  assert got == plain._greedy_full(decoder, prompts, 12)


def test_mla_streaming_equals_plain_cache_until_eviction():
  # StreamingLLM over the latent cache (k_r kept before RoPE, rotated by cache
  # positions): while nothing is evicted it is the ordinary cache.
  cfg, decoder = _decoder([])
  prompts = [[3, 8, 1, 22], [40, 2]]
  a = sample.generate(decoder, cfg.model, prompts, max_new_tokens=5, full_output=True,
                      streaming_sinks=2, streaming_window=16)
  b = sample.generate(decoder, cfg.model, prompts, max_new_tokens=5, full_output=True)
  np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-4 * np.abs(b.logits).max())


def test_mla_streaming_logits_equal_full_forward_on_sinks_and_window():
  # One layer, past eviction: the latent cache must give exactly the model on
  # [sinks + last W tokens] at positions 0..N+W-1 (c_kv does not depend on
  # the position; k_r is rotated by its cache position at each step). The
  # first prompt (11) is longer than sinks + window, so it is streamed too.
  cfg, decoder = _decoder(['model.num_layers=1', 'model.mla_q_lora_rank=24'])
  sinks, window, n = 2, 6, 16
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 64, size=k).tolist() for k in (11, 3)]
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=n, full_output=True,
                        temperature=1.0, streaming_sinks=sinks, streaming_window=window)
  seqs = []
  for prompt, new in zip(prompts, got.tokens):
    full = prompt + new
    for s in range(n):
      seen = full[:len(prompt) + s]
      seqs.append(seen[:sinks] + seen[max(sinks, len(seen) - window):])
  want = plain._last_logits(plain._forward(decoder), seqs, sinks + window).reshape(2, n, -1)
  np.testing.assert_allclose(got.logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
  assert all(len(set(new[sinks + window:])) > 3 for new in got.tokens)


@pytest.mark.parametrize('overrides', [[], ['model.attention_type=standard',
                                            'model.num_kv_heads=2']])
def test_stats_bytes_are_numbers_per_token_times_layers_times_bytes(overrides):
  # model.cache_numbers_per_token (r + d_r for MLA, 2 kv h otherwise) x layers
  # x bytes of the dtype; the total is that per slot of each layer's ring.
  cfg, decoder = _decoder(['model.sliding_window=4', 'model.global_layer_interval=2',
                           'model.num_memory_tokens=1', 'model.num_layers=3'] + overrides)
  prompts = [[5, 17, 3], [9, 2, 60, 33, 41]]
  gen = sample.generate(decoder, cfg.model, prompts, max_new_tokens=4, full_output=True)
  st = sample.cache_stats(gen.cache)
  numbers = model_lib.cache_numbers_per_token(cfg.model)
  assert numbers == (R + DR if not overrides else 2 * 2 * 8)
  assert st.bytes_per_token == numbers * 3 * 4
  rings = sample.cache_layout(cfg.model, 5 + 4)
  assert [r.size for r in rings] == [4 + 1, 9 + 1, 4 + 1]
  assert st.total_bytes == 2 * sum(r.size for r in rings) * numbers * 4
  assert gen.decode_tokens == 2 * 2 and gen.decode_seconds > 0
  text = sample.stats_lines(cfg.model, gen)
  assert f'cache: {numbers * 12} bytes/token' in text and f'{st.total_bytes} bytes in all' in text
  assert 'tokens/s' in text
