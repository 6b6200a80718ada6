"""`python -m train`: train a config in a workdir (resuming if it holds checkpoints).

    python -m train --config configs/llama.py:tiny --workdir /tmp/ablax_tiny
    python -m train --config configs/llama.py:small --workdir /tmp/s \\
        --config.train.steps=500 --config.mesh.fsdp=-1 --config.mesh.data=1

Multi-process (one process per host; or set the JAX_* environment variables,
or run under Slurm / Open MPI / a Cloud TPU pod, which are detected):

    python -m train ... --coordinator_address=HOST:1234 --num_processes=2 --process_id=0

The library function is `train.loop.train_and_evaluate(cfg, workdir)`. A user
error exits with status 2 and one `ablax: ...` line (`--debug` shows the
traceback); the exit statuses are listed in `configs/errors.py` and
docs/training.md.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/llama.py:tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, config.json '
                               'and TensorBoard event files go.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Multi-process: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Multi-process: the index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Before anything touches a device.
  from train import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  import configs  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  from train import metrics  # pylint: disable=g-import-not-at-top
  metrics.configure_logging()
  cfg = _CONFIG.value
  configs.validate(cfg)
  summary = loop.train_and_evaluate(cfg, _WORKDIR.value)
  return loop.exit_status(summary)


def run():
  """The `ablax-train` console script."""
  errors.run(main)


if __name__ == '__main__':
  run()
