"""Logical-to-mesh sharding rules: the one table, and the functions that apply it.

Model code names each parameter dimension with a logical axis
(`nnx.Param(w, logical_axes=('embed', 'mlp'))`); nothing under `model/` knows
the mesh. `RULES` below maps every logical axis to the mesh axes that split
it (the idea of MaxText's logical axis rules). Reading the table:

- `fsdp` splits the `embed` dimension of every matrix, so parameters, their
  gradients and the optimizer moments are spread over the fsdp devices and
  gathered layer by layer in the forward pass (ZeRO-3 / FSDP).
- `tensor` splits attention heads, MLP hidden units and the vocabulary
  (Megatron-style tensor parallelism); `head_dim` and `norm` stay whole.
- `expert` splits the expert dimension of MoE weights (expert parallelism).
- `context` splits the activations' `sequence` dimension (context
  parallelism; attention gathers or rings K/V, `model/context_parallel.py`).
- `batch` (the activations' and data's batch dimension) is split over every
  axis that does not shard the computation's feature dimensions: `data`,
  `fsdp` and `expert`. Including `expert` keeps the dense layers of an MoE model
  from computing the same rows on every expert device.

A dimension that does not divide by its mesh axes' sizes (e.g. 2 KV heads on a
tensor axis of 4), or whose mesh axis is already used by an earlier dimension
of the same parameter, is replicated instead, with a debug log.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import configs
from model import partitioning

# Logical axis -> mesh axes that split it (None: never split).
RULES: dict[str, tuple[str, ...] | None] = {
    'batch': ('data', 'fsdp', 'expert'),
    'sequence': ('context',),
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': None,
    'mlp': ('tensor',),
    'experts': ('expert',),
    'norm': None,
    # The stacked blocks' leading axis (model.scan_layers): every device holds
    # every layer's slice of its shard, so the scan reads locally.
    'layers': None,
}


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The `logical_axes` metadata of a Variable, or None if it has none."""
  axes = variable.get_metadata().get('logical_axes')
  return None if axes is None else tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    shape: Sequence[int], mesh: Mesh, *,
                    name: str = '') -> PartitionSpec:
  """The PartitionSpec for an array of `shape` with these logical axes.

  Unknown logical names are an error (a typo would otherwise silently
  replicate a large matrix); a missing `logical_axes` replicates.
  """
  if logical_axes is None:
    return PartitionSpec()
  if len(logical_axes) != len(shape):
    raise ValueError(f'{name or "array"}: logical_axes {tuple(logical_axes)} do '
                     f'not match its shape {tuple(shape)}')
  used: set[str] = set()
  spec = []
  for logical, dim in zip(logical_axes, shape):
    if logical is None:
      spec.append(None)
      continue
    if logical not in RULES:
      raise ValueError(f'{name or "array"}: unknown logical axis {logical!r}; '
                       f'known: {", ".join(RULES)}')
    mesh_axes = tuple(a for a in (RULES[logical] or ()) if mesh.shape.get(a, 1) > 1)
    if not mesh_axes:
      spec.append(None)
      continue
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if used.intersection(mesh_axes):
      logging.debug('%s: %s would reuse mesh axes %s; replicated', name, logical,
                    mesh_axes)
      spec.append(None)
    elif dim % size:
      logging.debug('%s: %s dimension %d does not divide mesh axes %s (%d); '
                    'replicated', name, logical, dim, mesh_axes, size)
      spec.append(None)
    else:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def state_shardings(mesh: Mesh, abstract_state):
  """NamedShardings for any pytree holding `nnx.Variable`s and plain arrays.

  Each Variable is sharded by its `logical_axes`; other leaves (step counters,
  RNG keys, optimizer counts) are replicated. Works on a model's state, on
  optax state (whose moments copy the parameters' Variables and metadata) and
  on a whole train state. The result has the structure of `abstract_state`
  (Variables hold their NamedSharding as value), ready for
  `jax.jit(in_shardings=..., out_shardings=...)` and for `jax.tree.map` beside
  the state.
  """
  def one(path, leaf):
    if is_variable(leaf):
      axes = logical_axes_of(leaf)
      if axes is not None and len(axes) != len(leaf.shape):
        # Optimizer statistics of reduced shape inside a copy of the
        # parameter's Variable (Adafactor's row and column moments): small,
        # replicated.
        axes = None
      spec = logical_to_spec(axes, leaf.shape, mesh, name=_path_name(path))
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=is_variable)


def activation_sharding(mesh: Mesh):
  """The context that maps `model.partitioning.constrain`'s logical names onto
  `mesh` with `RULES` while a step is traced."""
  def fn(logical_axes, shape):
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))
  return partitioning.constrain_with(fn, mesh)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch dimension (those of size > 1)."""
  return tuple(a for a in RULES['batch'] if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Splits dimension 0 (the batch) over `batch_axes`; the rest replicated."""
  axes = batch_axes(mesh)
  first = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch(mesh: Mesh, global_batch_size: int, grad_accum_steps: int = 1) -> None:
  """Refuses a batch that does not split evenly over the batch axes."""
  shards = num_batch_shards(mesh)
  if global_batch_size % shards:
    axes = ' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes(mesh))
    raise configs.ConfigError(
        f'train.global_batch_size={global_batch_size} does not split over the '
        f'batch mesh axes ({axes} = {shards} shards); use a multiple of {shards}')
  micro = global_batch_size // grad_accum_steps
  if micro % shards:
    logging.warning('microbatch of %d rows (global_batch_size=%d / '
                    'grad_accum_steps=%d) does not split over %d batch shards; '
                    'the compiler will replicate part of each microbatch',
                    micro, global_batch_size, grad_accum_steps, shards)


def describe(mesh: Mesh, abstract_state) -> list[str]:
  """One line per parameter: path, shape, logical axes and mesh spec (for logs)."""
  lines = []
  def one(path, leaf):
    if is_variable(leaf):
      axes = logical_axes_of(leaf)
      spec = logical_to_spec(axes, leaf.shape, mesh, name=_path_name(path))
      lines.append(f'{_path_name(path):50s} {str(tuple(leaf.shape)):18s} '
                   f'{str(axes):40s} {spec}')
    return leaf
  jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=is_variable)
  return lines


def global_batch(batch: dict, batch_sharding) -> dict:
  """This process's rows of a batch (host arrays) -> global arrays split over
  the batch mesh axes (`batch_sharding`). Every process passes its own rows,
  in process order, as `data.pipeline.make_iterator` reads them."""
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_sharding)    # one call for all fields

  def one(local):
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding, local, shape)

  return {k: one(v) for k, v in batch.items()}
