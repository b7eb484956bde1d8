"""Modern Hopfield retrieval and its energy (Ramsauer et al. 2020; docs/model.md#hopfield), as pure functions.

The retrieval step is the concave–convex update of the energy, so the energy never increases.
"""
import jax
import jax.numpy as jnp

from ait_jax import errors


def hopfield_retrieve(state: jax.Array, patterns: jax.Array, beta: float = 1.0,
                      steps: int = 1) -> jax.Array:
  """Applies ξ ← softmax(β ξ Pᵀ) P `steps` times (docs/model.md#hopfield); no projections, no normalisation.

  Args:
    state: [..., D] query states ξ (AiT: the normalised FFN output of every token).
    patterns: [M, D] stored patterns P (AiT: the up-projected memory priors).
    beta: inverse temperature β.
    steps: number of update steps (≥ 1; the reference code uses one).
  """
  if steps < 1:
    raise errors.ConfigError(f'hopfield_steps={steps} must be at least 1.')
  xi = state
  for _ in range(steps):
    logits = jnp.einsum('...d,md->...m', xi, patterns, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(beta * logits, axis=-1)
    xi = jnp.einsum('...m,md->...d', attn.astype(patterns.dtype), patterns)
  return xi


def hopfield_energy(state: jax.Array, patterns: jax.Array, beta: float = 1.0) -> jax.Array:
  """Energy E(ξ) = −lse(β, Pξ) + ½ξᵀξ + β⁻¹ ln M + ½ maxᵢ‖Pᵢ‖² of each state (docs/model.md#hopfield).

  Returns [...] (one energy per state vector), computed in float32.
  """
  xi = state.astype(jnp.float32)
  p = patterns.astype(jnp.float32)
  num_patterns = p.shape[0]
  lse = jax.nn.logsumexp(beta * jnp.einsum('...d,md->...m', xi, p), axis=-1) / beta
  return (-lse + 0.5 * jnp.sum(xi * xi, axis=-1) + jnp.log(num_patterns) / beta
          + 0.5 * jnp.max(jnp.sum(p * p, axis=-1)))
