"""grain input pipelines over TFDS ArrayRecord sources: sharded, resumable training and padded eval.

The host only reads and stacks uint8 arrays; augmentation and normalisation run on device
(`augment.py`). No TensorFlow is needed here.
"""
from collections.abc import Iterator, Sequence
import concurrent.futures
import dataclasses
import json
import queue
import threading
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from ait_jax.data import builders
from ait_jax.data import sort_of_clevr as clevr

# Pet images come in many sizes; they are resized on the host to this fixed size (bilinear, PIL)
# because the TFDS catalog stores the original JPEGs and JPEG decoding happens on the host anyway.
PET_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a dataset; shapes are as stored, before `preprocess`."""
  name: str
  tfds_name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  train_split: str
  test_split: str
  num_train: int
  num_test: int
  has_question: bool

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """Image shape the model sees, after `augment.preprocess` (Triangle gains 3 channels)."""
    h, w, _ = self.image_shape
    return (h, w, 3)

  def num_examples(self, split: str) -> int:
    return {self.train_split: self.num_train, self.test_split: self.num_test}[split]


_Q = clevr.QUESTIONS_PER_IMAGE
DATASETS = {
    'cifar10': DatasetInfo('cifar10', 'cifar10', (32, 32, 3), 10, 'train', 'test',
                           50_000, 10_000, False),
    'cifar100': DatasetInfo('cifar100', 'cifar100', (32, 32, 3), 100, 'train', 'test',
                            50_000, 10_000, False),
    'oxford_iiit_pet': DatasetInfo('oxford_iiit_pet', 'oxford_iiit_pet',
                                   (PET_IMAGE_SIZE, PET_IMAGE_SIZE, 3), 37, 'train', 'test',
                                   3_680, 3_669, False),
    'triangle': DatasetInfo('triangle', 'triangle/full', (64, 64, 1), 2, 'train', 'test',
                            50_000, 10_000, False),
    'sort_of_clevr': DatasetInfo('sort_of_clevr', 'sort_of_clevr/full', (75, 75, 3),
                                 clevr.NUM_ANSWERS, 'train', 'test',
                                 clevr.NUM_TRAIN * _Q, clevr.NUM_TEST * _Q, True),
}


def get_info(name: str, question_types: Sequence[str] | None = None) -> DatasetInfo:
  """Info for a dataset name; generated datasets accept a builder config, e.g. 'triangle/small'.

  For sort_of_clevr, num_train/num_test count the (image, question) examples of `question_types`.
  """
  base, _, config = name.partition('/')
  if base not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; use one of {sorted(DATASETS)}.')
  info = DATASETS[base]
  if config:
    if base not in builders.GENERATED:
      raise ValueError(f'Only {sorted(builders.GENERATED)} take a config suffix, got {name!r}.')
    configs = {c.name: c for c in builders.GENERATED[base].BUILDER_CONFIGS}
    if config not in configs:
      raise ValueError(f'Unknown config in {name!r}; use one of {sorted(configs)}.')
    c = configs[config]
    per_image = _Q if info.has_question else 1
    info = dataclasses.replace(info, name=name, tfds_name=f'{base}/{config}', num_train=c.num_train * per_image,
                               num_test=c.num_test * per_image)
  if info.has_question:
    kept = len(clevr.question_type_indices(question_types)) / 3
    info = dataclasses.replace(info, num_train=round(info.num_train * kept),
                               num_test=round(info.num_test * kept))
  return info


def prepare_command(name: str, data_dir: str | None) -> str:
  return f'python -m ait_jax.data.prepare --dataset={name} --data_dir={data_dir}'


def _open_tfds(info: DatasetInfo, split: str, data_dir: str | None):
  try:
    return tfds.data_source(info.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types here, all meaning "not prepared".
    raise FileNotFoundError(
        f'Dataset {info.name!r} (split {split!r}) is not prepared as ArrayRecord in '
        f'data_dir={data_dir or tfds.core.constants.DATA_DIR!r}; run '
        f'`{prepare_command(info.name, data_dir or tfds.core.constants.DATA_DIR)}` first.') from e


class ExampleSource:
  """Random-access examples as uint8/int32 numpy dicts; Sort-of-CLEVR expands to (image, question).

  Follows grain's RandomAccessDataSource protocol and pickles, so grain workers can use it.
  """

  def __init__(self, info: DatasetInfo, split: str, data_dir: str | None,
               question_types: Sequence[str] | None = None):
    self.info = info
    self.split = split
    self._source = _open_tfds(info, split, data_dir)
    self._index = None
    if info.has_question:
      # Questions are stored in type order, 10 per type, so filtering is pure index arithmetic.
      types = clevr.question_type_indices(question_types)
      per_image = [t * clevr.QUESTIONS_PER_TYPE + k for t in types
                   for k in range(clevr.QUESTIONS_PER_TYPE)]
      images = np.arange(len(self._source), dtype=np.int64)
      self._index = (images[:, None] * _Q + np.array(per_image)[None, :]).reshape(-1)
    self._repr = f'ExampleSource({info.tfds_name!r}, {split!r}, question_types={question_types!r})'

  def __len__(self) -> int:
    return len(self._source) if self._index is None else len(self._index)

  def __repr__(self) -> str:
    # grain compares reprs when restoring a state, so no memory addresses here.
    return self._repr

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if self._index is None:
      record = self._source[int(i)]
      return {'image': self._image(record['image']), 'label': np.int32(record['label'])}
    flat = int(self._index[i])
    record = self._source[flat // _Q]
    q = flat % _Q
    question = np.asarray(record['questions'][q], np.float32)
    return {
        'image': np.asarray(record['image'], np.uint8),
        'label': np.int32(record['answers'][q]),
        'question': question,
        'qtype': np.int32(q // clevr.QUESTIONS_PER_TYPE),
        'qsubtype': np.int32(np.argmax(question[15:18])),
    }

  def _image(self, image) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.shape != self.info.image_shape:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      h, w, _ = self.info.image_shape
      image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), np.uint8)
    return image

  def zeros(self) -> dict[str, np.ndarray]:
    """One all-zero example, used to pad the last evaluation batch."""
    return {k: np.zeros_like(v) for k, v in self[0].items()}


def _local_batch_size(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of the '
                     f'process count {n}; change the batch size.')
  return global_batch_size // n


def _to_global(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class TrainIterator:
  """Infinite, shuffled, per-process-sharded global batches whose position is a small JSON dict.

  grain's DataLoader does the reading; a thread keeps `prefetch` global batches ready, each with
  the grain state right after it, so `get_state()` always describes the last batch returned.
  """

  def __init__(self, source: ExampleSource, *, local_batch_size: int, seed: int, sharding,
               prefetch: int = 2, worker_count: int = 0,
               shard_index: int | None = None, shard_count: int | None = None):
    self._sharding = sharding
    self._prefetch = prefetch
    shard_options = grain.sharding.ShardOptions(
        shard_index=jax.process_index() if shard_index is None else shard_index,
        shard_count=jax.process_count() if shard_count is None else shard_count,
        # Keeping the remainder lets the shards cover the split; batches run across epochs anyway.
        drop_remainder=False)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=True, num_epochs=None,
        seed=seed)
    self._loader = grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[grain.transforms.Batch(local_batch_size, drop_remainder=True)],
        worker_count=worker_count)
    self._it = iter(self._loader)
    self._state = self._grain_state()
    self._queue = None
    self._thread = None
    self._stop = None

  def _grain_state(self) -> dict[str, Any]:
    state = self._it.get_state()
    return json.loads(state.decode() if isinstance(state, bytes) else state)

  def _next_local(self):
    batch = next(self._it)
    return batch, self._grain_state()

  def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      try:
        local, state = self._next_local()
        item = (_to_global(local, self._sharding), state)
      except Exception as e:  # pylint: disable=broad-except  # re-raised in the consumer
        item = e
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, Exception):
        return

  def _start(self) -> None:
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                    daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops the prefetch thread; the iterator can be resumed with `set_state`."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._prefetch <= 0:
      local, self._state = self._next_local()
      return _to_global(local, self._sharding)
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, Exception):
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: restoring it makes the next batch the one that would follow."""
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._it = iter(self._loader)
    self._it.set_state(json.dumps(state).encode())
    self._state = state

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown
      pass


def make_train_iterator(name: str, *, data_dir: str | None, global_batch_size: int, seed: int,
                        sharding, question_types: Sequence[str] | None = None,
                        start_state: dict[str, Any] | None = None, prefetch: int = 2,
                        worker_count: int = 0) -> TrainIterator:
  """Infinite training batches of global jax.Arrays, reshuffled every epoch from `seed`.

  Keys: 'image' uint8 [B, H, W, C] as stored, 'label' int32 [B]; Sort-of-CLEVR adds 'question'
  float32 [B, 18], 'qtype' and 'qsubtype' int32 [B]. Each process reads its own shard.
  """
  info = get_info(name, question_types)
  local = _local_batch_size(global_batch_size)
  source = ExampleSource(info, info.train_split, data_dir, question_types)
  it = TrainIterator(source, local_batch_size=local, seed=seed, sharding=sharding,
                     prefetch=prefetch, worker_count=worker_count)
  if start_state is not None:
    it.set_state(start_state)
  return it


def eval_indices(num_examples: int, global_batch_size: int, process_index: int,
                 process_count: int) -> Iterator[np.ndarray]:
  """Per batch, this process's example indices; -1 marks padding. Same batch count everywhere."""
  local = global_batch_size // process_count
  num_batches = -(-num_examples // global_batch_size)
  for b in range(num_batches):
    idx = b * global_batch_size + process_index * local + np.arange(local)
    yield np.where(idx < num_examples, idx, -1)


def make_eval_iterator(name: str, *, data_dir: str | None, global_batch_size: int, sharding,
                       split: str = 'test', question_types: Sequence[str] | None = None,
                       num_threads: int = 4) -> Iterator[dict[str, jax.Array]]:
  """Every example of `split` exactly once, in order; the last batch is zero-padded.

  Adds 'mask' bool [B], False on padding, which metrics must use as weights.
  """
  info = get_info(name, question_types)
  _local_batch_size(global_batch_size)  # validates divisibility
  source = ExampleSource(info, split, data_dir, question_types)
  pad = source.zeros()

  def read(i):
    return source[i] if i >= 0 else pad

  def batches():
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for idx in eval_indices(len(source), global_batch_size, jax.process_index(),
                              jax.process_count()):
        examples = list(pool.map(read, idx.tolist()))
        batch = {k: np.stack([e[k] for e in examples]) for k in pad}
        batch['mask'] = idx >= 0
        yield _to_global(batch, sharding)

  return batches()
