"""Scanned layers (`model.scan_layers`) against unrolled: compile time, program
size and step time of a training step (loss, gradients) by depth.

    python -m bench.scan                          # 4, 16, 48 layers
    python -m bench.scan --layers 4 16 --d_model 64 --seq 128

Run from the repository root. For each depth it builds the LLaMA-layout
decoder (`configs/llama.py:tiny`, widths from the flags) unrolled and scanned
from the same seed, jits value-and-grad of the next-token loss and reports:
- `hlo_chars`: the length of the lowered StableHLO text (grows with depth when
  unrolled, constant when scanned: one block body in a while loop);
- `compile_s`: lowering plus XLA compilation, wall seconds;
- `step_ms`: median of 5 timed steps after one warm-up;
- `max|dloss|`: the loss difference between the two layouts (float rounding).
Small widths keep it quick on a CPU; step times there say little about an
accelerator.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import configs
import model


def measure(num_layers, scan_layers, args):
  m = configs.load('configs/llama.py:tiny').model
  m.update(dict(d_model=args.d_model, num_heads=2, num_kv_heads=1, d_ff=2 * args.d_model,
                vocab_size=256, num_layers=num_layers, max_seq_len=args.seq,
                scan_layers=scan_layers, remat=args.remat))
  decoder = model.Decoder(m, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(decoder)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 256)

  def loss(s):
    logits, _ = nnx.merge(graphdef, s)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  step = jax.jit(jax.value_and_grad(loss))
  start = time.perf_counter()
  lowered = step.lower(state)
  text = lowered.as_text()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  value, grads = compiled(state)
  jax.block_until_ready(grads)
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready(compiled(state))
    times.append(time.perf_counter() - t)
  return len(text), compile_s, 1e3 * statistics.median(times), float(value)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, nargs='+', default=[4, 16, 48])
  parser.add_argument('--d_model', type=int, default=32)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--remat', default='none')
  args = parser.parse_args()
  print(f'backend {jax.default_backend()}, d_model {args.d_model}, seq {args.seq}, '
        f'batch {args.batch}, remat {args.remat}')
  print('| layers | layout | hlo_chars | compile_s | step_ms | max abs dloss |')
  print('|---:|---|---:|---:|---:|---:|')
  for n in args.layers:
    rows = {layout: measure(n, layout == 'scanned', args)
            for layout in ('unrolled', 'scanned')}
    diff = abs(rows['scanned'][3] - rows['unrolled'][3])
    for layout, (chars, compile_s, step_ms, _) in rows.items():
      print(f'| {n} | {layout} | {chars} | {compile_s:.2f} | {step_ms:.1f} | '
            f'{diff:.1e} |', flush=True)


if __name__ == '__main__':
  main()
