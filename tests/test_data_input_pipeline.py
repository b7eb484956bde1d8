"""grain pipeline: order by seed, resumable state, disjoint shards, padded evaluation, TFDS sources."""
import json

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ait_jax.data import datasets
from ait_jax.data import input_pipeline as ip

BATCH = 32  # a multiple of 8, so the tests also run with 8 forced CPU devices


@pytest.fixture(scope='module')
def sharding():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  return NamedSharding(mesh, P('data'))


@pytest.fixture(scope='module')
def data_dir(generated_data_dir):
  return generated_data_dir


def _take(it, n):
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def _fingerprints(batches):
  return [hash(b['image'][i].tobytes()) for b in batches for i in range(len(b['label']))]


def test_same_seed_same_order_over_two_epochs(data_dir, sharding):
  epoch = 512 // BATCH
  runs = []
  for _ in range(2):
    it = ip.make_train_iterator('triangle/small', data_dir=data_dir, global_batch_size=BATCH,
                                seed=1, sharding=sharding)
    runs.append(_take(it, 2 * epoch))
  assert _fingerprints(runs[0]) == _fingerprints(runs[1])
  first, second = _fingerprints(runs[0][:epoch]), _fingerprints(runs[0][epoch:])
  assert sorted(first) == sorted(second)  # each epoch sees every example once
  assert first != second  # and is reshuffled


def test_different_seeds_differ(data_dir, sharding):
  orders = []
  for seed in (1, 2):
    it = ip.make_train_iterator('triangle/small', data_dir=data_dir, global_batch_size=BATCH,
                                seed=seed, sharding=sharding)
    orders.append(_fingerprints(_take(it, 2)))
  assert orders[0] != orders[1]


@pytest.mark.parametrize('prefetch', [0, 2])
def test_restored_state_gives_the_next_batch(data_dir, sharding, prefetch):
  kwargs = dict(data_dir=data_dir, global_batch_size=BATCH, seed=3, sharding=sharding,
                prefetch=prefetch)
  it = ip.make_train_iterator('sort_of_clevr/small', **kwargs)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
  expected = _take(it, 2)
  restored = ip.make_train_iterator('sort_of_clevr/small', start_state=state, **kwargs)
  got = _take(restored, 2)
  for e, g in zip(expected, got):
    assert e.keys() == g.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


class _IndexSource:
  """Stands in for ExampleSource: example i carries its own index."""

  def __len__(self):
    return 103

  def read(self, indices):
    return {'image': np.zeros((len(indices), 2, 2, 1), np.uint8),
            'label': np.asarray(indices, np.int32)}

  def __repr__(self):
    return '_IndexSource()'


def test_process_shards_are_disjoint_and_cover_the_split():
  sharding = NamedSharding(jax.make_mesh((1,), ('data',), devices=jax.devices()[:1]), P('data'))
  seen = []
  for index in range(3):
    it = ip.TrainBatches(_IndexSource(), local_batch_size=1, seed=0, sharding=sharding,
                         prefetch=0, shard_index=index, shard_count=3)
    size = 103 // 3 + (index < 103 % 3)
    seen.append({int(np.asarray(next(it)['label'])[0]) for _ in range(size)})
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
  assert seen[0] | seen[1] | seen[2] == set(range(103))


def test_batch_size_must_divide_over_processes(data_dir, sharding, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    ip.make_train_iterator('triangle/small', data_dir=data_dir, global_batch_size=BATCH, seed=0,
                           sharding=sharding)


@pytest.mark.parametrize('n,batch,processes', [(103, 16, 1), (103, 16, 2), (96, 32, 4), (5, 8, 4)])
def test_eval_indices_cover_every_example_once(n, batch, processes):
  per_process = [list(ip.eval_indices(n, batch, p, processes)) for p in range(processes)]
  assert len({len(b) for b in per_process}) == 1  # every process yields the same number
  everything = np.concatenate([i for batches in per_process for i in batches])
  real = np.sort(everything[everything >= 0])
  np.testing.assert_array_equal(real, np.arange(n))
  assert len(everything) == -(-n // batch) * batch


def test_eval_iterator_pads_and_masks_the_last_batch(data_dir, sharding):
  source = ip.ExampleSource(datasets.get_info('triangle/small'), 'test', data_dir)
  batches = [jax.tree.map(np.asarray, b) for b in ip.make_eval_iterator(
      'triangle/small', data_dir=data_dir, global_batch_size=BATCH, sharding=sharding)]
  assert len(batches) == -(-200 // BATCH)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.dtype == bool and mask.sum() == 200 and mask[:200].all() and not mask[200:].any()
  images = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(images[:200], np.stack([source[i]['image'] for i in range(200)]))
  assert not images[200:].any()
  # Masked accuracy ignores padding: a constant prediction scores exactly its class frequency.
  labels = np.concatenate([b['label'] for b in batches])
  acc = ((labels == 0) * mask).sum() / mask.sum()
  assert acc == np.mean([source[i]['label'] == 0 for i in range(200)])


def test_sort_of_clevr_question_type_filter(data_dir, sharding):
  info = datasets.get_info('sort_of_clevr/small', ('binary',))
  assert info.num_test == 50 * 10 and info.num_train == 200 * 10
  source = ip.ExampleSource(info, 'test', data_dir, ('binary',))
  assert len(source) == info.num_test
  batches = list(ip.make_eval_iterator('sort_of_clevr/small', data_dir=data_dir,
                                       global_batch_size=BATCH, sharding=sharding,
                                       question_types=('binary',)))
  b = jax.tree.map(np.asarray, batches[0])
  assert b['question'].shape == (BATCH, 18) and b['question'].dtype == np.float32
  assert np.all(b['qtype'] == 1) and np.all(b['question'][:, 13] == 1)
  np.testing.assert_array_equal(b['qsubtype'], b['question'][:, 15:18].argmax(-1))
  assert b['image'].shape == (BATCH, 75, 75, 3) and b['label'].dtype == np.int32
  assert datasets.get_info('sort_of_clevr').num_train == 294_000
  assert datasets.get_info('sort_of_clevr', ('binary',)).num_train == 98_000
  with pytest.raises(ValueError, match='question_types'):
    datasets.get_info('sort_of_clevr', ('relational',))


def test_missing_dataset_names_the_prepare_command(tmp_path, sharding):
  with pytest.raises(FileNotFoundError) as e:
    ip.make_train_iterator('triangle', data_dir=str(tmp_path), global_batch_size=BATCH, seed=0,
                           sharding=sharding)
  message = str(e.value)
  assert f'python -m ait_jax.data.prepare --dataset=triangle --data_dir={tmp_path}' in message
  assert not list(tmp_path.rglob('*.array_record*'))  # training never generates or downloads


def test_unknown_dataset():
  with pytest.raises(ValueError, match='cifar10'):
    datasets.get_info('cifar11')


@pytest.mark.parametrize('name,shape', [('cifar10', (32, 32, 3)), ('cifar100', (32, 32, 3)),
                                        ('oxford_iiit_pet', (224, 224, 3))])
def test_catalog_datasets_through_tfds_data_source(name, shape, sharding, tmp_path):
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    it = ip.make_train_iterator(name, data_dir=str(tmp_path), global_batch_size=8, seed=0,
                                sharding=sharding, prefetch=0)
    b = jax.tree.map(np.asarray, next(it))
    assert b['image'].shape == (8, *shape) and b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32 and b['label'].max() < datasets.get_info(name).num_classes
    batches = list(ip.make_eval_iterator(name, data_dir=str(tmp_path), global_batch_size=8,
                                         sharding=sharding))
    assert len(batches) == 3 and int(sum(np.asarray(b['mask']).sum() for b in batches)) == 20


def _example_bytes(image_bytes: bytes, label: int) -> bytes:
  """A record as TFDS writes tfds.features.Image and ClassLabel (TFDS needs TensorFlow for it)."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  example = tf_example_pb2.Example()
  example.features.feature['image'].bytes_list.value.append(image_bytes)
  example.features.feature['label'].int64_list.value.append(label)
  return example.SerializeToString()


@pytest.mark.parametrize('name,fmt,size', [('cifar10', 'PNG', (32, 32)),
                                           ('oxford_iiit_pet', 'JPEG', (300, 200))])
def test_catalog_records_decode_from_their_stored_bytes(name, fmt, size, tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format=fmt)
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    source = ip.ExampleSource(datasets.get_info(name), 'train', str(tmp_path))
  example = source._example(_example_bytes(buffer.getvalue(), 7))  # pylint: disable=protected-access
  assert example['label'] == 7 and example['image'].shape == datasets.get_info(name).image_shape
  if fmt == 'PNG':
    np.testing.assert_array_equal(example['image'], image)


def test_state_from_another_run_is_refused(data_dir, sharding):
  kwargs = dict(data_dir=data_dir, global_batch_size=BATCH, sharding=sharding, prefetch=0)
  state = ip.make_train_iterator('triangle/small', seed=0, **kwargs).get_state()
  with pytest.raises(ValueError, match='same dataset, seed'):
    ip.make_train_iterator('triangle/small', seed=1, start_state=state, **kwargs)
