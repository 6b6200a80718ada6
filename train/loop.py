"""The training loop of every stage: `run(cfg, workdir, objective, stage)`.

`python -m train` (`train_and_evaluate`, the `LanguageModel` objective) and
`python -m align` (`align.loop`, the DPO objective) run this one loop body;
a stage plugs in an `Objective`: its data iterators, its loss function, its
extra frozen inputs (DPO's reference), its tags and console fields. The loop
reads top to bottom in sections, like big_vision's `train.py`: mesh,
workdir, state, objective (data), checkpoint (resume), steps, metrics, loop.
All the work of a step happens in one jitted `train_step` (`train/step.py`);
the loop only feeds batches, keeps time, and decides when to log, evaluate
and save.

Safety (docs/training.md, "Stopping, locking and diverging"), for every stage:
- one run per workdir: `DIR/LOCK` (host, PID) while it runs; a second run is
  refused, a stale lock (its process gone) taken over with a warning;
- the loss, gradient norm and finiteness of the updated parameters of every
  step are checked (one step late, so the host never waits for the device,
  and always before a save): a non-finite state is never checkpointed.
  `train.on_divergence='stop'` then raises `FloatingPointError` naming the
  step and the newest checkpoint whose parameters were read back finite;
  `'rollback'` restores a finite checkpoint, skips the batches since, scales
  the learning rate and goes on (PaLM, Chowdhery et al. 2022); loss spikes
  (`train.spike_threshold`) are counted and can roll back too;
- SIGTERM (a TPU/cluster preemption) and SIGINT (Ctrl-C) save a checkpoint at
  the current step and return (status `preempted`, exit 0; `interrupted`,
  exit 130); a second Ctrl-C exits at once; a multi-process job agrees on
  the SIGTERM step through JAX's preemption sync point;
- `DIR/config.json` is written once the first step ran; a run that fails
  before leaves `DIR/start_failed.json` with the error;
- re-running on the same workdir resumes from the newest loadable
  checkpoint, including the data iterator's position, so the run continues
  exactly (bitwise, on the same hardware) as if it had never stopped; a
  workdir already at `train.steps` has nothing to do.

`train.init_checkpoint` starts a fresh run from another run's parameters
(fine-tuning, e.g. SFT after pretraining): the model must be the same, the
optimizer, step and schedule start fresh; a workdir that already holds
checkpoints resumes from them and ignores it.
"""

import collections
import json
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

import configs
import configs.errors
import model as model_lib
from data import pipeline
from train import checkpoint as checkpoint_lib
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optim
from train import sharding
from train import step as step_lib
from train import tasks as tasks_lib
from train import workdir as workdir_lib


class Preemption:
  """SIGTERM and SIGINT set a flag the loop checks after each step (single
  process); a second SIGINT (Ctrl-C twice) exits at once, without saving.

  A multi-process job uses JAX's preemption service for SIGTERM instead (it
  catches the signal and lets every process reach the same step before
  saving).
  """

  def __init__(self):
    self.requested = False
    self.signal = None          # 'SIGTERM' or 'SIGINT' once requested
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if jax.process_count() > 1 else (
          signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal == 'SIGINT':
      os.write(2, b'\nablax: second Ctrl-C: exiting at once, without saving\n')
      os._exit(configs.errors.EXIT_INTERRUPTED)  # pylint: disable=protected-access
    self.signal = signal.Signals(signum).name
    self.requested = True
    if signum == signal.SIGINT:
      os.write(2, b'\nablax: Ctrl-C: saving a checkpoint after this step '
               b'(Ctrl-C again to exit at once)\n')

  def reached(self, step: int) -> bool:
    if self.requested:
      return True
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal = 'SIGTERM'
          return True
      except RuntimeError:      # the preemption service is switched off
        pass
    return False

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def exit_status(summary: dict) -> int:
  """The process exit status of a finished run's summary (see configs/errors.py)."""
  return configs.errors.EXIT_INTERRUPTED if summary.get('status') == 'interrupted' else 0


def run_locked(workdir: str, stage: str, body):
  """`body(started)` holding the workdir lock (`workdir_lib.WorkdirLock`).

  `body` calls `started()` once its first step ran; an error before that
  leaves `DIR/start_failed.json` (`workdir_lib.mark_start_failed`) instead of
  a config.json, so the workdir does not look like a stopped run.
  """
  with workdir_lib.WorkdirLock(workdir, stage):
    state = {'started': False}

    def started():
      if not state['started']:
        state['started'] = True
        workdir_lib.clear_start_failed(workdir)

    try:
      return body(started)
    except Exception as e:
      if not state['started']:
        workdir_lib.mark_start_failed(workdir, stage, e)
      raise


class Diverged(Exception):
  """A step whose loss, gradient or parameters are not finite, or a spike."""

  def __init__(self, step: int, reason: str, spike: bool = False):
    super().__init__(reason)
    self.step, self.reason, self.spike = step, reason, spike


class SpikeDetector:
  """`train.spike_threshold` k: a loss above the running mean of the last
  `window` losses by more than k running standard deviations is a spike
  (after `min_steps` losses; spikes do not enter the window)."""

  def __init__(self, threshold, window: int = 100, min_steps: int = 20):
    self.threshold = threshold
    self.losses = collections.deque(maxlen=window)
    self.min_steps = min_steps
    self.count = 0

  def __call__(self, loss: float) -> str | None:
    """None, or why `loss` is a spike."""
    if self.threshold is None:
      return None
    if len(self.losses) >= self.min_steps:
      mean, std = float(np.mean(self.losses)), float(np.std(self.losses))
      if loss > mean + self.threshold * max(std, 1e-6):
        self.count += 1
        return (f'loss spike: {loss:.4g} is more than {self.threshold:g} standard '
                f'deviations ({std:.3g}) above the running mean {mean:.4g}')
    self.losses.append(loss)
    return None


def _is_finite(x) -> bool:
  return bool(np.all(np.isfinite(x)))


ROLLBACKS_FILE = 'rollbacks.json'


def _read_rollbacks(workdir: str) -> list[dict]:
  path = os.path.join(workdir, ROLLBACKS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def _scaled(train_cfg, scale: float):
  """`train_cfg` with the learning rate times `scale` (rollbacks)."""
  if scale == 1.0:
    return train_cfg
  scaled = train_cfg.copy_and_resolve_references()
  scaled.learning_rate = train_cfg.learning_rate * scale
  if scaled.get('muon_adam_lr') is not None:     # muon's AdamW groups too
    scaled.muon_adam_lr = train_cfg.muon_adam_lr * scale
  return scaled


# ----------------------------------------------------------------------------
# The objective: what a stage plugs into the loop.


class Setup(NamedTuple):
  """What the loop has made before the objective: the run's mesh and state spec."""
  cfg: Any
  workdir: str
  mesh: Any
  batch_sharding: Any
  graphdef: nnx.GraphDef
  abstract_state: dict
  state_shardings: dict


class Start(NamedTuple):
  """Parameters a fresh run starts from instead of a random init."""
  params: Any
  model_state: Any
  source: str                   # where they come from, for the log


class Objective:
  """A stage's part of the loop: its data, loss, frozen inputs, tags and lines.

  The loop (`run`) does everything else the same way for every stage: the
  mesh and state, the lock, resuming, the jitted steps, finiteness checks,
  rollback and spikes, checkpoints, SIGTERM/SIGINT, throughput and MFU,
  TensorBoard and the console. A stage sets, in `__init__(setup)`:

  - `train_iter`: its checkpointed grain iterator of host batches;
  - `loss_fn`: a `train.step.LossFn` (sums and a `weight`); with `frozen`
    not None it also takes the frozen inputs (`make_train_step`);
  - `tokens_per_step`, `flops_per_token`: for `PREFIX/tokens_per_second` and
    `PREFIX/mfu` (the model FLOPs the step spends per token it reads);
  - `prefix`, `eval_prefix`, `line`, `eval_line`: its tags and console fields;
  - `do_eval`: whether the run evaluates.

  and `start(resumed)` may load frozen inputs (`frozen`, `frozen_shardings`:
  sharded arrays passed to every step, never trained nor donated) and the
  parameters a fresh run starts from.
  """

  prefix, eval_prefix = 'train', 'eval'
  line, eval_line = metrics_lib.TRAIN_LINE, metrics_lib.EVAL_LINE
  frozen = frozen_shardings = None   # None: the steps take no frozen argument
  train_iter = loss_fn = None
  tokens_per_step = flops_per_token = 0
  do_eval = False

  def batch(self, host_batch: dict) -> dict:
    """A host batch of `train_iter` -> the step's global device batch."""
    raise NotImplementedError

  def start(self, resumed: bool) -> Start | None:
    """Called once the newest checkpoint is restored (or none was)."""
    del resumed
    return None

  def first_step_done(self) -> None:
    """Writes what the workdir records once the run started (config.json is
    the loop's)."""

  def scalars(self, host: dict, step: int) -> dict[str, float]:
    """A logged step's metrics (host values) under their tags."""
    raise NotImplementedError

  def evaluate(self, state, eval_step) -> dict[str, float]:
    """Eval scalars; `eval_step(state, batch)` returns a device batch's sums."""
    raise NotImplementedError

  def close(self) -> None:
    self.train_iter.close()


class LanguageModel(Objective):
  """Pretraining and SFT: `lm_loss` on `data.pipeline` batches; `train/`,
  `eval/` tags, eval sources of a mixture, bits/byte and eval tasks, and
  `train.init_checkpoint`."""

  def __init__(self, setup: Setup):
    cfg, t = setup.cfg, setup.cfg.train
    self.cfg, self.setup = cfg, setup
    self.process = (jax.process_index(), jax.process_count())
    self.train_iter = pipeline.make_iterator(cfg, 'train', *self.process)
    self.do_eval = t.eval_steps > 0 and pipeline.has_eval(cfg)
    self.loss_fn = step_lib.lm_loss(t)
    self.tokens_per_step = t.global_batch_size * t.seq_len
    self.flops_per_token = model_lib.flops_per_token(cfg.model, t.seq_len)
    self.eval_extra = tasks_lib.loop_hook(cfg, setup.graphdef, setup.state_shardings,
                                          setup.mesh)

  def batch(self, host_batch):
    return sharding.global_batch(host_batch, self.setup.batch_sharding)

  def start(self, resumed):
    init_checkpoint = self.cfg.train.get('init_checkpoint') or ''
    if resumed or not init_checkpoint:
      if resumed and init_checkpoint:
        logging.info('train.init_checkpoint is ignored on resume')
      return None
    # Fine-tuning (e.g. SFT after pretraining): another run's parameters, a
    # fresh optimizer, step and schedule.
    init_workdir, step_dir = checkpoint_lib.resolve_init_checkpoint(
        init_checkpoint, 'train.init_checkpoint')
    params, model_state = checkpoint_lib.load_init_params(
        self.cfg, step_dir, init_workdir, self.setup.abstract_state,
        field='train.init_checkpoint')
    return Start(params, model_state, step_dir)

  def scalars(self, host, step):
    out = metrics_lib.train_scalars(host, num_experts=self.cfg.model.num_experts)
    out.update(metrics_lib.source_token_scalars(   # data.mixture only
        pipeline.tokens_seen(self.train_iter, step), jax.process_count()))
    return out

  def _eval_batches(self, source):
    for batch in pipeline.make_iterator(self.cfg, 'eval', *self.process, source=source):
      yield self.batch(batch)

  def evaluate(self, state, eval_step):
    out = metrics_lib.eval_scalars(   # per source for a mixture
        lambda source: step_lib.eval_metrics(eval_step, state, self._eval_batches(source)),
        pipeline.eval_sources(self.cfg))
    out.update(self.eval_extra(state, out))   # bits/byte (per source), eval.tasks
    return out


# ----------------------------------------------------------------------------
# The loop.


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Trains `cfg` in `workdir` (resuming if it holds checkpoints).

  Returns a summary: `step` (the last step done), `status` (`done`,
  `preempted` by SIGTERM, `interrupted` by SIGINT, or `nothing_to_do`),
  `losses` ({step: train loss} of this invocation), `train` (the scalars of
  the last step), `eval` (the last eval's scalars) and `rollbacks` (the
  rollbacks of this invocation, see `train.on_divergence`).
  """
  return run(cfg, workdir, LanguageModel, 'train')


def run(cfg, workdir: str, make_objective, stage: str) -> dict:
  """The loop of every stage: trains `make_objective(setup)` (an `Objective`)
  in `workdir` under the workdir lock; `stage` names the run in `DIR/LOCK`
  and `start_failed.json`. Returns the summary of `train_and_evaluate`."""
  return run_locked(workdir, stage,
                    lambda started: _run(cfg, workdir, make_objective, started))


def unrolled_if_needed(cfg):
  """`cfg`, with `model.scan_layers` off where the update must see each
  layer's tensors apart: Adafactor factors a parameter's two largest dims and
  clips each parameter's update to RMS 1, which on a stacked [layers, ...]
  tensor would mix the layers (not the unrolled run's numerics). The
  decoder's weights and losses do not depend on the layout."""
  if cfg.train.get('optimizer', 'adamw') == 'adafactor' and cfg.model.get('scan_layers'):
    logging.info("train.optimizer='adafactor' updates each layer's tensors apart: "
                 'the blocks run unrolled (model.scan_layers=False)')
    cfg = cfg.copy_and_resolve_references()
    cfg.model.scan_layers = False
  return cfg


def _run(cfg, workdir: str, make_objective, started) -> dict:
  cfg = unrolled_if_needed(cfg)
  t = cfg.train
  on_divergence = t.get('on_divergence', 'stop')
  max_rollbacks = t.get('max_rollbacks', 0)
  rollback_lr_scale = t.get('rollback_lr_scale', 1.0)
  if t.warmup_steps > t.steps:
    logging.warning('train.warmup_steps=%d is more than train.steps=%d: the '
                    'learning rate never reaches train.learning_rate',
                    t.warmup_steps, t.steps)
  # ---------------------------------------------------------------- Mesh.
  mesh = mesh_lib.make_mesh(cfg.mesh)
  sharding.check_batch(mesh, t.global_batch_size, t.grad_accum_steps)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape),
               mesh.size, jax.process_count())

  # ------------------------------------------------------------- Workdir.
  # config.json is written once the first step ran (`started`).
  checkpoint_lib.check_config(workdir, cfg)
  rollbacks = _read_rollbacks(workdir)
  lr_scale = rollback_lr_scale ** len(rollbacks)

  # --------------------------------------------------------------- State.
  optimizer, schedule = optim.make_optimizer(_scaled(t, lr_scale), cfg.model)
  graphdef, init, abstract_state, state_shardings = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed)),
      optimizer, mesh, t.seed)
  groups = optim.describe_groups(abstract_state['params'], t, cfg.model)
  logging.info('optimizer %s, parameter groups (train/optim.py GROUP_RULES):\n%s',
               t.get('optimizer', 'adamw'), '\n'.join(groups))
  for line in sharding.describe(mesh, abstract_state['params']):
    logging.debug('param %s', line)

  # ----------------------------------------------------- Objective, data.
  objective = make_objective(Setup(cfg, workdir, mesh, sharding.batch_sharding(mesh),
                                   graphdef, abstract_state, state_shardings))
  writer = console = ckpt = None
  try:
    # -------------------------------------------------------- Checkpoint.
    ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=t.checkpoint_every_steps,
                                       keep=t.keep_checkpoints)
    state, step = ckpt.restore_latest(abstract_state, objective.train_iter)
    summary = {'step': step, 'status': 'done', 'losses': {}, 'train': {}, 'eval': {},
               'rollbacks': []}
    if state is not None:
      logging.info('resumed from %s/%d', ckpt.directory, step)
      if step >= t.steps:
        started()
        print(f'nothing to do: {workdir} is already at step {step} and '
              f'train.steps={t.steps}; set --config.train.steps higher to train on')
        summary['status'] = 'nothing_to_do'
        return summary
    start = objective.start(resumed=state is not None)   # frozen inputs too
    if state is None and start is not None:
      # A copy: the state is donated to the step, and the objective may keep
      # the arrays it started from (DPO's reference).
      state = jax.jit(lambda params, model_state: step_lib.new_train_state(
          jax.tree.map(jnp.copy, params), model_state, optimizer, t.seed),
                      out_shardings=state_shardings)(start.params, start.model_state)
      step = 0
      logging.info('initialised %s parameters from %s',
                   f'{model_lib.count_params(cfg.model):,}', start.source)
    elif state is None:
      state, step = jax.jit(init, out_shardings=state_shardings)(), 0
      logging.info('initialised %s parameters', f'{model_lib.count_params(cfg.model):,}')
    if start is not None:
      # Only what the steps read stays on the devices.
      kept = {id(x) for x in jax.tree.leaves(objective.frozen)}
      for x in jax.tree.leaves(start.params):
        if id(x) not in kept:
          x.delete()
      del start

    # ------------------------------------------------------------- Steps.
    frozen = () if objective.frozen is None else (objective.frozen,)

    def make_step(optimizer, schedule):
      return step_lib.make_train_step(
          objective.loss_fn, optimizer, graphdef=graphdef,
          state_shardings=state_shardings, mesh=mesh,
          grad_accum_steps=t.grad_accum_steps, schedule=schedule,
          frozen_shardings=objective.frozen_shardings)

    train_step = make_step(optimizer, schedule)
    jitted_eval = step_lib.make_eval_step(
        objective.loss_fn, graphdef=graphdef, state_shardings=state_shardings,
        mesh=mesh, frozen_shardings=objective.frozen_shardings)
    eval_step = lambda state, batch: jitted_eval(state, batch, *frozen)

    # ----------------------------------------------------------- Metrics.
    writer = metrics_lib.SummaryWriter(workdir)
    console = metrics_lib.Console(t.steps, step)
    peak = metrics_lib.peak_flops(mesh.devices.flat)
    prefix = objective.prefix
    if step == 0:
      writer.text(0, 'config', '```\n' + workdir_lib.config_json(cfg) + '\n```')

    def evaluate(at_step):
      summary['eval'] = objective.evaluate(state, eval_step)
      writer.scalars(at_step, summary['eval'])
      console.eval_line(at_step, summary['eval'], objective.eval_prefix,
                        objective.eval_line)

    # -------------------------------------------------------------- Loop.
    pending = []                # (step, device metrics) not yet checked
    clock = {'time': None, 'step': step}
    spikes = SpikeDetector(t.get('spike_threshold'))
    config_written = False

    def check(upto):
      """Fetches and checks the metrics of the pending steps <= upto."""
      while pending and pending[0][0] <= upto:
        s, device_metrics = pending.pop(0)
        host = jax.device_get(device_metrics)
        bad = [name for name in ('loss', 'objective', 'grad_norm')
               if name in host and not _is_finite(host[name])]
        if float(host.get('params_finite', 1.0)) != 1.0:
          bad.append('parameters')
        if bad:
          pending.clear()
          raise Diverged(s, f'non-finite {", ".join(bad)} (loss '
                         f'{float(host["loss"])}, grad_norm '
                         f'{float(host.get("grad_norm", float("nan")))}) at step {s}')
        spike = spikes(float(host['loss']))
        if spike:
          logging.warning('step %d: %s', s, spike)
          if on_divergence == 'rollback':
            pending.clear()
            raise Diverged(s, f'{spike} at step {s}', spike=True)
        summary['losses'][s] = float(host['loss'])
        if clock['time'] is None:
          # The first step done in this process includes compilation: time
          # throughput from its end.
          clock['time'], clock['step'] = time.perf_counter(), s
        if s % t.log_every_steps == 0 or s == t.steps:
          scalars = objective.scalars(host, s)
          if spikes.threshold is not None:
            scalars[f'{prefix}/spikes'] = float(spikes.count)
          now = time.perf_counter()
          if s > clock['step']:
            tokens_per_second = (objective.tokens_per_step * (s - clock['step']) /
                                 (now - clock['time']))
            scalars[f'{prefix}/tokens_per_second'] = tokens_per_second
            scalars[f'{prefix}/mfu'] = metrics_lib.mfu(
                tokens_per_second, objective.flops_per_token, peak)
            clock['time'], clock['step'] = now, s
          summary['train'] = scalars
          writer.scalars(s, scalars)
          console.train_line(s, scalars, prefix, objective.line)

    def save(at_step, force=False):
      check(at_step)            # never checkpoint a step whose metrics are not finite
      if ckpt.save(at_step, state, objective.train_iter, force=force):
        logging.info('saving checkpoint %d', at_step)

    def roll_back(d: Diverged):
      """Reloads the newest finite checkpoint from before the update that made
      the parameters step `d.step` used (so at most d.step - 2; else the newest
      finite one before d.step): the step's loss is that of the parameters
      before it, which may be finite but already broken. The data iterator
      stays where it is, so the batches since that checkpoint are skipped."""
      nonlocal state, step, train_step, lr_scale
      target = ckpt.newest_finite(abstract_state, before=d.step - 1)
      if target is None:
        target = ckpt.newest_finite(abstract_state, before=d.step)
      if target is None:
        raise FloatingPointError(
            f'{d.reason}; stopping: no finite checkpoint before step {d.step} in '
            f'{ckpt.directory} to roll back to') from None
      ckpt.delete_after(target)
      skipped = (target + 1, step)
      state = ckpt.restore(target, abstract_state)
      lr_scale *= rollback_lr_scale
      if rollback_lr_scale != 1.0:
        train_step = make_step(*optim.make_optimizer(_scaled(t, lr_scale), cfg.model))
      record = {'at_step': d.step, 'reason': d.reason, 'restored': target,
                'skipped_batches': list(skipped), 'lr_scale': lr_scale}
      rollbacks.append(record)
      summary['rollbacks'].append(record)
      if jax.process_index() == 0:
        with open(os.path.join(workdir, ROLLBACKS_FILE), 'w') as f:
          json.dump(rollbacks, f, indent=1)
      console.print(
          f'rollback {len(rollbacks)}/{max_rollbacks}: {d.reason}; restored '
          f'checkpoint {target}, skipped batches {skipped[0]}..{skipped[1]} (the '
          f'data goes on past them), learning rate x{lr_scale:g}')
      for s in range(target + 1, step + 1):
        summary['losses'].pop(s, None)
      step = target
      clock['time'] = None

    def stop_message(d: Diverged) -> str:
      newest = ckpt.newest_finite(abstract_state, before=d.step + 1)
      where = (f'the newest finite checkpoint (parameters checked) is '
               f'{ckpt.directory}/{newest}' if newest is not None else
               f'no finite checkpoint was saved in {ckpt.directory}')
      hint = ('' if on_divergence == 'rollback' or newest is None else
              '; train.on_divergence=rollback would restore it and go on')
      if on_divergence == 'rollback':
        hint = f'; {len(rollbacks)} rollback(s) done, train.max_rollbacks={max_rollbacks}'
      return f'{d.reason}; stopping: {where}{hint}'

    with Preemption() as preemption:
      if objective.do_eval and step == 0:
        evaluate(0)
      while True:
        try:
          while step < t.steps:
            with jax.profiler.StepTraceAnnotation(prefix, step_num=step + 1):
              batch = objective.batch(next(objective.train_iter))
              state, device_metrics = train_step(state, batch, *frozen)
            step += 1
            if not config_written:
              # The first step compiled and ran: the run has started.
              started()
              workdir_lib.write_config(workdir, cfg)
              objective.first_step_done()
              config_written = True
            pending.append((step, device_metrics))
            console.step(step)
            # Check the previous step while this one runs.
            check(step - 1)
            if objective.do_eval and (step % t.eval_every_steps == 0 or step == t.steps):
              check(step)
              evaluate(step)
            if step % t.checkpoint_every_steps == 0 or step == t.steps:
              save(step, force=True)
            if preemption.reached(step):
              save(step, force=True)
              ckpt.wait()
              console.print(f'{preemption.signal}: saved checkpoint {step} in '
                            f'{ckpt.directory}; exiting')
              summary['status'] = ('interrupted' if preemption.signal == 'SIGINT'
                                   else 'preempted')
              break
          check(step)
          break
        except Diverged as d:
          if on_divergence == 'rollback' and len(rollbacks) < max_rollbacks:
            roll_back(d)
            continue
          raise FloatingPointError(stop_message(d)) from None
    summary['step'] = step
    if summary['status'] == 'done':
      ckpt.wait()
      console.print(f'done: step {step} of {t.steps} in {workdir} '
                    f'(tensorboard --logdir {workdir})')
    return summary
  finally:
    if ckpt is not None:
      ckpt.close()
    if writer is not None:
      writer.close()
    if console is not None:
      console.close()
    objective.close()
