"""A workdir, read in one place: its config, its checkpoints, its parameters,
its status.

    DIR/config.json            the fully resolved config (written after step 1)
    DIR/checkpoints/STEP/      orbax: `state` (params, opt_state, step, rng,
                               model_state) and `data` (the iterator position)
    DIR/LOCK                   {"host", "pid", "started", "command"} while a run holds DIR
    DIR/start_failed.json      the error of a run that failed before its first step

Every stage and launcher goes through this module: `train`, `align` and
`train.evaluate` read the config with `load_config`; `train.sample`,
`model.hf export` (`train.hf_workdir`), `train.evaluate`, DPO's reference and
`train.init_checkpoint` restore parameters with `restore_model` /
`restore_params`, which read the `params` (and `model_state`) entries of a
checkpoint and never its optimizer state (orbax partial restore);
`launch.sweep` and `launch.compare` list steps with `steps` and read `status`.
Reading a config, the steps or the status imports no JAX.

Saving and resuming the whole train state is `train.checkpoint`'s.
"""

import dataclasses
import datetime
import json
import os
import shutil
import socket
import time

import ml_collections

import configs

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
LOCK_FILE = 'LOCK'
START_FAILED_FILE = 'start_failed.json'


class CheckpointError(configs.UserError):
  """No checkpoint of the workdir can be loaded, or the one asked for is not there."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
  """A workdir without checkpoints, or a step it does not hold."""


# ----------------------------------------------------------------------------
# The config.


def config_path(workdir: str) -> str:
  return os.path.join(os.path.expanduser(workdir), CONFIG_FILE)


def read_config_json(workdir: str) -> dict:
  """`DIR/config.json` as saved (a dict). The only reader of that file.

  A missing file, a file that is not JSON or not a JSON object is a
  `configs.ConfigError` naming the file.
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise configs.ConfigError(f'{path} not found: give the folder of an ablax '
                              'workdir (one with config.json)')
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise configs.ConfigError(f'{path} is not valid JSON ({e}): restore it, or '
                              'use another workdir') from None
  except OSError as e:
    raise configs.ConfigError(f'{path} cannot be read: {e.strerror}') from None
  if not isinstance(saved, dict) or not isinstance(saved.get('model'), dict):
    raise configs.ConfigError(f'{path} holds no ablax config (no "model" '
                              'section): restore it, or use another workdir')
  return saved


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was run with, validated.

  `configs/base.py`'s defaults with every field of `DIR/config.json` set on
  top, so a workdir written before a field existed reads as that field's
  default. A field that does not fit (wrong type, refused by
  `configs.validate`) is a ConfigError naming the file.
  """
  from configs import base  # pylint: disable=g-import-not-at-top
  from configs import workdir as workdir_config  # pylint: disable=g-import-not-at-top
  saved = read_config_json(workdir)
  cfg = base.get_config()
  try:
    workdir_config.apply_saved(cfg, saved)
    configs.validate(cfg)
  except (TypeError, ValueError, AttributeError, KeyError) as e:
    raise configs.ConfigError(f'{config_path(workdir)}: {configs.errors.one_line(e)}'
                              ) from None
  return cfg


def config_json(cfg) -> str:
  return cfg.to_json_best_effort(indent=2, sort_keys=True)


def write_config(workdir: str, cfg) -> None:
  """Writes `DIR/config.json` (process 0), atomically."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  with open(path + '.tmp', 'w') as f:
    f.write(config_json(cfg) + '\n')
  os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------
# Checkpoint steps and folders.


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINTS)


def steps(workdir: str) -> list[int]:
  """The saved steps, ascending ([] if none).

  Only `DIR/checkpoints/STEP` folders count: orbax writes into a temporary
  folder and renames it to STEP once complete, so temporaries and other names
  are ignored.
  """
  directory = checkpoints_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _is_step_dir(path: str) -> bool:
  return os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, 'state'))


def resolve(path: str, step: int | None = None) -> tuple[str, str]:
  """(workdir, step folder) of a workdir (its newest checkpoint, or `step`)
  or of a `DIR/checkpoints/STEP` folder.

  Raises CheckpointNotFound (a UserError and a FileNotFoundError) naming the
  steps there are.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if _is_step_dir(path):
    if step is not None and step != int(os.path.basename(path)):
      raise CheckpointNotFound(f'{path} is checkpoint {os.path.basename(path)}, '
                               f'not {step}')
    return os.path.dirname(os.path.dirname(path)), path
  directory = checkpoints_dir(path)
  saved = steps(path)
  if not saved:
    if not os.path.isdir(path):
      raise CheckpointNotFound(f'{path}: no such folder; give a workdir with '
                               'checkpoints (or one of its checkpoints/STEP folders)')
    raise CheckpointNotFound(f'{path} holds no checkpoint (nothing under {directory}): '
                             'train it first, or give a workdir with checkpoints '
                             '(or one of its checkpoints/STEP folders)')
  if step is None:
    step = saved[-1]
  elif step not in saved:
    raise CheckpointNotFound(f'no checkpoint {step} in {directory}; there are: '
                             f'{", ".join(map(str, saved))}')
  return path, os.path.join(directory, str(step))


def step_dir(path: str, step: int | None = None) -> str:
  """The checkpoint folder of `resolve`."""
  return resolve(path, step)[1]


# ----------------------------------------------------------------------------
# Parameters, never the optimizer state.


def restore(path: str, abstract: dict, step: int | None = None) -> tuple[dict, int]:
  """Some top-level entries of a checkpoint's train state, and its step.

  `abstract` names them, e.g. {'params': ..., 'model_state': ...} (abstract
  arrays with shardings: what to restore into); the other entries (the
  optimizer state above all) are not read: orbax restores the sub-tree asked
  for (`partial_restore`). `path` as in `resolve`. A checkpoint saved in the
  other block layout (`model.scan_layers`) is converted (`in_saved_layout`).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _, folder = resolve(path, step)
  state_dir = os.path.join(folder, 'state')
  saved_abstract, to_target = in_saved_layout(state_dir, abstract)
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir,
      args=ocp.args.PyTreeRestore(
          item=saved_abstract,
          restore_args=ocp.checkpoint_utils.construct_restore_args(saved_abstract),
          partial_restore=True))
  return to_target(restored), int(os.path.basename(folder))


def saved_layout(state_dir: str):
  """(num_layers, prefix, period) of the blocks in the checkpoint item
  `state_dir` (period None: unrolled), read from orbax's tree metadata; None
  when it has no decoder parameters."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from model import scan as scan_lib  # pylint: disable=g-import-not-at-top
  metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
  tree = getattr(metadata, 'item_metadata', metadata)
  try:
    params = tree['params']
  except (KeyError, TypeError):
    return None
  if 'blocks' not in params and 'scan_blocks' not in params:
    return None
  return scan_lib.tree_layout(params)


def in_saved_layout(state_dir: str, abstract: dict):
  """(what to restore into, convert) for reading the checkpoint item
  `state_dir` into `abstract` (a train state or some of its entries, in this
  run's block layout): when the checkpoint was saved in the other layout
  (`model.scan_layers`: unrolled `blocks` or stacked `scan_blocks`), the
  restore target is `abstract` in the saved layout (placed by the sharding
  rules on the same mesh) and `convert` maps the restored tree into
  `abstract`'s layout and shardings, exactly: parameters, the optimizer's
  moments (which mirror them) and model_state alike. Otherwise (abstract,
  identity). Checkpoints written before layouts existed are unrolled."""
  import jax  # pylint: disable=g-import-not-at-top
  from model import scan as scan_lib  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  identity = (abstract, lambda tree: tree)
  params = abstract.get('params') if hasattr(abstract, 'get') else None
  if params is None or ('blocks' not in params and 'scan_blocks' not in params):
    return identity
  saved = saved_layout(state_dir)
  want = scan_lib.tree_layout(params)
  if saved is None or (saved[2] is None) == (want[2] is None):
    return identity
  # The scanned side's (num_layers, prefix, period) converts both ways.
  layout = saved if want[2] is None else want
  saved_shapes = jax.eval_shape(
      lambda a: scan_lib.convert_state(a, layout, scanned=saved[2] is not None), abstract)
  mesh = jax.tree.leaves(abstract)[0].sharding.mesh
  saved_abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      saved_shapes, sharding.state_shardings(mesh, saved_shapes))
  target_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  convert = jax.jit(lambda tree: scan_lib.convert_state(tree, layout,
                                                        scanned=want[2] is not None),
                    out_shardings=target_shardings)
  return saved_abstract, convert


def restore_params(path: str, abstract_params, step: int | None = None):
  """(params, step): only the model parameters of a checkpoint.

  `abstract_params`: the `params` entry of an abstract state
  (`abstract_model_state` or `train.step.train_state_spec`): shapes, dtypes
  and shardings to restore into.
  """
  restored, at = restore(path, {'params': abstract_params}, step)
  return restored['params'], at


def abstract_model_state(model_fn, mesh):
  """(graphdef, abstract {'params', 'model_state'}, their shardings) of the
  model `model_fn()` builds, placed by the sharding rules on `mesh`; built
  abstractly (no arrays), with no optimizer."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  graphdef, _, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)

  def init():
    _, params, model_state = nnx.split(model_fn(), nnx.Param, ...)
    return {'params': params, 'model_state': model_state}

  shapes = jax.eval_shape(init)
  shardings = sharding.state_shardings(mesh, shapes)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return graphdef, abstract, shardings


def fitting_mesh(cfg):
  """The run's mesh (`cfg.mesh`) if it fits these devices and the batch, else
  data parallel over all of them (a workdir read on another machine)."""
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  try:
    mesh = mesh_lib.make_mesh(cfg.mesh)
    sharding.check_batch(mesh, cfg.train.global_batch_size)
    return mesh
  except configs.ConfigError:
    return mesh_lib.make_mesh(ml_collections.ConfigDict({'data': -1}))


def restore_model(path: str, cfg, mesh, step: int | None = None):
  """(graphdef, {'params', 'model_state'}, their shardings, step) of a
  checkpoint of `cfg`'s decoder, restored onto `mesh`; the optimizer state is
  not read. `path` as in `resolve`."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model as model_lib  # pylint: disable=g-import-not-at-top
  graphdef, abstract, shardings = abstract_model_state(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), mesh)
  # An empty model_state (the decoder's) has nothing to read.
  keys = ['params'] + (['model_state'] if jax.tree.leaves(abstract['model_state']) else [])
  restored, at = restore(path, {k: abstract[k] for k in keys}, step)
  state = {'params': restored['params'],
           'model_state': restored.get('model_state', abstract['model_state'])}
  return graphdef, state, shardings, at


def load_decoder(workdir: str, step: int | None = None):
  """(cfg, decoder) of a workdir's config and newest (or `step`) parameters:
  what sampling and export need. Reads neither optimizer nor data state."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = load_config(workdir)
  folder = step_dir(workdir, step)
  graphdef, state, _, _ = restore_model(folder, cfg, fitting_mesh(cfg))
  return cfg, nnx.merge(graphdef, state['params'], state['model_state'])


# ----------------------------------------------------------------------------
# The lock, a failed start, and the status.


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:
    return True
  return True


def read_lock(workdir: str) -> dict | None:
  """The LOCK record, {} if unreadable (being written, or garbage), None if
  there is no lock."""
  return _read_record(os.path.join(workdir, LOCK_FILE))


def lock_state(record: dict | None) -> str | None:
  """None (no lock), 'live' (its process runs on this host), 'remote' (held
  from another host: cannot be checked) or 'stale' (its process is gone)."""
  if record is None:
    return None
  host, pid = record.get('host'), record.get('pid')
  if host and host != socket.gethostname():
    return 'remote'
  return 'live' if isinstance(pid, int) and _alive(pid) else 'stale'


class WorkdirLock:
  """`DIR/LOCK` while a run trains in DIR: one run per workdir.

  A second run is refused at once, naming the holder. A lock whose process is
  gone (same host, no such PID: a kill -9, a crash) is stale and taken over
  with a warning; a lock held from another host cannot be checked and is
  refused with the file to delete if that run is over. Only process 0 of a
  multi-process job takes it.
  """

  def __init__(self, workdir: str, command: str = 'train'):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self.command = command
    self.held = False

  def acquire(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return
    make_workdir(self.workdir)
    record = {'host': socket.gethostname(), 'pid': os.getpid(),
              'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec='seconds'),
              'command': self.command}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = read_lock(self.workdir)
        if not holder:           # being written right now, or garbage
          time.sleep(0.2)
          holder = read_lock(self.workdir) or {}
        host, pid, state = holder.get('host'), holder.get('pid'), lock_state(holder)
        if state == 'live' and host:
          raise configs.UserError(
              f'{self.workdir} is in use by another run ({holder.get("command", "?")}, '
              f'pid {pid} on {host}, started {holder.get("started", "?")}): wait '
              'for it to finish or stop it, or use another --workdir')
        if state == 'remote':
          raise configs.UserError(
              f'{self.workdir} is locked by a run on host {host} (pid {pid}, '
              f'started {holder.get("started", "?")}); if that run is over, '
              f'delete {self.path}')
        logging.warning('taking over the stale lock %s (pid %s on %s is gone)',
                        self.path, pid, host)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(record, f)
      self.held = True
      return
    raise configs.UserError(f'{self.path}: could not take the workdir lock')

  def release(self) -> None:
    if self.held and (read_lock(self.workdir) or {}).get('pid') == os.getpid():
      os.remove(self.path)
    self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def make_workdir(workdir: str) -> None:
  """Creates `workdir`; one that is a file or cannot be made is a UserError."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise configs.UserError(f'--workdir {workdir} is a file, not a folder')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise configs.UserError(f'--workdir {workdir} cannot be created: '
                            f'{e.strerror}') from None


def clear_run(workdir: str) -> None:
  """Removes a run from `workdir`: config.json, checkpoints and TensorBoard
  files (`model.hf import --overwrite`)."""
  for name in (CONFIG_FILE, START_FAILED_FILE):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  for name in (CHECKPOINTS, 'checkpoints.skipped'):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  for name in os.listdir(workdir):
    if name.startswith('events.out.tfevents.'):
      os.remove(os.path.join(workdir, name))


def mark_start_failed(workdir: str, stage: str, error: BaseException) -> None:
  """Writes `DIR/start_failed.json` for a run that failed before its first step
  ({"stage", "type", "message", "time"}); `launch.compare` shows it."""
  import jax  # pylint: disable=g-import-not-at-top
  if (jax.process_index() != 0 or not os.path.isdir(workdir) or
      os.path.exists(config_path(workdir))):
    return                      # a run that started once is not a failed start
  record = {'stage': stage, 'type': type(error).__name__,
            'message': configs.errors.one_line(error),
            'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec='seconds')}
  with open(os.path.join(workdir, START_FAILED_FILE), 'w') as f:
    json.dump(record, f)


def clear_start_failed(workdir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, START_FAILED_FILE)
  if jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)



def _read_record(path: str) -> dict | None:
  """A small JSON record file: the dict, {} if unreadable (being written, or
  garbage), None if absent."""
  try:
    with open(path) as f:
      record = json.load(f)
    return record if isinstance(record, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def read_start_failed(workdir: str) -> dict | None:
  """The record of `mark_start_failed` ({} if unreadable), None if absent."""
  return _read_record(os.path.join(workdir, START_FAILED_FILE))


@dataclasses.dataclass(frozen=True)
class Status:
  """What a workdir's files say about its run.

  state:
    'running': a run holds DIR/LOCK and its process is alive (or it runs on
      another host, which cannot be checked);
    'finished': the newest checkpoint is at `train.steps` of config.json;
    'crashed': DIR/LOCK was left by a process that is gone (kill -9, out of
      memory, a lost machine);
    'stopped': it ran (config.json) and exited before `train.steps` without
      leaving a lock: preempted, interrupted, or an error after its first step;
    'failed to start': DIR/start_failed.json, the error of a run that never
      finished its first step;
    'empty': no run (none of these files).
  step: the newest checkpoint (None if none); steps: `train.steps` (None
  without a readable config.json); detail: the LOCK or start_failed.json
  record, where one says more.
  """
  state: str
  step: int | None = None
  steps: int | None = None
  detail: dict = dataclasses.field(default_factory=dict)


def status(workdir: str) -> Status:
  """The run's `Status`, from its files alone (no JAX, nothing written)."""
  saved = steps(workdir)
  step = saved[-1] if saved else None
  try:
    total = read_config_json(workdir).get('train', {}).get('steps')
  except configs.UserError:
    total = None
  lock = read_lock(workdir)
  held = lock_state(lock)
  if held in ('live', 'remote'):
    return Status('running', step, total, lock or {})
  if step is not None and total is not None and step >= total:
    return Status('finished', step, total)
  if held == 'stale':
    return Status('crashed', step, total, lock or {})
  failed = read_start_failed(workdir)
  if failed is not None and total is None:
    return Status('failed to start', step, total, failed)
  if total is not None or step is not None:
    return Status('stopped', step, total)
  return Status('empty')
