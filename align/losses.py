"""DPO preference losses, rewards and metrics, and the loss function of the step.

Implements, on sequence log-probabilities of a chosen and a rejected response:

- `sigmoid`: Direct Preference Optimization (Rafailov et al. 2023),
  -log σ(β·x) with x = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)),
  and with `label_smoothing` ε the conservative DPO of Mitchell (2023):
  −(1−ε)·log σ(β·x) − ε·log σ(−β·x).
- `ipo`: Identity Preference Optimisation (Azar et al. 2023, eq. 17),
  (x − 1/(2β))², with x computed on length-normalised log-probs (the mean
  log-prob per response token), as in that paper's experiments.
- `hinge`: the SLiC hinge (Zhao et al. 2023), max(0, 1 − β·x).

Rewards are the implicit rewards β·(log π − log π_ref) of the log-probs the loss
uses (length-normalised for `ipo`); `reference_free` sets log π_ref = 0. The
logged `logps_chosen` / `logps_rejected` are always sequence sums over
response tokens. Reward accuracy counts a tie (as at step 0, policy =
reference) as half a win, so chance is 0.5.

`make_loss_fn(dpo_cfg)` is a `train.step.LossFn`: it returns sums over the
pairs of its (micro)batch with `weight` = number of pairs, so the trainer's step
(`train/step.py`) averages and accumulates it exactly like the LM loss.
"""

import jax
import jax.numpy as jnp

LOSSES = ('sigmoid', 'ipo', 'hinge')
# Batch keys of one side (chosen or rejected) of a preference pair, [B, T].
SIDE_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *,
                    loss: str = 'sigmoid', beta: float = 0.1,
                    label_smoothing: float = 0.0):
  """Per-pair losses and rewards from log-probs, each [B].

  For `ipo` pass length-normalised log-probs. Returns (losses, rewards_chosen,
  rewards_rejected).
  """
  chosen_ratio = policy_chosen - ref_chosen
  rejected_ratio = policy_rejected - ref_rejected
  x = chosen_ratio - rejected_ratio
  if loss == 'sigmoid':
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * x)
              - label_smoothing * jax.nn.log_sigmoid(-beta * x))
  elif loss == 'ipo':
    losses = jnp.square(x - 1.0 / (2.0 * beta))
  elif loss == 'hinge':
    losses = jax.nn.relu(1.0 - beta * x)
  else:
    raise ValueError(f'dpo.loss={loss!r}: must be one of {", ".join(LOSSES)}')
  return losses, beta * chosen_ratio, beta * rejected_ratio


def pair_metrics(losses, rewards_chosen, rewards_rejected, logps_chosen,
                 logps_rejected, ref_logps_chosen, ref_logps_rejected):
  """Sums over pairs of every logged quantity (divide by `weight`)."""
  wins = jnp.where(rewards_chosen > rewards_rejected, 1.0,
                   jnp.where(rewards_chosen == rewards_rejected, 0.5, 0.0))
  return {
      'weight': jnp.asarray(losses.shape[0], jnp.float32),
      'loss': jnp.sum(losses),
      'rewards_chosen': jnp.sum(rewards_chosen),
      'rewards_rejected': jnp.sum(rewards_rejected),
      'reward_accuracy': jnp.sum(wins),
      'reward_margin': jnp.sum(rewards_chosen - rewards_rejected),
      'logps_chosen': jnp.sum(logps_chosen),
      'logps_rejected': jnp.sum(logps_rejected),
      # How far the chosen log-probs fell below the reference's (a KL-like
      # gap on the data; growing large means the policy is collapsing).
      'ref_gap_chosen': jnp.sum(ref_logps_chosen - logps_chosen),
  }


def token_logps(model, side: dict):
  """log p(target) per token of one side, masked to the response: [B, T]."""
  logits, _ = model(side['inputs'], segment_ids=side['segment_ids'],
                    positions=side['positions'])
  logits = logits.astype(jnp.float32)                                 # [b, t, v]
  lse = jax.nn.logsumexp(logits, axis=-1)                             # [b, t]
  target = jnp.take_along_axis(logits, side['targets'][..., None], axis=-1)[..., 0]
  return (target - lse) * side['loss_mask']


def both_token_logps(model, batch: dict):
  """(chosen, rejected) per-token log-probs [B, T] in one forward pass.

  Chosen and rejected rows are interleaved ([B, 2, T] -> [2B, T]) rather than
  concatenated, so each device's pairs stay on that device when the batch is
  split over devices.
  """
  side = {}
  for key in SIDE_KEYS:
    c, r = batch['chosen_' + key], batch['rejected_' + key]
    side[key] = jnp.stack([c, r], axis=1).reshape(2 * c.shape[0], *c.shape[1:])
  logps = token_logps(model, side)
  logps = logps.reshape(-1, 2, logps.shape[-1])                      # [b, 2, t]
  return logps[:, 0], logps[:, 1]


def make_loss_fn(dpo_cfg):
  """The DPO `LossFn(model, batch, rng) -> (loss_sum, metric sums)`.

  `batch` holds `chosen_*` and `rejected_*` fields (`SIDE_KEYS`) and the
  reference's log-probs `ref_logps_chosen` / `ref_logps_rejected`, summed
  over their last axis: per token [B, T], or per sequence [B, 1] as the DPO
  loop passes them (computed in the step without gradients, or precomputed;
  zeros when `reference_free`).
  """
  kind, beta = dpo_cfg.loss, float(dpo_cfg.beta)
  smoothing = float(dpo_cfg.label_smoothing)

  def loss_fn(model, batch, rng):
    del rng
    with jax.named_scope('dpo_logps'):
      tok_c, tok_r = both_token_logps(model, batch)
    ref_c = jax.lax.stop_gradient(batch['ref_logps_chosen'])
    ref_r = jax.lax.stop_gradient(batch['ref_logps_rejected'])
    sums = [jnp.sum(a, axis=-1) for a in (tok_c, tok_r, ref_c, ref_r)]
    used = sums
    if kind == 'ipo':
      n_c = jnp.maximum(jnp.sum(batch['chosen_loss_mask'], axis=-1), 1.0)
      n_r = jnp.maximum(jnp.sum(batch['rejected_loss_mask'], axis=-1), 1.0)
      used = [sums[0] / n_c, sums[1] / n_r, sums[2] / n_c, sums[3] / n_r]
    with jax.named_scope('dpo_loss'):
      losses, rew_c, rew_r = preference_loss(*used, loss=kind, beta=beta,
                                             label_smoothing=smoothing)
    metrics = pair_metrics(losses, rew_c, rew_r, *sums)
    metrics['objective'] = metrics['loss']
    return metrics['loss'], metrics

  return loss_fn
