"""`python -m align`: DPO-train a pretrained workdir's model on preference pairs.

    python -m align --config configs/dpo.py:tiny --workdir /tmp/ablax_tiny_dpo \\
        --config.dpo.init_checkpoint=/tmp/ablax_tiny

Re-running with the same workdir resumes. Multi-process as `python -m train`
(`--coordinator_address`, `--num_processes`, `--process_id`, or
`python -m launch.local --module align`). The library function is
`align.loop.train_and_evaluate(cfg, workdir)`, the loop of `train.loop.run`
with the DPO objective.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/dpo.py:tiny.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, config.json '
                               'and TensorBoard event files of the DPO run go.')
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
  from align import loop  # pylint: disable=g-import-not-at-top
  from train import loop as train_loop  # pylint: disable=g-import-not-at-top
  from train import metrics  # pylint: disable=g-import-not-at-top
  metrics.configure_logging()
  cfg = _CONFIG.value
  configs.validate(cfg)
  summary = loop.train_and_evaluate(cfg, _WORKDIR.value)
  return train_loop.exit_status(summary)


def run():
  """The `ablax-dpo` console script."""
  errors.run(main)


if __name__ == '__main__':
  run()
