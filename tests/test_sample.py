"""train.sample: top-k and top-p sampling restrict the support as specified.

The cache (greedy decoding against full re-computation, rolling windows,
StreamingLLM sinks) is tested in test_sample_cache.py.
"""

import jax
import jax.numpy as jnp

from train import sample


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  top_k = {int(sample.sample_logits(logits, k, 1.0, top_k=2)[0]) for k in keys}
  assert top_k == {0, 1}
  top_p = {int(sample.sample_logits(logits, k, 1.0, top_p=0.85)[0]) for k in keys}
  assert top_p == {0, 1, 2}
