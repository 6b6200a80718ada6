"""model.hf: imported transformers models give transformers' logits (float32)."""

import numpy as np
import pytest
import jax.numpy as jnp

from model import hf
from model import masking
from tests import hf_families

# The longest sequence (40) runs past the sliding window (8) of Mistral and
# Gemma 2 and past Llama 3's original_max_position_embeddings (16). MPT (6
# heads) and Bloom (12 heads) use ALiBi slopes' non-power-of-two rule.
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


def test_family_flags_alibi():
  m = hf.hf_to_model_config(hf_families.make_hf_model('mpt').config.to_dict())[1]
  assert (m.position, m.norm_type, m.use_bias, m.mlp_gated, m.mlp_activation,
          m.embedding_norm, m.tie_embeddings) == ('alibi', 'layernorm', False, False,
                                                  'gelu', False, True)
  m = hf.hf_to_model_config(hf_families.make_hf_model('bloom').config.to_dict())[1]
  assert (m.position, m.use_bias, m.mlp_activation, m.embedding_norm, m.d_ff) == (
      'alibi', True, 'gelu_tanh', True, 4 * m.d_model)


def _published_alibi_slopes(n):
  """Press et al.'s slopes as Bloom's build_alibi_tensor writes them: for the
  closest power of two c <= n, base^1..base^c with base = 2^(-8/c); then the
  odd powers 1, 3, 5, ... of 2^(-4/c) for the n - c remaining heads."""
  c = 2 ** int(np.floor(np.log2(n)))
  base = 2.0 ** (-(2.0 ** -(np.log2(c) - 3)))
  slopes = base ** np.arange(1, 1 + c)
  if c != n:
    extra_base = 2.0 ** (-(2.0 ** -(np.log2(2 * c) - 3)))
    remaining = min(c, n - c)
    slopes = np.concatenate([slopes, extra_base ** np.arange(1, 1 + 2 * remaining, 2)])
  return slopes


@pytest.mark.parametrize('n', [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 40, 64])
def test_alibi_slopes_are_the_published_ones(n):
  np.testing.assert_allclose(masking.alibi_slopes(n), _published_alibi_slopes(n),
                             rtol=1e-6, atol=0)


@pytest.mark.parametrize('n', [4, 6, 12, 20])
def test_alibi_slopes_match_transformers(n):
  """Both HF implementations (Bloom's and MPT's with alibi_bias_max=8) agree."""
  from transformers.models.bloom import modeling_bloom
  from transformers.models.mpt import modeling_mpt
  torch = hf_families.torch
  bloom = modeling_bloom.build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n,
                                            torch.float32)[:, 0, 1].numpy()
  mpt = -modeling_mpt.build_mpt_alibi_tensor(n, 2)[:, 0, 0].numpy()
  np.testing.assert_allclose(masking.alibi_slopes(n), bloom, rtol=1e-6, atol=0)
  np.testing.assert_allclose(masking.alibi_slopes(n), mpt, rtol=1e-6, atol=0)
