"""Bloom-style decoder (BigScience 2022, "BLOOM"): ALiBi and a LayerNorm on the embeddings.

    python -m train --config configs/bloom.py:tiny --workdir /tmp/ablax_bloom_tiny
    python -m train --config configs/bloom.py:small --workdir /tmp/ablax_bloom_small

Sizes: `tiny` (default; 121k parameters) and `small` (10.77M), the shapes of
`configs/mpt.py`.
LayerNorm pre-norm with a LayerNorm on the word embeddings
(`model.embedding_norm`), ALiBi biases with the paper's per-head slopes
(Press et al. 2021), a 4x GELU MLP (tanh approximation), full multi-head
attention, biases on every projection, tied embeddings. It exports to
transformers' BloomForCausalLM (`python -m model.hf export`, docs/hf.md).
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
  m.embedding_norm = True
  m.mlp_activation = 'gelu_tanh'
  m.mlp_gated = False
  m.use_bias = True
  m.tie_embeddings = True
  return config
