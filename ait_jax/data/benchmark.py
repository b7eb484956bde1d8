"""Measures grain read throughput (examples/s) of the training iterator on a prepared dataset.

Usage: python -m ait_jax.data.benchmark --dataset=triangle --data_dir=DIR [--batch=256 --workers=0]
"""
import time

from absl import app
from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ait_jax.data import input_pipeline

_DATASET = flags.DEFINE_string('dataset', None, 'Dataset name.', required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where the dataset was prepared.', required=True)
_BATCH = flags.DEFINE_integer('batch', 256, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 100, 'Batches to time, after 5 warm-up batches.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Decoding threads (0 decodes in the prefetch thread).')


def throughput(name: str, data_dir: str, batch: int, steps: int, workers: int) -> float:
  """Examples per second delivered as global jax.Arrays, prefetch included."""
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ('data',)), P('data'))
  it = input_pipeline.make_train_iterator(name, data_dir=data_dir, global_batch_size=batch,
                                          seed=0, sharding=sharding, worker_count=workers)
  for _ in range(5):
    jax.block_until_ready(next(it))
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(next(it))
  rate = steps * batch / (time.perf_counter() - start)
  it.close()
  return rate


def main(argv):
  del argv
  rate = throughput(_DATASET.value, _DATA_DIR.value, _BATCH.value, _STEPS.value, _WORKERS.value)
  print(f'{_DATASET.value}: {rate:,.0f} examples/s (batch {_BATCH.value}, '
        f'workers {_WORKERS.value}, {jax.device_count()} {jax.default_backend()} device(s))')


if __name__ == '__main__':
  app.run(main)
