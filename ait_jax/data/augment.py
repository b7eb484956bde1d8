"""On-device preprocessing inside the jitted step: random crop and flip, scaling and normalisation.

Pure JAX and vectorised over the batch, with per-example randomness split from the step's RNG.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ait_jax.data import datasets


def _like_batch(x: jax.Array, images: jax.Array) -> jax.Array:
  """Shards per-example random values like the batch (needed under explicit mesh axes)."""
  sharding = jax.typeof(images).sharding
  spec = getattr(sharding, 'spec', None)
  if not spec or spec[0] is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, P(spec[0])))


def random_crop(images: jax.Array, rng: jax.Array, padding: int) -> jax.Array:
  """Zero-pads each image by `padding` and crops back to its size at a per-example offset."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = _like_batch(jax.random.randint(rng, (b, 2), 0, 2 * padding + 1), images)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def random_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Flips each image left-right with probability 1/2."""
  flip = _like_batch(jax.random.bernoulli(rng, 0.5, (images.shape[0],)), images)
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def normalize(images: jax.Array, mean_std=(datasets.CIFAR_MEAN, datasets.CIFAR_STD)) -> jax.Array:
  """float images in [0, 1] → standardised per channel (the CIFAR statistics by default)."""
  mean, std = mean_std
  return (images - jnp.asarray(mean)) / jnp.asarray(std)


def preprocess(images: jax.Array, rng: jax.Array | None, *, info: datasets.DatasetInfo,
               train: bool, augment: bool = True) -> jax.Array:
  """uint8 [B, H, W, C] as stored → float32 [B, H, W, 3] model inputs.

  What happens is the dataset's `DatasetInfo` (crop, flip, normalisation), e.g.
  `datasets.get_info('cifar10')`. rng is only used when training with augment; one-channel
  images (Triangle) are repeated to 3 channels.
  """
  x = images
  if train and augment and (info.flip or info.crop_padding):
    if rng is None:
      raise ValueError('preprocess needs an rng when training with augment=True.')
    crop_rng, flip_rng = jax.random.split(rng)
    if info.crop_padding:
      x = random_crop(x, crop_rng, info.crop_padding)  # zero padding before scaling, as torchvision
    if info.flip:
      x = random_flip(x, flip_rng)
  x = x.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if info.mean_std is not None:
    x = normalize(x, info.mean_std)
  return x
