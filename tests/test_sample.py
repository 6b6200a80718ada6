"""train.sample: top-k and top-p sampling restrict the support as specified and
draw from the renormalised probabilities.

The cache (greedy decoding against full re-computation, rolling windows,
StreamingLLM sinks) is tested in test_sample_cache.py.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  top_k = {int(sample.sample_logits(logits, k, 1.0, top_k=2)[0]) for k in keys}
  assert top_k == {0, 1}
  top_p = {int(sample.sample_logits(logits, k, 1.0, top_p=0.85)[0]) for k in keys}
  assert top_p == {0, 1, 2}


# Upper 0.1 % points of the chi-square distribution, 1 to 7 degrees of freedom
# (NIST/SEMATECH e-Handbook, table 1.3.6.7.4).
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515,
                       6: 22.458, 7: 24.322}


def sampling_distribution(p, temperature, top_k=0, top_p=1.0):
  """The distribution top-k / top-p sampling draws from, by definition: p^(1/T)
  normalised; the k most likely tokens, renormalised; then the smallest set of
  most likely tokens whose mass reaches top_p (Holtzman et al. 2020),
  renormalised."""
  q = np.asarray(p, np.float64) ** (1 / temperature)
  q /= q.sum()
  order = np.argsort(-q)
  if top_k:
    q[order[top_k:]] = 0
    q /= q.sum()
  if top_p < 1.0:
    cum = np.cumsum(q[order])
    size = int(np.searchsorted(cum, top_p)) + 1     # first prefix with mass >= top_p
    q[order[size:]] = 0
    q /= q.sum()
  return q


@pytest.mark.parametrize('temperature,top_k,top_p', [
    (1.0, 3, 1.0), (1.0, 0, 0.8), (0.5, 0, 0.8), (1.5, 5, 0.9), (0.8, 0, 1.0)])
def test_sampled_frequencies_match_the_renormalised_probabilities(temperature, top_k, top_p):
  p = np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02])
  draws = 20000
  logits = jnp.log(jnp.asarray(np.tile(p, (draws, 1)), jnp.float32))
  tokens = np.asarray(sample.sample_logits(logits, jax.random.PRNGKey(7), temperature,
                                           top_k=top_k, top_p=top_p))
  counts = np.bincount(tokens, minlength=len(p))
  want = sampling_distribution(p, temperature, top_k, top_p)
  support = want > 0
  assert not counts[~support].any()
  # Pearson's chi-square goodness of fit at a fixed seed, against the 0.1 %
  # critical value for support - 1 degrees of freedom; a wrong distribution
  # (one token too many or too few in the nucleus, another temperature) lands
  # far beyond it.
  expected = draws * want[support]
  statistic = float(np.sum((counts[support] - expected) ** 2 / expected))
  assert statistic < CHI2_CRITICAL_0_001[int(support.sum()) - 1], (counts, expected)


def _run_sample(*flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('ABLAX_DEBUG', None)
  return subprocess.run([sys.executable, '-m', 'train.sample', *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_command_line_help_and_a_missing_flag():
  # absl flags: --help lists every flag with its meaning and exits 0; a missing required flag is one `ablax:` line and exit status 2
  # (configs.errors.run).
  result = _run_sample('--help')
  assert result.returncode == 0, result.stderr
  listed = {line.split()[0] for line in result.stdout.splitlines()
            if line.startswith('  --')}
  for flag in ('workdir', 'prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p',
               'seed', 'streaming_sinks', 'streaming_window'):
    assert f'--{flag}' in listed, flag
  assert '--workdir /tmp/ablax_llama_tiny --prompt' in result.stdout    # an example to copy
  result = _run_sample('--workdir', REPO)
  lines = [line for line in result.stderr.splitlines() if line.startswith('ablax:')]
  assert result.returncode == 2 and lines == [
      'ablax: --prompt is required: the text to continue (repeat it for a batch)']
  assert 'Traceback' not in result.stderr
