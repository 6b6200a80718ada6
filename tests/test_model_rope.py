"""RoPE scaling (yarn, llama3, dynamic ntk): inverse frequencies and attention
factor equal transformers' rope init functions at several factors."""

import jax.numpy as jnp
import numpy as np
import pytest

from model import positions

torch = pytest.importorskip('torch', reason='needs torch (transformers runs on it)')
transformers = pytest.importorskip(
    'transformers', reason='needs transformers (the reference rope functions)')
from transformers import modeling_rope_utils as hf_rope  # pylint: disable=g-import-not-at-top


def _hf_config(head_dim, theta, max_positions, **rope):
  return transformers.LlamaConfig(
      hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
      max_position_embeddings=max_positions,
      rope_parameters=dict(rope_theta=theta, **rope))


@pytest.mark.parametrize('head_dim,theta,factor,original', [
    (16, 10000.0, 2.0, 64), (64, 10000.0, 4.0, 4096), (64, 10000.0, 8.0, 4096),
    (128, 1e6, 32.0, 4096), (128, 10000.0, 1.0, 2048)])
def test_yarn_matches_transformers(head_dim, theta, factor, original):
  cfg = _hf_config(head_dim, theta, int(original * factor), rope_type='yarn',
                   factor=factor, original_max_position_embeddings=original)
  want, want_factor = hf_rope._compute_yarn_parameters(cfg, 'cpu')
  got, got_factor = positions.rope_inv_freq(
      head_dim, theta, {'type': 'yarn', 'factor': factor, 'original_max_seq_len': original})
  np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
  # The YaRN paper's attention temperature: sqrt(1/t) = 0.1 ln(s) + 1.
  assert got_factor == pytest.approx(want_factor, rel=1e-12)
  assert got_factor == pytest.approx(0.1 * np.log(factor) + 1.0 if factor > 1 else 1.0)


@pytest.mark.parametrize('head_dim,theta,factor,original,low,high', [
    (128, 500000.0, 8.0, 8192, 1.0, 4.0), (64, 10000.0, 2.0, 256, 1.0, 4.0),
    (64, 10000.0, 32.0, 1024, 2.0, 8.0)])
def test_llama3_matches_transformers(head_dim, theta, factor, original, low, high):
  cfg = _hf_config(head_dim, theta, int(original * factor), rope_type='llama3',
                   factor=factor, low_freq_factor=low, high_freq_factor=high,
                   original_max_position_embeddings=original)
  want, want_factor = hf_rope._compute_llama3_parameters(cfg, 'cpu')
  got, got_factor = positions.rope_inv_freq(
      head_dim, theta, {'type': 'llama3', 'factor': factor, 'original_max_seq_len': original,
                        'low_freq_factor': low, 'high_freq_factor': high})
  np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
  assert got_factor == want_factor == 1.0


@pytest.mark.parametrize('factor,length', [(2.0, 16), (2.0, 48), (4.0, 40), (8.0, 100)])
def test_dynamic_ntk_matches_transformers(factor, length):
  head_dim, theta, original = 16, 10000.0, 32
  cfg = _hf_config(head_dim, theta, original, rope_type='dynamic', factor=factor)
  want, want_factor = hf_rope._compute_dynamic_ntk_parameters(cfg, 'cpu', seq_len=length)
  pos = np.arange(length)
  cos, sin = positions.rope_cos_sin(
      jnp.asarray(pos)[None], head_dim, theta,
      {'type': 'ntk', 'factor': factor, 'original_max_seq_len': original})
  angles = pos[:, None] * want.double().numpy()[None]
  # float32 angles of up to ~100 radians: 1e-5 absolute.
  np.testing.assert_allclose(np.asarray(cos[0]), np.cos(angles) * want_factor, atol=2e-5)
  np.testing.assert_allclose(np.asarray(sin[0]), np.sin(angles) * want_factor, atol=2e-5)
