"""The published archives that `prepare` fetches (`ARCHIVES`: address, size, SHA-256) and the one
routine that fetches them: checksummed, with a progress bar, failing fast in one sentence.

An archive put by hand into <data_dir>/downloads/manual/ is used as it is (once its checksum
matches), so a machine without internet prepares from archives copied onto it. A download never
writes more than the published size, and one that stalls (STALL_BYTES in STALL_S) ends.
"""
import dataclasses
import errno
import hashlib
import http.client
import os
import pathlib
import shutil
import sys
import time
import urllib.error
import urllib.request

import tqdm

from ait_jax import errors


@dataclasses.dataclass(frozen=True)
class Archive:
  url: str
  size: int  # bytes
  sha256: str


# The addresses and checksums of the TFDS catalog (tensorflow_datasets/url_checksums/cifar10.txt,
# cifar100.txt and datasets/oxford_iiit_pet/checksums.tsv). Keyed by the file name a user puts
# into downloads/manual/; tests point the entries at a loopback server.
ARCHIVES = {
    'cifar-10-binary.tar.gz': Archive(
        'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz', 170_052_171,
        'c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd'),
    'cifar-100-binary.tar.gz': Archive(
        'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz', 168_513_733,
        '58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec'),
    'images.tar.gz': Archive(
        'https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz', 791_918_971,
        '67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d'),
    'annotations.tar.gz': Archive(
        'https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz', 19_173_078,
        '52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91'),
}
# Seconds to wait for a connection and then for each read. One try, no retry: a machine without
# internet learns it at once (TFDS's downloader retried for minutes), and a silent server
# within this time.
TIMEOUT_S = 20
# The stall rule (docs/data.md): a download that brings fewer than STALL_BYTES in a period of
# STALL_S seconds ends. The read timeout alone never fires on a trickle (each byte restarts it),
# so the periods are counted here: a period is judged when a read returns after its end, so a
# stalled download ends within STALL_S + TIMEOUT_S seconds of the period's start. 256 KiB a
# minute (4 KiB/s) would take half a day for a CIFAR archive: past that, copy it by hand.
STALL_S = 60
STALL_BYTES = 256 * 1024
_CHUNK = 1 << 20


class DownloadError(errors.UserError):
  """An archive that cannot be fetched or is not the published one; the sentence says what to do."""


def manual_dir(data_dir: str) -> pathlib.Path:
  """Where a user puts archives by hand (TFDS's manual-download folder)."""
  return pathlib.Path(data_dir) / 'downloads' / 'manual'


def downloads_dir(data_dir: str) -> pathlib.Path:
  """Where downloaded archives are kept, so that a rebuild needs no network."""
  return pathlib.Path(data_dir) / 'downloads'


# Where a damaged dataset folder or kept archive goes (<data_dir>/damaged/<name>_<unix time>):
# prepare replaces them, and deletes nothing it finds.
DAMAGED_DIR = 'damaged'


def set_aside(path: pathlib.Path, data_dir: str, label: str) -> pathlib.Path:
  """Moves a damaged file or folder of data_dir to <data_dir>/damaged/<label>_<unix time> (a
  rename: the same disk, no copy); returns where it went."""
  folder = pathlib.Path(data_dir) / DAMAGED_DIR
  folder.mkdir(parents=True, exist_ok=True)
  stamp, n = int(time.time()), 0
  target = folder / f'{label}_{stamp}'
  while target.exists():  # two in one second
    n += 1
    target = folder / f'{label}_{stamp}_{n}'
  os.rename(path, target)
  return target


def manual_folder_named(data_dir: str) -> str:
  """downloads/manual/ of data_dir, created (empty) so that a line that asks the user to copy an
  archive into it can be followed as written; if it cannot be created, the line says to."""
  folder = manual_dir(data_dir)
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:
    return f'{folder}/ (create that folder)'
  return f'{folder}/'


def _offline_hint(name: str, data_dir: str) -> str:
  return (f'to prepare without internet, put {name} (from that address) into '
          f'{manual_folder_named(data_dir)} and run the command again')


def size_text(size: float) -> str:
  """A size in the largest binary unit that keeps it at least 1 ('162 MiB', '361 KiB')."""
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if size >= scale:
      return f'{size / scale:.{1 if size < 10 * scale else 0}f} {unit}'
  return f'{size:.0f} bytes'


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what it wraps) is a full disk or an exceeded quota: an OSError with that
  errno, or a library's error that quotes one (TFDS's writer: 'write() failed: No space left on
  device')."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(text in str(error) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
      return True
    error = error.__cause__ or error.__context__
  return False


def free_bytes(folder: pathlib.Path | str) -> int | None:
  """Free bytes on the disk of folder (or of its nearest existing parent); None if unknown."""
  folder = pathlib.Path(folder).absolute()
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  try:
    return shutil.disk_usage(folder).free
  except OSError:
    return None


class DiskFullError(errors.UserError):
  """The disk of the data_dir is full (or would be): the sentence names the folder, about how
  much it needs, and how much is free when it is read (after the attempt's files are gone)."""

  def __init__(self, folder, what: str, need: int | None):
    super().__init__(folder, what, need)
    self.folder, self.what, self.need = folder, what, need

  def __str__(self) -> str:
    free = free_bytes(self.folder)
    need = (f'needs about {size_text(self.need)} free there' if self.need else
            'needs more space there')
    free = '' if free is None else f' ({size_text(free)} free now)'
    return (f'Not enough space on the disk of {self.folder}: {self.what} {need}{free}; nothing '
            'half-written was kept. Free some space (or pass another data_dir) and run the '
            'command again.')


def fetch(name: str, data_dir: str, scratch: pathlib.Path) -> pathlib.Path:
  """The verified archive `name`: the one in downloads/manual/, else one downloaded before, else
  downloaded now into `scratch` (a folder that is removed if anything fails) and then kept in
  downloads/. Raises DownloadError with one sentence; nothing partial stays behind."""
  archive = ARCHIVES[name]
  manual = manual_dir(data_dir) / name
  if manual.exists():
    problem = _problem(manual, archive)
    if problem:
      raise DownloadError(f'{manual} {problem}, so it is not the published {name}; replace it '
                          f'with the file from {archive.url} and run the command again.')
    return manual
  kept = downloads_dir(data_dir) / name
  if kept.exists():
    problem = _problem(kept, archive)
    if problem is None:
      return kept
    aside = set_aside(kept, data_dir, name)
    print(f'{kept} {problem}: moved to {aside}, downloading it again.', file=sys.stderr,
          flush=True)
  part = scratch / name
  free = free_bytes(scratch)
  if free is not None and free < archive.size:
    raise DiskFullError(data_dir, f'downloading {name}', archive.size)
  try:
    _download(archive, part, name, data_dir)
    problem = _problem(part, archive)
    if problem:
      raise DownloadError(f'The file downloaded from {archive.url} {problem} (it was deleted); '
                          f'run the command again, or {_offline_hint(name, data_dir)}.')
    kept.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, kept)
  finally:
    part.unlink(missing_ok=True)
  return kept


def _download(archive: Archive, part: pathlib.Path, name: str, data_dir: str) -> None:
  """Writes the body at archive.url into part: at most archive.size bytes, within the stall rule
  (STALL_BYTES per STALL_S) and TIMEOUT_S per read; anything else is one DownloadError."""
  request = urllib.request.Request(archive.url, headers={'User-Agent': 'ait_jax'})
  try:
    response = urllib.request.urlopen(  # pylint: disable=consider-using-with
        request, timeout=TIMEOUT_S)
  except urllib.error.HTTPError as e:
    raise DownloadError(f'Cannot download {archive.url} (the server answered HTTP {e.code} '
                        f'{e.reason}); {_offline_hint(name, data_dir)}.') from None
  except (OSError, http.client.HTTPException, ValueError) as e:
    raise DownloadError(f'Cannot download {archive.url} ({_reason(e)}); '
                        f'{_offline_hint(name, data_dir)}.') from None
  with response:
    announced = response.headers.get('Content-Length')
    if announced and announced.isdigit() and int(announced) != archive.size:
      raise DownloadError(f'Cannot download {archive.url} (the server announces '
                          f'{int(announced):,} bytes, not the {archive.size:,} of the published '
                          f'archive); {_offline_hint(name, data_dir)}.')
    print(f'Downloading {archive.url} ({size_text(archive.size)}) into '
          f'{downloads_dir(data_dir)}/.', file=sys.stderr, flush=True)
    _receive(response, archive, part, name, data_dir)


def _receive(response, archive: Archive, part: pathlib.Path, name: str, data_dir: str) -> None:
  got, period_start, period_got = 0, time.monotonic(), 0
  with open(part, 'wb') as f, tqdm.tqdm(
      total=archive.size, unit='B', unit_scale=True, unit_divisor=1024, desc=name,
      file=sys.stderr, mininterval=0.5) as bar:
    while True:
      try:
        # read1: what has arrived, up to one byte past the published size; read() would wait
        # for a whole chunk, so a trickle would never come back to the stall check.
        chunk = response.read1(min(_CHUNK, archive.size - got + 1))
      except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f'The download of {archive.url} broke off after {got:,} of '
                            f'{archive.size:,} bytes ({_reason(e)}); run the command again, or '
                            f'{_offline_hint(name, data_dir)}.') from None
      if not chunk:
        break
      if got + len(chunk) > archive.size:  # nothing past the published size is written
        raise DownloadError(f'The server of {archive.url} sent more than the {archive.size:,} '
                            'bytes of the published archive, so the download was stopped there '
                            f'(and deleted); run the command again, or '
                            f'{_offline_hint(name, data_dir)}.')
      try:
        f.write(chunk)
      except OSError as e:  # the local disk, not the network
        if is_disk_full(e):
          raise DiskFullError(data_dir, f'downloading {name}', archive.size) from None
        raise OSError(e.errno, e.strerror, str(part)) from None
      got += len(chunk)
      period_got += len(chunk)
      bar.update(len(chunk))
      now = time.monotonic()
      if now - period_start >= STALL_S:
        if period_got < STALL_BYTES:
          raise DownloadError(
              f'The download of {archive.url} stalled: {period_got:,} bytes in the last '
              f'{now - period_start:.0f} s, fewer than the {STALL_BYTES:,} bytes a download '
              f'must bring every {STALL_S:g} s (after {got:,} of {archive.size:,} bytes); run '
              f'the command again, or {_offline_hint(name, data_dir)}.')
        period_start, period_got = now, 0
  if got < archive.size:
    raise DownloadError(f'The download of {archive.url} broke off after {got:,} of '
                        f'{archive.size:,} bytes (the server closed the connection); run the '
                        f'command again, or {_offline_hint(name, data_dir)}.')


def _reason(error: BaseException) -> str:
  """The cause of a network error in a few words ('Connection refused', 'timed out')."""
  if isinstance(error, urllib.error.URLError) and not isinstance(error.reason, str):
    error = error.reason
  if isinstance(error, TimeoutError) or 'timed out' in str(error):
    return f'no answer within {TIMEOUT_S} s'
  return getattr(error, 'strerror', None) or str(error) or type(error).__name__


def _problem(path: pathlib.Path, archive: Archive) -> str | None:
  """How the file at path differs from the published archive, as a phrase; None if it is it."""
  size = path.stat().st_size
  if size != archive.size:
    return f'is {size:,} bytes, not the {archive.size:,} of the published archive'
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(_CHUNK):
      digest.update(block)
  if digest.hexdigest() != archive.sha256:
    return f'has SHA-256 {digest.hexdigest()}, not the published {archive.sha256}'
  return None
