"""Measures grain read throughput (examples/s) of the training iterator on a prepared dataset.

Usage: python -m ait_jax.data.benchmark --dataset=triangle --data_dir=DIR [--batch=256 --workers=0]
"""
import time

from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ait_jax import cli
from ait_jax.data import input_pipeline



def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  flags.DEFINE_string('dataset', None, 'Dataset name.', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'Where the dataset was prepared.', flag_values=fv)
  flags.DEFINE_integer('batch', 256, 'Global batch size.', lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('steps', 100, 'Batches to time, after 5 warm-up batches.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('workers', 0, 'Decoding threads (0 decodes in the prefetch thread).',
                       lower_bound=0, flag_values=fv)


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


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'dataset', hint=f'NAME (one of {", ".join(sorted(input_pipeline.DATASETS))})')
  cli.require(fv, 'data_dir', hint='DIR (where the dataset was prepared)')
  rate = throughput(fv.dataset, fv.data_dir, fv.batch, fv.steps, fv.workers)
  print(f'{fv.dataset}: {rate:,.0f} examples/s (batch {fv.batch}, '
        f'workers {fv.workers}, {jax.device_count()} {jax.default_backend()} device(s))')


if __name__ == '__main__':
  cli.run(define_flags, main)
