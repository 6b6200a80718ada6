"""DPO losses and metrics against a NumPy implementation of the papers' formulas."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from align import losses

# Hand-made sequence log-probs of 5 pairs: policy and reference, chosen and rejected.
PC = np.array([-10.0, -20.0, -5.5, -7.0, -31.0], np.float32)
PR = np.array([-12.0, -18.0, -5.5, -9.0, -30.0], np.float32)
RC = np.array([-11.0, -19.0, -6.0, -7.0, -30.5], np.float32)
RR = np.array([-11.5, -19.5, -5.0, -8.0, -30.0], np.float32)
N_C = np.array([4, 7, 2, 3, 9], np.float32)      # response tokens of each side
N_R = np.array([5, 6, 2, 4, 8], np.float32)


def _log_sigmoid(z):
  return -np.log1p(np.exp(-z))


def numpy_dpo(pc, pr, rc, rr, kind, beta, eps):
  x = (pc - rc) - (pr - rr)
  if kind == 'sigmoid':
    loss = -(1 - eps) * _log_sigmoid(beta * x) - eps * _log_sigmoid(-beta * x)
  elif kind == 'ipo':
    loss = (x - 1 / (2 * beta)) ** 2
  else:
    loss = np.maximum(0.0, 1 - beta * x)
  return loss, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize('kind,beta,eps', [
    ('sigmoid', 0.1, 0.0), ('sigmoid', 0.5, 0.0), ('sigmoid', 0.1, 0.2),
    ('sigmoid', 1.0, 0.45), ('ipo', 0.1, 0.0), ('ipo', 0.5, 0.0),
    ('hinge', 0.1, 0.0), ('hinge', 1.0, 0.0)])
def test_preference_loss_matches_numpy(kind, beta, eps):
  got = losses.preference_loss(PC, PR, RC, RR, loss=kind, beta=beta, label_smoothing=eps)
  want = numpy_dpo(PC, PR, RC, RR, kind, beta, eps)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6)


def test_policy_equal_reference_gives_log2_and_zero_rewards():
  loss, rc, rr = losses.preference_loss(PC, PR, PC, PR, loss='sigmoid', beta=0.1)
  np.testing.assert_array_equal(np.asarray(loss), np.full(5, np.log(2), np.float32))
  np.testing.assert_array_equal(np.asarray(rc), 0)
  np.testing.assert_array_equal(np.asarray(rr), 0)


def _batch_from_sequence_logps(pc, pr, rc, rr, n_c, n_r, width=12):
  """Token log-probs spread evenly over the first n response tokens of rows.

  The loss function reads only `*_loss_mask` and `ref_logps_*` from the batch
  once the policy's token log-probs are given, so a stub model returning chosen
  rows first, then rejected, reproduces the sequence sums exactly.
  """
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


@pytest.mark.parametrize('kind,eps', [('sigmoid', 0.0), ('sigmoid', 0.1),
                                      ('ipo', 0.0), ('hinge', 0.0)])
def test_loss_fn_metrics_match_numpy(kind, eps):
  beta = 0.2
  (tc, mc), (tr, mr), ref_c, ref_r = _batch_from_sequence_logps(PC, PR, RC, RR, N_C, N_R)
  # Avoid log p = 0 at masked positions being counted: they are masked anyway.
  tokens = np.stack([np.where(mc > 0, tc, -1.0), np.where(mr > 0, tr, -1.0)],
                    axis=1).reshape(10, -1)
  batch = {'ref_logps_chosen': ref_c, 'ref_logps_rejected': ref_r}
  for side, mask in (('chosen', mc), ('rejected', mr)):
    batch[f'{side}_loss_mask'] = mask
    for key in ('inputs', 'targets', 'positions', 'segment_ids'):
      batch[f'{side}_{key}'] = np.zeros(mask.shape, np.int32)
  cfg = ml_collections.ConfigDict(dict(loss=kind, beta=beta, label_smoothing=eps))
  loss_sum, m = losses.make_loss_fn(cfg)(_StubModel(tokens), batch, None)

  if kind == 'ipo':
    loss, rw_c, rw_r = numpy_dpo(PC / N_C, PR / N_R, RC / N_C, RR / N_R, kind, beta, eps)
  else:
    loss, rw_c, rw_r = numpy_dpo(PC, PR, RC, RR, kind, beta, eps)
  wins = np.where(rw_c > rw_r, 1.0, np.where(rw_c == rw_r, 0.5, 0.0))
  want = {'weight': 5, 'loss': loss.sum(), 'rewards_chosen': rw_c.sum(),
          'rewards_rejected': rw_r.sum(), 'reward_accuracy': wins.sum(),
          'reward_margin': (rw_c - rw_r).sum(), 'logps_chosen': PC.sum(),
          'logps_rejected': PR.sum(), 'ref_gap_chosen': (RC - PC).sum()}
  for k, w in want.items():
    np.testing.assert_allclose(float(m[k]), w, rtol=1e-5, atol=1e-4, err_msg=k)
  np.testing.assert_allclose(float(loss_sum), loss.sum(), rtol=1e-5)


def test_unknown_loss_is_refused():
  with pytest.raises(ValueError, match='dpo.loss'):
    losses.preference_loss(PC, PR, RC, RR, loss='kto')
