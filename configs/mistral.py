"""Mistral-style decoder (Jiang et al. 2023, "Mistral 7B"): LLaMA plus sliding-window attention.

    python -m train --config configs/mistral.py:tiny --workdir /tmp/ablax_mistral_tiny
    python -m train --config configs/mistral.py:small --workdir /tmp/ablax_mistral_small

Sizes: `tiny` (default; 135k parameters) and `small` (9.54M).
RMSNorm pre-norm, RoPE, SwiGLU, GQA with 4 query heads per K/V head (as
Mistral 7B's 32/8), and every layer attends to a window of the last
`sliding_window` tokens (4096 of 32k in Mistral 7B; a quarter of the row
here, so the window matters during training).
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=1, d_ff=192,
                 sliding_window=32),
    'small': dict(d_model=384, num_layers=6, num_heads=8, num_kv_heads=2, d_ff=1024,
                  sliding_window=64),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.global_layer_interval = None
  return config
