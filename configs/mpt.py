"""MPT-style decoder (MosaicML 2023, "MPT-7B"): ALiBi instead of position embeddings.

    python -m train --config configs/mpt.py:tiny --workdir /tmp/ablax_mpt_tiny
    python -m train --config configs/mpt.py:small --workdir /tmp/ablax_mpt_small

Sizes: `tiny` (default; 119k parameters) and `small` (10.75M).
LayerNorm pre-norm, ALiBi biases with the paper's per-head slopes (Press et
al. 2021), a 4x GELU MLP, full multi-head attention, no biases on the
projections, tied embeddings.
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
  m.position = 'alibi'
  m.mlp_activation = 'gelu'
  m.mlp_gated = False
  m.use_bias = False
  m.tie_embeddings = True
  return config
