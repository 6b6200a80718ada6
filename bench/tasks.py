"""Evaluation-task scoring speed: examples/s, and its MFU against the training step's.

    python bench/tasks.py --config configs/llama.py:small
    python bench/tasks.py --config configs/llama.py:tiny --task next_line --examples 256

Scores `--examples` examples of a built-in task (`next_line`: 4 rows each)
with a randomly initialised model, the way the loop and `train.evaluate
--tasks` do (`train.tasks.make_taskset`: fixed-shape jitted calls of
`train.global_batch_size` rows over the mesh), after one untimed pass that
compiles. It then times `--train_steps` training steps of the same config on
a random batch. The table shows examples/s, the scoring's MFU (forward FLOPs
= 1/3 of `model.flops_per_token`, over the rows' tokens padding included),
the training step's MFU, and the issue's budget: the time 2x the forward FLOPs
of the rows would take at the training step's MFU, which the scoring time
should not exceed (`scoring / budget` <= 1), and the time 1,000 examples
would take at the measured rate. `next_line`'s rows include its calibration
rows (each distinct candidate after the neutral prompt).
"""

import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/llama.py:small',
                                          'Config file, e.g. configs/llama.py:small.')
_TASK = flags.DEFINE_string('task', 'next_line', 'A built-in task (eval.tasks syntax).')
_EXAMPLES = flags.DEFINE_integer('examples', 64, 'Examples to score.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 3, 'Timed training steps (after one).')


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import metrics  # pylint: disable=g-import-not-at-top
  from train import optim  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  from train import step as step_lib  # pylint: disable=g-import-not-at-top
  from train import tasks  # pylint: disable=g-import-not-at-top

  cfg = _CONFIG.value
  t = cfg.train
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, schedule = optim.make_optimizer(t, cfg.model)
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, t.seed)
  peak = metrics.peak_flops(mesh.devices.flat)
  taskset = tasks.make_taskset(cfg, _TASK.value, _EXAMPLES.value, graphdef, shardings, mesh)
  rows = taskset.rows[0]['inputs']
  taskset(state)                        # compiles
  start = time.perf_counter()
  result = taskset(state)
  seconds = time.perf_counter() - start
  name = taskset.tasks[0].name
  tokens = rows.size + (-len(rows) % taskset.scorer.rows_per_call) * rows.shape[1]
  forward = model.flops_per_token(cfg.model, rows.shape[1]) / 3 * tokens
  score_mfu = forward / seconds / peak

  train_step = step_lib.make_train_step(
      step_lib.lm_loss(t), optimizer, graphdef=graphdef, state_shardings=shardings,
      mesh=mesh, schedule=schedule)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256, (t.global_batch_size, t.seq_len + 1), dtype=np.int32)
  batch = jax.device_put({
      'inputs': ids[:, :-1], 'targets': ids[:, 1:],
      'positions': np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), ids[:, 1:].shape),
      'segment_ids': np.ones_like(ids[:, 1:]),
      'loss_mask': np.ones(ids[:, 1:].shape, np.float32)}, sharding.batch_sharding(mesh))
  state, m = train_step(state, batch)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(_TRAIN_STEPS.value):
    state, m = train_step(state, batch)
  jax.block_until_ready(m)
  step_seconds = (time.perf_counter() - start) / _TRAIN_STEPS.value
  train_mfu = model.flops_per_token(cfg.model, t.seq_len) * t.global_batch_size * (
      t.seq_len) / step_seconds / peak
  budget = 2 * forward / (train_mfu * peak)

  examples = len(taskset.tasks[0].examples)
  print(f'{name}: {examples} examples, {len(rows)} rows of {rows.shape[1]} tokens, '
        f'{taskset.scorer.rows_per_call} rows per call on {mesh.size} devices')
  print('| examples/s | scoring s | scoring MFU | train step MFU '
        '| budget s (2x fwd at train MFU) | scoring / budget | s per 1,000 examples |')
  print('| ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  print(f'| {examples / seconds:,.1f} | {seconds:.2f} | {score_mfu:.1%} | {train_mfu:.1%} '
        f'| {budget:.2f} | {seconds / budget:.2f} | {1000 * seconds / examples:,.0f} |')
  print(f'scores (random init): {result[name]}')


if __name__ == '__main__':
  app.run(main)
