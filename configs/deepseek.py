"""DeepSeekMoE / DeepSeek-V3-style decoder (Dai et al. 2024, "DeepSeekMoE";
DeepSeek-AI 2024, "DeepSeek-V3 Technical Report").

    python -m train --config configs/deepseek.py:tiny --workdir /tmp/ablax_deepseek_tiny
    python -m train --config configs/deepseek.py:small --workdir /tmp/ablax_deepseek_small

Sizes: `tiny` (default; 278k parameters) and `small` (30.10M).
Fine-grained experts: many narrow SwiGLU experts (a quarter of the dense MLP's
width) with several routed per token, plus shared experts every token goes
through (DeepSeekMoE 16B: 64 routed of width 1408, top 6, 2 shared). The
router is DeepSeek-V3's: sigmoid scores, the chosen experts' weights
renormalised to sum to 1, group-limited routing (4 groups, the experts of the
best 2 eligible) and auxiliary-loss-free balancing (a per-expert selection
bias moved by 1e-3 per step, `train.moe_bias_update_rate`) with a small
Switch loss beside it (DeepSeek-V3's sequence-wise loss has weight 1e-4; here
the batch-wise one). The first layer is dense, as in DeepSeek-V3 (3 of 61)
and DeepSeekMoE (1). RMSNorm pre-norm, RoPE, full multi-head attention (not
MLA), untied embeddings. Add `--config.model.mtp_depth=1` for DeepSeek-V3's
multi-token prediction (docs/moe.md). The previous DeepSeekMoE router:
`--config.model.moe_router=softmax --config.model.moe_renormalize=False
--config.model.moe_num_groups=1 --config.model.moe_topk_groups=1
--config.train.moe_bias_update_rate=0 --config.model.moe_first_dense_layers=0`.
"""

from configs import _sizes
from configs import base
from configs import llama

SHAPES = {
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, d_ff=192,
                 num_experts=16, experts_per_token=4, num_shared_experts=2, moe_d_ff=48),
    'small': dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, d_ff=1024,
                  num_experts=32, experts_per_token=4, num_shared_experts=2, moe_d_ff=128),
}


def get_config(arg=None):
  config = base.get_config()
  _sizes.apply(config, arg, SHAPES)
  m = config.model
  llama.set_layout(m)
  m.norm_eps = 1e-6
  m.moe_layer_interval = 1
  m.moe_first_dense_layers = 1
  m.moe_capacity_factor = None
  m.moe_router = 'sigmoid'
  m.moe_renormalize = True
  m.moe_num_groups = 4
  m.moe_topk_groups = 2
  config.train.moe_bias_update_rate = 1e-3
  config.train.moe_aux_loss_weight = 1e-4
  return config
