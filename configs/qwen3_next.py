"""Qwen3-Next-style hybrid (Qwen team 2025): three Gated DeltaNet layers per
gated-attention layer, MoE with a shared expert.

    python -m train --config configs/qwen3_next.py:tiny --workdir /tmp/ablax_qwen3_next_tiny
    python -m train --config configs/qwen3_next.py:small --workdir /tmp/ablax_qwen3_next_small

Sizes: `tiny` (default; 564k parameters, 8 experts) and `small` (28.03M).
Qwen3's layout (RMSNorm pre-norm, RoPE theta 1e6, SwiGLU, GQA, QK-norm, tied
embeddings) with `layer_pattern='LLLA'`: Gated DeltaNet layers (model/gdn.py)
and, every fourth layer, attention with Qwen3-Next's elementwise output gate
(docs/attention.md); every layer's MLP is an MoE with one shared expert.
Differences from Qwen3-Next kept on purpose or not yet built: its attention
rotates only a quarter of each head (partial rotary; ablax rotates all of
it), its GDN layers have twice as many value heads as q/k heads (here one
count), its shared expert has a sigmoid gate, and its norms use the
(1 + scale) form (a conversion matter).
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                 d_ff=192, gdn_num_heads=4, gdn_head_dim=16, moe_d_ff=64),
    'small': dict(d_model=384, num_layers=8, num_heads=6, num_kv_heads=2, head_dim=128,
                  d_ff=1024, gdn_num_heads=6, gdn_head_dim=64, moe_d_ff=256),
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
  m.attention_gate = 'elementwise'
  m.layer_pattern = 'LLLA'
  m.gdn_conv_width = 4
  m.num_experts = 8
  m.experts_per_token = 2
  m.num_shared_experts = 1
  return config
