"""Scanned layers (`model.scan_layers`): blocks stacked on a leading `layers`
axis and run by one `jax.lax.scan`, so the compiled program holds one copy of
the block instead of `num_layers`.

Blocks are grouped by structure, not by config fields: two blocks are the
same when their NNX graphdef (static attributes: window or global attention,
MoE or dense, the mixer type, ...) and their parameter shapes and dtypes are
equal. `find_layout` picks the shortest unrolled prefix, then the smallest
period p, such that the remaining blocks repeat with period p at least twice;
the scan then runs over groups of p blocks (p = 2 for Gemma 2's
window/global alternation, p = 1 after a first dense layer of an MoE model).

The stacked parameters are the unrolled decoder's, stacked: the decoder builds
every block as the unrolled one does (same seed, same weights), then stacks.
`to_scanned` / `to_unrolled` convert a parameter tree (nested dicts, as in a
checkpoint or `nnx.to_pure_dict`) between the layouts, exactly;
`convert_state` does so for every parameter-shaped subtree of a whole train
state (the optimizer's moments, model_state), which is how a checkpoint of
one layout restores into the other (`train.workdir.in_saved_layout`).

Layouts in the parameter tree:
- unrolled: `blocks/{i}` for i < num_layers;
- scanned: `blocks/{i}` for the unrolled prefix i < prefix, and
  `scan_blocks/{j}` (j < period) holding block prefix + g * period + j of
  every group g, stacked on a leading axis (logical name `layers`).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYERS_AXIS = 'layers'


def block_key(block: nnx.Module):
  """What makes two blocks scannable together: graphdef plus leaf shapes/dtypes."""
  graphdef, state = nnx.split(block)
  leaves = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(state))
  return graphdef, leaves


def find_layout(keys) -> tuple[int, int | None]:
  """(prefix, period) for blocks with these `block_key`s: blocks [prefix:]
  repeat with `period` at least twice; (len(keys), None) when nothing repeats."""
  n = len(keys)
  for prefix in range(n):
    rest = n - prefix
    for period in range(1, rest // 2 + 1):
      if rest % period:
        continue
      if all(keys[i] == keys[i + period] for i in range(prefix, n - period)):
        return prefix, period
  return n, None


def layout(cfg_model) -> tuple[int, int | None]:
  """(prefix, period) of the scanned layout for `cfg_model`, from the blocks'
  structure (abstract: nothing is allocated)."""
  from model import decoder as decoder_lib  # pylint: disable=import-outside-toplevel
  keys = [block_key(nnx.eval_shape(
      lambda i=i: decoder_lib.Block(cfg_model, i, rngs=nnx.Rngs(0))))
          for i in range(cfg_model.num_layers)]
  return find_layout(keys)


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def _with_axes(variable: nnx.Variable, value, add: bool) -> nnx.Variable:
  axes = variable.get_metadata().get('logical_axes')
  if axes is None:
    return variable.replace(value=value)
  axes = (LAYERS_AXIS, *axes) if add else tuple(axes)[1:]
  return variable.replace(value=value, logical_axes=axes)


def stack_blocks(blocks) -> nnx.Module:
  """One module of `blocks`' structure whose every variable is the blocks'
  values stacked on a leading `layers` axis."""
  graphdef, first = nnx.split(blocks[0])
  states = [nnx.split(b)[1] for b in blocks]
  stacked = jax.tree.map(
      lambda v, *vs: _with_axes(v, jnp.stack([u[...] for u in (v, *vs)]), add=True),
      first, *states[1:], is_leaf=_is_variable)
  return nnx.merge(graphdef, stacked)


def split_stacked(stacked: nnx.Module):
  """(graphdef, state) of a stacked module, for `merge_layer` in a scan body."""
  return nnx.split(stacked)


def merge_layer(graphdef, layer_state) -> nnx.Module:
  """The block from one layer's slice of a stacked state (the `layers`
  logical axis dropped again)."""
  state = jax.tree.map(lambda v: _with_axes(v, v[...], add=False), layer_state,
                       is_leaf=_is_variable)
  return nnx.merge(graphdef, state)


def slice_layer(graphdef, state, index: int) -> nnx.Module:
  """Layer `index` of a stacked (graphdef, state) as an ordinary block."""
  return merge_layer(graphdef, jax.tree.map(lambda v: v.replace(value=v[...][index]),
                                            state, is_leaf=_is_variable))


# ---------------------------------------------------------------------------
# Parameter-tree layout conversion (nested dicts keyed by str or int).


def _get(d, i):
  return d[i] if i in d else d[str(i)]


def _has(d, i):
  return i in d or str(i) in d


def _raw(d):
  """The plain dict under an `nnx.State` (whose items would wrap nested
  dicts in States of their own); other mappings as they are."""
  return getattr(d, 'raw_mapping', d)


def _like(template, d: dict):
  """`d` as a mapping of `template`'s type (an `nnx.State` stays one)."""
  return d if type(template) is dict else type(template)(d)


def _stack_leaf(*xs):
  """Layers' leaves stacked; a Variable gains the leading `layers` axis."""
  if _is_variable(xs[0]):
    return _with_axes(xs[0], _stack(*[x[...] for x in xs]), add=True)
  return _stack(*xs)


def _slice_leaf(x, g: int):
  """Layer g of a stacked leaf; a Variable loses the `layers` axis."""
  if _is_variable(x):
    return _with_axes(x, x[...][g], add=False)
  return x[g]


def _key_like(d, i):
  return str(i) if any(isinstance(k, str) for k in d) else i


def _stack(*xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def to_scanned(tree: dict, num_layers: int, prefix: int, period: int | None) -> dict:
  """The unrolled parameter tree `tree` in the scanned layout (see module doc)."""
  if period is None:
    return tree
  raw = _raw(tree)
  blocks = raw['blocks']
  out = {k: v for k, v in raw.items() if k != 'blocks'}
  kept = {_key_like(blocks, i): _get(blocks, i) for i in range(prefix) if _has(blocks, i)}
  if kept:
    out['blocks'] = _like(blocks, kept)
  groups = (num_layers - prefix) // period
  # A layer without entries (model_state: only MoE layers hold a selection
  # bias) has none in any group: its slot is left out.
  stacked = {
      _key_like(blocks, j): jax.tree.map(
          _stack_leaf, *[_get(blocks, prefix + g * period + j) for g in range(groups)],
          is_leaf=_is_variable)
      for j in range(period) if _has(blocks, prefix + j)}
  if stacked:
    out['scan_blocks'] = _like(blocks, stacked)
  return _like(tree, out)


def to_unrolled(tree: dict, num_layers: int, prefix: int, period: int | None) -> dict:
  """The scanned parameter tree `tree` in the unrolled layout."""
  if period is None:
    return tree
  raw = _raw(tree)
  blocks = raw.get('blocks', {})
  scanned = raw.get('scan_blocks', {})
  out = {k: v for k, v in raw.items() if k not in ('blocks', 'scan_blocks')}
  key = lambda i: _key_like(scanned, i)
  new = {key(i): _get(blocks, i) for i in range(prefix) if _has(blocks, i)}
  groups = (num_layers - prefix) // period
  for g in range(groups):
    for j in range(period):
      if _has(scanned, j):
        new[key(prefix + g * period + j)] = jax.tree.map(
            lambda x, g=g: _slice_leaf(x, g), _get(scanned, j), is_leaf=_is_variable)
  if new:
    out['blocks'] = _like(scanned, new)
  return _like(tree, out)


def tree_layout(tree) -> tuple[int, int, int | None]:
  """(num_layers, prefix, period) read off a parameter tree in either layout
  (period None: unrolled)."""
  blocks, scanned = tree.get('blocks', {}), tree.get('scan_blocks', {})
  if not scanned:
    return len(blocks), len(blocks), None
  groups = jax.tree.leaves(scanned)[0].shape[0]
  return len(blocks) + groups * len(scanned), len(blocks), len(scanned)


def convert_state(tree, layout: tuple[int, int, int | None], *, scanned: bool):
  """Any pytree holding parameter-shaped subtrees (a train state: params,
  the optimizer's moments, which mirror them, and model_state) with each
  decoder-shaped mapping (one with `blocks` or `scan_blocks`) converted to
  the scanned layout `layout` = (num_layers, prefix, period) if `scanned`,
  else to the unrolled one. Variables keep their metadata, their logical
  axes gaining or losing `layers`; other nodes (optax's named tuples,
  masked nodes, counts) are kept as they are."""
  num_layers, prefix, period = layout

  def walk(x):
    if isinstance(x, Mapping):
      if 'blocks' in x or 'scan_blocks' in x:
        is_scanned = 'scan_blocks' in x
        if is_scanned == scanned:
          return x
        fn = to_scanned if scanned else to_unrolled
        return fn(x, num_layers, prefix, period)
      return _like(x, {k: walk(v) for k, v in _raw(x).items()})
    if isinstance(x, tuple) and hasattr(x, '_fields'):
      return type(x)(*[walk(v) for v in x])
    if isinstance(x, (tuple, list)):
      return type(x)(walk(v) for v in x)
    return x

  return walk(tree)


def convert(tree: dict, cfg_model, *, scanned: bool) -> dict:
  """`tree` (either layout; detected by its `scan_blocks` key) in the scanned
  layout if `scanned`, else the unrolled one."""
  is_scanned = 'scan_blocks' in tree
  if is_scanned == scanned:
    return tree
  prefix, period = layout(cfg_model)
  fn = to_scanned if scanned else to_unrolled
  return fn(tree, cfg_model.num_layers, prefix, period)
