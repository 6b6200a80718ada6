"""muP, the maximal-update parametrisation (Yang et al. 2022, "Tensor Programs V").

With `model.mup_base_width` set, widths are measured against the base:
m = d_model / mup_base_width, and every hidden dimension (d_model, d_ff,
heads * head_dim) is assumed to grow with m. The model side of muP (Table 3
of the paper, for Adam, written with an output multiplier as its Table 8 and
the `mup` package's `MuReadout` do):

| parameter                          | init std          | forward multiplier     |
| ---------------------------------- | ----------------- | ---------------------- |
| embeddings, positions, memory      | 0.02 (constant)   | x mup_input_mult       |
| hidden matrices (attention, MLP,   | base std / sqrt(m)| 1                      |
|   experts)                         |                   |                        |
| output head / tied embedding       | 0.02 (constant)   | logits x mup_output_mult / m |
| attention logits                   |                   | 1/sqrt(head_dim * m): the 1/head_dim form |
| norms, biases, router              | unchanged         | 1                      |

The optimizer side (hidden matrices learn at lr / m under Adam-like rules)
is `train/optim.py`'s group table. With heads fixed (head_dim grows with m),
1/sqrt(head_dim * m) = sqrt(base head_dim) / head_dim, muP's 1/head_dim
scaled to equal 1/sqrt(head_dim) at the base width. At m = 1 every factor is
exactly 1 and the model equals the standard one bit for bit.
"""

import math


def enabled(cfg_model) -> bool:
  return cfg_model.get('mup_base_width') is not None


def width_mult(cfg_model) -> float:
  """m = d_model / mup_base_width; 1.0 without muP."""
  return cfg_model.d_model / cfg_model.mup_base_width if enabled(cfg_model) else 1.0


def hidden_std(cfg_model, std: float) -> float:
  """The init std of a hidden matrix whose standard-parametrisation std is `std`."""
  return std / math.sqrt(width_mult(cfg_model)) if enabled(cfg_model) else std


def attention_scale(cfg_model, head_dim: int) -> float | None:
  """The attention-logit scale: `model.attn_scale` (None = 1/sqrt(head_dim))
  without muP, 1/sqrt(head_dim * m) with it."""
  if not enabled(cfg_model):
    return cfg_model.attn_scale
  return head_dim ** -0.5 / math.sqrt(width_mult(cfg_model))


def input_mult(cfg_model) -> float:
  return float(cfg_model.get('mup_input_mult', 1.0)) if enabled(cfg_model) else 1.0


def output_mult(cfg_model) -> float:
  """The logits' multiplier: mup_output_mult / m under muP, else 1."""
  if not enabled(cfg_model):
    return 1.0
  return float(cfg_model.get('mup_output_mult', 1.0)) / width_mult(cfg_model)
