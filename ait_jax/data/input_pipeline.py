"""Input pipelines over TFDS ArrayRecord sources: grain-ordered, sharded, resumable training
batches and padded evaluation batches, delivered as global jax.Arrays.

The host only reads and stacks uint8 arrays; augmentation and normalisation run on device
(`augment.py`). No TensorFlow is needed here.
"""
from collections.abc import Iterator, Sequence
import concurrent.futures
import dataclasses
import io
import queue
import threading
from typing import Any
import zlib

import grain
import jax
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

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

  `read(indices)` returns a stacked batch. It reads the raw ArrayRecord bytes of the TFDS source
  in one call and parses only the features the pipeline needs, which is about 4x faster than
  TFDS's generic per-example decoding (the host's whole job is reading and stacking).
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
    self._zlib_images = info.name.partition('/')[0] in builders.GENERATED
    self._repr = f'ExampleSource({info.name!r}, {split!r}, question_types={question_types!r})'

  def __len__(self) -> int:
    return len(self._source) if self._index is None else len(self._index)

  def __repr__(self) -> str:
    return self._repr

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read([i]).items()}

  def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The examples at `indices`, stacked: a local batch."""
    indices = np.asarray(indices, np.int64)
    if self._index is None:
      examples = [self._example(r) for r in self._records(indices)]
    else:
      flat = self._index[indices]
      examples = [self._example(r, q) for r, q in zip(self._records(flat // _Q),
                                                       (flat % _Q).tolist())]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def _records(self, keys: np.ndarray) -> list[Any]:
    raw, keys = self._source.data_source, keys.tolist()
    try:
      return raw.__getitems__(keys)  # one batched ArrayRecord read
    except TypeError:  # tfds.testing.mock_data's __getitems__ is unbound; read one by one
      return [raw[k] for k in keys]

  def _example(self, record, q: int | None = None) -> dict[str, np.ndarray]:
    """Parses the features the pipeline needs from one record (question q for Sort-of-CLEVR)."""
    if isinstance(record, bytes):
      f = tf_example_pb2.Example.FromString(record).features.feature
      image = f['image'].bytes_list.value[0]
      if self._zlib_images:  # tfds.features.Tensor(encoding='zlib'), see builders.py
        image = np.frombuffer(zlib.decompress(image), np.uint8).reshape(self.info.image_shape)
      if q is None:
        label = f['label'].int64_list.value[0]
      else:
        question = f['questions'].float_list.value[q * clevr.QUESTION_DIM:(q + 1) * clevr.QUESTION_DIM]
        label = f['answers'].int64_list.value[q]
    else:  # tfds.testing.mock_data hands out examples already decoded
      image = record['image']
      if q is None:
        label = record['label']
      else:
        question, label = record['questions'][q], record['answers'][q]
    example = {'image': self._image(image), 'label': np.int32(label)}
    if q is not None:
      question = np.asarray(question, np.float32)
      example.update(question=question, qtype=np.int32(q // clevr.QUESTIONS_PER_TYPE),
                     qsubtype=np.int32(np.argmax(question[15:18])))
    return example

  def _image(self, image) -> np.ndarray:
    if isinstance(image, bytes):
      image = PIL.Image.open(io.BytesIO(image)).convert('RGB')
    elif image.shape == self.info.image_shape:
      return np.asarray(image, np.uint8)
    else:
      image = PIL.Image.fromarray(np.asarray(image, np.uint8))
    h, w, _ = self.info.image_shape
    if image.size != (w, h):
      image = image.resize((w, h), PIL.Image.BILINEAR)
    return np.asarray(image, np.uint8)

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

  A grain MapDataset decides the order (a fresh permutation of this process's shard every epoch,
  from the seed); batches are read from it position by position, so the state is just the next
  position. A thread keeps `prefetch` global batches ready, each with the state after it,
  so `get_state()` always describes the last batch returned. Batches run across epoch ends.
  """

  def __init__(self, source: ExampleSource, *, local_batch_size: int, seed: int, sharding,
               prefetch: int = 2, worker_count: int = 0,
               shard_index: int | None = None, shard_count: int | None = None):
    self._source = source
    self._local = local_batch_size
    self._sharding = sharding
    self._prefetch = prefetch
    self._shard_index = jax.process_index() if shard_index is None else shard_index
    self._shard_count = jax.process_count() if shard_count is None else shard_count
    # This process's records are every shard_count-th one, so shards are disjoint and cover the
    # split; grain's shuffle draws a new permutation of them each epoch, and repeat() makes the
    # stream infinite. Batches run across epoch ends, so no example is ever dropped.
    # (grain's IndexSampler would give the same guarantees at ~4x the per-record cost.)
    self._order = (grain.MapDataset.range(len(source))[self._shard_index::self._shard_count]
                   .seed(seed).shuffle().repeat())
    # Every process is at the same position, so one process's state restores all of them: the
    # fingerprint leaves out the shard index (the checkpoint keeps process 0's state).
    self._fingerprint = (f'{source!r} seed={seed} shards={self._shard_count} '
                         f'batch={local_batch_size}')
    # Decoding threads: zlib and PIL release the GIL, so they help on multi-core hosts.
    self._workers = worker_count
    self._pool = (concurrent.futures.ThreadPoolExecutor(worker_count) if worker_count > 0
                  else None)
    self._position = 0  # batches read so far by this process
    self._state = self._make_state(0)
    self._queue = None
    self._thread = None
    self._stop = None

  def _make_state(self, position: int) -> dict[str, Any]:
    return {'position': position, 'fingerprint': self._fingerprint}

  def _read_local(self, position: int) -> dict[str, np.ndarray]:
    first = position * self._local
    keys = [self._order[k] for k in range(first, first + self._local)]
    if self._pool is None:
      return self._source.read(keys)
    chunks = np.array_split(np.asarray(keys), self._workers)
    parts = list(self._pool.map(self._source.read, [c for c in chunks if len(c)]))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _next_item(self):
    local = self._read_local(self._position)
    self._position += 1
    return _to_global(local, self._sharding), self._make_state(self._position)

  def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      try:
        item = self._next_item()
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

  def close(self) -> None:
    """Stops the prefetch thread; `next` restarts it from the last returned batch."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      self._position = self._state['position']

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._prefetch <= 0:
      batch, self._state = self._next_item()
      return batch
    if self._thread is None:
      self._queue = queue.Queue(maxsize=self._prefetch)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                      daemon=True)
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, Exception):
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: restoring it makes the next batch the one that would follow."""
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('fingerprint') != self._fingerprint:
      raise ValueError(f'The saved input state belongs to {state.get("fingerprint")!r}, not to '
                       f'{self._fingerprint!r}; resume with the same dataset, seed and processes.')
    self.close()
    self._state = dict(state)
    self._position = int(state['position'])

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
  float32 [B, 18], 'qtype' and 'qsubtype' int32 [B]. Each process reads its own shard and
  contributes global_batch_size // process_count examples. start_state is a `get_state()` dict;
  prefetch is the number of global batches prepared ahead by a thread; worker_count adds that
  many decoding threads.
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
  """Per batch, this process's example indices; -1 marks padding. Same batch count everywhere.

  Process p fills rows [p·local, (p+1)·local) of each global batch, where
  `make_array_from_process_local_data` puts its rows on a data mesh ordered by process; on any
  other layout each example still appears exactly once, with its mask.
  """
  local = global_batch_size // process_count
  num_batches = -(-num_examples // global_batch_size)
  for b in range(num_batches):
    idx = b * global_batch_size + process_index * local + np.arange(local)
    yield np.where(idx < num_examples, idx, -1)


def make_eval_iterator(name: str, *, data_dir: str | None, global_batch_size: int, sharding,
                       split: str = 'test', question_types: Sequence[str] | None = None
                       ) -> Iterator[dict[str, jax.Array]]:
  """Every example of `split` exactly once, in order; the last batch is zero-padded.

  Adds 'mask' bool [B], False on padding, which metrics must use as weights.
  """
  info = get_info(name, question_types)
  _local_batch_size(global_batch_size)  # validates divisibility
  source = ExampleSource(info, split, data_dir, question_types)
  pad = source.zeros()

  def batches():
    for idx in eval_indices(len(source), global_batch_size, jax.process_index(),
                            jax.process_count()):
      mask = idx >= 0
      batch = {k: np.zeros((len(idx), *v.shape), v.dtype) for k, v in pad.items()}
      if mask.any():
        for k, v in source.read(idx[mask]).items():
          batch[k][mask] = v
      batch['mask'] = mask
      yield _to_global(batch, sharding)

  return batches()
