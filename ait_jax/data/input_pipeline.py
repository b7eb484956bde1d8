"""Input pipelines over TFDS ArrayRecord sources: grain-ordered, sharded, resumable training
batches and padded evaluation batches, delivered as global jax.Arrays.

The host only reads and stacks uint8 arrays; augmentation and normalisation run on device
(`augment.py`). No TensorFlow is needed here.
"""
from collections.abc import Iterator, Sequence
import contextlib
import io
from typing import Any
import zlib

import grain
import jax
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from ait_jax import errors
from ait_jax.data import builders
from ait_jax.data import datasets
from ait_jax.data import imagenet100 as inet
from ait_jax.data import sort_of_clevr as clevr
from ait_jax.data.datasets import DatasetInfo

_Q = clevr.QUESTIONS_PER_IMAGE


def prepare_command(name: str, data_dir: str | None) -> str:
  return f'python -m ait_jax.data.prepare --dataset={name} --data_dir={data_dir}'


def require_data_dir(data_dir: str | None) -> None:
  """An empty data_dir (`--config.data_dir=` with an unset shell variable) is refused: TFDS would
  read and write datasets in the current folder."""
  if data_dir == '':
    raise errors.ConfigError(
        'The data_dir is empty (--config.data_dir= or --data_dir=; is the shell '
        'variable in it set?); pass the folder that holds the datasets, e.g. '
        '--config.data_dir=~/tensorflow_datasets (it is created if missing).')


class DamagedDataError(errors.UserError):
  """A dataset file cannot be read (a truncated ArrayRecord, bytes damaged mid-file)."""


def damaged_data_error(name: str, split: str, data_dir: str | None,
                       error: BaseException) -> DamagedDataError:
  """The one sentence for a split whose records cannot be read, at start-up or mid-run."""
  first = (str(error).splitlines() or [''])[0][:120]
  return DamagedDataError(
      f'The {split} split of {name} in {data_dir} cannot be read ({type(error).__name__}: '
      f'{first}); its files are truncated or damaged: delete that dataset folder and run '
      f'{prepare_command(name, data_dir)}.')


def open_tfds(info: DatasetInfo, split: str, data_dir: str | None):
  """The TFDS ArrayRecord source of one split; our builders (builders.BUILDERS) read their own
  datasets, so reading needs neither the TFDS catalog nor TensorFlow."""
  require_data_dir(data_dir)
  base, _, config = info.tfds_name.partition('/')
  try:
    if base in builders.BUILDERS:
      return builders.make(base, data_dir, config or None).as_data_source(split)
    return tfds.data_source(info.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types here, all meaning "not prepared".
    data_dir = data_dir or tfds.core.constants.DATA_DIR
    manual = (f' (it needs {" and ".join(info.manual_download)}, downloaded by hand into '
              f'{data_dir}/downloads/manual/)' if info.manual_download else '')
    raise FileNotFoundError(
        f'Dataset {info.name!r} (split {split!r}) is not prepared as ArrayRecord in '
        f'data_dir={data_dir!r}; run `{prepare_command(info.name, data_dir)}` first{manual}.'
    ) from e


def _question(questions, q: int):
  """Question q of a record's flat question values (Q·18 of them)."""
  return questions[q * clevr.QUESTION_DIM:(q + 1) * clevr.QUESTION_DIM]


def _question_fields(question, q: int) -> dict[str, np.ndarray]:
  question = np.asarray(question, np.float32)
  return {'question': question, 'qtype': np.int32(q // clevr.QUESTIONS_PER_TYPE),
          'qsubtype': np.int32(np.argmax(question[15:18]))}


class ExampleSource:
  """Random-access examples as uint8/int32 numpy dicts; Sort-of-CLEVR expands to (image, question).

  `read(indices)` returns a stacked batch. It reads the raw ArrayRecord bytes of the TFDS source
  in one call and parses only the features the pipeline needs, which is about 4x faster than
  TFDS's generic per-example decoding (the host's whole job is reading and stacking).
  A dataset with `tfds_classes` (ImageNet-100) sees only the records of those classes, relabelled
  0..n-1; their record indices are cached next to the TFDS data (`imagenet100.py`).
  """

  def __init__(self, info: DatasetInfo, split: str, data_dir: str | None,
               question_types: Sequence[str] | None = None):
    self.info = info
    self.split = split
    self._data_dir = data_dir
    self._source = open_tfds(info, split, data_dir)
    self._index = None
    self._subset, self._label_map = None, None
    if info.tfds_classes:
      self._label_map = inet.label_map(self._source.dataset_info.features['label'].names,
                                       info.tfds_classes)
      path = inet.index_path(data_dir or tfds.core.constants.DATA_DIR, info.tfds_name,
                             str(self._source.dataset_info.version), split, len(self._source),
                             len(info.tfds_classes))
      self._subset = inet.load_or_build_index(path, len(self._source), self._raw_labels,
                                              self._label_map >= 0)
    if info.has_question:
      # Questions are stored in type order, 10 per type, so filtering is pure index arithmetic.
      types = clevr.question_type_indices(question_types)
      per_image = [t * clevr.QUESTIONS_PER_TYPE + k for t in types
                   for k in range(clevr.QUESTIONS_PER_TYPE)]
      images = np.arange(len(self._source), dtype=np.int64)
      self._index = (images[:, None] * _Q + np.array(per_image)[None, :]).reshape(-1)
    self._zlib_images = info.generated  # tfds.features.Tensor(encoding='zlib'), see builders.py
    self._repr = f'ExampleSource({info.name!r}, {split!r}, question_types={question_types!r})'

  def __len__(self) -> int:
    if self._subset is not None:
      return len(self._subset)
    return len(self._source) if self._index is None else len(self._index)

  def __repr__(self) -> str:
    return self._repr

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read([i]).items()}

  @contextlib.contextmanager
  def _reading(self):
    """Turns any failure to read or parse records (Riegeli hash mismatches, protobuf or zlib
    errors from damaged bytes) into the sentence of the start-up check, wherever it happens: in
    grain's threads, at an evaluation, while loading device data."""
    try:
      yield
    except DamagedDataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise damaged_data_error(self.info.name, self.split, self._data_dir, e) from None

  def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The examples at `indices`, stacked: a local batch."""
    with self._reading():
      return self._read(indices)

  def _read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    if self._subset is not None:  # positions in the class subset -> record indices
      indices = self._subset[indices]
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

  def _raw_labels(self, keys: np.ndarray) -> list[int]:
    """The stored labels of records `keys`, without decoding their images (for the subset index)."""
    with self._reading():
      return [self._stored_label(r) for r in self._records(np.asarray(keys, np.int64))]

  @staticmethod
  def _stored_label(record) -> int:
    if isinstance(record, bytes):
      feature = tf_example_pb2.Example.FromString(record).features.feature
      return feature['label'].int64_list.value[0]
    return int(record['label'])  # tfds.testing.mock_data hands out examples already decoded

  def _parse(self, record):
    """(image as stored, label, questions, answers) of one record; the last two are None without
    questions. One protobuf parse per record; questions and answers stay sequences indexed by
    question (`_question`), so a batch converts only the questions it uses."""
    if isinstance(record, bytes):
      f = tf_example_pb2.Example.FromString(record).features.feature
      image = f['image'].bytes_list.value[0]
      if self._zlib_images:
        image = np.frombuffer(zlib.decompress(image), np.uint8).reshape(self.info.image_shape)
      if self._index is None:
        return image, f['label'].int64_list.value[0], None, None
      return image, None, f['questions'].float_list.value, f['answers'].int64_list.value
    # tfds.testing.mock_data hands out examples already decoded
    if self._index is None:
      return record['image'], record['label'], None, None
    return (record['image'], None, np.asarray(record['questions'], np.float32).reshape(-1),
            np.asarray(record['answers']))

  def _example(self, record, q: int | None = None) -> dict[str, np.ndarray]:
    """Parses the features the pipeline needs from one record (question q for Sort-of-CLEVR)."""
    image, label, questions, answers = self._parse(record)
    if q is not None:
      label = answers[q]
    if self._label_map is not None:
      label = self._label_map[label]
    example = {'image': self._image(image), 'label': np.int32(label)}
    if q is not None:
      example.update(_question_fields(_question(questions, q), q))
    return example

  def columns(self, keys: Sequence[int], chunk: int = 1024) -> dict[str, np.ndarray]:
    """The examples at `keys` as columns, each image stored once: 'images' [R, H, W, C] and, per
    example, 'image_row' (its row in 'images'), 'label' [+ 'question', 'qtype', 'qsubtype'].

    Sort-of-CLEVR's examples share their image (one per question), so the images are kept per
    record rather than per example; everything else equals `read(keys)`.
    """
    with self._reading():
      return self._columns(keys, chunk)

  def _columns(self, keys: Sequence[int], chunk: int) -> dict[str, np.ndarray]:
    keys = np.asarray(keys, np.int64)
    if self._index is None:
      parts = [self.read(keys[i:i + chunk]) for i in range(0, len(keys), chunk)]
      out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      out['images'] = out.pop('image')
      out['image_row'] = np.arange(len(keys), dtype=np.int32)
      return out
    flat = self._index[keys]
    records, image_row = np.unique(flat // _Q, return_inverse=True)
    images, fields = [], []
    for start in range(0, len(records), chunk):
      for r in self._records(records[start:start + chunk]):
        image, _, questions, answers = self._parse(r)
        images.append(self._image(image))
        fields.append((questions, answers))
    examples = []
    for row, q in zip(image_row.tolist(), (flat % _Q).tolist()):
      questions, answers = fields[row]
      examples.append({'label': np.int32(answers[q]),
                       **_question_fields(_question(questions, q), q)})
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    out.update(images=np.stack(images), image_row=image_row.astype(np.int32))
    return out

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
    raise errors.ConfigError(
        f'global_batch_size={global_batch_size} must be a positive multiple of the '
        f'process count {n}; change the batch size.')
  return global_batch_size // n


def _to_global(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def train_keys(num_examples: int, seed: int, shard_index: int, shard_count: int):
  """The infinite sequence of one process's training keys (record indices), as grain orders them:
  every shard_count-th key from shard_index, shuffled afresh every epoch from `seed`, repeated.
  `TrainBatches` batches it; `device_data` reads the same order without reading examples."""
  keys = grain.MapDataset.range(num_examples)
  if shard_count > 1:  # a slice adds a Python layer to every key; one process needs none
    keys = keys[shard_index::shard_count]
  return keys.seed(seed).shuffle().repeat()


def train_fingerprint(source: 'ExampleSource', seed: int, shard_count: int,
                      local_batch_size: int) -> str:
  """What a saved input position belongs to; a resume with another one is refused."""
  return f'{source!r} seed={seed} shards={shard_count} batch={local_batch_size}'


def saved_position(state: dict[str, Any], fingerprint: str, *keys: str) -> Any:
  """The position ('grain') of a saved input state (a `get_state()` of the training batches),
  refused in one sentence when the state belongs to another fingerprint (dataset, seed, process
  count, batch size) or its position lacks `keys`."""
  if (state.get('fingerprint') != fingerprint or 'grain' not in state
      or any(k not in state['grain'] for k in keys)):
    raise errors.InputError(
        f'The saved input state belongs to {state.get("fingerprint")!r}, not to '
        f'{fingerprint!r}; resume with the same dataset, seed and processes.')
  return state['grain']


class TrainBatches:
  """Infinite, shuffled, per-process-sharded global batches whose position is a small JSON dict.

  grain does the work: a MapDataset of this process's record indices (every shard_count-th one, so
  shards are disjoint and cover the split) is shuffled afresh every epoch from the seed, repeated,
  batched, read with one batched ArrayRecord call per batch and turned into global jax.Arrays, in
  `threads` threads with `prefetch` batches ready. Batches run across epoch ends, so no example is
  dropped. The state is grain's own iterator state plus a fingerprint that refuses a resume with
  another dataset, seed, process count or batch size.
  """

  def __init__(self, source: ExampleSource, *, local_batch_size: int, seed: int, sharding,
               prefetch: int = 2, threads: int = 1,
               shard_index: int | None = None, shard_count: int | None = None):
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    dataset = (train_keys(len(source), seed, shard_index, shard_count)
               .batch(local_batch_size, drop_remainder=True, batch_fn=np.asarray)
               .map(lambda keys: _to_global(source.read(keys), sharding)))
    self._iter = iter(dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=max(threads, 1) if prefetch > 0 else 0, prefetch_buffer_size=prefetch)))
    # Every process is at the same position, so one process's state restores all of them: the
    # fingerprint leaves out the shard index (the checkpoint keeps process 0's state).
    self._fingerprint = train_fingerprint(source, seed, shard_count, local_batch_size)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: restoring it makes the next batch the one that would follow."""
    return {'grain': self._iter.get_state(), 'fingerprint': self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    self._iter.set_state(saved_position(state, self._fingerprint))


def make_train_iterator(name: str, *, data_dir: str | None, global_batch_size: int, seed: int,
                        sharding, question_types: Sequence[str] | None = None,
                        start_state: dict[str, Any] | None = None, prefetch: int = 2,
                        threads: int = 1) -> TrainBatches:
  """Infinite training batches of global jax.Arrays, reshuffled every epoch from `seed`.

  Keys: 'image' uint8 [B, H, W, C] as stored, 'label' int32 [B]; datasets with questions add
  'question' float32 [B, Q], 'qtype' and 'qsubtype' int32 [B]. Each process reads its own shard
  and contributes global_batch_size // process_count examples. start_state is a `get_state()`
  dict; prefetch is the number of global batches prepared ahead by `threads` reading threads.
  """
  info = datasets.get_info(name, question_types)
  local = _local_batch_size(global_batch_size)
  source = ExampleSource(info, info.train_split, data_dir, question_types)
  it = TrainBatches(source, local_batch_size=local, seed=seed, sharding=sharding,
                    prefetch=prefetch, threads=threads)
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
                       split: str = 'test', question_types: Sequence[str] | None = None,
                       limit: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Every example of `split` (or its first `limit`) exactly once, in order; the last batch is
  zero-padded.

  Adds 'mask' bool [B], False on padding, which metrics must use as weights.
  """
  info = datasets.get_info(name, question_types)
  _local_batch_size(global_batch_size)  # validates divisibility
  source = ExampleSource(info, split, data_dir, question_types)
  pad = source.zeros()

  def batches():
    count = len(source) if limit is None else min(limit, len(source))
    for idx in eval_indices(count, global_batch_size, jax.process_index(), jax.process_count()):
      mask = idx >= 0
      batch = {k: np.zeros((len(idx), *v.shape), v.dtype) for k, v in pad.items()}
      if mask.any():
        for k, v in source.read(idx[mask]).items():
          batch[k][mask] = v
      batch['mask'] = mask
      yield _to_global(batch, sharding)

  return batches()
