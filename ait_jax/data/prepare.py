"""Prepares a dataset as ArrayRecord in --data_dir, the only step that downloads or generates data.

Usage: python -m ait_jax.data.prepare --dataset=cifar100 --data_dir=DIR
Catalog datasets need TensorFlow (`pip install -e .[prepare]`); generated ones (triangle,
sort_of_clevr, optionally with a config such as triangle/small) do not. ImageNet-100 is built from
ImageNet archives the user downloads by hand (the command says which and where); it also writes the
class-subset index.
"""
import importlib.util
import os
import sys
import time

from absl import flags
import tensorflow_datasets as tfds

from ait_jax import cli
from ait_jax.data import builders
from ait_jax.data import datasets
from ait_jax.data import input_pipeline


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  flags.DEFINE_string('dataset', None, f'One of {sorted(datasets.DATASETS)}.',
                      flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'Where TFDS writes the dataset.', flag_values=fv)


def check_data_dir(data_dir: str) -> None:
  """A data_dir that is, or lies inside, a file is refused before anything is generated."""
  existing = os.path.abspath(data_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = 'a file' if existing == os.path.abspath(data_dir) else f'inside the file {existing}'
    raise ValueError(f'--data_dir={data_dir} is {where}; pass a folder (it is created if '
                     'missing).')


def prepare(name: str, data_dir: str) -> str:
  """Downloads (catalog) or generates (triangle, sort_of_clevr) `name`; returns its directory."""
  info = datasets.get_info(name)
  check_data_dir(data_dir)
  base, _, config = name.partition('/')
  if base in builders.GENERATED:
    return builders.prepare_generated(base, data_dir, config or 'full')
  builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format='array_record')
  manual_dir = os.path.join(data_dir, 'downloads', 'manual')
  missing = [f for f in info.manual_download if not os.path.exists(os.path.join(manual_dir, f))]
  if missing and not os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    raise cli.UserError(f'{name!r} cannot be downloaded automatically: put {" and ".join(missing)} '
                       f'(ImageNet: from image-net.org, after registering) in {manual_dir} and run '
                       'this command again.')
  # The TFDS catalog builders serialise through TensorFlow and probe importlib_resources.
  missing = [m for m in ('tensorflow', 'importlib_resources') if importlib.util.find_spec(m) is None]
  if missing:
    raise cli.UserError(f'Preparing {name!r} needs {" and ".join(missing)}; install them with '
                       f'`pip install -e .[prepare] importlib_resources` and run again.')
  builder.download_and_prepare()
  if info.tfds_classes:  # index the class subset now, so that training starts at once
    for split in (info.train_split, info.test_split):
      input_pipeline.ExampleSource(info, split, data_dir)
  return str(builder.data_dir)


def ensure_prepared(info: datasets.DatasetInfo, data_dir: str) -> None:
  """Builds a generated dataset (Triangle, Sort-of-CLEVR) that data_dir lacks, so training is one
  command; catalog datasets need a download, so their absence stays an error (run prepare).

  Process 0 builds while the others wait, then any process that still lacks it (a data_dir on a
  host-local disk) builds its own byte-identical copy.
  """
  if not info.generated or _is_prepared(info, data_dir):
    return
  import jax  # pylint: disable=g-import-not-at-top  (the command itself needs no JAX)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def build():
    check_data_dir(data_dir)
    print(f'{info.name} is not prepared in {data_dir}; generating it now (no download, '
          'under 30 s on 2 CPU cores)...', file=sys.stderr, flush=True)
    start = time.time()
    path = prepare(info.name, data_dir)
    print(f'Prepared {info.name} in {path} in {time.time() - start:.1f} s.', file=sys.stderr,
          flush=True)

  if jax.process_index() == 0:
    build()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'prepare {info.name}')
    if not _is_prepared(info, data_dir):
      build()


def _is_prepared(info: datasets.DatasetInfo, data_dir: str) -> bool:
  try:
    input_pipeline.open_tfds(info, info.train_split, data_dir)
  except FileNotFoundError:
    return False
  return True


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'dataset', hint=f'NAME (one of {", ".join(sorted(datasets.DATASETS))})')
  cli.require(fv, 'data_dir', hint='DIR (where the dataset is written)')
  start = time.time()
  path = prepare(fv.dataset, fv.data_dir)
  print(f'Prepared {fv.dataset} in {path} in {time.time() - start:.1f} s.')


if __name__ == '__main__':
  cli.run(define_flags, main)
