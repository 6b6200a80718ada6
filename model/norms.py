"""Normalisation layers: RMSNorm and LayerNorm, chosen by `model.norm_type`.

- RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"
  (LLaMA, Mistral, Qwen, Gemma; also the QK-norm of Qwen3 and Gemma 3).
- LayerNorm: Ba, Kiros & Hinton 2016 (GPT-2, BERT), with a learned scale and
  bias.

Both normalise in float32 whatever the compute dtype, because the mean of
squares of bfloat16 activations loses too much precision, and return the
input's dtype. The scale is applied as `x * scale` with scale initialised to 1
(the Gemma checkpoints' `1 + scale` form is a conversion matter for `model.hf`).
"""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=('norm',))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(ms + self.eps) * self.scale[...].astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=('norm',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=('norm',))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


NORMS = {'rmsnorm': RMSNorm, 'layernorm': LayerNorm}


def make_norm(cfg_model, dim: int | None = None):
  """The norm of `cfg_model.norm_type` over `dim` features (default d_model)."""
  if cfg_model.norm_type not in NORMS:
    raise ValueError(f'model.norm_type={cfg_model.norm_type!r}: must be one of '
                     f'{", ".join(NORMS)}')
  return NORMS[cfg_model.norm_type](
      cfg_model.d_model if dim is None else dim, eps=cfg_model.norm_eps,
      param_dtype=jnp.dtype(cfg_model.param_dtype))


def norm_params(norm_type: str, dim: int) -> int:
  """Parameter count of one norm over `dim` features (for `model.flops`)."""
  return {'rmsnorm': dim, 'layernorm': 2 * dim}[norm_type]
