"""configs.validate refuses each bad field with a ConfigError naming it."""

import re

import pytest

import configs

# (overrides on configs/llama.py:tiny, the field the message must name)
BAD = [
    (['model.norm_type=batchnorm'], 'model.norm_type'),
    (['model.dtype=float64'], 'model.dtype'),
    (['model.d_model=0'], 'model.d_model'),
    (['model.num_layers=-1'], 'model.num_layers'),
    (['model.num_kv_heads=3'], 'model.num_kv_heads'),
    (['model.head_dim=-2'], 'model.head_dim'),
    (['model.rope_theta=0.0'], 'model.rope_theta'),
    (['model.rope_scaling={"type": "cubic", "factor": 2.0}'], 'model.rope_scaling.type'),
    (['model.rope_scaling={"type": "yarn", "factor": 4.0}'],
     'model.rope_scaling.original_max_seq_len'),
    (['model.position=alibi', 'model.rope_scaling={"type": "linear", "factor": 2.0}'],
     'model.rope_scaling'),
    (['model.norm_eps=0.0'], 'model.norm_eps'),
    (['model.attn_logit_softcap=-1.0'], 'model.attn_logit_softcap'),
    (['model.sliding_window=0'], 'model.sliding_window'),
    (['model.global_layer_interval=2'], 'model.global_layer_interval'),
    (['model.num_memory_tokens=-1'], 'model.num_memory_tokens'),
    (['model.attention_block_q=12'], 'model.attention_block_q'),
    (['model.num_experts=-1'], 'model.num_experts'),
    (['model.num_experts=4', 'model.experts_per_token=5'], 'model.experts_per_token'),
    (['model.num_experts=4', 'model.moe_capacity_factor=0.0'], 'model.moe_capacity_factor'),
    (['train.steps=0'], 'train.steps'),
    (['train.grad_accum_steps=3'], 'train.grad_accum_steps'),
    (['train.learning_rate=0.0'], 'train.learning_rate'),
    (['train.min_lr_ratio=1.5'], 'train.min_lr_ratio'),
    (['train.warmup_steps=-1'], 'train.warmup_steps'),
    (['train.adam_b1=1.0'], 'train.adam_b1'),
    (['train.eval_steps=-1'], 'train.eval_steps'),
    (['train.lr_schedule=step'], 'train.lr_schedule'),
    (['mesh.data=0'], 'mesh.data'),
    (['mesh.data=-1', 'mesh.fsdp=-1'], 'mesh.fsdp'),
    (['data.source=web'], 'data.source'),
    (['data.tokenizer=gpt2'], 'data.tokenizer'),
    (['dpo.loss=kto'], 'dpo.loss'),
    (['dpo.beta=0.0'], 'dpo.beta'),
    (['dpo.label_smoothing=0.5'], 'dpo.label_smoothing'),
    (['dpo.loss=ipo', 'dpo.label_smoothing=0.1'], 'dpo.label_smoothing'),
    (['dpo.nll_weight=-1.0'], 'dpo.nll_weight'),
    (['dpo.simpo_gamma=-0.5'], 'dpo.simpo_gamma'),
    (['dpo.loss=simpo', 'dpo.precompute_reference=True'], 'dpo.precompute_reference'),
    (['dpo.reference_free=True', 'dpo.precompute_reference=True'],
     'dpo.precompute_reference'),
]


@pytest.mark.parametrize('overrides,field', BAD, ids=[' '.join(o) for o, _ in BAD])
def test_bad_field_is_refused_naming_it(overrides, field):
  with pytest.raises(configs.ConfigError, match=re.escape(field)):
    configs.load('configs/llama.py:tiny', overrides)


def test_the_same_fields_with_good_values_load():
  # Each bad row's neighbour: the check must not refuse valid values.
  configs.load('configs/llama.py:tiny', [
      'model.num_kv_heads=1', 'model.rope_scaling={"type": "yarn", "factor": 4.0, '
      '"original_max_seq_len": 64}', 'model.sliding_window=8',
      'model.global_layer_interval=2', 'model.num_memory_tokens=2',
      'train.grad_accum_steps=2', 'mesh.data=-1', 'dpo.loss=robust',
      'dpo.label_smoothing=0.2', 'dpo.nll_weight=0.0', 'dpo.simpo_gamma=0.0'])
  configs.load('configs/llama.py:tiny', ['dpo.loss=simpo', 'dpo.beta=2.0'])
