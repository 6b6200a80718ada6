"""Training throughput of a config: tokens/s, MFU, peak memory, loop overhead.

    python bench/train_throughput.py --config configs/llama.py:tiny
    python bench/train_throughput.py --config configs/llama.py:small --steps 30
    python bench/train_throughput.py --config configs/mixtral.py:tiny --config.mesh.expert=-1
    python bench/train_throughput.py --config configs/llama.py:small --config.train.optimizer=muon

Runs the same model two ways and prints a table:

- the loop: `train.loop.train_and_evaluate` on the config's real data
  (`data.source`), with eval off and one checkpoint at the end, timed by the
  loop's own `train/tokens_per_second` (read back from its event file);
- a bare step: `jax.jit` of value_and_grad + AdamW on the `nnx.split` state,
  written here without anything from `train/`, on one fixed batch already on
  the devices, donated state, the loop's mesh and shardings.

Both are timed over windows of `--window` steps after `--warmup` steps
(compilation excluded); the bare step is timed before and after the loop, so
both see the same machine. The table shows each one's fastest window: on a
machine shared with other jobs that is the least disturbed one, and the
figure closest to the hardware's. The loop's overhead (data loading, host
transfers, NaN checks, metrics) is the gap between the two; the target is
under 5%. MFU uses `model.flops_per_token` and the peak of
`train/metrics.py` (on CPU, a measured matmul rate).

The optimizer rows: the size of `train.optimizer`'s state (float32, from
`jax.eval_shape` of its init) and, for any optimizer but AdamW, the loop
timed a second time with `train.optimizer=adamw`, so the table shows the
optimizer's step-time overhead (Muon's Newton-Schulz iterations, for
instance) over AdamW's on the same model and machine. The bare step is
always AdamW.
"""

import os
import resource
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/llama.py:tiny',
                                          'Config file, e.g. configs/llama.py:small.')
_STEPS = flags.DEFINE_integer('steps', 60, 'Timed steps (after the warmup).')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed steps first (compilation).')
_WINDOW = flags.DEFINE_integer('window', 5, 'Steps per timing window.')


def peak_memory() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    per_device = max(d.memory_stats()['peak_bytes_in_use'] for d in jax.local_devices())
    return f'{per_device / 2**20:,.0f} MiB per device'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10   # KiB -> MiB
  return f'{rss:,.0f} MiB host RSS (process peak)'


def bare_step(cfg):
  """A minimal jitted AdamW step on one fixed batch: `run(steps) -> [s/step]`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top

  t = cfg.train
  mesh = mesh_lib.make_mesh(cfg.mesh)
  # The same math as the loop's step (clipping, AdamW, the loss below), with
  # none of its machinery.
  optimizer = optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.adamw(t.learning_rate, b1=t.adam_b1, b2=t.adam_b2,
                  weight_decay=t.weight_decay))
  abstract = nnx.eval_shape(lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
  # Non-parameter state (e.g. the sigmoid router's selection bias): constant here.
  rest = nnx.split(model.Decoder(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)[2]

  def init():
    params = nnx.state(model.Decoder(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    return params, optimizer.init(params)

  shardings = sharding.state_shardings(mesh, jax.eval_shape(init))
  params, opt_state = jax.jit(init, out_shardings=shardings)()

  def step(params, opt_state, batch):
    def loss_fn(p):
      logits, _ = nnx.merge(graphdef, p, rest)(batch['inputs'], segment_ids=batch['segment_ids'],
                                         positions=batch['positions'])
      target = jnp.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
      nll = jax.nn.logsumexp(logits, axis=-1) - target
      return jnp.sum(nll * batch['loss_mask']) / jnp.sum(batch['loss_mask'])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  jitted = jax.jit(step, in_shardings=(*shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(*shardings, None), donate_argnums=(0, 1))
  rng = np.random.default_rng(0)
  shape = (t.global_batch_size, t.seq_len)
  tokens = rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32)
  batch = {'inputs': tokens, 'targets': np.roll(tokens, -1, axis=1),
           'segment_ids': np.ones(shape, np.int32),
           'positions': np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
           'loss_mask': np.ones(shape, np.float32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  state = {'params': params, 'opt_state': opt_state}

  def run(steps, window):
    """Seconds per step of each window of `window` steps."""
    times = []
    for _ in range(max(steps // window, 1)):
      start = time.perf_counter()
      for _ in range(window):
        state['params'], state['opt_state'], loss = jitted(
            state['params'], state['opt_state'], batch)
      float(loss)
      times.append((time.perf_counter() - start) / window)
    return times

  return run


def optimizer_state_mib(cfg) -> float:
  """MiB of `train.optimizer`'s state for the config's model (float32)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model  # pylint: disable=g-import-not-at-top
  from train import optim  # pylint: disable=g-import-not-at-top
  optimizer, _ = optim.make_optimizer(cfg.train, cfg.model)
  abstract = nnx.eval_shape(lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        nnx.state(abstract, nnx.Param))
  state = jax.eval_shape(optimizer.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20


def loop_step_seconds(cfg, steps, warmup, window):
  """Seconds per step of each window of the real loop, from its tokens/s log."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  cfg = cfg.copy_and_resolve_references()
  t = cfg.train
  t.steps = warmup + steps
  t.log_every_steps = window
  t.eval_steps = 0
  t.checkpoint_every_steps = t.steps
  with tempfile.TemporaryDirectory() as workdir:
    loop.train_and_evaluate(cfg, workdir)
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={'scalars': 0})
    acc.Reload()
    rates = [e.value for e in acc.Scalars('train/tokens_per_second')]
  # The first window starts right after step 1 (compilation) and may still
  # be warming up: drop it when there are others.
  rates = rates[1:] if len(rates) > 1 else rates
  return [t.global_batch_size * t.seq_len / r for r in rates]


def main(argv):
  del argv
  os.environ.setdefault('ABLAX_NO_BAR', '1')
  import jax  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  import model  # pylint: disable=g-import-not-at-top
  from train import metrics  # pylint: disable=g-import-not-at-top
  metrics.configure_logging()
  cfg = _CONFIG.value
  configs.validate(cfg)
  t = cfg.train
  steps, warmup, window = _STEPS.value, _WARMUP.value, _WINDOW.value

  bare_run = bare_step(cfg)
  bare_run(warmup, warmup)                             # compile
  bare_times = bare_run(steps // 2, window)
  loop_times = loop_step_seconds(cfg, steps, warmup, window)
  kind = t.get('optimizer', 'adamw')
  if kind != 'adamw':
    adamw_cfg = cfg.copy_and_resolve_references()
    adamw_cfg.train.optimizer = 'adamw'
    adamw_times = loop_step_seconds(adamw_cfg, steps, warmup, window)
  bare_times += bare_run(steps - steps // 2, window)
  bare, looped = min(bare_times), min(loop_times)
  tokens = t.global_batch_size * t.seq_len
  flops = model.flops_per_token(cfg.model, t.seq_len) * tokens
  peak = metrics.peak_flops()
  devices = jax.devices()
  spec = next((a for a in sys.argv if a.startswith('--config=')), None)
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  config_arg = spec.split('=', 1)[1] if spec else (
      sys.argv[sys.argv.index('--config') + 1] if '--config' in sys.argv else
      'configs/llama.py:tiny')

  rows = [
      ('config', ' '.join([config_arg, *overrides])),
      ('devices', f'{len(devices)} x {devices[0].device_kind} ({jax.__version__})'),
      ('parameters', f'{model.count_params(cfg.model):,}'),
      ('batch x seq_len', f'{t.global_batch_size} x {t.seq_len} = {tokens:,} tokens/step'),
      ('model FLOPs / step', f'{flops:.3e}'),
      ('peak FLOP/s', f'{peak:.3e}' + (' (measured matmul)' if devices[0].platform == 'cpu'
                                        else ' (table)')),
      ('bare jit step', f'{1e3 * bare:.1f} ms  {tokens / bare:,.0f} tok/s  '
                        f'MFU {100 * flops / bare / peak:.1f}%'),
      ('train loop step', f'{1e3 * looped:.1f} ms  {tokens / looped:,.0f} tok/s  '
                          f'MFU {100 * flops / looped / peak:.1f}%'),
      ('loop overhead', f'{100 * (looped / bare - 1):+.1f}% (target: under 5%)' + (
          '' if kind == 'adamw' else f'; the bare step is AdamW, the loop {kind}: '
          'read the last row')),
      ('window spread', f'bare {1e3 * min(bare_times):.1f}-{1e3 * max(bare_times):.1f} ms, '
                        f'loop {1e3 * min(loop_times):.1f}-{1e3 * max(loop_times):.1f} ms '
                        f'({window}-step windows)'),
      ('peak memory', peak_memory()),
      ('optimizer', f'{kind}: state {optimizer_state_mib(cfg):,.1f} MiB (float32)'),
  ]
  if kind != 'adamw':
    adamw = min(adamw_times)
    rows.append((f'{kind} vs adamw', f'loop step {1e3 * looped:.1f} ms vs {1e3 * adamw:.1f} ms '
                                     f'({100 * (looped / adamw - 1):+.1f}%); adamw state '
                                     f'{optimizer_state_mib(adamw_cfg):,.1f} MiB'))
  width = max(len(k) for k, _ in rows)
  print()
  for key, value in rows:
    print(f'{key:<{width}}  {value}')
  print(f'\nreproduce: python bench/train_throughput.py {" ".join(sys.argv[1:])}'.rstrip())


if __name__ == '__main__':
  app.run(main)
