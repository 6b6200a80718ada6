"""Compiled memory of one train step with and without `train.loss_chunk_size`.

    python bench/loss_memory.py
    python bench/loss_memory.py --chunk_sizes=none,512,128 \\
        --config.model.vocab_size=262144 --config.train.seq_len=2048

Compiles (never runs) the trainer's own train step (`train.step.
make_train_step` with `lm_loss` and the config's optimizer) ahead of time on
abstract inputs, once per chunk size, and prints XLA's memory analysis of
each executable: the temporaries (activations, logits and their gradients)
and the peak, arguments + outputs - donated aliases + temporaries, per
device. The default config is the LLaMA layout at the `tiny` width with a
128k vocabulary, sequence 1024 and batch 2: small enough to compile on a
laptop CPU in seconds, with logits (2 x 1024 x 131072 float32 = 1 GiB) that
dwarf everything else, so the table shows what chunking saves.

It measures the compiler's plan for this machine's backend, not a run: on
another backend (GPU, TPU) the figures differ, the ratio less so.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/llama.py:tiny',
                                          'Config file, e.g. configs/llama.py:small.')
_CHUNKS = flags.DEFINE_string('chunk_sizes', 'none,256,64',
                              'Comma-separated train.loss_chunk_size values; none = unchunked.')

# The large-vocabulary setting the table is about, unless overridden.
DEFAULTS = {('model', 'vocab_size'): 131072, ('train', 'seq_len'): 1024,
            ('train', 'global_batch_size'): 2, ('train', 'grad_accum_steps'): 1}


def compiled_memory(cfg):
  """XLA's memory analysis of the compiled train step: a dict of bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import optim  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  from train import step as step_lib  # pylint: disable=g-import-not-at-top

  t = cfg.train
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, schedule = optim.make_optimizer(t, cfg.model)
  graphdef, _, abstract_state, shardings = step_lib.train_state_spec(
      lambda: model.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh, t.seed)
  train_step = step_lib.make_train_step(
      step_lib.lm_loss(t), optimizer, graphdef=graphdef, state_shardings=shardings,
      mesh=mesh, grad_accum_steps=t.grad_accum_steps, schedule=schedule)
  shape, rows = (t.global_batch_size, t.seq_len), sharding.batch_sharding(mesh)
  spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  batch = {'inputs': spec(jnp.int32), 'targets': spec(jnp.int32),
           'segment_ids': spec(jnp.int32), 'positions': spec(jnp.int32),
           'loss_mask': spec(jnp.float32)}
  stats = train_step.lower(abstract_state, batch).compile().memory_analysis()
  out = {k: getattr(stats, k + '_size_in_bytes') for k in
         ('argument', 'output', 'alias', 'temp')}
  out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def main(argv):
  del argv
  import configs  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  given = {tuple(a[len('--config.'):].split('=')[0].split('.')) for a in sys.argv
           if a.startswith('--config.')}
  for (section, field), value in DEFAULTS.items():
    if (section, field) not in given:
      cfg[section][field] = value
  configs.validate(cfg)
  t, m = cfg.train, cfg.model
  logits_mib = t.global_batch_size * t.seq_len * m.vocab_size * 4 / 2**20
  rows = []
  for text in _CHUNKS.value.split(','):
    chunk = None if text.strip().lower() == 'none' else int(text)
    run = cfg.copy_and_resolve_references()
    run.train.loss_chunk_size = chunk
    configs.validate(run)
    mem = compiled_memory(run)
    rows.append((str(chunk), mem))

  print(f'vocab {m.vocab_size}, d_model {m.d_model}, layers {m.num_layers}, '
        f'seq {t.seq_len}, batch {t.global_batch_size}; float32 logits alone: '
        f'{logits_mib:,.0f} MiB')
  print(f'{"loss_chunk_size":>15} {"temp MiB":>10} {"peak MiB":>10} {"peak / unchunked":>17}')
  base = rows[0][1]['peak']
  for chunk, mem in rows:
    print(f'{chunk:>15} {mem["temp"] / 2**20:>10,.0f} {mem["peak"] / 2**20:>10,.0f} '
          f'{mem["peak"] / base:>17.2f}')
  print('command: python ' + ' '.join(sys.argv))


if __name__ == '__main__':
  app.run(main)
