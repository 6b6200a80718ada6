"""Sharding hints for activations, by logical axis name.

Parameters carry logical axes as metadata (`nnx.Param(w, logical_axes=...)`);
activations get them through `constrain(x, ('batch', None, 'embed'))` at the
few places where the compiler's sharding propagation would otherwise guess
from the weights, e.g. carry an FSDP weight's `embed` split into the residual
stream and then undo it with an all-to-all or a full rematerialisation (the
"Involuntary full rematerialization" warning of XLA's SPMD partitioner).
Pinning the residual stream to batch sharding is what GSPMD-style trainers
(MaxText's `activation_*` rules) do as well.

Stacked blocks (`model.scan_layers`, `model.scan`) carry the logical name
`layers` on their leading axis; the trainer maps it to no mesh axis.

The model does not know the mesh: the trainer maps names to shardings
(`train.sharding`) and installs that mapping with `constrain_with(fn, mesh)`
inside the function it jits (`jax.jit` caches traces without looking at this
context, so it must not be set around the call instead). Outside that context
(tests, sampling, a single device) `constrain` is the identity.

The few layers that must place work on devices themselves (the MoE layer's
all-to-all expert dispatch, `model.moe`) read the mesh and the mesh axes a
logical name maps to with `current_mesh()` and `partition_spec()`; everything
else only names logical axes.
"""

import contextlib
import contextvars
from collections.abc import Callable, Sequence

import jax

# fn(logical_axes, shape) -> a jax.sharding.Sharding, or None (no constraint).
_SHARDING_FN: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    'ablax_activation_sharding', default=None)
# The mesh `fn` maps onto, when the trainer gives it.
_MESH: contextvars.ContextVar[jax.sharding.Mesh | None] = contextvars.ContextVar(
    'ablax_activation_mesh', default=None)


@contextlib.contextmanager
def constrain_with(fn: Callable[[Sequence[str | None], tuple[int, ...]], object],
                   mesh: jax.sharding.Mesh | None = None):
  """Within this context `constrain` applies `fn(logical_axes, shape)`.

  `mesh`: the mesh `fn`'s NamedShardings live on, for `current_mesh()`.
  """
  token = _SHARDING_FN.set(fn)
  mesh_token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(mesh_token)
    _SHARDING_FN.reset(token)


def current_mesh() -> jax.sharding.Mesh | None:
  """The installed mesh, or None outside the trainer's context."""
  return _MESH.get() if _SHARDING_FN.get() is not None else None


def partition_spec(logical_axes: Sequence[str | None],
                   shape: Sequence[int]) -> jax.sharding.PartitionSpec | None:
  """The PartitionSpec the installed mapping gives an array of `shape`, or None
  (outside the context, or when the mapping does not constrain it)."""
  fn = _SHARDING_FN.get()
  target = None if fn is None else fn(tuple(logical_axes), tuple(shape))
  return getattr(target, 'spec', None)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`x` with the sharding its logical axes map to, if a mapping is installed."""
  fn = _SHARDING_FN.get()
  if fn is None:
    return x
  target = fn(tuple(logical_axes), tuple(x.shape))
  return x if target is None else jax.lax.with_sharding_constraint(x, target)
