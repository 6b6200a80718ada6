"""DPO as an objective of the one training loop: `train_and_evaluate(cfg, workdir)`.

The loop is `train.loop.run`, the same body as pretraining's (mesh, state,
lock, resume, finiteness checks, rollback and spikes, checkpoints,
SIGTERM/SIGINT, throughput, MFU, TensorBoard); this module plugs in the
`Preference` objective: the pairs of `align/data.py`, the losses of
`align/losses.py`, `dpo/` and `dpo_eval/` tags, and the frozen reference.

Reference model. `dpo.init_checkpoint` (a pretraining workdir, whose newest
checkpoint is used, or one `DIR/checkpoints/STEP` folder) is loaded once; its
parameters start the policy (a copy) and are the frozen reference. The
reference enters a step only as per-pair sequence log-probs, in one of two
ways:

- in the step (the default): the reference parameters, sharded like the
  policy, are the step's frozen input (`train.step.make_train_step`'s
  `frozen`), never part of the donated train state; the loss runs them
  without gradients on each gradient-accumulation microbatch, before the
  policy's forward and backward pass on it;
- precomputed (`dpo.precompute_reference`): before training, the reference
  scores every training pair, and the eval pairs, once in index order; the
  per-pair sums are saved to `DIR/reference_logps.npz` (a resume reads them
  instead of recomputing), the reference parameters are deleted from the
  devices, and each batch brings its pairs' values, looked up by
  `pair_index`. The steps then hold one model, not two.

`dpo.reference_free` uses log π_ref = 0 and holds no reference either, nor
do the reference-free losses (`simpo`, `orpo`).

Checkpoints go to the DPO workdir and hold exactly the state pretraining
saves (params, optimizer state, step, RNG, data-iterator position), so the
policy's parameter tree is the pretraining one and `train` code restores it
unchanged. The reference is not saved again: `DIR/reference.json` records the
checkpoint folder it came from, and a resumed run reloads that same folder.
"""

import json
import os

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


def sequence_logps(model, batch: dict, chunk_size: int | None = None):
  """`model`'s sequence log-probs of each pair's responses, ([B, 1], [B, 1])."""
  chosen, rejected = losses.both_token_logps(model, batch, chunk_size)   # [B, T]
  return jnp.sum(chosen, axis=-1)[:, None], jnp.sum(rejected, axis=-1)[:, None]


def _with_params(model, params):
  """`model` (a policy merged in the step) with other parameters: the reference."""
  graphdef, _, model_state = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, model_state)


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
      lambda ref, ms, batch: sequence_logps(nnx.merge(graphdef, ref, ms), batch,
                                            t.get('loss_chunk_size')),
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
      rows = sharding.global_batch({k: v[lo:lo + local] for k, v in batch.items()},
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
  return sharding.global_batch(batch, batch_sharding)


# ----------------------------------------------------------------------------
# The objective.


def make_loss_fn(cfg, mode: str):
  """The DPO `LossFn(model, batch, rng, frozen)` of the loop.

  `align.losses.make_loss_fn`, given the reference's sequence log-probs: run
  on `frozen['reference']` (the `step` mode; the loss runs on one microbatch
  at a time, so the reference's activations take a microbatch's memory), read
  from the batch (`precomputed`, `device_batch`) or zero (`free`).
  """
  chunk_size = cfg.train.get('loss_chunk_size')
  inner = losses.make_loss_fn(cfg.dpo, chunk_size)

  def loss_fn(model, batch, rng, frozen):
    if mode == 'step':
      with jax.named_scope('reference'):
        chosen, rejected = sequence_logps(_with_params(model, frozen['reference']),
                                          batch, chunk_size)
      batch = dict(batch, ref_logps_chosen=chosen, ref_logps_rejected=rejected)
    elif mode == 'free':
      zeros = jnp.zeros((batch['chosen_targets'].shape[0], 1), jnp.float32)
      batch = dict(batch, ref_logps_chosen=zeros, ref_logps_rejected=zeros)
    return inner(model, batch, rng)

  return loss_fn


def scalars(prefix: str, metrics: dict) -> dict[str, float]:
  """Host metrics under `dpo/...` or `dpo_eval/...` tags."""
  names = METRICS + (('learning_rate', 'grad_norm') if prefix == 'dpo' else ())
  return {f'{prefix}/{k}': float(metrics[k]) for k in names if k in metrics}


_LINE = (('loss', 'loss {:.4g}'), ('reward_accuracy', 'reward_accuracy {:.4g}'),
         ('reward_margin', 'reward_margin {:.4g}'), ('logps_chosen', 'logps_chosen {:.4g}'),
         ('ref_gap_chosen', 'ref_gap_chosen {:.4g}'))


class Preference(train_loop.Objective):
  """DPO and its family on preference pairs (`train.loop.Objective`)."""

  prefix, eval_prefix = 'dpo', 'dpo_eval'
  line = _LINE + (('grad_norm', 'grad_norm {:.4g}'), ('tokens_per_second', '{:,.0f} tok/s'),
                  ('mfu', 'mfu {:.1%}'))
  eval_line = _LINE

  def __init__(self, setup: train_loop.Setup):
    cfg, t = setup.cfg, setup.cfg.train
    data_lib.check_lengths(cfg.dpo)
    self.cfg, self.setup = cfg, setup
    self.mode = reference_mode(cfg.dpo)
    # The reference a resumed run used, recorded by its first step.
    self.record = os.path.join(setup.workdir, 'reference.json')
    self.init_workdir, self.step_dir = resolve_init_checkpoint(cfg.dpo.init_checkpoint)
    if os.path.exists(self.record):
      with open(self.record) as f:
        recorded = json.load(f)['checkpoint']
      if recorded != self.step_dir:
        logging.info('resuming against the recorded reference %s', recorded)
      self.step_dir = recorded
      self.init_workdir = os.path.dirname(os.path.dirname(recorded))
    self.process = (jax.process_index(), jax.process_count())
    self.train_iter = data_lib.make_iterator(cfg, 'train', *self.process)
    self.do_eval = t.eval_steps > 0 and bool(cfg.dpo.eval_files)
    self.loss_fn = make_loss_fn(cfg, self.mode)
    self.frozen, self.frozen_shardings = {}, {}
    self.table = None
    # Throughput counts every position of the chosen and rejected rows; a step
    # runs the policy forward and backward and, in the `step` mode, the
    # reference forward (a third of a training pass) on each.
    self.tokens_per_step = 2 * t.global_batch_size * cfg.dpo.max_len
    self.flops_per_token = model_lib.flops_per_token(cfg.model, cfg.dpo.max_len)
    if self.mode == 'step':
      self.flops_per_token *= 4 / 3

  def batch(self, host_batch):
    return device_batch(host_batch, self.setup.batch_sharding, self.table)

  def start(self, resumed):
    cfg, t, setup = self.cfg, self.cfg.train, self.setup
    if self.mode == 'precomputed':
      # The eval reads pairs 0, 1, ... (wrapping around) for eval_steps batches.
      counts = {'train': data_lib.num_pairs(cfg, 'train')}
      if self.do_eval:
        counts['eval'] = min(data_lib.num_pairs(cfg, 'eval'),
                             t.eval_steps * t.global_batch_size)
      table_key = _table_key(cfg, self.step_dir, counts)
      self.table = load_reference_table(setup.workdir, table_key)
    if resumed and not (self.mode == 'step' or self.table is None and
                        self.mode == 'precomputed'):
      return None
    model_fn = lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed))
    reference, model_state = load_reference(
        cfg, self.step_dir, self.init_workdir, setup.mesh,
        setup.state_shardings['params'], model_fn)
    logging.info('reference: %s', self.step_dir)
    if self.mode == 'precomputed' and self.table is None:
      logging.info('precomputing the reference log-probs of %s pairs',
                   ' + '.join(f'{n} {s}' for s, n in counts.items()))
      self.table = precompute_reference(cfg, setup.graphdef, reference, model_state,
                                        setup.mesh, counts)
      if jax.process_index() == 0:
        path = os.path.join(setup.workdir, REFERENCE_FILE)
        with open(path + '.tmp', 'wb') as f:
          np.savez(f, key=np.array(table_key), **self.table)
        os.replace(path + '.tmp', path)
    if self.mode == 'step':
      self.frozen = {'reference': reference}
      self.frozen_shardings = {'reference': setup.state_shardings['params']}
    if resumed:
      if self.mode != 'step':           # only the policy stays on the devices
        for x in jax.tree.leaves(reference):
          x.delete()
      return None
    # The policy starts as the reference (the loop deletes what `frozen`
    # does not hold once the state is made).
    return train_loop.Start(reference, model_state, self.step_dir)

  def first_step_done(self):
    if jax.process_index() == 0:
      with open(self.record, 'w') as f:
        json.dump({'checkpoint': self.step_dir}, f)

  def scalars(self, host, step):
    del step
    return scalars(self.prefix, host)

  def evaluate(self, state, eval_step):
    batches = (device_batch(b, self.setup.batch_sharding, self.table, 'eval')
               for b in data_lib.make_iterator(self.cfg, 'eval', *self.process))
    return scalars(self.eval_prefix, step_lib.eval_metrics(eval_step, state, batches))


def train_and_evaluate(cfg, workdir: str) -> dict:
  """DPO-trains `cfg` in `workdir` (resuming if it holds checkpoints).

  Returns the summary of `train.loop.train_and_evaluate` (`step`, `status`,
  `losses`, `train` and `eval` under their `dpo/` and `dpo_eval/` tags,
  `rollbacks`). Holds the workdir lock as stage `align`.
  """
  return train_loop.run(cfg, workdir, Preference, 'align')
