"""CIFAR-10, CIFAR-100 and Oxford-IIIT Pet from their archives, with no network: a loopback HTTP
server started here serves small archives written in the published formats. Download, checksum,
build and read through ExampleSource; a refused connection, a download that breaks off, a wrong
checksum, an archive that does not read, the manual-archive path, and one command through
`ait_jax.main` that downloads, builds and trains."""
import functools
import hashlib
import http.server
import io
import pathlib
import socket
import tarfile
import threading

import numpy as np
import PIL.Image
import pytest

from ait_jax import cli
from ait_jax import main as main_cmd
from ait_jax.data import cifar
from ait_jax.data import datasets
from ait_jax.data import downloads
from ait_jax.data import input_pipeline as ip
from ait_jax.data import oxford_iiit_pet as pet
from ait_jax.data import prepare

CIFAR10_TRAIN_PER_BATCH, CIFAR_TEST = 16, 24  # CIFAR-10 has five train batch files
CIFAR100_TRAIN = 40
PET_TRAIN = ('Abyssinian_5', 'Abyssinian_7', 'beagle_1', 'pug_3', 'Sphynx_2')  # _5: "damaged"
PET_TEST = ('Bengal_4', 'yorkshire_terrier_9', 'pug_8')


def _tar_gz(path: pathlib.Path, members: dict[str, bytes]) -> None:
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _cifar_rows(rng, n: int, num_classes: tuple[int, ...]) -> tuple[bytes, np.ndarray, np.ndarray]:
  """n records of the binary format: label bytes, then the image in R, G, B planes."""
  labels = np.stack([rng.integers(0, c, n) for c in num_classes], 1).astype(np.uint8)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  planes = images.transpose(0, 3, 1, 2).reshape(n, -1)
  return np.concatenate([labels, planes], 1).tobytes(), labels, images


def write_cifar10(path: pathlib.Path, seed: int = 0) -> dict:
  """A cifar-10-binary.tar.gz in the published layout; returns the records per split."""
  rng = np.random.default_rng(seed)
  members, train = {}, []
  for i in range(1, 6):
    data, labels, images = _cifar_rows(rng, CIFAR10_TRAIN_PER_BATCH, (10,))
    members[f'cifar-10-batches-bin/data_batch_{i}.bin'] = data
    train.append((labels, images))
  data, test_labels, test_images = _cifar_rows(rng, CIFAR_TEST, (10,))
  members['cifar-10-batches-bin/test_batch.bin'] = data
  members['cifar-10-batches-bin/batches.meta.txt'] = ('\n'.join(
      ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
       'truck']) + '\n\n').encode()
  members['cifar-10-batches-bin/readme.html'] = b'<html></html>'
  _tar_gz(path, members)
  return {'train': (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
          'test': (test_labels, test_images)}


def write_cifar100(path: pathlib.Path, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  train, train_labels, train_images = _cifar_rows(rng, CIFAR100_TRAIN, (20, 100))
  test, test_labels, test_images = _cifar_rows(rng, CIFAR_TEST, (20, 100))
  _tar_gz(path, {
      'cifar-100-binary/coarse_label_names.txt': '\n'.join(f'super{i}' for i in range(20)).encode(),
      'cifar-100-binary/fine_label_names.txt': '\n'.join(f'class{i}' for i in range(100)).encode(),
      'cifar-100-binary/train.bin': train,
      'cifar-100-binary/test.bin': test,
  })
  return {'train': (train_labels, train_images), 'test': (test_labels, test_images)}


def _image_bytes(rng, fmt: str, mode: str = 'RGB') -> bytes:
  size = tuple(rng.integers(12, 40, 2))
  pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels, mode).save(buffer, format=fmt)
  return buffer.getvalue()


def write_pet(folder: pathlib.Path, seed: int = 0) -> None:
  """images.tar.gz and annotations.tar.gz in the published layout (lists, trimaps, some xmls)."""
  rng = np.random.default_rng(seed)
  images, annotations, lists = {}, {}, {'trainval': [], 'test': []}
  for split, names in (('trainval', PET_TRAIN), ('test', PET_TEST)):
    for name in names:
      breed = name.rsplit('_', 1)[0]
      label = pet.LABEL_NAMES.index(breed) + 1
      species = 1 if breed[0].isupper() else 2  # cats are capitalised in the published lists
      lists[split].append(f'{name} {label} {species} 1')
      # Abyssinian_5 is one of the published files that is not a clean JPEG: a PNG with alpha.
      images[f'images/{name}.jpg'] = (_image_bytes(rng, 'PNG', 'RGBA') if name == 'Abyssinian_5'
                                      else _image_bytes(rng, 'JPEG'))
      trimap = rng.integers(1, 4, (10, 12), dtype=np.uint8)
      buffer = io.BytesIO()
      PIL.Image.fromarray(trimap, 'L').save(buffer, format='PNG')
      annotations[f'annotations/trimaps/{name}.png'] = buffer.getvalue()
      annotations[f'annotations/trimaps/._{name}.png'] = b'\0resource fork'
      if split == 'trainval':
        annotations[f'annotations/xmls/{name}.xml'] = (
            '<annotation><size><width>40</width><height>20</height></size><object><bndbox>'
            '<xmin>4</xmin><ymin>2</ymin><xmax>20</xmax><ymax>10</ymax></bndbox></object>'
            '</annotation>').encode()
  images['images/Abyssinian_100.mat'] = b'not an image'
  annotations['annotations/trainval.txt'] = '\n'.join(lists['trainval']).encode()
  annotations['annotations/test.txt'] = '\n'.join(lists['test']).encode()
  _tar_gz(folder / 'images.tar.gz', images)
  _tar_gz(folder / 'annotations.tar.gz', annotations)


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves the server's folder; a file named in `cut` is announced whole, then cut short."""
  cut: dict[str, int] = {}

  def log_message(self, *args):  # keep the test output clean
    pass

  def do_GET(self):
    name = self.path.lstrip('/')
    if name not in self.cut:
      return super().do_GET()
    data = (pathlib.Path(self.directory) / name).read_bytes()
    self.send_response(200)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data[:self.cut[name]])
    self.wfile.flush()
    self.close_connection = True
    return None


@pytest.fixture
def server(tmp_path):
  """A loopback HTTP server over tmp_path/served; yields (folder, base URL, cut table)."""
  folder = tmp_path / 'served'
  folder.mkdir()
  handler = type('Handler', (_Handler,), {'cut': {}})
  httpd = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(handler, directory=str(folder)))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield folder, f'http://127.0.0.1:{httpd.server_address[1]}', handler.cut
  httpd.shutdown()
  httpd.server_close()


def _refused_url() -> str:
  """An address on which nothing listens: connecting is refused at once."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}'


def _publish(monkeypatch, folder: pathlib.Path, base_url: str, **wrong) -> None:
  """Points downloads.ARCHIVES (the seam tests use) at the archives in folder, served at
  base_url; wrong={'sha256': ...} or {'size': ...} publishes a wrong checksum or size."""
  table = dict(downloads.ARCHIVES)
  for path in folder.glob('*.tar.gz'):
    data = path.read_bytes()
    table[path.name] = downloads.Archive(
        f'{base_url}/{path.name}', wrong.get('size', len(data)),
        wrong.get('sha256', hashlib.sha256(data).hexdigest()))
  monkeypatch.setattr(downloads, 'ARCHIVES', table)


def _files(folder: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob('*')) if folder.exists() else []


def _prepare_cmd(argv, capsys) -> tuple[int, str, str]:
  with pytest.raises(SystemExit) as exit_info:
    cli.run(prepare.define_flags, prepare.main, ['ait_jax.data.prepare', *argv])
  out = capsys.readouterr()
  return exit_info.value.code, out.out, out.err


def _error_line(err: str) -> str:
  """The one error line of a failed command, and nothing else on stderr."""
  assert 'Traceback' not in err, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  return lines[0]


def _read_all(name: str, split: str, data_dir) -> dict:
  source = ip.ExampleSource(datasets.get_info(name), split, str(data_dir))
  return source.read(np.arange(len(source)))


def _by_label_and_image(labels: np.ndarray, images: np.ndarray) -> list:
  """Records as sorted (label, image bytes) pairs: TFDS stores a split in its own shuffled order."""
  return sorted(zip(labels.tolist(), (im.tobytes() for im in images)))


def test_cifar10_download_checksum_build_and_read(server, tmp_path, monkeypatch, capsys):
  folder, url, _ = server
  records = write_cifar10(folder / 'cifar-10-binary.tar.gz')
  _publish(monkeypatch, folder, url)
  data_dir = tmp_path / 'data'
  code, out, err = _prepare_cmd(['--dataset=cifar10', f'--data_dir={data_dir}'], capsys)
  assert code == 0, err
  assert f'Downloading {url}/cifar-10-binary.tar.gz' in err
  assert 'cifar10 is not prepared' in err and 'Prepared cifar10 in' in out
  assert 'Downloading and preparing dataset' not in out + err  # TFDS's banner is gone
  for split in ('train', 'test'):
    batch = _read_all('cifar10', split, data_dir)
    labels, images = records[split]
    assert batch['image'].shape == (len(images), 32, 32, 3) and batch['label'].dtype == np.int32
    assert _by_label_and_image(batch['label'], batch['image']) == _by_label_and_image(
        labels[:, 0], images)
  # The catalog's features and label names, and the archive kept for a rebuild without network.
  version_dir = data_dir / 'cifar10' / '3.0.2'
  assert (version_dir / 'label.labels.txt').read_text().split() == [
      'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
  assert sorted(_files(data_dir / 'downloads')) == ['cifar-10-binary.tar.gz']
  assert not list(data_dir.glob('.incomplete*'))
  # Prepared again: nothing downloaded, every record read back.
  code, out, err = _prepare_cmd(['--dataset=cifar10', f'--data_dir={data_dir}'], capsys)
  assert code == 0 and 'already prepared' in out and 'every record read back intact' in out
  assert 'Downloading' not in err


def test_cifar100_keeps_the_fine_and_coarse_labels(server, tmp_path, monkeypatch):
  folder, url, _ = server
  records = write_cifar100(folder / 'cifar-100-binary.tar.gz')
  _publish(monkeypatch, folder, url)
  path, built = prepare.prepare('cifar100', str(tmp_path))
  assert built and path.endswith('cifar100/3.0.2')
  batch = _read_all('cifar100', 'train', tmp_path)
  labels, images = records['train']
  assert _by_label_and_image(batch['label'], batch['image']) == _by_label_and_image(
      labels[:, 1], images)  # 'label' is the fine label, the second byte of a record
  source = ip.open_tfds(datasets.get_info('cifar100'), 'test', str(tmp_path))
  assert source.dataset_info.features['coarse_label'].num_classes == 20
  assert source.dataset_info.features['label'].names[:2] == ['class0', 'class1']
  example = source[0]
  assert example['id'].startswith(b'test_') and example['coarse_label'] < 20


def test_pet_download_build_and_read(server, tmp_path, monkeypatch):
  folder, url, _ = server
  write_pet(folder)
  _publish(monkeypatch, folder, url)
  prepare.prepare('oxford_iiit_pet', str(tmp_path))
  info = datasets.get_info('oxford_iiit_pet')
  for split, names in (('train', PET_TRAIN), ('test', PET_TEST)):
    source = ip.open_tfds(info, split, str(tmp_path))
    examples = {e['file_name'].decode(): e for e in (source[i] for i in range(len(source)))}
    assert sorted(examples) == sorted(f'{n}.jpg' for n in names)
    for name, e in examples.items():
      breed = name[:-len('.jpg')].rsplit('_', 1)[0]
      assert e['label'] == pet.LABEL_NAMES.index(breed)
      assert e['species'] == (0 if breed[0].isupper() else 1)
      assert e['segmentation_mask'].ndim == 3 and e['segmentation_mask'].shape[-1] == 1
      assert set(np.unique(e['segmentation_mask'])) <= {1, 2, 3}
    boxes = {n: e['head_bbox'] for n, e in examples.items()}
    if split == 'train':  # (ymin, xmin, ymax, xmax) of the xml: y 2..10 of 20, x 4..20 of 40
      np.testing.assert_allclose(boxes['beagle_1.jpg'], [0.1, 0.1, 0.5, 0.5], rtol=1e-6)
    else:
      assert all(not b.any() for b in boxes.values())
  # The PNG with alpha stored as the published "damaged" files are: re-encoded as an RGB JPEG.
  raw = ip.open_tfds(info, 'train', str(tmp_path)).data_source
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  stored = {}
  for i in range(len(raw)):
    f = tf_example_pb2.Example.FromString(raw[i]).features.feature
    stored[f['file_name'].bytes_list.value[0].decode()] = f['image'].bytes_list.value[0]
  assert all(data[:2] == b'\xff\xd8' for data in stored.values())
  batch = _read_all('oxford_iiit_pet', 'train', tmp_path)
  assert batch['image'].shape == (len(PET_TRAIN), 224, 224, 3)


@pytest.mark.parametrize('case', ['refused', 'not found', 'no answer'])
def test_unreachable_archive_is_one_sentence_and_leaves_nothing(case, server, tmp_path,
                                                               monkeypatch, capsys):
  """A refused connection, an HTTP error and a server that never answers (TIMEOUT_S, shortened
  here) each end in one line naming the address and where to put the archive by hand."""
  folder, url, _ = server
  write_cifar10(folder / 'cifar-10-binary.tar.gz')
  listening = socket.socket()
  if case == 'refused':
    url = _refused_url()
  elif case == 'no answer':  # the connection is accepted by the kernel, and nothing is sent
    listening.bind(('127.0.0.1', 0))
    listening.listen(1)
    url = f'http://127.0.0.1:{listening.getsockname()[1]}'
    monkeypatch.setattr(downloads, 'TIMEOUT_S', 0.5)
  _publish(monkeypatch, folder, url)
  if case == 'not found':
    (folder / 'cifar-10-binary.tar.gz').unlink()
  data_dir = tmp_path / 'data'
  with listening:
    code, _, err = _prepare_cmd(['--dataset=cifar10', f'--data_dir={data_dir}'], capsys)
  line = _error_line(err)
  reason = {'refused': 'Connection refused', 'not found': 'the server answered HTTP 404',
            'no answer': 'no answer within 0.5 s'}[case]
  assert code == 2
  assert f'Cannot download {url}/cifar-10-binary.tar.gz ({reason}' in line
  assert f'put cifar-10-binary.tar.gz (from that address) into {data_dir}/downloads/manual/' in line
  assert not data_dir.exists()  # created for this build, and removed with everything in it


def test_download_that_breaks_off_is_one_sentence_and_leaves_nothing(server, tmp_path,
                                                                    monkeypatch, capsys):
  folder, url, cut = server
  write_cifar10(folder / 'cifar-10-binary.tar.gz')
  size = (folder / 'cifar-10-binary.tar.gz').stat().st_size
  cut['cifar-10-binary.tar.gz'] = size // 2
  _publish(monkeypatch, folder, url)
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  (data_dir / 'other').write_text('kept')  # a data_dir in use: only what the build made goes
  code, _, err = _prepare_cmd(['--dataset=cifar10', f'--data_dir={data_dir}'], capsys)
  lines = [l for l in err.splitlines() if l.strip() and not l.startswith(('Downloading', '\r'))
           and 'cifar-10-binary.tar.gz:' not in l]  # the download's own line and progress bar
  assert code == 2 and 'Traceback' not in err
  assert len(lines) == 1, err
  assert f'The download of {url}/cifar-10-binary.tar.gz broke off after {size // 2:,} of ' \
         f'{size:,} bytes' in lines[0]
  assert _files(data_dir) == ['other']


def test_wrong_checksum_is_one_sentence_and_the_file_is_deleted(server, tmp_path, monkeypatch,
                                                               capsys):
  folder, url, _ = server
  write_cifar10(folder / 'cifar-10-binary.tar.gz')
  _publish(monkeypatch, folder, url, sha256='0' * 64)
  data_dir = tmp_path / 'data'
  code, _, err = _prepare_cmd(['--dataset=cifar10', f'--data_dir={data_dir}'], capsys)
  assert code == 2 and 'Traceback' not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith(f'error: The file downloaded from {url}/cifar-10-binary.tar.gz has '
                         'SHA-256 ') and f'not the published {"0" * 64} (it was deleted)' in line
  assert not data_dir.exists()


def test_manual_archive_prepares_offline_and_a_wrong_one_is_named(tmp_path, monkeypatch, capsys):
  folder = tmp_path / 'archives'
  folder.mkdir()
  records = write_cifar100(folder / 'cifar-100-binary.tar.gz')
  _publish(monkeypatch, folder, _refused_url())  # no network: only the manual archive helps
  data_dir = tmp_path / 'data'
  manual = data_dir / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  # A truncated copy put there by hand is named, not deleted, and nothing else is written.
  (manual / 'cifar-100-binary.tar.gz').write_bytes(
      (folder / 'cifar-100-binary.tar.gz').read_bytes()[:1000])
  code, _, err = _prepare_cmd(['--dataset=cifar100', f'--data_dir={data_dir}'], capsys)
  line = _error_line(err)
  assert code == 2 and f'{manual}/cifar-100-binary.tar.gz is 1,000 bytes, not the' in line
  assert 'replace it with the file from http://127.0.0.1' in line
  assert _files(data_dir) == ['downloads', 'downloads/manual',
                              'downloads/manual/cifar-100-binary.tar.gz']
  # The whole archive: prepared without any download.
  (manual / 'cifar-100-binary.tar.gz').write_bytes(
      (folder / 'cifar-100-binary.tar.gz').read_bytes())
  code, out, err = _prepare_cmd(['--dataset=cifar100', f'--data_dir={data_dir}'], capsys)
  assert code == 0 and 'Prepared cifar100' in out and 'Downloading' not in err, err
  batch = _read_all('cifar100', 'test', data_dir)
  assert len(batch['label']) == CIFAR_TEST
  assert sorted(batch['label'].tolist()) == sorted(records['test'][0][:, 1].tolist())


def test_archive_that_does_not_read_is_one_sentence(tmp_path, monkeypatch, capsys):
  """An archive whose checksum matches (here: one published with it) but whose contents are not
  in the published layout fails in one sentence naming it, and no dataset folder is left."""
  folder = tmp_path / 'archives'
  folder.mkdir()
  _tar_gz(folder / 'cifar-10-binary.tar.gz', {'cifar-10-batches-bin/data_batch_1.bin': b'x'})
  _publish(monkeypatch, folder, _refused_url())
  data_dir = tmp_path / 'data'
  (data_dir / 'downloads' / 'manual').mkdir(parents=True)
  (data_dir / 'downloads' / 'manual' / 'cifar-10-binary.tar.gz').write_bytes(
      (folder / 'cifar-10-binary.tar.gz').read_bytes())
  code, _, err = _prepare_cmd(['--dataset=cifar10', f'--data_dir={data_dir}'], capsys)
  assert code == 2 and 'Traceback' not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith(f'error: {data_dir}/downloads/manual/cifar-10-binary.tar.gz cannot be '
                         'read as the published archive (has no cifar-10-batches-bin/')
  assert not (data_dir / 'cifar10').exists() and not list(data_dir.glob('.incomplete*'))


def test_parse_records_refuses_a_partial_record():
  data = bytes(2 * (1 + 3072))
  labels, images = cifar.parse_records(data, 1)
  assert labels.shape == (2, 1) and images.shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match='not a whole number of 3073-byte records'):
    cifar.parse_records(data[:-1], 1)


def test_one_command_downloads_prepares_and_trains(server, tmp_path, monkeypatch, capsys):
  """`python -m ait_jax.main --config=configs/cifar10.py:quick` on a data_dir without CIFAR-10:
  the archive is downloaded (from the loopback server), built, and trained on, in one command."""
  folder, url, _ = server
  write_cifar10(folder / 'cifar-10-binary.tar.gz')
  _publish(monkeypatch, folder, url)
  data_dir, workdir = tmp_path / 'data', tmp_path / 'work'
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main_cmd.define_flags, main_cmd.main, [
        'ait_jax.main', '--config=configs/cifar10.py:quick', f'--workdir={workdir}',
        f'--config.data_dir={data_dir}', '--config.mesh.data=1', '--config.total_steps=2',
        '--config.log_every_steps=1', '--config.eval_every_steps=2', '--config.batch_size=16',
        '--config.eval_batch_size=8', '--config.model.patch_size=16',  # 4 tokens: compiles fast
        '--config.model.bottleneck_k=16'])
  err = capsys.readouterr().err
  assert exit_info.value.code == 0, err
  assert f'Downloading {url}/cifar-10-binary.tar.gz' in err
  assert f'Prepared cifar10 in {data_dir}/cifar10/3.0.2 in ' in err
  assert (workdir / 'eval_final.json').exists()
