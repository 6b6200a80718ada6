"""The device mesh built from `config.mesh`.

Five named axes, always in this order: `data` (pure data parallelism: the
batch is split, parameters are replicated), `fsdp` (the batch is split and so
are parameters and optimizer state, ZeRO-3 style: Rajbhandari et al. 2020),
`context` (the sequence is split: context parallelism, model/context_parallel.py),
`tensor` (heads, MLP hidden units and the vocabulary are split: Megatron-LM,
Shoeybi et al. 2019) and `expert` (MoE experts are split, GShard: Lepikhin et
al. 2020). One axis may be -1: it takes the devices left over.

    mesh = make_mesh(cfg.mesh)             # all devices
    mesh.shape                             # {'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 2, 'expert': 1}
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

import configs

AXES = ('data', 'fsdp', 'context', 'tensor', 'expert')


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves -1 and checks that the axes multiply to `num_devices`."""
  sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in AXES}
  described = ', '.join(f'{a}={sizes[a]}' for a in AXES)
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise configs.ConfigError(f'mesh ({described}): at most one axis may be -1')
  for axis in AXES:
    if sizes[axis] == 0 or sizes[axis] < -1:
      raise configs.ConfigError(f'mesh.{axis}={sizes[axis]}: must be positive or -1')
  fixed = math.prod(sizes[a] for a in AXES if sizes[a] != -1)
  if free:
    if num_devices % fixed:
      raise configs.ConfigError(
          f'mesh ({described}): the fixed axes multiply to {fixed}, which does '
          f'not divide the {num_devices} devices, so mesh.{free[0]}=-1 cannot '
          'take the rest')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise configs.ConfigError(
        f'mesh ({described}): the axes multiply to {fixed} but there are '
        f'{num_devices} devices; make the product match or set one axis to -1')
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all) with axes data, fsdp, context, tensor, expert.

  Uses `jax.make_mesh` so the device order follows the physical topology on
  TPU (rings for the inner axes); `tensor` and `expert` are the innermost
  axes because their collectives are the most frequent. Axis types are Auto:
  shardings are propagated by the compiler from the jit's in/out shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware ordering is refused for some device sets (e.g. a subset
    # of a TPU slice); the plain row-major order is always valid.
    return Mesh(np.asarray(devices).reshape(shape), AXES,
                axis_types=(AxisType.Auto,) * len(AXES))
