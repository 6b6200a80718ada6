"""Hugging Face checkpoints <-> ablax models: config and tensors, both ways.

    python -m model.hf import HF_DIR --workdir DIR [--overwrite]
        a local Hugging Face folder (config.json + *.safetensors) -> a new
        ablax workdir (config.json + checkpoints/0) to train, sample or
        evaluate from
    python -m model.hf export DIR --out HF_DIR [--step STEP]
        an ablax workdir's newest (or STEP) checkpoint -> a folder that
        transformers' AutoModelForCausalLM.from_pretrained loads

From Python, the model alone (no workdir):

    cfg, decoder = model.hf.load(HF_DIR)      # cfg.model + an nnx Decoder
    model.hf.save(cfg, decoder, HF_DIR)       # loadable by transformers

This module maps a Hugging Face config and tensors to an ablax `config.model`
and parameters, and back; it knows nothing of training. Writing and reading
workdirs (the command line above) is `train/hf_workdir.py`'s.

Families (by `model_type`): llama (Llama 3 `llama3` and `linear` RoPE
scaling), mistral (sliding window), qwen2 (biases on q/k/v only: ablax's
`use_bias` with zero output and MLP biases, which computes the same), qwen3
(QK-norm), gemma2 (sandwich norms, soft-caps, alternating local/global layers,
embedding scale, `query_pre_attn_scalar`; Gemma's RMSNorm multiplies by
`1 + w`, so norm weights gain 1 on import and lose it on export), gpt2
(learned positions, LayerNorm, biases, Conv1D [in, out] weights), mixtral and
qwen3_moe (routed experts onto `model/moe.py`), mpt (ALiBi, LayerNorm without
bias, no biases, fused Wqkv; `attn_config.softmax_scale` -> `attn_scale`) and
bloom (ALiBi, `embedding_norm` for word_embeddings_layernorm, biases, GELU
tanh, query_key_value fused per head), and deepseek_v3 (MLA with DeepSeek's
interleaved rope columns permuted to ablax's half-split layout, the sigmoid
group-limited router with its `e_score_correction_bias` as the MoE selection
bias, shared experts, first dense layers; its MTP layers are dropped with a
warning), and diffllama (Llama with differential attention,
`attention_type='differential'`, lambda vectors mapped by name), qwen3_next
(Gated DeltaNet layers by `layer_types` with grouped value heads,
gated attention with partial rotary, MoE with a sigmoid-gated shared expert,
`1 + w` norms; `_qwen3_next_from_hf`), and gpt_oss
(biased GQA with learned sinks, sliding/full `layer_types`, YaRN with its
`truncate`, an MoE in every layer with a router bias, biased experts whose
fused gate_up_proj interleaves gate and up columns, and the clamped SwiGLU;
`_gpt_oss_from_hf`). An ablax
ALiBi model exports as bloom when `embedding_norm` is set, else as mpt; an MLA
model exports as deepseek_v3; a differential model with Llama's layout as
diffllama; one with Gated DeltaNet layers, an elementwise attention gate, a
gated shared expert or partial rotary as qwen3_next; a model with attention
sinks, the clamped SwiGLU or a router bias as gpt_oss.

The HF `config.json` is read as JSON; neither transformers nor torch is
needed. Every field is either mapped to an ablax flag, known not to change the
computation (token ids, initialiser ranges, output switches), or refused with
an error naming it. Dropout fields are dropped with a warning (ablax trains
without dropout). Weights keep the dtype of the files, so HF -> ablax -> HF
gives back the same tensors bit for bit (Gemma's `1 + w` round trip is exact
whenever `1 + w` is representable, e.g. for the zero-initialised weights).
"""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import configs
from configs import base as base_config
from model import decoder as decoder_lib
from model import gdn as gdn_lib
from model import moe as moe_lib


class HFError(configs.UserError):
  """A Hugging Face folder or config that ablax cannot map."""


# Fields that do not change what the network computes.
NEUTRAL_FIELDS = {
    'architectures', 'model_type', 'transformers_version', 'dtype', 'torch_dtype',
    'bos_token_id', 'eos_token_id', 'pad_token_id', 'sep_token_id',
    'decoder_start_token_id', 'initializer_range', 'use_cache', 'output_attentions',
    'output_hidden_states', 'return_dict', '_name_or_path', 'id2label', 'label2id',
    'problem_type', 'chunk_size_feed_forward', 'output_router_logits',
    'router_aux_loss_coef', 'pretraining_tp', 'tokenizer_class', 'prefix',
    'task_specific_params', 'finetuning_task', 'torchscript', 'tf_legacy_loss',
    'use_bfloat16', 'pruned_heads', 'cross_attention_hidden_size',
    'reorder_and_upcast_attn', 'summary_activation', 'summary_first_dropout',
    'summary_proj_to_labels', 'summary_type', 'summary_use_proj', 'n_ctx',
    'generation_config', 'is_decoder', 'keys_to_ignore_at_inference',
}
DROPOUT_FIELDS = {'attention_dropout', 'attn_pdrop', 'embd_pdrop', 'resid_pdrop',
                  'hidden_dropout', 'mlp_dropout', 'emb_pdrop'}

ARCHITECTURES = {
    'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
    'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
    'gemma2': 'Gemma2ForCausalLM', 'gpt2': 'GPT2LMHeadModel',
    'mixtral': 'MixtralForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM',
    'mpt': 'MptForCausalLM', 'bloom': 'BloomForCausalLM',
    'deepseek_v3': 'DeepseekV3ForCausalLM', 'diffllama': 'DiffLlamaForCausalLM',
    'qwen3_next': 'Qwen3NextForCausalLM',
    'gpt_oss': 'GptOssForCausalLM',
}
ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu': 'gelu', 'relu': 'relu',
               'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
               'gelu_fast': 'gelu_tanh',
               # GPT-OSS's experts (`_gpt_oss_from_hf`; no HF hidden_act names it).
               'clamped_swiglu': 'clamped_swiglu'}


class _Fields:
  """Reads an HF config dict; `finish` refuses any field no one consumed."""

  def __init__(self, hf: dict, family: str):
    self.hf, self.family, self.used = hf, family, set()

  def get(self, name, default=None):
    self.used.add(name)
    return self.hf.get(name, default)

  def require(self, name):
    self.used.add(name)
    if self.hf.get(name) is None:
      raise HFError(f'{self.family} config.json: field {name!r} is missing')
    return self.hf[name]

  def expect(self, name, allowed, why):
    """A field accepted only at values that match what ablax computes."""
    value = self.get(name)
    if value not in allowed:
      raise HFError(f'{self.family} config.json: {name}={value!r} is not supported '
                    f'by ablax ({why})')
    return value

  def finish(self):
    for name in sorted(self.hf):
      if name in self.used or name in NEUTRAL_FIELDS:
        continue
      if name in DROPOUT_FIELDS:
        if self.hf[name]:
          logging.warning('HF field %s=%r dropped: ablax has no dropout', name,
                          self.hf[name])
        continue
      raise HFError(f'{self.family} config.json: field {name!r} (= {self.hf[name]!r}) '
                    'has no ablax mapping')


def _rope(f: _Fields, m):
  """RoPE theta and scaling from `rope_parameters` (transformers 5) or the
  older `rope_theta` + `rope_scaling` fields."""
  params = dict(f.get('rope_parameters') or {})
  legacy = f.get('rope_scaling')
  if legacy:
    params.update(legacy)
  theta = params.pop('rope_theta', None)
  if theta is None:
    theta = f.get('rope_theta', 10000.0)
  else:
    f.get('rope_theta')
  m.rope_theta = float(theta)
  kind = params.pop('rope_type', params.pop('type', 'default'))
  if kind == 'default':
    scaling = None
  elif kind == 'linear':
    scaling = {'type': 'linear', 'factor': float(params.pop('factor'))}
  elif kind == 'llama3':
    scaling = {'type': 'llama3', 'factor': float(params.pop('factor')),
               'low_freq_factor': float(params.pop('low_freq_factor')),
               'high_freq_factor': float(params.pop('high_freq_factor')),
               'original_max_seq_len': int(params.pop('original_max_position_embeddings'))}
  else:
    raise HFError(f'{f.family} config.json: rope_type {kind!r} is not supported '
                  '(ablax imports default, linear, llama3)')
  if params:
    raise HFError(f'{f.family} config.json: rope parameter(s) {sorted(params)} '
                  'have no ablax mapping')
  m.rope_scaling = scaling
  m.position = 'rope'


def _layer_types(f: _Fields, num_layers, allowed):
  types = f.get('layer_types')
  if types is not None and tuple(types) != tuple(allowed(i) for i in range(num_layers)):
    raise HFError(f'{f.family} config.json: layer_types={types!r} is not supported '
                  'by ablax (expected ' + ', '.join(allowed(i) for i in range(num_layers)) + ')')


def _llama_shape(f: _Fields, m, norm_eps: float = 1e-6):
  """The shape and norm fields every Llama-like config.json spells alike
  (hidden_size, heads with optional GQA and head_dim, intermediate_size,
  max_position_embeddings, RMSNorm pre-norm with rms_norm_eps)."""
  m.vocab_size = f.require('vocab_size')
  m.d_model = f.require('hidden_size')
  m.num_layers = f.require('num_hidden_layers')
  m.num_heads = f.require('num_attention_heads')
  m.num_kv_heads = f.get('num_key_value_heads') or m.num_heads
  m.head_dim = f.get('head_dim') or m.d_model // m.num_heads
  m.d_ff = f.require('intermediate_size')
  m.max_seq_len = f.require('max_position_embeddings')
  m.norm_type, m.norm_position = 'rmsnorm', 'pre'
  m.norm_eps = float(f.get('rms_norm_eps', norm_eps))


def hf_to_model_config(hf: dict):
  """(family, ablax `config.model`) from an HF config dict; raises HFError."""
  family = hf.get('model_type')
  if family not in ARCHITECTURES:
    raise HFError(f'unsupported model_type {family!r} (architectures '
                  f'{hf.get("architectures")!r}); ablax imports '
                  + ', '.join(sorted(ARCHITECTURES)))
  f = _Fields(hf, family)
  m = base_config.model_config()
  m.dtype, m.param_dtype = 'float32', 'float32'
  f.expect('is_encoder_decoder', (None, False), 'decoder-only')
  f.expect('add_cross_attention', (None, False), 'no cross-attention')
  f.expect('use_bidirectional_attention', (None, False), 'causal attention only')
  m.tie_embeddings = bool(f.get('tie_word_embeddings',
                                family in ('gpt2', 'gemma2', 'mpt', 'bloom')))
  if family in ('mpt', 'bloom'):
    act = _alibi_from_hf(f, m)
  elif family == 'deepseek_v3':
    act = _deepseek_v3_from_hf(f, m)
  elif family == 'qwen3_next':
    act = _qwen3_next_from_hf(f, m)
  elif family == 'gpt_oss':
    act = _gpt_oss_from_hf(f, m)
  elif family == 'gpt2':
    m.vocab_size = f.require('vocab_size')
    m.d_model = f.require('n_embd')
    m.num_layers = f.require('n_layer')
    m.num_heads = m.num_kv_heads = f.require('n_head')
    m.d_ff = f.get('n_inner') or 4 * m.d_model
    m.max_seq_len = f.require('n_positions')
    m.norm_type, m.norm_position = 'layernorm', 'pre'
    m.norm_eps = float(f.get('layer_norm_epsilon', 1e-5))
    m.position = 'learned'
    act = f.get('activation_function', 'gelu_new')
    m.mlp_gated, m.use_bias = False, True
    f.expect('scale_attn_weights', (None, True), 'attention is scaled by 1/sqrt(head_dim)')
    f.expect('scale_attn_by_inverse_layer_idx', (None, False), 'no per-layer scaling')
  else:
    _llama_shape(f, m)
    m.mlp_gated = True
    act = f.get('hidden_activation') if family == 'gemma2' else None
    act = act or f.get('hidden_act', 'silu')
    f.get('hidden_act')
    _rope(f, m)
    m.use_bias = False
    if family == 'qwen2':
      m.use_bias = True  # q/k/v biases; output and MLP biases stay zero
    elif family != 'llama':
      f.expect('attention_bias', (None, False), 'biases on q/k/v/o only come with '
               'model_type qwen2 or llama with mlp_bias')
    if family == 'llama':
      bias = bool(f.get('attention_bias', False))
      if bias != bool(f.get('mlp_bias', False)):
        raise HFError('llama config.json: attention_bias and mlp_bias must be equal '
                      '(ablax use_bias puts biases on every projection)')
      m.use_bias = bias
    if family in ('llama', 'mistral', 'mixtral', 'qwen2', 'qwen3', 'qwen3_moe', 'diffllama'):
      _layer_types(f, m.num_layers, lambda i: 'full_attention'
                   if family not in ('mistral', 'mixtral') or hf.get('sliding_window') is None
                   else 'sliding_attention')
    if family in ('mistral', 'mixtral'):
      m.sliding_window = f.get('sliding_window')
    if family in ('qwen2', 'qwen3', 'qwen3_moe'):
      f.expect('use_sliding_window', (None, False), "Qwen's max_window_layers windows")
      f.get('sliding_window'), f.get('max_window_layers')
    if family in ('qwen3', 'qwen3_moe'):
      m.qk_norm = True
    if family == 'diffllama':
      _diffllama_from_hf(f, m)
    if family == 'gemma2':
      m.norm_position, m.embedding_scale = 'sandwich', True
      m.sliding_window = f.require('sliding_window')
      m.global_layer_interval = 2
      _layer_types(f, m.num_layers,
                   lambda i: 'full_attention' if i % 2 else 'sliding_attention')
      m.attn_logit_softcap = f.get('attn_logit_softcapping')
      m.final_logit_softcap = f.get('final_logit_softcapping')
      m.attn_scale = float(f.require('query_pre_attn_scalar')) ** -0.5
    if family in ('mixtral', 'qwen3_moe'):
      m.num_experts = f.require('num_local_experts') if 'num_local_experts' in hf else f.require('num_experts')
      f.get('num_experts'), f.get('num_local_experts')
      m.experts_per_token = f.require('num_experts_per_tok')
      m.moe_capacity_factor = None
      if family == 'mixtral':
        m.moe_renormalize = True
        f.expect('router_jitter_noise', (None, 0, 0.0), 'no router noise')
      else:
        m.moe_renormalize = bool(f.get('norm_topk_prob', False))
        m.moe_d_ff = f.require('moe_intermediate_size')
        m.moe_layer_interval = f.get('decoder_sparse_step', 1)
        f.expect('mlp_only_layers', (None, []), 'dense layers only by decoder_sparse_step')
  if act not in ACTIVATIONS:
    raise HFError(f'{family} config.json: activation {act!r} has no ablax mapping')
  m.mlp_activation = ACTIVATIONS[act]
  f.finish()
  configs.validate_model(m)
  return family, m


def _diffllama_from_hf(f: _Fields, m):
  """DiffLlama: Llama with differential attention (model/differential.py).

  Its attention is ablax's layout (q/k/v/o of the usual shapes, the four
  lambda vectors, the per-head RMSNorm over 2 head_dim without a gain with
  eps `rms_norm_eps`, lambda_init from the 0-based layer index); its MLP has
  no biases, and `attention_bias` (biases on q/k/v/o only) is refused above.
  """
  m.attention_type = 'differential'
  f.get('lambda_std_dev')   # the lambda vectors' initialiser only
  if m.num_kv_heads % 2:
    raise HFError(f'diffllama config.json: num_key_value_heads={m.num_kv_heads} must be '
                  'even (DiffLlama splits the key/value heads in two halves)')


# -- Qwen3-Next (issue 17) --------------------------------------------------------


def _qwen3_next_from_hf(f: _Fields, m):
  """Qwen3-Next: Gated DeltaNet and gated-attention layers (`layer_types`),
  MoE with a sigmoid-gated shared expert. Returns the HF activation name.

  Its attention is Qwen3's with QK-norm, partial rotary (`partial_rotary_factor`
  -> `rope_fraction`; transformers' default 0.25 when absent) and q_proj
  emitting, per head, the query then an elementwise output gate
  (`attention_gate='elementwise'`). Its RMSNorms multiply by 1 + w (decoder,
  final and QK norms; not the GDN's gated norm). GDN layers: linear_num_key_heads
  q/k heads, linear_num_value_heads value heads (`gdn_num_v_heads`), conv
  activation `hidden_act` (ablax's is SiLU). MoE layers follow
  decoder_sparse_step and mlp_only_layers when they match ablax's
  moe_layer_interval and moe_first_dense_layers; the shared expert's width
  must be a multiple of moe_intermediate_size (`num_shared_experts`)."""
  fam = 'qwen3_next config.json'
  _llama_shape(f, m)
  layers = m.num_layers
  m.mlp_gated, m.use_bias = True, False
  f.expect('attention_bias', (None, False), 'Qwen3-Next projections have no biases')
  m.qk_norm, m.attention_gate = True, 'elementwise'
  # Qwen's window fields, which transformers' Qwen3-Next ignores: accepted off.
  f.expect('use_sliding_window', (None, False), "Qwen's max_window_layers windows")
  f.get('sliding_window'), f.get('max_window_layers')
  # The release's multi-token-prediction layer (`mtp.*` tensors): transformers
  # does not load it, nor does ablax (`load` drops the tensors with a warning).
  f.get('mtp_num_hidden_layers'), f.get('mtp_use_dedicated_embeddings')
  # partial_rotary_factor sits in rope_parameters (transformers 5) or at the
  # top level (the released config.json); `_rope` reads the rest.
  params = dict(f.hf.get('rope_parameters') or {})
  fraction = params.pop('partial_rotary_factor', None)
  top = f.get('partial_rotary_factor')
  fraction = fraction if fraction is not None else (0.25 if top is None else top)
  f.hf = dict(f.hf, rope_parameters=params)
  _rope(f, m)
  m.rope_fraction = float(fraction)
  # Layer kinds: layer_types, else every full_attention_interval-th is attention.
  types = f.get('layer_types')
  interval = f.get('full_attention_interval')
  if types is None:
    interval = interval or 4
    types = ['linear_attention' if (i + 1) % interval else 'full_attention'
             for i in range(layers)]
  letters = {'linear_attention': 'L', 'full_attention': 'A'}
  if len(types) != layers or any(x not in letters for x in types):
    raise HFError(f'{fam}: layer_types={types!r} must list linear_attention or '
                  f'full_attention for each of the {layers} layers')
  m.layer_pattern = _shortest_period(''.join(letters[x] for x in types))
  m.gdn_num_heads = f.require('linear_num_key_heads')
  m.gdn_num_v_heads = f.require('linear_num_value_heads')
  if m.gdn_num_v_heads % m.gdn_num_heads:
    raise HFError(f'{fam}: linear_num_value_heads={m.gdn_num_v_heads} is not a multiple '
                  f'of linear_num_key_heads={m.gdn_num_heads}')
  m.gdn_head_dim = f.require('linear_key_head_dim')
  m.gdn_v_head_dim = f.require('linear_value_head_dim')
  m.gdn_conv_width = f.get('linear_conv_kernel_dim') or 4
  act = f.get('hidden_act', 'silu')
  if 'L' in m.layer_pattern and ACTIVATIONS.get(act) != 'silu':
    raise HFError(f'{fam}: hidden_act={act!r} with linear_attention layers (it is also '
                  "the GDN convolution's activation, which is SiLU in ablax)")
  m.num_experts = f.get('num_experts') or 0
  step = f.get('decoder_sparse_step') or 1
  dense = list(f.get('mlp_only_layers') or [])
  for name in ('num_experts_per_tok', 'moe_intermediate_size', 'norm_topk_prob',
               'shared_expert_intermediate_size'):
    f.get(name)
  if not m.num_experts:
    return act
  m.experts_per_token = f.require('num_experts_per_tok')
  m.moe_d_ff = f.require('moe_intermediate_size')
  m.moe_renormalize = bool(f.get('norm_topk_prob', True))
  m.moe_capacity_factor = None
  m.moe_router = 'softmax'
  shared = f.require('shared_expert_intermediate_size')
  if shared <= 0 or shared % m.moe_d_ff:
    raise HFError(f'{fam}: shared_expert_intermediate_size={shared} must be a positive '
                  f'multiple of moe_intermediate_size={m.moe_d_ff} (ablax\'s shared '
                  'experts are num_shared_experts x moe_d_ff wide)')
  m.num_shared_experts = shared // m.moe_d_ff
  m.moe_shared_expert_gate = True
  want = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
  m.moe_layer_interval = step
  for k in range(layers):
    m.moe_first_dense_layers = k
    if [decoder_lib.is_moe_layer(m, i) for i in range(layers)] == want:
      return act
  raise HFError(f'{fam}: mlp_only_layers={dense!r} with decoder_sparse_step={step}: '
                'ablax makes the first moe_first_dense_layers layers dense and then '
                'every moe_layer_interval-th layer MoE; other sets of dense layers '
                'do not map')


def _qwen3_next_mtp_dropped(hf_dir, left):
  """The `mtp.*` tensors of a Qwen3-Next release (its MTP layer, which
  transformers skips too), with a warning; returns their names."""
  dropped = {k for k in left if k.startswith('mtp.')}
  if dropped:
    logging.warning('%s: %d multi-token-prediction tensors (mtp.*) dropped: ablax, like '
                    "transformers' Qwen3NextForCausalLM, does not load Qwen3-Next's MTP "
                    'layer', hf_dir, len(dropped))
  return dropped


def _shortest_period(letters: str) -> str:
  """The shortest prefix p with letters[i] == p[i % len(p)] (a layer_pattern)."""
  for n in range(1, len(letters) + 1):
    if all(c == letters[i % n] for i, c in enumerate(letters)):
      return letters[:n]
  return letters


def _qwen3_next_tensor_map(m, add, out, norm_in, norm_out):
  """Qwen3-Next tensors (transformers' names; experts stored per expert).

  q_proj rows: per head [query (h) | gate (h)]. in_proj_qkvz rows: per q/k
  head j, [q (dk) | k (dk) | v (r dv) | z (r dv)] with r = n_v / n_k, the r
  value heads j r .. j r + r - 1; in_proj_ba rows: per q/k head [b (r) | a (r)].
  conv1d.weight [channels, 1, K] over q | k | v; ablax's conv is [K, channels]."""
  d, n, kv = m.d_model, m.num_heads, m.num_kv_heads
  h = m.head_dim or d // n
  nk, dk, dv, kw = gdn_lib.dims(m)
  nv = gdn_lib.num_v_heads(m)
  r = nv // nk
  t = lambda w: w.T
  proj_in = lambda heads, dim: ((lambda w: w.T.reshape(d, heads, dim)),
                                (lambda w: w.reshape(d, heads * dim).T))
  add('embed.embedding', 'model.embed_tokens.weight')
  add('final_norm.scale', 'model.norm.weight', norm_in, norm_out)
  if not m.tie_embeddings:
    add('head', 'lm_head.weight', t, t)
  pattern = m.layer_pattern or 'A'
  for i in range(m.num_layers):
    p, q = f'blocks.{i}.', f'model.layers.{i}.'
    if pattern[i % len(pattern)] == 'L':
      a, s = p + 'attn.', q + 'linear_attn.'
      qkvz = 2 * dk + 2 * r * dv
      add((a + 'wq', a + 'wk', a + 'wv', a + 'wg'), s + 'in_proj_qkvz.weight',
          lambda w: (lambda x: (x[..., :dk], x[..., dk:2 * dk],
                                x[..., 2 * dk:2 * dk + r * dv].reshape(d, nv, dv),
                                x[..., 2 * dk + r * dv:].reshape(d, nv, dv)))(
                                    w.T.reshape(d, nk, qkvz)),
          lambda ws: np.concatenate([ws[0], ws[1], ws[2].reshape(d, nk, r * dv),
                                     ws[3].reshape(d, nk, r * dv)], axis=-1)
          .reshape(d, nk * qkvz).T)
      add((a + 'wb', a + 'wa'), s + 'in_proj_ba.weight',
          lambda w: (lambda x: (x[..., :r].reshape(d, nv), x[..., r:].reshape(d, nv)))(
              w.T.reshape(d, nk, 2 * r)),
          lambda ws: np.concatenate([ws[0].reshape(d, nk, r), ws[1].reshape(d, nk, r)],
                                    axis=-1).reshape(d, nk * 2 * r).T)
      add(a + 'conv', s + 'conv1d.weight', lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :])
      add(a + 'a_log', s + 'A_log')
      add(a + 'dt_bias', s + 'dt_bias')
      add(a + 'o_norm.scale', s + 'norm.weight')      # plain w (RMSNormGated)
      add(a + 'wo', s + 'out_proj.weight', lambda w: w.T.reshape(nv, dv, d),
          lambda w: w.reshape(nv * dv, d).T)
    else:
      a, s = p + 'attn.', q + 'self_attn.'
      add((a + 'wq', a + 'wg'), s + 'q_proj.weight',
          lambda w: tuple(np.split(w.T.reshape(d, n, 2 * h), 2, axis=-1)),
          lambda ws: np.concatenate(ws, axis=-1).reshape(d, n * 2 * h).T)
      add(a + 'wk', s + 'k_proj.weight', *proj_in(kv, h))
      add(a + 'wv', s + 'v_proj.weight', *proj_in(kv, h))
      add(a + 'wo', s + 'o_proj.weight', lambda w: w.T.reshape(n, h, d),
          lambda w: w.reshape(n * h, d).T)
      add(a + 'q_norm.scale', s + 'q_norm.weight', norm_in, norm_out)
      add(a + 'k_norm.scale', s + 'k_norm.weight', norm_in, norm_out)
    add(p + 'attn_norm.scale', q + 'input_layernorm.weight', norm_in, norm_out)
    add(p + 'mlp_norm.scale', q + 'post_attention_layernorm.weight', norm_in, norm_out)
    mlp_names = (('wi_gate', 'gate_proj'), ('wi_up', 'up_proj'), ('wo', 'down_proj'))
    if decoder_lib.is_moe_layer(m, i):
      add(p + 'mlp.router', q + 'mlp.gate.weight', t, t)
      for name, hf_name in zip(('w_gate', 'w_up', 'w_down'),
                               ('gate_proj', 'up_proj', 'down_proj')):
        out.append((p + 'mlp.' + name,
                    [q + f'mlp.experts.{e}.{hf_name}.weight' for e in range(m.num_experts)],
                    lambda ws: np.stack([w.T for w in ws]),
                    lambda w: [x.T for x in w]))
      for name, hf_name in mlp_names:
        add(p + 'mlp.shared.' + name, q + f'mlp.shared_expert.{hf_name}.weight', t, t)
      add(p + 'mlp.shared_gate', q + 'mlp.shared_expert_gate.weight',
          lambda w: w[0], lambda w: w[None])
    else:
      for name, hf_name in mlp_names:
        add(p + 'mlp.' + name, q + f'mlp.{hf_name}.weight', t, t)


def _is_qwen3_next(m) -> bool:
  """Whether an ablax model exports as Qwen3-Next: Gated DeltaNet layers, an
  elementwise attention gate, a gated shared expert or partial rotary (the
  export then refuses what Qwen3-Next does not have)."""
  return ('L' in (m.get('layer_pattern', '') or '')
          or m.get('attention_gate', 'none') == 'elementwise'
          or m.get('moe_shared_expert_gate', False)
          or m.get('rope_fraction', 1.0) != 1.0)


def _qwen3_next_to_hf(m, refuse):
  """The Qwen3Next config dict of an ablax model (see `_qwen3_next_from_hf`)."""
  why = '(Qwen3-Next has {})'
  pattern = m.get('layer_pattern', '') or 'A'
  # What sent the model here, named in the refusals of what Qwen3-Next lacks.
  trigger = ', '.join(x for x, on in (
      (f'layer_pattern={m.get("layer_pattern")!r}', 'L' in pattern),
      (f"attention_gate={m.get('attention_gate')!r}", m.get('attention_gate') == 'elementwise'),
      ('moe_shared_expert_gate=True', m.get('moe_shared_expert_gate', False)),
      (f"rope_fraction={m.get('rope_fraction')}", m.get('rope_fraction', 1.0) != 1.0)) if on)
  if (m.position, m.norm_type, m.norm_position, m.mlp_gated, m.use_bias) != (
      'rope', 'rmsnorm', 'pre', True, False):
    refuse(f'position={m.position!r}, norm_type={m.norm_type!r}, norm_position='
           f'{m.norm_position!r}, mlp_gated={m.mlp_gated}, use_bias={m.use_bias} for a '
           'Qwen3-Next export ' + why.format('rope, rmsnorm, pre, gated MLPs, no biases'))
  if not m.qk_norm or m.get('attention_gate', 'none') != 'elementwise':
    refuse(f"{trigger} with qk_norm={m.qk_norm}, attention_gate="
           f"{m.get('attention_gate', 'none')!r} (Gated DeltaNet layers, partial rotary and "
           'gated shared experts export as Qwen3-Next, whose attention has QK-norm and '
           "attention_gate='elementwise')")
  if m.get('attention_type', 'standard') != 'standard' or m.get('attention_sinks', False):
    refuse(f"attention_type={m.get('attention_type')!r} / attention_sinks with a "
           'Qwen3-Next export ' + why.format('standard attention without sinks'))
  for field in ('embedding_scale', 'embedding_norm', 'attn_logit_softcap',
                'final_logit_softcap', 'attn_scale', 'global_layer_interval',
                'sliding_window', 'mtp_depth', 'moe_router_bias'):
    if m.get(field) not in (None, False, 0):
      refuse(f'{field}={m.get(field)!r} with a Qwen3-Next export ' + why.format('none'))
  if ('L' in pattern and m.mlp_activation != 'silu') or m.mlp_activation == 'clamped_swiglu':
    refuse(f'mlp_activation={m.mlp_activation!r} with Gated DeltaNet layers (Qwen3-Next '
           "uses hidden_act for the GDN convolution too, which is SiLU in ablax)")
  nk, dk, dv, kw = gdn_lib.dims(m)
  h = m.head_dim or m.d_model // m.num_heads
  act = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'relu': 'relu'}
  rope, other = _rope_parameters(m)
  if other is not None:
    refuse(f'rope_scaling.type={other["type"]!r} (the Qwen3-Next export writes default, '
           'linear, llama3)')
  rope['partial_rotary_factor'] = float(m.get('rope_fraction', 1.0))
  hf = {'vocab_size': m.vocab_size, 'tie_word_embeddings': bool(m.tie_embeddings),
        'dtype': m.param_dtype, 'hidden_size': m.d_model, 'num_hidden_layers': m.num_layers,
        'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads,
        'head_dim': h, 'intermediate_size': m.d_ff,
        'max_position_embeddings': m.max_seq_len, 'rms_norm_eps': m.norm_eps,
        'hidden_act': act[m.mlp_activation], 'attention_bias': False,
        'rope_parameters': rope,
        'layer_types': ['linear_attention' if pattern[i % len(pattern)] == 'L'
                        else 'full_attention' for i in range(m.num_layers)],
        'linear_conv_kernel_dim': kw, 'linear_key_head_dim': dk,
        'linear_value_head_dim': dv, 'linear_num_key_heads': nk,
        'linear_num_value_heads': gdn_lib.num_v_heads(m),
        'num_experts': m.num_experts, 'num_experts_per_tok': m.experts_per_token,
        'moe_intermediate_size': m.moe_d_ff or m.d_ff,
        'shared_expert_intermediate_size': (m.moe_d_ff or m.d_ff) * m.num_shared_experts,
        'norm_topk_prob': bool(m.moe_renormalize),
        'decoder_sparse_step': m.moe_layer_interval,
        'mlp_only_layers': list(range(m.get('moe_first_dense_layers', 0))),
        'model_type': 'qwen3_next', 'architectures': [ARCHITECTURES['qwen3_next']]}
  if m.num_experts:
    for field, plain in (('moe_router', 'softmax'), ('moe_routed_scaling', 1.0),
                         ('moe_num_groups', 1), ('moe_capacity_factor', None)):
      if m.get(field, plain) != plain:
        refuse(f'{field}={m.get(field)!r} with a Qwen3-Next export (its experts are '
               'dropless, routed by a plain softmax top-k)')
    if not m.num_shared_experts or not m.get('moe_shared_expert_gate', False):
      refuse(f"num_shared_experts={m.num_shared_experts}, moe_shared_expert_gate="
             f"{m.get('moe_shared_expert_gate', False)} with a Qwen3-Next export (every "
             'Qwen3-Next MoE layer has one shared expert with a sigmoid gate)')
  elif m.get('moe_shared_expert_gate', False):
    refuse('moe_shared_expert_gate=True without experts')
  return hf


# -- end Qwen3-Next -----------------------------------------------------------------


def _alibi_from_hf(f: _Fields, m):
  """MPT and Bloom: ALiBi, pre-LayerNorm, a 4x plain MLP, full MHA. Returns
  the HF activation name."""
  m.norm_type, m.norm_position, m.position = 'layernorm', 'pre', 'alibi'
  m.norm_eps = float(f.get('layer_norm_epsilon', 1e-5))
  m.mlp_gated = False
  m.vocab_size = f.require('vocab_size')
  if f.family == 'mpt':
    m.d_model = f.require('d_model')
    m.num_layers = f.require('n_layers')
    m.num_heads = m.num_kv_heads = f.require('n_heads')
    m.max_seq_len = f.require('max_seq_len')
    f.expect('expansion_ratio', (None, 4), "transformers' MptMLP is 4 x d_model")
    f.expect('no_bias', (None, True), "transformers' MPT has no biases")
    f.expect('logit_scale', (None,), 'no logit multiplier')
    f.expect('embedding_fraction', (None, 1, 1.0), 'no embedding gradient scaling')
    f.expect('norm_type', (None, 'low_precision_layernorm', 'layernorm'), 'LayerNorm')
    # transformers' MptModel has no position table whatever learned_pos_emb
    # says; a `transformer.wpe.weight` tensor would be refused as unmapped.
    f.get('learned_pos_emb'), f.get('init_device'), f.get('init_config'), f.get('verbose')
    attn = dict(f.get('attn_config') or {})
    # transformers writes its generic config fields into the sub-config too.
    attn = {k: v for k, v in attn.items() if k not in NEUTRAL_FIELDS}
    def expect(name, allowed, why):
      value = attn.pop(name, allowed[0])
      if value not in allowed:
        raise HFError(f'mpt config.json: attn_config.{name}={value!r} is not supported '
                      f'by ablax ({why})')
      return value
    expect('attn_type', ('multihead_attention',), 'full multi-head attention')
    expect('is_encoder_decoder', (False,), 'decoder-only')
    expect('clip_qkv', (None,), 'ablax does not clamp q, k, v')
    expect('qk_ln', (False,), 'no LayerNorm on q and k in this mapping')
    expect('prefix_lm', (False,), 'causal attention only')
    expect('attn_uses_sequence_id', (False,), 'transformers ignores it')
    expect('alibi', (True,), "transformers' MPT always adds ALiBi")
    expect('alibi_bias_max', (8, 8.0), "ablax's slopes are Press et al.'s 2^(-8 i / n)")
    attn.pop('attn_impl', None)   # which kernel, not what it computes
    if attn.pop('attn_pdrop', 0):
      logging.warning('HF field attn_config.attn_pdrop dropped: ablax has no dropout')
    scale = attn.pop('softmax_scale', None)
    m.attn_scale = None if scale is None else float(scale)
    if attn:
      raise HFError(f'mpt config.json: attn_config field(s) {sorted(attn)} have no '
                    'ablax mapping')
    m.use_bias = False
    act = 'gelu'
  else:
    m.d_model = f.get('n_embed') or f.require('hidden_size')
    m.num_layers = f.require('n_layer')
    m.num_heads = m.num_kv_heads = f.require('n_head')
    # Bloom has no length limit (ALiBi) and no field for one.
    m.max_seq_len = 2048
    f.expect('apply_residual_connection_post_layernorm', (None, False),
             'the residual is taken before the norm')
    f.get('slow_but_exact')   # the same sums, in another order
    m.use_bias = True
    m.embedding_norm = True
    act = 'gelu_new'          # bloom_gelu_forward: the tanh approximation
  m.d_ff = 4 * m.d_model
  if m.d_model % m.num_heads:
    raise HFError(f'{f.family} config.json: hidden size {m.d_model} is not a multiple '
                  f'of {m.num_heads} heads')
  return act


def _deepseek_v3_from_hf(f: _Fields, m):
  """DeepSeek-V3: MLA, the sigmoid group-limited router with its selection
  bias, shared experts, the first layers dense. Returns the HF activation name.

  The multi-token-prediction layers (`num_nextn_predict_layers`, stored as
  `model.layers.{num_hidden_layers + j}.*`) become `mtp_depth` MTP modules
  (model/mtp.py; `_deepseek_v3_tensor_map`); a checkpoint without their
  tensors imports with `mtp_depth=0` and a warning."""
  m.vocab_size = f.require('vocab_size')
  m.d_model = f.require('hidden_size')
  m.num_layers = f.require('num_hidden_layers')
  m.num_heads = m.num_kv_heads = f.require('num_attention_heads')
  f.expect('num_key_value_heads', (None, m.num_heads), 'MLA has one key/value head per query head')
  m.head_dim = None
  m.d_ff = f.require('intermediate_size')
  m.max_seq_len = f.require('max_position_embeddings')
  m.norm_type, m.norm_position = 'rmsnorm', 'pre'
  m.norm_eps = float(f.get('rms_norm_eps', 1e-6))
  m.mlp_gated, m.use_bias = True, False
  f.expect('attention_bias', (None, False), 'MLA projections have no biases')
  _deepseek_v3_rope(f, m)
  m.attention_type = 'mla'
  m.mla_q_lora_rank = f.get('q_lora_rank') or 0
  m.mla_kv_lora_rank = f.require('kv_lora_rank')
  m.mla_qk_nope_head_dim = f.require('qk_nope_head_dim')
  m.mla_qk_rope_head_dim = f.require('qk_rope_head_dim')
  m.mla_v_head_dim = f.require('v_head_dim')
  # Derived by DeepseekV3Config itself; accepted when consistent.
  f.expect('qk_head_dim', (None, m.mla_qk_nope_head_dim + m.mla_qk_rope_head_dim),
           'qk_nope_head_dim + qk_rope_head_dim')
  f.expect('head_dim', (None, m.mla_qk_rope_head_dim), 'qk_rope_head_dim (the RoPE width)')
  f.get('rope_interleave')          # a permutation of the rope columns: _tensor_map
  m.num_experts = f.require('n_routed_experts')
  m.experts_per_token = f.require('num_experts_per_tok')
  m.num_shared_experts = f.require('n_shared_experts')
  m.moe_d_ff = f.require('moe_intermediate_size')
  m.moe_first_dense_layers = f.get('first_k_dense_replace') or 0
  m.moe_layer_interval = 1
  m.moe_capacity_factor = None
  m.moe_router = 'sigmoid'
  m.moe_renormalize = bool(f.get('norm_topk_prob', True))
  m.moe_routed_scaling = float(f.get('routed_scaling_factor', 1.0))
  m.moe_num_groups = f.get('n_group') or 1
  m.moe_topk_groups = f.get('topk_group') or 1
  # `load` sets 0 when the checkpoint lacks the MTP tensors (transformers'
  # own save_pretrained writes none).
  m.mtp_depth = f.get('num_nextn_predict_layers') or 0
  return f.get('hidden_act', 'silu')


def _yarn_parameters(f: _Fields, m, default_theta: float):
  """(entries left, original_max_seq_len, factor, where) of an HF YaRN rope
  config, with `m.rope_theta` set; None after mapping any other rope type
  through `_rope`. The factor defaults to max_seq_len / original."""
  params = dict(f.get('rope_parameters') or {})
  legacy = f.get('rope_scaling')
  if legacy:
    params.update(legacy)
  if params.get('rope_type', params.get('type')) != 'yarn':
    _rope(f, m)
    return None
  theta = params.pop('rope_theta', None)
  m.rope_theta = float(f.get('rope_theta', default_theta) if theta is None else theta)
  params.pop('rope_type', None)
  params.pop('type', None)
  where = f'{f.family} config.json: rope yarn'
  if 'original_max_position_embeddings' not in params:
    raise HFError(f'{where}: original_max_position_embeddings is missing')
  original = int(params.pop('original_max_position_embeddings'))
  factor = params.pop('factor', None)
  factor = float(m.max_seq_len / original if factor is None else factor)
  return params, original, factor, where


def _deepseek_v3_rope(f: _Fields, m):
  """DeepSeek-V3's rope fields; YaRN (the released config: factor 40,
  original_max_position_embeddings 4096, mscale = mscale_all_dim = 1) here,
  the rest through `_rope`.

  transformers' DeepSeek-V3 multiplies the softmax scale by
  (0.1 mscale_all_dim ln(factor) + 1)^2 and cos/sin (the rotated part only)
  by (0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1). ablax's MLA puts
  YaRN's attention factor, squared, on the whole softmax scale and leaves
  cos/sin alone (model/mla.py), so mscale must equal mscale_all_dim; then
  ablax's `attention_factor` is 0.1 mscale_all_dim ln(factor) + 1."""
  yarn = _yarn_parameters(f, m, 10000.0)
  if yarn is None:
    return
  params, original, factor, where = yarn
  mscale, all_dim = params.pop('mscale', None), params.pop('mscale_all_dim', None)
  if params.pop('attention_factor', None) is not None:
    raise HFError(f'{where} attention_factor: transformers puts it on the rotated part '
                  "only; ablax's MLA has no counterpart (set mscale and mscale_all_dim)")
  if not params.pop('truncate', True):
    raise HFError(f'{where} truncate=False: ablax rounds the correction range (truncate=True)')
  beta_fast = float(params.pop('beta_fast', None) or 32)
  beta_slow = float(params.pop('beta_slow', None) or 1)
  if params:
    raise HFError(f'{where}: parameter(s) {sorted(params)} have no ablax mapping')
  if factor > 1 and (not all_dim or mscale != all_dim):
    raise HFError(f'{where} mscale={mscale!r}, mscale_all_dim={all_dim!r}: ablax puts '
                  "YaRN's attention factor on the whole MLA softmax scale, which is "
                  'transformers\' computation only when mscale == mscale_all_dim (non-zero)')
  scaling = {'type': 'yarn', 'factor': factor, 'original_max_seq_len': original,
             'beta_fast': beta_fast, 'beta_slow': beta_slow}
  if factor > 1:
    scaling['attention_factor'] = 0.1 * all_dim * math.log(factor) + 1.0
  m.rope_scaling = scaling
  m.position = 'rope'


def _deepseek_v3_mtp_present(hf_dir, m, tensors):
  """mtp_depth=0 (with a warning) when config.json names MTP layers but the
  checkpoint holds none of their tensors; a partial set is an error."""
  if not m.mtp_depth:
    return
  names = [f'model.layers.{m.num_layers + j}.eh_proj.weight' for j in range(m.mtp_depth)]
  have = [x in tensors for x in names]
  if not any(have):
    logging.warning('%s: num_nextn_predict_layers=%d but no multi-token-prediction '
                    'tensors (%s): imported with mtp_depth=0', hf_dir, m.mtp_depth, names[0])
    m.mtp_depth = 0
  elif not all(have):
    raise HFError(f'{hf_dir}: num_nextn_predict_layers={m.mtp_depth} but tensor '
                  f'{names[have.index(False)]!r} is missing')


def _deepseek_v3_mtp_shared(hf_dir, m, tensors, left):
  """The MTP layers' copies of the embedding and the head
  (`model.layers.{L + j}.embed_tokens.weight`, `.shared_head.head.weight`):
  DeepSeek-V3 shares both with the main model, as ablax does, so they are
  checked equal to the main ones and dropped. Returns the names dropped."""
  head = 'model.embed_tokens.weight' if m.tie_embeddings else 'lm_head.weight'
  dropped = set()
  for j in range(m.mtp_depth):
    q = f'model.layers.{m.num_layers + j}.'
    for name, main in ((q + 'embed_tokens.weight', 'model.embed_tokens.weight'),
                       (q + 'shared_head.head.weight', head)):
      if name in left:
        if main not in tensors or not np.array_equal(tensors[name], tensors[main]):
          raise HFError(f'{hf_dir}: {name} differs from {main}: ablax MTP modules share '
                        'the main embedding and head')
        dropped.add(name)
  return dropped


def _deepseek_v3_rope_order(d_r):
  """DeepSeek's interleaved rope pairs (2i, 2i+1) -> ablax's half-split pairs
  (i, i + d_r/2): the columns [0, 2, 4, ..., 1, 3, 5, ...], and its inverse."""
  order = np.concatenate([np.arange(0, d_r, 2), np.arange(1, d_r, 2)])
  return order, np.argsort(order)


def _deepseek_v3_tensor_map(m, add, out, interleave=True):
  """DeepSeek-V3 tensors (transformers' names). With `rope_interleave` (the
  released checkpoints) the rope columns of the query and of the shared rope
  key are permuted to ablax's half-split layout; q . k is unchanged."""
  d, n = m.d_model, m.num_heads
  r_q, r = m.mla_q_lora_rank, m.mla_kv_lora_rank
  d_n, d_r, d_v = m.mla_qk_nope_head_dim, m.mla_qk_rope_head_dim, m.mla_v_head_dim
  t = lambda w: w.T
  order, inverse = _deepseek_v3_rope_order(d_r)
  if not interleave:
    order = inverse = np.arange(d_r)
  q_cols = np.concatenate([np.arange(d_n), d_n + order])
  q_back = np.concatenate([np.arange(d_n), d_n + inverse])
  kv_cols = np.concatenate([np.arange(r), r + order])
  kv_back = np.concatenate([np.arange(r), r + inverse])
  q_in = lambda rows: (lambda w: w.T.reshape(rows, n, d_n + d_r)[..., q_cols])
  q_out = lambda rows: (lambda w: w[..., q_back].reshape(rows, n * (d_n + d_r)).T)
  add('embed.embedding', 'model.embed_tokens.weight')
  add('final_norm.scale', 'model.norm.weight')
  if not m.tie_embeddings:
    add('head', 'lm_head.weight', t, t)
  layers = [(f'blocks.{i}.', f'model.layers.{i}.', i) for i in range(m.num_layers)]
  for j in range(m.get('mtp_depth', 0)):
    # DeepSeek's MTP layer j: model.layers.{num_hidden_layers + j}; its own
    # norms and eh_proj, then a decoder layer's weights (the same names).
    p, q = f'mtp.{j}.', f'model.layers.{m.num_layers + j}.'
    add(p + 'embed_norm.scale', q + 'enorm.weight')
    add(p + 'hidden_norm.scale', q + 'hnorm.weight')
    add(p + 'out_norm.scale', q + 'shared_head.norm.weight')
    # eh_proj [d, 2d] reads [enorm(embedding); hnorm(hidden)] (DeepSeek's and
    # vLLM's order); ablax's proj [2d, d] reads [hidden; embedding] (the
    # paper's equation 21): the two input halves swap.
    add(p + 'proj', q + 'eh_proj.weight',
        lambda w: np.concatenate([w.T[d:], w.T[:d]], axis=0),
        lambda w: np.concatenate([w[d:], w[:d]], axis=0).T)
    layers.append((p + 'block.', q, m.num_layers + j))
  for p, q, i in layers:
    a, s = p + 'attn.', q + 'self_attn.'
    if r_q:
      add(a + 'wq_a', s + 'q_a_proj.weight', t, t)
      add(a + 'q_a_norm.scale', s + 'q_a_layernorm.weight')
      add(a + 'wq_b', s + 'q_b_proj.weight', q_in(r_q), q_out(r_q))
    else:
      add(a + 'wq', s + 'q_proj.weight', q_in(d), q_out(d))
    add(a + 'wkv_a', s + 'kv_a_proj_with_mqa.weight', lambda w: w.T[:, kv_cols],
        lambda w: w[:, kv_back].T)
    add(a + 'kv_a_norm.scale', s + 'kv_a_layernorm.weight')
    # kv_b_proj rows: per head, [k_nope | v].
    add((a + 'wk_b', a + 'wv_b'), s + 'kv_b_proj.weight',
        lambda w: tuple(np.split(w.T.reshape(r, n, d_n + d_v), [d_n], axis=-1)),
        lambda ws: np.concatenate(ws, axis=-1).reshape(r, n * (d_n + d_v)).T)
    add(a + 'wo', s + 'o_proj.weight', lambda w: w.T.reshape(n, d_v, d),
        lambda w: w.reshape(n * d_v, d).T)
    add(p + 'attn_norm.scale', q + 'input_layernorm.weight')
    add(p + 'mlp_norm.scale', q + 'post_attention_layernorm.weight')
    mlp_names = (('wi_gate', 'gate_proj'), ('wi_up', 'up_proj'), ('wo', 'down_proj'))
    if decoder_lib.is_moe_layer(m, i):
      add(p + 'mlp.router', q + 'mlp.gate.weight', t, t)
      add(p + 'mlp.bias', q + 'mlp.gate.e_score_correction_bias')
      for name, hf_name in zip(('w_gate', 'w_up', 'w_down'), ('gate_proj', 'up_proj', 'down_proj')):
        out.append((p + 'mlp.' + name,
                    [q + f'mlp.experts.{e}.{hf_name}.weight' for e in range(m.num_experts)],
                    lambda ws: np.stack([w.T for w in ws]),
                    lambda w: [x.T for x in w]))
      for name, hf_name in mlp_names:
        add(p + 'mlp.shared.' + name, q + f'mlp.shared_experts.{hf_name}.weight', t, t)
    else:
      for name, hf_name in mlp_names:
        add(p + 'mlp.' + name, q + f'mlp.{hf_name}.weight', t, t)


def _alibi_tensor_map(family, m, add):
  """MPT and Bloom tensors; fused q/k/v go to three ablax paths at once."""
  d, n = m.d_model, m.num_heads
  h = d // n
  t = lambda w: w.T
  qkv = tuple(f'attn.w{x}' for x in 'qkv')
  if family == 'mpt':
    pre, blocks = 'transformer.', 'transformer.blocks.{}.'
    names = dict(embed='wte', final='norm_f', ln1='norm_1', ln2='norm_2', qkv='attn.Wqkv',
                 out='attn.out_proj', up='ffn.up_proj', down='ffn.down_proj')
    # Wqkv rows: [q | k | v], each head-major [n, h].
    split = lambda w: tuple(x.T.reshape(d, n, h) for x in np.split(w, 3, axis=0))
    join = lambda ws: np.concatenate([x.reshape(d, n * h).T for x in ws], axis=0)
    bsplit = bjoin = None
  else:
    pre, blocks = 'transformer.', 'transformer.h.{}.'
    names = dict(embed='word_embeddings', final='ln_f', ln1='input_layernorm',
                 ln2='post_attention_layernorm', qkv='self_attention.query_key_value',
                 out='self_attention.dense', up='mlp.dense_h_to_4h', down='mlp.dense_4h_to_h')
    # query_key_value rows: per head, [q | k | v] of head_dim each.
    split = lambda w: tuple(np.transpose(w.reshape(n, 3, h, d)[:, j], (2, 0, 1))
                            for j in range(3))
    join = lambda ws: np.stack([np.transpose(x, (1, 2, 0)) for x in ws], axis=1).reshape(3 * d, d)
    bsplit = lambda b: tuple(b.reshape(n, 3, h)[:, j] for j in range(3))
    bjoin = lambda bs: np.stack(bs, axis=1).reshape(3 * d)
  add('embed.embedding', pre + names['embed'] + '.weight')
  if m.get('embedding_norm', False):
    add('embed_norm.scale', pre + 'word_embeddings_layernorm.weight')
    add('embed_norm.bias', pre + 'word_embeddings_layernorm.bias')
  add('final_norm.scale', pre + names['final'] + '.weight')
  if m.use_bias:
    add('final_norm.bias', pre + names['final'] + '.bias')
  if not m.tie_embeddings:
    add('head', 'lm_head.weight', t, t)
  for i in range(m.num_layers):
    p, q = f'blocks.{i}.', blocks.format(i)
    for norm, key in (('attn_norm', 'ln1'), ('mlp_norm', 'ln2')):
      add(p + norm + '.scale', q + names[key] + '.weight')
      if m.use_bias:
        add(p + norm + '.bias', q + names[key] + '.bias')
    add(tuple(p + x for x in qkv), q + names['qkv'] + '.weight', split, join)
    add(p + 'attn.wo', q + names['out'] + '.weight', lambda w: w.T.reshape(n, h, d),
        lambda w: w.reshape(n * h, d).T)
    add(p + 'mlp.wi', q + names['up'] + '.weight', t, t)
    add(p + 'mlp.wo', q + names['down'] + '.weight', t, t)
    if m.use_bias:
      add(tuple(p + f'attn.b{x}' for x in 'qkv'), q + names['qkv'] + '.bias', bsplit, bjoin)
      add(p + 'attn.bo', q + names['out'] + '.bias')
      add(p + 'mlp.bi', q + names['up'] + '.bias')
      add(p + 'mlp.bo', q + names['down'] + '.bias')


# -- GPT-OSS (issue 17) -----------------------------------------------------------


def _gpt_oss_from_hf(f: _Fields, m):
  """GPT-OSS: GQA with q/k/v/o biases and a learned sink logit per head,
  sliding-window and full layers by `layer_types`, YaRN, and an MoE in every
  layer: a router with a bias, top-k of its logits then a softmax over the k
  chosen (= ablax's softmax router with `moe_renormalize`), experts with
  biases and the clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`). Returns the
  activation name (`ACTIVATIONS`)."""
  f.expect('quantization_config', (None,), 'MXFP4 expert weights are not read; load the '
           "model with transformers' Mxfp4Config(dequantize=True) and save_pretrained "
           'it, then import that folder')
  _llama_shape(f, m, norm_eps=1e-5)
  _gpt_oss_rope(f, m)
  f.expect('attention_bias', (None, True), "ablax's use_bias puts biases on the attention "
           'projections and the experts alike; GPT-OSS without attention biases is not mapped')
  m.use_bias = True
  m.attention_sinks = True
  _gpt_oss_layer_types(f, m)
  m.num_experts = f.require('num_local_experts')
  f.get('num_experts')   # transformers' alias of num_local_experts
  m.experts_per_token = f.require('num_experts_per_tok')
  m.moe_layer_interval, m.moe_capacity_factor = 1, None
  m.moe_router, m.moe_renormalize, m.moe_router_bias = 'softmax', True, True
  m.mlp_gated = True
  m.mlp_swiglu_alpha = float(f.get('swiglu_alpha', 1.702))
  m.mlp_swiglu_limit = float(f.get('swiglu_limit', 7.0))
  f.get('hidden_act')    # transformers' GPT-OSS experts ignore it
  return 'clamped_swiglu'


def _gpt_oss_layer_types(f: _Fields, m):
  """`sliding_window` and `layer_types` -> ablax's window and
  global_layer_interval: every layer sliding (None), or full exactly at
  layers k-1, 2k-1, ... (k; GPT-OSS: 2, transformers' default)."""
  window = f.get('sliding_window')
  n = m.num_layers
  types = f.get('layer_types')
  if types is None:   # GptOssConfig's default
    types = ['full_attention' if (i + 1) % 2 == 0 else 'sliding_attention' for i in range(n)]
  types = list(types)
  if len(types) != n or not set(types) <= {'sliding_attention', 'full_attention'}:
    raise HFError(f'gpt_oss config.json: layer_types={types!r} must list '
                  f"num_hidden_layers={n} of 'sliding_attention' and 'full_attention'")
  sliding = [t == 'sliding_attention' for t in types]
  if not any(sliding):
    m.sliding_window, m.global_layer_interval = None, None
    return
  if window is None:
    raise HFError('gpt_oss config.json: layer_types has sliding_attention layers but '
                  'sliding_window is None')
  m.sliding_window = int(window)
  if all(sliding):
    m.global_layer_interval = None
    return
  k = sliding.index(False) + 1
  want = [(i + 1) % k != 0 for i in range(n)]
  if sliding != want:
    raise HFError(f'gpt_oss config.json: layer_types={types!r} is not supported by ablax '
                  '(full attention must fall on every k-th layer, indices k-1, 2k-1, ...: '
                  'model.global_layer_interval)')
  m.global_layer_interval = k


def _gpt_oss_rope(f: _Fields, m):
  """GPT-OSS's rope (YaRN, factor 32 over 4096, `truncate=False` in the
  released config) onto ablax's yarn scaling; other rope types through
  `_rope`. transformers' YaRN attention factor (on cos and sin, so the logits
  carry its square) is ablax's `attention_factor`: given, or from
  mscale / mscale_all_dim, or 0.1 ln(factor) + 1 (ablax's default)."""
  yarn = _yarn_parameters(f, m, 150000.0)
  if yarn is None:
    return
  params, original, factor, where = yarn
  if factor < 1:
    raise HFError(f'{where} factor={factor}: ablax needs a factor >= 1')
  attention = params.pop('attention_factor', None)
  mscale, all_dim = params.pop('mscale', None), params.pop('mscale_all_dim', None)
  if attention is None and mscale and all_dim and factor > 1:
    get = lambda s: 0.1 * s * math.log(factor) + 1.0
    attention = get(mscale) / get(all_dim)
  scaling = {'type': 'yarn', 'factor': factor, 'original_max_seq_len': original,
             'beta_fast': float(params.pop('beta_fast', None) or 32),
             'beta_slow': float(params.pop('beta_slow', None) or 1)}
  if not params.pop('truncate', True):
    scaling['truncate'] = False
  if attention is not None:
    scaling['attention_factor'] = float(attention)
  if params:
    raise HFError(f'{where}: parameter(s) {sorted(params)} have no ablax mapping')
  m.rope_scaling = scaling
  m.position = 'rope'


def _gpt_oss_like(m) -> bool:
  """Whether an ablax model carries a flag only GPT-OSS exports (sinks, the
  clamped SwiGLU, a router bias)."""
  return bool(m.get('attention_sinks', False) or m.mlp_activation == 'clamped_swiglu'
              or m.get('moe_router_bias', False))


def _gpt_oss_to_hf(m, refuse):
  """The GptOss config dict of a model with sinks, the clamped SwiGLU or a
  router bias; the rest of the model must be GPT-OSS's layout, else refused
  naming the field."""
  want = {
      'attention_sinks': True, 'mlp_activation': 'clamped_swiglu', 'moe_router_bias': True,
      'position': 'rope', 'norm_type': 'rmsnorm', 'norm_position': 'pre', 'mlp_gated': True,
      'use_bias': True, 'attention_type': 'standard', 'qk_norm': False,
      'attn_logit_softcap': None, 'final_logit_softcap': None, 'attn_scale': None,
      'embedding_scale': False, 'embedding_norm': False, 'mtp_depth': 0,
      'moe_layer_interval': 1, 'moe_first_dense_layers': 0, 'num_shared_experts': 0,
      'moe_capacity_factor': None, 'moe_router': 'softmax', 'moe_renormalize': True,
      'moe_routed_scaling': 1.0, 'moe_num_groups': 1,
  }
  for field, value in want.items():
    if m.get(field, value) != value:
      refuse(f'{field}={m.get(field)!r} (GPT-OSS, the HF family with attention sinks, '
             f'the clamped SwiGLU and a router bias, needs {field}={value!r}: its layout '
             'is rope, rmsnorm pre, biased GQA with sinks, a biased softmax-top-k MoE in '
             'every layer)')
  if not m.num_experts:
    refuse('num_experts=0 (GPT-OSS has an MoE in every layer)')
  if 'L' in (m.get('layer_pattern', '') or ''):
    refuse(f'layer_pattern={m.layer_pattern!r} with GPT-OSS flags (GPT-OSS has attention '
           'layers only)')
  h = m.head_dim or m.d_model // m.num_heads
  hf = {'vocab_size': m.vocab_size, 'tie_word_embeddings': bool(m.tie_embeddings),
        'dtype': m.param_dtype, 'hidden_size': m.d_model, 'num_hidden_layers': m.num_layers,
        'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads,
        'head_dim': h, 'intermediate_size': m.moe_d_ff or m.d_ff,
        'max_position_embeddings': m.max_seq_len, 'rms_norm_eps': m.norm_eps,
        'attention_bias': True, 'hidden_act': 'silu',
        'num_local_experts': m.num_experts, 'num_experts_per_tok': m.experts_per_token,
        'swiglu_alpha': float(m.get('mlp_swiglu_alpha', 1.702)),
        'swiglu_limit': float(m.get('mlp_swiglu_limit', 7.0)),
        'sliding_window': m.sliding_window,
        'layer_types': ['full_attention' if decoder_lib.is_global_layer(m, i)
                        else 'sliding_attention' for i in range(m.num_layers)],
        'model_type': 'gpt_oss', 'architectures': [ARCHITECTURES['gpt_oss']]}
  rope, s = _rope_parameters(m)
  if s is not None:
    if s['type'] != 'yarn':
      refuse(f'rope_scaling.type={s["type"]!r} (the GPT-OSS export writes default, linear, '
             'llama3, yarn)')
    rope.update(rope_type='yarn', factor=float(s['factor']),
                original_max_position_embeddings=s['original_max_seq_len'],
                beta_fast=float(s.get('beta_fast', 32.0)),
                beta_slow=float(s.get('beta_slow', 1.0)),
                truncate=bool(s.get('truncate', True)))
    if s.get('attention_factor') is not None:
      rope['attention_factor'] = float(s['attention_factor'])
  hf['rope_parameters'] = rope
  return hf


def _gpt_oss_tensor_map(m, add):
  """GPT-OSS tensors (transformers' names). The experts are stored fused:
  gate_up_proj [E, d, 2f] (and its bias [E, 2f]) with gate and up interleaved
  along the last axis (columns 0, 2, 4, ... gate; 1, 3, 5, ... up); down_proj
  [E, f, d] is ablax's w_down as it is."""
  d, n, kv = m.d_model, m.num_heads, m.num_kv_heads
  h = m.head_dim or d // n
  t = lambda w: w.T
  split = lambda w: (w[..., 0::2], w[..., 1::2])
  join = lambda ws: np.stack(ws, axis=-1).reshape(*ws[0].shape[:-1], 2 * ws[0].shape[-1])
  add('embed.embedding', 'model.embed_tokens.weight')
  add('final_norm.scale', 'model.norm.weight')
  if not m.tie_embeddings:
    add('head', 'lm_head.weight', t, t)
  for i in range(m.num_layers):
    p, q = f'blocks.{i}.', f'model.layers.{i}.'
    a, s = p + 'attn.', q + 'self_attn.'
    for name, heads in (('q', n), ('k', kv), ('v', kv)):
      add(a + 'w' + name, s + f'{name}_proj.weight',
          lambda w, heads=heads: w.T.reshape(d, heads, h),
          lambda w, heads=heads: w.reshape(d, heads * h).T)
      add(a + 'b' + name, s + f'{name}_proj.bias',
          lambda w, heads=heads: w.reshape(heads, h), lambda w: w.reshape(-1))
    add(a + 'wo', s + 'o_proj.weight', lambda w: w.T.reshape(n, h, d),
        lambda w: w.reshape(n * h, d).T)
    add(a + 'bo', s + 'o_proj.bias')
    add(a + 'sinks', s + 'sinks')            # [num_heads], query-head order
    add(p + 'attn_norm.scale', q + 'input_layernorm.weight')
    add(p + 'mlp_norm.scale', q + 'post_attention_layernorm.weight')
    x, e = p + 'mlp.', q + 'mlp.'
    add(x + 'router', e + 'router.weight', t, t)
    add(x + 'router_bias', e + 'router.bias')
    add((x + 'w_gate', x + 'w_up'), e + 'experts.gate_up_proj', split, join)
    add((x + 'b_gate', x + 'b_up'), e + 'experts.gate_up_proj_bias', split, join)
    add(x + 'w_down', e + 'experts.down_proj')
    add(x + 'b_down', e + 'experts.down_proj_bias')


# -- tensor names ---------------------------------------------------------------


def _tensor_map(family, m, rope_interleave=True):
  """[(ablax path, hf name, to_ablax, to_hf)] for every parameter."""
  d, n, kv = m.d_model, m.num_heads, m.num_kv_heads
  h = m.head_dim or d // n
  t = lambda w: w.T
  out = []
  add = lambda path, name, fwd=None, back=None: out.append(
      (path, name, fwd or (lambda w: w), back or (lambda w: w)))
  proj_in = lambda heads: ((lambda w: w.T.reshape(d, heads, h)),
                           (lambda w: w.reshape(d, heads * h).T))
  gemma = family == 'gemma2'
  # Gemma's and Qwen3-Next's RMSNorms multiply by 1 + w.
  one_plus = family in ('gemma2', 'qwen3_next')
  norm_in = (lambda w: (w.astype(np.float64) + 1).astype(w.dtype)) if one_plus else None
  norm_out = (lambda w: (w.astype(np.float64) - 1).astype(w.dtype)) if one_plus else None
  if family in ('mpt', 'bloom'):
    _alibi_tensor_map(family, m, add)
    return out
  if family == 'deepseek_v3':
    _deepseek_v3_tensor_map(m, add, out, rope_interleave)
    return out
  if family == 'qwen3_next':
    _qwen3_next_tensor_map(m, add, out, norm_in, norm_out)
    return out
  if family == 'gpt_oss':
    _gpt_oss_tensor_map(m, add)
    return out
  if family == 'gpt2':
    add('embed.embedding', 'transformer.wte.weight')
    add('position_embed.table', 'transformer.wpe.weight')
    add('final_norm.scale', 'transformer.ln_f.weight')
    add('final_norm.bias', 'transformer.ln_f.bias')
    for i in range(m.num_layers):
      p, q = f'blocks.{i}.', f'transformer.h.{i}.'
      for j, name in enumerate(('wq', 'wk', 'wv')):
        sl = slice(j * d, (j + 1) * d)
        add(p + 'attn.' + name, q + 'attn.c_attn.weight',
            lambda w, sl=sl: w[:, sl].reshape(d, n, h), None)
        add(p + 'attn.b' + name[1], q + 'attn.c_attn.bias',
            lambda w, sl=sl: w[sl].reshape(n, h), None)
      add(p + 'attn.wo', q + 'attn.c_proj.weight', lambda w: w.reshape(n, h, d),
          lambda w: w.reshape(n * h, d))
      add(p + 'attn.bo', q + 'attn.c_proj.bias')
      add(p + 'attn_norm.scale', q + 'ln_1.weight')
      add(p + 'attn_norm.bias', q + 'ln_1.bias')
      add(p + 'mlp_norm.scale', q + 'ln_2.weight')
      add(p + 'mlp_norm.bias', q + 'ln_2.bias')
      add(p + 'mlp.wi', q + 'mlp.c_fc.weight')
      add(p + 'mlp.bi', q + 'mlp.c_fc.bias')
      add(p + 'mlp.wo', q + 'mlp.c_proj.weight')
      add(p + 'mlp.bo', q + 'mlp.c_proj.bias')
    return out
  add('embed.embedding', 'model.embed_tokens.weight')
  add('final_norm.scale', 'model.norm.weight', norm_in, norm_out)
  if not m.tie_embeddings:
    add('head', 'lm_head.weight', t, t)
  for i in range(m.num_layers):
    p, q = f'blocks.{i}.', f'model.layers.{i}.'
    for name, heads in (('q', n), ('k', kv), ('v', kv)):
      add(p + 'attn.w' + name, q + f'self_attn.{name}_proj.weight', *proj_in(heads))
      if m.use_bias:
        add(p + 'attn.b' + name, q + f'self_attn.{name}_proj.bias',
            lambda w, heads=heads: w.reshape(heads, h), lambda w: w.reshape(-1))
    add(p + 'attn.wo', q + 'self_attn.o_proj.weight', lambda w: w.T.reshape(n, h, d),
        lambda w: w.reshape(n * h, d).T)
    if m.use_bias and family != 'qwen2':
      add(p + 'attn.bo', q + 'self_attn.o_proj.bias')
    if family == 'diffllama':
      for name in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2'):
        add(p + 'attn.' + name, q + 'self_attn.' + name)
    if m.qk_norm:
      add(p + 'attn.q_norm.scale', q + 'self_attn.q_norm.weight')
      add(p + 'attn.k_norm.scale', q + 'self_attn.k_norm.weight')
    add(p + 'attn_norm.scale', q + 'input_layernorm.weight', norm_in, norm_out)
    if gemma:
      add(p + 'attn_out_norm.scale', q + 'post_attention_layernorm.weight', norm_in, norm_out)
      add(p + 'mlp_norm.scale', q + 'pre_feedforward_layernorm.weight', norm_in, norm_out)
      add(p + 'mlp_out_norm.scale', q + 'post_feedforward_layernorm.weight', norm_in, norm_out)
    else:
      add(p + 'mlp_norm.scale', q + 'post_attention_layernorm.weight')
    if decoder_lib.is_moe_layer(m, i):
      if family == 'mixtral':
        router, names = q + 'block_sparse_moe.gate.weight', ('w1', 'w3', 'w2')
        expert = lambda e, x: q + f'block_sparse_moe.experts.{e}.{x}.weight'
      else:
        router, names = q + 'mlp.gate.weight', ('gate_proj', 'up_proj', 'down_proj')
        expert = lambda e, x: q + f'mlp.experts.{e}.{x}.weight'
      add(p + 'mlp.router', router, t, t)
      for name, hf_name in zip(('w_gate', 'w_up', 'w_down'), names):
        out.append((p + 'mlp.' + name,
                    [expert(e, hf_name) for e in range(m.num_experts)],
                    lambda ws: np.stack([w.T for w in ws]),
                    lambda w: [x.T for x in w]))
    else:
      for name, hf_name in (('wi_gate', 'gate_proj'), ('wi_up', 'up_proj'), ('wo', 'down_proj')):
        add(p + 'mlp.' + name, q + f'mlp.{hf_name}.weight', t, t)
        if m.use_bias and family != 'qwen2':
          b = {'wi_gate': 'bi_gate', 'wi_up': 'bi_up', 'wo': 'bo'}[name]
          add(p + 'mlp.' + b, q + f'mlp.{hf_name}.bias')
  return out


# -- files ----------------------------------------------------------------------


def _read_tensors(hf_dir):
  """name -> numpy array from model.safetensors or the sharded index."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  single = os.path.join(hf_dir, 'model.safetensors')
  if os.path.exists(index):
    with open(index) as fh:
      weight_map = json.load(fh)['weight_map']
    files = sorted(set(weight_map.values()))
  elif os.path.exists(single):
    files = ['model.safetensors']
  else:
    raise HFError(f'{hf_dir}: no model.safetensors or model.safetensors.index.json '
                  '(only safetensors weights are read)')
  tensors = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    if not os.path.exists(path):
      raise HFError(f'{hf_dir}: shard {name} named by model.safetensors.index.json '
                    'is missing')
    tensors.update(load_file(path))
  return tensors


def _abstract_decoder(m):
  return nnx.eval_shape(lambda: decoder_lib.Decoder(m, rngs=nnx.Rngs(0)))


def _flat_params(decoder):
  # With the MoE selection bias (DeepSeek-V3's e_score_correction_bias), a
  # variable but not a Param; only sigmoid routers have one.
  return {'.'.join(map(str, path)): var
          for path, var in nnx.to_flat_state(nnx.state(decoder, (nnx.Param, moe_lib.ExpertBias)))}


def load(hf_dir: str):
  """(cfg, decoder) from a local Hugging Face folder; raises HFError.

  `cfg` holds `cfg.model` only: how to train the model (data, tokenizer,
  steps) is not in a Hugging Face model folder (`train.hf_workdir` makes a
  whole config for a workdir).
  """
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.exists(path):
    raise HFError(f'{hf_dir}: no config.json')
  with open(path) as fh:
    hf = json.load(fh)
  family, m = hf_to_model_config(hf)
  m.scan_layers = False     # the tensor map names the unrolled blocks
  tensors = _read_tensors(hf_dir)
  # DeepSeek-V3's e_score_correction_bias is float32 in bfloat16 checkpoints
  # (ablax's selection bias is float32 whatever param_dtype).
  dtypes = {str(tensors[k].dtype) for k in tensors
            if not k.endswith('e_score_correction_bias')}
  if len(dtypes) == 1 and dtypes != {'float32'}:
    m.param_dtype = m.dtype = dtypes.pop()
  if family == 'deepseek_v3':
    _deepseek_v3_mtp_present(hf_dir, m, tensors)
  decoder = _abstract_decoder(m)
  params = _flat_params(decoder)
  used = set()
  for path, names, fwd, _ in _tensor_map(family, m, bool(hf.get('rope_interleave', True))):
    for name in names if isinstance(names, list) else [names]:
      if name not in tensors:
        raise HFError(f'{hf_dir}: tensor {name!r} is missing (needed for {path})')
      used.add(name)
    if isinstance(path, tuple):
      # One fused HF tensor (MPT, Bloom q/k/v): check its shape before splitting.
      want = sum(int(np.prod(params[x].get_value().shape)) for x in path)
      if tensors[names].size != want:
        raise HFError(f'{hf_dir}: tensor {names!r} has shape {tensors[names].shape}, '
                      f'which does not fit ablax {", ".join(path)} of config.json')
    value = fwd([tensors[x] for x in names] if isinstance(names, list) else tensors[names])
    for one_path, one_value in (zip(path, value) if isinstance(path, tuple)
                                else [(path, value)]):
      var = params.pop(one_path)
      if tuple(one_value.shape) != tuple(var.get_value().shape):
        raise HFError(f'{hf_dir}: tensor {names!r} has shape '
                      f'{tensors[names].shape if not isinstance(names, list) else one_value.shape}, '
                      f'which does not fit ablax {one_path} {tuple(var.get_value().shape)} of config.json')
      var.set_value(jnp.asarray(one_value, dtype=var.get_value().dtype))
  if family == 'mpt':
    # MPT's LayerNorms have no bias; ablax's are zero, which computes the same.
    for path in [p for p in params if p.endswith('norm.bias')]:
      var = params.pop(path)
      var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
  if family == 'qwen2':
    # Qwen2 has biases on q/k/v only; ablax's use_bias also has output and MLP
    # biases, which stay zero and so compute the same.
    for path in [p for p in params if p.endswith(('attn.bo', 'mlp.bi_gate', 'mlp.bi_up', 'mlp.bo'))]:
      var = params.pop(path)
      var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
  if params:
    raise HFError(f'internal: ablax parameters not filled from {hf_dir}: {sorted(params)}')
  # Bias-free families under use_bias (qwen2): the other biases are zero.
  left = set(tensors) - used - {'lm_head.weight'}
  left = {k for k in left if not k.endswith(('attn.bias', 'attn.masked_bias', 'rotary_emb.inv_freq'))}
  if family == 'deepseek_v3':
    left -= _deepseek_v3_mtp_shared(hf_dir, m, tensors, left)
  if family == 'qwen3_next':
    left -= _qwen3_next_mtp_dropped(hf_dir, left)
  if left:
    raise HFError(f'{hf_dir}: tensors with no ablax mapping: {sorted(left)[:8]}')
  return ml_collections.ConfigDict({'model': m}), decoder


def _qwen2_like(decoder, m):
  """Whether biases sit on q/k/v only (the rest are zero): a Qwen2 model."""
  params = _flat_params(decoder)
  for key, var in params.items():
    if key.endswith(('attn.bo', 'mlp.bi_gate', 'mlp.bi_up', 'mlp.bo')):
      if np.any(np.asarray(var.get_value()) != 0):
        return False
  return True


def _rope_parameters(m):
  """(HF `rope_parameters`, None) for no, linear or llama3 rope scaling; for
  another type, (the unscaled parameters, `dict(m.rope_scaling)`): the
  family's export maps that type or refuses it."""
  rope = {'rope_type': 'default', 'rope_theta': m.rope_theta}
  if m.rope_scaling is None:
    return rope, None
  s = dict(m.rope_scaling)
  if s['type'] == 'linear':
    rope.update(rope_type='linear', factor=s['factor'])
  elif s['type'] == 'llama3':
    rope.update(rope_type='llama3', factor=s['factor'],
                low_freq_factor=s.get('low_freq_factor', 1.0),
                high_freq_factor=s.get('high_freq_factor', 4.0),
                original_max_position_embeddings=s['original_max_seq_len'])
  else:
    return rope, s
  return rope, None


def model_config_to_hf(m, decoder=None):
  """(family, HF config dict) for an ablax `config.model`; raises HFError."""
  def refuse(what):
    raise HFError(f'model.{what} has no Hugging Face counterpart that ablax exports')
  if m.num_memory_tokens:
    refuse(f'num_memory_tokens={m.num_memory_tokens}')
  if m.get('mup_base_width') is not None:
    # HF models have no logit or attention multipliers: the export would
    # silently compute another function.
    refuse(f'mup_base_width={m.mup_base_width} (muP multipliers)')
  if _is_qwen3_next(m):
    return 'qwen3_next', _qwen3_next_to_hf(m, refuse)
  if m.get('attention_gate', 'none') != 'none':
    refuse(f'attention_gate={m.attention_gate!r} (Qwen3-Next, the exported family with '
           "an output gate, has the elementwise one)")
  if _gpt_oss_like(m):
    return 'gpt_oss', _gpt_oss_to_hf(m, refuse)
  if 'L' in (m.get('layer_pattern', '') or ''):
    refuse(f'layer_pattern={m.layer_pattern!r} (Gated DeltaNet layers: no exported HF family has them yet)')
  if m.get('attention_type', 'standard') == 'mla':
    hf = _deepseek_v3_to_hf(m, refuse)
    return 'deepseek_v3', hf
  differential = m.get('attention_type', 'standard') == 'differential'
  if m.get('attention_type', 'standard') not in ('standard', 'differential'):
    refuse(f'attention_type={m.attention_type!r} (no exported HF family has it yet)')
  if differential and m.position != 'rope':
    refuse(f"attention_type='differential' with position={m.position!r} "
           '(DiffLlama, the HF differential family, uses RoPE)')
  if m.get('mtp_depth', 0):
    refuse(f'mtp_depth={m.mtp_depth} (no exported HF family holds MTP modules)')
  if m.num_shared_experts:
    refuse(f'num_shared_experts={m.num_shared_experts}')
  if m.get('embedding_norm', False) and m.position != 'alibi':
    refuse('embedding_norm=True outside the Bloom layout (position=alibi)')
  if m.moe_capacity_factor is not None:
    refuse(f'moe_capacity_factor={m.moe_capacity_factor} (HF experts are dropless)')
  # DeepSeek-V3's router (issue 16) has no exported family yet.
  for field, plain in (('moe_router', 'softmax'), ('moe_routed_scaling', 1.0),
                       ('moe_num_groups', 1), ('moe_first_dense_layers', 0)):
    if m.num_experts and m.get(field, plain) != plain:
      refuse(f'{field}={m.get(field)!r} (the exported MoE families route with a plain softmax top-k)')
  h = m.head_dim or m.d_model // m.num_heads
  hf = {'vocab_size': m.vocab_size, 'tie_word_embeddings': bool(m.tie_embeddings),
        'dtype': m.param_dtype}
  act = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'relu': 'relu'}
  if m.position == 'learned':
    if (m.norm_type, m.norm_position, m.mlp_gated, m.use_bias, m.num_heads) != (
        'layernorm', 'pre', False, True, m.num_kv_heads) or h * m.num_heads != m.d_model:
      refuse('position=learned outside the GPT-2 layout (layernorm, pre, plain MLP, '
             'use_bias, MHA)')
    family = 'gpt2'
    hf.update(n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
              n_inner=m.d_ff, n_positions=m.max_seq_len, layer_norm_epsilon=m.norm_eps,
              activation_function='gelu_new' if m.mlp_activation == 'gelu_tanh'
              else m.mlp_activation)
  elif m.position == 'alibi':
    family = _alibi_to_hf(m, decoder, hf, refuse)
  else:
    if m.position != 'rope':
      refuse(f'position={m.position!r}')
    if m.norm_type != 'rmsnorm' or not m.mlp_gated:
      refuse(f'norm_type={m.norm_type!r} / mlp_gated={m.mlp_gated} with RoPE')
    hf.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
              head_dim=h, intermediate_size=m.d_ff, max_position_embeddings=m.max_seq_len,
              rms_norm_eps=m.norm_eps, hidden_act=act[m.mlp_activation])
    rope, other = _rope_parameters(m)
    if other is not None:
      refuse(f'rope_scaling.type={other["type"]!r}')
    hf['rope_parameters'] = rope
    if m.norm_position == 'sandwich':
      family = 'gemma2'
      if not (m.embedding_scale and m.sliding_window and m.global_layer_interval == 2):
        refuse('norm_position=sandwich without Gemma 2 embedding_scale, '
               'sliding_window and global_layer_interval=2')
      scalar = h if m.attn_scale is None else m.attn_scale ** -2
      if abs(scalar - round(scalar)) > 1e-6 * scalar:
        refuse(f'attn_scale={m.attn_scale} (Gemma 2 wants 1/sqrt(an integer '
               'query_pre_attn_scalar))')
      hf.update(hidden_activation=hf.pop('hidden_act'), sliding_window=m.sliding_window,
                query_pre_attn_scalar=int(round(scalar)),
                attn_logit_softcapping=m.attn_logit_softcap,
                final_logit_softcapping=m.final_logit_softcap,
                layer_types=['full_attention' if i % 2 else 'sliding_attention'
                             for i in range(m.num_layers)])
    else:
      if m.norm_position != 'pre':
        refuse(f'norm_position={m.norm_position!r}')
      for field in ('embedding_scale', 'attn_logit_softcap', 'final_logit_softcap',
                    'attn_scale', 'global_layer_interval'):
        if m[field] not in (None, False):
          refuse(f'{field}={m[field]!r} outside the Gemma 2 layout')
      if m.num_experts:
        family = 'qwen3_moe' if m.qk_norm else 'mixtral'
        hf.update(num_local_experts=m.num_experts, num_experts_per_tok=m.experts_per_token)
        if family == 'mixtral':
          if not m.moe_renormalize or m.moe_layer_interval != 1 or m.moe_d_ff not in (None, m.d_ff):
            refuse('MoE without qk_norm must be Mixtral-like (moe_renormalize, '
                   'moe_layer_interval=1, moe_d_ff=d_ff)')
          hf['sliding_window'] = m.sliding_window
        else:
          if m.sliding_window:
            refuse('sliding_window with qk_norm')
          hf.update(norm_topk_prob=bool(m.moe_renormalize),
                    moe_intermediate_size=m.moe_d_ff or m.d_ff,
                    decoder_sparse_step=m.moe_layer_interval, mlp_only_layers=[])
      elif m.qk_norm:
        family = 'qwen3'
        if m.sliding_window:
          refuse('sliding_window with qk_norm')
      elif m.sliding_window:
        family = 'mistral'
      elif m.use_bias and decoder is not None and _qwen2_like(decoder, m):
        family = 'qwen2'
      else:
        family = 'llama'
        hf.update(attention_bias=bool(m.use_bias), mlp_bias=bool(m.use_bias))
      if m.use_bias and family not in ('llama', 'qwen2'):
        refuse(f'use_bias with {family}')
      if m.qk_norm and family not in ('qwen3', 'qwen3_moe'):
        refuse('qk_norm outside Qwen3')
      if differential:
        family = _diffllama_to_hf(m, family, hf, refuse)
  hf['model_type'] = family
  hf['architectures'] = [ARCHITECTURES[family]]
  return family, hf


def _diffllama_to_hf(m, family, hf, refuse):
  """'diffllama' for a differential-attention model whose rest is Llama's."""
  if m.use_bias:
    refuse("use_bias with attention_type='differential' (DiffLlama's MLP has no biases)")
  if family != 'llama':
    refuse(f"attention_type='differential' with a {family} layout (DiffLlama is Llama's: "
           'no sliding_window, qk_norm, experts)')
  if m.num_kv_heads % 2:
    refuse(f"num_kv_heads={m.num_kv_heads} with attention_type='differential' "
           '(DiffLlama splits the key/value heads in two halves: it needs an even count)')
  del hf['mlp_bias']
  return 'diffllama'


def _deepseek_v3_to_hf(m, refuse):
  """The DeepseekV3 config dict of an MLA model (attention_type='mla').

  DeepSeek-V3's layout only: RMSNorm pre-norm, RoPE, gated MLPs without
  biases, and a sigmoid-routed MoE in every layer from moe_first_dense_layers
  on, with at least one shared expert. The rope columns are written in
  DeepSeek's interleaved order (`rope_interleave=True`). MTP modules
  (`mtp_depth`) go out as DeepSeek's `num_nextn_predict_layers` layers
  `model.layers.{num_layers + j}.*`, with copies of the shared embedding and
  head as in DeepSeek's releases; transformers loads the model without them
  (it does not run MTP)."""
  if m.position != 'rope' or m.norm_type != 'rmsnorm' or m.norm_position != 'pre':
    refuse(f"attention_type='mla' with position={m.position!r}, norm_type={m.norm_type!r}, "
           f'norm_position={m.norm_position!r} (DeepSeek-V3 is rope, rmsnorm, pre)')
  if not m.mlp_gated or m.use_bias:
    refuse("attention_type='mla' with mlp_gated=False or use_bias=True (DeepSeek-V3's "
           'MLPs are gated, without biases)')
  for field in ('embedding_scale', 'attn_logit_softcap', 'final_logit_softcap',
                'attn_scale', 'global_layer_interval', 'sliding_window', 'embedding_norm'):
    if m.get(field) not in (None, False, 0):
      refuse(f"{field}={m.get(field)!r} with attention_type='mla' (DeepSeek-V3 has none)")
  if not m.num_experts or m.get('moe_router', 'softmax') != 'sigmoid':
    refuse(f"attention_type='mla' with num_experts={m.num_experts}, "
           f"moe_router={m.get('moe_router', 'softmax')!r} (DeepSeek-V3, the exported "
           "MLA family, has a sigmoid-routed MoE)")
  if m.moe_layer_interval != 1:
    refuse(f'moe_layer_interval={m.moe_layer_interval} (DeepSeek-V3: every layer after '
           'the first dense ones is MoE)')
  if m.moe_capacity_factor is not None:
    refuse(f'moe_capacity_factor={m.moe_capacity_factor} (HF experts are dropless)')
  if not m.num_shared_experts:
    refuse('num_shared_experts=0 (DeepSeek-V3 always has shared experts)')
  groups = m.get('moe_num_groups', 1)
  if m.num_experts // groups < 2:
    refuse(f'moe_num_groups={groups} with {m.num_experts} experts (transformers scores '
           'a group by its two best experts: groups need 2 or more)')
  act = {'silu': 'silu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'relu': 'relu'}
  hf = {'vocab_size': m.vocab_size, 'tie_word_embeddings': bool(m.tie_embeddings),
        'dtype': m.param_dtype, 'hidden_size': m.d_model, 'num_hidden_layers': m.num_layers,
        'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_heads,
        'intermediate_size': m.d_ff, 'max_position_embeddings': m.max_seq_len,
        'rms_norm_eps': m.norm_eps, 'hidden_act': act[m.mlp_activation],
        'attention_bias': False,
        'q_lora_rank': m.mla_q_lora_rank or None, 'kv_lora_rank': m.mla_kv_lora_rank,
        'qk_nope_head_dim': m.mla_qk_nope_head_dim,
        'qk_rope_head_dim': m.mla_qk_rope_head_dim, 'v_head_dim': m.mla_v_head_dim,
        'rope_interleave': True,
        'n_routed_experts': m.num_experts, 'num_experts_per_tok': m.experts_per_token,
        'n_shared_experts': m.num_shared_experts,
        'moe_intermediate_size': m.moe_d_ff or m.d_ff,
        'first_k_dense_replace': m.get('moe_first_dense_layers', 0),
        'norm_topk_prob': bool(m.moe_renormalize),
        'routed_scaling_factor': float(m.get('moe_routed_scaling', 1.0)),
        'n_group': groups, 'topk_group': m.get('moe_topk_groups', 1),
        'num_nextn_predict_layers': m.get('mtp_depth', 0),
        'model_type': 'deepseek_v3', 'architectures': [ARCHITECTURES['deepseek_v3']]}
  rope, s = _rope_parameters(m)
  if s is not None:
    if s['type'] == 'yarn':
      # DeepSeek's mscale = mscale_all_dim, the one that gives ablax's
      # attention factor 0.1 m ln(factor) + 1 (see _deepseek_v3_rope).
      factor, attention = float(s['factor']), s.get('attention_factor')
      if attention is None or factor <= 1:
        if attention not in (None, 1.0) and factor <= 1:
          refuse(f'rope_scaling.attention_factor={attention} with factor={factor} '
                 '(DeepSeek-V3 has no YaRN attention factor without scaling)')
        all_dim = 1.0
      else:
        all_dim = (float(attention) - 1.0) / (0.1 * math.log(factor))
        if all_dim <= 0:
          refuse(f'rope_scaling.attention_factor={attention} (DeepSeek-V3 writes it as '
                 'mscale = mscale_all_dim = (attention_factor - 1) / (0.1 ln factor), '
                 'which must be positive)')
      rope.update(rope_type='yarn', factor=factor,
                  original_max_position_embeddings=s['original_max_seq_len'],
                  beta_fast=float(s.get('beta_fast', 32.0)),
                  beta_slow=float(s.get('beta_slow', 1.0)),
                  mscale=all_dim, mscale_all_dim=all_dim)
    else:
      refuse(f'rope_scaling.type={s["type"]!r} (the DeepSeek-V3 export writes default, '
             'linear, llama3, yarn)')
  hf['rope_parameters'] = rope
  return hf


def _alibi_to_hf(m, decoder, hf, refuse):
  """MPT (no biases) or Bloom (embedding_norm, biases) fields into `hf`; the family."""
  h = m.head_dim or m.d_model // m.num_heads
  layout = ('layernorm', 'pre', False, m.num_heads, m.d_model, 4 * m.d_model)
  if (m.norm_type, m.norm_position, m.mlp_gated, m.num_kv_heads, h * m.num_heads,
      m.d_ff) != layout:
    refuse('position=alibi outside the MPT/Bloom layout (norm_type=layernorm, '
           'norm_position=pre, mlp_gated=False, num_kv_heads=num_heads, '
           'head_dim=d_model/num_heads, d_ff=4*d_model)')
  for field in ('embedding_scale', 'attn_logit_softcap', 'final_logit_softcap',
                'global_layer_interval', 'sliding_window', 'num_experts'):
    if m[field] not in (None, False, 0):
      refuse(f'{field}={m[field]!r} with position=alibi (MPT/Bloom have none)')
  if m.qk_norm:
    refuse('qk_norm=True with position=alibi (MPT/Bloom have none)')
  if m.get('embedding_norm', False):
    if not m.use_bias or m.mlp_activation != 'gelu_tanh' or m.attn_scale is not None:
      refuse('embedding_norm=True with position=alibi exports as Bloom, which needs '
             'use_bias=True, mlp_activation=gelu_tanh, attn_scale=None')
    hf.update(hidden_size=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
              layer_norm_epsilon=m.norm_eps,
              apply_residual_connection_post_layernorm=False)
    return 'bloom'
  if m.use_bias or m.mlp_activation != 'gelu':
    refuse('position=alibi without embedding_norm exports as MPT, which needs '
           'use_bias=False and mlp_activation=gelu (or set embedding_norm=True, '
           'use_bias=True, mlp_activation=gelu_tanh for Bloom)')
  if decoder is not None:
    for key, var in _flat_params(decoder).items():
      if key.endswith('norm.bias') and np.any(np.asarray(var.get_value()) != 0):
        refuse(f'position=alibi without embedding_norm exports as MPT, whose LayerNorms '
               f'have no bias, but {key} is not zero')
  hf.update(d_model=m.d_model, n_layers=m.num_layers, n_heads=m.num_heads,
            max_seq_len=m.max_seq_len, expansion_ratio=4, layer_norm_epsilon=m.norm_eps,
            no_bias=True, learned_pos_emb=False,
            attn_config={'alibi': True, 'alibi_bias_max': 8, 'clip_qkv': None,
                         'softmax_scale': m.attn_scale})
  return 'mpt'


def _unrolled(m, decoder):
  """`decoder` with its blocks unrolled (`model.scan_layers`: the per-layer
  tensors map to the unrolled layout), and its config."""
  if getattr(decoder, 'scan_period', None) is None:
    return m, decoder
  from model import scan as scan_lib  # pylint: disable=g-import-not-at-top
  m = m.copy_and_resolve_references()
  # Parameters and the MoE selection bias alike.
  state = scan_lib.convert(nnx.to_pure_dict(nnx.state(decoder)), m, scanned=False)
  m.scan_layers = False
  unrolled = _abstract_decoder(m)
  nnx.update(unrolled, state)
  return m, unrolled


def save(cfg, decoder, hf_dir: str) -> None:
  """Writes `config.json` + `model.safetensors` that transformers loads."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  m, decoder = _unrolled(cfg.model, decoder)
  family, hf = model_config_to_hf(m, decoder)
  params = _flat_params(decoder)
  tensors = {}
  for path, names, _, back in _tensor_map(family, m):
    if isinstance(path, tuple):
      value = back([np.asarray(jax.device_get(params[x].get_value())) for x in path])
    else:
      value = back(np.asarray(jax.device_get(params[path].get_value())))
    if family == 'gpt2' and names.endswith(('c_attn.weight', 'c_attn.bias')):
      # q, k, v concatenated along the output axis (Conv1D weights are [in, out]).
      parts = tensors.setdefault(names, [None] * 3)
      j = 'qkv'.index(path[-1])
      parts[j] = value.reshape(value.shape[0], -1) if names.endswith('weight') else value.reshape(-1)
      continue
    if isinstance(names, list):
      for name, x in zip(names, value):
        tensors[name] = x
    else:
      tensors[names] = value
  for name, value in list(tensors.items()):
    if isinstance(value, list):
      tensors[name] = np.concatenate(value, axis=-1)
  if family == 'deepseek_v3':
    head = 'model.embed_tokens.weight' if m.tie_embeddings else 'lm_head.weight'
    for j in range(m.get('mtp_depth', 0)):
      q = f'model.layers.{m.num_layers + j}.'
      tensors[q + 'embed_tokens.weight'] = tensors['model.embed_tokens.weight']
      tensors[q + 'shared_head.head.weight'] = tensors[head]
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  os.makedirs(hf_dir, exist_ok=True)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as fh:
    json.dump(hf, fh, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(hf_dir, 'model.safetensors'), metadata={'format': 'pt'})


if __name__ == '__main__':
  # The command line writes and reads ablax workdirs, which are the trainer's
  # business: `train.hf_workdir` runs it. The library above imports nothing
  # from `train`.
  from train import hf_workdir  # pylint: disable=g-import-not-at-top
  hf_workdir.run_as_main()
