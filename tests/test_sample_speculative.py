"""train.sample --speculative: self-speculative decoding with the MTP modules.

References: plain `sample.generate` (greedy: token-identical output), the
main model's own next-token distribution (sampling: chi-square of the
speculative second token against the marginal computed from the plain
model), and Leviathan et al. 2023's rule written out in NumPy on hand-made
p and q (the emitted token is distributed as p).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import configs
import model as model_lib
from configs.errors import UserError
from train import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Upper 0.1 % points of chi-square (as tests/test_sample.py).
CHI2_CRITICAL_0_001 = {4: 18.467, 7: 24.322}


def _decoder(overrides, seed=1, scale=8.0, spec='configs/llama.py:tiny'):
  cfg = configs.load(spec, [
      'model.vocab_size=64', 'model.d_model=32', 'model.num_heads=4', 'model.d_ff=64',
      'model.max_seq_len=64', 'train.seq_len=16'] + overrides)
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(seed))
  # Larger weights than the init, so that the argmax depends on the context.
  for _, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    if var.get_value().ndim > 1:
      var.set_value(var.get_value() * scale)
  return cfg, decoder


@pytest.mark.parametrize('depth,spec', [(2, 'configs/llama.py:tiny'),
                                        (1, 'configs/deepseek.py:tiny')])   # MLA + MoE
def test_greedy_speculative_is_token_identical_to_plain_greedy(depth, spec):
  cfg, decoder = _decoder([f'model.mtp_depth={depth}'], spec=spec)
  rng = np.random.default_rng(depth)
  drafted = accepted = 0
  for n in range(3):
    prompt = rng.integers(0, 64, size=int(rng.integers(1, 9))).tolist()
    want = sample.generate(decoder, cfg.model, [prompt], max_new_tokens=12)
    got = sample.generate(decoder, cfg.model, [prompt], max_new_tokens=12, speculative=True,
                          full_output=True)
    assert got.tokens == want, (n, prompt)
    drafted += got.drafted
    accepted += got.accepted
  # Untrained drafts: mostly rejected, so the rejection path is what ran.
  assert drafted > 0 and accepted < drafted


def test_forced_right_drafts_are_accepted_several_at_a_time():
  cfg, decoder = _decoder(['model.mtp_depth=3'])
  prompt = [5, 9, 2, 17]
  want = sample.generate(decoder, cfg.model, [prompt], max_new_tokens=13)[0]

  def oracle(seq, d):
    # The main model's own greedy continuation of seq: always right.
    return sample.generate(decoder, cfg.model, [seq], max_new_tokens=d)[0]

  got = sample.generate_speculative(decoder, cfg.model, [prompt], max_new_tokens=13,
                                    full_output=True, draft_fn=oracle)
  assert got.tokens[0] == want
  assert got.accepted == got.drafted
  # 1 token from the prefill, then D + 1 = 4 per verification: 1 + 4 + 4 + 4.
  assert got.forwards == 4
  np.testing.assert_allclose(got.logits[0], sample.generate(
      decoder, cfg.model, [prompt], max_new_tokens=13, full_output=True).logits[0],
                             rtol=1e-4, atol=1e-4)


def _numpy_rule(p, q, x, u, rng):
  """Leviathan et al. 2023, algorithm 1 for one draft token: accept x ~ q if
  u <= p(x)/q(x), else draw from (p - q)+ normalised."""
  if u <= p[x] / q[x]:
    return x
  r = np.clip(p - q, 0, None)
  return rng.choice(len(p), p=r / r.sum())


def test_rejection_rule_emits_the_main_distribution():
  p = np.array([0.4, 0.1, 0.3, 0.05, 0.15])
  q = np.array([0.1, 0.5, 0.1, 0.2, 0.1])
  rng = np.random.default_rng(0)
  draws = 20000
  counts = np.zeros(5)
  accepted = 0
  for _ in range(draws):
    x = int(rng.choice(5, p=q))
    n, nxt = sample.speculative_accept(np.stack([p, p]), q[None], [x], rng)
    accepted += n
    counts[x if n else nxt] += 1
  # The acceptance probability is sum min(p, q) (Leviathan et al. 2023, eq. 1).
  assert abs(accepted / draws - np.minimum(p, q).sum()) < 0.015
  expected = draws * p
  assert np.sum((counts - expected) ** 2 / expected) < CHI2_CRITICAL_0_001[4], counts
  # The NumPy reference gives the same frequencies.
  ref = np.bincount([_numpy_rule(p, q, int(rng.choice(5, p=q)), rng.random(), rng)
                     for _ in range(draws)], minlength=5)
  assert np.sum((ref - expected) ** 2 / expected) < CHI2_CRITICAL_0_001[4]
  # Past the last draft: the bonus token comes from p_D.
  rng = np.random.default_rng(1)
  bonus = np.bincount([sample.speculative_accept(np.stack([p, q]), p[None], [0], rng)[1]
                       for _ in range(4000)], minlength=5)
  assert np.sum((bonus - 4000 * q) ** 2 / (4000 * q)) < CHI2_CRITICAL_0_001[4]


def test_sampled_second_token_matches_the_main_model():
  cfg, decoder = _decoder(['model.vocab_size=8', 'model.mtp_depth=2'], scale=3.0)
  prompt = [1, 4, 2]
  temperature = 1.0
  # The plain model's marginal of the second new token: sum over the first.
  first = sample.generate(decoder, cfg.model, [prompt], max_new_tokens=1,
                          temperature=temperature, full_output=True).logits[0, 0]
  p1 = np.exp(first - first.max())
  p1 /= p1.sum()
  want = np.zeros(8)
  for x1 in range(8):
    nxt = sample.generate(decoder, cfg.model, [prompt + [x1]], max_new_tokens=1,
                          full_output=True).logits[0, 0]
    p2 = np.exp(nxt - nxt.max())
    want += p1[x1] * p2 / p2.sum()
  draws = 1500
  counts = np.zeros(8)
  for seed in range(draws):
    out = sample.generate(decoder, cfg.model, [prompt], max_new_tokens=2,
                          temperature=temperature, seed=seed, speculative=True)[0]
    counts[out[1]] += 1
  expected = draws * want
  assert np.sum((counts - expected) ** 2 / expected) < CHI2_CRITICAL_0_001[7], (counts, expected)


def test_refusals():
  cfg, decoder = _decoder([])
  with pytest.raises(UserError, match='mtp_depth'):
    sample.generate(decoder, cfg.model, [[1, 2]], speculative=True)
  cfg, decoder = _decoder(['model.mtp_depth=1'])
  with pytest.raises(UserError, match='one prompt'):
    sample.generate(decoder, cfg.model, [[1, 2], [3]], speculative=True)
  with pytest.raises(UserError, match='streaming'):
    sample.generate(decoder, cfg.model, [[1, 2]], speculative=True, streaming_sinks=1)
  cfg, decoder = _decoder(['model.mtp_depth=1', 'model.sliding_window=4'])
  with pytest.raises(UserError, match='sliding-window'):
    sample.generate(decoder, cfg.model, [[1, 2]], max_new_tokens=8, speculative=True)


def test_stats_line_is_consistent_with_the_counts():
  cfg, decoder = _decoder(['model.mtp_depth=2'])
  gen = sample.generate(decoder, cfg.model, [[3, 1, 4]], max_new_tokens=10, speculative=True,
                        full_output=True)
  line = [l for l in sample.stats_lines(cfg.model, gen).splitlines()
          if l.startswith('speculative:')]
  assert len(line) == 1, sample.stats_lines(cfg.model, gen)
  words = line[0].replace('(', ' ').split()
  rate = float(words[words.index('rate') + 1])
  per_forward = float(words[words.index('tokens') - 1])
  # Every round drafts D = 2 and verifies with one forward; the first token
  # comes from the prefill.
  rounds = gen.forwards - 1
  assert gen.drafted == 2 * rounds
  assert rate == pytest.approx(gen.accepted / gen.drafted, abs=5e-4)
  assert per_forward == pytest.approx(10 / gen.forwards, abs=5e-3)
  assert len(gen.tokens[0]) == 10 and gen.logits.shape[:2] == (1, 10)
  # Each round emits its accepted drafts plus one token (the last round may be cut).
  assert 1 + gen.accepted + rounds >= 10 > gen.accepted + rounds
