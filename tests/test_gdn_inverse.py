"""`model.gdn.unit_lower_inverse` against NumPy's inverse, and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import gdn


@pytest.mark.parametrize('c', [1, 2, 8, 64, 48])
def test_inverse_of_a_unit_lower_triangular_matrix(c):
  rng = np.random.default_rng(c)
  # Entries of the delta rule's size (beta k.k decay is in [-1, 1]).
  a = np.tril(rng.uniform(-1, 1, size=(3, 2, c, c)) / np.sqrt(c), -1)
  want = np.linalg.inv(np.eye(c) + a)
  got = gdn.unit_lower_inverse(jnp.asarray(a, jnp.float32))
  assert got.shape == a.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_gradient_is_minus_inverse_transposed_products():
  # d/da sum(G * (I + a)^-1) = -(L^-T G L^-T), kept on the strict lower part.
  c = 16
  rng = np.random.default_rng(0)
  a = np.tril(rng.uniform(-1, 1, size=(c, c)) / 4, -1)
  g = rng.normal(size=(c, c))
  inv = np.linalg.inv(np.eye(c) + a)
  want = np.tril(-(inv.T @ g @ inv.T), -1)
  got = jax.grad(lambda x: jnp.sum(jnp.asarray(g, jnp.float32) * gdn.unit_lower_inverse(
      jnp.tril(x, -1))))(jnp.asarray(a, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
