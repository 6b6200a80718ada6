"""The DPO loop: `train_and_evaluate(cfg, workdir)`.

Reads top to bottom in the sections of `train/loop.py` (mesh, workdir, data,
state, reference, steps, metrics, loop) and reuses its parts: the mesh and
sharding rules, the optimizer and schedule, the jitted step of
`train/step.py` (with the DPO loss of `align/losses.py` instead of the LM
loss), the orbax `Checkpointer`, the TensorBoard writer and the console.

Reference model. `dpo.init_checkpoint` (a pretraining workdir, whose newest
checkpoint is used, or one `DIR/checkpoints/STEP` folder) is loaded once; its
parameters start the policy (a copy) and are the frozen reference. The
reference enters a step only as per-pair sequence log-probs, in one of two
ways:

- in the step (the default): the reference parameters, sharded like the
  policy, are an argument of the jitted step, never part of the donated train
  state; the step runs them without gradients, one gradient-accumulation
  microbatch at a time, before the policy's forward and backward pass;
- precomputed (`dpo.precompute_reference`): before training, the reference
  scores every training pair, and the eval pairs, once in index order; the
  per-pair sums are saved to `DIR/reference_logps.npz` (a resume reads them
  instead of recomputing), the reference parameters are deleted from the
  devices, and each batch brings its pairs' values, looked up by
  `pair_index`. The steps then hold one model, not two.

`dpo.reference_free` uses log π_ref = 0 and holds no reference either.

Checkpoints go to the DPO workdir and hold exactly the state pretraining
saves (params, optimizer state, step, RNG, data-iterator position), so the
policy's parameter tree is the pretraining one and `train` code restores it
unchanged. The reference is not saved again: `DIR/reference.json` records the
checkpoint folder it came from, and a resumed run reloads that same folder.
The loss, gradient norm and updated parameters of every step are checked
before anything else happens at that step: a NaN or inf stops the run naming
the step and the newest finite checkpoint, with no checkpoint written for it.
Like `train`, a run holds the workdir lock, saves and exits 130 on Ctrl-C, and
writes config.json once its first step ran (`train.loop.run_locked`).
"""

import contextlib
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
REFERENCE_FILE = 'reference_logps.npz'


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
  from train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  _, abstract, _ = workdir_lib.abstract_model_state(model_fn, mesh)
  abstract['params'] = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract['params'], param_shardings)
  return checkpoint_lib.load_init_params(cfg, step_dir, init_workdir, abstract,
                                         field='dpo.init_checkpoint')


def reference_mode(dpo_cfg) -> str:
  """`free` (log π_ref = 0), `precomputed`, or `step` (a forward pass per step).

  `free` also for the reference-free losses (`simpo`, `orpo`): no reference is
  loaded beyond starting the policy.
  """
  if dpo_cfg.reference_free or dpo_cfg.loss in losses.REFERENCE_FREE_LOSSES:
    return 'free'
  return 'precomputed' if dpo_cfg.get('precompute_reference', False) else 'step'


# ----------------------------------------------------------------------------
# Reference log-probs.


def reference_sums(graphdef, reference, model_state, batch, *, accum: int = 1,
                   mesh=None, chunk_size: int | None = None):
  """The reference's sequence log-probs of each pair, ([B, 1], [B, 1]).

  With `accum` > 1 the forward runs one microbatch at a time, over the rows
  `train.step` puts in each microbatch (i, i + accum, ...), so it needs the
  activation memory of a microbatch, like the policy's pass.
  """
  sides = {k: v for k, v in batch.items() if k.startswith(('chosen_', 'rejected_'))}

  def one(rows):
    model = nnx.merge(graphdef, jax.lax.stop_gradient(reference), model_state)
    chosen, rejected = losses.both_token_logps(model, rows, chunk_size)   # [b, t]
    return jnp.sum(chosen, axis=-1), jnp.sum(rejected, axis=-1)       # [b]

  if accum == 1:
    chosen, rejected = one(sides)
  else:
    rows = sharding.batch_sharding(mesh).spec[0]

    def split(x):                                   # [B, t] -> [accum, B / accum, t]
      x = jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, PartitionSpec(None, rows)))

    chosen, rejected = jax.lax.map(one, jax.tree.map(split, sides))   # [accum, B / accum]
    chosen, rejected = (jnp.swapaxes(x, 0, 1).reshape(-1) for x in (chosen, rejected))
  return chosen[:, None], rejected[:, None]


def _table_key(cfg, step_dir: str, counts: dict) -> str:
  """What the precomputed values depend on; another key means recompute."""
  d = cfg.dpo
  return json.dumps({
      'reference': step_dir, 'model': cfg.model.to_dict(),
      'tokenizer': cfg.data.tokenizer, 'train_files': d.train_files,
      'eval_files': d.eval_files, 'max_len': d.max_len,
      'max_prompt_len': d.max_prompt_len,
      'skip_bad_lines': d.get('skip_bad_lines', False), 'pairs': counts,
  }, sort_keys=True, default=str)


def load_reference_table(workdir: str, key: str) -> dict | None:
  """The saved per-pair reference log-probs if they were made for `key`."""
  path = os.path.join(workdir, REFERENCE_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    if str(saved['key']) != key:
      logging.info('%s was made for other data or another reference; recomputing',
                   path)
      return None
    return {k: saved[k] for k in saved.files if k != 'key'}


def precompute_reference(cfg, graphdef, reference, model_state, mesh,
                         counts: dict[str, int]) -> dict[str, np.ndarray]:
  """Scores pairs 0 .. counts[split] - 1 of each split with the reference.

  Returns {'train_chosen', 'train_rejected', 'eval_chosen', ...}: float32
  sequence log-probs indexed by `pair_index`. Batches are microbatch-sized
  (`global_batch_size / grad_accum_steps` rows) when that splits over the
  devices; every process gets the whole table.
  """
  t = cfg.train
  batch_size = t.global_batch_size // t.grad_accum_steps
  if batch_size % sharding.num_batch_shards(mesh):
    batch_size = t.global_batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  score = jax.jit(
      lambda ref, ms, batch: reference_sums(graphdef, ref, ms, batch,
                                            chunk_size=t.get('loss_chunk_size')),
      in_shardings=(jax.tree.map(lambda x: x.sharding, reference), None, batch_sharding),
      out_shardings=(replicated, replicated))
  local = batch_size // jax.process_count()
  lo = jax.process_index() * local
  table = {}
  for split, count in counts.items():
    chosen = np.full(count, np.nan, np.float32)
    rejected = np.full(count, np.nan, np.float32)
    for batch in data_lib.ordered_batches(cfg, split, batch_size, count):
      index = batch.pop('pair_index')
      rows = train_loop.global_batch({k: v[lo:lo + local] for k, v in batch.items()},
                                     batch_sharding)
      c, r = score(reference, model_state, rows)
      keep = index >= 0
      chosen[index[keep]] = np.asarray(c.addressable_data(0))[keep, 0]
      rejected[index[keep]] = np.asarray(r.addressable_data(0))[keep, 0]
    table[f'{split}_chosen'], table[f'{split}_rejected'] = chosen, rejected
  return table


def device_batch(batch: dict, batch_sharding, table: dict | None = None,
                 split: str = 'train') -> dict:
  """A host batch of `align.data` -> global device arrays for the steps.

  Drops `pair_index`; with a precomputed `table`, adds the pairs' reference
  log-probs `ref_logps_chosen` / `ref_logps_rejected` [B, 1] looked up by it.
  """
  batch = dict(batch)
  index = batch.pop('pair_index')
  if table is not None:
    batch['ref_logps_chosen'] = table[f'{split}_chosen'][index][:, None]
    batch['ref_logps_rejected'] = table[f'{split}_rejected'][index][:, None]
  return train_loop.global_batch(batch, batch_sharding)


# ----------------------------------------------------------------------------
# Steps.


def make_steps(cfg, mesh, graphdef, state_shardings, optimizer, schedule):
  """(train_step(state, reference, batch), eval_step(state, reference, batch)).

  Both are jitted with explicit shardings; the train step donates only the
  state. They wrap the trainer's steps, adding the reference's sequence
  log-probs to the batch first (without gradients). `reference` is the
  reference parameters in the `step` mode and `{}` otherwise, when the batch
  brings precomputed values (`device_batch`) or there is no reference.
  """
  chunk_size = cfg.train.get('loss_chunk_size')
  loss_fn = losses.make_loss_fn(cfg.dpo, chunk_size)
  accum = int(cfg.train.grad_accum_steps)
  inner_train = step_lib.make_train_step(
      loss_fn, optimizer, graphdef=graphdef, state_shardings=state_shardings,
      mesh=mesh, grad_accum_steps=accum, schedule=schedule, donate=False)
  inner_eval = step_lib.make_eval_step(
      loss_fn, graphdef=graphdef, state_shardings=state_shardings, mesh=mesh)
  mode = reference_mode(cfg.dpo)

  def with_reference(reference, model_state, batch, accum):
    if mode == 'precomputed':
      return batch
    if mode == 'free':
      zeros = jnp.zeros((batch['chosen_targets'].shape[0], 1), jnp.float32)
      return dict(batch, ref_logps_chosen=zeros, ref_logps_rejected=zeros)
    with jax.named_scope('reference'):
      chosen, rejected = reference_sums(graphdef, reference, model_state, batch,
                                        accum=accum, mesh=mesh, chunk_size=chunk_size)
    return dict(batch, ref_logps_chosen=chosen, ref_logps_rejected=rejected)

  def train_step(state, reference, batch):
    return inner_train(state, with_reference(reference, state['model_state'], batch,
                                             accum))

  def eval_step(state, reference, batch):
    return inner_eval(state, with_reference(reference, state['model_state'], batch, 1))

  replicated = NamedSharding(mesh, PartitionSpec())
  reference_shardings = state_shardings['params'] if mode == 'step' else {}
  shardings = (state_shardings, reference_shardings, sharding.batch_sharding(mesh))
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
  if 'tokens_per_second' in short:
    parts.append(f'{short["tokens_per_second"]:,.0f} tok/s | '
                 f'mfu {100 * short["mfu"]:.1f}%')
  return ' | '.join(parts)


# ----------------------------------------------------------------------------
# The loop.


def train_and_evaluate(cfg, workdir: str) -> dict:
  """DPO-trains `cfg` in `workdir` (resuming if it holds checkpoints).

  Returns a summary: `step`, `status` (`done`, `preempted` by SIGTERM,
  `interrupted` by SIGINT, or `nothing_to_do`), `losses` ({step: loss} of
  this invocation), `train` and `eval` (the last scalars, under their
  TensorBoard tags). Holds the workdir lock of `train.loop.run_locked`.
  """
  def body(started):
    with contextlib.ExitStack() as closing:   # the checkpointer, on every path
      return _train(cfg, workdir, started, closing)

  return train_loop.run_locked(workdir, 'align', body)


def _train(cfg, workdir: str, started, closing) -> dict:
  t = cfg.train
  data_lib.check_lengths(cfg.dpo)
  mode = reference_mode(cfg.dpo)
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

  def write_records():
    # Once the first step ran, like train/loop.py.
    started()
    checkpoint_lib.write_config(workdir, cfg)
    if jax.process_index() == 0:
      with open(reference_record, 'w') as f:
        json.dump({'checkpoint': step_dir}, f)

  # ---------------------------------------------------------------- Data.
  process = (jax.process_index(), jax.process_count())
  train_iter = data_lib.make_iterator(cfg, 'train', *process)
  do_eval = t.eval_steps > 0 and bool(cfg.dpo.eval_files)

  # --------------------------------------------------------------- State.
  model_fn = lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed))
  optimizer, schedule = optim.make_optimizer(t, cfg.model)
  graphdef, _, abstract_state, state_shardings = step_lib.train_state_spec(
      model_fn, optimizer, mesh, t.seed)
  ckpt = closing.enter_context(checkpoint_lib.Checkpointer(
      workdir, every_steps=t.checkpoint_every_steps, keep=t.keep_checkpoints))
  state, step = ckpt.restore_latest(abstract_state, train_iter)
  if state is not None:
    logging.info('resumed from %s/%d', ckpt.directory, step)
  if state is not None and step >= t.steps:
    started()
    print(f'nothing to do: {workdir} is already at step {step} and '
          f'train.steps={t.steps}; set --config.train.steps higher to train on')
    return {'step': step, 'status': 'nothing_to_do', 'losses': {}, 'train': {},
            'eval': {}}

  # ----------------------------------------------------------- Reference.
  table = None
  if mode == 'precomputed':
    # The eval reads pairs 0, 1, ... (wrapping around) for eval_steps batches.
    counts = {'train': data_lib.num_pairs(cfg, 'train')}
    if do_eval:
      counts['eval'] = min(data_lib.num_pairs(cfg, 'eval'),
                           t.eval_steps * t.global_batch_size)
    table_key = _table_key(cfg, step_dir, counts)
    table = load_reference_table(workdir, table_key)
  reference = {}
  if state is None or mode == 'step' or (mode == 'precomputed' and table is None):
    reference, ref_model_state = load_reference(
        cfg, step_dir, init_workdir, mesh, state_shardings['params'], model_fn)
    logging.info('reference: %s', step_dir)
  if mode == 'precomputed' and table is None:
    logging.info('precomputing the reference log-probs of %s pairs',
                 ' + '.join(f'{n} {s}' for s, n in counts.items()))
    table = precompute_reference(cfg, graphdef, reference, ref_model_state, mesh, counts)
    if jax.process_index() == 0:
      path = os.path.join(workdir, REFERENCE_FILE)
      with open(path + '.tmp', 'wb') as f:
        np.savez(f, key=np.array(table_key), **table)
      os.replace(path + '.tmp', path)

  if state is None:
    def from_reference(params, model_state):
      # A copy: the state is donated to the step and the reference must survive.
      params = jax.tree.map(jnp.copy, params)
      return {
          'step': jnp.zeros((), jnp.int32),
          'params': params,
          'opt_state': optimizer.init(jax.tree.map(lambda x: x.astype(jnp.float32),
                                                   params)),
          'rng': jax.random.fold_in(jax.random.PRNGKey(t.seed), 1),
          'model_state': model_state,
      }
    state = jax.jit(from_reference, out_shardings=state_shardings)(
        reference, ref_model_state)
    step = 0
  if mode != 'step' and reference:
    # Only the policy stays on the devices.
    for x in jax.tree.leaves(reference):
      x.delete()
    reference = {}

  # --------------------------------------------------------------- Steps.
  train_step, eval_step = make_steps(cfg, mesh, graphdef, state_shardings,
                                     optimizer, schedule)

  # ------------------------------------------------------------- Metrics.
  writer = metrics_lib.SummaryWriter(workdir)
  console = metrics_lib.Console(t.steps, step)
  # Throughput counts every position of the chosen and rejected rows; a step
  # runs the policy forward and backward and, in the `step` mode, the
  # reference forward (a third of a training pass) on each.
  tokens_per_step = 2 * t.global_batch_size * cfg.dpo.max_len
  flops_per_token = model_lib.flops_per_token(cfg.model, cfg.dpo.max_len)
  if mode == 'step':
    flops_per_token *= 4 / 3
  peak = metrics_lib.peak_flops(mesh.devices.flat)
  clock = {'time': None, 'step': step}
  if step == 0:
    writer.text(0, 'config', '```\n' + checkpoint_lib.config_json(cfg) + '\n```')
  summary = {'step': step, 'status': 'done', 'losses': {}, 'train': {}, 'eval': {}}
  records_written = False

  def evaluate(at_step):
    batches = (device_batch(b, batch_sharding, table, 'eval')
               for b in data_lib.make_iterator(cfg, 'eval', *process))
    means = step_lib.eval_metrics(lambda s, b: eval_step(s, reference, b), state, batches)
    summary['eval'] = scalars('dpo_eval', means)
    writer.scalars(at_step, summary['eval'])
    console.print(f'eval @ {_line(at_step, t.steps, summary["eval"])}')

  # ---------------------------------------------------------------- Loop.
  try:
    with train_loop.Preemption() as preemption:
      if do_eval and step == 0:
        evaluate(0)
      while step < t.steps:
        batch = device_batch(next(train_iter), batch_sharding, table)
        state, device_metrics = train_step(state, reference, batch)
        step += 1
        if not records_written:
          write_records()
          records_written = True
        console.step(step)
        # Checked at once (the host waits for this step), so the error names
        # the step that produced it and nothing is saved after it.
        host = jax.device_get(device_metrics)
        bad = [k for k in ('loss', 'grad_norm') if not np.isfinite(host[k])]
        if float(host.get('params_finite', 1.0)) != 1.0:
          bad.append('parameters')
        if bad:
          newest = ckpt.newest_finite(abstract_state)
          raise FloatingPointError(
              f'non-finite {", ".join(bad)} (DPO loss {float(host["loss"])}) at '
              f'step {step}; stopping: ' + (
                  f'the newest finite checkpoint (parameters checked) is '
                  f'{ckpt.directory}/{newest}' if newest is not None else
                  f'no finite checkpoint was saved in {ckpt.directory}'))
        summary['losses'][step] = float(host['loss'])
        if clock['time'] is None:
          # This process's first step includes compilation: time from its end.
          clock['time'], clock['step'] = time.perf_counter(), step
        if step % t.log_every_steps == 0 or step == t.steps:
          summary['train'] = scalars('dpo', host)
          now = time.perf_counter()
          if step > clock['step']:
            tokens_per_second = tokens_per_step * (step - clock['step']) / (now - clock['time'])
            summary['train']['dpo/tokens_per_second'] = tokens_per_second
            summary['train']['dpo/mfu'] = metrics_lib.mfu(tokens_per_second,
                                                          flops_per_token, peak)
            clock['time'], clock['step'] = now, step
          writer.scalars(step, summary['train'])
          console.print(_line(step, t.steps, summary['train']))
        if do_eval and (step % t.eval_every_steps == 0 or step == t.steps):
          evaluate(step)
        if step % t.checkpoint_every_steps == 0 or step == t.steps:
          ckpt.save(step, state, train_iter, force=True)
        if preemption.reached(step):
          ckpt.save(step, state, train_iter, force=True)
          ckpt.wait()
          console.print(f'{preemption.signal}: saved checkpoint {step} in '
                        f'{ckpt.directory}; exiting')
          summary['status'] = ('interrupted' if preemption.signal == 'SIGINT'
                               else 'preempted')
          break
  finally:
    summary['step'] = step
    ckpt.close()
    writer.close()
    console.close()
  return summary
