"""DPO (Rafailov et al. 2023) on top of a pretrained LLaMA-style model.

Two steps, the second from the first one's workdir:

    python -m train --config configs/llama.py:tiny --workdir /tmp/ablax_tiny
    python -m align --config configs/dpo.py:tiny --workdir /tmp/ablax_tiny_dpo \\
        --config.dpo.init_checkpoint=/tmp/ablax_tiny

Sizes `tiny` (default) and `small` take the model of `configs/llama.py` of the
same size, which must match the init run's `config.json`. The pairs are the
built-in ones (`dpo.train_files=builtin`; give JSONL globs for your own).
At step 0 the loss is ln 2 = 0.693 and the rewards are 0. Observed on CPU
(`tiny`, after the 200-step `llama.py:tiny` pretraining): held-out
`dpo_eval/reward_accuracy` 0.59 / 0.67 / 0.70 / 0.71 at steps 50 / 100 / 150 /
200 (128 eval pairs), eval loss 0.532, chosen log-probs 5.3 nats (of about 64
tokens) below the reference's.

The loss is DPO's (`dpo.loss=sigmoid`); `--config.dpo.loss=` also takes `ipo`,
`hinge`, `robust`, `rpo`, and the reference-free `simpo` (give it
`--config.dpo.beta=2.0`) and `orpo` (docs/dpo.md: formulas, papers, figures).

A workdir instead of a size takes that run's model and tokenizer from its
`config.json` and makes it the init checkpoint: the way to DPO-train a model
`python -m model.hf import` brought in (any model shape, no overrides):

    python -m model.hf import /path/to/hf_llama --workdir /tmp/imported
    python -m align --config configs/dpo.py:/tmp/imported --workdir /tmp/imported_dpo

(rows of at most 256 tokens, half of them prompt, with the `tiny` schedule).
"""

import os

from configs import ConfigError
from configs import llama
from configs import workdir as workdir_config

DPO_TRAIN = {
    'tiny': dict(steps=200, global_batch_size=16, learning_rate=3e-4, warmup_steps=10,
                 eval_every_steps=50, eval_steps=8, checkpoint_every_steps=100,
                 log_every_steps=10),
    'small': dict(steps=500, global_batch_size=16, learning_rate=1e-4, warmup_steps=50,
                  eval_every_steps=100, eval_steps=8, checkpoint_every_steps=100,
                  log_every_steps=10),
}


def _from_workdir(config, workdir: str) -> None:
  """The model and tokenizer of the run in `workdir`, its init checkpoint."""
  saved = workdir_config.read_saved(workdir)
  workdir_config.apply_saved(config, saved, sections=('model',))
  config.data.tokenizer = saved['data']['tokenizer']
  config.dpo.init_checkpoint = os.path.abspath(workdir)
  # Imported models may allow 128k positions; preference rows stay short.
  config.dpo.max_len = min(config.model.max_seq_len, 256)
  config.dpo.max_prompt_len = config.dpo.max_len // 2


def get_config(arg=None):
  size = arg or 'tiny'
  workdir = None
  if size not in DPO_TRAIN:
    if not os.path.isfile(os.path.join(os.path.expanduser(size), 'config.json')):
      raise ConfigError(f'configs/dpo.py:{size}: neither a size ({", ".join(DPO_TRAIN)}) '
                        'nor an ablax workdir (a folder with config.json)')
    workdir, size = os.path.expanduser(size), 'tiny'
  config = llama.get_config(size)
  for field, value in DPO_TRAIN.get(size, DPO_TRAIN['tiny']).items():
    config.train[field] = value
  config.train.lr_schedule = 'cosine'
  config.train.weight_decay = 0.0
  # Every other `dpo.*` default is configs/base.py's (docs/dpo.md);
  # `dpo.init_checkpoint` (the pretraining workdir) is required.
  config.dpo.max_len = config.model.max_seq_len
  if workdir is not None:
    _from_workdir(config, workdir)
  return config
