"""The optimizer: AdamW with masked decoupled weight decay, clipping, LR schedules.

- AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019)
  through `optax.adamw`; the decay is multiplied by the learning rate, as in
  PyTorch and optax, so it follows the schedule.
- Weight decay applies only to weight matrices, decided from each parameter's
  logical axes: a weight matrix maps the model width (`embed`) to another
  space or back, so it has an `embed` axis and at least one more axis other
  than `experts` (which only stacks one matrix per expert); it has no `norm`
  axis, and it is not a lookup table (token embeddings: first axis `vocab`;
  learned positions and memory tokens: first axis None). Skipped therefore:
  norm scales, all biases (including per-head (`heads`, `head_dim`) and
  per-expert (`experts`, `embed`) ones) and embeddings. A tied embedding is a
  lookup table and is not decayed; an untied output head (`embed`, `vocab`) and
  the MoE router (`embed`, None) are matrices and are. Parameters without
  `logical_axes` metadata are decayed iff they have 2 or more dimensions. This
  is the split of nanoGPT, OLMo and most LLM recipes.
- Gradient clipping by global norm (Pascanu et al., 2013) before Adam.
- Schedules, all with a linear warmup from 0 over `warmup_steps` and built from
  optax blocks: `cosine` (Loshchilov & Hutter, SGDR, 2017) and `linear` decay to
  `min_lr_ratio * learning_rate` at the last step, `constant`, and `wsd`
  (warmup-stable-decay: Hu et al., MiniCPM, 2024; Hägele et al., 2024): constant
  until the last `decay_fraction` of the steps, then linear decay to the
  minimum.

Step numbering: the n-th optimizer update (n = 1 .. train.steps) uses `lr(n)`,
so warmup reaches the peak exactly at step `warmup_steps` and the first update
is not wasted at a learning rate of 0. In formulas, with peak P, minimum
m = min_lr_ratio * P, warmup W and N steps:

    warmup  (n <= W):  P * n / W
    cosine  (n >  W):  m + (P - m) * (1 + cos(pi * (n - W) / (N - W))) / 2
    linear  (n >  W):  P + (m - P) * (n - W) / (N - W)
    constant(n >  W):  P
    wsd     (n >  W):  P until n = N - D, then P + (m - P) * (n - (N - D)) / D,
                       D = round(decay_fraction * N)
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import configs
from train import sharding


def make_schedule(train_cfg) -> optax.Schedule:
  """The learning rate as a function of optax's update count (0-based)."""
  peak = float(train_cfg.learning_rate)
  low = peak * float(train_cfg.min_lr_ratio)
  total = int(train_cfg.steps)
  warmup = min(int(train_cfg.warmup_steps), total)
  kind = train_cfg.lr_schedule
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay_steps = max(total - warmup, 1)
  if kind == 'cosine':
    base = optax.join_schedules(
        [ramp, optax.cosine_decay_schedule(peak, decay_steps, alpha=low / peak)],
        [warmup])
  elif kind == 'linear':
    base = optax.join_schedules([ramp, optax.linear_schedule(peak, low, decay_steps)],
                                [warmup])
  elif kind == 'constant':
    base = optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
  elif kind == 'wsd':
    fraction = float(train_cfg.get('decay_fraction', 0.2))
    if not 0 < fraction <= 1:
      raise configs.ConfigError(f'train.decay_fraction={fraction}: must be in (0, 1]')
    decay = max(int(round(fraction * total)), 1)
    start = max(total - decay, warmup)
    base = optax.join_schedules(
        [ramp, optax.constant_schedule(peak),
         optax.linear_schedule(peak, low, max(total - start, 1))],
        [warmup, start])
  else:
    raise configs.ConfigError(f'train.lr_schedule={kind!r}: must be one of '
                              'cosine, linear, constant, wsd')
  # optax counts updates from 0; update n (1-based) uses base(n).
  return lambda count: base(count + 1)


def decays(logical_axes, ndim: int) -> bool:
  """The weight-decay rule of the module docstring, for one parameter."""
  if ndim < 2:
    return False
  if logical_axes is None:
    return True
  if 'norm' in logical_axes or 'embed' not in logical_axes:
    return False                # norm scales; biases such as (heads, head_dim)
  if logical_axes[0] in ('vocab', None):
    return False                # lookup tables: tokens (tied head), positions, memory
  others = [a for a in logical_axes if a not in ('embed', 'experts')]
  return bool(others)           # (experts, embed) is a per-expert bias


def decay_mask(params):
  """A tree prefix of `params`: True where weight decay applies."""
  def one(leaf):
    if sharding.is_variable(leaf):
      return decays(sharding.logical_axes_of(leaf), len(leaf.shape))
    return jnp.ndim(leaf) >= 2
  return jax.tree.map(one, params, is_leaf=sharding.is_variable)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW with the masked decay; and the schedule.

  The optimizer expects float32 gradients and parameters (the train step
  upcasts), so its moments are float32 whatever `model.param_dtype` is.
  """
  schedule = make_schedule(train_cfg)
  clip = float(train_cfg.grad_clip_norm or 0)
  # Clipping at inf when it is off keeps the optimizer state's structure the
  # same either way, so a run may resume with clipping switched on or off.
  return optax.chain(
      optax.clip_by_global_norm(clip if clip > 0 else float('inf')),
      optax.adamw(schedule, b1=float(train_cfg.adam_b1), b2=float(train_cfg.adam_b2),
                  eps=1e-8, weight_decay=float(train_cfg.weight_decay), mask=decay_mask),
  ), schedule


def trainable(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """Splits a model into (graphdef, params, other state); only Params train."""
  return nnx.split(model, nnx.Param, ...)
