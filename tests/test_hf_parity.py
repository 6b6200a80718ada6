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


def test_deepseek_v3_flags():
  """DeepSeek-V3's fields land on MLA and the sigmoid group-limited router."""
  m = hf.hf_to_model_config(hf_families.make_hf_model('deepseek_v3').config.to_dict())[1]
  assert (m.attention_type, m.mla_q_lora_rank, m.mla_kv_lora_rank, m.mla_qk_nope_head_dim,
          m.mla_qk_rope_head_dim, m.mla_v_head_dim) == ('mla', 24, 16, 8, 8, 12)
  assert (m.moe_router, m.num_experts, m.experts_per_token, m.moe_num_groups,
          m.moe_topk_groups, m.moe_first_dense_layers, m.num_shared_experts, m.moe_d_ff,
          m.d_ff, m.moe_renormalize, m.moe_routed_scaling, m.mtp_depth) == (
              'sigmoid', 8, 2, 2, 1, 1, 1, 16, 64, True, 2.5, 0)
  m = hf.hf_to_model_config(hf_families.make_hf_model('deepseek_v3_noq').config.to_dict())[1]
  assert (m.mla_q_lora_rank, m.moe_num_groups, m.moe_first_dense_layers,
          m.num_shared_experts, m.moe_renormalize, m.moe_routed_scaling) == (
              0, 1, 0, 2, False, 1.5)


def test_deepseek_v3_mtp_tensors_are_dropped_with_a_warning(tmp_path, caplog):
  """A checkpoint with its MTP layer (model.layers.{num_hidden_layers}.*, as
  DeepSeek's releases) imports without it and computes the same logits."""
  from safetensors.numpy import load_file, save_file
  model = hf_families.make_hf_model('deepseek_v3')
  model.save_pretrained(tmp_path)
  path = str(tmp_path / 'model.safetensors')
  tensors = load_file(path)
  last = model.config.num_hidden_layers - 1
  for name in [k for k in tensors if k.startswith(f'model.layers.{last}.')]:
    tensors[name.replace(f'layers.{last}.', f'layers.{last + 1}.')] = tensors[name]
  tensors[f'model.layers.{last + 1}.eh_proj.weight'] = np.zeros((32, 64), np.float32)
  save_file(tensors, path, metadata={'format': 'pt'})
  with caplog.at_level('WARNING'):
    cfg, decoder = hf.load(str(tmp_path))
  assert 'multi-token-prediction tensors' in caplog.text
  assert cfg.model.mtp_depth == 0
  tokens = hf_families.random_tokens(0, (2, 12))
  got, _ = decoder(jnp.asarray(tokens))
  _assert_close(np.asarray(got), hf_families.hf_logits(model, tokens))
