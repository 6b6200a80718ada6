"""The training loop: `train_and_evaluate(cfg, workdir)`.

Reads top to bottom in sections, like big_vision's `train.py`: mesh, workdir,
data, state, steps, checkpoint (resume), metrics, loop. All the work of a
step happens in one jitted `train_step` (`train/step.py`); the loop only
feeds batches, keeps time, and decides when to log, evaluate and save.

Safety:
- the loss of every step is checked (one step late, so the host never waits
  for the device): a NaN or inf stops the run with `FloatingPointError`
  naming the step, and no checkpoint is written after it;
- SIGTERM (a TPU/cluster preemption) saves a checkpoint at the current step
  and returns normally, so the process exits 0; a multi-process job agrees on
  the step through JAX's preemption sync point;
- re-running on the same workdir resumes from the newest loadable
  checkpoint, including the data iterator's position, so the run continues
  exactly (bitwise, on the same hardware) as if it had never stopped.

`train.init_checkpoint` starts a fresh run from another run's parameters
(fine-tuning, e.g. SFT after pretraining): the model must be the same, the
optimizer, step and schedule start fresh; a workdir that already holds
checkpoints resumes from them and ignores it.
"""

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

import configs
import model as model_lib
from data import pipeline
from train import checkpoint as checkpoint_lib
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optim
from train import sharding
from train import step as step_lib


class Preemption:
  """SIGTERM sets a flag the loop checks after each step (single process).

  A multi-process job uses JAX's preemption service instead (it catches the
  signal and lets every process reach the same step before saving).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:      # the preemption service is switched off
        return False
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _OwnInfoOnly:
  """A log filter: INFO from ablax's own files, WARNING and up from libraries
  (orbax alone logs a dozen INFO lines per checkpoint)."""

  PACKAGES = ('configs', 'model', 'train', 'data', 'align', 'launch', 'bench')

  def filter(self, record) -> bool:
    if record.levelno >= 30:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_REPO + os.sep) and (
        os.path.relpath(path, _REPO).split(os.sep)[0] in self.PACKAGES)


def configure_logging() -> None:
  """Keeps the console readable: see `_OwnInfoOnly`."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  for name in ('orbax', 'jax', 'grain'):
    std_logging.getLogger(name).addFilter(_OwnInfoOnly())


_Preemption = Preemption       # the name align/loop.py first used


def global_batch(batch: dict, batch_sharding) -> dict:
  """This process's rows -> global arrays split over the batch mesh axes."""
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_sharding)    # one call for all fields
  def one(local):
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding, local, shape)
  return {k: one(v) for k, v in batch.items()}


def _is_finite(x) -> bool:
  return bool(np.all(np.isfinite(x)))


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Trains `cfg` in `workdir` (resuming if it holds checkpoints).

  Returns a summary: `step` (the last step done), `status` (`done` or
  `preempted`), `losses` ({step: train loss} of this invocation), `train`
  (the scalars of the last step) and `eval` (the last eval's scalars).
  """
  t = cfg.train
  # ---------------------------------------------------------------- Mesh.
  mesh = mesh_lib.make_mesh(cfg.mesh)
  sharding.check_batch(mesh, t.global_batch_size, t.grad_accum_steps)
  batch_sharding = sharding.batch_sharding(mesh)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape),
               mesh.size, jax.process_count())

  # ------------------------------------------------------------- Workdir.
  checkpoint_lib.check_config(workdir, cfg)
  checkpoint_lib.write_config(workdir, cfg)

  # ---------------------------------------------------------------- Data.
  process = (jax.process_index(), jax.process_count())
  train_iter = pipeline.make_iterator(cfg, 'train', *process)
  do_eval = t.eval_steps > 0 and pipeline.has_eval(cfg)

  def eval_batches():
    for batch in pipeline.make_iterator(cfg, 'eval', *process):
      yield global_batch(batch, batch_sharding)

  # --------------------------------------------------------------- State.
  optimizer, schedule = optim.make_optimizer(t, cfg.model)
  graphdef, init, abstract_state, state_shardings = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed)),
      optimizer, mesh, t.seed)
  groups = optim.describe_groups(abstract_state['params'], t, cfg.model)
  logging.info('optimizer %s, parameter groups (train/optim.py GROUP_RULES):\n%s',
               t.get('optimizer', 'adamw'), '\n'.join(groups))
  for line in sharding.describe(mesh, abstract_state['params']):
    logging.debug('param %s', line)

  # --------------------------------------------------------------- Steps.
  loss_fn = step_lib.lm_loss(t)
  train_step = step_lib.make_train_step(
      loss_fn, optimizer, graphdef=graphdef, state_shardings=state_shardings,
      mesh=mesh, grad_accum_steps=t.grad_accum_steps, schedule=schedule)
  eval_step = step_lib.make_eval_step(
      loss_fn, graphdef=graphdef, state_shardings=state_shardings, mesh=mesh)

  # ---------------------------------------------------------- Checkpoint.
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=t.checkpoint_every_steps,
                                     keep=t.keep_checkpoints)
  state, step = ckpt.restore_latest(abstract_state, train_iter)
  init_checkpoint = t.get('init_checkpoint') or ''
  if state is None and init_checkpoint:
    # Fine-tuning (e.g. SFT after pretraining): another run's parameters, a
    # fresh optimizer, step and schedule.
    init_workdir, step_dir = checkpoint_lib.resolve_init_checkpoint(
        init_checkpoint, 'train.init_checkpoint')
    params, model_state = checkpoint_lib.load_init_params(
        cfg, step_dir, init_workdir, abstract_state, field='train.init_checkpoint')

    def init_from(params, model_state):
      # init()'s random parameters are unused here, so XLA never computes them.
      return dict(init(), params=params, model_state=model_state,
                  opt_state=optimizer.init(jax.tree.map(
                      lambda x: x.astype(jnp.float32), params)))

    state = jax.jit(init_from, out_shardings=state_shardings)(params, model_state)
    step = 0
    logging.info('initialised %s parameters from %s',
                 f'{model_lib.count_params(cfg.model):,}', step_dir)
  elif state is None:
    state, step = jax.jit(init, out_shardings=state_shardings)(), 0
    logging.info('initialised %s parameters', f'{model_lib.count_params(cfg.model):,}')
  else:
    logging.info('resumed from %s/%d%s', ckpt.directory, step,
                 ' (train.init_checkpoint is ignored on resume)' if init_checkpoint else '')
  if step >= t.steps:
    logging.info('workdir %s is already at step %d of %d', workdir, step, t.steps)

  # ------------------------------------------------------------- Metrics.
  writer = metrics_lib.SummaryWriter(workdir)
  console = metrics_lib.Console(t.steps, step)
  tokens_per_step = t.global_batch_size * t.seq_len
  flops_per_step = model_lib.flops_per_token(cfg.model, t.seq_len) * tokens_per_step
  peak = metrics_lib.peak_flops(mesh.devices.flat)
  if step == 0:
    writer.text(0, 'config', '```\n' + checkpoint_lib.config_json(cfg) + '\n```')

  summary = {'step': step, 'status': 'done', 'losses': {}, 'train': {}, 'eval': {}}

  def evaluate(at_step):
    scalars = step_lib.eval_metrics(eval_step, state, eval_batches())
    summary['eval'] = {'eval/loss': scalars['loss'],
                       'eval/perplexity': scalars['perplexity']}
    writer.scalars(at_step, summary['eval'])
    console.eval_line(at_step, summary['eval'])

  # ---------------------------------------------------------------- Loop.
  pending = []                  # (step, device metrics) not yet checked
  clock = {'time': None, 'step': step}

  def check(upto):
    """Fetches and checks the metrics of the pending steps <= upto."""
    while pending and pending[0][0] <= upto:
      s, device_metrics = pending.pop(0)
      host = jax.device_get(device_metrics)
      if not (_is_finite(host['objective']) and _is_finite(host['loss'])):
        raise FloatingPointError(
            f'the loss is {float(host["loss"])} (objective '
            f'{float(host["objective"])}) at step {s}; stopping. The last good '
            f'checkpoint is {ckpt.directory}/{max(ckpt.steps, default="(none)")}')
      summary['losses'][s] = float(host['loss'])
      if clock['time'] is None:
        # The first step done in this process includes compilation: time
        # throughput from its end.
        clock['time'], clock['step'] = time.perf_counter(), s
      if s % t.log_every_steps == 0 or s == t.steps:
        scalars = metrics_lib.train_scalars(host, num_experts=cfg.model.num_experts)
        now = time.perf_counter()
        if s > clock['step']:
          tokens_per_second = tokens_per_step * (s - clock['step']) / (now - clock['time'])
          scalars['train/tokens_per_second'] = tokens_per_second
          scalars['train/mfu'] = tokens_per_second / tokens_per_step * flops_per_step / peak
          clock['time'], clock['step'] = now, s
        summary['train'] = scalars
        writer.scalars(s, scalars)
        console.train_line(s, scalars)

  def save(at_step, force=False):
    check(at_step)              # never checkpoint a step whose loss is not finite
    if ckpt.save(at_step, state, train_iter, force=force):
      logging.info('saving checkpoint %d', at_step)

  try:
    with Preemption() as preemption:
      if do_eval and step == 0:
        evaluate(0)
      while step < t.steps:
        with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
          batch = global_batch(next(train_iter), batch_sharding)
          state, device_metrics = train_step(state, batch)
        step += 1
        pending.append((step, device_metrics))
        console.step(step)
        # Check the previous step while this one runs.
        check(step - 1)
        if do_eval and (step % t.eval_every_steps == 0 or step == t.steps):
          check(step)
          evaluate(step)
        if step % t.checkpoint_every_steps == 0 or step == t.steps:
          save(step, force=True)
        if preemption.reached(step):
          save(step, force=True)
          ckpt.wait()
          console.print(f'SIGTERM: saved checkpoint {step} in {ckpt.directory}; exiting')
          summary['status'] = 'preempted'
          break
      check(step)
    if summary['status'] == 'done':
      ckpt.wait()
      console.print(f'done: step {step} of {t.steps} in {workdir} '
                    f'(tensorboard --logdir {workdir})')
  finally:
    summary['step'] = step
    ckpt.close()
    writer.close()
    console.close()
    train_iter.close()
  return summary
