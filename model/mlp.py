"""The position-wise feed-forward layer, plain or gated.

- plain: wo(act(wi x)) (Vaswani et al. 2017; GPT-2 with GELU).
- gated: wo(act(wi_gate x) * wi_up x), the GLU variants of Shazeer 2020, "GLU
  Variants Improve Transformer": SwiGLU (silu, LLaMA) and GeGLU (gelu, Gemma).

Activations: `relu`, `gelu` (exact, erf), `gelu_tanh` (the tanh approximation
that GPT-2 and Gemma were trained with), `silu`; gated only: `clamped_swiglu`,
GPT-OSS's unit (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"):
g = min(gate, limit), u = clip(up, -limit, limit), h = (u + 1) * g * sigmoid(alpha g)
(`mlp_swiglu_alpha`, `mlp_swiglu_limit`; 1.702 and 7.0 in GPT-OSS). The MoE
experts (model/moe.py) use the same gated units through `gated_unit`.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import mup

ACTIVATIONS = {
    'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'silu': jax.nn.silu,
}


# Activations that exist only as a gated unit (mlp_gated=True).
GATED_ONLY = ('clamped_swiglu',)


def activation(name: str):
  """The elementwise function of `model.mlp_activation`."""
  if name in GATED_ONLY:
    raise ValueError(f'model.mlp_activation={name!r} is a gated unit: it needs '
                     'model.mlp_gated=True')
  if name not in ACTIVATIONS:
    raise ValueError(f'model.mlp_activation={name!r}: must be one of '
                     f'{", ".join((*ACTIVATIONS, *GATED_ONLY))}')
  return ACTIVATIONS[name]


def check_activation(cfg_model) -> None:
  """Raises ValueError when `mlp_activation` does not fit `mlp_gated`."""
  if not (cfg_model.mlp_gated and cfg_model.mlp_activation in GATED_ONLY):
    activation(cfg_model.mlp_activation)


def swiglu_params(cfg_model) -> tuple[float, float]:
  """(alpha, limit) of the clamped SwiGLU (configs saved before it: the defaults)."""
  return (float(cfg_model.get('mlp_swiglu_alpha', 1.702)),
          float(cfg_model.get('mlp_swiglu_limit', 7.0)))


def clamped_swiglu(gate, up, alpha: float, limit: float):
  """GPT-OSS's gated unit: the gate clamped above at `limit`, the up projection
  to [-limit, limit] (bounded activations for low-precision inference), a swish
  of slope alpha on the gate, and 1 added to the up projection."""
  gate = jnp.minimum(gate, limit)
  up = jnp.clip(up, -limit, limit)
  return (up + 1) * (gate * jax.nn.sigmoid(alpha * gate))


def gated_unit(name: str, gate, up, swiglu=(1.702, 7.0)):
  """The hidden h of a gated MLP from its gate and up projections [..., f]:
  act(gate) * up, or `clamped_swiglu` with swiglu = (alpha, limit)."""
  if name == 'clamped_swiglu':
    return clamped_swiglu(gate, up, *swiglu)
  return activation(name)(gate) * up


def out_init_stddev(cfg_model) -> float:
  """Std of residual-branch output projections: 0.02 / sqrt(2 num_layers) (GPT-2).

  Each layer adds two branches to the residual stream; the scaling keeps the
  stream's variance at initialisation independent of depth.
  """
  return 0.02 / math.sqrt(2 * cfg_model.num_layers)


class MLP(nnx.Module):
  """Feed-forward layer d_model -> d_ff -> d_model; x [b, t, d] -> [b, t, d]."""

  def __init__(self, cfg_model, *, d_ff: int | None = None, rngs: nnx.Rngs):
    d, f = cfg_model.d_model, cfg_model.d_ff if d_ff is None else d_ff
    self.gated = cfg_model.mlp_gated
    self.activation = cfg_model.mlp_activation
    check_activation(cfg_model)
    self.swiglu = swiglu_params(cfg_model)
    self.dtype = jnp.dtype(cfg_model.dtype)
    pdt = jnp.dtype(cfg_model.param_dtype)
    w_in = nnx.initializers.normal(mup.hidden_std(cfg_model, 0.02))
    w_out = nnx.initializers.normal(mup.hidden_std(cfg_model, out_init_stddev(cfg_model)))
    if self.gated:
      self.wi_gate = nnx.Param(w_in(rngs.params(), (d, f), pdt), logical_axes=('embed', 'mlp'))
      self.wi_up = nnx.Param(w_in(rngs.params(), (d, f), pdt), logical_axes=('embed', 'mlp'))
    else:
      self.wi = nnx.Param(w_in(rngs.params(), (d, f), pdt), logical_axes=('embed', 'mlp'))
    self.wo = nnx.Param(w_out(rngs.params(), (f, d), pdt), logical_axes=('mlp', 'embed'))
    self.use_bias = cfg_model.use_bias
    if self.use_bias:
      for name in (('bi_gate', 'bi_up') if self.gated else ('bi',)):
        setattr(self, name, nnx.Param(jnp.zeros((f,), pdt), logical_axes=('mlp',)))
      self.bo = nnx.Param(jnp.zeros((d,), pdt), logical_axes=('embed',))

  def _dense(self, x, w, b, spec):
    y = jnp.einsum(spec, x, w[...].astype(self.dtype))
    if self.use_bias:
      y = y + b[...].astype(self.dtype)
    return y

  def __call__(self, x):
    x = x.astype(self.dtype)
    bias = lambda name: getattr(self, name) if self.use_bias else None
    if self.gated:
      h = gated_unit(self.activation,
                     self._dense(x, self.wi_gate, bias('bi_gate'), 'btd,df->btf'),
                     self._dense(x, self.wi_up, bias('bi_up'), 'btd,df->btf'), self.swiglu)
    else:
      h = activation(self.activation)(self._dense(x, self.wi, bias('bi'), 'btd,df->btf'))
    return self._dense(h, self.wo, bias('bo'), 'btf,fd->btd')


def mlp_params(cfg_model, d_ff: int | None = None) -> int:
  """Parameter count of one `MLP` (for `model.flops`)."""
  d, f = cfg_model.d_model, cfg_model.d_ff if d_ff is None else d_ff
  n_in = 2 if cfg_model.mlp_gated else 1
  count = (n_in + 1) * d * f
  if cfg_model.use_bias:
    count += n_in * f + d
  return count
