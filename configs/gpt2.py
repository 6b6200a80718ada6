"""GPT-2-style decoder (Radford et al. 2019).

    python -m train --config configs/gpt2.py:tiny --workdir /tmp/ablax_gpt2_tiny
    python -m train --config configs/gpt2.py:small --workdir /tmp/ablax_gpt2_small
    # GPT-1 / original-transformer post-norm:
    python -m train --config configs/gpt2.py:tiny --workdir /tmp/ablax_gpt2_post \
        --config.model.norm_position=post

Sizes: `tiny` (default; 129k parameters) and `small` (10.87M).
LayerNorm pre-norm with a final LayerNorm, a learned position table of
max_seq_len rows, a 4x GELU MLP (the tanh approximation GPT-2 used), full
multi-head attention, biases on every projection, tied embeddings.
"""

from configs import _sizes
from configs import base

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=256),
    'small': dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, d_ff=1536),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  m.norm_type = 'layernorm'
  m.norm_position = 'pre'
  m.norm_eps = 1e-5
  m.position = 'learned'
  m.mlp_activation = 'gelu_tanh'
  m.mlp_gated = False
  m.use_bias = True
  m.tie_embeddings = True
  return config
