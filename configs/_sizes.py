"""The sizes shared by the family presets: `tiny` (the default) and `small`.

A preset lists its model shape per size; `apply` picks the one named by the
config argument (`configs/llama.py:small`), sets it with the size's training
settings, and refuses unknown sizes with the list of known ones.

- `tiny` runs the whole training loop on a laptop CPU in a minute or two (and
  is what tests and CI use): d_model 64, 2 layers, 128-token rows, batch 8.
- `small` (about 10-30M parameters) is for one accelerator: on a 2-core CPU a
  step takes 5-7 s, so its 2000 steps take hours (`docs/benchmarks.md`).
"""

from configs import ConfigError

TRAIN = {
    'tiny': dict(seq_len=128, global_batch_size=8, steps=200, learning_rate=3e-3,
                 warmup_steps=20),
    'small': dict(seq_len=256, global_batch_size=16, steps=2000, learning_rate=1e-3,
                  warmup_steps=100),
}
MAX_SEQ_LEN = {'tiny': 128, 'small': 256}


def apply(config, arg, shapes):
  """Sets `config.model` to `shapes[size]` and the size's train settings; returns size."""
  size = arg or 'tiny'
  if size not in shapes:
    raise ConfigError(f'unknown size {size!r}: choose one of {", ".join(shapes)}')
  config.model.vocab_size = 320
  config.model.max_seq_len = MAX_SEQ_LEN[size]
  for field, value in shapes[size].items():
    config.model[field] = value
  for field, value in TRAIN[size].items():
    config.train[field] = value
  return size
