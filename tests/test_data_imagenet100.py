"""ImageNet-100: the class list, the class-subset index and relabelling on TFDS mock data, the
train and eval iterators, a short training run, the missing-data message, and the Pet config."""
import math
import pathlib

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ait_jax import train
from ait_jax import validation
from ait_jax.data import datasets
from ait_jax.data import imagenet100 as inet
from ait_jax.data import input_pipeline as ip
from conftest import load_config

NUM_RECORDS = 400  # mock imagenet2012 records per split; labels are uniform over 1,000 classes
INFO = datasets.get_info('imagenet100')


@pytest.fixture(scope='module')
def sharding():
  return NamedSharding(jax.make_mesh((jax.device_count(),), ('data',)), P('data'))


@pytest.fixture
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=NUM_RECORDS, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _mock_labels(split: str) -> list[str]:
  """The wnid of every record of the mock split, read straight from TFDS."""
  source = tfds.data_source(inet.TFDS_NAME, split=split, download=False)
  names = source.dataset_info.features['label'].names
  return [names[source.data_source[i]['label']] for i in range(len(source))]


def test_class_list_is_100_distinct_imagenet_classes_and_5000_validation_images():
  names = tfds.builder(inet.TFDS_NAME).info.features['label'].names  # no download needed
  assert len(inet.WNIDS) == 100 == len(set(inet.WNIDS)) == INFO.num_classes
  assert set(inet.WNIDS) <= set(names)
  assert inet.WNIDS[:2] == ('n02869837', 'n01749939') and inet.WNIDS[-1] == 'n02090622'  # CMC order
  # TFDS ships the wnid of each of the 50,000 validation images; the registry's test size follows.
  shipped = pathlib.Path(tfds.__file__).parent / 'datasets/imagenet2012/validation_labels.txt'
  val = shipped.read_text().split()
  assert len(val) == 50_000
  assert sum(w in set(inet.WNIDS) for w in val) == INFO.num_test == 100 * inet.NUM_VAL_PER_CLASS


def test_label_map_rejects_a_class_the_dataset_lacks():
  np.testing.assert_array_equal(inet.label_map(['a', 'b', 'c'], ['c', 'a']), [1, -1, 0])
  with pytest.raises(ValueError, match='distinct classes'):
    inet.label_map(['a', 'b'], ['a', 'z'])


def test_subset_keeps_only_the_100_classes_relabelled_in_list_order(mock_imagenet, tmp_path,
                                                                    monkeypatch):
  wnids = _mock_labels('train')
  kept = [i for i, w in enumerate(wnids) if w in inet.WNIDS]
  assert 0 < len(kept) < NUM_RECORDS  # the mock data has both kinds of records
  source = ip.ExampleSource(INFO, 'train', str(tmp_path))
  assert len(source) == len(kept)
  batch = source.read(np.arange(len(source)))
  np.testing.assert_array_equal(batch['label'], [inet.WNIDS.index(wnids[i]) for i in kept])
  assert batch['label'].dtype == np.int32 and batch['label'].min() >= 0
  assert batch['label'].max() < 100
  assert batch['image'].shape == (len(kept), 224, 224, 3) and batch['image'].dtype == np.uint8
  # The index is cached next to the TFDS data; a second start loads it and reads no labels.
  cached = tmp_path / 'imagenet2012' / '5.1.0' / f'subset100_train_of_{NUM_RECORDS}.npy'
  np.testing.assert_array_equal(np.load(cached), kept)
  monkeypatch.setattr(ip.ExampleSource, '_raw_labels', lambda *_: pytest.fail('re-indexed'))
  assert len(ip.ExampleSource(INFO, 'train', str(tmp_path))) == len(kept)


def test_index_is_built_in_record_order_across_chunks(tmp_path):
  labels = np.array([3, 0, 1, 3, 2, 3, 0, 3, 1, 3])
  keep = np.array([False, True, False, True])  # keep labels 1 and 3
  index = inet.load_or_build_index(tmp_path / 'i.npy', 10, lambda keys: labels[keys], keep,
                                   chunk=3, threads=3)
  np.testing.assert_array_equal(index, [0, 2, 3, 5, 7, 8, 9])
  np.testing.assert_array_equal(np.load(tmp_path / 'i.npy'), index)


def test_a_stale_index_is_refused_with_what_to_do(tmp_path):
  path = tmp_path / 'index.npy'
  np.save(path, np.array([0, 7]))
  with pytest.raises(ValueError, match='delete it and run again'):
    inet.load_or_build_index(path, 5, lambda keys: keys, np.ones(5, bool))


def test_train_and_eval_iterators(mock_imagenet, tmp_path, sharding):
  it = ip.make_train_iterator('imagenet100', data_dir=str(tmp_path), global_batch_size=8, seed=0,
                              sharding=sharding, prefetch=0)
  b = jax.tree.map(np.asarray, next(it))
  assert b['image'].shape == (8, 224, 224, 3) and b['label'].dtype == np.int32
  assert 0 <= b['label'].min() and b['label'].max() < 100
  num_val = sum(w in inet.WNIDS for w in _mock_labels('validation'))
  batches = list(ip.make_eval_iterator('imagenet100', data_dir=str(tmp_path), global_batch_size=8,
                                       sharding=sharding, split=INFO.test_split))
  assert len(batches) == math.ceil(num_val / 8)
  assert int(sum(np.asarray(b['mask']).sum() for b in batches)) == num_val


def _tiny_config(data_dir, **overrides):
  c = load_config('imagenet100')
  c.model.update(depth=1, width=64, mlp_dim=128, num_heads=1, patch_size=32, bottleneck_k=16)
  c.update(data_dir=data_dir, batch_size=8, eval_batch_size=8, total_steps=2, warmup_epochs=0.0,
           log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2, read_threads=1,
           prefetch=0)
  c.mesh.data = 1
  c.update(overrides)
  return c


def test_missing_data_fails_with_one_sentence_saying_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    train.train_and_evaluate(_tiny_config(str(tmp_path / 'empty')), str(tmp_path / 'work'))
  message = str(e.value)
  assert '\n' not in message and message.endswith('.')
  assert 'python -m ait_jax.data.prepare --dataset=imagenet100' in message
  assert 'ILSVRC2012_img_train.tar' in message and 'downloads/manual' in message


def test_a_short_training_run_on_mock_data_evaluates_on_validation(mock_imagenet, tmp_path):
  data_dir = tmp_path / 'data'
  result = train.train_and_evaluate(_tiny_config(str(data_dir)), str(tmp_path / 'work'))
  assert np.isfinite(result['train_loss']) and 0 <= result['accuracy'] <= 1
  indexed = sorted(p.name for p in (data_dir / 'imagenet2012' / '5.1.0').glob('*.npy'))
  assert indexed == [f'subset100_{s}_of_{NUM_RECORDS}.npy' for s in ('train', 'validation')]


def test_configs_follow_the_paper():
  pet = validation.validate(load_config('pet'))
  assert pet.config.batch_size == 128 and pet.model.workspace['memory_slots'] == 128
  inet100 = validation.validate(load_config('imagenet100'))
  assert inet100.info.num_classes == 100 and inet100.model.depth == 6  # AiT-Medium
  assert inet100.steps_per_epoch == 126_689 // 512
