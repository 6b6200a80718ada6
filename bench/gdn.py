"""One Gated DeltaNet layer against one attention layer: forward+backward time.

    python -m bench.gdn                              # seq 512 and 2048 (the default)
    python -m bench.gdn --seqs 512,2048,8192 --d_model 256 --heads 4 --reps 5

Run from the repository root. Both layers are built from the same
`config.model` (d_model, heads; the attention layer with head_dim d/heads and
`attention_impl=xla`, the GDN layer with the same heads and head dims,
conv width 4, chunk 64), in float32, batch 1. Timed: the median over `--reps`
calls of a jitted `jax.grad` of sum(layer(x)) with respect to the layer's
parameters and x (forward + backward), after one compile-and-warm-up call.
Attention's cost grows as seq^2, the chunked delta rule's as seq * chunk,
so the ratio shows where the linear layer starts to pay.
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


def time_layer(layer, x, reps):
  graph, params = nnx.split(layer)

  def loss(params, x):
    return jnp.sum(nnx.merge(graph, params)(x, jnp.broadcast_to(
        jnp.arange(x.shape[1]), x.shape[:2])))
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seqs', default='512,2048')
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args(argv)
  cfg = configs.load('configs/base.py', [
      f'model.d_model={args.d_model}', f'model.num_heads={args.heads}',
      f'model.num_kv_heads={args.heads}', 'model.attention_impl=xla',
      'model.max_seq_len=65536', 'model.layer_pattern=L']).model
  attn = attention_lib.Attention(cfg, rngs=nnx.Rngs(0))
  lin = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(0))
  print(f'# d_model={args.d_model} heads={args.heads} head_dim={args.d_model // args.heads} '
        f'float32 batch 1, fwd+bwd, median of {args.reps} ({jax.devices()[0].platform})')
  print('| seq | attention (ms) | Gated DeltaNet (ms) | GDN / attention |')
  print('|---:|---:|---:|---:|')
  for seq in (int(s) for s in args.seqs.split(',')):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, seq, args.d_model)), jnp.float32)
    ta, tg = time_layer(attn, x, args.reps), time_layer(lin, x, args.reps)
    print(f'| {seq} | {1e3 * ta:.1f} | {1e3 * tg:.1f} | {tg / ta:.2f} |', flush=True)


if __name__ == '__main__':
  main()
