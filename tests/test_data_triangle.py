"""Triangle generator and builder: labels match the drawn geometry, balance, determinism
(the same record bytes from two `prepare` processes)."""
import hashlib
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from ait_jax import sharding
from ait_jax.data import device_data
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


@pytest.fixture(scope='module', params=['stored', 'fresh'])
def data(request):
  """1,500 triangles of the stored splits' generator, or drawn fresh as training draws them."""
  if request.param == 'stored':
    return triangle.generate(1500, seed=3)
  return jax.device_get(jax.jit(triangle.fresh)(3, jnp.arange(1500, dtype=jnp.int32)))


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


# ---------------------------------------------------------------------------------------------
# Fresh training triangles (docs/data.md#fresh): the stored generator's rule, drawn on device.

def test_fresh_third_vertex_is_the_generators_for_every_pair():
  """Every (p1, p2) in [1, 63]²×[1, 63]²: the on-device third vertex equals sample_vertices'
  float64 one, NumPy's cos(π/3) = 0.5000000000000001 included (float32 alone misses 37,548)."""
  c = np.arange(1, 64)
  p1y, p2x, p2y = np.meshgrid(c, c, c, indexing='ij')
  third = jax.jit(triangle.third_vertex)
  for x1 in c:
    p1 = np.stack([np.full_like(p1y, x1), p1y], -1)
    p2 = np.stack([p2x, p2y], -1)
    dx, dy = p2[..., 0] - p1[..., 0], p2[..., 1] - p1[..., 1]
    cos60, sin60 = triangle._COS60, triangle._SIN60  # pylint: disable=protected-access
    want = np.stack([p1[..., 0] + cos60 * dx + sin60 * dy,
                     p1[..., 1] - sin60 * dx + cos60 * dy], -1)
    got = np.asarray(third(jnp.asarray(p1, jnp.int32), jnp.asarray(p2, jnp.int32)))
    np.testing.assert_array_equal(got, want.astype(np.int64), err_msg=f'p1.x={x1}')


def test_fresh_render_is_the_generators_stamp():
  rng = np.random.default_rng(0)
  points = rng.integers(0, 65, size=(50, 24, 2))  # vertices in [1, 63], offsets ±1
  got = np.asarray(jax.jit(jax.vmap(triangle._render))(points))  # pylint: disable=protected-access
  stamped = triangle._stamp_discs(points)  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, stamped)


def test_fresh_draws_match_the_stored_distribution():
  fresh = jax.device_get(jax.jit(triangle.fresh)(0, jnp.arange(3000, dtype=jnp.int32)))
  stored = triangle.generate(3000, seed=1)
  assert abs(fresh['label'].mean() - 0.5) < 0.03
  for label in (0, 1):  # the ink per image, per class: the same clusters of the same discs
    ink = [(d['image'][d['label'] == label] > 0).mean() for d in (fresh, stored)]
    assert abs(ink[0] - ink[1]) < 0.02 * ink[1], (label, ink)
  # an equilateral's third vertex is the rule's, from its first two
  equilateral = fresh['vertices'][fresh['label'] == 0]
  np.testing.assert_array_equal(equilateral[:, 2], np.asarray(
      triangle.third_vertex(jnp.asarray(equilateral[:, 0]), jnp.asarray(equilateral[:, 1]))))


def _codes(order, calls):
  return np.concatenate([np.asarray(order.next_indices(k)).ravel() for k in calls])


def test_fresh_batches_resume_to_the_same_images(generated_data_dir):
  """triangle/small: 512 examples, 8 batches of 64 an epoch. Every code is new for 3 epochs, a
  restored position continues with exactly the codes (so the images) of an uninterrupted run,
  and a stored split's position is refused."""
  mesh = sharding.make_mesh(-1, 1, jax.devices()[:2])
  kwargs = dict(data_dir=generated_data_dir, global_batch_size=64, seed=5, fresh=True)
  data, order = device_data.make_device_batches('triangle/small', mesh, **kwargs)
  codes = _codes(order, (1, 3, 5, 7, 8))  # 24 batches: three epochs
  assert len(np.unique(codes)) == len(codes) == 24 * 64
  _, order = device_data.make_device_batches('triangle/small', mesh, **kwargs)
  _codes(order, (1, 3))
  state = order.get_state()
  _, resumed = device_data.make_device_batches('triangle/small', mesh, start_state=state,
                                               **kwargs)
  np.testing.assert_array_equal(_codes(resumed, (5, 7, 8)), codes[4 * 64:])
  gather = jax.jit(device_data.gather)
  want = jax.device_get(gather(data.arrays, jnp.asarray(codes[4 * 64:5 * 64])))
  _, again = device_data.make_device_batches('triangle/small', mesh, start_state=state, **kwargs)
  got = jax.device_get(gather(data.arrays, again.next_indices(1)[0]))
  for key in ('image', 'label'):
    np.testing.assert_array_equal(got[key], want[key])
  assert got['image'].shape == (64, 64, 64, 1) and 0.3 < got['label'].mean() < 0.7
  _, stored = device_data.make_device_batches('triangle/small', mesh,
                                              **dict(kwargs, fresh=False))
  with pytest.raises(ValueError, match='The saved input state belongs to'):
    stored.set_state(state)
  for o in (order, resumed, again, stored):
    o.close()


def test_fresh_training_stopped_and_resumed_equals_one_run(generated_data_dir, tmp_path,
                                                           monkeypatch):
  """12 steps of 64 on fresh triangle/small (an epoch is 8), stopped at step 4 and resumed: the
  same train loss, accuracy and final state as without the stop."""
  from ait_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  from test_fast_loop import (  # pylint: disable=g-import-not-at-top
      _final_state, _train, quick_config)
  config = quick_config(generated_data_dir, fresh_train_data=True, steps_per_call=4,
                        total_steps=12, log_every_steps=4, checkpoint_every_steps=4,
                        eval_every_steps=100, eval_train_examples=0)
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  reference = _train(trainer, str(tmp_path / 'once'))
  original = checkpointing.PreemptionFlag.should_stop
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop',
                      lambda self, step, manager: step == 4)
  assert _train(trainer, str(tmp_path / 'twice'))['step'] == 4
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop', original)
  resumed = _train(trainer, str(tmp_path / 'twice'))
  assert resumed['train_loss'] == reference['train_loss']
  assert resumed['accuracy'] == reference['accuracy']
  want, got = (_final_state(trainer, str(tmp_path / d)) for d in ('once', 'twice'))
  jax.tree.map(np.testing.assert_array_equal, got[1], want[1])
  assert got[2] == want[2] and got[2]['fingerprint'].startswith('fresh ')
