"""The published archives that `prepare` fetches (`ARCHIVES`: address, size, SHA-256) and the one
routine that fetches them: checksummed, with a progress bar, failing fast in one sentence.

An archive put by hand into <data_dir>/downloads/manual/ is used as it is (once its checksum
matches), so a machine without internet prepares from archives copied onto it.
"""
import dataclasses
import hashlib
import http.client
import os
import pathlib
import sys
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
# internet learns it at once (TFDS's downloader retried for minutes), and a stalled server
# within this time.
TIMEOUT_S = 20
_CHUNK = 1 << 20


class DownloadError(errors.UserError):
  """An archive that cannot be fetched or is not the published one; the sentence says what to do."""


def manual_dir(data_dir: str) -> pathlib.Path:
  """Where a user puts archives by hand (TFDS's manual-download folder)."""
  return pathlib.Path(data_dir) / 'downloads' / 'manual'


def downloads_dir(data_dir: str) -> pathlib.Path:
  """Where downloaded archives are kept, so that a rebuild needs no network."""
  return pathlib.Path(data_dir) / 'downloads'


def _offline_hint(name: str, data_dir: str) -> str:
  return (f'to prepare without internet, put {name} (from that address) into '
          f'{manual_dir(data_dir)}/ and run the command again')


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
    print(f'{kept} {problem}; downloading it again.', file=sys.stderr, flush=True)
    kept.unlink()
  part = scratch / name
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
  size = (f'{archive.size / 2**20:.0f} MiB' if archive.size >= 2**20 else
          f'{archive.size / 2**10:.0f} KiB')
  print(f'Downloading {archive.url} ({size}) into '
        f'{downloads_dir(data_dir)}/.', file=sys.stderr, flush=True)
  got = 0
  with response, open(part, 'wb') as f, tqdm.tqdm(
      total=int(response.headers.get('Content-Length') or archive.size), unit='B',
      unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr, mininterval=0.5) as bar:
    while True:
      try:
        chunk = response.read(_CHUNK)
      except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f'The download of {archive.url} broke off after {got:,} of '
                            f'{archive.size:,} bytes ({_reason(e)}); run the command again, or '
                            f'{_offline_hint(name, data_dir)}.') from None
      if not chunk:
        break
      try:
        f.write(chunk)
      except OSError as e:  # the local disk, not the network: name the file
        raise OSError(e.errno, e.strerror, str(part)) from None
      got += len(chunk)
      bar.update(len(chunk))
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
