"""The GPU checks of ablax's attention kernels, in one run of under 10 minutes.

    OUT=/tmp/out PYTHONUNBUFFERED=1 python3 -m bench.gpu_check     # from the repo root

Written for the H200 a session is sometimes lent (docs/benchmarks.md); it
needs nothing beyond the device image's JAX, Flax and optax except for the
last part (`grain` and `ml_collections`, carried as wheels: see
docs/benchmarks.md). Each part runs under its own time limit and a failing
part does not stop the others. Everything goes to $OUT (at most 6 files):

1. `correctness.json`: on the GPU, `kernels.flash_attention` against the XLA
   reference (`attention_core.reference_attention` in float32 on the same
   bf16 inputs), forward and the gradients of q, k, v and the sinks, for the
   Mosaic GPU kernel (`ABLAX_PALLAS_GPU=mosaic`) and the Triton kernel
   (`=triton`), over cases that together use every mask: causal, sliding
   window (causal and not), packed segments, ALiBi, soft-cap, memory tokens,
   sinks, GQA/MQA, q/k head dim != v head dim (MLA 192/128), head dims 64,
   128 and 256, lengths 1k and 4k and one that is no multiple of the blocks.
   Tolerance 2e-2 relative to each tensor's scale (bf16 probabilities).
2. `attention_mosaic.md`, `attention_triton.md`, `attention_xla_cudnn.md`:
   `bench.attention` (TFLOP/s forward and forward+backward, causal, bf16,
   seq 1k/4k/16k, head dim 64/128) for `ablax` with each kernel, then for
   `xla` and `jax.nn` (cuDNN).
3. `train_throughput.txt`: `bench/train_throughput.py` on `llama.py:small`
   in bfloat16 with `attention_impl=pallas` (tokens/s and MFU).
4. `gpu_check.log`: what each part printed, with its wall time.
"""

import json
import os
import subprocess
import sys
import time

OUT = os.environ.get('OUT', '/tmp/ablax_gpu_check')
LOG = os.path.join(OUT, 'gpu_check.log')

# (name, seq, heads, kv heads, q/k head dim, v head dim, flash_attention kwargs)
CASES = [
    ('causal_1k_d128_gqa', 1024, 8, 2, 128, 128, dict(causal=True)),
    ('causal_4k_d64', 4096, 4, 4, 64, 64, dict(causal=True)),
    ('everything_1000_gqa3', 1000, 6, 2, 128, 128,
     dict(causal=True, sliding_window=256, segments=True, alibi=True, logit_softcap=30.0,
          num_memory_tokens=4, sinks=True)),
    ('bidirectional_window_mqa', 1024, 4, 1, 64, 64, dict(causal=False, sliding_window=100)),
    ('mla_192_128_segments', 1024, 4, 4, 192, 128, dict(causal=True, segments=True)),
    ('d256_memory', 512, 2, 2, 256, 256, dict(causal=True, num_memory_tokens=8)),
]
TOL = 2e-2


def log(*parts):
  line = ' '.join(str(p) for p in parts)
  print(line, flush=True)
  with open(LOG, 'a') as f:
    f.write(line + '\n')


def correctness():
  """Part 1, in this process: every case on both GPU kernels."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from model import attention_core  # pylint: disable=import-outside-toplevel
  from model import kernels  # pylint: disable=import-outside-toplevel
  from model import masking  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  log('device', device.device_kind, getattr(device, 'compute_capability', '?'),
      'jax', jax.__version__)
  log('mosaic gpu unavailable because:', kernels.mosaic_gpu_unavailable(jnp.bfloat16))
  results = []
  for name, t, n, kvh, h, hv, features in CASES:
    features = dict(features)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in ((2, t, n, h), (2, t, kvh, h), (2, t, kvh, hv)))
    kwargs = dict(causal=features.pop('causal'))
    for key in ('sliding_window', 'logit_softcap', 'num_memory_tokens'):
      if key in features:
        kwargs[key] = features.pop(key)
    if features.pop('segments', False):
      kwargs['segment_ids'] = jnp.asarray(np.cumsum(rng.random((2, t)) < 3 / t, axis=1),
                                          jnp.int32)
    if features.pop('alibi', False):
      kwargs['alibi_slopes'] = masking.alibi_slopes(n)
    sinks = jnp.asarray(rng.standard_normal(n), jnp.float32) if features.pop('sinks', False) \
        else None
    cot = jnp.asarray(rng.standard_normal((2, t, n, hv)), jnp.float32)

    def run(fn):
      def loss(q, k, v, sinks):
        return (fn(q, k, v, sinks).astype(jnp.float32) * cot).sum()
      argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
      return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums)(*a)))(q, k, v, sinks)

    up = lambda x: x.astype(jnp.float32)
    ref = run(lambda q, k, v, s: attention_core.reference_attention(
        up(q), up(k), up(v), sink_logits=s, **kwargs))
    for kernel in ('mosaic', 'triton'):
      os.environ['ABLAX_PALLAS_GPU'] = kernel
      row = dict(case=name, kernel=kernel, seq=t, heads=n, kv_heads=kvh, head_dim=h,
                 v_head_dim=hv, features=sorted(kwargs) + (['sinks'] if sinks is not None else []))
      try:
        row['ran'] = kernels._backend(jnp.bfloat16)[0]   # pylint: disable=protected-access
        start = time.perf_counter()
        got = run(lambda q, k, v, s: kernels.flash_attention(q, k, v, sink_logits=s, **kwargs))
        jax.block_until_ready(got)
        row['seconds_incl_compile'] = round(time.perf_counter() - start, 2)
        errors = {}
        for label, x, r in zip(('out', 'dq', 'dk', 'dv', 'dsinks'),
                               [got[0], *got[1]], [ref[0], *ref[1]]):
          x, r = np.asarray(x, np.float32), np.asarray(r, np.float32)
          errors[label] = float(np.max(np.abs(x - r) / (np.abs(r) + np.abs(r).max())))
        row['max_rel_error'] = errors
        row['ok'] = all(e <= TOL for e in errors.values())
      except Exception as e:  # pylint: disable=broad-except
        row['ok'], row['error'] = False, f'{type(e).__name__}: {str(e)[:400]}'
      log(json.dumps(row))
      results.append(row)
  os.environ.pop('ABLAX_PALLAS_GPU', None)
  with open(os.path.join(OUT, 'correctness.json'), 'w') as f:
    json.dump(dict(tolerance=TOL, results=results), f, indent=1)


def subprocess_part(name, argv, limit_s, env=None, out_file=None):
  """Runs one bench as a child process under a time limit; its output goes to the log."""
  log(f'== {name}: {" ".join(argv)} (limit {limit_s}s)')
  start = time.perf_counter()
  try:
    # The repository root on the path: bench/train_throughput.py runs as a script.
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get('PYTHONPATH')]))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit_s,
                          env={**os.environ, 'PYTHONPATH': path, **(env or {})}, check=False)
    text, status = proc.stdout + proc.stderr[-4000:], proc.returncode
  except subprocess.TimeoutExpired as e:
    text = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    status = 'timeout'
  log(text)
  log(f'== {name}: exit {status}, {time.perf_counter() - start:.0f}s')
  if out_file:
    with open(os.path.join(OUT, out_file), 'w') as f:
      f.write(text)


def main():
  os.makedirs(OUT, exist_ok=True)
  start = time.perf_counter()
  try:
    correctness()
  except Exception as e:  # pylint: disable=broad-except
    log('correctness failed:', type(e).__name__, str(e)[:400])
  log(f'correctness: {time.perf_counter() - start:.0f}s')

  attention = [sys.executable, '-m', 'bench.attention', '--seq', '1024', '4096', '16384',
               '--head_dims', '64', '128', '--causal', '--iters', '10']
  for kernel in ('mosaic', 'triton'):
    subprocess_part(f'attention ablax ({kernel})',
                    attention + ['--impls', 'ablax', '--out',
                                 os.path.join(OUT, f'attention_{kernel}.md')],
                    100, env=dict(ABLAX_PALLAS_GPU=kernel))
  subprocess_part('attention xla and cuDNN',
                  attention + ['--impls', 'jax.nn,xla', '--out',
                               os.path.join(OUT, 'attention_xla_cudnn.md')], 120)
  subprocess_part('train throughput',
                  [sys.executable, 'bench/train_throughput.py',
                   '--config', 'configs/llama.py:small',
                   '--config.model.dtype=bfloat16', '--config.model.attention_impl=pallas',
                   '--steps', '30', '--warmup', '5', '--window', '5'],
                  150, out_file='train_throughput.txt')
  log(f'total {time.perf_counter() - start:.0f}s')


if __name__ == '__main__':
  main()
