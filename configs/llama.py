"""LLaMA-style decoder (Touvron et al. 2023): RMSNorm pre-norm, RoPE, SwiGLU, GQA.

    python -m train --config configs/llama.py:tiny --workdir /tmp/ablax_llama_tiny
    python -m train --config configs/llama.py:small --workdir /tmp/ablax_llama_small

Sizes: `tiny` (default; 140k parameters) and `small` (9.69M).
No biases, untied input and output embeddings, grouped-query attention as in
Llama 2 70B and Llama 3. With the bytes tokenizer the first logged loss is
about ln(320) = 5.8.
"""

from configs import _sizes
from configs import base

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=192),
    'small': dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, d_ff=1024),
}


def set_layout(m):
  """The LLaMA flags on `config.model`; the presets built on LLaMA start here."""
  m.norm_type = 'rmsnorm'
  m.norm_position = 'pre'
  m.norm_eps = 1e-5
  m.position = 'rope'
  m.rope_theta = 10000.0
  m.mlp_activation = 'silu'
  m.mlp_gated = True
  m.use_bias = False
  m.tie_embeddings = False


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  set_layout(config.model)
  return config
