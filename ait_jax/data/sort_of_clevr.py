"""Sort-of-CLEVR generator (docs/data.md; the ternary variant): images, 18-dim questions and
answers.

Pure NumPy and deterministic for a given seed; the TFDS builder in `builders.py` writes its output.
"""
from collections.abc import Sequence

import numpy as np

from ait_jax import errors

IMAGE_SIZE = 75
NUM_TRAIN = 9_800
NUM_TEST = 200
NUM_OBJECTS = 6
OBJECT_SIZE = 5  # half-size of a square, radius of a circle
QUESTIONS_PER_TYPE = 10
QUESTIONS_PER_IMAGE = 3 * QUESTIONS_PER_TYPE
QUESTION_DIM = 18
NUM_ANSWERS = 10

COLORS = ('red', 'green', 'blue', 'orange', 'gray', 'yellow')
RGB = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 156, 0), (128, 128, 128),
                (255, 255, 0)], np.uint8)
SHAPES = ('rectangle', 'circle')  # shape index 0, 1
QUESTION_TYPES = ('non_relational', 'binary', 'ternary')  # type index 0, 1, 2
SUBTYPES = (
    ('shape', 'left', 'top'),
    ('closest_shape', 'furthest_shape', 'count_same_shape'),
    ('count_in_box', 'on_line', 'count_obtuse'),
)
ANSWERS = ('yes', 'no', 'rectangle', 'circle', '0', '1', '2', '3', '4', '5')
YES, NO, RECTANGLE, CIRCLE, COUNT0 = 0, 1, 2, 3, 4

_TYPE_OFFSET = 12
_SUBTYPE_OFFSET = 15
_LINE_TOLERANCE = 12
# The original generator's stand-in for A's own squared distance to itself when it looks for the
# closest object: any object further than sqrt(999) ≈ 31.6 px loses to A itself.
_QUIRK_SELF_DISTANCE = 999


def encode_question(qtype: int, subtype: int, color_a: int, color_b: int | None = None) -> np.ndarray:
  """Returns the float32 [18] question vector (docs/data.md)."""
  q = np.zeros(QUESTION_DIM, np.float32)
  q[color_a] = 1
  if color_b is not None:
    q[6 + color_b] = 1
  q[_TYPE_OFFSET + qtype] = 1
  q[_SUBTYPE_OFFSET + subtype] = 1
  return q


def decode_question(q: np.ndarray) -> tuple[int, int, int, int | None]:
  """Inverse of `encode_question`: (qtype, subtype, color_a, color_b or None)."""
  q = np.asarray(q)
  color_b = int(np.argmax(q[6:12])) if q[6:12].any() else None
  return (int(np.argmax(q[12:15])), int(np.argmax(q[15:18])), int(np.argmax(q[0:6])), color_b)


def question_in_words(q: np.ndarray) -> str:
  qtype, subtype, a, b = decode_question(q)
  a = COLORS[a]
  b = COLORS[b] if b is not None else '?'
  return {
      (0, 0): f'shape of {a}?',
      (0, 1): f'is {a} on the left?',
      (0, 2): f'is {a} on top?',
      (1, 0): f'shape of the object closest to {a}?',
      (1, 1): f'shape of the object furthest from {a}?',
      (1, 2): f'how many others have the shape of {a}?',
      (2, 0): f'how many objects in the box of {a} and {b}?',
      (2, 1): f'any object on the line through {a} and {b}?',
      (2, 2): f'how many obtuse triangles with {a} and {b}?',
  }[qtype, subtype]


def sample_objects(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Returns int32 centres [6, 2] as (x=column, y=row) and shapes [6] (0 rectangle, 1 circle)."""
  centers = np.zeros((NUM_OBJECTS, 2), np.int32)
  shapes = np.zeros(NUM_OBJECTS, np.int32)
  for i in range(NUM_OBJECTS):
    while True:
      c = rng.integers(OBJECT_SIZE, IMAGE_SIZE - OBJECT_SIZE, size=2)  # [5, 69]²
      if all(((c - centers[j]) ** 2).sum() >= (2 * OBJECT_SIZE) ** 2 for j in range(i)):
        break
    centers[i] = c
    shapes[i] = rng.random() >= 0.5
  return centers, shapes


def draw(centers: np.ndarray, shapes: np.ndarray) -> np.ndarray:
  """Draws the objects on a white canvas; returns uint8 [75, 75, 3]."""
  img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
  rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
  for color, ((x, y), shape) in enumerate(zip(centers, shapes)):
    if shape == 0:
      mask = (np.abs(cols - x) <= OBJECT_SIZE) & (np.abs(rows - y) <= OBJECT_SIZE)
    else:
      mask = (cols - x) ** 2 + (rows - y) ** 2 <= OBJECT_SIZE ** 2
    img[mask] = RGB[color]
  return img


def answer(centers: np.ndarray, shapes: np.ndarray, qtype: int, subtype: int, a: int,
           b: int | None = None, closest_quirk: bool = False) -> int:
  """The answer index (0..9) to one question about the objects, by the rules in docs/data.md.

  closest_quirk: answer "closest" as the original generator does, with A's own squared distance
  set to 999 instead of excluded (A's own shape when every other object is > 31.6 px away).
  """
  centers = centers.astype(np.float64)
  pa = centers[a]
  if qtype == 0:
    if subtype == 0:
      return RECTANGLE if shapes[a] == 0 else CIRCLE
    axis = 0 if subtype == 1 else 1
    return YES if pa[axis] < IMAGE_SIZE / 2 else NO
  if qtype == 1:
    d2 = ((centers - pa) ** 2).sum(-1)
    if subtype == 2:
      return COUNT0 + int((shapes == shapes[a]).sum()) - 1
    if subtype == 0:
      d2[a] = _QUIRK_SELF_DISTANCE if closest_quirk else np.inf
      j = int(np.argmin(d2))
    else:
      j = int(np.argmax(d2))
    return RECTANGLE if shapes[j] == 0 else CIRCLE
  pb = centers[b]
  others = [c for c in range(NUM_OBJECTS) if c not in (a, b)]
  if subtype == 0:
    lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
    return COUNT0 + sum(bool(np.all((lo <= centers[c]) & (centers[c] <= hi))) for c in others)
  # Exact integer geometry here and below: the reference's float arithmetic (slope with a 1e-10
  # guard, arccos of the law of cosines) flips exact ties, which integer centres make common.
  pts = np.rint(centers).astype(np.int64)
  x, y = pts[a], pts[b]
  if subtype == 1:
    # |dy_c - slope·dx_c| <= 12, multiplied through by |dx_AB|; a vertical A-B line keeps only
    # objects on it (the reference's slope becomes infinite).
    dx, dy = int(y[0] - x[0]), int(y[1] - x[1])
    for c in others:
      u, v = int(pts[c][0] - x[0]), int(pts[c][1] - x[1])
      near = abs(v * dx - dy * u) <= _LINE_TOLERANCE * abs(dx) if dx else (
          u == 0 and abs(v) <= _LINE_TOLERANCE)
      if near:
        return YES
    return NO
  # The angle at X is >= 90° iff (Y-X)·(Z-X) <= 0; a collinear triple has a 180° (or 0°)
  # largest angle, which never counts.
  count = 0
  for c in others:
    z = pts[c]
    if (y - x)[0] * (z - x)[1] - (y - x)[1] * (z - x)[0] == 0:
      continue
    if min(np.dot(q - p, r - p) for p, q, r in ((x, y, z), (y, z, x), (z, x, y))) <= 0:
      count += 1
  return COUNT0 + count


def sample_questions(rng: np.random.Generator, centers: np.ndarray, shapes: np.ndarray,
                     closest_quirk: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Returns questions float32 [30, 18] (10 per type, in type order) and answers int32 [30]."""
  questions = np.zeros((QUESTIONS_PER_IMAGE, QUESTION_DIM), np.float32)
  answers = np.zeros(QUESTIONS_PER_IMAGE, np.int32)
  for qtype in range(3):
    for k in range(QUESTIONS_PER_TYPE):
      if qtype < 2:
        a, b = int(rng.integers(0, NUM_OBJECTS)), None
      else:
        # The ternary generator draws A and B from the first five colours only (reference quirk).
        a, b = (int(c) for c in rng.permutation(5)[:2])
      subtype = int(rng.integers(0, 3))
      i = qtype * QUESTIONS_PER_TYPE + k
      questions[i] = encode_question(qtype, subtype, a, b)
      answers[i] = answer(centers, shapes, qtype, subtype, a, b, closest_quirk)
  return questions, answers


def generate(num_images: int, seed: int | Sequence[int],
             closest_quirk: bool = False) -> dict[str, np.ndarray]:
  """Generates `num_images` scenes from `seed`, with all 30 questions of each.

  closest_quirk reproduces the original generator's "closest" answers (see `answer`); the scenes
  and questions are the same either way, only some of those answers change.

  Returns 'image' uint8 [n, 75, 75, 3], 'questions' float32 [n, 30, 18], 'answers' int32 [n, 30],
  'centers' int32 [n, 6, 2] as (x=column, y=row), 'shapes' int32 [n, 6]; object i has colour i.
  """
  rng = np.random.default_rng(seed)
  out = {
      'image': np.zeros((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
      'questions': np.zeros((num_images, QUESTIONS_PER_IMAGE, QUESTION_DIM), np.float32),
      'answers': np.zeros((num_images, QUESTIONS_PER_IMAGE), np.int32),
      'centers': np.zeros((num_images, NUM_OBJECTS, 2), np.int32),
      'shapes': np.zeros((num_images, NUM_OBJECTS), np.int32),
  }
  for i in range(num_images):
    centers, shapes = sample_objects(rng)
    out['image'][i] = draw(centers, shapes)
    out['questions'][i], out['answers'][i] = sample_questions(rng, centers, shapes,
                                                              closest_quirk)
    out['centers'][i], out['shapes'][i] = centers, shapes
  return out


def question_type_indices(question_types: Sequence[str] | None) -> list[int]:
  """Maps names ('non_relational', 'binary', 'ternary') to type indices; None means all."""
  if question_types is None:
    return [0, 1, 2]
  if isinstance(question_types, str):
    question_types = (question_types,)
  unknown = [t for t in question_types if t not in QUESTION_TYPES]
  if unknown or not question_types:
    raise errors.ConfigError(f'question_types must be a non-empty subset of {QUESTION_TYPES}, '
                             f'got {tuple(question_types)!r}.')
  return sorted({QUESTION_TYPES.index(t) for t in question_types})
