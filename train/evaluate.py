"""Loss and perplexity of a workdir's checkpoint: `python -m train.evaluate`.

    python -m train.evaluate --workdir /tmp/ablax_tiny
    python -m train.evaluate --workdir /tmp/ablax_tiny --checkpoint 100 --eval_steps 20

Reads `DIR/config.json` (the model and the data it was trained with), restores
only the parameters of the newest checkpoint (or `--checkpoint STEP`), and
runs the trainer's eval step over `train.eval_steps` batches of the eval split
(`--split train` for the training data): the same numbers as the run's
`eval/loss` and `eval/perplexity` at that step.
"""

import json
import os
import sys

import jax
import ml_collections
from absl import app
from absl import flags
from flax import nnx

import configs
import model as model_lib
from data import pipeline
from train import checkpoint as checkpoint_lib
from train import loop
from train import mesh as mesh_lib
from train import optim
from train import sharding
from train import step as step_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_CHECKPOINT = flags.DEFINE_integer('checkpoint', None,
                                   'Step to evaluate (default: the newest).')
_EVAL_STEPS = flags.DEFINE_integer('eval_steps', None,
                                   'Batches to average (default: train.eval_steps).')
_SPLIT = flags.DEFINE_enum('split', 'eval', ['eval', 'train'], 'Data split.')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise configs.ConfigError(f'{path} not found: not an ablax workdir')
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  configs.validate(cfg)
  return cfg


def _mesh(cfg):
  """The run's mesh if it fits these devices, else data parallel over all."""
  try:
    mesh = mesh_lib.make_mesh(cfg.mesh)
    sharding.check_batch(mesh, cfg.train.global_batch_size)
    return mesh
  except configs.ConfigError:
    return mesh_lib.make_mesh(ml_collections.ConfigDict({'data': -1}))


def evaluate(workdir: str, checkpoint: int | None = None, eval_steps: int | None = None,
             split: str = 'eval') -> dict:
  """{'step', 'loss', 'perplexity', 'tokens'} of a checkpoint of `workdir`."""
  cfg = load_config(workdir)
  if eval_steps is not None:
    cfg.train.eval_steps = eval_steps
  if split == 'eval' and not pipeline.has_eval(cfg):
    raise configs.ConfigError(f'{workdir} was trained without eval data '
                              '(data.eval_files); use --split train')
  mesh = _mesh(cfg)
  sharding.check_batch(mesh, cfg.train.global_batch_size)
  optimizer, _ = optim.make_optimizer(cfg.train)
  graphdef, _, abstract, shardings = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0)), optimizer, mesh,
      cfg.train.seed)
  keys = ['params'] + (['model_state'] if jax.tree.leaves(abstract['model_state']) else [])
  path = workdir if checkpoint is None else os.path.join(
      workdir, 'checkpoints', str(checkpoint))
  if not os.path.isdir(os.path.join(path, 'state')) and checkpoint is not None:
    directory = os.path.join(workdir, 'checkpoints')
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if (
        os.path.isdir(directory)) else []
    raise FileNotFoundError(f'no checkpoint {checkpoint} in {directory}; there are: '
                            f'{", ".join(map(str, steps)) or "none"}')
  restored, step = checkpoint_lib.restore_items(path, {k: abstract[k] for k in keys})
  state = {'params': restored['params'],
           'model_state': restored.get('model_state', abstract['model_state'])}
  eval_step = step_lib.make_eval_step(
      step_lib.lm_loss(cfg.train), graphdef=graphdef,
      state_shardings={k: shardings[k] for k in ('params', 'model_state')}, mesh=mesh)

  batch_sharding = sharding.batch_sharding(mesh)
  process = (jax.process_index(), jax.process_count())
  if split == 'eval':
    batches = pipeline.make_iterator(cfg, 'eval', *process)
  else:
    train_iter = pipeline.make_iterator(cfg, 'train', *process)
    batches = [next(train_iter) for _ in range(cfg.train.eval_steps)]
    train_iter.close()
  means = step_lib.eval_metrics(
      eval_step, state, (loop.global_batch(b, batch_sharding) for b in batches))
  return {'step': step, 'loss': means['loss'], 'perplexity': means['perplexity'],
          'tokens': int(means['weight'])}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  from train import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()
  loop.configure_logging()
  try:
    result = evaluate(_WORKDIR.value, _CHECKPOINT.value, _EVAL_STEPS.value, _SPLIT.value)
  except (configs.ConfigError, FileNotFoundError) as e:
    sys.exit(f'ablax: {e}')
  if jax.process_index() == 0:
    print(f'{_WORKDIR.value} step {result["step"]}: {_SPLIT.value} loss '
          f'{result["loss"]:.4f} | perplexity {result["perplexity"]:.2f} | '
          f'{result["tokens"]:,} target tokens')


if __name__ == '__main__':
  app.run(main)
