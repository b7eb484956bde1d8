"""The exact top-k selections of the workspace ('chunked', 'sharded', 'threshold') against 'full'
(lax.top_k).

Ties are made on purpose (integer logits; duplicated images across devices): every selection must
keep the same tokens in the same order as lax.top_k, whose ties go to the lower index, and give the
same loss, gradients and written memory on 1, 2 and 8 devices.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax import models
from ait_jax import sharding
from ait_jax import workspace as ws


def _mesh(devices: int):
  return sharding.make_mesh(devices, 1, jax.devices()[:devices])


def _np_top_k(x: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest entries of each row of x, ties to the lower index (float64)."""
  order = np.lexsort((np.broadcast_to(np.arange(x.shape[-1]), x.shape), -x), axis=-1)
  return order[..., :k]


def test_lax_top_k_sends_ties_to_the_lower_index():
  # The rule every selection reproduces; if a JAX release changed it, the merge would need an
  # explicit index tie-break.
  _, idx = jax.lax.top_k(jnp.array([1., 3., 3., 2., 3., 3.]), 3)
  assert idx.tolist() == [1, 2, 4]


@pytest.mark.parametrize('n,k,chunks', [(64, 8, 4), (64, 8, 16), (60, 7, 3), (32, 32, 8)])
def test_chunked_top_k_equals_lax_top_k_with_ties(n, k, chunks):
  # Logits from {-2..2}: most values are tied, also across chunk borders and at the k-th place.
  x = jnp.asarray(np.random.default_rng(n + k).integers(-2, 3, (3, 5, n)), jnp.float32)
  want_vals, want_idx = jax.lax.top_k(x, k)
  vals, idx = ws.chunked_top_k(x, k, chunks)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(vals, want_vals)
  np.testing.assert_array_equal(idx, _np_top_k(np.asarray(x, np.float64), k))


def test_default_chunks_divide_and_keep_chunks_large():
  assert ws.default_chunks(32768, 512) == 16
  assert ws.default_chunks(1000, 64) == 2  # 1000 // 256 = 3 does not divide 1000
  assert ws.default_chunks(100, 64) == 1


def _tied_inputs(dtype, n=64, heads=2, slots=4, dim=4):
  """q and k from {-1, 0, 1}: the logits take few values, so the top-k boundary is full of ties."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.integers(-1, 2, (heads, slots, dim)), dtype)
  k = jnp.asarray(rng.integers(-1, 2, (1, heads, n, dim)), dtype)
  v = jnp.asarray(rng.standard_normal((1, heads, n, dim)), dtype)
  return q, k, v


def _attention_and_grads(selection, mesh, q, k, v, top_k):
  def loss(q, k, v):
    out = ws.bottleneck_attention(q, k, v, top_k, selection, mesh=mesh)
    target = jnp.arange(out.read.size, dtype=jnp.float32).reshape(out.read.shape) / out.read.size
    # The read and the balance loss: gradients reach q and k through the softmax and importance.
    return jnp.sum(out.read.astype(jnp.float32) * target) + ws.balance_loss(
        out.importance, out.load, 1.0), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v)
  return value, out, grads


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('selection,devices', [('chunked', 1), ('sharded', 1), ('sharded', 2),
                                               ('sharded', 8), ('threshold', 1),
                                               ('threshold', 2), ('threshold', 8)])
def test_selections_match_full_with_ties(selection, devices, dtype):
  q, k, v = _tied_inputs(dtype)
  top_k = 12
  ref_value, ref, ref_grads = _attention_and_grads('full', None, q, k, v, top_k)
  logits = np.einsum('hmd,hnd->hmn', np.asarray(q, np.float64), np.asarray(k[0], np.float64)) / 2
  assert len(np.unique(logits)) < 20  # ties everywhere, including at the k-th place
  np.testing.assert_array_equal(ref.indices[0], _np_top_k(logits, top_k))
  mesh = _mesh(devices) if selection in ('sharded', 'threshold') else None
  value, out, grads = _attention_and_grads(selection, mesh, q, k, v, top_k)
  np.testing.assert_array_equal(out.indices, ref.indices)
  np.testing.assert_array_equal(out.load, ref.load)
  for got, want in [(value, ref_value), (out.read, ref.read), (out.weights, ref.weights),
                    (out.importance, ref.importance), *zip(grads, ref_grads)]:
    _assert_close(got, want)


def _assert_close(got, want):
  """rtol 1e-5; a bfloat16 array may also differ by one bfloat16 rounding in a few entries.

  Devices sum their parts in another order than one device does (float32 differences of ~1e-7);
  where that lands on a bfloat16 rounding boundary it becomes one bfloat16 ulp (2^-8 relative).
  'threshold' reads through a dense [M, n] gate matrix, so the values' gradient is one float32
  sum rounded once to bfloat16, where 'full' rounds each kept token's part to bfloat16 before
  scatter-adding: one ulp apart in ~3% of the entries of that gradient (both are within one ulp
  of a float32 computation in ~85% of them).
  """
  bf16 = jnp.asarray(want).dtype == jnp.bfloat16
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if not bf16:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)
  off = ~np.isclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(got - want)[off] <= ulp[off]) and off.mean() <= 0.05, (got, want)


def test_selections_match_numpy_float64():
  q, k, v = _tied_inputs(jnp.float32)
  top_k = 12
  q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k[0], v[0]))
  logits = np.einsum('hmd,hnd->hmn', q64, k64) / 2
  idx = _np_top_k(logits, top_k)
  kept = np.take_along_axis(logits, idx, -1)
  w = np.exp(kept - kept.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  read = np.einsum('hmk,hmkd->hmd', w, v64[np.arange(2)[:, None, None], idx])
  importance = np.zeros(logits.shape[::2])
  for h in range(2):
    np.add.at(importance[h], idx[h].ravel(), w[h].ravel())
  for selection, mesh in (('chunked', None), ('sharded', _mesh(8)), ('threshold', _mesh(8))):
    out = jax.jit(functools.partial(ws.bottleneck_attention, top_k=top_k, selection=selection,
                                    num_chunks=4, mesh=mesh))(q, k, v)
    np.testing.assert_array_equal(out.indices[0], idx)
    np.testing.assert_allclose(out.read, read, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.importance, importance, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('selection', ['sharded', 'threshold'])
def test_cross_device_selection_errors_are_one_sentence(selection):
  q, k, v = _tied_inputs(jnp.float32)
  with pytest.raises(ValueError, match=r"needs a mesh with a 'data' axis"):
    ws.bottleneck_attention(q, k, v, 4, selection)
  with pytest.raises(ValueError, match='scope .batch.'):
    ws.bottleneck_attention(q, jnp.concatenate([k, k]), jnp.concatenate([v, v]), 4, selection,
                            mesh=_mesh(2))
  with pytest.raises(ValueError, match='must be one of'):
    ws.bottleneck_attention(q, k, v, 4, 'fastest')
  with pytest.raises(ValueError, match='split evenly'):
    ws.bottleneck_attention(q, k[:, :, :60], v[:, :, :60], 4, selection, mesh=_mesh(8))


def test_order_key_is_lax_top_k_total_order():
  x = jnp.array([1., -0., 0., -jnp.inf, jnp.inf, -1.5, jnp.nan, 3e-38, -3e-38, -2.])
  keys = np.asarray(ws.order_key(x)).astype(np.int64)
  np.testing.assert_array_equal(np.argsort(-keys, kind='stable'),
                                jax.lax.top_k(x, x.size)[1])


@pytest.mark.parametrize('n,k', [(1, 1), (7, 3), (64, 64), (300, 17)])
def test_radix_select_keeps_exactly_the_lax_top_k_tokens(n, k):
  # Logits from {-2..2} plus signed zeros: ties at the k-th place nearly always.
  rng = np.random.default_rng(n)
  x = rng.integers(-2, 3, (3, 4, n)).astype(np.float32)
  x[..., ::5] *= -0.0
  x = jnp.asarray(x)
  inverted = jnp.broadcast_to(jnp.arange(n - 1, -1, -1, dtype=jnp.uint32), x.shape)
  kept = ws.radix_select([ws.order_key(x), inverted], k, [32, max(n - 1, 0).bit_length()])
  want = np.zeros(x.shape, bool)
  np.put_along_axis(want, np.asarray(jax.lax.top_k(x, k)[1]), True, -1)
  np.testing.assert_array_equal(kept, want)


def test_auto_is_sharded_then_threshold_with_several_data_devices():
  assert ws.resolve_selection('auto', 1, 64, 8, mesh=_mesh(8).abstract_mesh) == 'sharded'
  assert ws.resolve_selection('auto', 1, 64, 8, mesh=_mesh(1).abstract_mesh) == \
      ws.SINGLE_DEVICE_AUTO
  assert ws.resolve_selection('auto', 1, 64, 8) == ws.SINGLE_DEVICE_AUTO  # no mesh set
  assert ws.resolve_selection('auto', 4, 16, 8, mesh=_mesh(8).abstract_mesh) == 'full'  # example
  assert ws.resolve_selection('chunked', 1, 64, 8, mesh=_mesh(8).abstract_mesh) == 'chunked'
  with jax.set_mesh(_mesh(2)):
    assert ws.resolve_selection('auto', 1, 64, 8) == 'sharded'
  # Beyond SHARDED_MAX_DEVICES (an abstract mesh: no 16 devices are needed to decide).
  big = jax.sharding.AbstractMesh((16, 1), (sharding.DATA, sharding.MODEL))
  assert ws.SHARDED_MAX_DEVICES == 8
  assert ws.resolve_selection('auto', 1, 64, 8, mesh=big) == 'threshold'
  assert ws.resolve_selection('auto', 1, 60, 8, mesh=big) == ws.SINGLE_DEVICE_AUTO  # 16 ∤ 60


# The whole model: one train-step gradient of a tiny AiT (no self-attention), scope 'batch'.
# 'auto' on 8 devices is 'sharded' (test above); chunked_top_k uses its default chunks here.
B, IMAGE = 16, (8, 8, 3)  # patch 2: 16 tokens per image, T = 256 tokens; k = 24


def _model(selection, dtype):
  return models.create_model(
      dict(depth=1, width=16, mlp_dim=32, num_heads=1, self_attention=False, patch_size=2,
           memory_slots=4, memory_dim=8, memory_heads=2, bottleneck_k=24, write_dropout=0.0,
           gradient_mode='learned_write', selection=selection, dtype=dtype),
      num_classes=3, image_shape=IMAGE, batch_size=B)


@functools.lru_cache(maxsize=None)
def _inputs():
  rng = np.random.default_rng(1)
  images = rng.standard_normal((B,) + IMAGE).astype(np.float32)
  images[B // 2:B // 2 + 3] = images[:3]  # identical tokens on different devices: tied logits
  labels = rng.integers(0, 3, (B,)).astype(np.int32)
  variables = _model('full', 'float32').init(
      {'params': jax.random.key(0)}, jnp.asarray(images), train=True)
  return images, labels, variables


@functools.lru_cache(maxsize=None)
def _step(selection, dtype, devices):
  """Loss, gradients, written memory and bottleneck indices of one step on `devices` devices."""
  images, labels, variables = _inputs()
  model = _model(selection, dtype)
  mesh = _mesh(devices)

  def step(params, memory, images, labels):
    def loss_fn(params):
      (logits, aux), new = model.apply({'params': params, 'memory': memory}, images, train=True,
                                       mutable=['memory', 'intermediates'])
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
      return ce + aux['balance_loss'], new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    indices = new['intermediates']['block0']['workspace']['bottleneck_indices'][0]
    return loss, grads, new['memory'], indices

  data, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    return jax.jit(step, in_shardings=(rep, rep, data, data))(
        variables['params'], variables['memory'], images, labels)


@pytest.mark.parametrize('selection,devices,dtype', [
    ('chunked', 1, 'float32'), ('sharded', 2, 'float32'), ('auto', 8, 'float32'),
    ('sharded', 8, 'bfloat16'), ('threshold', 8, 'float32'), ('threshold', 8, 'bfloat16')])  # chunked bfloat16: the function-level test above
def test_model_step_matches_single_device_full(selection, devices, dtype):
  loss, grads, memory, indices = _step(selection, dtype, devices)
  # In bfloat16 the backbone's data-parallel gradient sums round per device, whatever the
  # selection, so bfloat16 runs are compared with 'full' on the same devices (float32 runs with
  # one device); the selected tokens must match one device's in both.
  ref_loss, ref_grads, ref_memory, ref_indices = _step(
      'full', dtype, devices if dtype == 'bfloat16' else 1)
  np.testing.assert_array_equal(indices, _step('full', dtype, 1)[3])
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves((grads, memory)), jax.tree.leaves((ref_grads, ref_memory))):
    got, want = np.asarray(got), np.asarray(want)
    if selection == 'threshold' and dtype == 'bfloat16':
      # 'threshold' sums the read in token order, 'full' in top-k order: float32 sums ulps apart,
      # which the read's bfloat16 rounding turns into one bfloat16 ulp in a few activations; the
      # backward pass's bfloat16 sums carry that into gradients as about one bfloat16 ulp of the
      # array's scale (the float32 run above holds 'threshold' to rtol 1e-5).
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=2 ** -7 * np.abs(want).max())
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
