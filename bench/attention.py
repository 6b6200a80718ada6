"""Attention speed and memory: ablax's Pallas kernel against the alternatives.

    python -m bench.attention                       # the full table (GPU or TPU)
    python -m bench.attention --seq 4096 --head_dims 128 --causal   # one cell
    python -m bench.attention --out docs/benchmarks.md               # also as Markdown
    python -m bench.attention --seq 4096 --impls ablax --block_q 64 --block_kv 128  # tuning
    python -m bench.attention --seq 4096 --head_dims 128 --variants standard,sinks,gate_headwise,gate_elementwise,differential

Run from the repository root. For each sequence length S and head dim D it
times, forward and forward+backward, in bfloat16 with B = max(1, 16384 / S)
sequences of H = 2048 / D heads (a 2048-wide model, 16k tokens per step):

- `xla`: the reference attention of `model.attention_core` (materialises the
  S x S scores);
- `jax.nn`: `jax.nn.dot_product_attention`, cuDNN's fused flash attention on a
  GPU (`implementation='cudnn'`), XLA elsewhere;
- `jax-pallas`: the Pallas attention bundled with JAX
  (`jax.experimental.pallas.ops.gpu.attention.mha` on GPU,
  `...ops.tpu.flash_attention` on TPU);
- `ablax`: `model.kernels.flash_attention`.

`--variants` (default `standard`) adds the issue-17 attention variants, each
timed as what the layer adds around the attention call (the layer's own
methods, parameters differentiated too):

- `sinks`: one learned logit per head in every softmax denominator
  (`sink_logits`; `xla` and `ablax` only: cuDNN and JAX's Pallas kernel have
  no sink term);
- `gate_headwise`, `gate_elementwise`: the output times sigmoid(x W_g)
  (`Attention.apply_gate`), x [B, S, H*D] the layer input, W_g [H*D, H] or
  [H*D, H, D]; the projection and its gradients are included;
- `differential`: `DifferentialAttention.differential`, two calls of the impl
  over the H/2 paired heads with values of dim 2D, the lambda difference and
  the per-head RMSNorm (an impl that cannot take a value dim of 2D fails).

FLOP convention: forward 4 * B * H * S^2 * D (two matmuls), halved when
causal; backward 2.5x the forward (five matmuls, one of them recomputing the
scores); TFLOP/s = FLOPs / median wall time, the same FLOPs for every variant
(so a variant's lower TFLOP/s is its overhead; the differential variant does
the same attention FLOPs: half the heads, each map with values of 2D). Memory: XLA's compile-time
memory analysis of the jitted step (temporaries + outputs, inputs excluded),
i.e. the peak the program adds on top of q, k, v. A cell that fails (e.g.
out of memory for `xla` at 16k) prints the error's first words instead.
On CPU the kernels run in interpret mode and times mean nothing; `--seq 256`
there only checks that the script runs.
"""

import argparse
import functools
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

import configs
from model import attention as attention_lib
from model import attention_core
from model import differential as differential_lib
from model import kernels

VARIANTS = ('standard', 'sinks', 'gate_headwise', 'gate_elementwise', 'differential')


def _flops(b, h, s, d, causal):
  fwd = 4 * b * h * s * s * d / (2 if causal else 1)
  return fwd, 3.5 * fwd


def _impls(causal, block_q=None, block_kv=None):
  """name -> fn(q, k, v) with q/k/v [b, s, h, d], or an error string."""
  platform = jax.default_backend()
  impls = {
      'xla': functools.partial(attention_core.reference_attention, causal=causal),
      'jax.nn': functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                  implementation='cudnn' if platform == 'gpu' else None),
  }
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    try:
      if platform == 'gpu':
        # pylint: disable-next=import-outside-toplevel
        from jax.experimental.pallas.ops.gpu import attention as gpu_mha
        impls['jax-pallas'] = lambda q, k, v: gpu_mha.mha(
            q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)
      elif platform == 'tpu':
        # pylint: disable-next=import-outside-toplevel
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa
        # [b, h, s, d] layout; the transposes are part of what a caller pays.
        impls['jax-pallas'] = lambda q, k, v: tpu_fa.flash_attention(
            *(x.transpose(0, 2, 1, 3) for x in (q, k, v)), causal=causal,
            sm_scale=q.shape[-1] ** -0.5).transpose(0, 2, 1, 3)
      else:
        impls['jax-pallas'] = 'no bundled Pallas attention on CPU'
    except ImportError as e:
      impls['jax-pallas'] = f'import failed: {e}'
  impls['ablax'] = functools.partial(kernels.flash_attention, causal=causal,
                                     block_q=block_q, block_kv=block_kv)
  return impls


def _variant(name, variant, fn, b, s, h, d, dtype):
  """(fn(q, k, v, *extras), extras) for one variant of impl `name`, or an error string.

  extras are the variant's own inputs (differentiated with q, k, v): the sink
  logits, the gate's input and weights, the differential layer's lambdas.
  """
  if variant == 'standard':
    return fn, ()
  if variant == 'sinks':
    if name not in ('xla', 'ablax'):
      return f'no sink term in {name}'
    sinks = jax.random.normal(jax.random.key(5), (h,), jnp.float32)
    return (lambda q, k, v, sinks: fn(q, k, v, sink_logits=sinks)), (sinks,)
  if variant not in VARIANTS:
    return f'unknown variant {variant!r}; one of {", ".join(VARIANTS)}'
  # The layer the variant lives in, at this width (its other weights unused).
  cfg = configs.load('configs/base.py', [
      f'model.d_model={h * d}', f'model.num_heads={h}', f'model.num_kv_heads={h}',
      f'model.head_dim={d}', f'model.dtype={jnp.dtype(dtype).name}',
      f'model.param_dtype={jnp.dtype(dtype).name}',
      'model.attention_gate=' + (variant[len('gate_'):] if variant.startswith('gate_') else 'none'),
      'model.attention_type=' + ('differential' if variant == 'differential' else 'standard'),
  ]).model
  if variant == 'differential':
    if h % 2:
      return 'differential needs an even head count'
    layer = differential_lib.DifferentialAttention(cfg, rngs=nnx.Rngs(0))
    graph, own, rest = nnx.split(layer, lambda path, _: 'lambda_' in str(path[-1]), ...)

    def differential(q, k, v, own):
      attend = lambda q, k, v, slopes, sinks: fn(q, k, v)
      return nnx.merge(graph, own, rest).differential(attend, q, k, v)
    return differential, (own,)
  layer = attention_lib.Attention(cfg, rngs=nnx.Rngs(0))
  graph, own, rest = nnx.split(layer, lambda path, _: path[-1] == 'wg', ...)
  x = jax.random.normal(jax.random.key(6), (b, s, h * d), dtype)

  def gated(q, k, v, x, own):
    return nnx.merge(graph, own, rest).apply_gate(fn(q, k, v), x)
  return gated, (x, own)


def _memory_mib(compiled):
  stats = compiled.memory_analysis()
  if stats is None:
    return float('nan')
  return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def _time_ms(fn, args, iters):
  jax.block_until_ready(fn(*args))       # warm-up (compiled already)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def measure(fn, b, h, s, d, dtype, iters, extras=()):
  """(fwd ms, fwd MiB, fwd+bwd ms, fwd+bwd MiB) of fn(q, k, v, *extras) at one size."""
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b, s, h, d), dtype) for key in keys)
  do = jax.random.normal(jax.random.key(4), jax.eval_shape(fn, q, k, v, *extras).shape, dtype)

  def fwd_bwd(q, k, v, do, *extras):
    out, vjp = jax.vjp(fn, q, k, v, *extras)
    return vjp(do)

  row = []
  for step, args in ((fn, (q, k, v, *extras)), (fwd_bwd, (q, k, v, do, *extras))):
    compiled = jax.jit(step).lower(*args).compile()
    row += [_time_ms(compiled, args, iters), _memory_mib(compiled)]
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seq', type=int, nargs='+', default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument('--head_dims', type=int, nargs='+', default=[64, 128])
  parser.add_argument('--causal', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--tokens', type=int, default=16384, help='B * S per step')
  parser.add_argument('--width', type=int, default=2048, help='H * D')
  parser.add_argument('--impls', default='xla,jax.nn,jax-pallas,ablax')
  parser.add_argument('--variants', default='standard',
                      help='comma-separated: ' + ','.join(VARIANTS))
  parser.add_argument('--iters', type=int, default=20)
  parser.add_argument('--block_q', type=int, help='ablax tile (default: per backend)')
  parser.add_argument('--block_kv', type=int, help='ablax tile (default: per backend)')
  parser.add_argument('--out', help='also write the table here (Markdown)')
  args = parser.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  header = [
      f'# `python -m bench.attention {" ".join(argv if argv is not None else sys.argv[1:])}`',
      '',
      f'{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
      f'{dtype.name}, causal={args.causal}, {args.tokens} tokens per step, '
      f'H*D = {args.width}. FLOPs: forward 4*B*H*S^2*D'
      f'{" / 2 (causal)" if args.causal else ""}, backward 2.5x forward. '
      'Memory: XLA memory analysis (temporaries + outputs).',
      '',
      '| S | D | B x H | impl | variant | fwd ms | fwd TFLOP/s | fwd MiB '
      '| fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd MiB |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  print('\n'.join(header), flush=True)
  lines = list(header)
  impls = _impls(args.causal, args.block_q, args.block_kv)
  wanted = args.impls.split(',')
  summary = {}
  for d in args.head_dims:
    for s in args.seq:
      b, h = max(1, args.tokens // s), max(1, args.width // d)
      fwd_flops, total_flops = _flops(b, h, s, d, args.causal)
      for name in wanted:
        for variant in args.variants.split(','):
          fn = impls.get(name, f'unknown impl {name!r}')
          extras = ()
          try:
            if not isinstance(fn, str):
              fn = _variant(name, variant, fn, b, s, h, d, dtype)
            if isinstance(fn, str):
              cells = [fn] + [''] * 5
            else:
              fn, extras = fn
              fwd_ms, fwd_mib, all_ms, all_mib = measure(fn, b, h, s, d, dtype, args.iters,
                                                         extras)
              summary[(s, d, name, variant)] = all_ms
              cells = [f'{fwd_ms:.3f}', f'{fwd_flops / fwd_ms / 1e9:.3g}', f'{fwd_mib:.0f}',
                       f'{all_ms:.3f}', f'{total_flops / all_ms / 1e9:.3g}', f'{all_mib:.0f}']
          except Exception as e:  # pylint: disable=broad-except
            cells = [f'failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}'] + [''] * 5
          line = f'| {s} | {d} | {b} x {h} | {name} | {variant} | ' + ' | '.join(cells) + ' |'
          print(line, flush=True)
          lines.append(line)

  # The target: at S=4k, D=128 (causal, bf16), ablax >= 0.8x cuDNN
  # and well above JAX's bundled Pallas kernel (forward+backward time).
  ours = summary.get((4096, 128, 'ablax', 'standard'))
  for other in ('jax.nn', 'jax-pallas'):
    theirs = summary.get((4096, 128, other, 'standard'))
    if ours and theirs:
      lines.append(f'\nS=4096, D=128: ablax fwd+bwd speed = {theirs / ours:.2f}x {other}')
      print(lines[-1].strip())
  # Each variant's fwd+bwd cost relative to the standard call of the same impl.
  for (s, d, name, variant), ms in summary.items():
    base = summary.get((s, d, name, 'standard'))
    if variant != 'standard' and base:
      lines.append(f'S={s}, D={d}, {name}: {variant} fwd+bwd = {ms / base:.2f}x standard')
      print(lines[-1])
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
