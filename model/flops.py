"""Parameter and training-FLOP counts of a decoder config, without building it.

`count_params(cfg_model)` is the exact number of parameters `Decoder` creates
(embeddings included); the tests check it against the built model.

`flops_per_token(cfg_model, seq_len)` is the training cost (forward and
backward) per token of a row of `seq_len` tokens, for MFU. As in Kaplan et al.
2020 and the PaLM paper (Chowdhery et al. 2022, appendix B), the backward pass
costs twice the forward, so training = 3 x forward, and a forward matmul with a
[m, n] weight costs 2 m n per position. Counted:
- the weight matmuls of every layer (q/k/v/o, or MLA's down- and
  up-projections in their training form; the attention gate; the MLP; for
  MoE the router, the `experts_per_token` routed experts and the shared
  experts a token goes through, not all experts), at every position
  including memory tokens;
- the output head (2 d_model vocab; an embedding lookup is free);
- attention scores and the weighted sum of values, 2 num_heads (qk_head_dim +
  v_head_dim) per (query, visible key) pair (MLA: qk = nope + rope;
  differential attention: n query heads of qk = head_dim, v = 2 head_dim), counting
  only pairs the causal / sliding-window / memory mask lets through (what a
  block-skipping kernel computes), for one document per row;
- with `mtp_depth` D, each MTP module's [2 d_model, d_model] projection, its
  block (as one more layer) and its pass through the shared head;
- Gated DeltaNet layers (`model.layer_pattern` L): their projections, and
  the chunked delta rule's matmuls (`model.gdn.gdn_mixing_flops`: linear in
  the sequence length, chunk 64) instead of attention pairs;
and not the elementwise work (norms, activations, softmax, biases), which is
small next to the matmuls.
"""

from model import attention as attention_lib
from model import decoder as decoder_lib
from model import differential
from model import gdn
from model import mla
from model import mlp as mlp_lib
from model import mtp as mtp_lib
from model import norms


def _head_dim(cfg_model) -> int:
  return cfg_model.head_dim or cfg_model.d_model // cfg_model.num_heads


def _moe_d_ff(cfg_model) -> int:
  return cfg_model.moe_d_ff or cfg_model.d_ff


def moe_params(cfg_model) -> int:
  """Parameters of one MoE layer: router, routed experts, shared experts."""
  d, e, f = cfg_model.d_model, cfg_model.num_experts, _moe_d_ff(cfg_model)
  count = d * e + e * mlp_lib.mlp_params(cfg_model, f)
  if cfg_model.get('moe_router_bias', False):
    count += e
  if cfg_model.num_shared_experts:
    count += mlp_lib.mlp_params(cfg_model, f * cfg_model.num_shared_experts)
    if cfg_model.get('moe_shared_expert_gate', False):
      count += d                       # the shared expert's gate vector
  return count


def count_params(cfg_model) -> int:
  """Number of parameters of `Decoder(cfg_model)`, embeddings included."""
  d = cfg_model.d_model
  norm = norms.norm_params(cfg_model.norm_type, d)
  count = cfg_model.vocab_size * d
  if cfg_model.position == 'learned':
    count += cfg_model.max_seq_len * d
  count += cfg_model.num_memory_tokens * d
  if cfg_model.get('embedding_norm', False):
    count += norm
  for i in range(cfg_model.num_layers):
    count += _block_params(cfg_model, i)
  for k in range(cfg_model.get('mtp_depth', 0)):
    count += mtp_lib.mtp_params(cfg_model, _block_params(cfg_model, cfg_model.num_layers + k))
  if cfg_model.norm_position != 'post':
    count += norm
  if not cfg_model.tie_embeddings:
    count += d * cfg_model.vocab_size
  return count


def _block_params(cfg_model, layer_index: int) -> int:
  """Parameters of the block `layer_index` (MTP blocks count on from num_layers)."""
  norm = norms.norm_params(cfg_model.norm_type, cfg_model.d_model)
  if mla.is_linear_layer(cfg_model, layer_index):
    count = gdn.gdn_params(cfg_model)
  elif mla.is_mla(cfg_model):
    count = mla.mla_params(cfg_model)
  elif differential.is_differential(cfg_model):
    count = differential.differential_params(cfg_model)
  else:
    count = attention_lib.attention_params(cfg_model)
  count += (4 if cfg_model.norm_position == 'sandwich' else 2) * norm
  if decoder_lib.is_moe_layer(cfg_model, layer_index):
    return count + moe_params(cfg_model)
  return count + mlp_lib.mlp_params(cfg_model)


def _matmul_weights(cfg_model, layer_index: int) -> int:
  """Weights one position multiplies through in layer `layer_index`."""
  d, n, kv, h = (cfg_model.d_model, cfg_model.num_heads, cfg_model.num_kv_heads,
                 _head_dim(cfg_model))
  if mla.is_linear_layer(cfg_model, layer_index):
    count = gdn.gdn_matmul_weights(cfg_model)
  elif mla.is_mla(cfg_model):
    count = mla.mla_matmul_weights(cfg_model)
  else:
    count = 2 * d * n * h + 2 * d * kv * h + attention_lib.gate_params(cfg_model)
  n_in = 2 if cfg_model.mlp_gated else 1
  if decoder_lib.is_moe_layer(cfg_model, layer_index):
    experts = cfg_model.experts_per_token + cfg_model.num_shared_experts
    count += d * cfg_model.num_experts + experts * (n_in + 1) * d * _moe_d_ff(cfg_model)
    if cfg_model.num_shared_experts and cfg_model.get('moe_shared_expert_gate', False):
      count += d
  else:
    count += (n_in + 1) * d * cfg_model.d_ff
  return count


def visible_pairs(seq_len: int, window: int | None, num_memory: int) -> int:
  """(query, key) pairs the mask lets through in one row of memory + seq_len tokens."""
  if window is None or window >= seq_len:
    causal = seq_len * (seq_len + 1) // 2
  else:
    # The first `window` queries see all earlier keys, the rest `window` each.
    causal = window * (window + 1) // 2 + (seq_len - window) * window
  # Memory queries see the memory; every token sees the memory too.
  return causal + num_memory * num_memory + seq_len * num_memory


def flops_per_token(cfg_model, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token for rows of `seq_len` tokens."""
  t, m = seq_len, cfg_model.num_memory_tokens
  # Per (query, key) pair: q.k over the q/k head dim, p.v over the v head dim.
  if mla.is_mla(cfg_model):
    pair_width = cfg_model.num_heads * (cfg_model.mla_qk_nope_head_dim
                                        + cfg_model.mla_qk_rope_head_dim
                                        + cfg_model.mla_v_head_dim)
  elif differential.is_differential(cfg_model):
    pair_width = differential.pair_width(cfg_model)
  else:
    pair_width = 2 * cfg_model.num_heads * _head_dim(cfg_model)
  forward = 0.0
  for i in range(cfg_model.num_layers):
    window = (None if decoder_lib.is_global_layer(cfg_model, i)
              else cfg_model.sliding_window)
    forward += 2 * _matmul_weights(cfg_model, i) * (t + m) / t
    if mla.is_linear_layer(cfg_model, i):
      forward += gdn.gdn_mixing_flops(cfg_model, t)
    else:
      forward += 2 * pair_width * visible_pairs(t, window, m) / t
  forward += 2 * cfg_model.d_model * cfg_model.vocab_size
  d = cfg_model.d_model
  for k in range(cfg_model.get('mtp_depth', 0)):
    # No memory tokens (refused with MTP); global or windowed as that layer.
    i = cfg_model.num_layers + k
    window = (None if decoder_lib.is_global_layer(cfg_model, i)
              else cfg_model.sliding_window)
    forward += 2 * (2 * d * d + _matmul_weights(cfg_model, i))
    if mla.is_linear_layer(cfg_model, i):
      forward += gdn.gdn_mixing_flops(cfg_model, t)
    else:
      forward += 2 * pair_width * visible_pairs(t, window, 0) / t
    forward += 2 * d * cfg_model.vocab_size
  return 3 * forward


def cache_numbers_per_token(cfg_model) -> int:
  """Numbers a KV cache holds per token per layer: 2 kv_heads head_dim for
  standard attention (MHA, GQA, MQA), kv_lora_rank + qk_rope_head_dim for MLA
  in its absorbed form (the latent and the shared rope key)."""
  if mla.is_mla(cfg_model):
    return cfg_model.mla_kv_lora_rank + cfg_model.mla_qk_rope_head_dim
  return 2 * cfg_model.num_kv_heads * _head_dim(cfg_model)
