"""Supervised fine-tuning (SFT) of a pretrained LLaMA-style model: loss on responses only.

The middle step of pretrain -> SFT -> DPO, each from the previous workdir:

    python -m train --config configs/llama.py:tiny --workdir /tmp/pre
    python -m train --config configs/sft.py:tiny --workdir /tmp/sft \\
        --config.train.init_checkpoint=/tmp/pre
    python -m align --config configs/dpo.py:tiny --workdir /tmp/dpo \\
        --config.dpo.init_checkpoint=/tmp/sft

Sizes `tiny` (default) and `small` take the model of `configs/llama.py` of the
same size, which must match the init run's `config.json`. The examples are the
built-in ones (`data.train_files=builtin`: a stdlib passage as the prompt, its
true continuation as the response, the (prompt, chosen) halves of the DPO
stage's built-in pairs); give JSONL globs of `{"prompt", "response"}` or
`{"messages": [...]}` lines for your own (`docs/data.md`). Only the parameters
of the init checkpoint are loaded: the optimizer, step and schedule start
fresh, and `eval/loss` is the loss on response tokens only.

Observed on a 2-core CPU (`tiny`, from the 200-step `llama.py:tiny`
pretraining; about 40 s): `eval/loss` on held-out responses 2.74 at step 0
(the pretrained model) and 2.69 / 2.66 / 2.63 / 2.61 at steps 25 / 50 / 75 /
100. The DPO stage from this workdir (`configs/dpo.py:tiny`) then reached a
held-out `dpo_eval/reward_accuracy` of 0.62 / 0.61 / 0.67 / 0.68 at steps 50 /
100 / 150 / 200 (eval loss 0.562).
"""

from configs import llama

SFT_TRAIN = {
    'tiny': dict(steps=100, global_batch_size=8, learning_rate=1e-3, warmup_steps=10,
                 eval_every_steps=25, eval_steps=8, checkpoint_every_steps=50,
                 log_every_steps=10),
    'small': dict(steps=500, global_batch_size=16, learning_rate=3e-4, warmup_steps=50,
                  eval_every_steps=100, eval_steps=8, checkpoint_every_steps=100,
                  log_every_steps=10),
}


def get_config(arg=None):
  size = arg or 'tiny'
  config = llama.get_config(size)
  for field, value in SFT_TRAIN.get(size, SFT_TRAIN['tiny']).items():
    config.train[field] = value
  config.train.lr_schedule = 'cosine'
  config.train.weight_decay = 0.0
  config.train.init_checkpoint = ''   # the pretraining workdir (empty: from scratch)
  d = config.data
  d.source = 'sft'
  d.train_files = 'builtin'
  d.eval_files = 'builtin'
  d.packing = True
  return config
