"""One Gated DeltaNet layer against one attention layer: forward+backward time.

    python -m bench.gdn                              # seq 512, 2048 and 8192 (the default)
    python -m bench.gdn --seqs 512,2048,8192 --d_model 128 --heads 2 --reps 5

Run from the repository root. Both layers are built from the same
`config.model` (d_model, heads; the attention layer with head_dim d/heads and
`attention_impl=xla`, the GDN layer with the same heads and head dims,
conv width 4, chunk 64), in float32, batch 1. Timed: a jitted `jax.grad` of
sum(layer(x)) with respect to the layer's parameters and x (forward +
backward), compiled ahead (the compile time is its own column), then `--reps`
rounds that call attention and GDN one after the other (so load from other
processes hits both alike); the table shows each layer's median and the
median of the per-round ratios. Attention's cost grows as seq^2, the chunked
delta rule's as seq * chunk, so the ratio shows where the linear layer
starts to pay.

A first version of this bench sat forever in its first timed call on a
2-core machine: `model.gdn` then used `lax.linalg.triangular_solve`, whose
CPU (LAPACK) kernel splits its batch over XLA's intra-op thread pool and
waits for the pieces; two such solves running at once on a 2-thread pool
each held a thread and waited for the other (a deadlock, no CPU used, seen
in gdb). `model.gdn.unit_lower_inverse` (matmuls only) replaced it.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import configs
from model import attention as attention_lib
from model import gdn


def compiled_step(layer, x):
  """(compiled fwd+bwd step, its args, compile seconds)."""
  graph, params = nnx.split(layer)
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])

  def loss(params, x):
    return jnp.sum(nnx.merge(graph, params)(x, positions))
  start = time.perf_counter()
  step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(step(params, x))          # warm-up
  return step, (params, x), compile_s


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seqs', default='512,2048,8192')
  parser.add_argument('--d_model', type=int, default=128)
  parser.add_argument('--heads', type=int, default=2)
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args(argv)
  cfg = configs.load('configs/base.py', [
      f'model.d_model={args.d_model}', f'model.num_heads={args.heads}',
      f'model.num_kv_heads={args.heads}', 'model.attention_impl=xla',
      'model.max_seq_len=65536', 'model.layer_pattern=L']).model
  layers = {'attention': attention_lib.Attention(cfg, rngs=nnx.Rngs(0)),
            'gdn': gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(0))}
  print(f'# python -m bench.gdn --seqs {args.seqs} --d_model {args.d_model} '
        f'--heads {args.heads} --reps {args.reps}')
  print(f'# head_dim={args.d_model // args.heads}, float32, batch 1, fwd+bwd, '
        f'{jax.devices()[0].platform}, jax {jax.__version__}')
  print('| seq | attention ms | GDN ms | GDN / attention | compile s (attention, GDN) |')
  print('|---:|---:|---:|---:|---:|')
  for seq in (int(s) for s in args.seqs.split(',')):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, seq, args.d_model)), jnp.float32)
    steps = {name: compiled_step(layer, x) for name, layer in layers.items()}
    times = {name: [] for name in layers}
    for _ in range(args.reps):
      for name, (step, step_args, _) in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(step(*step_args))
        times[name].append(time.perf_counter() - start)
    ratio = statistics.median(g / a for a, g in zip(times['attention'], times['gdn']))
    ta, tg = (1e3 * statistics.median(times[n]) for n in ('attention', 'gdn'))
    print(f'| {seq} | {ta:.1f} | {tg:.1f} | {ratio:.2f} | '
          f'{steps["attention"][2]:.1f}, {steps["gdn"][2]:.1f} |', flush=True)


if __name__ == '__main__':
  main()
