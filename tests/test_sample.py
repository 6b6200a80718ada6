"""train.sample: the KV-cache decoder gives the tokens of full re-computation."""

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx

import configs
import model as model_lib
from train import sample


def _greedy_full(decoder, prompts, n):
  """Greedy continuations by re-running the whole forward at every step."""
  tokens = np.asarray(prompts, np.int32)
  for _ in range(n):
    logits, _ = decoder(jnp.asarray(tokens))
    tokens = np.concatenate([tokens, np.asarray(jnp.argmax(logits[:, -1], -1))[:, None]], 1)
  return tokens[:, len(prompts[0]):].tolist()


@pytest.mark.parametrize('overrides', [
    # GQA + sliding window + RoPE: generation runs past the window (4).
    ['model.num_kv_heads=2', 'model.sliding_window=4', 'model.position=rope'],
    # ALiBi + memory tokens.
    ['model.position=alibi', 'model.num_memory_tokens=2'],
])
def test_cached_greedy_equals_full_forward(overrides):
  cfg = configs.load('configs/llama.py:tiny', ['model.vocab_size=64'] + overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(1))
  # Larger weights than the init, so that the argmax depends on the context.
  for _, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    var.set_value(var.get_value() * 8.0 if var.get_value().ndim > 1 else var.get_value())
  prompts = [[3, 7, 1, 9, 2], [5, 5, 6, 8, 1]]
  got = sample.generate(decoder, cfg.model, prompts, max_new_tokens=7)
  assert got == _greedy_full(decoder, prompts, 7)
  assert all(len(set(new)) > 1 for new in got)


def test_top_k_and_top_p_restrict_the_support():
  import jax
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  top_k = {int(sample.sample_logits(logits, k, 1.0, top_k=2)[0]) for k in keys}
  assert top_k == {0, 1}
  top_p = {int(sample.sample_logits(logits, k, 1.0, top_p=0.85)[0]) for k in keys}
  assert top_p == {0, 1, 2}
