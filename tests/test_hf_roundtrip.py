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
    ('deepseek_v3_noq', {'rope_interleave': True}), ('deepseek_v3_yarn', {}),
    ('qwen3_next', {}), ('qwen3_next_c', {}), ('gpt_oss', {}), ('gpt_oss_mqa', {})])
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
    # The Qwen3-Next preset: GDN layers with 2x value heads, partial rotary,
    # elementwise gate, MoE with the gated shared expert.
    ('configs/qwen3_next.py:tiny', ['model.vocab_size=128']),
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


# -- Qwen3-Next ---------------------------------------------------------------


@pytest.mark.parametrize('changes,match', [
    ({'mlp_only_layers': [1]}, r'mlp_only_layers=\[1\]'),
    ({'linear_num_value_heads': 3}, 'linear_num_value_heads=3 is not a multiple'),
    ({'hidden_act': 'gelu'}, "hidden_act='gelu' with linear_attention"),
    ({'shared_expert_intermediate_size': 24}, 'shared_expert_intermediate_size=24'),
    ({'layer_types': ['linear_attention', 'sliding_attention'] * 2}, 'layer_types='),
    ({'attention_bias': True}, 'attention_bias=True'),
])
def test_qwen3_next_import_refusals(changes, match):
  with pytest.raises(hf.HFError, match=match):
    hf.hf_to_model_config(_hf_config('qwen3_next', **changes))


def test_qwen3_next_import_fields():
  """The released config.json form (top-level partial_rotary_factor and
  full_attention_interval, no layer_types) maps like transformers reads it."""
  hf_cfg = _hf_config('qwen3_next')
  del hf_cfg['layer_types']
  hf_cfg['rope_parameters'] = {'rope_type': 'default', 'rope_theta': 1e7}
  hf_cfg.update(full_attention_interval=2, partial_rotary_factor=0.5)
  m = hf.hf_to_model_config(hf_cfg)[1]
  assert (m.layer_pattern, m.rope_fraction, m.rope_theta) == ('LA', 0.5, 1e7)
  m = hf.hf_to_model_config(_hf_config('qwen3_next'))[1]
  assert (m.layer_pattern, m.gdn_num_heads, m.gdn_num_v_heads, m.gdn_head_dim,
          m.gdn_v_head_dim, m.rope_fraction, m.attention_gate, m.qk_norm, m.num_experts,
          m.num_shared_experts, m.moe_shared_expert_gate, m.moe_renormalize,
          m.tie_embeddings) == ('LLLA', 2, 4, 8, 8, 0.25, 'elementwise', True, 4, 1,
                                True, True, False)
  m = hf.hf_to_model_config(_hf_config('qwen3_next_b'))[1]
  assert (m.layer_pattern, m.moe_layer_interval, m.num_shared_experts,
          m.moe_renormalize) == ('LA', 2, 2, False)
  m = hf.hf_to_model_config(_hf_config('qwen3_next_c'))[1]
  assert (m.layer_pattern, m.moe_first_dense_layers, m.tie_embeddings) == ('LAA', 1, True)


@pytest.mark.parametrize('overrides,match', [
    (["model.attention_gate='none'"], "attention_gate='none'"),
    (['model.moe_shared_expert_gate=False'], 'moe_shared_expert_gate=False'),
    (["model.mlp_activation='gelu'"], "mlp_activation='gelu' with Gated DeltaNet"),
    (['model.moe_capacity_factor=1.5'], 'moe_capacity_factor=1.5'),
    (['model.sliding_window=8'], 'sliding_window=8'),
])
def test_qwen3_next_export_refusals(overrides, match, tmp_path):
  cfg = configs.load('configs/qwen3_next.py:tiny', overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match=match):
    hf.save(cfg, decoder, str(tmp_path))


def test_partial_rotary_alone_is_refused_outside_qwen3_next(tmp_path):
  """A Llama with rope_fraction < 1 has no HF family that ablax writes (the
  Qwen3-Next export names what is missing), rather than a silent full rotary."""
  cfg = configs.load('configs/llama.py:tiny', ['model.rope_fraction=0.5'])
  with pytest.raises(hf.HFError, match='qk_norm=False'):
    hf.model_config_to_hf(cfg.model)


def test_qwen3_next_release_extras_import(tmp_path, caplog):
  """The released checkpoint's extras: an MTP layer (`mtp.*` tensors, which
  transformers skips) and Qwen's window fields switched off. The tensors are
  dropped with a warning; the rest imports as without them."""
  import json
  from safetensors.numpy import save_file
  model = hf_families.make_hf_model('qwen3_next')
  model.save_pretrained(tmp_path)
  path = str(tmp_path / 'model.safetensors')
  tensors = load_file(path)
  tensors['mtp.fc.weight'] = np.ones((32, 64), np.float32)
  tensors['mtp.norm.weight'] = np.ones((32,), np.float32)
  save_file(tensors, path, metadata={'format': 'pt'})
  with open(tmp_path / 'config.json') as fh:
    hf_cfg = json.load(fh)
  hf_cfg.update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
                use_sliding_window=False, sliding_window=None, max_window_layers=48)
  with open(tmp_path / 'config.json', 'w') as fh:
    json.dump(hf_cfg, fh)
  with caplog.at_level('WARNING'):
    _, decoder = hf.load(str(tmp_path))
  assert '2 multi-token-prediction tensors (mtp.*) dropped' in caplog.text
  np.testing.assert_array_equal(np.asarray(decoder.blocks[0].attn.conv.get_value()),
                                tensors['model.layers.0.linear_attn.conv1d.weight'][:, 0].T)
# -- GPT-OSS (issue 17) -----------------------------------------------------------


def _gpt_oss_decoder(overrides=()):
  """The gpt_oss preset with every parameter random: sinks N(0, 1.5^2) so they
  take real mass, a spread router and its bias, biases N(0, 0.3^2), and
  swiglu_limit 1 so that the clamps act."""
  cfg = configs.load('configs/gpt_oss.py:tiny', ['model.vocab_size=128',
                                                 'model.sliding_window=8',
                                                 'model.mlp_swiglu_limit=1.0', *overrides])
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(3))
  rng = np.random.RandomState(0)
  for path, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    key = '.'.join(map(str, path))
    shape = var.get_value().shape
    if key.endswith('norm.scale'):
      var.set_value(1.0 + 0.3 * rng.randn(*shape).astype(np.float32))
    elif key.endswith(('attn.sinks', 'mlp.router', 'mlp.router_bias')):
      var.set_value(1.5 * rng.randn(*shape).astype(np.float32))
    elif key.endswith(('.bq', '.bk', '.bv', '.bo')) or '.b_' in key:
      var.set_value(0.3 * rng.randn(*shape).astype(np.float32))
    elif '.w_' in key:   # experts: pre-activations of O(1), past the limit
      var.set_value(0.3 * rng.randn(*shape).astype(np.float32))
  return cfg, decoder


@pytest.mark.parametrize('overrides', [
    [],
    # YaRN as GPT-OSS writes it (truncate=False), scaled to these lengths.
    ["model.rope_scaling={'type': 'yarn', 'factor': 4.0, 'original_max_seq_len': 8, "
     "'truncate': False}", 'model.num_layers=3', 'model.global_layer_interval=3'],
], ids=['preset', 'yarn_3_layers'])
def test_gpt_oss_preset_exports_to_transformers(overrides, tmp_path):
  """The preset (sinks, sliding/full layers, biased GQA, router bias, biased
  experts, clamped SwiGLU) loads as GptOssForCausalLM with the same logits
  (20 tokens: past the window of 8), and comes back bit for bit."""
  cfg, decoder = _gpt_oss_decoder(overrides)
  hf.save(cfg, decoder, str(tmp_path / 'out'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', attn_implementation='eager').float().eval()
  assert type(reloaded).__name__ == 'GptOssForCausalLM'
  assert reloaded.config.layer_types == [
      'full_attention' if (i + 1) % cfg.model.global_layer_interval == 0
      else 'sliding_attention' for i in range(cfg.model.num_layers)]
  tokens = hf_families.random_tokens(5, (2, 20))
  want = np.asarray(decoder(jnp.asarray(tokens))[0])
  got = hf_families.hf_logits(reloaded, tokens)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.max(np.abs(want)))
  cfg2, decoder2 = hf.load(str(tmp_path / 'out'))
  for key in ('sliding_window', 'global_layer_interval', 'mlp_swiglu_limit',
              'mlp_swiglu_alpha', 'num_experts', 'experts_per_token'):
    assert cfg2.model[key] == cfg.model[key], key
  if cfg.model.rope_scaling is not None:   # the export writes YaRN's default betas
    assert dict(cfg2.model.rope_scaling) == dict(beta_fast=32.0, beta_slow=1.0,
                                                 **cfg.model.rope_scaling)
  before = nnx.to_flat_state(nnx.state(decoder, nnx.Param))
  after = dict(nnx.to_flat_state(nnx.state(decoder2, nnx.Param)))
  for path, var in before:
    np.testing.assert_array_equal(np.asarray(after[path][...]), np.asarray(var[...]),
                                  err_msg=str(path))


@pytest.mark.parametrize('preset,overrides,match', [
    ('configs/gpt_oss.py:tiny', ['model.attention_sinks=False'], 'attention_sinks=False'),
    ('configs/gpt_oss.py:tiny', ['model.qk_norm=True'], 'qk_norm=True'),
    ('configs/gpt_oss.py:tiny', ['model.moe_layer_interval=2'], 'moe_layer_interval=2'),
    ('configs/gpt_oss.py:tiny', ['model.num_shared_experts=1'], 'num_shared_experts=1'),
    ('configs/gpt_oss.py:tiny', ['model.moe_renormalize=False'], 'moe_renormalize=False'),
    ('configs/gpt_oss.py:tiny', ["model.rope_scaling={'type': 'ntk', 'factor': 2.0, "
                                 "'original_max_seq_len': 64}"], "rope_scaling.type='ntk'"),
    ('configs/llama.py:tiny', ['model.attention_sinks=True'], "mlp_activation='silu'"),
    ('configs/mixtral.py:tiny', ['model.moe_router_bias=True'], 'attention_sinks=False'),
])
def test_gpt_oss_export_refusals(preset, overrides, match, tmp_path):
  """A model with a GPT-OSS-only flag but another layout is refused, naming
  the field, and nothing is written."""
  cfg = configs.load(preset, overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match=match.replace('(', r'\(')):
    hf.save(cfg, decoder, str(tmp_path))
  assert not (tmp_path / 'config.json').exists()
