"""Prepares a dataset as ArrayRecord in --data_dir: the one step that downloads or generates data,
which a training run also takes first for a dataset of ours that its data_dir lacks.

Usage: python -m ait_jax.data.prepare --dataset=cifar100 --data_dir=DIR
Triangle and Sort-of-CLEVR (optionally with a config such as triangle/small) are generated.
CIFAR-10, CIFAR-100 and Oxford-IIIT Pet are built from their published archives, downloaded and
checksummed, or put by hand into DIR/downloads/manual/. ImageNet-100 is built by the TFDS catalog
(with TensorFlow, `pip install -e .[prepare]`) from archives the user downloads by hand; prepare
also writes its class-subset index. Every build is written into a temporary folder of DIR and
renamed into place once whole, and an existing dataset is read back before it counts as prepared.
SIGINT and SIGTERM end it in one line with nothing half-written left (`prepare` exits 128 + the
signal's number, 130 or 143; a training run that was preparing its data exits 75, as for any stop
by a signal), and a full disk is one line naming the folder and about how much it needs.
"""
import contextlib
import importlib.util
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time

from absl import flags
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from ait_jax import cli
from ait_jax import errors
from ait_jax import paths
from ait_jax.data import builders
from ait_jax.data import datasets
from ait_jax.data import downloads
from ait_jax.data import input_pipeline
from ait_jax.data import integrity

_SCRATCH_PREFIX = '.incomplete.'


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  flags.DEFINE_string('dataset', None, f'One of {sorted(datasets.DATASETS)}.',
                      flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'Where TFDS writes the dataset.', flag_values=fv)


def check_data_dir(data_dir: str) -> None:
  """An empty or blank data_dir, one that is, or lies inside, a file, and a bucket that cannot be
  read are refused before anything is written."""
  input_pipeline.require_data_dir(data_dir)
  if data_dir and not data_dir.strip():  # `--data_dir=" "`: a folder named by spaces, here
    raise errors.InputError(
        f'The data_dir {data_dir!r} is blank (only spaces); pass the folder that holds the '
        'datasets (it is created if missing).')
  if '://' in data_dir:
    if data_dir.startswith('gs://') and not any(importlib.util.find_spec(m)
                                                for m in ('gcsfs', 'tensorflow')):
      raise errors.InputError(
          f'The data_dir {data_dir} is on Google Cloud Storage, which needs gcsfs: '
          'pip install -c constraints.txt -e .[gcs] (or pip install gcsfs), or use a local folder.')
    return
  existing = paths.nearest_existing(data_dir)
  if not os.path.isdir(existing):
    where = 'a file' if existing == os.path.abspath(data_dir) else f'inside the file {existing}'
    raise errors.InputError(f'--data_dir={data_dir} is {where}; pass a folder (it is created if '
                            'missing).')


def dataset_dir(info: datasets.DatasetInfo, data_dir: str) -> epath.Path:
  """The folder TFDS keeps `info`'s dataset in: <data_dir>/<name>[/<config>]/<version>."""
  base, _, config = info.tfds_name.partition('/')
  cls = builders.BUILDERS.get(base) or tfds.builder_cls(base)
  if cls.BUILDER_CONFIGS and not config:
    config = cls.BUILDER_CONFIGS[0].name
  return epath.Path(data_dir).joinpath(base, *([config] if config else []), str(cls.VERSION))


def _say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


class Stopped(SystemExit):
  """SIGINT or SIGTERM arrived while a dataset was prepared. Raised where the process was, so the
  `finally`s on the way out remove what the attempt wrote; a SystemExit, so that no `except
  Exception` on the way (ours or TFDS's) holds it up, with 128 + the signal's number (130, 143)
  as its code, the status a shell gives a command stopped by that signal."""

  def __init__(self, signum: int, name: str, data_dir: str):
    super().__init__(128 + signum)
    self.signal_name = signal.Signals(signum).name
    self.name, self.data_dir = name, data_dir

  def line(self, code: int, then: str) -> str:
    return (f'{self.signal_name}: stopped preparing {self.name}; nothing half-written was kept '
            f'in {self.data_dir}; {then} (exit status {code}).')


@contextlib.contextmanager
def _stopped_by_signals(name: str, data_dir: str):
  """Turns SIGINT and SIGTERM into Stopped while the block runs (only the main thread can
  receive signals; elsewhere nothing changes). SIGTERM's default would end the process at once,
  leaving the temporary folder; Ctrl-C's KeyboardInterrupt would end in a traceback. A second
  signal raises again: it may cut the clean-up short, and the next attempt removes the rest."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del frame
    raise Stopped(signum, name, data_dir)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, handler_before in previous.items():
      signal.signal(s, handler_before)


def _dataset_key(info: datasets.DatasetInfo) -> str:
  """'cifar10', 'triangle/full': the name with its builder config, as builders.DATASET_BYTES
  keys it."""
  base, _, config = info.tfds_name.partition('/')
  cls = builders.BUILDERS.get(base)
  if cls is not None and cls.BUILDER_CONFIGS and not config:
    config = cls.BUILDER_CONFIGS[0].name
  return f'{base}/{config}' if config else base


def _space_needed(info: datasets.DatasetInfo, data_dir: str) -> int | None:
  """About how many bytes preparing `info` still needs in data_dir: its dataset, and the
  archives not there yet; None where the dataset's size is not known (the catalog's ImageNet)."""
  size = builders.DATASET_BYTES.get(_dataset_key(info))
  if size is None:
    return None
  base = info.tfds_name.partition('/')[0]
  for archive in getattr(builders.BUILDERS.get(base), 'ARCHIVES', ()):
    if not any((folder / archive).exists() for folder in (downloads.manual_dir(data_dir),
                                                          downloads.downloads_dir(data_dir))):
      size += downloads.ARCHIVES[archive].size
  return size


def prepare(name: str, data_dir: str, read_all: bool = True) -> tuple[str, bool]:
  """Makes `name` prepared in data_dir; returns (its folder, whether it was built now).

  A folder already there counts only when whole: its dataset_info.json, shard files and record
  counts, and with read_all every record read back. One of ours that is not whole is rebuilt
  with a line saying so; a catalog dataset (ImageNet) is refused with the folder to delete.
  """
  info = datasets.get_info(name)
  check_data_dir(data_dir)
  with _stopped_by_signals(name, data_dir):
    try:
      return _prepare(info, name, data_dir, read_all)
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless the disk is full)
      # TFDS's writer reports a full disk as a RuntimeError quoting the write's error, other
      # writes as a bare OSError without a path: either way, name the folder and the need.
      if not downloads.is_disk_full(e):
        raise
      raise downloads.DiskFullError(data_dir, f'preparing {name}',
                                    _space_needed(info, data_dir)) from None


def _prepare(info: datasets.DatasetInfo, name: str, data_dir: str,
             read_all: bool) -> tuple[str, bool]:
  path = dataset_dir(info, data_dir)
  base, _, config = info.tfds_name.partition('/')
  ours = base in builders.BUILDERS
  if path.exists():
    problem = integrity.problem(path, read_all=read_all)
    if problem is None:
      _index_subset(info, data_dir)
      return str(path), False
    if not ours:
      raise errors.UserError(f'{path} {problem}, so {name} is incomplete or damaged; delete that '
                             f'folder and run `{input_pipeline.prepare_command(name, data_dir)}` '
                             'again.')
    if '://' in data_dir:  # refused below: a bucket is prepared by copying
      _say(f'{name} in {path} is incomplete or damaged (the folder {problem}).')
    else:  # set aside, not deleted: the line says where
      aside = downloads.set_aside(pathlib.Path(path), data_dir,
                                  '_'.join(pathlib.Path(path).relative_to(data_dir).parts))
      _say(f'{name} in {path} is incomplete or damaged (the folder {problem}): moved to '
           f'{aside}, rebuilding it.')
  if '://' in data_dir:  # a bucket has no atomic rename
    raise errors.UserError(
        f'{name} is not prepared in {data_dir}, and prepare writes only into a '
        f'local folder: run `{input_pipeline.prepare_command(name, "DIR")}` with '
        f'a local DIR, then copy DIR/{base} to {data_dir}/{base} (gcloud storage '
        'rsync -r).')
  if not ours:
    _check_catalog_needs(info, name, data_dir)
  path = pathlib.Path(path)
  with _scratch(data_dir, name) as scratch:
    if ours:
      archives = {a: str(downloads.fetch(a, data_dir, scratch))
                  for a in getattr(builders.BUILDERS[base], 'ARCHIVES', ())}
      if not path.exists():
        source = (f'building it from {" and ".join(archives)}' if archives else
                  'generating it (nothing to download)')
        _say(f'{name} is not prepared in {data_dir}; {source}.')
      built = builders.build(base, str(scratch), config or None, archives)
    else:
      builder = tfds.builder(info.tfds_name, data_dir=str(scratch), file_format='array_record')
      builder.download_and_prepare(download_dir=str(downloads.downloads_dir(data_dir)))
      built = str(builder.data_dir)
    _move_into_place(pathlib.Path(built), path, scratch, pathlib.Path(data_dir, base))
  problem = integrity.problem(path)
  if problem is not None:  # a whole build was just written: a bug, not the user's doing
    raise RuntimeError(f'{path} {problem} right after it was built')
  _index_subset(info, data_dir)
  return str(path), True


def _check_catalog_needs(info: datasets.DatasetInfo, name: str, data_dir: str) -> None:
  """ImageNet: the archives downloaded by hand, and TensorFlow for TFDS's catalog builder."""
  manual = downloads.manual_dir(data_dir)
  missing = [f for f in info.manual_download if not (manual / f).exists()]
  if missing:
    raise errors.UserError(
        f'{name!r} cannot be downloaded automatically: put {" and ".join(missing)} '
        f'(ImageNet: from image-net.org, after registering) into '
        f'{downloads.manual_folder_named(data_dir)} and run this command again.')
  # The TFDS catalog builders serialise through TensorFlow and probe importlib_resources.
  missing = [m for m in ('tensorflow', 'importlib_resources')
             if importlib.util.find_spec(m) is None]
  if missing:
    raise errors.UserError(f'Preparing {name!r} needs {" and ".join(missing)}; install them with '
                           f'`pip install -c constraints.txt -e .[prepare]` and run again.')


def _index_subset(info: datasets.DatasetInfo, data_dir: str) -> None:
  if info.tfds_classes:  # index the class subset now, so that training starts at once
    for split in (info.train_split, info.test_split):
      input_pipeline.ExampleSource(info, split, data_dir)


@contextlib.contextmanager
def _scratch(data_dir: str, name: str):
  """A temporary folder inside data_dir (the same filesystem, so the final rename is atomic),
  removed on exit with every folder this build created that is left empty: a failed or
  interrupted build leaves nothing that looks prepared. Remains of a build of the same dataset
  killed on this host (its process gone) are removed first."""
  root = pathlib.Path(data_dir)
  created = [p for p in (root, *root.parents, downloads.downloads_dir(data_dir))
             if not p.exists()]
  tag = f'{_SCRATCH_PREFIX}{name.replace("/", "_")}.{socket.gethostname()}.'
  for stale in root.glob(f'{tag}*') if root.exists() else ():
    if not _alive(stale.name[len(tag):]):
      shutil.rmtree(stale, ignore_errors=True)
  scratch = root / f'{tag}{os.getpid()}'
  scratch.mkdir(parents=True)
  try:
    yield scratch
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
      with contextlib.suppress(OSError):  # not empty: something else lives there
        folder.rmdir()


def _alive(pid: str) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True
  return int(pid) != os.getpid()


def _move_into_place(built: pathlib.Path, path: pathlib.Path, scratch: pathlib.Path,
                     dataset_root: pathlib.Path) -> None:
  """Renames the built version folder to `path`. One there now was built meanwhile by another
  process (a damaged one was set aside before the build): the same bytes, so it goes into scratch,
  to be removed with it. TFDS's default-config file comes along if the data_dir lacks it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.exists():
    os.rename(path, scratch / 'replaced')
  os.rename(built, path)
  config_file = pathlib.Path(scratch, dataset_root.name, '.config')
  if config_file.is_dir() and not (dataset_root / '.config').exists():
    shutil.copytree(config_file, dataset_root / '.config')


def ensure_prepared(info: datasets.DatasetInfo, data_dir: str) -> None:
  """Prepares a dataset of ours (generated, or built from its published archives) that data_dir
  lacks or holds incomplete, so that training is one command; ImageNet, built by hand with
  `prepare`, is left to the input pipeline's message.

  Process 0 prepares while the others wait; if it fails, they all stop. Then any process that
  still lacks the dataset (a data_dir on a host-local disk) builds its own byte-identical copy.
  """
  check_data_dir(data_dir)
  if info.tfds_name.partition('/')[0] not in builders.BUILDERS:
    return
  try:
    with _stopped_by_signals(info.name, data_dir):
      _ensure_prepared(info, data_dir)
  except Stopped as e:
    from ait_jax import checkpointing  # pylint: disable=g-import-not-at-top
    # The status of any run stopped by a signal: a job script requeues on it, and the rerun
    # resumes (downloaded archives are kept).
    _say(e.line(checkpointing.EXIT_PREEMPTED, 'rerun the same command to resume'))
    raise SystemExit(checkpointing.EXIT_PREEMPTED) from None


def _ensure_prepared(info: datasets.DatasetInfo, data_dir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top  (the command itself needs no JAX)

  def whole() -> bool:
    return integrity.problem(dataset_dir(info, data_dir)) is None

  def build():
    start = time.time()
    path, _ = prepare(info.name, data_dir, read_all=False)
    _say(f'Prepared {info.name} in {path} in {time.time() - start:.1f} s.')

  if jax.process_count() == 1:
    if not whole():
      build()
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error = None
  if jax.process_index() == 0 and not whole():
    try:
      build()
    except Exception as e:  # pylint: disable=broad-except  (re-raised once the others know)
      error = e
  failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if failed:
    raise errors.UserError(f'Process 0 could not prepare {info.name} in {data_dir} (its error line '
                           'says why); fix that and run again.')
  if not whole():
    build()


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'dataset', hint=f'NAME (one of {", ".join(sorted(datasets.DATASETS))})')
  cli.require(fv, 'data_dir', hint='DIR (where the dataset is written)')
  start = time.time()
  try:
    path, built = prepare(fv.dataset, fv.data_dir)
  except Stopped as e:
    sys.stdout.flush()
    _say(e.line(e.code, 'the same command prepares it again'))
    raise SystemExit(e.code) from None
  if built:
    print(f'Prepared {fv.dataset} in {path} in {time.time() - start:.1f} s.')
  else:
    print(f'{fv.dataset} is already prepared in {path}: every record read back intact '
          f'({time.time() - start:.1f} s).')


if __name__ == '__main__':
  cli.run(define_flags, main)
