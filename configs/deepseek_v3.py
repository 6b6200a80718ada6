"""DeepSeek-V3-style decoder (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report").

    python -m train --config configs/deepseek_v3.py:tiny --workdir /tmp/ablax_dsv3_tiny
    python -m train --config configs/deepseek_v3.py:small --workdir /tmp/ablax_dsv3_small

Sizes: `tiny` (default; 458k parameters, 273k without the MTP module) and
`small` (33.71M; 28.15M without it).
`configs/deepseek.py` (the DeepSeekMoE router on standard attention) with
DeepSeek-V3's attention and heads: multi-head latent attention
(`attention_type='mla'`, model/mla.py) with a compressed query, a key/value
latent of rank 32 (tiny) / 128 (small) and a separate RoPE part of 8 / 16
dims per head; the sigmoid router with group-limited routing (4 groups, the
best 2 kept), renormalised weights times DeepSeek-V3's routed scaling 2.5 and
the aux-loss-free selection bias; one shared expert (as V3; DeepSeekMoE had
2); the first layer dense; one multi-token-prediction module (`mtp_depth=1`,
loss weight `train.mtp_loss_weight`). RMSNorm pre-norm, untied embeddings.
A trained workdir exports as transformers' `DeepseekV3ForCausalLM`
(`python -m model.hf export`, docs/hf.md; the MTP module is not exported).
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=192,
                 num_experts=16, experts_per_token=4, num_shared_experts=1, moe_d_ff=48,
                 mla_q_lora_rank=48, mla_kv_lora_rank=32, mla_qk_nope_head_dim=16,
                 mla_qk_rope_head_dim=8, mla_v_head_dim=16),
    'small': dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, d_ff=1024,
                  num_experts=32, experts_per_token=4, num_shared_experts=1, moe_d_ff=128,
                  mla_q_lora_rank=192, mla_kv_lora_rank=128, mla_qk_nope_head_dim=48,
                  mla_qk_rope_head_dim=16, mla_v_head_dim=48),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.head_dim = None
  m.attention_type = 'mla'
  m.norm_eps = 1e-6
  m.moe_layer_interval = 1
  m.moe_first_dense_layers = 1
  m.moe_capacity_factor = None
  m.moe_router = 'sigmoid'
  m.moe_renormalize = True
  m.moe_routed_scaling = 2.5
  m.moe_num_groups = 4
  m.moe_topk_groups = 2
  m.mtp_depth = 1
  config.train.moe_bias_update_rate = 1e-3
  config.train.moe_aux_loss_weight = 1e-4
  return config
