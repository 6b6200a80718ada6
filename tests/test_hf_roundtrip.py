"""model.hf: export to transformers, and HF -> ablax -> HF without a bit changed."""

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file

import configs
import model as model_lib
from model import hf
from model import moe as moe_lib
from tests import hf_families

transformers = pytest.importorskip(
    'transformers', reason='needs transformers (the Hugging Face reference)')


# deepseek_v3_noq keeps DeepSeek's interleaved rope here: the export always
# writes rope_interleave=True, so a half-split checkpoint comes back permuted.
@pytest.mark.parametrize('family,overrides', [
    ('llama', {}), ('qwen2', {}), ('gemma2', {}), ('gpt2', {}), ('qwen3_moe', {}),
    ('mpt', {}), ('bloom', {}), ('deepseek_v3', {}), ('diffllama', {}), ('diffllama_mha', {}),
    ('deepseek_v3_noq', {'rope_interleave': True}), ('deepseek_v3_yarn', {})])
def test_hf_ablax_hf_is_bitwise_identical(family, overrides, tmp_path):
  model = hf_families.make_hf_model(family, quantize_norms=True, **overrides)
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


def test_deepseek_v3_mtp_layer_round_trips_bitwise(tmp_path):
  """HF -> ablax -> HF with DeepSeek's MTP layer present (its own tensors and
  the embedding/head copies): every tensor comes back bit for bit, and
  num_nextn_predict_layers = mtp_depth."""
  import json
  model = hf_families.make_hf_model('deepseek_v3', num_nextn_predict_layers=1)
  model.save_pretrained(tmp_path / 'in')
  before = hf_families.with_deepseek_mtp_layer(model, str(tmp_path / 'in' / 'model.safetensors'))
  cfg, decoder = hf.load(str(tmp_path / 'in'))
  assert cfg.model.mtp_depth == 1
  hf.save(cfg, decoder, str(tmp_path / 'out'))
  after = load_file(str(tmp_path / 'out' / 'model.safetensors'))
  assert sorted(before) == sorted(after)
  for name in before:
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  with open(tmp_path / 'out' / 'config.json') as fh:
    assert json.load(fh)['num_nextn_predict_layers'] == 1


@pytest.mark.parametrize('preset,overrides', [
    ('configs/llama.py:tiny', ['model.vocab_size=128', 'model.num_layers=2']),
    ('configs/gemma2.py:tiny', ['model.vocab_size=128', 'model.num_layers=2',
                                'model.sliding_window=8']),
    ('configs/mixtral.py:tiny', ['model.vocab_size=128', 'model.num_layers=2']),
    # Differential attention exports as DiffLlama (its lambda vectors random,
    # as every parameter of the fresh decoder).
    ('configs/llama.py:tiny', ['model.vocab_size=128', 'model.num_layers=3',
                               "model.attention_type='differential'"]),
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
  differential = cfg.model.attention_type == 'differential'
  for path, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    key = '.'.join(map(str, path))
    rng = np.random.RandomState(len(key))
    if 'norm' in key and key.endswith('scale'):
      var.set_value(1.0 + 0.3 * rng.randn(*var.get_value().shape).astype(np.float32))
    elif '.lambda_' in key:   # differential: lambda away from lambda_init
      # (seeded by the whole name: the four lambda names have one length)
      rng = np.random.RandomState(sum(map(ord, key)))
      var.set_value(0.4 * rng.randn(*var.get_value().shape).astype(np.float32))
    elif differential and key.endswith(('attn.wq', 'attn.wk')):
      # Sharp softmaxes: with near-uniform maps A1 ~ A2 the per-head norm
      # cancels lambda, and a wrong lambda map would go unseen.
      shape = var.get_value().shape
      var.set_value(1.5 * rng.randn(*shape).astype(np.float32) / np.sqrt(shape[0]))
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
  # Unrolled, to set one layer's bias (export unrolls a scanned decoder too).
  cfg = configs.load('configs/mpt.py:tiny', ['model.scan_layers=false'])
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  decoder.blocks[1].mlp_norm.bias.set_value(decoder.blocks[1].mlp_norm.bias[...] + 0.1)
  with pytest.raises(hf.HFError, match='blocks.1.mlp_norm.bias is not zero'):
    hf.save(cfg, decoder, str(tmp_path))


def _dsv3_decoder(overrides=()):
  cfg = configs.load('configs/deepseek_v3.py:tiny', ['model.vocab_size=128', *overrides])
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(3))
  rng = np.random.RandomState(0)
  for path, var in nnx.to_flat_state(nnx.state(decoder, (nnx.Param, moe_lib.ExpertBias))):
    key = '.'.join(map(str, path))
    shape = var.get_value().shape
    if key.endswith('norm.scale'):
      var.set_value(1.0 + 0.3 * rng.randn(*shape).astype(np.float32))
    elif key.endswith('mlp.bias'):      # the selection bias: moves the choice
      var.set_value(0.5 * rng.randn(*shape).astype(np.float32))
    elif key.endswith('mlp.router'):
      var.set_value(rng.randn(*shape).astype(np.float32))
  return cfg, decoder


def test_deepseek_v3_preset_exports_to_transformers(tmp_path, caplog):
  """The MLA + sigmoid-router preset loads as DeepseekV3ForCausalLM with the
  same logits (interleaved rope columns, selection bias, groups, first dense
  layer, shared expert); its MTP module goes out as DeepSeek's MTP layer
  (which transformers does not run) and comes back with the same MTP logits."""
  cfg, decoder = _dsv3_decoder()
  hf.save(cfg, decoder, str(tmp_path))
  L = cfg.model.num_layers
  assert f'model.layers.{L}.eh_proj.weight' in load_file(str(tmp_path / 'model.safetensors'))
  cfg2, decoder2 = hf.load(str(tmp_path))
  assert cfg2.model.mtp_depth == cfg.model.mtp_depth >= 1
  x = jnp.asarray(hf_families.random_tokens(6, (2, 12)))
  mtp = []
  for d in (decoder, decoder2):
    hidden, _ = d.mtp_hidden_states(d.hidden_states(x)[0], x)
    mtp.append(np.asarray(d.mtp_logits(1, hidden[0])))
  np.testing.assert_allclose(mtp[1], mtp[0], rtol=0, atol=1e-5 * np.max(np.abs(mtp[0])))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation='eager').float().eval()
  assert type(reloaded).__name__ == 'DeepseekV3ForCausalLM'
  tokens = hf_families.random_tokens(5, (2, 20))
  want = np.asarray(decoder(jnp.asarray(tokens))[0])
  got = hf_families.hf_logits(reloaded, tokens)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.max(np.abs(want)))


@pytest.mark.parametrize('overrides,match', [
    (['model.moe_router="softmax"', 'train.moe_bias_update_rate=0.0'], "moe_router='softmax'"),
    (['model.num_shared_experts=0'], 'num_shared_experts=0'),
    (['model.moe_capacity_factor=1.5'], 'moe_capacity_factor=1.5'),
    (['model.moe_layer_interval=2'], 'moe_layer_interval=2'),
    (['model.moe_num_groups=16', 'model.moe_topk_groups=4'], 'groups need 2'),
    (['model.sliding_window=8'], 'sliding_window=8'),
])
def test_deepseek_v3_export_refusals(overrides, match, tmp_path):
  cfg = configs.load('configs/deepseek_v3.py:tiny', overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match=match):
    hf.save(cfg, decoder, str(tmp_path))


@pytest.mark.parametrize('overrides,match', [
    (['model.sliding_window=8'], "'differential' with a mistral layout"),
    (['model.qk_norm=True'], "'differential' with a qwen3 layout"),
    (['model.num_kv_heads=1'], 'num_kv_heads=1'),
    (['model.use_bias=True'], 'use_bias'),
    (['model.position="alibi"'], "position='alibi'"),
])
def test_diffllama_export_refusals(overrides, match, tmp_path):
  cfg = configs.load('configs/llama.py:tiny', ["model.attention_type='differential'"] + overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match=match):
    hf.save(cfg, decoder, str(tmp_path))


def test_diffllama_import_refuses_attention_bias():
  with pytest.raises(hf.HFError, match='attention_bias'):
    hf.hf_to_model_config(_hf_config('diffllama', attention_bias=True))
