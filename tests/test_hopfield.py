"""Checks Hopfield retrieval and energy (docs/model.md#hopfield) against NumPy float64 and the CCCP property."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax import hopfield

RTOL = ATOL = 1e-5


def np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_retrieve(state, patterns, beta, steps):
  """docs/model.md#hopfield: ξ ← softmax(β ξ Pᵀ, over M) P, `steps` times."""
  xi = np.asarray(state, np.float64)
  p = np.asarray(patterns, np.float64)
  for _ in range(steps):
    xi = np_softmax(beta * xi @ p.T) @ p
  return xi


def np_energy(state, patterns, beta):
  """E(ξ) = −(1/β)·logsumexp(β P ξ) + ½ ξᵀξ + (1/β)·ln M + ½ max_i ‖P_i‖²."""
  xi = np.asarray(state, np.float64)
  p = np.asarray(patterns, np.float64)
  z = beta * xi @ p.T
  zmax = z.max(axis=-1, keepdims=True)
  lse = (zmax + np.log(np.exp(z - zmax).sum(axis=-1, keepdims=True)))[..., 0]
  return (-lse / beta + 0.5 * (xi * xi).sum(-1) + np.log(p.shape[0]) / beta
          + 0.5 * (p * p).sum(-1).max())


CASES = [  # (state shape, M, D, β)
    ((7,), 5, 7, 1.0),
    ((4, 16), 32, 16, 1.0),
    ((2, 9, 64), 32, 64, 0.25),
    ((3, 8), 11, 8, 4.0),
]


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('steps', [1, 3])
def test_retrieve_matches_numpy(case, steps):
  shape, m, d, beta = case
  rng = np.random.default_rng(m + d + steps)
  state = rng.standard_normal(shape[:-1] + (d,)).astype(np.float32)
  patterns = rng.standard_normal((m, d)).astype(np.float32)
  got = hopfield.hopfield_retrieve(state, patterns, beta, steps)
  chex.assert_shape(got, state.shape)
  chex.assert_trees_all_close(got, np_retrieve(state, patterns, beta, steps),
                              rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('case', CASES)
def test_energy_matches_numpy(case):
  shape, m, d, beta = case
  rng = np.random.default_rng(m * d)
  state = (2 * rng.standard_normal(shape[:-1] + (d,))).astype(np.float32)
  patterns = rng.standard_normal((m, d)).astype(np.float32)
  got = hopfield.hopfield_energy(state, patterns, beta)
  chex.assert_shape(got, shape[:-1])
  chex.assert_trees_all_close(got, np_energy(state, patterns, beta), rtol=RTOL, atol=1e-4)


def test_retrieve_rejects_zero_steps():
  with pytest.raises(ValueError, match='hopfield_steps'):
    hopfield.hopfield_retrieve(jnp.ones((2, 3)), jnp.ones((4, 3)), 1.0, 0)


@pytest.mark.parametrize('seed,m,d,beta,scale', [
    (0, 32, 16, 1.0, 1.0), (1, 8, 32, 4.0, 1.0), (2, 64, 8, 0.5, 3.0), (3, 16, 64, 8.0, 0.5),
    (4, 32, 32, 1.0, 4.0), (5, 5, 3, 2.0, 2.0)])
def test_energy_never_increases(seed, m, d, beta, scale):
  rng = np.random.default_rng(seed)
  patterns = (scale * rng.standard_normal((m, d))).astype(np.float32)
  state = (3 * scale * rng.standard_normal((16, d))).astype(np.float32)  # 16 states at once
  step = jax.jit(lambda xi: hopfield.hopfield_retrieve(xi, patterns, beta, 1))
  energy = jax.jit(lambda xi: hopfield.hopfield_energy(xi, patterns, beta))
  xi = jnp.asarray(state)
  energies, energies64 = [energy(xi)], [np_energy(xi, patterns, beta)]
  for _ in range(40):
    xi = step(xi)
    energies.append(energy(xi))
    energies64.append(np_energy(xi, patterns, beta))
  e, e64 = np.stack(energies), np.stack(energies64)  # [steps + 1, 16]
  tol = 1e-5 * (1 + np.abs(e[:-1]))  # float32 rounding near a fixed point
  assert (np.diff(e, axis=0) <= tol).all(), np.diff(e, axis=0).max()
  assert (np.diff(e64, axis=0) <= tol).all(), np.diff(e64, axis=0).max()
  assert (e[-1] < e[0]).all()  # and it does go down from a random start
  # Iterating `steps` times inside one call is the same as calling step by step.
  chex.assert_trees_all_close(hopfield.hopfield_retrieve(state, patterns, beta, 40), xi,
                              rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('seed', range(4))
def test_one_step_retrieves_nearest_stored_pattern(seed):
  rng = np.random.default_rng(seed)
  m, d, beta = 16, 64, 16.0
  patterns = rng.standard_normal((m, d))
  patterns /= np.linalg.norm(patterns, axis=-1, keepdims=True)
  patterns = (2.0 * patterns).astype(np.float32)  # ‖P_i‖ = 2: separation Δ = 4 − max_j P_i·P_j ≳ 2
  targets = rng.integers(0, m, 32)
  queries = (patterns[targets] + 0.1 * rng.standard_normal((32, d))).astype(np.float32)  # ‖noise‖ ≈ 0.8
  nearest = np.argmin(((queries[:, None] - patterns[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(nearest, targets)  # the noise keeps each query nearest its own
  got = hopfield.hopfield_retrieve(queries, patterns, beta, 1)
  chex.assert_trees_all_close(got, patterns[targets], rtol=0, atol=1e-3)
  # And the stored patterns are (near) fixed points.
  chex.assert_trees_all_close(hopfield.hopfield_retrieve(patterns, patterns, beta, 1), patterns,
                              rtol=0, atol=1e-3)
