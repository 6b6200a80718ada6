"""The DPO loop: `train_and_evaluate(cfg, workdir)`.

Reads top to bottom in the sections of `train/loop.py` (mesh, workdir, data,
reference and state, steps, checkpoint, metrics, loop) and reuses its parts:
the mesh and sharding rules, the optimizer and schedule, the jitted step of
`train/step.py` (with the DPO loss of `align/losses.py` instead of the LM
loss), the orbax `Checkpointer`, the TensorBoard writer and the console.

Reference model. `dpo.init_checkpoint` (a pretraining workdir, whose newest
checkpoint is used, or one `DIR/checkpoints/STEP` folder) is loaded once; its
parameters are the frozen reference, sharded like the policy, and a copy of
them starts the policy. The reference is an argument of the jitted step, never
part of the donated train state: its per-token log-probs are computed in the
same jitted step as the policy's gradient, and nothing differentiates or
updates them. Eval always scores against this frozen reference.
`dpo.reference_free` skips it (log π_ref = 0).

Checkpoints go to the DPO workdir and hold exactly the state pretraining
saves (params, optimizer state, step, RNG, data-iterator position), so the
policy's parameter tree is the pretraining one and `train` code restores it
unchanged. The reference is not saved again: `DIR/reference.json` records the
checkpoint folder it came from, and a resumed run reloads that same folder.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import model as model_lib
from align import data as data_lib
from align import losses
from train import checkpoint as checkpoint_lib
from train import loop as train_loop
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optim
from train import sharding
from train import step as step_lib

METRICS = ('loss', 'rewards_chosen', 'rewards_rejected', 'reward_accuracy',
           'reward_margin', 'logps_chosen', 'logps_rejected', 'ref_gap_chosen')


# ----------------------------------------------------------------------------
# The initial checkpoint.


def resolve_init_checkpoint(path: str) -> tuple[str, str]:
  """(pretraining workdir, checkpoint step folder) of `dpo.init_checkpoint`."""
  return checkpoint_lib.resolve_init_checkpoint(path, 'dpo.init_checkpoint')


def load_reference(cfg, step_dir: str, init_workdir: str, mesh, param_shardings,
                   model_fn):
  """(params, model_state) of the init checkpoint, sharded like the policy.

  The init run's `config.json` must describe the same model; only its
  parameters (and model state) are read (`checkpoint.load_init_params`).
  """
  _, _, abstract, _ = step_lib.train_state_spec(model_fn, optax.identity(), mesh,
                                                cfg.train.seed)
  abstract['params'] = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract['params'], param_shardings)
  return checkpoint_lib.load_init_params(cfg, step_dir, init_workdir, abstract,
                                         field='dpo.init_checkpoint')


# ----------------------------------------------------------------------------
# Steps.


def make_steps(cfg, mesh, graphdef, state_shardings, optimizer, schedule):
  """(train_step(state, reference, batch), eval_step(state, reference, batch)).

  Both are jitted with explicit shardings; the train step donates only the
  state. They wrap the trainer's steps, adding the reference's per-token
  log-probs to the batch first (without gradients).
  """
  loss_fn = losses.make_loss_fn(cfg.dpo)
  inner_train = step_lib.make_train_step(
      loss_fn, optimizer, graphdef=graphdef, state_shardings=state_shardings,
      mesh=mesh, grad_accum_steps=cfg.train.grad_accum_steps, schedule=schedule,
      donate=False)
  inner_eval = step_lib.make_eval_step(
      loss_fn, graphdef=graphdef, state_shardings=state_shardings, mesh=mesh)
  reference_free = bool(cfg.dpo.reference_free)

  def with_reference(reference, model_state, batch):
    if reference_free:
      zeros = jnp.zeros(batch['chosen_targets'].shape, jnp.float32)
      return dict(batch, ref_logps_chosen=zeros, ref_logps_rejected=zeros)
    with jax.named_scope('reference'):
      ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(reference), model_state)
      chosen, rejected = losses.both_token_logps(ref_model, batch)
    return dict(batch, ref_logps_chosen=chosen, ref_logps_rejected=rejected)

  def train_step(state, reference, batch):
    return inner_train(state, with_reference(reference, state['model_state'], batch))

  def eval_step(state, reference, batch):
    return inner_eval(state, with_reference(reference, state['model_state'], batch))

  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = (state_shardings, state_shardings['params'], sharding.batch_sharding(mesh))
  return (jax.jit(train_step, in_shardings=shardings,
                  out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
          jax.jit(eval_step, in_shardings=shardings, out_shardings=replicated))


def scalars(prefix: str, metrics: dict) -> dict[str, float]:
  """Host metrics under `dpo/...` or `dpo_eval/...` tags."""
  names = METRICS + (('learning_rate', 'grad_norm') if prefix == 'dpo' else ())
  return {f'{prefix}/{k}': float(metrics[k]) for k in names if k in metrics}


def _line(step: int, total: int, values: dict[str, float]) -> str:
  short = {k.split('/', 1)[1]: v for k, v in values.items()}
  parts = [f'step {step}/{total}'] + [
      f'{k} {short[k]:.4g}' for k in ('loss', 'reward_accuracy', 'reward_margin',
                                      'logps_chosen', 'ref_gap_chosen', 'grad_norm')
      if k in short]
  return ' | '.join(parts)


# ----------------------------------------------------------------------------
# The loop.


def train_and_evaluate(cfg, workdir: str) -> dict:
  """DPO-trains `cfg` in `workdir` (resuming if it holds checkpoints).

  Returns a summary: `step`, `status` (`done` or `preempted`), `losses`
  ({step: loss} of this invocation), `train` and `eval` (the last scalars,
  under their TensorBoard tags).
  """
  t = cfg.train
  data_lib.check_lengths(cfg.dpo)
  # ---------------------------------------------------------------- Mesh.
  mesh = mesh_lib.make_mesh(cfg.mesh)
  sharding.check_batch(mesh, t.global_batch_size, t.grad_accum_steps)
  batch_sharding = sharding.batch_sharding(mesh)

  # ------------------------------------------------------------- Workdir.
  checkpoint_lib.check_config(workdir, cfg)
  reference_record = os.path.join(workdir, 'reference.json')
  init_workdir, step_dir = resolve_init_checkpoint(cfg.dpo.init_checkpoint)
  if os.path.exists(reference_record):
    with open(reference_record) as f:
      recorded = json.load(f)['checkpoint']
    if recorded != step_dir:
      logging.info('resuming against the recorded reference %s', recorded)
    step_dir = recorded
    init_workdir = os.path.dirname(os.path.dirname(step_dir))
  checkpoint_lib.write_config(workdir, cfg)
  if jax.process_index() == 0:
    with open(reference_record, 'w') as f:
      json.dump({'checkpoint': step_dir}, f)

  # ---------------------------------------------------------------- Data.
  process = (jax.process_index(), jax.process_count())
  train_iter = data_lib.make_iterator(cfg, 'train', *process)
  do_eval = t.eval_steps > 0 and bool(cfg.dpo.eval_files)

  def eval_batches():
    for batch in data_lib.make_iterator(cfg, 'eval', *process):
      yield train_loop.global_batch(batch, batch_sharding)

  # ---------------------------------------------------- Reference, state.
  model_fn = lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed))
  optimizer, schedule = optim.make_optimizer(t)
  graphdef, _, abstract_state, state_shardings = step_lib.train_state_spec(
      model_fn, optimizer, mesh, t.seed)
  reference, ref_model_state = load_reference(
      cfg, step_dir, init_workdir, mesh, state_shardings['params'], model_fn)
  logging.info('reference: %s', step_dir)

  def from_reference(params, model_state):
    # A copy: the state is donated to the step and the reference must survive.
    params = jax.tree.map(jnp.copy, params)
    return {
        'step': jnp.zeros((), jnp.int32),
        'params': params,
        'opt_state': optimizer.init(jax.tree.map(lambda x: x.astype(jnp.float32), params)),
        'rng': jax.random.fold_in(jax.random.PRNGKey(t.seed), 1),
        'model_state': model_state,
    }

  # --------------------------------------------------------------- Steps.
  train_step, eval_step = make_steps(cfg, mesh, graphdef, state_shardings,
                                     optimizer, schedule)

  # ---------------------------------------------------------- Checkpoint.
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=t.checkpoint_every_steps,
                                     keep=t.keep_checkpoints)
  state, step = ckpt.restore_latest(abstract_state, train_iter)
  if state is None:
    state = jax.jit(from_reference, out_shardings=state_shardings)(
        reference, ref_model_state)
    step = 0
  else:
    logging.info('resumed from %s/%d', ckpt.directory, step)

  # ------------------------------------------------------------- Metrics.
  writer = metrics_lib.SummaryWriter(workdir)
  console = metrics_lib.Console(t.steps, step)
  if step == 0:
    writer.text(0, 'config', '```\n' + checkpoint_lib.config_json(cfg) + '\n```')
  summary = {'step': step, 'status': 'done', 'losses': {}, 'train': {}, 'eval': {}}

  def evaluate(at_step):
    means = step_lib.eval_metrics(functools.partial(_with_ref, eval_step, reference),
                                  state, eval_batches())
    summary['eval'] = scalars('dpo_eval', means)
    writer.scalars(at_step, summary['eval'])
    console.print(f'eval @ {_line(at_step, t.steps, summary["eval"])}')

  # ---------------------------------------------------------------- Loop.
  try:
    with train_loop._Preemption() as preemption:  # pylint: disable=protected-access
      if do_eval and step == 0:
        evaluate(0)
      while step < t.steps:
        batch = train_loop.global_batch(next(train_iter), batch_sharding)
        state, device_metrics = train_step(state, reference, batch)
        step += 1
        console.step(step)
        host = jax.device_get(device_metrics)
        if not np.isfinite(host['loss']):
          raise FloatingPointError(
              f'the DPO loss is {float(host["loss"])} at step {step}; stopping. '
              f'The last good checkpoint is {ckpt.directory}/'
              f'{max(ckpt.steps, default="(none)")}')
        summary['losses'][step] = float(host['loss'])
        if step % t.log_every_steps == 0 or step == t.steps:
          summary['train'] = scalars('dpo', host)
          writer.scalars(step, summary['train'])
          console.print(_line(step, t.steps, summary['train']))
        if do_eval and (step % t.eval_every_steps == 0 or step == t.steps):
          evaluate(step)
        if step % t.checkpoint_every_steps == 0 or step == t.steps:
          ckpt.save(step, state, train_iter, force=True)
        if preemption.reached(step):
          ckpt.save(step, state, train_iter, force=True)
          ckpt.wait()
          console.print(f'SIGTERM: saved checkpoint {step} in {ckpt.directory}; exiting')
          summary['status'] = 'preempted'
          break
  finally:
    summary['step'] = step
    ckpt.close()
    writer.close()
    console.close()
  return summary


def _with_ref(eval_step, reference, state, batch):
  return eval_step(state, reference, batch)
