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


def _uniform_vertex(rng: np.random.Generator) -> list[int]:
  return rng.integers(1, IMAGE_SIZE, size=2).tolist()  # [1, 63]²


def sample_vertices(rng: np.random.Generator, label: int) -> list[list[int]]:
  """[3, 2] vertices (x, y) for one triangle of the given label."""
  # Python scalars: 60,000 images make this loop the generator's cost, and NumPy's per-call
  # overhead on 2-vectors was most of it. The draws and the float64 arithmetic are as before.
  while True:
    p1, p2 = _uniform_vertex(rng), _uniform_vertex(rng)
    if label == 1:
      return [p1, p2, _uniform_vertex(rng)]
    dx, dy = p2[0] - p1[0], p2[1] - p1[1]
    # int() truncates towards zero, as in the reference generator.
    p3 = [int(p1[0] + _COS60 * dx + _SIN60 * dy), int(p1[1] - _SIN60 * dx + _COS60 * dy)]
    # The reference rejects p3 - 1 < 0 or p3 + 1 > 64, so p3 lies in [1, 63]² like p1 and p2.
    if 1 <= p3[0] <= IMAGE_SIZE - 1 and 1 <= p3[1] <= IMAGE_SIZE - 1:
      return [p1, p2, p3]


def _cluster_points(vertices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """int [n, 24, 2] disc centres (x, y) of vertices [n, 3, 2] and offsets [n, 3, 4, 2]: per
  vertex, each offset and its mirror through the vertex (v + o, v - o, then the next offset)."""
  v = vertices[:, :, None, :]
  points = np.stack([v + offsets, v - offsets], axis=3)  # [n, 3, 4, 2 (±), 2 (x, y)]
  return points.reshape(len(vertices), 3 * 2 * _POINTS_PER_VERTEX, 2)


def _stamp_discs(points: np.ndarray) -> np.ndarray:
  """uint8 [n, 64, 64] canvases with a filled disc of value 255 at every point of points [n, P, 2].

  Discs only ever add 255 (a maximum), so a canvas is its centres dilated by the disc: one
  shifted OR per disc pixel for the whole batch. Vertices reach 63 and offsets ±1, so discs may
  spill up to 3 pixels past the canvas: draw on a padded canvas and crop.
  """
  n = len(points)
  pad = _DISC_RADIUS + 1
  size = IMAGE_SIZE + 2 * pad
  centres = np.zeros((n, size, size), bool)
  rows = np.repeat(np.arange(n), points.shape[1])
  centres[rows, points[..., 1].reshape(-1) + pad, points[..., 0].reshape(-1) + pad] = True
  canvas = np.zeros_like(centres)
  r = _DISC_RADIUS
  for dy, dx in zip(*np.nonzero(_STAMP)):
    dy, dx = dy - r, dx - r
    canvas[:, max(dy, 0):size + min(dy, 0), max(dx, 0):size + min(dx, 0)] |= (
        centres[:, max(-dy, 0):size + min(-dy, 0), max(-dx, 0):size + min(-dx, 0)])
  return canvas[:, pad:pad + IMAGE_SIZE, pad:pad + IMAGE_SIZE].astype(np.uint8) * 255


def generate(num_images: int, seed: int | Sequence[int]) -> dict[str, np.ndarray]:
  """Generates `num_images` triangles from `seed`.

  Returns 'image' uint8 [n, 64, 64, 1] (one channel; repeated to 3 on device), 'label' int32 [n]
  (0 equilateral, 1 random) and 'vertices' int32 [n, 3, 2] as (x=column, y=row).
  """
  rng = np.random.default_rng(seed)
  images = np.zeros((num_images, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
  labels = rng.integers(0, 2, size=num_images).astype(np.int32)
  vertices = np.zeros((num_images, 3, 2), np.int32)
  offsets = np.zeros((num_images, 3, _POINTS_PER_VERTEX, 2), np.int64)
  for i in range(num_images):  # the random draws of one image, in order, then the next image's
    vertices[i] = sample_vertices(rng, int(labels[i]))
    for v in range(3):  # per vertex, 4 random offsets within ±1
      offsets[i, v] = rng.integers(-1, 2, size=(_POINTS_PER_VERTEX, 2))
  images[..., 0] = _stamp_discs(_cluster_points(vertices.astype(np.int64), offsets))
  return {'image': images, 'label': labels, 'vertices': vertices}
