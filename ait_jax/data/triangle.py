"""Triangle benchmark generator (docs/data.md): equilateral vs random triangles drawn as point
clusters.

`generate` is NumPy and deterministic for a given seed; the TFDS builder in `builders.py` writes
its output. `fresh` draws training triangles by the same rule with jax.random, inside the train
step, from (seed, epoch, index) (docs/data.md#fresh).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
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


# ---------------------------------------------------------------------------------------------
# Fresh training triangles, drawn on the accelerator inside the train step (docs/data.md#fresh).

# Equilateral candidates (p1, p2) drawn per image; the first whose third vertex lands in
# [1, 63]² is kept, as the rejection loop above keeps the first. 38% of candidates land
# (`fresh_acceptance`), so all 32 miss with probability 0.62³² ≈ 2e-7 per image; such an image keeps
# its first candidate, a third vertex off the canvas (its disc is clipped), still labelled
# equilateral.
FRESH_CANDIDATES = 32
_FRESH_STREAM = 0x7452  # folded into the seed's key: these draws share no key with the model's


def _render(points):
  """uint8 [64, 64] canvas of filled discs (radius 2, value 255) at points [P, 2] (x, y): the
  same pixels as `_stamp_discs`, by distance, so points off the canvas simply clip."""
  grid = jnp.arange(IMAGE_SIZE)
  dy = grid[None, :, None] - points[:, 1, None, None]
  dx = grid[None, None, :] - points[:, 0, None, None]
  inside = (dy * dy + dx * dx <= _DISC_RADIUS ** 2).any(axis=0)
  return inside.astype(jnp.uint8) * 255


# int(p + cos60·d) in float64 for p in [0, 63], d in [-62, 62] (row p, column d + 62): NumPy's
# cos(π/3) is 0.5000000000000001, so p + cos60·d for an even negative d sometimes lands just below
# the integer and truncates one lower, depending on p. float32 cannot see this; a table can.
_HALF_STEP = np.trunc(np.arange(IMAGE_SIZE)[:, None] + _COS60 * np.arange(
    1 - IMAGE_SIZE, IMAGE_SIZE)[None, :]).astype(np.int32)


def third_vertex(p1, p2):
  """int32 [..., 2] equilateral third vertex of int p1, p2 [..., 2], equal to `sample_vertices`'
  float64 one for every pair in [1, 63]² (tests/test_data_triangle.py enumerates them): where the
  difference along the other axis is 0, a product with cos 60° alone decides (`_HALF_STEP`);
  elsewhere the sin 60° term keeps the value far from an integer, and float32 suffices."""
  d = p2 - p1
  df = d.astype(jnp.float32)
  x = jnp.trunc(p1[..., 0] + _COS60 * df[..., 0] + _SIN60 * df[..., 1]).astype(jnp.int32)
  y = jnp.trunc(p1[..., 1] - _SIN60 * df[..., 0] + _COS60 * df[..., 1]).astype(jnp.int32)
  table = jnp.asarray(_HALF_STEP)
  off = IMAGE_SIZE - 1
  x = jnp.where(d[..., 1] == 0, table[p1[..., 0], d[..., 0] + off], x)
  y = jnp.where(d[..., 0] == 0, table[p1[..., 1], d[..., 1] + off], y)
  return jnp.stack([x, y], -1)


def _fresh_one(key):
  """(image uint8 [64, 64, 1], label int32, vertices int32 [3, 2]) of one fresh triangle: the
  distribution of `generate` (label ~ {0, 1}, vertices in [1, 63]², offsets in {-1, 0, 1}²)."""
  k_label, k_pairs, k_third, k_offsets = jax.random.split(key, 4)
  label = jax.random.randint(k_label, (), 0, 2)
  pairs = jax.random.randint(k_pairs, (FRESH_CANDIDATES, 2, 2), 1, IMAGE_SIZE)  # [c, (p1, p2), xy]
  p1, p2 = pairs[:, 0], pairs[:, 1]
  third = third_vertex(p1, p2)
  lands = ((third >= 1) & (third <= IMAGE_SIZE - 1)).all(-1)
  first = jnp.argmax(lands)  # 0 when none lands
  equilateral = jnp.stack([p1[first], p2[first], third[first]])
  random = jnp.concatenate([pairs[0], jax.random.randint(k_third, (1, 2), 1, IMAGE_SIZE)])
  vertices = jnp.where(label == 0, equilateral, random)
  offsets = jax.random.randint(k_offsets, (3, _POINTS_PER_VERTEX, 2), -1, 2)
  v = vertices[:, None, :]
  points = jnp.stack([v + offsets, v - offsets], axis=2).reshape(-1, 2)  # as _cluster_points
  return _render(points)[..., None], label.astype(jnp.int32), vertices


def fresh_key(seed, code):
  """The key of training image `code` = epoch · examples per epoch + index, under `seed`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _FRESH_STREAM), code)


def fresh(seed, codes) -> dict:
  """Fresh triangles for int codes [n] (`fresh_code`), jittable: 'image' uint8 [n, 64, 64, 1],
  'label' int32 [n], 'vertices' int32 [n, 3, 2]. A pure function of (seed, code): the same code
  gives the same image in any batch, on any device, after any resume."""
  keys = jax.vmap(lambda c: fresh_key(seed, c))(codes)
  image, label, vertices = jax.vmap(_fresh_one)(keys)
  return {'image': image, 'label': label, 'vertices': vertices}


def fresh_code(epoch, index, examples_per_epoch: int):
  """int32 code of training image `index` of `epoch`: a bijection of (epoch, index) for a fixed
  epoch size; refused past int32 (42,949 epochs of 50,000)."""
  code = np.asarray(epoch, np.int64) * examples_per_epoch + np.asarray(index, np.int64)
  if code.size and code.max() >= 2 ** 31:
    raise ValueError(f'fresh Triangle codes reach {int(code.max())}, past int32: fewer epochs.')
  return code.astype(np.int32)


def fresh_acceptance() -> float:
  """The fraction of (p1, p2) pairs in [1, 63]²×[1, 63]² whose equilateral third vertex lands in
  [1, 63]², by enumerating every pair (float64 as sample_vertices)."""
  c = np.arange(1, IMAGE_SIZE)
  dx, dy = c[None, :] - c[:, None], c[None, :] - c[:, None]  # [p1, p2] per axis
  count = 0
  for x1 in range(len(c)):  # per p1.x, every p1.y, p2.x, p2.y
    ddx = dx[x1][None, :, None, None]
    x3 = (c[x1] + _COS60 * ddx + _SIN60 * dy[:, None, None, :]).astype(np.int64)
    y3 = (c[:, None, None, None] - _SIN60 * ddx + _COS60 * dy[:, None, None, :]).astype(np.int64)
    count += int(((x3 >= 1) & (x3 <= 63) & (y3 >= 1) & (y3 <= 63)).sum())
  return count / len(c) ** 4
