"""Measures read throughput (examples/s) on a prepared dataset: the training pipeline, or the
host-side record decoding alone (the project's batched parse against TFDS's generic decoding).

Usage: python -m ait_jax.data.benchmark --dataset=triangle --data_dir=DIR [--batch=256 --threads=1]
       python -m ait_jax.data.benchmark ... --reader=parse|tfds   # host decoding only
"""
import time

import numpy as np

from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ait_jax import cli
from ait_jax.data import datasets
from ait_jax.data import input_pipeline


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  flags.DEFINE_string('dataset', None, 'Dataset name.', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'Where the dataset was prepared.', flag_values=fv)
  flags.DEFINE_integer('batch', 256, 'Global batch size.', lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('steps', 100, 'Batches to time, after 5 warm-up batches.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('threads', 1, 'grain threads reading batches (config.read_threads).',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_enum('reader', 'pipeline', ['pipeline', 'parse', 'tfds'],
                    'pipeline: the training iterator, global jax.Arrays, prefetch included; '
                    'parse: ExampleSource.read alone (one batched ArrayRecord read, direct '
                    "parse); tfds: TFDS's per-example decoding of the same records.",
                    flag_values=fv)


def throughput(name: str, data_dir: str, batch: int, steps: int, threads: int = 1,
               reader: str = 'pipeline') -> float:
  """Examples per second of `reader` over `steps` batches, after 5 warm-up batches."""
  if reader == 'pipeline':
    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ('data',)), P('data'))
    it = input_pipeline.make_train_iterator(name, data_dir=data_dir, global_batch_size=batch,
                                            seed=0, sharding=sharding, threads=threads)
    read = lambda _: jax.block_until_ready(next(it))
  else:
    info = datasets.get_info(name)
    source = input_pipeline.ExampleSource(info, info.train_split, data_dir)
    order = np.random.default_rng(0).permutation(len(source))
    keys = lambda b: order[(b * batch) % len(order):][:batch]
    if reader == 'parse':
      read = lambda b: source.read(keys(b))
    else:
      decoded = input_pipeline.open_tfds(info, info.train_split, data_dir)
      # One decoded record per example, as the parse reader parses one (Sort-of-CLEVR's examples
      # are (image, question) pairs of fewer records).
      read = lambda b: [decoded[int(i) % len(decoded)] for i in keys(b)]
  for b in range(5):
    read(b)
  start = time.perf_counter()
  for b in range(5, 5 + steps):
    read(b)
  return steps * batch / (time.perf_counter() - start)


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'dataset', hint=f'NAME (one of {", ".join(sorted(datasets.DATASETS))})')
  cli.require(fv, 'data_dir', hint='DIR (where the dataset was prepared)')
  rate = throughput(fv.dataset, fv.data_dir, fv.batch, fv.steps, fv.threads, fv.reader)
  print(f'{fv.dataset}: {rate:,.0f} examples/s ({fv.reader}, batch {fv.batch}, '
        f'threads {fv.threads}, {jax.device_count()} {jax.default_backend()} device(s))')


if __name__ == '__main__':
  cli.run(define_flags, main)
