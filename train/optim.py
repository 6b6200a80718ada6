"""The optimizer: parameter groups, six update rules, clipping, LR schedules.

`make_optimizer(cfg.train, cfg.model)` returns (optax transformation, schedule):
global-norm clipping (Pascanu et al., 2013), then one update rule per
parameter group. `train.optimizer` picks the rule:

- `adamw`: Adam (Kingma & Ba 2015) with decoupled weight decay (Loshchilov &
  Hutter 2019), optax's `scale_by_adam`; betas `train.b1`/`train.b2`.
- `lion`: the sign of an interpolated momentum (Chen et al. 2023, "Symbolic
  Discovery of Optimization Algorithms"), optax's `scale_by_lion`; paper
  defaults b1=0.9, b2=0.99. Its steps have RMS 1: use a 3-10x smaller LR than
  AdamW (the paper's advice).
- `adafactor`: factored second moments (Shazeer & Stern 2018): every >= 2-D
  parameter keeps a row and a column mean of g^2 (optax's
  `scale_by_factored_rms`, decay 1 - t^-0.8), updates clipped to block RMS 1,
  no momentum unless `train.b1` is set. Relative step sizes (the paper's
  parameter-scale multiplier) are off: `train.learning_rate` is an absolute
  step, as for the other rules.
- `sgd`: momentum SGD (`train.momentum`, default 0.9; `train.nesterov` for
  Nesterov's form), optax's `trace`.
- `muon`: Momentum Orthogonalized by Newton-Schulz (Jordan et al. 2024;
  Liu et al. 2025, "Muon is Scalable for LLM Training" = Moonlight) on the
  hidden matrices; every other group uses AdamW at `train.muon_adam_lr`. See
  `scale_by_muon` for the details (momentum 0.95, Nesterov, 5 quintic
  Newton-Schulz steps, multi-head projections as one matrix, per-expert
  matrices, the `moonlight` / `spectral` scaling).
- `schedule_free_adamw` (Defazio et al. 2024, "The Road Less Scheduled"):
  optax's `schedule_free` around the RMS-scaled step of each group (AdamW
  without its momentum). It needs no decay schedule (`train.lr_schedule` must
  be `constant`; the warmup is kept). The train state's `params` hold the
  averaged weights x, which every reader of a checkpoint (evaluation,
  sampling, export, fine-tuning) should use; the train step moves to the
  gradient point y = b1 x + (1 - b1) z and back (`train_point`/`stored_point`).

Betas: `train.b1`/`train.b2` win when set; when None (the default) the Adam
family (adamw, muon's AdamW groups, schedule_free_adamw) uses the older
`train.adam_b1`/`train.adam_b2`, lion uses its paper's 0.9/0.99 and adafactor
has no momentum.

Parameter groups are data: `GROUP_RULES` sends every parameter to a group by
its logical axes and path; `group_settings` gives each group its update rule,
weight decay and learning-rate multiplier (muP, `model.mup_base_width`, sets
the multipliers of Yang et al. 2022, Table 3: Adam's hidden matrices learn at
lr / m with m = d_model / mup_base_width; embeddings, head, norms and biases
at lr). `describe_groups` is the table the trainer logs at start-up.

Weight decay is decoupled and multiplied by the learning rate (PyTorch and
optax), so it follows the schedule and the group's multiplier. Decayed: the
`matrix`, `head` and `router` groups; never: norms, biases, embeddings
(tokens, learned positions, memory tokens), as nanoGPT, OLMo and most LLM
recipes. Parameters without `logical_axes` are `matrix` iff >= 2-D.

Schedules, all with a linear warmup from 0 over `warmup_steps` and built from
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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import configs
from model import mup
from train import sharding

OPTIMIZERS = ('adamw', 'lion', 'adafactor', 'sgd', 'muon', 'schedule_free_adamw')
MUON_SCALES = ('moonlight', 'spectral')
# Keller Jordan's quintic: a, b, c of X <- a X + (b A + c A^2) X, A = X X^T.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MUON_MOMENTUM = 0.95


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


# ----------------------------------------------------------------------------
# Parameter groups.


def _is_lookup(path, axes, ndim):
  # Token table (vocab, embed); learned positions and memory tokens (None, embed).
  return ndim >= 2 and 'embed' in axes and axes[0] in ('vocab', None)


def _is_bias(path, axes, ndim):
  # Vectors, per-head (heads, head_dim) and per-expert (experts, embed|mlp) biases:
  # nothing that maps the model width to another space.
  others = [a for a in axes if a not in ('embed', 'experts', 'layers')]
  return ndim < 2 or 'embed' not in axes or not others


# (group, what it holds, test on (path, logical axes, ndim)); the first match wins.
GROUP_RULES = (
    ('norm', 'norm scales and offsets (axis `norm`)',
     lambda path, axes, ndim: 'norm' in axes),
    ('embedding', 'lookup tables: tokens, learned positions, memory tokens',
     _is_lookup),
    ('bias', 'biases (no `embed` axis, or only `embed`/`experts`)', _is_bias),
    ('head', 'untied output head (embed, vocab)',
     lambda path, axes, ndim: tuple(axes) == ('embed', 'vocab')),
    ('router', 'MoE router (path ends in `router`)',
     lambda path, axes, ndim: path.endswith('router')),
    ('matrix', 'hidden matrices: attention and MLP projections, experts',
     lambda path, axes, ndim: True),
)
GROUPS = tuple(g for g, _, _ in GROUP_RULES)
DECAYED_GROUPS = ('matrix', 'head', 'router')


def group_of(path: str, logical_axes, ndim: int) -> str:
  """The group of one parameter (`GROUP_RULES`)."""
  if logical_axes is None:
    return 'matrix' if ndim >= 2 else 'bias'
  for name, _, test in GROUP_RULES:
    if test(path, tuple(logical_axes), ndim):
      return name
  raise AssertionError('the last rule matches everything')


def decays(logical_axes, ndim: int) -> bool:
  """Whether a parameter with these logical axes gets weight decay."""
  return group_of('', logical_axes, ndim) in DECAYED_GROUPS


def _variables(params, fn):
  """fn(path, variable_or_array) at each parameter: a tree prefix of `params`."""
  def one(path, leaf):
    name = sharding._path_name(path)  # pylint: disable=protected-access
    return fn(name, leaf)
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=sharding.is_variable)


def _axes_of(leaf):
  return sharding.logical_axes_of(leaf) if sharding.is_variable(leaf) else None


def group_labels(params):
  """A tree prefix of `params`: each parameter's group name."""
  return _variables(params, lambda name, leaf: group_of(
      name, _axes_of(leaf), len(leaf.shape)))


def decay_mask(params):
  """A tree prefix of `params`: True where weight decay applies."""
  return jax.tree.map(lambda g: g in DECAYED_GROUPS, group_labels(params))


class GroupSettings(NamedTuple):
  rule: str            # the update rule: adamw, lion, adafactor, sgd, muon, rms
  decay: float         # decoupled weight decay (times the learning rate)
  lr_mult: float       # the group's learning rate = lr_mult * schedule


def group_settings(train_cfg, model_cfg=None) -> dict[str, GroupSettings]:
  """Each group's update rule, weight decay and learning-rate multiplier."""
  kind = train_cfg.get('optimizer', 'adamw')
  wd = float(train_cfg.weight_decay)
  m = 1.0 if model_cfg is None else mup.width_mult(model_cfg)
  lr = float(train_cfg.learning_rate)
  adam_lr = train_cfg.get('muon_adam_lr')
  out = {}
  for group in GROUPS:
    rule = {'schedule_free_adamw': 'rms'}.get(kind, kind)
    mult = 1.0
    if kind == 'muon':
      rule = 'muon' if group == 'matrix' else 'adamw'
      if group != 'matrix' and adam_lr is not None:
        mult = float(adam_lr) / lr
    # muP (Yang et al. 2022, Table 3, Adam): hidden matrices (and the router,
    # an output-like matrix of fan_in d_model) learn at 1/m; vector-like
    # parameters (embeddings, biases, norms) at 1; the head at 1 because the
    # decoder multiplies its logits by 1/m. Muon with the spectral scaling is
    # width-independent already (Bernstein et al.'s spectral condition).
    if group in ('matrix', 'router') and not (
        rule == 'muon' and train_cfg.get('muon_scale', 'moonlight') == 'spectral'):
      mult /= m
    out[group] = GroupSettings(rule, wd if group in DECAYED_GROUPS else 0.0, mult)
  return out


def describe_groups(params, train_cfg, model_cfg=None) -> list[str]:
  """The start-up table: group, tensors, parameters, rule, decay, learning rate."""
  settings = group_settings(train_cfg, model_cfg)
  labels = group_labels(params)
  counts = {g: [0, 0] for g in GROUPS}
  sizes = _variables(params, lambda name, leaf: math.prod(leaf.shape))
  for g, n in zip(jax.tree.leaves(labels), jax.tree.leaves(sizes)):
    counts[g][0] += 1
    counts[g][1] += n
  lr = float(train_cfg.learning_rate)
  lines = [f'{"group":10s} {"tensors":>7s} {"params":>10s} {"rule":>6s} '
           f'{"decay":>6s} {"lr":>9s}']
  for g in GROUPS:
    if counts[g][0]:
      s = settings[g]
      lines.append(f'{g:10s} {counts[g][0]:7d} {counts[g][1]:10,d} {s.rule:>6s} '
                   f'{s.decay:6.3g} {lr * s.lr_mult:9.3g}')
  return lines


# ----------------------------------------------------------------------------
# Muon.


def muon_dims(logical_axes, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, fan-in, fan-out) axes of a hidden matrix from its logical axes.

  `experts` axes are batch (one matrix per expert). The `embed` side is
  fan-in when it comes first ((embed, heads, head_dim) -> the n*h columns
  of all heads together), fan-out when it comes last ((heads, head_dim,
  embed) -> all heads' rows together): a multi-head projection is
  orthogonalised as the one d_model x (heads * head_dim) matrix it is.
  """
  axes = tuple(logical_axes) if logical_axes is not None else (None,) * ndim
  batch = tuple(i for i, a in enumerate(axes) if a in ('experts', 'layers'))
  rest = [i for i in range(ndim) if i not in batch]
  if 'embed' in axes and axes.index('embed') == rest[-1] and len(rest) > 1:
    return batch, tuple(rest[:-1]), (rest[-1],)
  return batch, (rest[0],), tuple(rest[1:])


def newton_schulz(x: jax.Array, steps: int = NS_STEPS, coeffs=NS_COEFFS,
                  eps: float = 1e-7) -> jax.Array:
  """The orthogonal factor U V^T of x [rows, cols] (approximately: singular
  values land in about [0.7, 1.2]), by the quintic Newton-Schulz iteration in
  float32 (bf16-safe: inputs are upcast)."""
  a, b, c = coeffs
  x = x.astype(jnp.float32)
  wide = x.shape[0] <= x.shape[1]
  if not wide:
    x = x.T
  x = x / (jnp.linalg.norm(x) + eps)           # spectral norm <= Frobenius <= 1
  for _ in range(steps):
    gram = x @ x.T                              # [rows, rows], rows <= cols
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


def orthogonalize(update: jax.Array, logical_axes, scale: str) -> jax.Array:
  """Newton-Schulz on each matrix of `update` (batch axes vmapped), times the
  scaling `moonlight` 0.2 sqrt(max(fan_in, fan_out)) or `spectral`
  sqrt(max(1, fan_out / fan_in))."""
  batch, fan_in_axes, fan_out_axes = muon_dims(logical_axes, update.ndim)
  order = batch + fan_in_axes + fan_out_axes
  fan_in = math.prod(update.shape[i] for i in fan_in_axes)
  fan_out = math.prod(update.shape[i] for i in fan_out_axes)
  moved = jnp.transpose(update, order)
  flat = moved.reshape(-1, fan_in, fan_out)
  ortho = jax.vmap(newton_schulz)(flat).reshape(moved.shape)
  if scale == 'moonlight':
    factor = 0.2 * math.sqrt(max(fan_in, fan_out))
  else:
    factor = math.sqrt(max(1.0, fan_out / fan_in))
  return (factor * jnp.transpose(ortho, tuple(order.index(i) for i in range(update.ndim)))
          ).astype(update.dtype)


def scale_by_muon(momentum: float = MUON_MOMENTUM, nesterov: bool = True,
                  scale: str = 'moonlight') -> optax.GradientTransformation:
  """Muon's direction: momentum, orthogonalised per matrix, then scaled.

  The momentum is optax's `trace` (buf = momentum * buf + g; Nesterov:
  g + momentum * buf): Jordan's EMA form ((1 - momentum) times both) up to a
  constant factor, which the Newton-Schulz normalisation removes.
  `optax.contrib.scale_by_muon` cannot take per-parameter dimension numbers
  through nnx Variables, so the orthogonalisation reads each parameter's
  logical axes here (`muon_dims`).
  """
  base = optax.trace(decay=momentum, nesterov=nesterov)

  def update_fn(updates, state, params=None):
    direction, state = base.update(updates, state, params)

    def one(variable):
      if not sharding.is_variable(variable):
        return orthogonalize(variable, None, scale)
      value = orthogonalize(variable[...], sharding.logical_axes_of(variable), scale)
      return variable.replace(value)

    return jax.tree.map(one, direction, is_leaf=sharding.is_variable), state

  return optax.GradientTransformation(base.init, update_fn)


# ----------------------------------------------------------------------------
# The optimizer.


def betas(train_cfg) -> tuple[float, float]:
  """(b1, b2) of the chosen rule (see the module docstring)."""
  kind = train_cfg.get('optimizer', 'adamw')
  b1, b2 = train_cfg.get('b1'), train_cfg.get('b2')
  if kind == 'lion':
    return (0.9 if b1 is None else b1), (0.99 if b2 is None else b2)
  return (float(train_cfg.adam_b1) if b1 is None else b1,
          float(train_cfg.adam_b2) if b2 is None else b2)


def _rule(rule: str, train_cfg) -> optax.GradientTransformation:
  b1, b2 = betas(train_cfg)
  eps = float(train_cfg.get('eps', 1e-8))
  momentum = train_cfg.get('momentum')
  nesterov = train_cfg.get('nesterov')
  if rule == 'adamw':
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  if rule == 'lion':
    return optax.scale_by_lion(b1=b1, b2=b2)
  if rule == 'rms':             # schedule-free AdamW's base: Adam without momentum
    return optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True)
  if rule == 'sgd':
    return optax.trace(decay=0.9 if momentum is None else momentum,
                       nesterov=bool(nesterov))
  if rule == 'adafactor':
    parts = [optax.scale_by_factored_rms(decay_rate=0.8, min_dim_size_to_factor=1,
                                         epsilon=1e-30),
             optax.clip_by_block_rms(1.0)]
    if train_cfg.get('b1') is not None:
      parts.append(optax.ema(train_cfg.b1, debias=False))
    return optax.chain(*parts)
  if rule == 'muon':
    return scale_by_muon(MUON_MOMENTUM if momentum is None else momentum,
                         True if nesterov is None else bool(nesterov),
                         train_cfg.get('muon_scale', 'moonlight'))
  raise configs.ConfigError(f'train.optimizer: unknown rule {rule!r}')


def make_optimizer(train_cfg, model_cfg=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then each group's rule, decay and learning rate.

  `model_cfg` gives muP's width multiplier (without it, or with
  `model.mup_base_width` None, every multiplier of the standard
  parametrisation is 1). The optimizer expects float32 gradients and
  parameters (the train step upcasts), so its state is float32 whatever
  `model.param_dtype` is.
  """
  kind = train_cfg.get('optimizer', 'adamw')
  if kind not in OPTIMIZERS:
    raise configs.ConfigError(f'train.optimizer={kind!r}: must be one of '
                              f'{", ".join(OPTIMIZERS)}')
  schedule = make_schedule(train_cfg)
  settings = group_settings(train_cfg, model_cfg)
  transforms = {}
  for group, s in settings.items():
    # Decay 0 too: the state's structure must not depend on its value (a
    # run resumes, or DPO restores, with another weight_decay).
    parts = [_rule(s.rule, train_cfg), optax.add_decayed_weights(s.decay)]
    mult = s.lr_mult
    parts.append(optax.scale_by_learning_rate(
        schedule if mult == 1 else (lambda count, mult=mult: mult * schedule(count))))
    transforms[group] = optax.chain(*parts)
  groups = optax.partition(transforms, group_labels)
  if kind == 'schedule_free_adamw':
    b1, _ = betas(train_cfg)
    groups = contrib.schedule_free(groups, learning_rate=schedule, b1=b1)
  clip = float(train_cfg.grad_clip_norm or 0)
  # Clipping at inf when it is off keeps the optimizer state's structure the
  # same either way, so a run may resume with clipping switched on or off.
  return optax.chain(optax.clip_by_global_norm(clip if clip > 0 else float('inf')),
                     groups), schedule


# ----------------------------------------------------------------------------
# Schedule-free: which point the train state stores.


def _schedule_free_state(opt_state):
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, contrib.ScheduleFreeState))
           if isinstance(s, contrib.ScheduleFreeState)]
  return found[0] if found else None


def train_point(opt_state, params):
  """The parameters the gradient is taken at: y = b1 x + (1 - b1) z for
  schedule-free (the state stores x), else `params` itself."""
  sf = _schedule_free_state(opt_state)
  if sf is None:
    return params
  return jax.tree.map(lambda x, z: (sf.b1 * x.astype(jnp.float32) + (1 - sf.b1) * z
                                    ).astype(x.dtype), params, sf.z)


def stored_point(opt_state, params):
  """What the train state stores after an update at y: schedule-free's
  averaged weights x = (y - (1 - b1) z) / b1 (optax's
  `schedule_free_eval_params`), else `params` itself."""
  sf = _schedule_free_state(opt_state)
  if sf is None:
    return params
  x = contrib.schedule_free_eval_params(sf, jax.tree.map(
      lambda p: p.astype(jnp.float32), params))
  return jax.tree.map(lambda p, v: v.astype(p.dtype), params, x)
