"""The train state, the language-model loss, and the pure jitted train/eval steps.

The train state is a plain dict pytree, so orbax saves it as it is:

    {'step': int32 [],                 # optimizer updates done
     'params': nnx.State,              # the model's nnx.Params (param_dtype)
     'opt_state': optax state,         # float32 moments, sharded like params
     'rng': uint32 [2],                # base key; step n uses fold_in(rng, n)
     'model_state': nnx.State}         # the model's other Variables (often empty)

The graph definition (`nnx.GraphDef`) is static and lives outside it. The steps
are `jax.jit` over this pytree with explicit shardings (`nnx.merge` happens
inside the trace, so no Python graph walk runs per step), the state is donated,
and it is created directly sharded by a jitted init.

Losses are pluggable. A loss function has the signature

    loss_fn(model, batch, rng) -> (loss_sum, metrics)
    loss_fn(model, batch, rng, frozen) -> ...     # steps made with frozen_shardings

and returns *sums* over its (micro)batch: `loss_sum` is the objective summed
with the weights it wants, and `metrics` is a dict of weighted sums that must
hold `'weight'` (the count the sums are over: target tokens for a language
model, pairs for DPO). The step adds sums over microbatches and divides by the
total weight, so gradient accumulation is exact: 4 microbatches of 2 rows give
the gradient of the same 8 rows in one (up to float rounding), even when the
microbatches hold different numbers of target tokens. `frozen` is a pytree of
extra inputs every step reads and never trains, passed to the jitted step as
its own, undonated argument (`make_train_step(..., frozen_shardings=...)`):
DPO's reference parameters (`align/loop.py`), whose forward pass then runs in
the loss, one microbatch at a time like the policy's.

The language-model loss (`lm_loss`) is token-mean cross-entropy over
`loss_mask`, plus `z_loss_weight` times the mean of logsumexp(logits)^2 over the
same tokens (PaLM, Chowdhery et al. 2022) and, for MoE models,
`moe_aux_loss_weight` times the load-balancing loss (Switch Transformer, Fedus
et al. 2021) and `moe_router_z_loss_weight` times the router z-loss (ST-MoE,
Zoph et al. 2022), each weighted by the batch's target tokens so they average
the same way under accumulation. With `train.loss_chunk_size` the head and
the cross-entropy run a slice of positions at a time, so the whole logits
[b, t, vocab] are never held (`token_lse_and_target`).

Issue 16 adds two pieces, each in its own function below:
- `mtp_loss_sums`: with `model.mtp_depth = D`, the multi-token-prediction
  cross-entropies (DeepSeek-V3): depth k's target at position i is the token
  k + 1 after the main target, masked where that token is past the row, in
  another document (segment ids) or outside the loss mask; `lm_loss` adds
  `train.mtp_loss_weight` x the mean over depths of their token means.
- `moe_bias_update`: aux-loss-free load balancing. A loss function may carry
  `loss_fn.update_model_state(model, metric_means)`, which the train step
  runs after the optimizer step on the model with the new parameters, outside
  the gradient; `lm_loss` sets it when `train.moe_bias_update_rate > 0` to
  move each MoE layer's selection bias by its load in this step
  (`aux['moe_layer_loads']`, token-weighted over microbatches). The biases are
  the state's `model_state`, so checkpoints hold them.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import mtp as mtp_lib
from model import partitioning
from train import optim
from train import sharding

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


def _to_f32(tree):
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree)


# ----------------------------------------------------------------------------
# State.


def new_train_state(params, model_state, optimizer: optax.GradientTransformation,
                    seed: int) -> dict:
  """The train state at step 0 of `params`: fresh optimizer moments, step and RNG.

  The one constructor of the state dict: a random init (`train_state_spec`),
  a fine-tuning start (`train.init_checkpoint`) and DPO's policy (a copy of
  the reference) all go through it, so their states have one structure.
  """
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': optimizer.init(_to_f32(params)),
      'rng': jax.random.fold_in(jax.random.PRNGKey(seed), 1),
      'model_state': model_state,
  }


def train_state_spec(model_fn: Callable[[], nnx.Module],
                     optimizer: optax.GradientTransformation, mesh: Mesh,
                     seed: int):
  """What the train state will be, without making it.

  `model_fn()` constructs the model (e.g. `lambda: Decoder(cfg.model,
  rngs=nnx.Rngs(seed))`); it runs only abstractly here (`jax.eval_shape`),
  which reads shapes and logical axes.

  Returns (graphdef, init, abstract_state, shardings): `jax.jit(init,
  out_shardings=shardings)()` makes the state with every array born where the
  rules place it, so no device ever holds the whole model; `abstract_state`
  (shapes, dtypes, shardings) is the target to restore a checkpoint into.
  """
  abstract_model = nnx.eval_shape(model_fn)
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

  def init():
    _, params, model_state = nnx.split(model_fn(), nnx.Param, ...)
    return new_train_state(params, model_state, optimizer, seed)

  shapes = jax.eval_shape(init)
  shardings = sharding.state_shardings(mesh, shapes)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return graphdef, init, abstract_state, shardings


def create_train_state(model_fn: Callable[[], nnx.Module],
                       optimizer: optax.GradientTransformation, mesh: Mesh,
                       seed: int):
  """Builds the model and optimizer state directly sharded on `mesh`.

  Returns (graphdef, state, shardings); see `train_state_spec`.
  """
  graphdef, init, _, shardings = train_state_spec(model_fn, optimizer, mesh, seed)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


# ----------------------------------------------------------------------------
# The language-model loss.


def _lse_and_target(logits, targets):
  """float32 logits [b, t, v], int targets [b, t] -> (logsumexp, target logit), [b, t] each."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse, target


def _chunked_lse_and_target(model, x, targets, chunk_size: int, head=None):
  """`_lse_and_target(head(x), targets)` without the whole logits; `head`
  defaults to `model.logits`.

  The head runs on `chunk_size` positions of every row at a time inside a
  scan whose body is rematerialised, so the forward and the backward pass each
  hold one chunk's logits [b, chunk, vocab], not [b, t, vocab]. Chunks run
  over the sequence, not over flattened tokens, so every chunk keeps the
  batch's sharding. A ragged last chunk is padded with zero states (finite
  through any norm) whose outputs are cut off, so they get no gradient. A
  chunk size of at least the sequence is the unchunked computation.
  """
  b, t, d = x.shape
  head = head or model.logits
  if chunk_size >= t:
    # One chunk: rematerialising it would only add a second copy of the logits.
    return _lse_and_target(head(x), targets)
  c = chunk_size
  n = -(-t // c)
  if n * c != t:
    x = jnp.pad(x, ((0, 0), (0, n * c - t), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, n * c - t)))
  xs = jnp.moveaxis(x.reshape(b, n, c, d), 1, 0)                     # [n, b, c, d]
  ts = jnp.moveaxis(targets.reshape(b, n, c), 1, 0)                  # [n, b, c]

  # The head's weights come in by closure: the scan's backward then
  # accumulates gradients for them alone, not for every parameter.
  @jax.checkpoint
  def chunk(xc, tc):
    xc = partitioning.constrain(xc, ('batch', None, 'embed'))
    return _lse_and_target(head(xc), tc)                             # [b, c, v] lives here only

  _, (lse, target) = jax.lax.scan(lambda carry, xt: (carry, chunk(*xt)), None, (xs, ts))
  unchunk = lambda y: jnp.moveaxis(y, 0, 1).reshape(b, n * c)[:, :t]
  return unchunk(lse), unchunk(target)


def token_lse_and_target(model, batch: dict, chunk_size: int | None = None):
  """The decoder on `batch` -> (logsumexp [b, t], target logit [b, t], aux).

  Every loss on next-token log-probs starts here (log p(target) = target -
  logsumexp). `chunk_size` None makes the whole float32 logits [b, t, vocab];
  an int computes the head in chunks of that many positions
  (`train.loss_chunk_size`), with the same values and gradients.
  """
  inputs = (batch['inputs'],)
  kwargs = dict(segment_ids=batch.get('segment_ids'), positions=batch.get('positions'))
  if chunk_size is None:
    logits, aux = model(*inputs, **kwargs)                           # [b, t, v]
    with jax.named_scope('cross_entropy'):
      return (*_lse_and_target(logits, batch['targets']), aux)
  x, aux = model.hidden_states(*inputs, **kwargs)                    # [b, t, d]
  with jax.named_scope('chunked_head_cross_entropy'):
    lse, target = _chunked_lse_and_target(model, x, batch['targets'], chunk_size)
  return lse, target, aux


def mtp_targets(batch: dict, k: int):
  """Depth k's (targets, mask) [b, t]: position i predicts targets[i + k]
  (the input token i + k + 1) with weight loss_mask[i + k], zero where i + k
  is past the row or in another document than i."""
  targets = mtp_lib.shift_left(batch['targets'], k)
  mask = mtp_lib.shift_left(batch['loss_mask'].astype(jnp.float32), k)
  segment_ids = batch.get('segment_ids')
  if segment_ids is not None:
    mask = mask * (mtp_lib.shift_left(segment_ids, k, fill=-1) == segment_ids)
  return targets, mask


def mtp_loss_sums(model, batch: dict, x, chunk_size: int | None):
  """The MTP modules on the main hidden states x [b, t, d] -> ([(ce_sum_k,
  weight_k)] for k = 1..D, aux of their MoE layers)."""
  hidden, aux = model.mtp_hidden_states(x, batch['inputs'], batch.get('segment_ids'),
                                        batch.get('positions'))
  sums = []
  for k, h in enumerate(hidden, start=1):
    targets, mask = mtp_targets(batch, k)
    with jax.named_scope(f'mtp_{k}_cross_entropy'):
      lse, target = _chunked_lse_and_target(
          model, h, targets, chunk_size or h.shape[1],
          head=lambda y, k=k: model.mtp_logits(k, y))
    sums.append((jnp.sum((lse - target) * mask), jnp.sum(mask)))
  return sums, aux


def moe_bias_update(rate: float):
  """`update_model_state(model, metric_means)` for aux-loss-free balancing:
  each MoE layer's bias += rate * sign(mean load - load) (`Decoder.
  update_router_biases`), loads from the step's `moe_layer_loads`."""
  def update(model, means):
    if 'moe_layer_loads' in means:
      model.update_router_biases(jax.lax.stop_gradient(means['moe_layer_loads']), rate)
  return update


def lm_loss(train_cfg) -> LossFn:
  """Cross-entropy + z-loss + MoE losses (+ MTP), as weighted sums (see module doc)."""
  z_weight = float(train_cfg.get('z_loss_weight', 0.0))
  aux_weight = float(train_cfg.get('moe_aux_loss_weight', 0.0))
  router_z_weight = float(train_cfg.get('moe_router_z_loss_weight', 0.0))
  chunk_size = train_cfg.get('loss_chunk_size')
  mtp_weight = float(train_cfg.get('mtp_loss_weight', 0.0))

  def loss_fn(model, batch, rng):
    del rng                     # the decoder has no dropout
    depth = getattr(model, 'mtp_depth', 0)
    if depth:
      # The head on the hidden states the MTP modules also read: the same
      # values as `model(...)` (token_lse_and_target's chunked path).
      x, aux = model.hidden_states(batch['inputs'], segment_ids=batch.get('segment_ids'),
                                   positions=batch.get('positions'))
      lse, target = _chunked_lse_and_target(model, x, batch['targets'],
                                            chunk_size or x.shape[1])
    else:
      lse, target, aux = token_lse_and_target(model, batch, chunk_size)   # [b, t] each
    mask = batch['loss_mask'].astype(jnp.float32)             # [b, t]
    ce_sum = jnp.sum((lse - target) * mask)
    weight = jnp.sum(mask)
    objective = ce_sum
    metrics = {'weight': weight, 'loss': ce_sum}
    if depth:
      sums, mtp_aux = mtp_loss_sums(model, batch, x, chunk_size)
      # Each depth's token mean, scaled to this (micro)batch's main weight so
      # the step's division by the total weight gives back the mean.
      means = [ce_k * weight / jnp.maximum(w_k, 1e-9) for ce_k, w_k in sums]
      mtp_sum = sum(means) / depth
      objective += mtp_weight * mtp_sum
      metrics['mtp_loss'] = mtp_sum
      for k, m_k in enumerate(means, start=1):
        metrics[f'mtp_loss_{k}'] = m_k
      if 'moe_aux_loss' in mtp_aux:
        # The MTP blocks' balance losses count with the MTP term's weight.
        objective += mtp_weight * weight * (aux_weight * mtp_aux['moe_aux_loss'] +
                                            router_z_weight * mtp_aux['moe_router_z_loss'])
        loads = [a['moe_layer_loads'] for a in (aux, mtp_aux) if 'moe_layer_loads' in a]
        aux = dict(aux, moe_layer_loads=jnp.concatenate(loads))
    if z_weight:
      z_sum = jnp.sum(jnp.square(lse) * mask)
      objective += z_weight * z_sum
      metrics['z_loss'] = z_sum
    if 'moe_aux_loss' in aux:
      # Batch means: weighted by the tokens they were measured on.
      objective += weight * (aux_weight * aux['moe_aux_loss'] +
                             router_z_weight * aux['moe_router_z_loss'])
      metrics['moe_aux_loss'] = weight * aux['moe_aux_loss']
      metrics['moe_router_z_loss'] = weight * aux['moe_router_z_loss']
      metrics['moe_expert_load'] = weight * aux['moe_expert_load']
    if 'moe_layer_loads' in aux:
      # Every MoE layer's own load, main blocks then MTP blocks (the bias update).
      metrics['moe_layer_loads'] = weight * aux['moe_layer_loads']
    metrics['objective'] = objective
    return objective, metrics

  rate = float(train_cfg.get('moe_bias_update_rate', 0.0))
  if rate:
    loss_fn.update_model_state = moe_bias_update(rate)
  return loss_fn


# ----------------------------------------------------------------------------
# Steps.


def _microbatches(batch, num: int):
  """[B, ...] -> [num, B / num, ...]; microbatch i holds rows i, i + num, ...

  Splitting the row index as (B / num, num) keeps each device's rows on that
  device in every microbatch, so no data moves when the batch is sharded.
  """
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into '
                       f'{num} microbatches')
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _summed_grads(loss_fn, graphdef, params, model_state, batch, rng, accum, mesh):
  """(gradient of the summed loss, summed metrics) over `accum` microbatches."""
  def loss_of(p, mb, key):
    model = nnx.merge(graphdef, p, model_state)
    return loss_fn(model, mb, key)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if accum == 1:
    (_, metrics), grads = grad_fn(params, batch, rng)
    return _to_f32(grads), metrics

  micro = _microbatches(batch, accum)
  # Keep every microbatch split over the batch axes like the whole batch.
  rows = sharding.batch_sharding(mesh).spec[0]
  micro = jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, PartitionSpec(None, rows))), micro)
  first = jax.tree.map(lambda x: x[0], micro)
  metric_shapes = jax.eval_shape(lambda: loss_of(params, first, rng)[1])
  zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
           jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes))

  def body(carry, inputs):
    mb, i = inputs
    (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
    g_acc, m_acc = carry
    return (jax.tree.map(jnp.add, g_acc, _to_f32(g)),
            jax.tree.map(lambda a, b: a + b.astype(jnp.float32), m_acc, m)), None

  (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
  return grads, metrics


def _means(metrics):
  """Weighted sums -> weighted means; `weight` stays a count."""
  weight = metrics['weight']
  denom = jnp.maximum(weight, 1e-9)
  return {k: (v if k == 'weight' else v / denom) for k, v in metrics.items()}


def _updated_model_state(loss_fn, graphdef, params, model_state, metrics):
  """`loss_fn.update_model_state` (if any) run on the model with the new
  params; pops the per-layer statistics it reads from `metrics`."""
  means = {k: metrics.pop(k) for k in ('moe_layer_loads',) if k in metrics}
  update = getattr(loss_fn, 'update_model_state', None)
  if update is None:
    return model_state
  model = nnx.merge(graphdef, params, model_state)
  update(model, means)
  return nnx.split(model, nnx.Param, ...)[2]


def _bind(loss_fn: LossFn, frozen) -> LossFn:
  """`loss_fn` with the step's frozen inputs (no gradient flows into them)."""
  if frozen is None:
    return loss_fn
  frozen = jax.lax.stop_gradient(frozen)
  return lambda model, batch, rng: loss_fn(model, batch, rng, frozen)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    graphdef: nnx.GraphDef, state_shardings, mesh: Mesh,
                    grad_accum_steps: int = 1,
                    schedule: optax.Schedule | None = None,
                    donate: bool = True, frozen_shardings=None):
  """`train_step(state, batch) -> (state, metrics)`, jitted and sharded.

  `batch` is a dict of [global_batch, ...] arrays sharded over the batch mesh
  axes (`sharding.batch_sharding(mesh)`). Metrics are replicated scalars
  (vectors for `moe_expert_load`): the weighted means of the loss function's
  metrics, plus `grad_norm` (before clipping), `learning_rate`, `weight` and
  `params_finite` (1.0 if every updated parameter is finite, else 0.0).

  With `frozen_shardings` (a pytree of shardings, `{}` for none) the step is
  `train_step(state, batch, frozen)` and calls `loss_fn(model, batch, rng,
  frozen)`: `frozen` is never donated and gets no gradient.
  """
  accum = int(grad_accum_steps)

  def train_step(state, batch, frozen=None):
    loss = _bind(loss_fn, frozen)
    rng = jax.random.fold_in(state['rng'], state['step'])
    # Schedule-free optimizers store their averaged weights and take the
    # gradient elsewhere (`optim.train_point`); for the others it is params.
    params = optim.train_point(state['opt_state'], state['params'])
    with sharding.activation_sharding(mesh):
      grads, sums = _summed_grads(loss, graphdef, params,
                                  state['model_state'], batch, rng, accum, mesh)
    # The gradient of the weighted mean: divide the summed gradient once.
    weight = jnp.maximum(sums['weight'], 1e-9)
    grads = jax.tree.map(lambda g: g / weight, grads)
    params32 = _to_f32(params)
    updates, opt_state = optimizer.update(grads, state['opt_state'], params32)
    new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    new_params = optim.stored_point(opt_state, new_params)
    metrics = _means(sums)
    model_state = _updated_model_state(loss_fn, graphdef, new_params,
                                       state['model_state'], metrics)
    metrics['grad_norm'] = optax.tree.norm(grads)
    # 1.0 if every new parameter is finite: the loop never saves a state
    # whose parameters hold a NaN or inf (the loss is that of the old ones).
    metrics['params_finite'] = jnp.all(jnp.stack([
        jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)])).astype(jnp.float32)
    if schedule is not None:
      metrics['learning_rate'] = jnp.asarray(schedule(state['step']), jnp.float32)
    new_state = dict(state, step=state['step'] + 1, params=new_params,
                     opt_state=opt_state, model_state=model_state)
    return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step,
                 in_shardings=_in_shardings(state_shardings, mesh, frozen_shardings),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())


def _in_shardings(state_shardings, mesh: Mesh, frozen_shardings):
  """(state, batch[, frozen]) shardings of a step."""
  shardings = (state_shardings, sharding.batch_sharding(mesh))
  return shardings if frozen_shardings is None else (*shardings, frozen_shardings)


def make_eval_step(loss_fn: LossFn, *, graphdef: nnx.GraphDef, state_shardings,
                   mesh: Mesh, frozen_shardings=None):
  """`eval_step(state, batch[, frozen]) -> metric sums` (add over batches,
  then divide by `weight`; `eval_metrics` does it). `frozen_shardings` as in
  `make_train_step`."""
  def eval_step(state, batch, frozen=None):
    model = nnx.merge(graphdef, state['params'], state['model_state'])
    with sharding.activation_sharding(mesh):
      _, metrics = _bind(loss_fn, frozen)(model, batch, jax.random.PRNGKey(0))
    metrics.pop('moe_layer_loads', None)
    return jax.tree.map(lambda x: x.astype(jnp.float32), metrics)

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(eval_step,
                 in_shardings=_in_shardings(state_shardings, mesh, frozen_shardings),
                 out_shardings=replicated)


def eval_metrics(eval_step, state, batches) -> dict[str, Any]:
  """Runs `eval_step` over `batches`; returns host floats: the weighted means,
  and `perplexity` = exp(loss)."""
  total = None
  for batch in batches:
    sums = eval_step(state, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    return {}
  means = jax.device_get(_means(total))
  out = {k: (float(v) if jnp.ndim(v) == 0 else v) for k, v in means.items()}
  if 'loss' in out:
    out['perplexity'] = float(jnp.exp(out['loss']))
  return out
