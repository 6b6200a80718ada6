"""Preference losses against the papers: hand-computed values, the papers'
gradients, and the loss function of the step on a stub model.

Notation of align/losses.py: a = policy, r = reference sequence log-probs
(sums over response tokens), n = response token counts, c / r_ = chosen /
rejected, x = (a_c − r_c) − (a_r − r_r).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from align import losses

# One pair, worked by hand: a_c = -10, a_r = -14, r_c = -11, r_r = -13, so
# x = (-10 + 11) - (-14 + 13) = 2; n_c = 4, n_r = 5, so the token means are
# a_c / n_c = -2.5, a_r / n_r = -2.8 and the IPO x on means is
# (-10 + 11) / 4 - (-14 + 13) / 5 = 0.45.
PAIR = dict(policy_chosen=-10.0, policy_rejected=-14.0, ref_chosen=-11.0,
            ref_rejected=-13.0, n_chosen=4.0, n_rejected=5.0)
# Each value below is the paper's formula evaluated with `math` by hand:
HAND = [
    # DPO: -log σ(β x) = -log σ(0.2).
    ('sigmoid', dict(beta=0.1), 0.5981388693815918),
    # Conservative DPO: -0.8 log σ(0.2) - 0.2 log σ(-0.2).
    ('sigmoid', dict(beta=0.1, label_smoothing=0.2), 0.6381388693815918),
    # IPO: (0.45 - 1 / (2 · 0.1))² = (0.45 - 5)².
    ('ipo', dict(beta=0.1), 20.7025),
    # SLiC hinge: max(0, 1 - 0.1 · 2), and 0 once β x >= 1.
    ('hinge', dict(beta=0.1), 0.8),
    ('hinge', dict(beta=1.0), 0.0),
    # rDPO: (0.8 · (-log σ(0.2)) - 0.2 · (-log σ(-0.2))) / (1 - 0.4).
    ('robust', dict(beta=0.1, label_smoothing=0.2), 0.5314722027149251),
    # RPO: -log σ(0.2) + 1 · 10 / 4.
    ('rpo', dict(beta=0.1, nll_weight=1.0), 3.0981388693815917),
    ('rpo', dict(beta=0.1, nll_weight=0.5), 0.5981388693815918 + 1.25),
    # SimPO: -log σ(2 · (-2.5) - 2 · (-2.8) - 0.5) = -log σ(0.1).
    ('simpo', dict(beta=2.0, simpo_gamma=0.5), 0.6443966600735709),
    # ORPO: 2.5 + 0.1 · -log(odds(e^-2.5) / (odds(e^-2.5) + odds(e^-2.8))).
    ('orpo', dict(beta=0.1, nll_weight=1.0), 2.5544668567874234),
]


@pytest.mark.parametrize('kind,options,want', HAND)
def test_loss_of_one_pair_equals_the_hand_computed_value(kind, options, want):
  pair = {k: jnp.array([v], jnp.float32) for k, v in PAIR.items()}
  loss, _, _ = losses.preference_loss(**pair, loss=kind, **options)
  np.testing.assert_allclose(float(loss[0]), want, rtol=2e-6, atol=1e-6)


def test_dpo_of_the_issue_example_and_equal_policy_and_reference():
  # β = 0.1 and log-ratio difference 2: -log σ(0.2) = 0.59813.
  loss, _, _ = losses.preference_loss(jnp.array([2.0]), jnp.array([0.0]),
                                      jnp.array([0.0]), jnp.array([0.0]), beta=0.1)
  assert abs(float(loss[0]) - 0.59813) < 1e-5
  # Policy = reference: x = 0, loss ln 2 and zero rewards.
  a = jnp.array([-10.0, -3.0])
  loss, rc, rr = losses.preference_loss(a, a - 1, a, a - 1, loss='sigmoid', beta=0.1)
  np.testing.assert_allclose(np.asarray(loss), math.log(2), rtol=1e-6)
  assert not np.any(np.asarray(rc)) and not np.any(np.asarray(rr))


# Several pairs for the gradients: sums, references and token counts.
A_C = np.array([-10.0, -20.0, -5.5, -7.0, -31.0], np.float32)
A_R = np.array([-12.0, -18.0, -5.5, -9.0, -30.0], np.float32)
R_C = np.array([-11.0, -19.0, -6.0, -7.0, -30.5], np.float32)
R_R = np.array([-11.5, -19.5, -5.0, -8.0, -30.0], np.float32)
N_C = np.array([4, 7, 2, 3, 9], np.float32)
N_R = np.array([5, 6, 2, 4, 8], np.float32)


def _sig(z):
  return 1 / (1 + np.exp(-z))


def paper_gradient(kind, beta, eps=0.0, alpha=1.0, gamma=0.5):
  """(∂L/∂a_c, ∂L/∂a_r) per pair, as each paper writes its gradient."""
  x = (A_C - R_C) - (A_R - R_R)
  if kind == 'sigmoid':
    # Rafailov et al. eq. 7's gradient: -β σ(-βx) (∇ log π(y_w) - ∇ log π(y_l));
    # Mitchell's ε mixes in the flipped pair's +β σ(βx).
    g = -beta * ((1 - eps) * _sig(-beta * x) - eps * _sig(beta * x))
    return g, -g
  if kind == 'robust':
    # Chowdhury et al.: -β ζ̂ with ζ̂ = ((1-ε) σ(-βx) + ε σ(βx)) / (1 - 2ε).
    g = -beta * ((1 - eps) * _sig(-beta * x) + eps * _sig(beta * x)) / (1 - 2 * eps)
    return g, -g
  if kind == 'rpo':
    g = -beta * _sig(-beta * x)
    return g - alpha / N_C, -g           # + α ∂(-a_c / n_c)/∂a_c
  if kind == 'ipo':
    # ∂(h - 1/(2β))²/∂h = 2 (h - 1/(2β)); h on token means, so ∂h/∂a_c = 1/n_c.
    h = (A_C - R_C) / N_C - (A_R - R_R) / N_R
    g = 2 * (h - 1 / (2 * beta))
    return g / N_C, -g / N_R
  if kind == 'hinge':
    g = np.where(beta * x < 1, -beta, 0.0)
    return g, -g
  if kind == 'simpo':
    # Meng et al.: -β σ(γ + β/|y_l| log π_l - β/|y_w| log π_w) (∇/|y_w| - ∇/|y_l|).
    s = _sig(gamma + beta * A_R / N_R - beta * A_C / N_C)
    return -beta * s / N_C, beta * s / N_R
  if kind == 'orpo':
    # Hong et al., the gradient of L_OR: ∇L_OR = δ(d) h(d), δ = (1 + odds_w / odds_l)^-1,
    # h = -∇log P_w / (1 - P_w) + ∇log P_l / (1 - P_l), with log P = a / n;
    # plus α ∇(-log P_w) from L_SFT.
    p_c, p_r = np.exp(A_C / N_C), np.exp(A_R / N_R)
    delta = 1 / (1 + (p_c / (1 - p_c)) / (p_r / (1 - p_r)))
    g_c = beta * delta * -1 / (1 - p_c) / N_C - alpha / N_C
    g_r = beta * delta / (1 - p_r) / N_R
    return g_c, g_r
  raise AssertionError(kind)


@pytest.mark.parametrize('kind,beta,eps', [
    ('sigmoid', 0.1, 0.0), ('sigmoid', 0.5, 0.2), ('ipo', 0.1, 0.0),
    ('ipo', 0.5, 0.0), ('hinge', 0.1, 0.0), ('hinge', 0.5, 0.0),
    ('robust', 0.1, 0.2), ('robust', 0.5, 0.4), ('rpo', 0.1, 0.0),
    ('simpo', 2.0, 0.0), ('orpo', 0.1, 0.0), ('orpo', 0.5, 0.0)])
def test_gradient_equals_the_papers(kind, beta, eps):
  alpha, gamma = 0.7, 0.3

  def total(a_c, a_r):
    loss, _, _ = losses.preference_loss(
        a_c, a_r, jnp.asarray(R_C), jnp.asarray(R_R), jnp.asarray(N_C),
        jnp.asarray(N_R), loss=kind, beta=beta, label_smoothing=eps,
        nll_weight=alpha, simpo_gamma=gamma)
    return jnp.sum(loss)

  got = jax.grad(total, argnums=(0, 1))(jnp.asarray(A_C), jnp.asarray(A_R))
  want = paper_gradient(kind, beta, eps, alpha, gamma)
  for g, w, name in zip(got, want, ('chosen', 'rejected')):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-7, err_msg=name)


def paper_loss(kind, a_c, a_r, r_c, r_r, n_c, n_r, beta, eps=0.0, alpha=1.0,
               gamma=0.5):
  """(loss, reward_chosen, reward_rejected) per pair from the papers' notation."""
  log_sig = lambda z: -np.log1p(np.exp(-z))
  if kind in ('simpo', 'orpo'):
    m_c, m_r = a_c / n_c, a_r / n_r
    if kind == 'simpo':
      return -log_sig(beta * m_c - beta * m_r - gamma), beta * m_c, beta * m_r
    odds = lambda p: p / (1 - p)
    ratio = odds(np.exp(m_c)) / odds(np.exp(m_r))
    return -m_c * alpha - beta * np.log(ratio / (1 + ratio)), beta * m_c, beta * m_r
  if kind == 'ipo':
    a_c, r_c, a_r, r_r = a_c / n_c, r_c / n_c, a_r / n_r, r_r / n_r
  x = (a_c - r_c) - (a_r - r_r)
  dpo = -(1 - eps) * log_sig(beta * x) - eps * log_sig(-beta * x)
  loss = {'sigmoid': dpo, 'rpo': dpo - alpha * a_c / n_c,
          'ipo': (x - 1 / (2 * beta)) ** 2,
          'hinge': np.maximum(0.0, 1 - beta * x),
          'robust': ((1 - eps) * -log_sig(beta * x) + eps * log_sig(-beta * x))
                    / (1 - 2 * eps)}[kind]
  return loss, beta * (a_c - r_c), beta * (a_r - r_r)


def _batch_from_sequence_logps(pc, pr, rc, rr, n_c, n_r, width=12):
  """Token log-probs spread evenly over the first n response tokens of rows."""
  def spread(total, n):
    rows = np.zeros((len(total), width), np.float32)
    mask = np.zeros((len(total), width), np.float32)
    for i, (t, k) in enumerate(zip(total, n)):
      rows[i, 1:1 + int(k)] = t / k
      mask[i, 1:1 + int(k)] = 1
    return rows, mask
  return spread(pc, n_c), spread(pr, n_r), spread(rc, n_c)[0], spread(rr, n_r)[0]


class _StubModel:
  """Logits whose log-softmax at the targets are given log-probs (vocab 2)."""

  def __init__(self, token_logps):
    self.token_logps = token_logps   # [2B, T], interleaved chosen/rejected

  def __call__(self, inputs, segment_ids=None, positions=None):
    lp = jnp.asarray(self.token_logps)
    p = jnp.exp(lp)
    # Target is token 0 everywhere: log p(0) = lp, p(1) = 1 - p.
    logits = jnp.stack([lp, jnp.log1p(-p + 1e-30)], axis=-1)
    return logits, {}


@pytest.mark.parametrize('kind,eps', [
    ('sigmoid', 0.0), ('sigmoid', 0.1), ('ipo', 0.0), ('hinge', 0.0),
    ('robust', 0.2), ('rpo', 0.1), ('simpo', 0.0), ('orpo', 0.0)])
def test_loss_fn_metrics_match_the_papers(kind, eps):
  """The step's loss reads token counts from the loss masks and sums over pairs."""
  beta = 2.0 if kind == 'simpo' else 0.2
  free = kind in losses.REFERENCE_FREE_LOSSES
  rc, rr = (np.zeros_like(R_C), np.zeros_like(R_R)) if free else (R_C, R_R)
  (tc, mc), (tr, mr), ref_c, ref_r = _batch_from_sequence_logps(A_C, A_R, rc, rr, N_C, N_R)
  tokens = np.stack([np.where(mc > 0, tc, -1.0), np.where(mr > 0, tr, -1.0)],
                    axis=1).reshape(10, -1)
  batch = {'ref_logps_chosen': ref_c, 'ref_logps_rejected': ref_r}
  for side, mask in (('chosen', mc), ('rejected', mr)):
    batch[f'{side}_loss_mask'] = mask
    for key in ('inputs', 'targets', 'positions', 'segment_ids'):
      batch[f'{side}_{key}'] = np.zeros(mask.shape, np.int32)
  cfg = ml_collections.ConfigDict(dict(loss=kind, beta=beta, label_smoothing=eps,
                                       nll_weight=0.7, simpo_gamma=0.3))
  loss_sum, m = losses.make_loss_fn(cfg)(_StubModel(tokens), batch, None)

  loss, rw_c, rw_r = paper_loss(kind, A_C, A_R, rc, rr, N_C, N_R, beta, eps,
                                alpha=0.7, gamma=0.3)
  wins = np.where(rw_c > rw_r, 1.0, np.where(rw_c == rw_r, 0.5, 0.0))
  want = {'weight': 5, 'loss': loss.sum(), 'rewards_chosen': rw_c.sum(),
          'rewards_rejected': rw_r.sum(), 'reward_accuracy': wins.sum(),
          'reward_margin': (rw_c - rw_r).sum(), 'logps_chosen': A_C.sum(),
          'logps_rejected': A_R.sum()}
  if free:                      # no reference: no gap to it
    assert 'ref_gap_chosen' not in m
  else:
    want['ref_gap_chosen'] = (rc - A_C).sum()
  for k, w in want.items():
    np.testing.assert_allclose(float(m[k]), w, rtol=1e-5, atol=1e-4, err_msg=k)
  np.testing.assert_allclose(float(loss_sum), loss.sum(), rtol=1e-5)


def test_unknown_loss_is_refused():
  with pytest.raises(ValueError, match='dpo.loss'):
    losses.preference_loss(A_C, A_R, R_C, R_R, loss='kto')
