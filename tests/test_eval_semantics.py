"""What an evaluation that writes the memory scores: the padding of its last batch stays out of the
write (docs/model.md#batch-dependence), on one device and on eight, for every selection.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax import sharding
from ait_jax import train
from ait_jax import workspace as ws
from conftest import load_config

FULL, REAL = 16, 8  # the evaluation batch, and the real examples of its padded last batch


def _trainer(devices: int, **model) -> train.Trainer:
  config = load_config('triangle', 'quick')  # 4 tokens per image, width 64, one layer
  config.model.update(eval_writes_memory=True, **model)
  config.eval_batch_size = FULL
  config.mesh.data = devices
  return train.Trainer(config, devices=jax.devices()[:devices])


@functools.lru_cache(maxsize=None)
def _initial():
  trainer = _trainer(1)
  return jax.device_get(trainer.init(trainer.rng))


def _batch(trainer, images, labels, mask):
  return jax.device_put({'image': images, 'label': labels, 'mask': mask}, trainer.batch_sharding)


@pytest.mark.parametrize('devices,model', [
    (1, dict(bottleneck_k=16, selection='full')),
    (1, dict(bottleneck_k=64, selection='sharded')),  # 32 real tokens: fewer than k
    (8, dict(bottleneck_k=64, selection='full')),
    (8, dict(bottleneck_k=16, selection='sharded')),
    (2, dict(bottleneck_k=64, selection='threshold')),  # fewer real tokens than k
    (8, dict(bottleneck_k=16, selection='threshold')),
    (1, dict(bottleneck_scope='example', bottleneck_k=2, selection='full')),
    (8, dict(bottleneck_scope='example', bottleneck_k=2, selection='full')),
], ids=lambda v: str(v) if isinstance(v, int) else ','.join(f'{k}={x}' for k, x in v.items()))
def test_padding_of_the_last_batch_stays_out_of_the_write(devices, model):
  """A full batch, then a last batch of 8 real examples and 8 of padding, writes the memory that
  the same full batch, then the 8 real examples alone, write; the real examples score the same."""
  trainer = _trainer(devices, **model)
  start = _initial()
  params = jax.device_put(start.params, trainer.state_sharding.params)
  memory = jax.device_put(start.memory, trainer.state_sharding.memory)
  rng = np.random.default_rng(0)
  shape = trainer.s.info.image_shape
  images = rng.integers(0, 256, (FULL + REAL,) + shape, dtype=np.uint8)
  labels = rng.integers(0, 2, (FULL + REAL,), dtype=np.int32)
  first = _batch(trainer, images[:FULL], labels[:FULL], np.ones(FULL, bool))
  padded_images = np.concatenate([images[FULL:], np.zeros((FULL - REAL,) + shape, np.uint8)])
  padded = _batch(trainer, padded_images, np.concatenate([labels[FULL:], np.zeros(REAL, np.int32)]),
                  np.arange(FULL) < REAL)
  alone = _batch(trainer, images[FULL:], labels[FULL:], np.ones(REAL, bool))

  _, after_first, _ = trainer.eval_step(params, memory, first)
  sums_padded, memory_padded, predicted_padded = trainer.eval_step(params, after_first, padded)
  sums_alone, memory_alone, predicted_alone = trainer.eval_step(params, after_first, alone)
  memory_padded, memory_alone, after_first = jax.device_get((memory_padded, memory_alone,
                                                             after_first))
  for got, want, before in zip(jax.tree.leaves(memory_padded), jax.tree.leaves(memory_alone),
                               jax.tree.leaves(after_first)):
    assert np.all(np.isfinite(got))
    assert not np.allclose(want, before, atol=1e-4)  # the last batch did write
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(predicted_padded)[:REAL], np.asarray(predicted_alone))
  sums_padded, sums_alone = jax.device_get((sums_padded, sums_alone))
  assert sums_padded['count'] == sums_alone['count'] == REAL
  assert sums_padded['correct'] == sums_alone['correct']
  np.testing.assert_allclose(sums_padded['loss'], sums_alone['loss'], rtol=1e-5)



@pytest.mark.parametrize('groups,top_k,selection', [
    (1, 12, 'full'), (1, 4, 'chunked'), (1, 12, 'threshold'), (1, None, 'full'),  # 10 real of 24
    (4, 3, 'full'), (4, None, 'full')])  # two real images of four (scope 'example')
def test_masked_tokens_are_read_as_if_absent(groups, top_k, selection):
  """bottleneck_attention with a token mask reads what it reads from the real tokens alone (with
  k capped at their count, as for a small evaluation batch), and its gradients stay finite."""
  rng = np.random.default_rng(0)
  n = 24 if groups == 1 else 6
  q = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((groups, 2, n, 4)), jnp.float32) for _ in range(2))
  mask = np.zeros((groups, n), bool)
  if groups == 1:
    mask[0, :10] = True
    real_k, real_v = k[:, :, :10], v[:, :, :10]
  else:
    mask[:2] = True
    real_k, real_v = k[:2], v[:2]
  alone = jax.jit(functools.partial(ws.bottleneck_attention, top_k=top_k and min(
      top_k, real_k.shape[2])))(q, real_k, real_v)

  def read(q, k, v):
    mesh = sharding.make_mesh(2, 1, jax.devices()[:2]) if selection == 'threshold' else None
    out = ws.bottleneck_attention(q, k, v, top_k, selection, num_chunks=2 if top_k else None,
                                  token_mask=jnp.asarray(mask), mesh=mesh)
    return jnp.sum(out.read ** 2) + ws.balance_loss(out.importance, out.load), out

  (_, out), grads = jax.jit(jax.value_and_grad(read, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(out.read, alone.read, rtol=1e-5, atol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert not np.any(np.asarray(grads[2])[:, :, ~mask[0]] if groups == 1 else grads[2][2:])
