"""Qwen3-style decoder (Qwen team 2025, "Qwen3 Technical Report"): LLaMA plus QK-norm.

    python -m train --config configs/qwen3.py:tiny --workdir /tmp/ablax_qwen3_tiny
    python -m train --config configs/qwen3.py:small --workdir /tmp/ablax_qwen3_small

Sizes: `tiny` (default; 144k parameters) and `small` (11.93M).
RMSNorm pre-norm, RoPE with theta 1e6, SwiGLU, GQA, no biases, and an RMSNorm
over head_dim on queries and keys before RoPE. As in the small Qwen3 models
the embeddings are tied and head_dim is set on its own, so the attention width
num_heads x head_dim is twice d_model (Qwen3-0.6B: 16 x 128 over 1024).
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                 d_ff=192),
    'small': dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=128,
                  d_ff=1024),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.norm_eps = 1e-6
  m.rope_theta = 1e6
  m.tie_embeddings = True
  m.qk_norm = True
  return config
