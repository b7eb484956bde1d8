"""Triangle benchmark generator (docs/data.md): equilateral vs random triangles drawn as point
clusters.

Pure NumPy and deterministic for a given seed; the TFDS builder in `builders.py` writes its output.
"""
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 64
NUM_TRAIN = 50_000
NUM_TEST = 10_000
LABEL_NAMES = ('equilateral', 'random')

_DISC_RADIUS = 2
_POINTS_PER_VERTEX = 4  # each point comes with its mirror through the vertex
_COS60 = np.cos(np.pi / 3)
_SIN60 = np.sin(np.pi / 3)


def _disc_stamp(radius: int) -> np.ndarray:
  r = np.arange(-radius, radius + 1)
  return (r[:, None] ** 2 + r[None, :] ** 2 <= radius ** 2).astype(np.uint8) * 255


_STAMP = _disc_stamp(_DISC_RADIUS)


def _uniform_vertex(rng: np.random.Generator) -> np.ndarray:
  return rng.integers(1, IMAGE_SIZE, size=2)  # [1, 63]²


def sample_vertices(rng: np.random.Generator, label: int) -> np.ndarray:
  """Returns int [3, 2] vertices (x, y) for one triangle of the given label."""
  while True:
    p1, p2 = _uniform_vertex(rng), _uniform_vertex(rng)
    if label == 1:
      return np.stack([p1, p2, _uniform_vertex(rng)])
    dx, dy = p2 - p1
    # int() truncates towards zero, as in the reference generator.
    p3 = np.array([int(p1[0] + _COS60 * dx + _SIN60 * dy),
                   int(p1[1] - _SIN60 * dx + _COS60 * dy)])
    # The reference rejects p3 - 1 < 0 or p3 + 1 > 64, so p3 lies in [1, 63]² like p1 and p2.
    if np.all(p3 - 1 >= 0) and np.all(p3 + 1 <= IMAGE_SIZE):
      return np.stack([p1, p2, p3])


def draw(vertices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Draws the three vertex clusters on a black canvas; returns uint8 [64, 64]."""
  # Vertices reach 63 and offsets ±1, so discs may spill up to 3 pixels past the canvas: draw on
  # a padded canvas and crop.
  pad = _DISC_RADIUS + 1
  canvas = np.zeros((IMAGE_SIZE + 2 * pad, IMAGE_SIZE + 2 * pad), np.uint8)
  r = _DISC_RADIUS
  for v in vertices:
    offsets = rng.integers(-1, 2, size=(_POINTS_PER_VERTEX, 2))
    for o in offsets:
      for x, y in (v + o, v - o):
        window = canvas[y + pad - r:y + pad + r + 1, x + pad - r:x + pad + r + 1]
        np.maximum(window, _STAMP, out=window)
  return canvas[pad:pad + IMAGE_SIZE, pad:pad + IMAGE_SIZE]


def generate(num_images: int, seed: int | Sequence[int]) -> dict[str, np.ndarray]:
  """Generates `num_images` triangles from `seed`.

  Returns 'image' uint8 [n, 64, 64, 1] (one channel; repeated to 3 on device), 'label' int32 [n]
  (0 equilateral, 1 random) and 'vertices' int32 [n, 3, 2] as (x=column, y=row).
  """
  rng = np.random.default_rng(seed)
  images = np.zeros((num_images, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
  labels = rng.integers(0, 2, size=num_images).astype(np.int32)
  vertices = np.zeros((num_images, 3, 2), np.int32)
  for i in range(num_images):
    vertices[i] = sample_vertices(rng, int(labels[i]))
    images[i, :, :, 0] = draw(vertices[i], rng)
  return {'image': images, 'label': labels, 'vertices': vertices}
