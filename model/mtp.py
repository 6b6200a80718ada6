"""Multi-token prediction modules (DeepSeek-AI 2024, "DeepSeek-V3 Technical
Report", section 2.2; Gloeckle et al. 2024, "Better & Faster Large Language
Models via Multi-token Prediction").

`model.mtp_depth = D` gives the decoder D `MTPModule`s run in sequence after
its blocks. With h^0 the main model's last hidden state (before its final
norm) and tokens x_1 .. x_T, module k (1..D) at position i computes

    h'_i^k = W_k [norm(h_i^{k-1}); norm(Emb(x_{i+k}))]      W_k: [2 d, d]
    h^k    = Block_k(h'^k)                                  (causal, one layer)
    logits = Head(norm_out,k(h_i^k))     -> predicts x_{i+k+1}

with the decoder's own embedding (`Decoder.embed_tokens`) and output
projection shared, and a block built from the same flags as the decoder's
(attention, MoE, norms). The concatenation order [hidden; embedding] is the
paper's equation 21. Positions i + k past the row's end have no token: the
decoder feeds a 0 there and the loss masks those targets (train/step.py).

The training loss runs them; `Decoder.__call__` never does. Sampling runs
them only as the draft of self-speculative decoding (`python -m train.sample
--speculative`, `train.sample.generate_speculative`), recomputed over the
sequence so far without a cache.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import norms
from model import partitioning


class MTPModule(nnx.Module):
  """One depth: (h^{k-1} [b, t, d], embedded x_{i+k} [b, t, d]) -> h^k [b, t, d]."""

  def __init__(self, cfg_model, block: nnx.Module, *, rngs: nnx.Rngs):
    d = cfg_model.d_model
    self.dtype = jnp.dtype(cfg_model.dtype)
    self.hidden_norm = norms.make_norm(cfg_model)
    self.embed_norm = norms.make_norm(cfg_model)
    # N(0, 0.02) like the other input projections. The 2d input axis is
    # named `mlp` so the optimizer treats it as a hidden matrix (decayed,
    # muP's hidden LR), not as a lookup table.
    self.proj = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (2 * d, d),
                                      jnp.dtype(cfg_model.param_dtype)),
        logical_axes=('mlp', 'embed'))
    self.block = block
    # Each depth has its own norm before the shared head (DeepSeek-V3's
    # checkpoints store one per MTP layer); post-norm blocks end normalised.
    if cfg_model.norm_position != 'post':
      self.out_norm = norms.make_norm(cfg_model)

  def __call__(self, h, emb, positions, segment_ids=None):
    """Returns (h^k [b, t, d] before `out_norm`, the block's aux)."""
    joined = jnp.concatenate([self.hidden_norm(h).astype(self.dtype),
                              self.embed_norm(emb).astype(self.dtype)], axis=-1)
    w = partitioning.constrain(self.proj[...], (None, None)).astype(self.dtype)
    x = jnp.einsum('bte,ed->btd', joined, w)
    x = partitioning.constrain(x, ('batch', None, 'embed'))
    with jax.named_scope('mtp_block'):
      return self.block(x, positions, segment_ids)


def shift_left(x, k: int, fill=0):
  """x [b, t, ...] -> x[:, k:] padded with `fill` to length t (k >= 0)."""
  if k == 0:
    return x
  pad = [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x[:, k:], pad, constant_values=fill)


def mtp_params(cfg_model, block_params: int) -> int:
  """Parameters of one module given its block's count (for `model.flops`)."""
  d = cfg_model.d_model
  norm = norms.norm_params(cfg_model.norm_type, d)
  return 2 * d * d + (2 if cfg_model.norm_position == 'post' else 3) * norm + block_params
