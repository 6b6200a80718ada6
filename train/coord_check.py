"""The muP coordinate check: activation size against width, SP and muP.

    python -m train.coord_check --config configs/llama.py:tiny \\
        --widths 64,128,256,512,1024 --steps 5 --out /tmp/ablax_coord

Trains the config at each width (d_model = w, d_ff and the width of every
hidden layer scaled with it, heads fixed) for `--steps` updates of
`train.optimizer` at `train.learning_rate` (constant, no warmup) on the same
batches, under the standard parametrisation (SP) and under muP with
`model.mup_base_width` = the first width, and measures the RMS of each layer
type's output on a fixed batch after every update: the embedding output, the
attention and MLP branch outputs (mean over layers) and the logits. It writes
`DIR/coord_check.csv` (parametrisation, width, step, one column per layer
type), `DIR/coord_check.png` (RMS against width, one line per step, SP on
top, muP below) and prints the last step's table.

What a correct muP shows (Yang et al. 2022, Section 4 and Fig. 5): flat
curves under muP; under SP the logits and the branch outputs grow with width
after a few steps, because Adam moves every weight by about the learning
rate and a d-wide dot product adds d of those moves.

The activations are read by walking the decoder's own modules (embedding,
each block's norm -> attention and norm -> MLP, the head); the walk covers
pre-norm decoders without memory tokens and refuses others.
"""

import csv
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

import configs
from configs import cli
from configs import errors
import model as model_lib
from data import pipeline
from train import mesh as mesh_lib
from train import optim
from train import step as step_lib

FLAGS = flags.FlagValues()
flags.DEFINE_string('config', 'configs/llama.py:tiny', 'the config to scale: '
                    'configs/NAME.py[:ARG]; its d_model is replaced by each width',
                    flag_values=FLAGS)
flags.DEFINE_list('widths', ['64', '128', '256', '512', '1024'], 'd_model values, '
                  'comma-separated; the first is the muP base width', flag_values=FLAGS)
flags.DEFINE_integer('steps', 5, 'optimizer updates per width', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'the folder for coord_check.csv and coord_check.png',
                    flag_values=FLAGS)

LAYER_TYPES = ('embedding', 'attention', 'mlp', 'logits')
PARAMETRISATIONS = ('sp', 'mup')


def width_config(cfg, width: int, base: int, parametrisation: str):
  """`cfg` at d_model = width (d_ff and head_dim scaled), SP or muP."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  m = c.model
  ratio = width / m.d_model
  m.d_ff = int(round(m.d_ff * ratio))
  if m.get('moe_d_ff') is not None:
    m.moe_d_ff = int(round(m.moe_d_ff * ratio))
  if m.head_dim is not None:
    m.head_dim = int(round(m.head_dim * ratio))
  m.d_model = width
  m.mup_base_width = base if parametrisation == 'mup' else None
  c.train.lr_schedule = 'constant'
  c.train.warmup_steps = 0
  configs.validate(c)
  return c


class _Recorder:
  """Stands in for a block's sublayer during one eager forward: calls it and
  adds the RMS of its output (the first element of a tuple) to `sums[key]`."""

  def __init__(self, layer, sums: dict, key: str):
    self.layer, self.sums, self.key = layer, sums, key

  def __call__(self, *args, **kwargs):
    out = self.layer(*args, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    self.sums[self.key] += jnp.sqrt(jnp.mean(jnp.square(y.astype(jnp.float32))))
    return out


def activation_rms(decoder, tokens) -> dict:
  """RMS of each layer type's output on tokens [b, t] (see module docstring).

  The decoder runs its own forward (eagerly); each block's attention and MLP
  are wrapped by a `_Recorder` for the call, then put back.
  """
  rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  sums = {'attention': 0.0, 'mlp': 0.0}
  layers = [(block, block.attn, block.mlp) for block in decoder.blocks]
  try:
    for block, attn, mlp in layers:
      object.__setattr__(block, 'attn', _Recorder(attn, sums, 'attention'))
      object.__setattr__(block, 'mlp', _Recorder(mlp, sums, 'mlp'))
    logits, _ = decoder(tokens)
  finally:
    for block, attn, mlp in layers:
      object.__setattr__(block, 'attn', attn)
      object.__setattr__(block, 'mlp', mlp)
  out = {'embedding': rms(decoder.embed_tokens(tokens, positions))}
  out.update({key: value / len(layers) for key, value in sums.items()})
  out['logits'] = rms(logits)
  return out, logits


def check_supported(cfg) -> None:
  if cfg.model.norm_position != 'pre' or cfg.model.num_memory_tokens:
    raise configs.ConfigError(
        'train.coord_check walks pre-norm decoders without memory tokens: set '
        f'model.norm_position=pre (now {cfg.model.norm_position!r}) and '
        f'model.num_memory_tokens=0 (now {cfg.model.num_memory_tokens})')


def run_width(cfg, batches, steps: int) -> list[dict]:
  """[{layer type: RMS}] after 0 .. steps updates, on batches[0]."""
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({'data': 1}), jax.devices()[:1])
  optimizer, schedule = optim.make_optimizer(cfg.train, cfg.model)
  graphdef, state, shardings = step_lib.create_train_state(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(cfg.train.seed)),
      optimizer, mesh, cfg.train.seed)
  train_step = step_lib.make_train_step(
      step_lib.lm_loss(cfg.train), optimizer, graphdef=graphdef,
      state_shardings=shardings, mesh=mesh, schedule=schedule)

  @jax.jit
  def measure(params, model_state, tokens):
    return activation_rms(nnx.merge(graphdef, params, model_state), tokens)[0]

  probe = jnp.asarray(batches[0]['inputs'])
  rows = []
  for n in range(steps + 1):
    if n:
      state, _ = train_step(state, batches[(n - 1) % len(batches)])
    rows.append({k: float(v) for k, v in jax.device_get(
        measure(state['params'], state['model_state'], probe)).items()})
  return rows


def coord_check(cfg, widths, steps: int) -> list[dict]:
  """Rows {parametrisation, width, step, <layer type>: RMS} for every width."""
  check_supported(cfg)
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  # It records each block of an unrolled decoder; `model.scan_layers` is a
  # performance switch (the same weights and losses), so it runs unrolled.
  cfg.model.scan_layers = False
  iterator = pipeline.make_iterator(cfg, 'train')
  batches = [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(steps)]
  iterator.close()
  rows = []
  for parametrisation in PARAMETRISATIONS:
    for width in widths:
      c = width_config(cfg, width, widths[0], parametrisation)
      for n, rms in enumerate(run_width(c, batches, steps)):
        rows.append({'parametrisation': parametrisation, 'width': width, 'step': n, **rms})
  return rows


def write(rows, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'coord_check.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['parametrisation', 'width', 'step', *LAYER_TYPES])
    writer.writeheader()
    writer.writerows(rows)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = sorted({r['step'] for r in rows})
  fig, axes = plt.subplots(2, len(LAYER_TYPES), figsize=(4 * len(LAYER_TYPES), 7),
                           sharex=True)
  for i, parametrisation in enumerate(PARAMETRISATIONS):
    for j, layer in enumerate(LAYER_TYPES):
      ax = axes[i][j]
      for n in steps:
        pts = sorted((r['width'], r[layer]) for r in rows
                     if r['parametrisation'] == parametrisation and r['step'] == n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o',
                color=plt.cm.viridis(n / max(steps[-1], 1)), label=f'step {n}')
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_title(f'{parametrisation.upper()}: {layer}')
      if i == 1:
        ax.set_xlabel('width (d_model)')
      if j == 0:
        ax.set_ylabel('activation RMS')
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'coord_check.png'), dpi=90)
  plt.close(fig)


def table(rows) -> str:
  last = max(r['step'] for r in rows)
  lines = [f'{"param":5s} {"width":>6s} ' + ' '.join(f'{k:>10s}' for k in LAYER_TYPES)
           + f'   (activation RMS after {last} steps)']
  for r in rows:
    if r['step'] == last:
      lines.append(f'{r["parametrisation"]:5s} {r["width"]:6d} '
                   + ' '.join(f'{r[k]:10.4f}' for k in LAYER_TYPES))
  return '\n'.join(lines)


def main(argv=None) -> int:
  """`python -m train.coord_check ARGS` (argv without the program name)."""
  args = cli.parse(FLAGS, argv, doc=__doc__, prog='python -m train.coord_check',
                   required=('out',), overrides=True)
  try:
    widths = [int(w) for w in args.widths]
  except ValueError:
    raise cli.UsageError(f'--widths={",".join(args.widths)}: give comma-separated '
                         'integers, e.g. 64,128,256') from None
  if not widths or any(w <= 0 for w in widths) or args.steps < 1:
    raise cli.UsageError('--widths must be positive integers and --steps >= 1')
  cfg = configs.load(args.config, args.overrides)
  rows = coord_check(cfg, widths, args.steps)
  write(rows, args.out)
  print(table(rows))
  print(f'wrote {args.out}/coord_check.csv and coord_check.png')
  return 0


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
