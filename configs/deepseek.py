"""DeepSeekMoE-style decoder (Dai et al. 2024, "DeepSeekMoE").

    python -m train --config configs/deepseek.py:tiny --workdir /tmp/ablax_deepseek_tiny
    python -m train --config configs/deepseek.py:small --workdir /tmp/ablax_deepseek_small

Sizes: `tiny` (default; 408k parameters) and `small` (33.94M).
Fine-grained experts: many narrow SwiGLU experts (a quarter of the dense MLP's
width) with several routed per token, plus shared experts every token goes
through (DeepSeekMoE 16B: 64 routed of width 1408, top 6, 2 shared). The
router's softmax weights are not renormalised over the top k, as in
DeepSeekMoE. RMSNorm pre-norm, RoPE, full multi-head attention, untied
embeddings; every layer is MoE (DeepSeekMoE keeps its first layer dense,
which `moe_layer_interval` cannot express).
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=192,
                 num_experts=16, experts_per_token=4, num_shared_experts=2, moe_d_ff=48),
    'small': dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, d_ff=1024,
                  num_experts=32, experts_per_token=4, num_shared_experts=2, moe_d_ff=128),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.norm_eps = 1e-6
  m.moe_layer_interval = 1
  m.moe_capacity_factor = None
  m.moe_renormalize = False
  return config
