"""Tiny random transformers models of every family `model.hf` maps (tests only)."""

import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='needs torch and transformers (the Hugging Face reference)')
transformers = pytest.importorskip(
    'transformers', reason='needs torch and transformers (the Hugging Face reference)')

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

DSV3 = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)

YARN = dict(rope_type='yarn', rope_theta=10000.0, factor=4.0,
            original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
            mscale=0.7, mscale_all_dim=0.7)

Q3N = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           max_position_embeddings=64, linear_num_key_heads=2, linear_num_value_heads=4,
           linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=16)
# GPT-OSS: YaRN as its released config writes it (truncate=False), scaled
# down: factor 4 over 64 positions with theta 1000, so that with head_dim 8
# the correction range ends inside a pair (1.35): rounded out (truncate=True)
# it would give another ramp.
GPT_OSS_YARN = dict(rope_type='yarn', rope_theta=1000.0, factor=4.0,
                    original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                    truncate=False)
GPT_OSS = dict(vocab_size=128, hidden_size=32, intermediate_size=16,
               max_position_embeddings=64, num_attention_heads=4)

FAMILIES = {
    'llama': lambda: transformers.LlamaConfig(**COMMON, rope_parameters=dict(
        rope_type='llama3', rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16)),
    'llama_bias': lambda: transformers.LlamaConfig(**COMMON, attention_bias=True,
                                                    mlp_bias=True, tie_word_embeddings=True),
    'mistral': lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
    'qwen2': lambda: transformers.Qwen2Config(**COMMON),
    'qwen3': lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    'gemma2': lambda: transformers.Gemma2Config(**COMMON, head_dim=8, sliding_window=8,
                                                query_pre_attn_scalar=12,
                                                attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0),
    'gpt2': lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=64, bos_token_id=0, eos_token_id=0),
    'mixtral': lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4,
                                                  num_experts_per_tok=2),
    'qwen3_moe': lambda: transformers.Qwen3MoeConfig(**COMMON, num_experts=4,
                                                     num_experts_per_tok=2,
                                                     moe_intermediate_size=16,
                                                     norm_topk_prob=False),
    # DeepSeek-V3: MLA with query compression, 8 experts in 2 groups (1 kept),
    # the first layer dense, one shared expert, DeepSeek's interleaved rope.
    'deepseek_v3': lambda: transformers.DeepseekV3Config(**DSV3, q_lora_rank=24,
                                                         n_group=2, topk_group=1,
                                                         first_k_dense_replace=1,
                                                         n_shared_experts=1),
    # No query compression, one group, every layer MoE, two shared experts,
    # unnormalised weights, rope in the half-split layout.
    'deepseek_v3_noq': lambda: transformers.DeepseekV3Config(**DSV3, q_lora_rank=None,
                                                             n_group=1, topk_group=1,
                                                             first_k_dense_replace=0,
                                                             n_shared_experts=2,
                                                             norm_topk_prob=False,
                                                             routed_scaling_factor=1.5,
                                                             rope_interleave=False),
    # Differential attention: GQA (4 query heads over 2 key/value heads) with
    # Llama 3 rope, and MHA with head_dim 16 != hidden/heads, 4 layers (lambda_init
    # 0.2 .. 0.58) and tied embeddings. make_hf_model draws the lambda vectors
    # N(0, 0.4^2) so that lambda differs from lambda_init.
    'diffllama': lambda: transformers.DiffLlamaConfig(**COMMON, rope_parameters=dict(
        rope_type='llama3', rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16)),
    'diffllama_mha': lambda: transformers.DiffLlamaConfig(
        **dict(COMMON, num_key_value_heads=4, num_hidden_layers=4), head_dim=16,
        tie_word_embeddings=True),
    # YaRN as DeepSeek-V3's released config writes it (mscale = mscale_all_dim),
    # scaled: factor 4 over an original 16 positions (the tests run 12 and 40),
    # mscale 0.7 (not the default 1, so a dropped mscale shows).
    'deepseek_v3_yarn': lambda: transformers.DeepseekV3Config(
        **DSV3, q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=1,
        n_shared_experts=1, rope_parameters=YARN),
    # Qwen3-Next: 'LLLA' with 2 q/k GDN heads serving 4 value heads (r = 2),
    # partial rotary 0.25 of head_dim 16, MoE with the gated shared expert.
    'qwen3_next': lambda: transformers.Qwen3NextConfig(**Q3N),
    # Other shapes: r = 1 (value heads = q/k heads) with dk != dv, 'LA'
    # pattern (one of each, repeating), 3 heads of 8 over 1 key/value head,
    # rope on half the head, MoE every second layer, two shared-expert widths
    # (num_shared_experts=2), unnormalised top-k.
    'qwen3_next_b': lambda: transformers.Qwen3NextConfig(**dict(
        Q3N, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1, head_dim=8,
        linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=8,
        linear_value_head_dim=12, layer_types=['linear_attention', 'full_attention'] * 2,
        decoder_sparse_step=2, shared_expert_intermediate_size=32, norm_topk_prob=False,
        rope_parameters=dict(rope_type='default', rope_theta=1e6,
                             partial_rotary_factor=0.5))),
    # r = 3, pattern 'LAA' over 3 layers, first layer dense (mlp_only_layers),
    # tied embeddings.
    'qwen3_next_c': lambda: transformers.Qwen3NextConfig(**dict(
        Q3N, num_hidden_layers=3, linear_num_key_heads=1, linear_num_value_heads=3,
        layer_types=['linear_attention', 'full_attention', 'full_attention'],
        mlp_only_layers=[0], tie_word_embeddings=True)),
    # GPT-OSS: GQA (4 query heads on 2 key/value heads), sliding (window 8)
    # and full layers alternating (transformers' default layer_types), YaRN
    # without truncation, 4 experts top-2, swiglu_limit 1 so that the clamps
    # of the gate and the up projection act on the random weights.
    'gpt_oss': lambda: transformers.GptOssConfig(
        **GPT_OSS, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
        sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
        swiglu_limit=1.0, rope_parameters=GPT_OSS_YARN),
    # MQA with head_dim 16 != hidden/heads, 3 layers full only at index 2
    # (global_layer_interval 3), window 4, plain rope, 8 experts top-3, another
    # alpha and limit, tied embeddings.
    'gpt_oss_mqa': lambda: transformers.GptOssConfig(
        **GPT_OSS, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
        sliding_window=4, layer_types=['sliding_attention', 'sliding_attention',
                                       'full_attention'],
        num_local_experts=8, num_experts_per_tok=3, swiglu_alpha=1.2, swiglu_limit=0.8,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type='default', rope_theta=10000.0)),
    # ALiBi families with non-power-of-two head counts (the slopes' second rule).
    'mpt': lambda: transformers.MptConfig(vocab_size=128, d_model=48, n_heads=6, n_layers=2,
                                          max_seq_len=64),
    'bloom': lambda: transformers.BloomConfig(vocab_size=128, hidden_size=48, n_layer=2,
                                              n_head=12),
}


def make_hf_model(family: str, seed: int = 0, quantize_norms: bool = False, **overrides):
  """A random float32 transformers model; every weight drawn (norms included).

  quantize_norms: norm weights on a 2^-8 grid, so Gemma's `1 + w` conversion is
  exact and the HF -> ablax -> HF round trip can be compared bit for bit.
  overrides: config fields to change (e.g. vocab_size).
  """
  torch.manual_seed(seed)
  cfg = FAMILIES[family]()
  for key, value in overrides.items():
    setattr(cfg, key, value)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation='eager')
  model = model.float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or '.ln_' in name:
        # Gemma's and Qwen3-Next's norms are 1 + w (not Qwen3-Next's gated GDN norm).
        one_plus = family == 'gemma2' or (family.startswith('qwen3_next')
                                          and 'linear_attn.norm' not in name)
        w = torch.randn_like(p) * 0.3 + (0.0 if one_plus else 1.0)
        if quantize_norms:
          w = torch.round(w * 256) / 256
        p.copy_(w)
      elif '.lambda_' in name:
        p.copy_(torch.randn_like(p) * 0.4)  # DiffLlama: lambda away from lambda_init
      elif ('gate.weight' in name and p.shape[0] <= 8) or '.router.' in name:
        p.copy_(torch.randn_like(p))        # router: spread the expert choices
      elif name.endswith('linear_attn.A_log'):
        # Decays exp(-A softplus(.)) from ~0.1 to ~0.9: state carried and forgotten.
        p.copy_(torch.randn_like(p) * 0.5 - 1.0)
      elif name.endswith('linear_attn.conv1d.weight'):
        p.copy_(torch.randn_like(p) * 0.5)
      elif name.endswith('.sinks'):
        p.copy_(torch.randn_like(p) * 2.0)  # GPT-OSS: sinks that take real mass
      else:
        p.copy_(torch.randn_like(p) * 0.15)
    for name, b in model.named_buffers():
      if name.endswith('e_score_correction_bias'):
        # DeepSeek-V3's selection bias: large enough to change the choice.
        b.copy_(torch.randn_like(b) * 0.5)
  return model


def random_tokens(seed: int, shape, vocab=128):
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def with_deepseek_mtp_layer(model, path, seed=1):
  """Adds DeepSeek's MTP layer (model.layers.{L}.*, L = num_hidden_layers) to
  a saved checkpoint: a decoder layer's weights (MoE) plus enorm, hnorm,
  eh_proj, shared_head.norm, and copies of the embedding and the head; all
  drawn at random. Returns the tensors."""
  from safetensors.numpy import load_file, save_file
  rng = np.random.RandomState(seed)
  tensors = load_file(path)
  L, d = model.config.num_hidden_layers, model.config.hidden_size
  for name in [k for k in tensors if k.startswith(f'model.layers.{L - 1}.')]:
    w = tensors[name]
    tensors[name.replace(f'layers.{L - 1}.', f'layers.{L}.')] = (
        (1 + 0.1 * rng.randn(*w.shape)) if name.endswith('norm.weight') or 'layernorm' in name
        else w.std() * rng.randn(*w.shape)).astype(np.float32)
  for name in ('enorm', 'hnorm', 'shared_head.norm'):
    tensors[f'model.layers.{L}.{name}.weight'] = (1 + 0.1 * rng.randn(d)).astype(np.float32)
  tensors[f'model.layers.{L}.eh_proj.weight'] = (0.1 * rng.randn(d, 2 * d)).astype(np.float32)
  tensors[f'model.layers.{L}.embed_tokens.weight'] = tensors['model.embed_tokens.weight'].copy()
  tensors[f'model.layers.{L}.shared_head.head.weight'] = tensors['lm_head.weight'].copy()
  save_file(tensors, path, metadata={'format': 'pt'})
  return tensors
