"""On-device preprocessing: crop and flip keep shapes, vary per example, and switch off cleanly."""
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax.data import augment
from ait_jax.data import datasets


def _images(b=8, h=32, w=32, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8)


def test_crop_and_flip_keep_shape_and_dtype_and_vary_per_example():
  # Every example is the same image, so differences come from per-example randomness alone.
  images = np.repeat(_images(1), 16, axis=0)
  out = jax.jit(lambda x, r: augment.preprocess(x, r, info=datasets.get_info('cifar10'), train=True))(
      images, jax.random.key(0))
  assert out.shape == images.shape and out.dtype == jnp.float32
  flat = np.asarray(out).reshape(16, -1)
  assert len({row.tobytes() for row in flat}) > 8


def test_each_output_is_a_padded_crop_possibly_flipped():
  images = _images(4)
  out = np.asarray(augment.preprocess(images, jax.random.key(1), info=datasets.get_info('cifar100'), train=True))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(np.float32) / 255
  for i in range(4):
    candidates = [c for dy in range(9) for dx in range(9)
                  for c in (padded[i, dy:dy + 32, dx:dx + 32], padded[i, dy:dy + 32, dx:dx + 32][:, ::-1])]
    normalised = [np.asarray(augment.normalize(c)) for c in candidates]
    assert min(np.abs(c - out[i]).max() for c in normalised) < 1e-5


@pytest.mark.parametrize('train,augment_on', [(False, True), (True, False)])
def test_identity_when_disabled(train, augment_on):
  images = _images(4)
  out = augment.preprocess(images, jax.random.key(0), info=datasets.get_info('cifar10'), train=train,
                           augment=augment_on)
  mean, std = np.array(datasets.CIFAR_MEAN), np.array(datasets.CIFAR_STD)
  np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_generated_datasets_are_only_scaled():
  tri = _images(4, 64, 64, 1)
  out = augment.preprocess(tri, jax.random.key(0), info=datasets.get_info('triangle'), train=True)
  assert out.shape == (4, 64, 64, 3)
  np.testing.assert_allclose(out, np.repeat(tri, 3, -1) / 255.0, rtol=1e-6)
  clevr = _images(4, 75, 75, 3)
  out = augment.preprocess(clevr, jax.random.key(0), info=datasets.get_info('sort_of_clevr'), train=True)
  np.testing.assert_allclose(out, clevr / 255.0, rtol=1e-6)


def test_pet_flips_and_normalises_without_cropping():
  images = _images(16, 224, 224, 3)
  out = np.asarray(augment.preprocess(images, jax.random.key(0), info=datasets.get_info('oxford_iiit_pet'),
                                      train=True))
  assert out.shape == images.shape and out.dtype == np.float32
  mean, std = np.array(datasets.CIFAR_MEAN), np.array(datasets.CIFAR_STD)
  plain = (images / 255.0 - mean) / std
  same = [np.allclose(o, p, atol=1e-5) for o, p in zip(out, plain)]
  flipped = [np.allclose(o, p[:, ::-1], atol=1e-5) for o, p in zip(out, plain)]
  # Every output is the normalised image, or its mirror: no crop, no other change.
  assert all(s or f for s, f in zip(same, flipped))
  assert 0 < sum(flipped) < 16  # both happen over 16 images (a 2 * 2^-16 chance to fail)
  with pytest.raises(ValueError, match='cifar10'):
    augment.preprocess(images, None, info=datasets.get_info('imagenet'), train=False)


@pytest.mark.parametrize('axis_type', [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_works_on_sharded_inputs_without_host_transfers(axis_type):
  n = jax.device_count()
  sharding = NamedSharding(jax.make_mesh((n,), ('data',), (axis_type,)), P('data'))
  images = jax.device_put(_images(2 * n), sharding)
  fn = jax.jit(lambda x, r: augment.preprocess(x, r, info=datasets.get_info('cifar10'), train=True),
               out_shardings=sharding)
  key = jax.device_put(jax.random.key(0), NamedSharding(sharding.mesh, P()))
  fn(images, key)  # compile outside the guard
  with jax.transfer_guard('disallow'):  # any implicit host<->device transfer raises
    out = fn(images, key)
  assert out.sharding == sharding and out.shape == (2 * n, 32, 32, 3)
