"""The global workspace's math as pure, jittable functions (SPEC §1.3–1.4).

Modules in `models.py` call these; tests check them against NumPy float64. Nothing here holds state.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

CV_EPS = 1e-10  # SPEC §1.4: cv² = var / (mean² + 1e-10)
NORM_EPS = 1e-12  # as torch.nn.functional.normalize


class BottleneckOutput(NamedTuple):
  """What one bottleneck read returns.

  read:       [Hm, M, Dh] per head, the gated sum of values read by every memory slot.
  indices:    [G, Hm, M, k] token index (within its group) of each kept logit; None when dense.
  weights:    [G, Hm, M, k] softmax gates of the kept logits (divided by G); dense: [G, Hm, M, n].
  importance: [Hm, T] Σ over slots of the gates each token received (T = G·n).
  load:       [Hm, T] number of slots whose top-k holds the token (a count: no gradient).
  """
  read: jax.Array
  indices: jax.Array | None
  weights: jax.Array
  importance: jax.Array
  load: jax.Array


def bottleneck_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                         top_k: int | None) -> BottleneckOutput:
  """Bottleneck attention read: memory slots attend to their top-k tokens only (SPEC §1.3).

  Args:
    queries: [Hm, M, Dh] memory queries per head.
    keys, values: [G, Hm, n, Dh]. G groups of n tokens compete separately: G = 1 and n = B·N for
      the faithful scope 'batch' (all tokens of the batch squashed into one sequence), G = B and
      n = N for scope 'example'. Every group is read with its own softmax and the G reads are
      averaged, so each slot's gates still sum to 1 over all T = G·n tokens.
    top_k: tokens kept per head, slot and group; None keeps all (dense cross-attention, the
      'without bottleneck' ablation of SPEC §1.9).

  Logits are q·kᵀ/√Dh; selection and softmax run in float32 whatever the input dtype, so bf16 runs
  pick the same tokens as float32 ones up to rounding of the logits.
  """
  num_groups, num_heads, n, head_dim = keys.shape
  num_slots = queries.shape[1]
  logits = jnp.einsum('hmd,ghnd->ghmn', queries, keys,
                      preferred_element_type=jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
  if top_k is None:
    gates = jax.nn.softmax(logits, axis=-1) / num_groups  # [G, Hm, M, n]
    read = jnp.einsum('ghmn,ghnd->hmd', gates.astype(values.dtype), values)
    importance = gates.sum(axis=2)  # [G, Hm, n]
    load = jnp.full_like(importance, num_slots)
    to_tokens = lambda a: jnp.moveaxis(a, 0, 1).reshape(num_heads, num_groups * n)
    return BottleneckOutput(read, None, gates, to_tokens(importance), to_tokens(load))

  if not 0 < top_k <= n:
    raise ValueError(f'bottleneck_k={top_k} must be in [1, {n}], the tokens each slot competes '
                     'over; lower bottleneck_k or raise the batch size.')
  kept, indices = jax.lax.top_k(logits, top_k)  # [G, Hm, M, k]; exactly k even with ties
  weights = jax.nn.softmax(kept, axis=-1) / num_groups
  flat_idx = indices.reshape(num_groups, num_heads, num_slots * top_k)
  picked = jnp.take_along_axis(values, flat_idx[..., None], axis=2)  # [G, Hm, M·k, Dh]
  picked = picked.reshape(num_groups, num_heads, num_slots, top_k, head_dim)
  read = jnp.einsum('ghmk,ghmkd->hmd', weights.astype(values.dtype), picked)

  def scatter(idx, w):  # idx, w: [M·k] -> per-token sums [n]
    return jnp.zeros((n,), jnp.float32).at[idx].add(w)

  per_token = jax.vmap(jax.vmap(scatter))
  importance = per_token(flat_idx, weights.reshape(flat_idx.shape))
  load = per_token(flat_idx, jnp.ones(flat_idx.shape, jnp.float32))
  to_tokens = lambda a: jnp.moveaxis(a, 0, 1).reshape(num_heads, num_groups * n)
  return BottleneckOutput(read, indices, weights, to_tokens(importance),
                          jax.lax.stop_gradient(to_tokens(load)))


def dense_gates(out: BottleneckOutput) -> jax.Array:
  """The gate matrix G_h ∈ R^{M×T} of SPEC §1.3 as a dense [Hm, M, T] array (tests, figures)."""
  if out.indices is None:
    g, h, m, n = out.weights.shape
    return jnp.moveaxis(out.weights, 0, 2).reshape(h, m, g * n)
  g, h, m, _ = out.indices.shape
  n = out.importance.shape[1] // g

  def one(idx, w):  # [M, k] -> [M, n]
    return jax.vmap(lambda i, v: jnp.zeros((n,), w.dtype).at[i].add(v))(idx, w)

  gates = jax.vmap(jax.vmap(one))(out.indices, out.weights)  # [G, Hm, M, n]
  return jnp.moveaxis(gates, 0, 2).reshape(h, m, g * n)


def cv_squared(x: jax.Array) -> jax.Array:
  """Squared coefficient of variation along the last axis: var (unbiased) / (mean² + 1e-10)."""
  x = x.astype(jnp.float32)
  return jnp.var(x, axis=-1, ddof=1) / (jnp.mean(x, axis=-1) ** 2 + CV_EPS)


def balance_loss(importance: jax.Array, load: jax.Array, coef: float = 0.01) -> jax.Array:
  """Bottleneck balance loss of one layer (SPEC §1.4): coef · Σ_heads cv²(importance) + cv²(load).

  importance, load: [Hm, T]. load is a count and carries no gradient.
  """
  load = jax.lax.stop_gradient(load)
  return coef * jnp.sum(cv_squared(importance) + cv_squared(load))


def l2_normalize_rows(x: jax.Array) -> jax.Array:
  """Row-wise L2 normalisation, x / max(‖x‖, 1e-12) like torch's F.normalize."""
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
  return (x / jnp.maximum(norm, NORM_EPS)).astype(x.dtype)


def ema_write(memory: jax.Array, update: jax.Array, momentum: float = 0.9) -> jax.Array:
  """EMA memory write (SPEC §1.3): rownorm_L2(momentum · memory + (1 − momentum) · update).

  Which side is stop-gradient'ed is the caller's choice (SPEC §1.6, `gradient_mode`).
  """
  mixed = momentum * memory.astype(jnp.float32) + (1.0 - momentum) * update.astype(jnp.float32)
  return l2_normalize_rows(mixed)
