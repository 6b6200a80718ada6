"""model.hf: imported transformers models give transformers' logits (float32)."""

import numpy as np
import pytest
import jax.numpy as jnp

from model import hf
from tests import hf_families

# The longest sequence (40) runs past the sliding window (8) of Mistral and
# Gemma 2 and past Llama 3's original_max_position_embeddings (16).
SHAPES = [(2, 12), (1, 40)]


def _assert_close(got, want):
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize('family', sorted(hf_families.FAMILIES))
def test_import_matches_transformers_logits(family, tmp_path):
  model = hf_families.make_hf_model(family)
  model.save_pretrained(tmp_path)
  cfg, decoder = hf.load(str(tmp_path))
  for i, shape in enumerate(SHAPES):
    tokens = hf_families.random_tokens(i, shape)
    want = hf_families.hf_logits(model, tokens)
    got, _ = decoder(jnp.asarray(tokens))
    _assert_close(np.asarray(got), want)
  assert cfg.model.vocab_size == 128


def test_family_flags():
  """The import sets the ablax flags each family is known for."""
  m = hf.hf_to_model_config(hf_families.make_hf_model('gemma2').config.to_dict())[1]
  assert (m.norm_position, m.embedding_scale, m.global_layer_interval,
          m.sliding_window, m.mlp_activation) == ('sandwich', True, 2, 8, 'gelu_tanh')
  assert m.attn_scale == pytest.approx(12 ** -0.5)
  m = hf.hf_to_model_config(hf_families.make_hf_model('gpt2').config.to_dict())[1]
  assert (m.position, m.norm_type, m.use_bias, m.mlp_gated) == ('learned', 'layernorm', True, False)
  m = hf.hf_to_model_config(hf_families.make_hf_model('qwen3_moe').config.to_dict())[1]
  assert (m.num_experts, m.moe_d_ff, m.moe_renormalize, m.qk_norm) == (4, 16, False, True)
