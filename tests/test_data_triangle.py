"""Triangle generator and builder: labels match the drawn geometry, balance, determinism
(the same record bytes from two `prepare` processes)."""
import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from ait_jax.data import triangle
from conftest import limit


def _cluster_centres(image: np.ndarray):
  """Centroids of the connected white blobs; None unless exactly three unclipped blobs."""
  mask = image[..., 0] > 0
  labels, n = ndimage.label(mask)
  if n != 3:
    return None
  # Clusters are symmetric about their vertex, so the centroid is the vertex unless the canvas
  # edge cut a disc off.
  for sl in ndimage.find_objects(labels):
    if any(s.start == 0 or s.stop == triangle.IMAGE_SIZE for s in sl):
      return None
  centres = ndimage.center_of_mass(mask, labels, range(1, 4))
  return np.array([(c, r) for r, c in centres])  # (x, y)


def _sides(p):
  return np.sort([np.linalg.norm(p[i] - p[j]) for i, j in ((0, 1), (1, 2), (0, 2))])


@pytest.fixture(scope='module')
def data():
  return triangle.generate(1500, seed=3)


def test_label_0_triangles_are_equilateral_from_pixels(data):
  checked = 0
  for image, label, vertices in zip(data['image'], data['label'], data['vertices']):
    centres = _cluster_centres(image)
    if label != 0 or centres is None:
      continue
    # The recovered centres are the stored vertices, up to their order.
    np.testing.assert_allclose(np.sort(centres, axis=0), np.sort(vertices, axis=0), atol=1e-6)
    sides = _sides(centres)
    # p3 is truncated to integers: each coordinate moves by < 1, so sides change by < sqrt(2).
    assert sides[2] - sides[0] < 2 * np.sqrt(2), (sides, vertices)
    checked += 1
  assert checked > 300


def test_label_1_triangles_follow_the_random_rule(data):
  lopsided, checked, third = 0, 0, []
  for image, label, vertices in zip(data['image'], data['label'], data['vertices']):
    centres = _cluster_centres(image)
    if label != 1 or centres is None:
      continue
    sides = _sides(centres)
    lopsided += sides[2] - sides[0] >= 2 * np.sqrt(2)
    checked += 1
    third.append(vertices[2])
  assert checked > 300
  # A random third vertex almost never lands on the equilateral spot.
  assert lopsided / checked > 0.95
  third = np.array(third)
  assert third.min() >= 1 and third.max() <= 63
  # Uniform on [1, 63]: mean 32, and both halves of the canvas are used.
  assert abs(third.mean() - 32) < 2.5
  assert (third < 32).mean() > 0.4


def test_vertices_and_clusters_stay_in_range(data):
  labels0 = data['vertices'][data['label'] == 0]
  # The original rejects p3 - 1 < 0 or p3 + 1 > 64: the third vertex spans [1, 63] like the
  # others, 63 included (about 2% of equilateral triangles have a coordinate of 63 there).
  assert labels0[:, 2].min() >= 1 and labels0[:, 2].max() == 63
  assert data['image'].dtype == np.uint8 and set(np.unique(data['image'])) <= {0, 255}


def test_classes_are_balanced():
  labels = triangle.generate(4000, seed=1)['label']
  assert abs(labels.mean() - 0.5) < 0.03


def test_same_seed_same_bytes_different_seed_differs():
  a, b, c = (triangle.generate(50, s) for s in (7, 7, 8))
  for k in a:
    assert a[k].tobytes() == b[k].tobytes()
  assert a['image'].tobytes() != c['image'].tobytes()


def test_generator_output_is_what_version_1_1_0_holds():
  """The first chunk of triangle/full's train split, as a digest: a faster generator must draw
  the same numbers in the same order, or the dataset of that version changes under its users."""
  data = triangle.generate(2000, [0, 0, 0])
  digest = hashlib.sha256()
  for key in sorted(data):
    digest.update(key.encode())
    digest.update(np.ascontiguousarray(data[key]).tobytes())
  assert digest.hexdigest() == (
      '0c853b750fa5496cec0e009f2ee717e127d87e0c181c56872787d873fc8ad198')


def prepare_in_two_processes(dataset: str, tmp_path) -> list[dict]:
  """Runs `prepare` of `dataset` in two processes at once, with different string hashing (the
  per-process randomness that used to reorder a record's features); returns their record files."""
  root = pathlib.Path(__file__).resolve().parents[1]
  runs = [subprocess.Popen(
      [sys.executable, '-m', 'ait_jax.data.prepare', f'--dataset={dataset}',
       f'--data_dir={tmp_path / d}'], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=dict(os.environ, PYTHONHASHSEED=str(seed), PYTHONPATH=str(root)))
      for seed, d in ((1, 'a'), (2, 'b'))]
  for run in runs:
    _, err = run.communicate(timeout=limit())
    assert run.returncode == 0, err.decode()[-2000:]
  name = dataset.replace('/', os.sep)
  return [{p.name: p.read_bytes() for p in sorted((tmp_path / d).glob(f'{name}/*/*.array_record*'))}
          for d in ('a', 'b')]


def test_builder_is_byte_identical_across_processes(tmp_path):
  files = prepare_in_two_processes('triangle/small', tmp_path)
  assert files[0].keys() == files[1].keys() and len(files[0]) >= 2
  assert files[0] == files[1]
  source = tfds.data_source('triangle/small', split='test', data_dir=str(tmp_path / 'a'),
                            download=False)
  assert len(source) == 200
  example = source[0]
  assert example['image'].shape == (64, 64, 1) and example['image'].dtype == np.uint8
