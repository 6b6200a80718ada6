"""Mixtral-style sparse mixture of experts (Jiang et al. 2024, "Mixtral of Experts").

    python -m train --config configs/mixtral.py:tiny --workdir /tmp/ablax_mixtral_tiny
    python -m train --config configs/mixtral.py:small --workdir /tmp/ablax_mixtral_small

Sizes: `tiny` (default; 456k parameters) and `small` (30.79M).
The Mistral layout (RMSNorm pre-norm, RoPE with theta 1e6, GQA) with every
MLP replaced by 8 SwiGLU experts of the dense MLP's width, a softmax router
picking the top 2 per token and renormalising their weights, dropless. As in
the released Mixtral configs, attention is global (no sliding window; add
`--config.model.sliding_window=N` for Mistral's). TensorBoard adds
`train/moe_aux_loss`, `train/moe_router_z_loss` and
`train/moe_expert_load_max` (1.0 is a perfectly balanced router).
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=1, d_ff=128),
    'small': dict(d_model=384, num_layers=6, num_heads=8, num_kv_heads=2, d_ff=512),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.rope_theta = 1e6
  m.num_experts = 8
  m.experts_per_token = 2
  m.num_shared_experts = 0
  m.moe_d_ff = m.d_ff
  m.moe_layer_interval = 1
  m.moe_capacity_factor = None
  m.moe_renormalize = True
  return config
