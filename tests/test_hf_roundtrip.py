"""model.hf: export to transformers, and HF -> ablax -> HF without a bit changed."""

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file

import configs
import model as model_lib
from model import hf
from tests import hf_families

transformers = pytest.importorskip(
    'transformers', reason='needs transformers (the Hugging Face reference)')


@pytest.mark.parametrize('family', ['llama', 'qwen2', 'gemma2', 'gpt2', 'qwen3_moe',
                                    'mpt', 'bloom'])
def test_hf_ablax_hf_is_bitwise_identical(family, tmp_path):
  model = hf_families.make_hf_model(family, quantize_norms=True)
  model.save_pretrained(tmp_path / 'in')
  cfg, decoder = hf.load(str(tmp_path / 'in'))
  hf.save(cfg, decoder, str(tmp_path / 'out'))
  before = load_file(str(tmp_path / 'in' / 'model.safetensors'))
  after = load_file(str(tmp_path / 'out' / 'model.safetensors'))
  assert sorted(before) == sorted(after)
  for name in before:
    assert before[name].dtype == after[name].dtype, name
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', attn_implementation='eager')
  assert type(reloaded).__name__ == type(model).__name__


@pytest.mark.parametrize('preset,overrides', [
    ('configs/llama.py:tiny', ['model.vocab_size=128', 'model.num_layers=2']),
    ('configs/gemma2.py:tiny', ['model.vocab_size=128', 'model.num_layers=2',
                                'model.sliding_window=8']),
    ('configs/mixtral.py:tiny', ['model.vocab_size=128', 'model.num_layers=2']),
    # ALiBi exports: MPT without embedding_norm, Bloom with it; 6 heads (the
    # slopes' non-power-of-two rule) and an MPT softmax_scale.
    ('configs/mpt.py:tiny', ['model.vocab_size=128', 'model.d_model=48', 'model.num_heads=6',
                             'model.num_kv_heads=6', 'model.d_ff=192', 'model.attn_scale=0.3']),
    ('configs/bloom.py:tiny', ['model.vocab_size=128', 'model.d_model=48', 'model.num_heads=6',
                               'model.num_kv_heads=6', 'model.d_ff=192']),
])
def test_ablax_to_transformers_logits(preset, overrides, tmp_path):
  cfg = configs.load(preset, overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(3))
  # Random norm scales (and, where the HF family has them, norm biases and
  # projection biases) too, so that their mapping is checked.
  for path, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    key = '.'.join(map(str, path))
    rng = np.random.RandomState(len(key))
    if 'norm' in key and key.endswith('scale'):
      var.set_value(1.0 + 0.3 * rng.randn(*var.get_value().shape).astype(np.float32))
    elif cfg.model.use_bias and (key.endswith('bias') or '.b' in key):
      var.set_value(0.3 * rng.randn(*var.get_value().shape).astype(np.float32))
  hf.save(cfg, decoder, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation='eager').float().eval()
  tokens = hf_families.random_tokens(5, (2, 20))
  want, _ = decoder(jnp.asarray(tokens))
  want = np.asarray(want)
  got = hf_families.hf_logits(reloaded, tokens)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.max(np.abs(want)))


def _hf_config(family, **changes):
  hf_cfg = hf_families.make_hf_model(family).config.to_dict()
  for key, value in changes.items():
    if key.startswith('attn_config.'):
      hf_cfg['attn_config'][key.split('.', 1)[1]] = value
    else:
      hf_cfg[key] = value
  return hf_cfg


@pytest.mark.parametrize('family,changes,match', [
    ('mpt', {'attn_config.clip_qkv': 6.0}, 'clip_qkv=6.0'),
    ('mpt', {'attn_config.alibi_bias_max': 16}, 'alibi_bias_max=16'),
    ('mpt', {'attn_config.qk_ln': True}, 'qk_ln=True'),
    ('mpt', {'attn_config.attn_type': 'multiquery_attention'}, 'attn_type'),
    ('mpt', {'expansion_ratio': 2}, 'expansion_ratio=2'),
    ('mpt', {'no_bias': False}, 'no_bias=False'),
    ('mpt', {'logit_scale': 2.0}, 'logit_scale=2.0'),
    ('mpt', {'attn_config.sliding': 3}, "'sliding'"),
    ('bloom', {'apply_residual_connection_post_layernorm': True},
     'apply_residual_connection_post_layernorm=True'),
])
def test_alibi_import_refusals(family, changes, match):
  with pytest.raises(hf.HFError, match=match):
    hf.hf_to_model_config(_hf_config(family, **changes))


def test_mpt_softmax_scale_is_attn_scale():
  m = hf.hf_to_model_config(_hf_config('mpt', **{'attn_config.softmax_scale': 0.25}))[1]
  assert m.attn_scale == 0.25


@pytest.mark.parametrize('preset,overrides,match', [
    ('configs/mpt.py:tiny', ['model.use_bias=True'], 'use_bias=False'),
    ('configs/mpt.py:tiny', ['model.mlp_gated=True'], 'MPT/Bloom layout'),
    ('configs/bloom.py:tiny', ['model.mlp_activation="gelu"'], 'gelu_tanh'),
    ('configs/llama.py:tiny', ['model.embedding_norm=True'], 'embedding_norm'),
])
def test_alibi_export_refusals(preset, overrides, match, tmp_path):
  cfg = configs.load(preset, overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match=match):
    hf.save(cfg, decoder, str(tmp_path))


def test_mpt_export_refuses_layernorm_bias(tmp_path):
  """ablax's LayerNorm has a bias, MPT's has none: a nonzero one is refused."""
  cfg = configs.load('configs/mpt.py:tiny')
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  decoder.blocks[1].mlp_norm.bias.set_value(decoder.blocks[1].mlp_norm.bias[...] + 0.1)
  with pytest.raises(hf.HFError, match='blocks.1.mlp_norm.bias is not zero'):
    hf.save(cfg, decoder, str(tmp_path))
