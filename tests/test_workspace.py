"""Checks the workspace math (docs/model.md#memory-write) against NumPy float64 references written from the docs.

The references below do not call ait_jax; they follow docs/model.md line by line.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax import workspace

RTOL = ATOL = 1e-5  # float32 against float64


# ---------------------------------------------------------------- NumPy float64 references (docs/model.md)

def np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_bottleneck(q, k, v, top_k):
  """docs/model.md#memory-write for G groups of n tokens: per group, head and slot, keep the top_k logits,
  softmax over them, read = gated sum of values; the G reads are averaged.

  q: [H, M, D]; k, v: [G, H, n, D]. Returns read [H, M, D], gates [H, M, G·n] (each row sums to 1
  over all tokens), importance [H, G·n] and load [H, G·n].
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  g_, h_, n, d = k.shape
  m_ = q.shape[1]
  kk = n if top_k is None else top_k
  gates = np.zeros((g_, h_, m_, n))
  chosen = np.zeros((g_, h_, m_, n))
  for g in range(g_):
    for h in range(h_):
      logits = q[h] @ k[g, h].T / np.sqrt(d)  # [M, n]
      for m in range(m_):
        idx = np.argsort(-logits[m], kind='stable')[:kk]
        gates[g, h, m, idx] = np_softmax(logits[m, idx]) / g_
        chosen[g, h, m, idx] = 1.0
  read = np.einsum('ghmn,ghnd->hmd', gates, v)
  to_tokens = lambda a: np.moveaxis(a, 0, 2).reshape(h_, m_, g_ * n)  # token t = g·n + j
  dense = to_tokens(gates)
  return read, dense, dense.sum(axis=1), to_tokens(chosen).sum(axis=1)


def np_cv_squared(x):
  x = np.asarray(x, np.float64)
  return np.var(x, axis=-1, ddof=1) / (np.mean(x, axis=-1) ** 2 + 1e-10)


def np_balance_loss(importance, load, coef):
  return coef * np.sum(np_cv_squared(importance) + np_cv_squared(load))


def np_l2_normalize_rows(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_ema_write(mem, y, momentum):
  return np_l2_normalize_rows(momentum * np.asarray(mem, np.float64)
                              + (1 - momentum) * np.asarray(y, np.float64))


# ---------------------------------------------------------------- helpers

def _qkv(seed, g, h, m, n, d, scale=1.0):
  rng = np.random.default_rng(seed)
  q = (scale * rng.standard_normal((h, m, d))).astype(np.float32)
  k = (scale * rng.standard_normal((g, h, n, d))).astype(np.float32)
  v = rng.standard_normal((g, h, n, d)).astype(np.float32)
  return q, k, v


_bottleneck = jax.jit(workspace.bottleneck_attention, static_argnums=3)
_dense_gates = jax.jit(workspace.dense_gates)

# (groups, heads, slots, tokens per group, head dim, k): one group = scope 'batch', several = 'example'
SHAPES = [
    (1, 1, 4, 16, 8, 3),
    (1, 8, 32, 128, 32, 16),
    (1, 2, 5, 37, 7, 37),
    (4, 3, 6, 20, 16, 5),
    (8, 8, 32, 16, 32, 4),
    (3, 2, 4, 9, 5, 1),
]


# ---------------------------------------------------------------- bottleneck read

@pytest.mark.parametrize('shape', SHAPES)
def test_bottleneck_matches_numpy(shape):
  g, h, m, n, d, top_k = shape
  q, k, v = _qkv(sum(shape), g, h, m, n, d)
  out = _bottleneck(q, k, v, top_k)
  read, gates, importance, load = np_bottleneck(q, k, v, top_k)
  chex.assert_shape(out.read, (h, m, d))
  chex.assert_shape(out.indices, (g, h, m, top_k))
  chex.assert_shape(out.weights, (g, h, m, top_k))
  chex.assert_shape(out.importance, (h, g * n))
  chex.assert_shape(out.load, (h, g * n))
  chex.assert_trees_all_close(out.read, read, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(_dense_gates(out), gates, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(out.importance, importance, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(out.load), load)


@pytest.mark.parametrize('shape', SHAPES)
def test_bottleneck_dense_path_matches_numpy(shape):
  g, h, m, n, d, _ = shape
  q, k, v = _qkv(sum(shape) + 1, g, h, m, n, d)
  out = _bottleneck(q, k, v, None)
  read, gates, importance, load = np_bottleneck(q, k, v, None)
  assert out.indices is None
  chex.assert_trees_all_close(out.read, read, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(_dense_gates(out), gates, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(out.importance, importance, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(out.load, load, rtol=0, atol=0)


@pytest.mark.parametrize('g,h,m,n,d', [(1, 1, 4, 16, 8), (1, 8, 32, 64, 32), (4, 2, 6, 12, 16)])
def test_bottleneck_with_all_tokens_is_dense_cross_attention(g, h, m, n, d):
  q, k, v = _qkv(n + g, g, h, m, n, d)
  full = _bottleneck(q, k, v, n)
  dense = _bottleneck(q, k, v, None)
  # Plain multi-head softmax cross-attention, memory as queries, averaged over the groups.
  logits = np.einsum('hmd,ghnd->ghmn', q.astype(np.float64), k.astype(np.float64)) / np.sqrt(d)
  expected = np.einsum('ghmn,ghnd->hmd', np_softmax(logits), v.astype(np.float64)) / g
  chex.assert_trees_all_close(full.read, expected, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(dense.read, expected, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(_dense_gates(full), _dense_gates(dense),
                              rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(full.importance, dense.importance, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(full.load, dense.load, rtol=0, atol=0)
  np.testing.assert_array_equal(np.asarray(full.load), m)  # every slot keeps every token


def _assert_gate_rows(out, g, n, top_k):
  gates = np.asarray(_dense_gates(out), np.float64)  # [H, M, G·n]
  per_group = gates.reshape(gates.shape[:2] + (g, n))
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=0, atol=1e-5)
  np.testing.assert_allclose(per_group.sum(-1), 1.0 / g, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.count_nonzero(per_group, axis=-1), top_k)
  assert (gates >= 0).all()
  # load counts the same kept tokens: every slot keeps k per group.
  np.testing.assert_array_equal(np.asarray(out.load).sum(-1), gates.shape[1] * g * top_k)


@pytest.mark.parametrize('shape', SHAPES)
def test_gate_rows_sum_to_one_with_k_nonzeros(shape):
  g, h, m, n, d, top_k = shape
  q, k, v = _qkv(sum(shape) + 2, g, h, m, n, d)
  _assert_gate_rows(_bottleneck(q, k, v, top_k), g, n, top_k)


@pytest.mark.parametrize('case', ['identical_keys', 'zero_queries', 'half_identical',
                                  'duplicated_pairs'])
@pytest.mark.parametrize('g,n,top_k', [(1, 32, 5), (1, 32, 32), (4, 8, 3)])
def test_ties_do_not_break_the_count(case, g, n, top_k):
  h, m, d = 2, 6, 8
  q, k, v = _qkv(7, g, h, m, n, d)
  if case == 'identical_keys':  # every logit of a row is the same
    k[:] = k[:, :, :1]
  elif case == 'zero_queries':  # every logit is 0
    q[:] = 0.0
  elif case == 'half_identical':  # ties straddle the k-th place
    k[:, :, n // 2:] = k[:, :, :1]
  else:  # every key appears twice
    k[:, :, 1::2] = k[:, :, 0::2]
  out = _bottleneck(q, k, v, top_k)
  _assert_gate_rows(out, g, n, top_k)
  idx = np.asarray(out.indices)
  for row in idx.reshape(-1, top_k):
    assert len(set(row.tolist())) == top_k  # k distinct tokens
  if case in ('identical_keys', 'zero_queries'):  # uniform gates over the k kept tokens
    np.testing.assert_allclose(np.asarray(out.weights), 1.0 / (top_k * g), rtol=1e-6)
  # The read is still a convex combination with the kept gates.
  gates = np.asarray(_dense_gates(out), np.float64).reshape(h, m, g, n)
  expected = np.einsum('hmgn,ghnd->hmd', gates, v.astype(np.float64))
  chex.assert_trees_all_close(out.read, expected, rtol=RTOL, atol=ATOL)


def test_bottleneck_rejects_k_above_tokens():
  q, k, v = _qkv(0, 2, 1, 3, 4, 5)
  with pytest.raises(ValueError, match='bottleneck_k'):
    workspace.bottleneck_attention(q, k, v, 5)
  with pytest.raises(ValueError, match='bottleneck_k'):
    workspace.bottleneck_attention(q, k, v, 0)


def test_bottleneck_jit_traces_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def read(q, k, v):
    return workspace.bottleneck_attention(q, k, v, 4).read

  for seed in range(3):
    q, k, v = _qkv(seed, 2, 2, 4, 8, 4)
    chex.assert_shape(read(q, k, v), (2, 4, 4))


# ---------------------------------------------------------------- importance, load, cv², balance loss

@pytest.mark.parametrize('shape', [(5,), (3, 17), (8, 512), (2, 3, 4)])
def test_cv_squared_matches_numpy(shape):
  x = np.random.default_rng(len(shape)).uniform(0, 3, shape).astype(np.float32)
  chex.assert_trees_all_close(workspace.cv_squared(x), np_cv_squared(x), rtol=RTOL, atol=ATOL)


def test_cv_squared_edge_cases():
  # Constant: variance 0. All zero: 0 / 1e-10 = 0, not NaN. Unbiased variance: [0, 2] → 2 / 1.
  chex.assert_trees_all_close(workspace.cv_squared(jnp.full((4, 7), 3.0)), np.zeros(4), atol=1e-6)
  chex.assert_trees_all_close(workspace.cv_squared(jnp.zeros((3, 5))), np.zeros(3), atol=0)
  chex.assert_trees_all_close(workspace.cv_squared(jnp.array([0.0, 2.0])), 2.0, rtol=1e-6)
  # Tiny mean: the 1e-10 is there.
  x = np.array([1e-6, -1e-6, 1e-6, -1e-6], np.float32)
  chex.assert_trees_all_close(workspace.cv_squared(x), np_cv_squared(x), rtol=1e-4)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('coef', [0.01, 1.0])
def test_balance_loss_matches_numpy(shape, coef):
  g, h, m, n, d, top_k = shape
  q, k, v = _qkv(sum(shape) + 3, g, h, m, n, d)
  out = _bottleneck(q, k, v, top_k)
  _, _, importance, load = np_bottleneck(q, k, v, top_k)
  got = workspace.balance_loss(out.importance, out.load, coef)
  chex.assert_trees_all_close(got, np_balance_loss(importance, load, coef), rtol=1e-4, atol=1e-6)


def test_balance_loss_gradient_only_through_importance():
  rng = np.random.default_rng(3)
  imp = jnp.asarray(rng.uniform(0, 2, (3, 20)), jnp.float32)
  load = jnp.asarray(rng.integers(0, 5, (3, 20)), jnp.float32)
  g_imp, g_load = jax.grad(workspace.balance_loss, argnums=(0, 1))(imp, load, 0.01)
  assert np.abs(np.asarray(g_imp)).max() > 0
  np.testing.assert_array_equal(np.asarray(g_load), 0.0)
  # And through the bottleneck: no gradient reaches the counts.
  q, k, v = _qkv(4, 1, 2, 4, 16, 8)
  grad_k = jax.grad(lambda kk: jnp.sum(_bottleneck(q, kk, v, 3).load))(k)
  np.testing.assert_array_equal(np.asarray(grad_k), 0.0)


# ---------------------------------------------------------------- EMA write

@pytest.mark.parametrize('m,d', [(1, 3), (32, 32), (128, 17)])
@pytest.mark.parametrize('momentum', [0.9, 0.5, 0.0])
def test_ema_write_matches_numpy(m, d, momentum):
  rng = np.random.default_rng(m + d)
  mem = rng.standard_normal((m, d)).astype(np.float32)
  y = (3 * rng.standard_normal((m, d))).astype(np.float32)
  got = workspace.ema_write(mem, y, momentum)
  chex.assert_trees_all_close(got, np_ema_write(mem, y, momentum), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64), axis=-1), 1.0,
                             rtol=0, atol=1e-5)


def test_l2_normalize_rows_matches_numpy():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((9, 13)) * rng.uniform(1e-3, 1e3, (9, 1))).astype(np.float32)
  x[4] = 0.0  # a zero row stays zero (norm clamped at 1e-12), not NaN
  got = workspace.l2_normalize_rows(x)
  chex.assert_trees_all_close(got, np_l2_normalize_rows(x), rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(got[4]), 0.0)
