"""Context parallelism's orders compared: per-device memory and step time.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python bench/context_parallel.py --config configs/llama.py:small \\
        --context 8 --seq_len 4096 --layers 2 --steps 3

For each `model.context_parallel` value (allgather, ring_contiguous, ring)
compiles the trainer's loss and gradient (`step.lm_loss`, value_and_grad)
on a mesh of `--context` devices (data 1), prints the compiled executable's
per-device temporaries (XLA's memory analysis) and the median wall time of
`--steps` calls after one warm-up call, and, for the rings, the number of
(query chunk, key chunk) pairs each device folds in one attention layer.

On fake CPU devices every device shares the host's cores, so the wall time
measures the total work of all devices, not the slowest device's: the ring's
load balance (its purpose) shows in the fold counts, not in this time.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import configs
import model as model_lib
from model import context_parallel
from train import mesh as mesh_lib
from train import sharding
from train import step as step_lib


def _step(cfg, mesh):
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(decoder, nnx.Param, ...)
  loss_fn = step_lib.lm_loss(cfg.train)

  def f(p, batch):
    def mean_loss(p):
      total, metrics = loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.PRNGKey(0))
      return total / metrics['weight']
    with sharding.activation_sharding(mesh):
      return jax.value_and_grad(mean_loss)(p)

  shardings = sharding.state_shardings(mesh, params)
  params = jax.device_put(params, shardings)
  return jax.jit(f, in_shardings=(shardings, sharding.batch_sharding(mesh))), params


def _folds(cfg, mesh, mode, c):
  h = cfg.model.d_model // cfg.model.num_heads
  q = jnp.zeros((1, cfg.train.seq_len, cfg.model.num_heads, h), jnp.float32)
  k = jnp.zeros((1, cfg.train.seq_len, cfg.model.num_kv_heads, h), jnp.float32)

  def f(q, k):
    with sharding.activation_sharding(mesh):
      return context_parallel._sharded(  # pylint: disable=protected-access
          q, k, k, mode=mode, mesh=mesh, c=c, segment_ids=None, causal=True,
          sliding_window=cfg.model.sliding_window, alibi_slopes=None, logit_softcap=None,
          scale=None, num_memory_tokens=0, sink_logits=None, count_folds=True)[1]
  return np.asarray(jax.jit(f)(q, k)).tolist()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/llama.py:small')
  parser.add_argument('--context', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=4096)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--modes', default='allgather,ring_contiguous,ring')
  args = parser.parse_args()
  c = args.context
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=1, fsdp=1, context=c, tensor=1, expert=1)))
  print(f'{args.config} layers={args.layers} seq={args.seq_len} context={c} '
        f'({jax.device_count()} {jax.default_backend()} devices)')
  print('| mode | temporaries per device | step time (median) | folds per device |')
  print('| --- | --- | --- | --- |')
  for mode in args.modes.split(','):
    cfg = configs.load(args.config, [
        f'model.num_layers={args.layers}', f'train.seq_len={args.seq_len}',
        f'model.max_seq_len={args.seq_len}', 'train.global_batch_size=1',
        f'mesh.context={c}', 'mesh.data=1', f'model.context_parallel={mode}'])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (1, args.seq_len + 1)).astype(np.int32)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
             'loss_mask': np.ones((1, args.seq_len), np.float32)}
    step, params = _step(cfg, mesh)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    compiled = step.lower(params, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, batch))
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, batch))
      times.append(time.perf_counter() - start)
    folds = _folds(cfg, mesh, mode, c) if mode != 'allgather' else '-'
    print(f'| {mode} | {temp / 2**20:.0f} MiB | {statistics.median(times):.2f} s | {folds} |',
          flush=True)


if __name__ == '__main__':
  main()
