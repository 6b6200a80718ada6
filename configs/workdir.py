"""The config a workdir was run with (`DIR/config.json`), to go on from it.

    python -m model.hf import /path/to/hf_llama --workdir /tmp/imported
    python -m train --config configs/workdir.py:/tmp/imported --workdir /tmp/imported \\
        --config.train.steps=1000 --config.data.source=text \\
        --config.data.train_files='/data/books/*.txt'

`configs/workdir.py:DIR` starts from `configs/base.py` and sets every field
that `DIR/config.json` holds, so an imported Hugging Face model (any shape),
or any earlier run, trains on without restating its model on the command
line; `--config.*` overrides apply on top as usual. Re-running `train` on the
same workdir resumes from its newest checkpoint (an imported workdir's is step
0, with no data position: the data starts from the beginning). `configs/dpo.py:DIR`
does the same for the DPO stage, with `DIR` as the init checkpoint.
"""

import ml_collections

from configs import ConfigError
from configs import base


def apply_saved(config: ml_collections.ConfigDict, saved: dict, sections=None) -> None:
  """Sets the fields of `saved` (a loaded config.json) in `config`, in place.

  Only the top-level `sections` named (default: all); fields `config` lacks
  are added.
  """
  for section, values in saved.items():
    if sections is not None and section not in sections:
      continue
    if section not in config or not isinstance(values, dict):
      config[section] = values
      continue
    for field, value in values.items():
      config[section][field] = value


def read_saved(workdir: str) -> dict:
  """`DIR/config.json` as saved (`train.workdir.read_config_json`, its one reader)."""
  from train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  return workdir_lib.read_config_json(workdir)


def get_config(arg=None):
  if not arg:
    raise ConfigError('configs/workdir.py needs the workdir: '
                      '--config configs/workdir.py:DIR')
  config = base.get_config()
  apply_saved(config, read_saved(arg))
  return config
