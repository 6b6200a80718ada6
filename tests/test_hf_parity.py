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
              'sigmoid', 8, 2, 2, 1, 1, 1, 16, 64, True, 2.5, 1)
  m = hf.hf_to_model_config(hf_families.make_hf_model('deepseek_v3_noq').config.to_dict())[1]
  assert (m.mla_q_lora_rank, m.moe_num_groups, m.moe_first_dense_layers,
          m.num_shared_experts, m.moe_renormalize, m.moe_routed_scaling) == (
              0, 1, 0, 2, False, 1.5)


def _mtp_reference_logits(model, tensors, tokens):
  """Depth 1's logits computed from the HF tensors (DeepSeek-V3 report,
  section 2.2, in DeepSeek's layout): h = the main model's last hidden state
  before its final norm; e = Emb(x_{i+1}) (0 past the end);
  x = eh_proj [RMSNorm_enorm(e); RMSNorm_hnorm(h)] (embedding first);
  x = the MTP decoder layer (transformers' own layer class, its weights
  loaded); logits = shared_head.head(RMSNorm_shared_head.norm(x))."""
  torch = hf_families.torch
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
  cfg = model.config
  L, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
  q = f'model.layers.{L}.'
  w = lambda name: torch.tensor(tensors[q + name])
  rms = lambda x, g: g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
  seen = {}
  hook = model.model.layers[-1].register_forward_hook(
      lambda mod, args, out: seen.setdefault('h', out[0] if isinstance(out, tuple) else out))
  tok = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    model(tok)
    hook.remove()
    h = seen['h']
    shifted = torch.cat([tok[:, 1:], torch.zeros_like(tok[:, :1])], dim=1)
    e = torch.nn.functional.embedding(shifted, w('embed_tokens.weight'))
    x = torch.cat([rms(e, w('enorm.weight')), rms(h, w('hnorm.weight'))], -1) @ w('eh_proj.weight').T
    layer = ds.DeepseekV3DecoderLayer(cfg, layer_idx=L).eval()
    state = {k[len(q):]: torch.tensor(v) for k, v in tensors.items() if k.startswith(q)}
    # The layer class holds its experts fused: gate_up_proj [E, 2 f, d] (gate
    # rows first), down_proj [E, d, f]; the checkpoint stores them per expert.
    e_range = range(cfg.n_routed_experts)
    state['mlp.experts.gate_up_proj'] = torch.stack([torch.cat(
        [state.pop(f'mlp.experts.{e}.gate_proj.weight'),
         state.pop(f'mlp.experts.{e}.up_proj.weight')]) for e in e_range])
    state['mlp.experts.down_proj'] = torch.stack(
        [state.pop(f'mlp.experts.{e}.down_proj.weight') for e in e_range])
    missing, _ = layer.load_state_dict(state, strict=False)
    assert not missing, missing
    b, t = tok.shape
    pos = torch.arange(t)[None].expand(b, t)
    cos_sin = model.model.rotary_emb(x, pos)
    mask = torch.full((t, t), float('-inf')).triu(1)[None, None].expand(b, 1, t, t)
    x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    x = x[0] if isinstance(x, tuple) else x
    return (rms(x, w('shared_head.norm.weight')) @ w('shared_head.head.weight').T).numpy()


def test_deepseek_v3_mtp_layer_imports_and_matches_a_reference(tmp_path):
  """DeepSeek's MTP layer becomes ablax's depth-1 MTP module: its logits equal
  the computation above written from DeepSeek's layout (transformers does not
  run MTP), and the main logits still equal transformers'."""
  model = hf_families.make_hf_model('deepseek_v3')
  model.save_pretrained(tmp_path)
  tensors = hf_families.with_deepseek_mtp_layer(model, str(tmp_path / 'model.safetensors'))
  cfg, decoder = hf.load(str(tmp_path))
  assert cfg.model.mtp_depth == 1
  tokens = hf_families.random_tokens(0, (2, 12))
  x = jnp.asarray(tokens)
  got, _ = decoder(x)
  _assert_close(np.asarray(got), hf_families.hf_logits(model, tokens))
  h, _ = decoder.hidden_states(x)
  hidden, _ = decoder.mtp_hidden_states(h, x)
  got = np.asarray(decoder.mtp_logits(1, hidden[0]))
  _assert_close(got, _mtp_reference_logits(model, tensors, tokens))


def test_deepseek_v3_mtp_copies_must_equal_the_main_ones(tmp_path):
  from safetensors.numpy import save_file
  model = hf_families.make_hf_model('deepseek_v3')
  model.save_pretrained(tmp_path)
  path = str(tmp_path / 'model.safetensors')
  tensors = hf_families.with_deepseek_mtp_layer(model, path)
  L = model.config.num_hidden_layers
  tensors[f'model.layers.{L}.shared_head.head.weight'] += 1
  save_file(tensors, path, metadata={'format': 'pt'})
  with pytest.raises(hf.HFError, match='shared_head.head.weight differs from lm_head'):
    hf.load(str(tmp_path))


def test_deepseek_v3_without_mtp_tensors_imports_with_depth_0(tmp_path, caplog):
  """transformers' save_pretrained writes no MTP layer whatever
  num_nextn_predict_layers says: the import warns and sets mtp_depth=0."""
  model = hf_families.make_hf_model('deepseek_v3', num_nextn_predict_layers=1)
  model.save_pretrained(tmp_path)
  with caplog.at_level('WARNING'):
    cfg, decoder = hf.load(str(tmp_path))
  assert 'no multi-token-prediction tensors' in caplog.text
  assert cfg.model.mtp_depth == 0
  tokens = hf_families.random_tokens(0, (2, 12))
  got, _ = decoder(jnp.asarray(tokens))
  _assert_close(np.asarray(got), hf_families.hf_logits(model, tokens))


@pytest.mark.parametrize('change,field', [
    (dict(mscale=1.0, mscale_all_dim=0.7), 'mscale=1.0, mscale_all_dim=0.7'),
    (dict(mscale_all_dim=0), 'mscale_all_dim=0'),
    (dict(attention_factor=1.2), 'attention_factor'),
    (dict(truncate=False), 'truncate=False')])
def test_deepseek_v3_yarn_refusals(change, field):
  """YaRN variants ablax's MLA cannot compute (model/mla.py puts the attention
  factor on the whole softmax scale) are refused, naming the field."""
  hf_cfg = hf_families.make_hf_model('deepseek_v3_yarn').config.to_dict()
  hf_cfg['rope_parameters'] = {**hf_families.YARN, **change}
  with pytest.raises(hf.HFError, match=field.replace('.', r'\.')):
    hf.hf_to_model_config(hf_cfg)


def test_deepseek_v3_yarn_fields():
  m = hf.hf_to_model_config(hf_families.make_hf_model('deepseek_v3_yarn').config.to_dict())[1]
  assert dict(m.rope_scaling) == pytest.approx(dict(
      type='yarn', factor=4.0, original_max_seq_len=16, beta_fast=32.0, beta_slow=1.0,
      attention_factor=0.1 * 0.7 * np.log(4.0) + 1))
  out = hf.model_config_to_hf(m)[1]['rope_parameters']
  assert (out['rope_type'], out['factor'], out['original_max_position_embeddings']) == (
      'yarn', 4.0, 16)
  assert out['mscale'] == out['mscale_all_dim'] == pytest.approx(0.7)


def test_qwen3_next_past_a_delta_rule_chunk(tmp_path):
  """70 tokens: both sides run the chunked delta rule over two chunks of 64
  (the state carried across the boundary), with 2 value heads per q/k head."""
  model = hf_families.make_hf_model('qwen3_next')
  model.save_pretrained(tmp_path)
  _, decoder = hf.load(str(tmp_path))
  tokens = hf_families.random_tokens(7, (1, 70))
  got, _ = decoder(jnp.asarray(tokens))
  _assert_close(np.asarray(got), hf_families.hf_logits(model, tokens))
# -- GPT-OSS (issue 17) -----------------------------------------------------------


def test_gpt_oss_flags():
  """GPT-OSS's fields land on the general flags: sinks, biases, the window on
  even layers (full at odd indices: global_layer_interval 2), the biased
  softmax top-k router, the clamped SwiGLU's alpha and limit, YaRN untruncated."""
  m = hf.hf_to_model_config(hf_families.make_hf_model('gpt_oss').config.to_dict())[1]
  assert (m.attention_sinks, m.use_bias, m.sliding_window, m.global_layer_interval,
          m.num_kv_heads, m.head_dim) == (True, True, 8, 2, 2, 8)
  assert (m.num_experts, m.experts_per_token, m.moe_router, m.moe_renormalize,
          m.moe_router_bias, m.moe_layer_interval, m.moe_d_ff, m.d_ff) == (
              4, 2, 'softmax', True, True, 1, None, 16)
  assert (m.mlp_activation, m.mlp_gated, m.mlp_swiglu_alpha, m.mlp_swiglu_limit) == (
      'clamped_swiglu', True, 1.702, 1.0)
  assert dict(m.rope_scaling) == dict(type='yarn', factor=4.0, original_max_seq_len=64,
                                      beta_fast=32.0, beta_slow=1.0, truncate=False)
  m = hf.hf_to_model_config(hf_families.make_hf_model('gpt_oss_mqa').config.to_dict())[1]
  assert (m.num_kv_heads, m.head_dim, m.sliding_window, m.global_layer_interval,
          m.rope_scaling, m.mlp_swiglu_alpha, m.tie_embeddings) == (1, 16, 4, 3, None, 1.2, True)


@pytest.mark.parametrize('rope', [
    dict(hf_families.GPT_OSS_YARN),
    dict(hf_families.GPT_OSS_YARN, truncate=True),
    dict(hf_families.GPT_OSS_YARN, mscale=0.7, mscale_all_dim=0.4),
    dict(hf_families.GPT_OSS_YARN, attention_factor=1.3, beta_fast=8.0, beta_slow=2.0),
    # The released model's: factor 32 over 4096 positions, theta 150000.
    dict(rope_type='yarn', rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
         truncate=False, original_max_position_embeddings=4096),
], ids=['released_form', 'truncate', 'mscale', 'attention_factor', 'released_values'])
def test_gpt_oss_yarn_frequencies_match_transformers(rope):
  """The imported rope_scaling gives transformers' YaRN inverse frequencies and
  attention factor (head_dim 64, as GPT-OSS)."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from model import positions
  hf_cfg = hf_families.transformers.GptOssConfig(
      **dict(hf_families.GPT_OSS, max_position_embeddings=131072), num_hidden_layers=2,
      head_dim=64, num_key_value_heads=2, num_local_experts=4, rope_parameters=dict(rope))
  want_freq, want_factor = ROPE_INIT_FUNCTIONS['yarn'](hf_cfg, 'cpu')
  m = hf.hf_to_model_config(hf_cfg.to_dict())[1]
  freq, factor = positions.rope_inv_freq(64, m.rope_theta, dict(m.rope_scaling))
  np.testing.assert_allclose(freq, want_freq.numpy(), rtol=1e-6)
  assert factor == pytest.approx(want_factor, rel=1e-6)


@pytest.mark.parametrize('changes,match', [
    (dict(quantization_config={'quant_method': 'mxfp4'}), 'Mxfp4Config\\(dequantize=True\\)'),
    (dict(attention_bias=False), 'attention_bias=False'),
    (dict(layer_types=['full_attention', 'sliding_attention']), 'every k-th layer'),
    (dict(layer_types=['sliding_attention']), "num_hidden_layers=2 of 'sliding_attention'"),
    (dict(layer_types=['sliding_attention', 'chunked_attention']), 'chunked_attention'),
    (dict(sliding_window=None), 'sliding_window is None'),
    (dict(rope_parameters=dict(hf_families.GPT_OSS_YARN, partial_rotary_factor=0.5)),
     'partial_rotary_factor'),
    (dict(rope_parameters=dict(rope_type='longrope', rope_theta=1e4)), "'longrope'"),
])
def test_gpt_oss_import_refusals(changes, match):
  """HF GPT-OSS configs that ablax does not compute are refused, naming the field."""
  hf_cfg = hf_families.make_hf_model('gpt_oss').config.to_dict()
  hf_cfg.update(changes)
  with pytest.raises(hf.HFError, match=match):
    hf.hf_to_model_config(hf_cfg)


def test_gpt_oss_all_sliding_and_all_full_layers():
  hf_cfg = hf_families.make_hf_model('gpt_oss').config.to_dict()
  m = hf.hf_to_model_config(dict(hf_cfg, layer_types=['sliding_attention'] * 2))[1]
  assert (m.sliding_window, m.global_layer_interval) == (8, None)
  m = hf.hf_to_model_config(dict(hf_cfg, layer_types=['full_attention'] * 2))[1]
  assert (m.sliding_window, m.global_layer_interval) == (None, None)
