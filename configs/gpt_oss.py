"""GPT-OSS-style sparse model (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card").

    python -m train --config configs/gpt_oss.py:tiny --workdir /tmp/ablax_gpt_oss_tiny
    python -m train --config configs/gpt_oss.py:small --workdir /tmp/ablax_gpt_oss_small

Sizes: `tiny` (default; 267k parameters, 8 experts top 2) and `small` (24.55M,
16 experts top 4, experts half the model width).
The LLaMA layout (RMSNorm pre-norm, RoPE, GQA, untied head) with GPT-OSS's
changes, each a general flag:
- biases on the q/k/v/o projections and the experts (`use_bias`);
- a learned sink logit per head in every softmax (`attention_sinks`);
- sliding-window layers alternating with full ones, full at odd indices
  (`sliding_window`, `global_layer_interval=2`; 128 tokens in GPT-OSS, here
  32 for tiny and 64 for small, so the window binds on their 128- and
  256-token rows);
- RoPE theta 150000;
- an MoE in every layer, a router with a bias (`moe_router_bias`), top-k of
  the logits then a softmax over the k chosen (the softmax router with
  `moe_renormalize`), dropless;
- the experts' clamped SwiGLU, alpha 1.702 and limit 7 (`mlp_activation=
  'clamped_swiglu'`, `mlp_swiglu_alpha`, `mlp_swiglu_limit`).
Left out on purpose: the released models' YaRN (factor 32 over 4096
positions) is a context extension for long rows, not for these sizes; add
`--config.model.rope_scaling="{'type': 'yarn', 'factor': 32.0,
'original_max_seq_len': 4096, 'truncate': False}"` for it. The checkpoints
(`python -m model.hf import`) are imported with every field of theirs.
TensorBoard adds the MoE tags (`train/moe_aux_loss`, ...).
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 d_ff=64, num_experts=8, experts_per_token=2, sliding_window=32),
    'small': dict(d_model=384, num_layers=6, num_heads=8, num_kv_heads=2, head_dim=64,
                  d_ff=192, num_experts=16, experts_per_token=4, sliding_window=64),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.rope_theta = 150000.0
  m.use_bias = True
  m.attention_sinks = True
  m.global_layer_interval = 2
  m.moe_layer_interval = 1
  m.moe_d_ff = None              # the experts are d_ff wide (GPT-OSS: intermediate_size)
  m.moe_capacity_factor = None
  m.moe_router = 'softmax'
  m.moe_renormalize = True
  m.moe_router_bias = True
  m.mlp_activation = 'clamped_swiglu'
  m.mlp_swiglu_alpha = 1.702
  m.mlp_swiglu_limit = 7.0
  return config
