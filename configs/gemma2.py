"""Gemma 2-style decoder (Gemma Team 2024, "Gemma 2").

    python -m train --config configs/gemma2.py:tiny --workdir /tmp/ablax_gemma2_tiny
    python -m train --config configs/gemma2.py:small --workdir /tmp/ablax_gemma2_small

Sizes: `tiny` (default; 144k parameters) and `small` (9.86M).
RMSNorm before and after each sublayer (sandwich), RoPE, GeGLU (tanh GELU,
gated), GQA, tied embeddings scaled by sqrt(d_model), attention logits
soft-capped at 50 and final logits at 30, and local sliding-window layers
alternating with global ones (layers 1, 3, ... global; window 4096 of 8192 in
Gemma 2, half the row here).
"""

from configs import _sizes
from configs import base

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=256,
                 sliding_window=64),
    'small': dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=3, d_ff=1024,
                  sliding_window=128),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  m.norm_type = 'rmsnorm'
  m.norm_position = 'sandwich'
  m.norm_eps = 1e-6
  m.position = 'rope'
  m.rope_theta = 10000.0
  m.mlp_activation = 'gelu_tanh'
  m.mlp_gated = True
  m.use_bias = False
  m.tie_embeddings = True
  m.embedding_scale = True
  m.attn_logit_softcap = 50.0
  m.final_logit_softcap = 30.0
  m.global_layer_interval = 2
  return config
