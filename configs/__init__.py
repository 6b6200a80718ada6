"""Config loading and validation.

`load("configs/llama.py:tiny", ["model.num_layers=2"])` imports the file, calls
its `get_config(arg)`, applies `PATH=VALUE` overrides and validates the result.
The command line does the same through `ml_collections.config_flags`; both end
in `validate`, which refuses bad values with a message naming the field.
"""

import ast
import difflib
import importlib.util
import os
import traceback

import ml_collections

from configs.errors import UserError

CHOICES = {
    'model.norm_type': ('rmsnorm', 'layernorm'),
    'model.norm_position': ('pre', 'post', 'sandwich'),
    'model.position': ('rope', 'alibi', 'learned', 'sinusoidal', 'none'),
    'model.mlp_activation': ('silu', 'gelu', 'gelu_tanh', 'relu', 'clamped_swiglu'),
    'model.attention_impl': ('auto', 'xla', 'pallas', 'cudnn'),
    'model.attention_gate': ('none', 'headwise', 'elementwise'),
    'model.attention_type': ('standard', 'mla', 'differential'),
    'model.remat': ('none', 'full', 'dots'),
    'model.moe_dispatch': ('auto', 'global', 'all_to_all'),
    'model.context_parallel': ('allgather', 'ring', 'ring_contiguous'),
    'model.moe_router': ('softmax', 'sigmoid'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16', 'float16'),
    'train.lr_schedule': ('cosine', 'linear', 'constant', 'wsd'),
    'train.optimizer': ('adamw', 'lion', 'adafactor', 'sgd', 'muon', 'schedule_free_adamw'),
    'train.muon_scale': ('moonlight', 'spectral'),
    'train.on_divergence': ('stop', 'rollback'),
    'data.source': ('builtin', 'text', 'jsonl', 'arrayrecord', 'synthetic', 'sft',
                    'tokens', 'parquet'),
    'dpo.loss': ('sigmoid', 'ipo', 'hinge', 'robust', 'rpo', 'simpo', 'orpo'),
}
ROPE_SCALING_TYPES = ('linear', 'ntk', 'yarn', 'llama3')
# Built-in evaluation tasks (train/tasks.py); `@N` sets a context length.
EVAL_BUILTIN_TASKS = ('next_line', 'copy', 'passkey')


class ConfigError(UserError):
  """A config value that ablax refuses; the message names the field."""


def _get(cfg, path):
  node = cfg
  for part in path.split('.'):
    node = node[part]
  return node


def _parse_value(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def check_field(cfg: ml_collections.ConfigDict, path: str) -> None:
  """Raises ConfigError if `path` (`a.b.c`) is not a field of `cfg`, with the
  closest field names as a suggestion."""
  node, done = cfg, []
  for part in path.strip().split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=3)
      where = '.'.join(done + [part])
      hint = (f'; did you mean {" or ".join(".".join(done + [c]) for c in close)}?'
              if close else f'; {".".join(done) or "the config"} has: '
              f'{", ".join(known)}' if known else '')
      raise ConfigError(f'{where} is not a config field{hint}')
    node = node[part]
    done.append(part)


def apply_override(cfg: ml_collections.ConfigDict, override: str) -> None:
  """Applies one `a.b.c=VALUE` override in place; unknown fields are an error."""
  if '=' not in override:
    raise ConfigError(f'override {override!r} is not of the form PATH=VALUE')
  path, text = override.split('=', 1)
  check_field(cfg, path)
  *parents, leaf = path.strip().split('.')
  node = cfg
  for part in parents:
    node = node[part]
  value = _parse_value(text.strip())
  current = node[leaf]
  if isinstance(current, bool) and text.strip() in ('true', 'false'):
    value = text.strip() == 'true'      # absl's spelling of a boolean
  if isinstance(current, str) and not isinstance(value, str):
    value = text.strip()        # e.g. tokenizer=123 stays a string
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    node[leaf] = value
  except TypeError:
    field = node.get_ref(leaf) if hasattr(node, 'get_ref') else None
    kind = getattr(field, '_field_type', None) or type(current)
    raise ConfigError(f'{path.strip()}={text.strip()!r}: expected {kind.__name__}'
                      f'{" or None" if current is None else ""}') from None


def _where(path: str, error: BaseException) -> str:
  """`path:LINE` of the deepest frame of `error` in the config file `path`."""
  line = None
  for frame in traceback.extract_tb(error.__traceback__):
    if os.path.abspath(frame.filename) == os.path.abspath(path):
      line = frame.lineno
  return f'{path}:{line}' if line else path


def load_module(path: str):
  """Imports a config file; a missing file or an error in it is a ConfigError
  naming the file (and line)."""
  if not os.path.isfile(path):
    hint = ' (it is a folder)' if os.path.isdir(path) else ''
    raise ConfigError(f'config file {path!r} not found{hint}: give --config '
                      'configs/NAME.py[:ARG]')
  spec = importlib.util.spec_from_file_location(
      'ablax_config_' + os.path.basename(path).removesuffix('.py'), path)
  if spec is None:
    raise ConfigError(f'config file {path!r} is not a Python file (.py)')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'config file {path}:{e.lineno}: syntax error: {e.msg}') from e
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'config file {_where(path, e)}: {type(e).__name__}: {e}') from e
  return module


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> the config its `get_config(arg)` returns (no overrides,
  not validated); errors name the file and line."""
  path, _, arg = spec.partition(':')
  module = load_module(path)
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'config file {path!r} defines no get_config(arg)')
  try:
    return module.get_config(arg or None)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'config file {_where(path, e)}: get_config({arg!r}) failed: '
                      f'{type(e).__name__}: {e}') from e


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]`, applies overrides, validates; returns the config."""
  cfg = load_file(spec)
  for override in overrides:
    apply_override(cfg, override)
  validate(cfg)
  return cfg


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


def _validate_routing(m: ml_collections.ConfigDict) -> None:
  """The DeepSeek-V3 router fields of an MoE model (model/moe.py)."""
  e, k = m.num_experts, m.experts_per_token
  scaling = m.get('moe_routed_scaling', 1.0)
  _check(isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling > 0,
         f'model.moe_routed_scaling={scaling!r}: must be a positive number')
  groups, kept = m.get('moe_num_groups', 1), m.get('moe_topk_groups', 1)
  _check(isinstance(groups, int) and groups >= 1 and e % groups == 0,
         f'model.moe_num_groups={groups!r}: must be a positive divisor of '
         f'num_experts={e}')
  _check(isinstance(kept, int) and 1 <= kept <= groups,
         f'model.moe_topk_groups={kept!r}: must be in [1, moe_num_groups={groups}]')
  _check(k <= kept * (e // groups),
         f'model.experts_per_token={k}: more than the {kept * (e // groups)} experts '
         f'of the moe_topk_groups={kept} kept groups of {e // groups}; raise '
         'moe_topk_groups or lower experts_per_token')


def validate_model(m: ml_collections.ConfigDict) -> None:
  """Checks `config.model` alone (layers and tests build only this part)."""
  for path, choices in CHOICES.items():
    section, field = path.split('.')
    if section == 'model' and field in m:
      _check(m[field] in choices,
             f'{path}={m[field]!r}: must be one of {", ".join(choices)}')
  for field in ('vocab_size', 'd_model', 'num_layers', 'num_heads',
                'num_kv_heads', 'd_ff', 'max_seq_len'):
    _check(isinstance(m[field], int) and m[field] > 0,
           f'model.{field}={m[field]!r}: must be a positive integer')
  _check(m.num_heads % m.num_kv_heads == 0,
         f'model.num_heads={m.num_heads}, model.num_kv_heads={m.num_kv_heads}: '
         'num_heads must be a multiple of num_kv_heads')
  if m.head_dim is None:
    _check(m.d_model % m.num_heads == 0,
           f'model.d_model={m.d_model}, model.num_heads={m.num_heads}: d_model must be a '
           'multiple of num_heads when model.head_dim is None')
  else:
    _check(m.head_dim > 0, f'model.head_dim={m.head_dim}: must be positive')
  head_dim = m.head_dim or m.d_model // m.num_heads
  mla = m.get('attention_type', 'standard') == 'mla'
  if mla:
    _validate_mla(m)
  if m.get('attention_type', 'standard') == 'differential':
    _validate_differential(m)
  if m.position == 'rope':
    _check(mla or head_dim % 2 == 0, f'model.head_dim={head_dim}: RoPE needs an even head_dim')
    _check(m.rope_theta > 0, f'model.rope_theta={m.rope_theta}: must be positive')
  _validate_rope_fraction(m, head_dim, mla)
  if m.rope_scaling is not None:
    _check(m.position == 'rope', 'model.rope_scaling is set but model.position '
           f'is {m.position!r}, not rope')
    kind = m.rope_scaling.get('type')
    _check(kind in ROPE_SCALING_TYPES, f'model.rope_scaling.type={kind!r}: must be '
           f'one of {", ".join(ROPE_SCALING_TYPES)}')
    _check(m.rope_scaling.get('factor', 0) >= 1,
           'model.rope_scaling.factor must be given and >= 1')
    if kind in ('yarn', 'llama3', 'ntk'):
      _check(m.rope_scaling.get('original_max_seq_len', 0) > 0,
             f'model.rope_scaling.original_max_seq_len is required for {kind}')
  _check(m.norm_eps > 0, f'model.norm_eps={m.norm_eps}: must be positive')
  for field in ('attn_logit_softcap', 'final_logit_softcap', 'attn_scale'):
    _check(m[field] is None or m[field] > 0,
           f'model.{field}={m[field]}: must be None or positive')
  _check(m.sliding_window is None or m.sliding_window > 0,
         f'model.sliding_window={m.sliding_window}: must be None or positive')
  if m.global_layer_interval is not None:
    _check(m.sliding_window is not None, 'model.global_layer_interval is set '
           'but model.sliding_window is None (nothing to alternate with)')
    _check(m.global_layer_interval > 0,
           f'model.global_layer_interval={m.global_layer_interval}: must be positive')
  _check(m.num_memory_tokens >= 0,
         f'model.num_memory_tokens={m.num_memory_tokens}: must be >= 0')
  if m.get('attention_sinks', False):
    _check(m.attention_impl != 'cudnn',
           "model.attention_impl='cudnn' has no attention-sink term: use "
           'model.attention_impl=auto, xla or pallas with model.attention_sinks=True')
  for field in ('attention_block_q', 'attention_block_kv'):
    if field in m and m[field] is not None:
      _check(m[field] > 0 and m[field] % 8 == 0,
             f'model.{field}={m[field]}: must be a positive multiple of 8')
  _check(m.num_experts >= 0, f'model.num_experts={m.num_experts}: must be >= 0')
  if m.num_experts:
    _check(1 <= m.experts_per_token <= m.num_experts,
           f'model.experts_per_token={m.experts_per_token}: must be in '
           f'[1, num_experts={m.num_experts}]')
    _check(m.moe_layer_interval >= 1,
           f'model.moe_layer_interval={m.moe_layer_interval}: must be >= 1')
    _check(m.moe_capacity_factor is None or m.moe_capacity_factor > 0,
           f'model.moe_capacity_factor={m.moe_capacity_factor}: must be None or positive')
    _check(m.num_shared_experts >= 0,
           f'model.num_shared_experts={m.num_shared_experts}: must be >= 0')
    _check(not m.get('moe_shared_expert_gate', False) or m.num_shared_experts > 0,
           'model.moe_shared_expert_gate=True with model.num_shared_experts=0: there is '
           'no shared expert to gate; set num_shared_experts >= 1 or the gate to False')
    _validate_routing(m)
  first_dense = m.get('moe_first_dense_layers', 0)
  _check(isinstance(first_dense, int) and 0 <= first_dense < m.num_layers,
         f'model.moe_first_dense_layers={first_dense!r}: must be an integer in '
         f'[0, num_layers={m.num_layers})')
  depth = m.get('mtp_depth', 0)
  _check(isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0,
         f'model.mtp_depth={depth!r}: must be an integer >= 0 (0 = off)')
  _check(not depth or not m.num_memory_tokens,
         f'model.mtp_depth={depth} with model.num_memory_tokens='
         f'{m.num_memory_tokens}: the MTP modules do not take memory tokens; set '
         'one of them to 0')
  _validate_layer_pattern(m)
  _validate_gpt_oss_mlp(m)
  base = m.get('mup_base_width')
  if base is not None:
    _check(isinstance(base, int) and base > 0,
           f'model.mup_base_width={base!r}: must be None or a positive integer')
    _check(m.attn_scale is None, f'model.attn_scale={m.attn_scale} and '
           'model.mup_base_width are both set: muP fixes the attention scale '
           '(set model.attn_scale=None)')
  for field in ('mup_input_mult', 'mup_output_mult'):
    if field in m:
      _check(m[field] > 0, f'model.{field}={m[field]}: must be positive')


def _validate_rope_fraction(m: ml_collections.ConfigDict, head_dim: int, mla: bool) -> None:
  """model.rope_fraction: partial rotary on standard and differential attention."""
  fraction = m.get('rope_fraction', 1.0)
  _check(isinstance(fraction, (int, float)) and 0 < fraction <= 1,
         f'model.rope_fraction={fraction!r}: must be in (0, 1] (1.0 rotates the whole head)')
  if fraction == 1:
    return
  _check(m.position == 'rope', f'model.rope_fraction={fraction} with model.position='
         f"{m.position!r}: partial rotary needs position='rope' (or set rope_fraction=1.0)")
  _check(not mla, f'model.rope_fraction={fraction} with attention_type=\'mla\': MLA sets '
         'its rotated width with model.mla_qk_rope_head_dim; set rope_fraction=1.0')
  dim = int(head_dim * fraction)
  _check(dim > 0 and dim % 2 == 0,
         f'model.rope_fraction={fraction}: rotates int({head_dim} * {fraction}) = {dim} '
         'features of each head, which must be a positive even count; pick a fraction '
         'that gives one')
def _validate_gpt_oss_mlp(m: ml_collections.ConfigDict) -> None:
  """The clamped SwiGLU and router-bias fields (GPT-OSS; model/mlp.py, model/moe.py)."""
  alpha, limit = m.get('mlp_swiglu_alpha', 1.702), m.get('mlp_swiglu_limit', 7.0)
  for field, value in (('mlp_swiglu_alpha', alpha), ('mlp_swiglu_limit', limit)):
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
           f'model.{field}={value!r}: must be a positive number')
  if m.mlp_activation == 'clamped_swiglu':
    _check(m.mlp_gated, "model.mlp_activation='clamped_swiglu' with model.mlp_gated=False: "
           'the clamped SwiGLU is a gated unit (gate and up projections); set '
           "model.mlp_gated=True or pick another mlp_activation")
  elif (alpha, limit) != (1.702, 7.0):
    _check(False, f'model.mlp_swiglu_alpha={alpha!r}, model.mlp_swiglu_limit={limit!r} '
           f'with model.mlp_activation={m.mlp_activation!r}: they only act with '
           "mlp_activation='clamped_swiglu'; set it or leave them at 1.702 and 7.0")
  router_bias = m.get('moe_router_bias', False)
  _check(isinstance(router_bias, bool),
         f'model.moe_router_bias={router_bias!r}: must be True or False')
  _check(not router_bias or m.num_experts > 0,
         'model.moe_router_bias=True with model.num_experts=0: a dense model has no '
         'router; set num_experts > 0 or moe_router_bias=False')


def _validate_layer_pattern(m: ml_collections.ConfigDict) -> None:
  """model.layer_pattern and the Gated DeltaNet fields (model/gdn.py)."""
  pattern = m.get('layer_pattern', '') or ''
  _check(isinstance(pattern, str) and set(pattern) <= {'A', 'L'},
         f'model.layer_pattern={pattern!r}: must be a string of A (attention) and '
         "L (Gated DeltaNet) letters, e.g. 'LLLA'; '' means all attention")
  if 'L' not in pattern:
    return
  for field in ('gdn_num_heads', 'gdn_head_dim', 'gdn_v_head_dim'):
    _check(m[field] is None or m[field] > 0,
           f'model.{field}={m[field]}: must be None or positive')
  heads = m.gdn_num_heads or m.num_heads
  if m.gdn_head_dim is None:
    _check(m.d_model % heads == 0,
           f'model.d_model={m.d_model}, Gated DeltaNet heads={heads}: d_model must be a '
           'multiple of the heads when model.gdn_head_dim is None')
  _check(m.gdn_conv_width >= 1, f'model.gdn_conv_width={m.gdn_conv_width}: must be >= 1')
  v_heads = m.get('gdn_num_v_heads')
  _check(v_heads is None or (v_heads > 0 and v_heads % heads == 0),
         f'model.gdn_num_v_heads={v_heads}: must be None or a positive multiple of the '
         f'Gated DeltaNet q/k heads ({heads}, model.gdn_num_heads or model.num_heads)')
  _check(m.num_memory_tokens == 0,
         f'model.num_memory_tokens={m.num_memory_tokens} with Gated DeltaNet layers '
         f'(model.layer_pattern={pattern!r}): memory tokens are an attention '
         'feature; set model.num_memory_tokens=0 or drop the L letters')


def _validate_mla(m: ml_collections.ConfigDict) -> None:
  """model.attention_type='mla': its fields, and the flags it does not take."""
  for field in ('mla_kv_lora_rank', 'mla_v_head_dim'):
    _check(isinstance(m[field], int) and m[field] > 0,
           f'model.{field}={m[field]!r}: must be a positive integer')
  for field in ('mla_q_lora_rank', 'mla_qk_nope_head_dim', 'mla_qk_rope_head_dim'):
    _check(isinstance(m[field], int) and m[field] >= 0,
           f'model.{field}={m[field]!r}: must be an integer >= 0')
  _check(m.mla_qk_nope_head_dim + m.mla_qk_rope_head_dim > 0,
         'model.mla_qk_nope_head_dim + model.mla_qk_rope_head_dim must be positive')
  if m.position == 'rope':
    _check(m.mla_qk_rope_head_dim > 0 and m.mla_qk_rope_head_dim % 2 == 0,
           f'model.mla_qk_rope_head_dim={m.mla_qk_rope_head_dim}: MLA with '
           'model.position=rope needs a positive, even rope head dim')
  why = "with model.attention_type='mla'"
  _check(m.num_kv_heads == m.num_heads,
         f'model.num_kv_heads={m.num_kv_heads} {why}: MLA has no shared KV heads (every '
         'head up-projects its keys and values from the one latent); set '
         f'model.num_kv_heads={m.num_heads} (= num_heads)')
  _check(m.head_dim is None,
         f'model.head_dim={m.head_dim} {why}: MLA head dims are model.mla_qk_nope_head_dim, '
         'mla_qk_rope_head_dim and mla_v_head_dim; set model.head_dim=None')
  _check(not m.qk_norm, f'model.qk_norm=True {why}: MLA already normalises its query '
         'and key/value latents (RMSNorm before the up-projections); set model.qk_norm=False')
  _check(not m.use_bias, f'model.use_bias=True {why}: MLA projections have no biases '
         '(as DeepSeek); set model.use_bias=False')
  _check(m.attention_impl != 'cudnn', f"model.attention_impl='cudnn' {why}: the cuDNN "
         'path is not set up for a value head dim different from the query/key one; '
         'use model.attention_impl=auto, xla or pallas')


def _validate_differential(m: ml_collections.ConfigDict) -> None:
  """model.attention_type='differential': heads pair up; what it does not take."""
  why = "with model.attention_type='differential'"
  _check(m.num_heads % 2 == 0,
         f'model.num_heads={m.num_heads} {why}: the heads pair up into num_heads/2 '
         'differential heads; set an even model.num_heads')
  _check(m.get('attention_gate', 'none') != 'headwise',
         f"model.attention_gate='headwise' {why}: a gate per head would gate half a "
         "differential head; use model.attention_gate='elementwise' or 'none'")
  _check(m.attention_impl != 'cudnn', f"model.attention_impl='cudnn' {why}: the cuDNN "
         'path is not set up for a value head dim (2 head_dim) different from the '
         'query/key one; use model.attention_impl=auto, xla or pallas')


def eval_task_specs(spec, field: str = 'eval.tasks') -> list[tuple[str, int | None, str | None]]:
  """`next_line,passkey@512,hs:/data/hs.jsonl` -> [(name, length, path)].

  A built-in is NAME or NAME@N (N: context tokens; copy and passkey only);
  a task file is NAME:PATH (NAME is its tag, not a built-in's name).
  """
  items = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec)]
  out, names = [], set()
  for item in (i for i in items if i):
    name, sep, path = item.partition(':')
    base, at, length = name.partition('@')
    _check(base and all(c.isalnum() or c in '_-.' for c in base),
           f'{field}: bad task name {name!r} in {item!r}')
    if sep:
      _check(path and not at, f'{field}: {item!r} must be NAME:PATH')
      _check(base not in EVAL_BUILTIN_TASKS,
             f'{field}: {base!r} is a built-in task; name the file {base}_file:{path}')
      out.append((name, None, path))
    else:
      _check(base in EVAL_BUILTIN_TASKS, f'{field}: unknown task {name!r}: use one of '
             f'{", ".join(EVAL_BUILTIN_TASKS)} (copy@N, passkey@N) or NAME:PATH')
      _check(not at or (base != 'next_line' and length.isdigit() and int(length) >= 32),
             f'{field}: {name!r}: N in {base}@N must be an integer >= 32' if base !=
             'next_line' else f'{field}: next_line takes no @N (its context is train.seq_len)')
      out.append((name, int(length) if at else None, None))
    _check(name not in names, f'{field}: task {name!r} is listed twice')
    names.add(name)
  return out


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks the whole config; raises ConfigError naming the bad field."""
  validate_model(cfg.model)
  for path, choices in CHOICES.items():
    section, field = path.split('.')
    if section != 'model' and section in cfg and field in cfg[section]:
      value = cfg[section][field]
      _check(value in choices, f'{path}={value!r}: must be one of {", ".join(choices)}')
  t = cfg.train
  for field in ('steps', 'global_batch_size', 'seq_len', 'grad_accum_steps',
                'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
    _check(isinstance(t[field], int) and t[field] > 0,
           f'train.{field}={t[field]!r}: must be a positive integer')
  _check(t.global_batch_size % t.grad_accum_steps == 0,
         f'train.global_batch_size={t.global_batch_size}, train.grad_accum_steps='
         f'{t.grad_accum_steps}: the batch must divide into the accumulation steps')
  _check(t.learning_rate > 0, f'train.learning_rate={t.learning_rate}: must be positive')
  _check(0 <= t.min_lr_ratio <= 1, f'train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]')
  _check(t.warmup_steps >= 0, f'train.warmup_steps={t.warmup_steps}: must be >= 0')
  _check(0 <= t.adam_b1 < 1 and 0 <= t.adam_b2 < 1, 'train.adam_b1 and train.adam_b2 must be in [0, 1)')
  for field in ('b1', 'b2', 'momentum'):
    v = t.get(field)
    _check(v is None or 0 <= v < 1, f'train.{field}={v}: must be None or in [0, 1)')
  _check(t.get('eps', 1e-8) > 0, f'train.eps={t.get("eps")}: must be positive')
  _check(t.get('muon_adam_lr') is None or t.muon_adam_lr > 0,
         f'train.muon_adam_lr={t.get("muon_adam_lr")}: must be None or positive')
  optimizer = t.get('optimizer', 'adamw')
  # Nothing silently ignored: a hyperparameter the chosen rule does not read.
  unused = {'b1': ('sgd',), 'b2': ('adafactor', 'sgd'),
            'momentum': ('adamw', 'lion', 'adafactor', 'schedule_free_adamw'),
            'nesterov': ('adamw', 'lion', 'adafactor', 'schedule_free_adamw'),
            'muon_adam_lr': ('adamw', 'lion', 'adafactor', 'sgd', 'schedule_free_adamw')}
  for field, rules in unused.items():
    _check(t.get(field) is None or optimizer not in rules,
           f'train.{field}={t.get(field)} has no effect with train.optimizer='
           f'{optimizer!r}: leave it None')
  if optimizer == 'schedule_free_adamw':
    _check(t.lr_schedule == 'constant',
           f"train.optimizer='schedule_free_adamw' needs no decay schedule: set "
           f"train.lr_schedule=constant (now {t.lr_schedule!r}; the warmup is kept)")
  if cfg.model.get('mup_base_width') is not None:
    _check(optimizer in ('adamw', 'lion', 'muon', 'schedule_free_adamw'),
           f'train.optimizer={optimizer!r} with model.mup_base_width: the muP '
           'learning-rate table is implemented for adamw, lion, muon and '
           'schedule_free_adamw only')
  _check(t.eval_steps >= 0, f'train.eval_steps={t.eval_steps}: must be >= 0')
  _check(t.seq_len <= cfg.model.max_seq_len or cfg.model.position not in ('learned',),
         f'train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} '
         'with learned positions')
  expert = cfg.mesh.get('expert', 1)
  if cfg.model.get('moe_dispatch') == 'all_to_all':
    _check(cfg.model.num_experts > 0 and expert != 1,
           "model.moe_dispatch='all_to_all' needs an MoE model (model.num_experts > 0) "
           f'on a mesh with an expert axis (mesh.expert={expert})')
    _check(expert == -1 or cfg.model.num_experts % expert == 0,
           f"model.moe_dispatch='all_to_all': model.num_experts={cfg.model.num_experts} "
           f'must be a multiple of mesh.expert={expert}')
  mesh_axes = [a for a in ('data', 'fsdp', 'context', 'tensor', 'expert') if a in cfg.mesh]
  for axis in mesh_axes:
    v = cfg.mesh[axis]
    _check(v == -1 or (isinstance(v, int) and v > 0),
           f'mesh.{axis}={v!r}: must be a positive integer or -1')
  free = [f'mesh.{a}=-1' for a in mesh_axes if cfg.mesh[a] == -1]
  context = cfg.mesh.get('context', 1)
  _check(context == 1 or (context > 1 and t.seq_len % context == 0),
         f'mesh.context={context}: must be a positive divisor of train.seq_len='
         f'{t.seq_len} (each device holds seq_len / context positions)')
  _check(len(free) <= 1, f'{", ".join(free)}: at most one mesh axis may be -1')
  if context != 1 and cfg.model.attention_impl in ('pallas', 'cudnn'):
    # model/context_parallel.py: the kernel per chunk pair takes no global offsets.
    offsets = [name for name, on in (('model.sliding_window', cfg.model.sliding_window),
                                     ("model.position='alibi'", cfg.model.position == 'alibi'),
                                     ('model.num_memory_tokens', cfg.model.num_memory_tokens))
               if on]
    _check(cfg.model.attention_impl == 'pallas' and not offsets,
           f'model.attention_impl={cfg.model.attention_impl!r} with mesh.context={context}: '
           + ('cuDNN has no context-parallel path' if cfg.model.attention_impl == 'cudnn'
              else f'the flash kernel has no context-parallel path with {", ".join(offsets)}')
           + '; use model.attention_impl=xla or auto')
  _check(isinstance(t.get('init_checkpoint', ''), str),
         f'train.init_checkpoint={t.get("init_checkpoint")!r}: must be a path '
         '(a workdir or a checkpoints/STEP folder) or empty')
  if 'rollback_lr_scale' in t:
    _check(0 < t.rollback_lr_scale <= 1,
           f'train.rollback_lr_scale={t.rollback_lr_scale}: must be in (0, 1]')
  if 'max_rollbacks' in t:
    _check(isinstance(t.max_rollbacks, int) and t.max_rollbacks >= 0,
           f'train.max_rollbacks={t.max_rollbacks!r}: must be an integer >= 0')
  chunk = t.get('loss_chunk_size')
  _check(chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0),
         f'train.loss_chunk_size={chunk!r}: must be None or a positive integer')
  rate = t.get('moe_bias_update_rate', 0.0)
  _check(isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 0,
         f'train.moe_bias_update_rate={rate!r}: must be a number >= 0 (0 = off)')
  _check(not rate or (cfg.model.num_experts > 0 and cfg.model.get('moe_router') == 'sigmoid'),
         f'train.moe_bias_update_rate={rate} needs an MoE model with the sigmoid router '
         "(model.num_experts > 0, model.moe_router='sigmoid'), whose layers carry the "
         'selection bias; or set it to 0')
  mtp_weight = t.get('mtp_loss_weight', 0.0)
  _check(isinstance(mtp_weight, (int, float)) and not isinstance(mtp_weight, bool)
         and mtp_weight >= 0,
         f'train.mtp_loss_weight={mtp_weight!r}: must be a number >= 0')
  if t.get('spike_threshold') is not None:
    _check(t.spike_threshold > 0,
           f'train.spike_threshold={t.spike_threshold}: must be None or positive')
  if 'eval' in cfg:
    _check(isinstance(cfg.eval.tasks, str), f'eval.tasks={cfg.eval.tasks!r}: must be a '
           'comma-separated string of tasks')
    tasks = eval_task_specs(cfg.eval.tasks)
    _check(isinstance(cfg.eval.task_limit, int) and cfg.eval.task_limit >= 0,
           f'eval.task_limit={cfg.eval.task_limit!r}: must be an integer >= 0 (0 = all)')
    _check(not tasks or t.eval_steps > 0, 'eval.tasks is set but train.eval_steps=0: '
           'tasks run with the eval; set train.eval_steps > 0')
  tok = cfg.data.tokenizer
  _check(tok == 'bytes' or tok.startswith(('sentencepiece:', 'hf:')),
         f'data.tokenizer={tok!r}: must be bytes, sentencepiece:PATH or hf:PATH')
  mix = cfg.data.get('mixture', '')
  if mix:
    _check(isinstance(mix, (str, list, tuple)),
           f'data.mixture={mix!r}: must be a name:path:weight,... string or a '
           'list of {name, path, weight} dicts')
    _check(not cfg.data.train_files.strip() and not cfg.data.eval_files.strip(),
           'data.mixture is set and so is data.train_files or data.eval_files: a '
           'mixture names its own sources (and reads their eval splits); leave '
           'the files empty')
    _check(cfg.data.source not in ('synthetic', 'sft'),
           f'data.mixture is set but data.source={cfg.data.source!r}: mixtures '
           'are of documents (prepared folders or text, jsonl, parquet, arrayrecord files)')
  _check(cfg.dpo.beta > 0, f'dpo.beta={cfg.dpo.beta}: must be positive')
  _check(0 <= cfg.dpo.label_smoothing < 0.5,
         f'dpo.label_smoothing={cfg.dpo.label_smoothing}: must be in [0, 0.5)')
  _check(cfg.dpo.label_smoothing == 0 or cfg.dpo.loss in ('sigmoid', 'robust', 'rpo'),
         f'dpo.label_smoothing={cfg.dpo.label_smoothing} is used by dpo.loss sigmoid, '
         f'robust and rpo only (dpo.loss={cfg.dpo.loss!r}); set it to 0')
  for field in ('nll_weight', 'simpo_gamma'):
    value = cfg.dpo.get(field, 0.0)
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
           f'dpo.{field}={value!r}: must be a number >= 0')
  precompute = cfg.dpo.get('precompute_reference', False)
  _check(isinstance(precompute, bool),
         f'dpo.precompute_reference={precompute!r}: must be True or False')
  _check(not (precompute and cfg.dpo.reference_free),
         'dpo.precompute_reference and dpo.reference_free are both set: a '
         'reference-free run has no reference log-probs to precompute')
  _check(not (precompute and cfg.dpo.loss in ('simpo', 'orpo')),
         f'dpo.precompute_reference is set but dpo.loss={cfg.dpo.loss!r} is '
         'reference-free: there are no reference log-probs to precompute')
