"""Sharding hints for activations, by logical axis name.

Parameters carry logical axes as metadata (`nnx.Param(w, logical_axes=...)`);
activations get them through `constrain(x, ('batch', None, 'embed'))` at the
few places where the compiler's sharding propagation would otherwise guess
from the weights, e.g. carry an FSDP weight's `embed` split into the residual
stream and then undo it with an all-to-all or a full rematerialisation (the
"Involuntary full rematerialization" warning of XLA's SPMD partitioner).
Pinning the residual stream to batch sharding is what GSPMD-style trainers
(MaxText's `activation_*` rules) do as well.

The model does not know the mesh: the trainer maps names to shardings
(`train.sharding`) and installs that mapping with `activation_sharding(fn)`
inside the function it jits (`jax.jit` caches traces without looking at this
context, so it must not be set around the call instead). Outside that context
(tests, sampling, a single device) `constrain` is the identity.
"""

import contextlib
import contextvars
from collections.abc import Callable, Sequence

import jax

# fn(logical_axes, shape) -> a jax.sharding.Sharding, or None (no constraint).
_SHARDING_FN: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    'ablax_activation_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(fn: Callable[[Sequence[str | None], tuple[int, ...]], object]):
  """Within this context `constrain` applies `fn(logical_axes, shape)`."""
  token = _SHARDING_FN.set(fn)
  try:
    yield
  finally:
    _SHARDING_FN.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`x` with the sharding its logical axes map to, if a mapping is installed."""
  fn = _SHARDING_FN.get()
  if fn is None:
    return x
  target = fn(tuple(logical_axes), tuple(x.shape))
  return x if target is None else jax.lax.with_sharding_constraint(x, target)
