"""Qwen3-Next-style hybrid (Qwen team 2025): three Gated DeltaNet layers per
gated-attention layer, MoE with a gated shared expert.

    python -m train --config configs/qwen3_next.py:tiny --workdir /tmp/ablax_qwen3_next_tiny
    python -m train --config configs/qwen3_next.py:small --workdir /tmp/ablax_qwen3_next_small

Sizes: `tiny` (default; 571k parameters, 8 experts) and `small` (27.26M).
With `--config.train.steps=20` the tiny run logs eval loss 5.79 at step 0 (about
ln 320) and 3.80 at step 20 (about 5 min on a shared 2-core CPU).
Qwen3-Next-80B-A3B's layout at a small scale: RMSNorm pre-norm, SwiGLU, GQA,
QK-norm, untied embeddings, RoPE theta 1e7 on the first quarter of each head
(`rope_fraction=0.25`, partial rotary), and `layer_pattern='LLLA'`: Gated
DeltaNet layers (model/gdn.py) with twice as many value heads as q/k heads
(`gdn_num_v_heads`) and, every fourth layer, attention with the elementwise
output gate (docs/attention.md); every layer's MLP is an MoE of softmax top-k
routed experts with renormalised weights plus one shared expert scaled by a
sigmoid gate (`moe_shared_expert_gate`). `python -m model.hf export` writes it
as a transformers `Qwen3NextForCausalLM` (docs/hf.md).
Differences from Qwen3-Next: the sizes (80B-A3B: 512 experts, 10 per token,
48 layers), and no multi-token-prediction layers (its released checkpoint
has them; transformers ignores them). Its norms' (1 + w) weight form is a
conversion matter (model/hf.py), not a different function.
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                 d_ff=192, gdn_num_heads=2, gdn_num_v_heads=4, gdn_head_dim=16,
                 moe_d_ff=64),
    'small': dict(d_model=384, num_layers=8, num_heads=6, num_kv_heads=2, head_dim=128,
                  d_ff=1024, gdn_num_heads=3, gdn_num_v_heads=6, gdn_head_dim=64,
                  moe_d_ff=256),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.norm_eps = 1e-6
  m.rope_theta = 1e7
  m.rope_fraction = 0.25
  m.tie_embeddings = False
  m.qk_norm = True
  m.attention_gate = 'elementwise'
  m.layer_pattern = 'LLLA'
  m.gdn_conv_width = 4
  m.num_experts = 8
  m.experts_per_token = 2
  m.num_shared_experts = 1
  m.moe_shared_expert_gate = True
  m.moe_renormalize = True
  return config
