"""Preference losses (DPO and its family), rewards and metrics, and the step's loss.

Every loss reads, per pair, the sequence log-probs (sums over the response
tokens) of the chosen and the rejected response under the policy, a_c and a_r,
and under the frozen reference, r_c and r_r, with the responses' token counts
n_c and n_r. With x = (a_c − r_c) − (a_r − r_r), the log-ratio difference:

- `sigmoid`: Direct Preference Optimization (Rafailov et al. 2023, eq. 7),
  −log σ(β·x); with `label_smoothing` ε the conservative DPO of Mitchell
  (2023): −(1−ε)·log σ(β·x) − ε·log σ(−β·x).
- `ipo`: Identity Preference Optimisation (Azar et al. 2023, eq. 17),
  (x − 1/(2β))². The paper writes x with sequence log-probs; here every
  log-prob is divided by its response's token count (x on token means), as
  TRL does after the authors advised it, so that β does not depend on length.
- `hinge`: the SLiC hinge (Zhao et al. 2023), max(0, 1 − β·x).
- `robust`: provably robust DPO (Chowdhury et al. 2024) for preference
  labels flipped with probability ε (`label_smoothing`):
  ((1−ε)·(−log σ(β·x)) − ε·(−log σ(−β·x))) / (1 − 2ε), an unbiased estimate
  of the clean-label DPO loss.
- `rpo`: DPO plus `nll_weight` α times the chosen response's token-mean
  negative log-likelihood, −(1−ε)·log σ(β·x) − ε·log σ(−β·x) − α·a_c/n_c
  (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; the
  Llama 3 and Nemotron-4 recipes).
- `simpo`: Simple Preference Optimization (Meng et al. 2024),
  reference-free, on length-normalised log-probs with a target margin γ
  (`simpo_gamma`): −log σ(β·a_c/n_c − β·a_r/n_r − γ).
- `orpo`: Odds Ratio Preference Optimization (Hong et al. 2024),
  reference-free: with P = exp(a/n) (the length-normalised likelihood) and
  odds(P) = P / (1 − P), α·(−a_c/n_c) + β·(−log σ(log odds(P_c) − log odds(P_r))):
  the paper's L_SFT + λ·L_OR with λ = β (and α = `nll_weight`, 1 in the paper).

Rewards are the implicit rewards of the log-probs each loss uses: β·(a − r)
for `sigmoid`, `hinge`, `robust`, `rpo`; β·(a − r)/n for `ipo`; β·a/n for the
reference-free `simpo` and `orpo`. `reference_free` sets r = 0 for the others.
The logged `logps_chosen` / `logps_rejected` are always sequence sums. Reward
accuracy counts a tie (as at step 0, policy = reference) as half a win, so
chance is 0.5.

`make_loss_fn(dpo_cfg)` is a `train.step.LossFn`: it returns sums over the
pairs of its (micro)batch with `weight` = number of pairs, so the trainer's step
(`train/step.py`) averages and accumulates it exactly like the LM loss.
"""

import jax
import jax.numpy as jnp

from train import step as step_lib

LOSSES = ('sigmoid', 'ipo', 'hinge', 'robust', 'rpo', 'simpo', 'orpo')
# Losses that need no reference model (the DPO loop then loads none).
REFERENCE_FREE_LOSSES = ('simpo', 'orpo')
# Losses that read `label_smoothing` (ε).
SMOOTHED_LOSSES = ('sigmoid', 'robust', 'rpo')
# Batch keys of one side (chosen or rejected) of a preference pair, [B, T].
SIDE_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def _log_odds(mean_logp):
  """log(P / (1 − P)) for P = exp(mean_logp) < 1, stable near P = 1."""
  # log(1 − e^m) = log(−expm1(m)); m < 0 for a response with any uncertainty.
  mean_logp = jnp.minimum(mean_logp, -1e-6)
  return mean_logp - jnp.log(-jnp.expm1(mean_logp))


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                    n_chosen=1.0, n_rejected=1.0, *, loss: str = 'sigmoid',
                    beta: float = 0.1, label_smoothing: float = 0.0,
                    nll_weight: float = 1.0, simpo_gamma: float = 0.5):
  """Per-pair losses and rewards from sequence log-probs, each [B].

  `policy_*` and `ref_*` are sums over each response's tokens; `n_*` the
  responses' token counts (used by `ipo`, `rpo`, `simpo`, `orpo`). The
  reference is ignored by the reference-free `simpo` and `orpo`. Returns
  (losses, rewards_chosen, rewards_rejected).
  """
  eps = label_smoothing
  n_chosen = jnp.maximum(n_chosen, 1.0)
  n_rejected = jnp.maximum(n_rejected, 1.0)
  if loss == 'ipo':
    policy_chosen, ref_chosen = policy_chosen / n_chosen, ref_chosen / n_chosen
    policy_rejected, ref_rejected = policy_rejected / n_rejected, ref_rejected / n_rejected
  chosen_ratio = policy_chosen - ref_chosen
  rejected_ratio = policy_rejected - ref_rejected
  x = chosen_ratio - rejected_ratio
  rewards = beta * chosen_ratio, beta * rejected_ratio
  if loss in ('sigmoid', 'rpo'):
    losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * x)
              - eps * jax.nn.log_sigmoid(-beta * x))
    if loss == 'rpo':
      losses = losses - nll_weight * policy_chosen / n_chosen
  elif loss == 'ipo':
    losses = jnp.square(x - 1.0 / (2.0 * beta))
  elif loss == 'hinge':
    losses = jax.nn.relu(1.0 - beta * x)
  elif loss == 'robust':
    losses = ((1.0 - eps) * -jax.nn.log_sigmoid(beta * x)
              - eps * -jax.nn.log_sigmoid(-beta * x)) / (1.0 - 2.0 * eps)
  elif loss == 'simpo':
    mean_c, mean_r = policy_chosen / n_chosen, policy_rejected / n_rejected
    losses = -jax.nn.log_sigmoid(beta * (mean_c - mean_r) - simpo_gamma)
    rewards = beta * mean_c, beta * mean_r
  elif loss == 'orpo':
    mean_c, mean_r = policy_chosen / n_chosen, policy_rejected / n_rejected
    odds_ratio = -jax.nn.log_sigmoid(_log_odds(mean_c) - _log_odds(mean_r))
    losses = -nll_weight * mean_c + beta * odds_ratio
    rewards = beta * mean_c, beta * mean_r
  else:
    raise ValueError(f'dpo.loss={loss!r}: must be one of {", ".join(LOSSES)}')
  return (losses,) + rewards


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


def token_logps(model, side: dict, chunk_size: int | None = None):
  """log p(target) per token of one side, masked to the response: [B, T].

  `chunk_size` (`train.loss_chunk_size`) computes the head a slice of
  positions at a time, never holding the whole logits (`train.step`).
  """
  lse, target, _ = step_lib.token_lse_and_target(model, side, chunk_size)   # [b, t] each
  return (target - lse) * side['loss_mask']


def both_token_logps(model, batch: dict, chunk_size: int | None = None):
  """(chosen, rejected) per-token log-probs [B, T] in one forward pass.

  Chosen and rejected rows are interleaved ([B, 2, T] -> [2B, T]) rather than
  concatenated, so each device's pairs stay on that device when the batch is
  split over devices.
  """
  side = {}
  for key in SIDE_KEYS:
    c, r = batch['chosen_' + key], batch['rejected_' + key]
    side[key] = jnp.stack([c, r], axis=1).reshape(2 * c.shape[0], *c.shape[1:])
  logps = token_logps(model, side, chunk_size)
  logps = logps.reshape(-1, 2, logps.shape[-1])                      # [b, 2, t]
  return logps[:, 0], logps[:, 1]


def make_loss_fn(dpo_cfg, chunk_size: int | None = None):
  """The DPO `LossFn(model, batch, rng) -> (loss_sum, metric sums)`.

  `chunk_size` is `train.loss_chunk_size` (see `token_logps`).

  `batch` holds `chosen_*` and `rejected_*` fields (`SIDE_KEYS`) and the
  reference's log-probs `ref_logps_chosen` / `ref_logps_rejected`, summed
  over their last axis: per token [B, T], or per sequence [B, 1] as the DPO
  loop passes them (computed in the step without gradients, or precomputed;
  zeros when `reference_free` or the loss is reference-free). The responses'
  token counts are the row sums of `chosen_loss_mask` / `rejected_loss_mask`.
  """
  kind, beta = dpo_cfg.loss, float(dpo_cfg.beta)
  # Without a reference the gap to it is only -logps_chosen: not logged.
  no_reference = bool(dpo_cfg.get('reference_free', False)) or kind in REFERENCE_FREE_LOSSES
  options = dict(loss=kind, beta=beta,
                 label_smoothing=float(dpo_cfg.label_smoothing),
                 nll_weight=float(dpo_cfg.get('nll_weight', 1.0)),
                 simpo_gamma=float(dpo_cfg.get('simpo_gamma', 0.5)))

  def loss_fn(model, batch, rng):
    del rng
    with jax.named_scope('dpo_logps'):
      tok_c, tok_r = both_token_logps(model, batch, chunk_size)
    ref_c = jax.lax.stop_gradient(batch['ref_logps_chosen'])
    ref_r = jax.lax.stop_gradient(batch['ref_logps_rejected'])
    sums = [jnp.sum(a, axis=-1) for a in (tok_c, tok_r, ref_c, ref_r)]
    counts = [jnp.sum(batch[f'{side}_loss_mask'], axis=-1)
              for side in ('chosen', 'rejected')]
    with jax.named_scope('dpo_loss'):
      losses, rew_c, rew_r = preference_loss(*sums, *counts, **options)
    metrics = pair_metrics(losses, rew_c, rew_r, *sums)
    if no_reference:
      del metrics['ref_gap_chosen']
    metrics['objective'] = metrics['loss']
    return metrics['loss'], metrics

  return loss_fn
