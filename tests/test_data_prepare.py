"""`prepare` and the first run's build: an interrupted build leaves nothing that looks prepared, a
half-written or damaged dataset is found and rebuilt (ours) or named (the catalog's), an empty
data_dir is refused, and generating prints one line and a progress bar, nothing of TFDS's."""
import errno
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ait_jax import cli
from ait_jax import main as main_cmd
from ait_jax.data import datasets
from ait_jax.data import input_pipeline as ip
from ait_jax.data import prepare
from ait_jax.data import triangle
from conftest import limit, ROOT

SMALL = 'triangle/small'


def _copy(generated_data_dir, tmp_path) -> pathlib.Path:
  data_dir = tmp_path / 'data'
  shutil.copytree(pathlib.Path(generated_data_dir) / 'triangle', data_dir / 'triangle')
  return data_dir


def _version_dir(data_dir) -> pathlib.Path:
  return pathlib.Path(data_dir) / 'triangle' / 'small' / '1.1.0'


def _record_files(data_dir) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(_version_dir(data_dir).glob('*.array_record*'))}


def _run(module, argv, capfd) -> tuple[int, str, str]:
  with pytest.raises(SystemExit) as exit_info:
    cli.run(module.define_flags, module.main, [module.__name__, *argv])
  out, err = capfd.readouterr()
  return exit_info.value.code, out, err


def _text_lines(err: str) -> list[str]:
  """stderr without progress-bar updates (tqdm redraws its bar after carriage returns)."""
  lines = [part for line in err.split('\n') for part in line.split('\r')]
  return [l for l in lines if l.strip() and 'Writing triangle/small' not in l]


def test_interrupted_build_leaves_nothing_and_the_rerun_builds(tmp_path, monkeypatch):
  """Ctrl-C while the test split is written: the train split was already written, yet nothing is
  left in data_dir (not TFDS's `.config` or `downloads/` either), and a rerun builds it whole."""
  data_dir = tmp_path / 'data'
  generate = triangle.generate
  calls = []

  def interrupted(num_images, seed):
    calls.append(seed)
    if seed[1] == 1:  # [config seed, split 1 (test), chunk start]
      raise KeyboardInterrupt
    return generate(num_images, seed)

  monkeypatch.setattr(triangle, 'generate', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(SMALL, str(data_dir))
  assert [s[1] for s in calls] == [0, 1]  # the train split was generated before the interrupt
  assert not data_dir.exists(), sorted(str(p) for p in data_dir.rglob('*'))
  monkeypatch.setattr(triangle, 'generate', generate)
  _, built = prepare.prepare(SMALL, str(data_dir))
  assert built and len(ip.ExampleSource(datasets.get_info(SMALL), 'test', str(data_dir))) == 200


_KILLED_DRIVER = """
import os, signal, sys
from ait_jax import cli
from ait_jax.data import prepare, triangle
generate = triangle.generate
def killed(num_images, seed):
  if seed[1] == 1:  # kill -9 while the test split is generated
    os.kill(os.getpid(), signal.SIGKILL)
  return generate(num_images, seed)
triangle.generate = killed
cli.run(prepare.define_flags, prepare.main, ['prepare', '--dataset=triangle/small',
                                             '--data_dir=' + sys.argv[1]])
"""


def test_kill_9_mid_build_leaves_nothing_that_looks_prepared(tmp_path, capfd):
  data_dir = tmp_path / 'data'
  killed = subprocess.run([sys.executable, '-c', _KILLED_DRIVER, str(data_dir)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          timeout=limit(), check=False)
  assert killed.returncode == -9, killed.stderr.decode()[-2000:]
  assert not (data_dir / 'triangle').exists()  # only the build's temporary folder is left
  leftovers = [p.name for p in data_dir.iterdir()]
  assert len(leftovers) == 1 and leftovers[0].startswith('.incomplete.triangle_small.')
  with pytest.raises(FileNotFoundError, match='is not prepared'):
    ip.ExampleSource(datasets.get_info(SMALL), 'train', str(data_dir))
  # The same command again: the dead build's folder is removed, the dataset built whole.
  code, out, _ = _run(prepare, [f'--dataset={SMALL}', f'--data_dir={data_dir}'], capfd)
  assert code == 0 and 'Prepared triangle/small' in out
  assert sorted(p.name for p in data_dir.iterdir()) == ['triangle']


def test_half_written_dataset_info_is_rebuilt_by_the_first_run(generated_data_dir, tmp_path,
                                                              capfd):
  data_dir = _copy(generated_data_dir, tmp_path)
  original = _record_files(data_dir)
  info_file = _version_dir(data_dir) / 'dataset_info.json'
  text = info_file.read_text()
  info_file.write_text(text[:len(text) // 2])  # what a kill during the write leaves
  prepare.ensure_prepared(datasets.get_info(SMALL), str(data_dir))
  err = capfd.readouterr().err
  assert (f'triangle/small in {_version_dir(data_dir)} is incomplete or damaged (the folder has '
          'a dataset_info.json that does not parse') in err and 'rebuilding it.' in err
  assert 'Traceback' not in err
  assert info_file.read_text() == text and _record_files(data_dir) == original
  # The damaged folder is set aside, not deleted, where the line says.
  aside, = (data_dir / 'damaged').iterdir()
  assert f'moved to {aside}, rebuilding it.' in err
  assert aside.name.startswith('triangle_small_1.1.0_')
  assert (aside / 'dataset_info.json').read_text() == text[:len(text) // 2]


@pytest.mark.parametrize('damage', ['truncated', 'overwritten mid-file'])
def test_prepare_reads_back_and_rebuilds_a_damaged_dataset(generated_data_dir, tmp_path, capfd,
                                                           damage):
  data_dir = _copy(generated_data_dir, tmp_path)
  original = _record_files(data_dir)
  train_file, = _version_dir(data_dir).glob('*train.array_record*')
  size = train_file.stat().st_size
  with open(train_file, 'r+b') as f:
    if damage == 'truncated':
      f.truncate(size * 2 // 3)
    else:  # passes a check of the footer and the first and last records
      f.seek(size // 2)
      f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
  code, out, err = _run(prepare, [f'--dataset={SMALL}', f'--data_dir={data_dir}'], capfd)
  assert code == 0 and 'Traceback' not in err
  assert f'has a damaged {train_file.name} (' in err and 'rebuilding it.' in err
  assert 'Prepared triangle/small' in out
  assert _record_files(data_dir) == original  # the damage is gone, the same bytes rebuilt
  aside, = (data_dir / 'damaged').iterdir()  # and kept where the line says
  assert f'moved to {aside}, rebuilding it.' in err
  assert (aside / train_file.name).read_bytes() != original[train_file.name]


def test_damaged_catalog_dataset_names_the_folder_to_delete(tmp_path, capfd):
  version_dir = tmp_path / 'imagenet2012' / '5.1.0'
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('{"name": "imagenet2012", "spl')
  code, _, err = _run(prepare, ['--dataset=imagenet100', f'--data_dir={tmp_path}'], capfd)
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith(f'error: {version_dir} has a dataset_info.json that does not parse')
  assert f'delete that folder and run `python -m ait_jax.data.prepare --dataset=imagenet100 ' \
         f'--data_dir={tmp_path}` again.' in lines[0]
  assert (version_dir / 'dataset_info.json').exists()  # a catalog dataset is not deleted here


def test_empty_data_dir_is_refused_with_one_sentence(tmp_path, monkeypatch, capfd):
  monkeypatch.chdir(tmp_path)  # where TFDS would otherwise write the dataset
  code, _, err = _run(main_cmd, ['--config=' + str(ROOT / 'configs/triangle.py:quick'),
                                 '--config.dataset=triangle/small', '--config.data_dir=',
                                 f'--workdir={tmp_path / "work"}'], capfd)
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1, err
  assert lines[0].startswith('error: The data_dir is empty (--config.data_dir=')
  assert list(tmp_path.iterdir()) == []
  code, _, err = _run(prepare, [f'--dataset={SMALL}', '--data_dir='], capfd)
  assert code == 2 and err.strip() == ('error: --data_dir is empty (is the shell variable in it '
                                       'set?); pass --data_dir=DIR (where the dataset is '
                                       'written).')
  with pytest.raises(ValueError, match='The data_dir is empty'):
    prepare.prepare(SMALL, '')
  assert list(tmp_path.iterdir()) == []


def test_generating_prints_one_line_and_a_progress_bar(tmp_path, capfd):
  """The first run's build of a generated dataset: one line saying what happens, the progress
  bar, the result; no TFDS banner ("Downloading and preparing dataset ... (download: ...)") and
  no warning about a variant folder without dataset_info.json."""
  data_dir = tmp_path / 'data'
  prepare.ensure_prepared(datasets.get_info(SMALL), str(data_dir))
  out, err = capfd.readouterr()
  assert out == ''
  intro, result = _text_lines(err)
  assert intro == (f'triangle/small is not prepared in {data_dir}; generating it (nothing to '
                   'download).')
  assert re.fullmatch(rf'Prepared triangle/small in {re.escape(str(_version_dir(data_dir)))} in '
                      r'\d+\.\d s\.', result), result
  assert 'Writing triangle/small: 100%' in err and '712/712' in err
  assert sorted(p.name for p in data_dir.iterdir()) == ['triangle']
  prepare.ensure_prepared(datasets.get_info(SMALL), str(data_dir))  # prepared: silent
  assert capfd.readouterr() == ('', '')


@pytest.mark.parametrize('command', ['prepare', 'main'])
def test_full_disk_while_building_is_one_line_naming_the_folder_and_the_need(command, tmp_path,
                                                                              monkeypatch, capfd):
  """A full disk while the test split is written. `prepare` gets the error TFDS's writer raises
  (a RuntimeError quoting the write's errno: a traceback before), the first `main` run a bare
  OSError without a path (`error: [Errno 28] No space left on device` before). Both: one line
  naming the data_dir and about how much the build needs, and nothing left."""
  data_dir, workdir = tmp_path / 'data', tmp_path / 'work'
  generate = triangle.generate

  def full(num_images, seed):
    if seed[1] == 1:
      if command == 'prepare':
        raise RuntimeError('Failed to finalize writing of split "test": write() failed: No space '
                           'left on device')
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return generate(num_images, seed)

  monkeypatch.setattr(triangle, 'generate', full)
  if command == 'prepare':
    code, _, err = _run(prepare, [f'--dataset={SMALL}', f'--data_dir={data_dir}'], capfd)
  else:
    code, _, err = _run(main_cmd, ['--config=' + str(ROOT / 'configs/triangle.py:quick'),
                                   f'--config.dataset={SMALL}', f'--config.data_dir={data_dir}',
                                   f'--workdir={workdir}'], capfd)
  lines = [l for l in _text_lines(err) if not l.startswith('triangle/small is not prepared')]
  assert code == 2 and 'Traceback' not in err and len(lines) == 1, err
  # 340 KiB: builders.DATASET_BYTES, the space a build of triangle/small takes.
  assert lines[0].startswith(f'error: Not enough space on the disk of {data_dir}: preparing '
                             'triangle/small needs about 340 KiB free there ('), lines[0]
  assert lines[0].endswith('free now); nothing half-written was kept. Free some space (or pass '
                           'another data_dir) and run the command again.')
  assert not data_dir.exists() and not workdir.exists()


def test_manual_download_line_names_a_folder_that_exists(tmp_path, capfd):
  """ImageNet's archives are put by hand into downloads/manual/: the line that says so names the
  folder, which is there to copy into (it was not: `cp X D/downloads/manual/` failed)."""
  data_dir = tmp_path / 'data'
  code, _, err = _run(prepare, ['--dataset=imagenet100', f'--data_dir={data_dir}'], capfd)
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1, err
  assert f'into {data_dir}/downloads/manual/ and run this command again.' in lines[0]
  assert (data_dir / 'downloads' / 'manual').is_dir()
  assert sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob('*')) == [
      'downloads', 'downloads/manual']


def test_blank_data_dir_is_refused_with_one_sentence(tmp_path, monkeypatch, capfd):
  """`--data_dir=" "` (a variable of spaces) wrote the dataset into a folder named ' ' in the
  current folder; `prepare` and the first run refuse it, and write nothing."""
  monkeypatch.chdir(tmp_path)
  code, _, err = _run(prepare, [f'--dataset={SMALL}', '--data_dir= '], capfd)
  assert code == 2 and err.strip() == ("error: The data_dir ' ' is blank (only spaces); pass the "
                                       'folder that holds the datasets (it is created if '
                                       'missing).'), err
  code, _, err = _run(main_cmd, ['--config=' + str(ROOT / 'configs/triangle.py:quick'),
                                 f'--config.dataset={SMALL}', '--config.data_dir=  ',
                                 f'--workdir={tmp_path / "work"}'], capfd)
  assert code == 2 and err.strip().startswith('error: The data_dir ') and 'is blank' in err, err
  assert list(tmp_path.iterdir()) == []


_ON_A_SMALL_TMPFS = r'''
import ctypes, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS: a private mount
  raise SystemExit(97)                                             # namespace, gone with us
subprocess.run(['mount', '--make-rprivate', '/'], check=True, capture_output=True)
subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200k', 'tmpfs', sys.argv[1]], check=True,
               capture_output=True)
from ait_jax import cli
from ait_jax.data import prepare
try:
  cli.run(prepare.define_flags, prepare.main, ['prepare', '--dataset=triangle/small',
                                               '--data_dir=' + sys.argv[1] + '/data'])
finally:
  print('left on the tmpfs:', sorted(os.listdir(sys.argv[1])), flush=True)
'''


def test_full_disk_on_a_real_tmpfs(tmp_path):
  """The probe's case itself, where a tmpfs can be mounted (root, in a private mount namespace):
  `prepare` on a 200 KiB disk, where TFDS's writer fails (it raised a RuntimeError with a
  traceback): one line naming the data_dir and the need, and the disk left empty."""
  if os.geteuid() != 0 or not shutil.which('mount'):
    pytest.skip('mounting a tmpfs needs root; the tests above inject the full disk instead')
  mount = tmp_path / 'tmpfs'
  mount.mkdir()
  run = subprocess.run([sys.executable, '-c', _ON_A_SMALL_TMPFS, str(mount)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=limit(), check=False)
  if run.returncode == 97 or 'CalledProcessError' in run.stderr:  # the mount itself failed
    pytest.skip(f'no private mount namespace or tmpfs here: {run.stderr[-300:]}')
  lines = [l for l in _text_lines(run.stderr) if not l.startswith('triangle/small is not')]
  assert run.returncode == 2 and 'Traceback' not in run.stderr and len(lines) == 1, run.stderr
  assert lines[0].startswith(f'error: Not enough space on the disk of {mount}/data: preparing '
                             'triangle/small needs about 340 KiB free there ('), lines[0]
  assert run.stdout.strip() == 'left on the tmpfs: []'
