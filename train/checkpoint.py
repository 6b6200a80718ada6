"""Checkpoints: orbax saving and resuming of the whole train state.

`DIR/checkpoints/STEP/` holds two orbax items:

- `state`: the train state pytree of `train.step` (params, optimizer state,
  step, RNG), sharded arrays written by every process in parallel;
- `data`: the grain iterator's state, one small JSON file per process
  (`grain.checkpoint.CheckpointHandler`), so a resumed run reads the very next
  batch it would have read.

Saving is asynchronous: `save` returns once the arrays are copied off the
devices, and the disk write finishes in a background thread while training
continues. Orbax writes into a temporary folder and renames it to `STEP` only
once every file is written, so a process killed mid-save leaves a temporary
folder that is never loaded (and is cleaned up on the next start).

`restore_latest` loads the newest checkpoint; one that fails to load (a folder
truncated by hand, a disk error) is skipped with a warning, moved aside to
`DIR/checkpoints.skipped/STEP` so later saves can reuse the step number, and the
previous one is used.

`check_config` refuses to resume a workdir whose `config.json` describes a
different model, naming the differing fields.

Starting from another run (`train.init_checkpoint`, `dpo.init_checkpoint`):
`resolve_init_checkpoint` finds the step folder of a workdir or checkpoint
path, and `load_init_params` checks that the run there had the same model
(refusing, with the differing fields named, if not) and restores only its
parameters.

The workdir's layout (config.json, step folders, parameters only, the lock,
the status) is `train.workdir`'s; this module reads the workdir through it.
"""

import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

import configs
from train import workdir as workdir_lib


# Model fields that change how the same parameters are computed with, not the
# parameters: a run may resume with other values (a warning says so).
RUNTIME_MODEL_FIELDS = ('attention_impl', 'attention_block_q', 'attention_block_kv',
                        'remat', 'dtype', 'moe_dispatch', 'context_parallel')


# Model fields that change the parameters' layout, not their values: a run
# resumes, or starts from `train.init_checkpoint`, with another value, the
# checkpoint converted on restore (`workdir.in_saved_layout`: the layout is
# read from the checkpoint itself). A config.json that lacks the field was
# written before layouts existed: unrolled.
LAYOUT_MODEL_FIELDS = {'scan_layers': False}


def _resolved_model(fields: dict) -> dict:
  """`config.model` fields with the None defaults that stand for a value set to
  it (head_dim, moe_d_ff, attn_scale), so equal models compare equal."""
  out = dict(fields)
  if out.get('head_dim') is None and out.get('d_model') and out.get('num_heads'):
    out['head_dim'] = out['d_model'] // out['num_heads']
  if out.get('moe_d_ff') is None and 'd_ff' in out:
    out['moe_d_ff'] = out['d_ff']
  if out.get('attn_scale') is None and out.get('head_dim'):
    out['attn_scale'] = out['head_dim'] ** -0.5
  return out


def _same(a, b) -> bool:
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def model_differences(saved: dict, cfg) -> tuple[list[str], list[str]]:
  """(shape-changing, runtime-only) `model.*` fields that differ from `saved`.

  None defaults are resolved first (`head_dim` None is d_model // num_heads),
  and a field the saved config lacks (added to ablax later) counts as its
  default in `configs/base.py`.
  """
  from configs import base  # pylint: disable=g-import-not-at-top
  defaults = base.model_config().to_dict()
  now = json.loads(workdir_lib.config_json(cfg))['model']
  before = dict(saved.get('model', {}))
  for field in set(now) - set(before):
    if field in LAYOUT_MODEL_FIELDS:
      before[field] = LAYOUT_MODEL_FIELDS[field]
    elif field in defaults:
      before[field] = defaults[field]
  now_resolved, before_resolved = _resolved_model(now), _resolved_model(before)
  shape, runtime = [], []
  for field in sorted(set(now) | set(before)):
    if not _same(now_resolved.get(field), before_resolved.get(field)):
      line = (f'model.{field}: saved {before.get(field, "<absent>")!r}, '
              f'now {now.get(field, "<absent>")!r}')
      runtime_only = field in RUNTIME_MODEL_FIELDS or field in LAYOUT_MODEL_FIELDS
      (runtime if runtime_only else shape).append(line)
  return shape, runtime


def _saved_differences(workdir: str, cfg):
  """(saved config dict, shape differences, runtime differences) against `cfg`."""
  saved = workdir_lib.read_config_json(workdir)
  return (saved, *model_differences(saved, cfg))


def check_config(workdir: str, cfg) -> None:
  """Refuses to resume a workdir that holds checkpoints of a different model."""
  steps = workdir_lib.steps(workdir)
  if not (steps and os.path.exists(workdir_lib.config_path(workdir))):
    return
  saved, shape, runtime = _saved_differences(workdir, cfg)
  if shape:
    raise configs.ConfigError(
        f'{workdir} holds checkpoints of a different model; differing fields:\n  '
        + '\n  '.join(shape) +
        '\nUse a new --workdir, or set these fields back to the saved values.')
  batch = saved.get('train', {}).get('global_batch_size', cfg.train.global_batch_size)
  latest = workdir_lib.step_dir(workdir, steps[-1])
  # A checkpoint without a data position (`model.hf import`) fits any batch.
  if batch != cfg.train.global_batch_size and os.path.isdir(os.path.join(latest, 'data')):
    raise configs.ConfigError(
        f'train.global_batch_size={cfg.train.global_batch_size}, but {workdir} '
        f'was trained with {batch}: the data position of its checkpoints cannot '
        f'be mapped to another batch size. Set train.global_batch_size={batch} '
        'to resume, or use a new --workdir (with train.init_checkpoint to start '
        'from its parameters).')
  if runtime:
    logging.warning('resuming %s with changed runtime fields: %s', workdir,
                    '; '.join(runtime))


def all_finite(tree) -> bool:
  """True if every float entry of `tree` (arrays, possibly sharded) is finite."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(getattr(x, 'dtype', np.int32), jnp.floating)]
  if not leaves:
    return True
  return bool(jax.jit(lambda xs: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


def _reason(error: BaseException) -> str:
  """A readable one-line reason of an orbax/tensorstore error.

  Orbax's read errors end in the repr of a bound pybind11 method ("See full
  TensorStore details: <bound method ...>"); the cause it chains (tensorstore's
  own error: which array, which file, what is wrong) is what a user can act on.
  """
  parts = []
  for e in (error, error.__cause__):
    if e is None:
      continue
    text = str(e).split(' See full TensorStore details')[0].strip()
    text = text.splitlines()[0][:300] if text else ''
    if text and '<bound method' not in text and text not in parts:
      parts.append(text)
  return f'{type(error).__name__}: ' + (': '.join(parts) or 'no message')


class Checkpointer:
  """Saves and restores (train state, data iterator) under `DIR/checkpoints`."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'data'), options=options)

  @property
  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Starts saving `state` at `step` if due (or `force`); True if it did."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    if force and step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and stops orbax's threads (idempotent)."""
    if self.manager is None:
      return
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()
      self.manager = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def delete_after(self, step: int) -> None:
    """Deletes the checkpoints after `step` (a rollback to `step`)."""
    self.wait()
    for later in sorted(self.manager.all_steps()):
      if later > step:
        self.manager.delete(later)
    self.manager.reload()

  def newest_finite(self, abstract_state, before: int | None = None) -> int | None:
    """The newest step (< `before`) whose saved parameters are all finite,
    checked by reading them; None if there is none."""
    self.wait()
    for step in sorted(self.manager.all_steps(), reverse=True):
      if before is not None and step >= before:
        continue
      try:
        restored, _ = workdir_lib.restore(os.path.join(self.directory, str(step)),
                                          {'params': abstract_state['params']})
      except Exception:  # pylint: disable=broad-except
        continue
      if all_finite(restored['params']):
        return step
    return None

  def _check_process_count(self, step: int) -> None:
    data_dir = os.path.join(self.directory, str(step), 'data')
    if not os.path.isdir(data_dir):
      return
    counts = {name.rsplit('-of-', 1)[1].removesuffix('.json')
              for name in os.listdir(data_dir) if '-of-' in name}
    if counts and str(jax.process_count()) not in counts:
      raise configs.ConfigError(
          f'checkpoint {self.directory}/{step} was written by '
          f'{"/".join(sorted(counts))} processes and this run has '
          f'{jax.process_count()}; the data iterators cannot be mapped. Resume '
          'with the same number of processes.')

  def _check_files(self, step: int) -> None:
    """Refuses a step folder whose array data files are gone before orbax
    reads it: a failed tensorstore read leaves callbacks for orbax's closed
    event loop (an "Event loop is closed" traceback at exit)."""
    state_dir = os.path.join(self.directory, str(step), 'state')
    for root, _, files in os.walk(state_dir):
      if 'manifest.ocdbt' in files:
        data = os.path.join(root, 'd')
        if not (os.path.isdir(data) and os.listdir(data)):
          raise workdir_lib.CheckpointError(f'its array data files are missing (nothing in '
                                f'{os.path.relpath(data, self.directory)})')

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state saved at `step` (and `data_iterator` set to its position)."""
    self._check_process_count(step)
    self._check_files(step)
    # A checkpoint of the other block layout (`model.scan_layers`) is read
    # in its own layout, then converted (`workdir.in_saved_layout`).
    saved_abstract, to_target = workdir_lib.in_saved_layout(
        os.path.join(self.directory, str(step), 'state'), abstract_state)
    items = {'state': ocp.args.StandardRestore(saved_abstract)}
    # A step-0 checkpoint saved without the data item (`python -m model.hf
    # import` writes one before any data exists) leaves the iterator at the
    # start; at any later step a missing data item is an error.
    has_data = step != 0 or os.path.isdir(os.path.join(self.directory, str(step), 'data'))
    if data_iterator is not None and has_data:
      import grain  # pylint: disable=g-import-not-at-top
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif data_iterator is not None:
      logging.info('checkpoint %d holds no data-iterator state: the data starts '
                   'from the beginning', step)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return to_target(restored['state'])

  def restore_latest(self, abstract_state, data_iterator=None):
    """(state, step) of the newest loadable checkpoint, or (None, None).

    A checkpoint that fails to load while an older one loads (a folder
    truncated by hand, a disk error) is skipped with a warning and moved to
    `DIR/checkpoints.skipped/`. If none loads, the cause is more likely the
    run than the disk (e.g. a changed optimizer), and nothing is moved: the
    newest checkpoint's error is raised.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
        if not all_finite(state['params']):
          raise FloatingPointError('its parameters are not all finite (saved by '
                                   'a diverged run)')
      except configs.ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('checkpoint %s/%d cannot be loaded (%s); trying the '
                        'previous one', self.directory, step, _reason(e))
        failures.append((step, e))
        continue
      if failures:
        self._move_aside([s for s, _ in failures])
      return state, step
    if failures:
      step, error = failures[0]
      raise workdir_lib.CheckpointError(
          f'none of the checkpoints in {self.directory} can be loaded into this '
          f'run\'s state (steps {", ".join(str(s) for s, _ in failures)}); the '
          f'newest, {step}, failed with {_reason(error)}') from error
    return None, None

  def _move_aside(self, steps: list[int]) -> None:
    """Moves unloadable step folders out of orbax's way (process 0)."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), 'checkpoints.skipped')
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f'{step}.{int(time.time())}')
        shutil.move(os.path.join(self.directory, str(step)), target)
        logging.warning('moved the unloadable checkpoint %d to %s', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('ablax_checkpoints_moved_aside')
    self.manager.reload()


def resolve_init_checkpoint(path: str, field: str) -> tuple[str, str]:
  """(workdir, checkpoint step folder) of an init path given in config `field`
  (`workdir.resolve`); a path that is neither is a ConfigError naming `field`."""
  if not path:
    raise configs.ConfigError(f'{field} is empty: give the workdir of a run '
                              '(or one of its checkpoints/STEP folders)')
  try:
    return workdir_lib.resolve(path)
  except workdir_lib.CheckpointError as e:
    raise configs.ConfigError(f'{field}={path!r}: {e}') from None


def load_init_params(cfg, step_dir: str, init_workdir: str, abstract_state, *,
                     field: str):
  """(params, model_state) of another run's checkpoint, for this run's model.

  The run in `init_workdir` must have written a `config.json` describing the
  same model as `cfg` (runtime-only fields such as `attention_impl` may
  differ); otherwise a ConfigError names `field` and the differing fields.
  Only `params` and `model_state` are read (orbax partial restore), into the
  shapes, dtypes and shardings of `abstract_state`, so the init run's
  optimizer does not matter.
  """
  try:
    saved, shape, runtime = _saved_differences(init_workdir, cfg)
  except configs.ConfigError as e:
    raise configs.ConfigError(f'{field}: {e}') from None
  if shape:
    raise configs.ConfigError(
        f'{field}: {init_workdir} holds a different model; differing fields:\n  '
        + '\n  '.join(shape) +
        '\nSet these fields to the init run\'s values.')
  if runtime:
    logging.info('%s: runtime model fields differ from the init run: %s', field,
                 '; '.join(runtime))
  saved_tokenizer = saved.get('data', {}).get('tokenizer', cfg.data.tokenizer)
  if saved_tokenizer != cfg.data.tokenizer:
    logging.warning('data.tokenizer=%r differs from the %r of %s (%s)',
                    cfg.data.tokenizer, saved_tokenizer, init_workdir, field)
  # An empty model_state (the decoder's) has nothing to read.
  keys = ['params'] + (['model_state'] if jax.tree.leaves(abstract_state['model_state'])
                       else [])
  # Either block layout (`workdir.restore` converts).
  restored, _ = workdir_lib.restore(step_dir, {k: abstract_state[k] for k in keys})
  return restored['params'], restored.get('model_state', abstract_state['model_state'])
