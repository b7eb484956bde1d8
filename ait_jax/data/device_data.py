"""Device-resident training data (`config.device_data`): a split small enough for accelerator
memory is read once, and each step gathers its batch on device from a few int32 indices.

For tiny steps (Triangle's 4 tokens, Sort-of-CLEVR's batch 64) a step costs microseconds of
arithmetic; reading, stacking and transferring its batch costs more. Here the host only computes
which examples come next, in exactly the order `TrainBatches` reads them (the same grain recipe,
`input_pipeline.train_keys`), so both yield identical batches for a seed and their saved positions
are interchangeable: a checkpoint written with one resumes with the other.

Layout: each process keeps its own record shard (the keys `TrainBatches` gives it), replicated on
every one of its devices as row d of a [data-shards, examples, ...] array sharded over 'data'.
Every device then gathers its rows of a batch from its own copy, with no communication; a layout
that split a process's examples over its devices would need an all-to-all per step, since a batch
row may come from any example. The cost is memory: a process's shard on each of its devices
(Triangle's whole train split is 205 MB, Sort-of-CLEVR's 165 MB).
"""
from concurrent import futures
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ait_jax import errors
from ait_jax import sharding as sharding_lib
from ait_jax.data import input_pipeline
from ait_jax.data import triangle

# A split larger than this per device stays on the host: device memory belongs to the model.
MAX_BYTES = 8 * 2 ** 30

# Per-example columns gathered into a training batch; 'images' is indexed through 'image_row'.
_PER_EXAMPLE = ('label', 'question', 'qtype', 'qsubtype')


def _padded(x: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` with zeros: processes' shards differ by one example at most, and a
  global array needs one shape. Padding rows are never indexed."""
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) if len(x) < size else x


def _shard_sizes(source, shard_count: int) -> tuple[int, int]:
  """The largest (examples, images) of any process's shard, computed alike on every process."""
  keys = np.arange(len(source))
  examples = -(-len(source) // shard_count)
  index = getattr(source, '_index', None)
  if index is None:
    return examples, examples
  per_image = input_pipeline._Q  # pylint: disable=protected-access
  images = max(len(np.unique(index[keys[p::shard_count]] // per_image))
               for p in range(shard_count))
  return examples, images


class DeviceData:
  """One split of `source` on the devices of `mesh`, and the on-device gather of a batch."""

  def __init__(self, source: input_pipeline.ExampleSource, mesh, *, shard_index: int | None = None,
               shard_count: int | None = None):
    self.shard_index = jax.process_index() if shard_index is None else shard_index
    self.shard_count = jax.process_count() if shard_count is None else shard_count
    self.mesh = mesh
    keys = np.arange(len(source))[self.shard_index::self.shard_count]
    examples, images = _shard_sizes(source, self.shard_count)
    size = images * int(np.prod(source.info.image_shape))
    if size > MAX_BYTES:
      raise errors.ConfigError(
          f'device_data=True would put {size / 2 ** 30:.1f} GiB of {source.info.name} '
          f'images on every device (at most {MAX_BYTES / 2 ** 30:.0f} GiB); set '
          'device_data=False for this dataset.')
    columns = source.columns(keys)
    self.sharding = NamedSharding(mesh, P(sharding_lib.DATA))
    rows = mesh.shape[sharding_lib.DATA]
    self.arrays = {}
    for name, column in columns.items():
      column = _padded(column, images if name == 'images' else examples)
      # Every device of this process holds the same copy: its row of the global array.
      self.arrays[name] = jax.make_array_from_callback(
          (rows,) + column.shape, self.sharding, lambda _, c=column: c[None])
    self.nbytes = sum(c.nbytes for c in columns.values())

  def shardings(self):
    return {k: self.sharding for k in self.arrays}

  def index_sharding(self) -> NamedSharding:
    """[K, B] step-by-batch indices: the batch axis over 'data', like a batch."""
    return NamedSharding(self.mesh, P(None, sharding_lib.DATA))


def gather(arrays: dict[str, jax.Array], indices: jax.Array) -> dict[str, jax.Array]:
  """The batch at `indices` ([B] positions in each process's shard, sharded over 'data') from
  the `DeviceData.arrays`: key 'image' uint8 as stored, 'label' [+ 'question'] as `TrainBatches`.
  For `FreshTriangle`, `indices` are the codes of fresh triangles, drawn here.

  Row d of the arrays serves the d-th block of B / rows batch rows, the block that device holds.
  """
  if FRESH_SEED in arrays:
    rows = arrays[FRESH_SEED].shape[0]
    draw = lambda seed, codes: {k: v for k, v in triangle.fresh(seed, codes).items()
                                if k in ('image', 'label')}
    batch = jax.vmap(draw)(arrays[FRESH_SEED], indices.reshape(rows, -1))
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
  rows = arrays['label'].shape[0]
  blocks = indices.reshape(rows, -1)

  def one(shard, idx):
    batch = {'image': shard['images'][shard['image_row'][idx]]}
    batch.update({k: shard[k][idx] for k in _PER_EXAMPLE if k in shard})
    return batch

  batch = jax.vmap(one)(arrays, blocks)
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)


class DeviceBatches:
  """The positions of the next training batches, in `TrainBatches`' order, as device indices.

  `next_indices(k)` gives the [k, global batch] int32 indices of the next k batches. Its state is
  `TrainBatches`' state format ({'grain': {'next_index': batches taken}, 'fingerprint'}), so the
  checkpointed position restores either of them.
  """

  def __init__(self, source: input_pipeline.ExampleSource, data: DeviceData, *,
               local_batch_size: int, seed: int):
    self._data = data
    self._keys = input_pipeline.train_keys(len(source), seed, data.shard_index, data.shard_count)
    self._per_epoch = len(range(data.shard_index, len(source), data.shard_count))
    self._batch = local_batch_size
    self._next = 0
    self._epochs: dict[int, Any] = {}
    self._pool = futures.ThreadPoolExecutor(1)  # the next epoch's order is computed ahead
    self._fingerprint = input_pipeline.train_fingerprint(source, seed, data.shard_count,
                                                         local_batch_size)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """This process's shard positions in `epoch`'s order (grain's per-element shuffle is a few
    µs per key: an epoch is computed once, and the following one in the background)."""
    for e in (epoch, epoch + 1):
      if e not in self._epochs:
        self._epochs[e] = self._pool.submit(self._compute_epoch, e)
    for e in [e for e in self._epochs if e < epoch]:
      del self._epochs[e]
    return self._epochs[epoch].result()

  def _compute_epoch(self, epoch: int) -> np.ndarray:
    start = epoch * self._per_epoch
    keys = np.fromiter((self._keys[j] for j in range(start, start + self._per_epoch)), np.int64,
                       self._per_epoch)
    return (keys // self._data.shard_count).astype(np.int32)  # key = shard_index + count·position

  def local_indices(self, k: int) -> np.ndarray:
    """[k, local batch] positions of this process's next k batches; advances the position."""
    first, last = self._next * self._batch, (self._next + k) * self._batch
    epochs = range(first // self._per_epoch, (last - 1) // self._per_epoch + 1)
    order = np.concatenate([self._epoch_order(e) for e in epochs])
    offset = epochs[0] * self._per_epoch
    self._next += k
    return order[first - offset:last - offset].reshape(k, self._batch)

  def next_indices(self, k: int) -> jax.Array:
    return jax.make_array_from_process_local_data(self._data.index_sharding(),
                                                  self.local_indices(k))

  def get_state(self) -> dict[str, Any]:
    return {'grain': {'next_index': self._next}, 'fingerprint': self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next = int(input_pipeline.saved_position(state, self._fingerprint,
                                                   'next_index')['next_index'])

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


FRESH_SEED = 'fresh_triangle_seed'  # the key of FreshTriangle's one array


class FreshTriangle:
  """Triangle's training images drawn afresh on the devices inside the step (docs/data.md#fresh):
  what `DeviceData` is for a stored split, without a split. Its one array is the seed, one copy
  per data row; `gather` draws each row's block of the batch from its codes."""

  def __init__(self, mesh, seed: int, *, shard_index: int | None = None,
               shard_count: int | None = None):
    self.shard_index = jax.process_index() if shard_index is None else shard_index
    self.shard_count = jax.process_count() if shard_count is None else shard_count
    self.mesh = mesh
    self.sharding = NamedSharding(mesh, P(sharding_lib.DATA))
    rows = mesh.shape[sharding_lib.DATA]
    self.arrays = {FRESH_SEED: jax.make_array_from_callback(
        (rows,), self.sharding, lambda index: np.full(len(range(rows)[index[0]]), seed, np.int32))}
    self.nbytes = 0

  shardings = DeviceData.shardings
  index_sharding = DeviceData.index_sharding


class FreshBatches(DeviceBatches):
  """The codes of the next fresh training triangles, `DeviceBatches`' positions and state.

  Epoch e of this process is its shard's indices i (shard_index + shard_count·j, in order: fresh
  images need no shuffle) as codes e·N + i, N the stored split's size, so the step count per epoch
  and the schedule are those of the stored split. A resumed run restores the position and draws
  the same codes, so the same images.
  """

  def __init__(self, source, data: FreshTriangle, *, local_batch_size: int, seed: int):
    self._data = data
    self._examples = len(source)
    self._per_epoch = len(range(data.shard_index, self._examples, data.shard_count))
    self._batch = local_batch_size
    self._next = 0
    self._epochs: dict[int, Any] = {}
    self._pool = futures.ThreadPoolExecutor(1)
    self._fingerprint = 'fresh ' + input_pipeline.train_fingerprint(
        source, seed, data.shard_count, local_batch_size)

  def _compute_epoch(self, epoch: int) -> np.ndarray:
    index = self._data.shard_index + self._data.shard_count * np.arange(self._per_epoch)
    return triangle.fresh_code(epoch, index, self._examples)


def make_device_batches(name: str, mesh, *, data_dir: str | None, global_batch_size: int,
                        seed: int, question_types=None, start_state=None, fresh: bool = False
                        ) -> tuple[DeviceData | FreshTriangle, DeviceBatches]:
  """The train split of `name` on the devices of `mesh` and the order of its batches, the same
  as `input_pipeline.make_train_iterator` gives for these arguments; with `fresh` (Triangle
  only), fresh triangles drawn on the devices instead of the stored split."""
  info = input_pipeline.datasets.get_info(name, question_types)
  local = input_pipeline._local_batch_size(global_batch_size)  # pylint: disable=protected-access
  if fresh:
    if info.name.partition('/')[0] != 'triangle':
      raise errors.ConfigError(f'fresh_train_data=True draws Triangle images; {info.name} has '
                               'only its stored split: set fresh_train_data=False.')
    source = input_pipeline.ExampleSource(info, info.train_split, data_dir)
    data = FreshTriangle(mesh, seed)
    batches = FreshBatches(source, data, local_batch_size=local, seed=seed)
    if start_state is not None:
      batches.set_state(start_state)
    return data, batches
  source = input_pipeline.ExampleSource(info, info.train_split, data_dir, question_types)
  data = DeviceData(source, mesh)
  batches = DeviceBatches(source, data, local_batch_size=local, seed=seed)
  if start_state is not None:
    batches.set_state(start_state)
  return data, batches
