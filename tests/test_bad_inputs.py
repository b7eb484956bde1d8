"""A user's mistakes: every command answers one `error:` line on stderr, exit code 2, no
traceback, and leaves the workdir as it was (ait_jax/cli.py).

Most rows run in process through `cli.run(define_flags, main, argv)` (fast); a few run as real
subprocesses to prove the `python -m` path.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from ait_jax import bench
from ait_jax import checkpointing
from ait_jax import cli
from ait_jax import main as main_cmd
from ait_jax import reproduce
from ait_jax import train
from ait_jax import visualize
from ait_jax.data import benchmark
from ait_jax.data import prepare
from ait_jax.data import show
from conftest import ROOT

# absl log records (W1129 15:27:08.78 ... file.py:12] text) are not error output.
_LOG_LINE = re.compile(r'^[IWEF]\d{4} ')
QUICK = ['--config=configs/triangle.py:quick', '--config.dataset=triangle/small',
         '--config.mesh.data=1', '--config.total_steps=2', '--config.log_every_steps=1',
         '--config.eval_every_steps=2']


@pytest.fixture(scope='module')
def trained(generated_data_dir, tmp_path_factory):
  """A workdir holding a 2-step run of the quick Triangle config (width 64)."""
  workdir = tmp_path_factory.mktemp('trained')
  config = cli.load_config(str(ROOT / 'configs/triangle.py:quick'),
                           QUICK[1:] + [f'--config.data_dir={generated_data_dir}'])
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _snapshot(folder: pathlib.Path) -> dict:
  if not folder.exists():
    return {}
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob('*')) if p.is_file()}


def _run_in_process(module, argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.run(module.define_flags, module.main, [module.__name__] + argv)
  captured = capsys.readouterr()
  return exit_info.value.code, captured.err


def _assert_one_error_line(code, err, expected):
  lines = [l for l in err.splitlines() if l.strip() and not _LOG_LINE.match(l)]
  assert code == cli.EXIT_USER_ERROR, err
  assert 'Traceback' not in err, err
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  assert expected in lines[0], lines[0]
  return lines[0]


def _workdir(tmp_path, kind):
  """'new': a folder not yet made; 'file': a regular file; 'trained' is the fixture."""
  if kind == 'new':
    return tmp_path / 'work'
  if kind == 'file':
    path = tmp_path / 'afile'
    path.write_text('not a folder')
    return path
  raise ValueError(kind)


# (module, argv, expected fragment); {w}: the workdir, {d}: the generated data_dir.
MAIN_ROWS = {
    'unknown config file': (['--config=configs/nope.py', '--workdir={w}'],
                            'Cannot load the config file of --config=configs/nope.py'),
    'unknown model variant': (['--config=configs/triangle.py:model=huge', '--workdir={w}'],
                              "Unknown model variant 'huge'; use one of small"),
    'unknown ablation': (['--config=configs/triangle.py:ablation=foo', '--workdir={w}'],
                         "Unknown ablation 'foo'; use one of none"),
    'unknown variant key': (['--config=configs/triangle.py:modle=base', '--workdir={w}'],
                            "Unknown config variant 'modle'"),
    'unknown config field': (QUICK + ['--config.foo=1', '--workdir={w}'],
                             "The config has no field 'foo'"),
    'unknown nested field': (QUICK + ['--config.model.foo=1', '--workdir={w}'],
                             "The config has no field 'model.foo'"),
    'override not a number': (QUICK + ['--config.lr=abc', '--workdir={w}'],
                              'flag --config.lr=abc'),
    'bad mode': (QUICK + ['--mode=bogus', '--workdir={w}'], 'value should be one of'),
    'no config': (['--workdir={w}'], 'Pass --config=configs/<dataset>.py'),
    'empty workdir': (QUICK + ['--workdir='], '--workdir is empty'),
    'no workdir': (QUICK, '--workdir is missing'),
    'stray argument': (QUICK + ['--workdir={w}', 'extra'], "Unexpected arguments ['extra']"),
    'num_heads=0': (QUICK + ['--config.model.num_heads=0', '--workdir={w}'], 'num_heads'),
    'memory_heads=0': (QUICK + ['--config.model.memory_heads=0', '--workdir={w}'],
                       'memory_heads'),
    'depth=0': (QUICK + ['--config.model.depth=0', '--workdir={w}'], 'depth'),
    'width=0': (QUICK + ['--config.model.width=0', '--workdir={w}'], 'width'),
    'memory_slots=0': (QUICK + ['--config.model.memory_slots=0', '--workdir={w}'],
                       'memory_slots'),
    'write_dropout=1.5': (QUICK + ['--config.model.write_dropout=1.5', '--workdir={w}'],
                          'write_dropout'),
    'hopfield_beta=0': (QUICK + ['--config.model.hopfield_beta=0', '--workdir={w}'],
                        'hopfield_beta'),
    'b1=2.0': (QUICK + ['--config.b1=2.0', '--workdir={w}'], 'b1=2.0 must be in [0, 1)'),
    'b2=1.0': (QUICK + ['--config.b2=1.0', '--workdir={w}'], 'b2=1.0 must be in [0, 1)'),
    'adam_eps=0': (QUICK + ['--config.adam_eps=0', '--workdir={w}'], 'adam_eps=0.0 must be'),
    'batch_size=0': (QUICK + ['--config.batch_size=0', '--workdir={w}'],
                     'batch_size=0 must be a positive integer'),
    'unknown dataset': (QUICK + ['--config.dataset=imagenet', '--workdir={w}'],
                        "Unknown dataset 'imagenet'"),
    # ImageNet-100 is the dataset a run cannot fetch itself (CIFAR and Pet are downloaded:
    # tests/test_data_download.py).
    'dataset not prepared': (['--config=configs/imagenet100.py:quick', '--config.data_dir={w}_data',
                              '--workdir={w}'],
                             'python -m ait_jax.data.prepare --dataset=imagenet100'),
    'workdir is a file': (QUICK + ['--workdir={f}'], 'is a file, not a folder'),
    'workdir inside a file': (QUICK + ['--workdir={f}/run'], 'which is a file'),
    'gs:// without gcsfs': (QUICK + ['--workdir=gs://bucket/run'], 'needs gcsfs'),
    'eval without checkpoint': (QUICK + ['--mode=eval', '--workdir={w}'],
                                'No checkpoint in'),
}


@pytest.mark.parametrize('row', sorted(MAIN_ROWS))
def test_main_user_errors(row, generated_data_dir, tmp_path, capsys):
  argv, expected = MAIN_ROWS[row]
  workdir, afile = _workdir(tmp_path, 'new'), _workdir(tmp_path, 'file')
  argv = [a.format(w=workdir, f=afile, d=generated_data_dir) for a in argv]
  if any(a.startswith('--config=') for a in argv) and not any(
      a.startswith('--config.data_dir') for a in argv):
    argv.append(f'--config.data_dir={generated_data_dir}')
  code, err = _run_in_process(main_cmd, argv, capsys)
  _assert_one_error_line(code, err, expected)
  assert not workdir.exists(), f'{row} created {workdir}'
  assert afile.read_text() == 'not a folder'


def test_read_only_workdir(generated_data_dir, tmp_path, capsys, monkeypatch):
  # Tests run as root, where chmod cannot make a folder read-only: the permission check is
  # shown the answer a non-root user would get.
  parent = tmp_path / 'readonly'
  parent.mkdir()
  real_access = os.access
  monkeypatch.setattr(checkpointing.os, 'access',
                      lambda p, mode: False if str(p) == str(parent) else real_access(p, mode))
  code, err = _run_in_process(main_cmd, QUICK + [f'--workdir={parent}/run',
                                                 f'--config.data_dir={generated_data_dir}'],
                              capsys)
  _assert_one_error_line(code, err, 'is not writable')
  assert list(parent.iterdir()) == []


def test_truncated_array_record(generated_data_dir, tmp_path, capsys):
  """A generated dataset cut short is ours to rebuild: the run says so, rebuilds it, trains."""
  data_dir = tmp_path / 'data'
  shutil.copytree(generated_data_dir, data_dir)
  train_file, = (data_dir / 'triangle/small').glob('*/*train.array_record*')
  original = train_file.read_bytes()
  with open(train_file, 'r+b') as f:  # cut mid-file: the footer and the last chunks are lost
    f.truncate(train_file.stat().st_size * 2 // 3)
  workdir = tmp_path / 'work'
  code, err = _run_in_process(main_cmd, QUICK + [f'--workdir={workdir}',
                                                 f'--config.data_dir={data_dir}'], capsys)
  assert code == 0 and 'Traceback' not in err, err
  assert f'has a damaged {train_file.name} (' in err and 'rebuilding it.' in err
  assert train_file.read_bytes() == original


def test_distributed_start_up_errors(generated_data_dir, tmp_path, capsys, monkeypatch):
  workdir = tmp_path / 'work'
  argv = QUICK + [f'--workdir={workdir}', f'--config.data_dir={generated_data_dir}']
  monkeypatch.setenv('AIT_JAX_DISTRIBUTED', 'sometimes')
  _assert_one_error_line(*_run_in_process(main_cmd, argv, capsys), "must be 'auto', 'on' or 'off'")
  monkeypatch.setenv('AIT_JAX_DISTRIBUTED', 'auto')
  monkeypatch.setenv('AIT_JAX_COORDINATOR', '127.0.0.1:1')
  _assert_one_error_line(*_run_in_process(main_cmd, argv, capsys),
                         'also set AIT_JAX_NUM_PROCESSES and AIT_JAX_PROCESS_ID')
  monkeypatch.setenv('AIT_JAX_NUM_PROCESSES', 'two')
  monkeypatch.setenv('AIT_JAX_PROCESS_ID', '0')
  _assert_one_error_line(*_run_in_process(main_cmd, argv, capsys),
                         "AIT_JAX_NUM_PROCESSES='two' must be an integer")
  assert not workdir.exists()


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_other_width_is_refused_and_config_json_kept(trained, generated_data_dir, mode, capsys):
  before = _snapshot(trained)
  code, err = _run_in_process(main_cmd, QUICK + [
      f'--workdir={trained}', f'--mode={mode}', '--checkpoint=latest',
      '--config.model.width=128', f'--config.data_dir={generated_data_dir}'], capsys)
  _assert_one_error_line(code, err, 'was saved by a different model')
  assert 'Event loop is closed' not in err
  assert _snapshot(trained) == before  # config.json, metrics, checkpoints: untouched


def test_busy_workdir_is_refused(trained, generated_data_dir, capsys):
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    (trained / checkpointing.LOCK_FILE).write_text(
        f'{{"host": "{os.uname().nodename}", "pid": {holder.pid}}}')
    before = _snapshot(trained)
    code, err = _run_in_process(main_cmd, QUICK + [
        f'--workdir={trained}', f'--config.data_dir={generated_data_dir}'], capsys)
    _assert_one_error_line(code, err, f'is in use by pid {holder.pid}')
    assert _snapshot(trained) == before
  finally:
    holder.kill()
    holder.wait()
    (trained / checkpointing.LOCK_FILE).unlink()


OTHER_ROWS = {
    'visualize unknown variant': (visualize, ['--config=configs/triangle.py:model=huge',
                                              '--workdir={t}', '--out={o}'],
                                  "Unknown model variant 'huge'"),
    'visualize unknown field': (visualize, QUICK + ['--config.foo=1', '--workdir={t}',
                                                    '--out={o}'], "no field 'foo'"),
    'visualize no workdir': (visualize, ['--workdir={w}', '--out={o}'], 'No workdir'),
    'visualize out is a file': (visualize, ['--workdir={t}', '--out={f}'], 'is a file'),
    'visualize no out': (visualize, ['--workdir={t}'], '--out is missing'),
    'visualize num_images=0': (visualize, ['--workdir={t}', '--out={o}', '--num_images=0'],
                               'num_images=0 must be between 1 and'),
    'reproduce --only=typo': (reproduce, ['--out={o}', '--only=typo'],
                              'names no run of --scale=cpu; use some of triangle_ait_small'),
    'reproduce no out': (reproduce, [], '--out is missing'),
    'reproduce out is a file': (reproduce, ['--out={f}'], 'is a file'),
    'prepare data_dir is a file': (prepare, ['--dataset=triangle/small', '--data_dir={f}'],
                                   'is a file; pass a folder'),
    'prepare unknown dataset': (prepare, ['--dataset=nope', '--data_dir={o}'],
                                "Unknown dataset 'nope'"),
    'prepare no dataset': (prepare, ['--data_dir={o}'], '--dataset is missing'),
    'show needs data_dir': (show, ['--dataset=cifar10', '--out={o}.png'], 'pass --data_dir'),
    'show num=0': (show, ['--dataset=triangle', '--out={o}.png', '--num=0'], 'flag --num=0'),
    'data.benchmark not prepared': (benchmark, ['--dataset=triangle/small', '--data_dir={o}'],
                                    'python -m ait_jax.data.prepare'),
    'bench warmup=0': (bench, ['--warmup=0'], 'flag --warmup=0'),
    'bench unknown variant': (bench, ['--config=configs/cifar10.py:model=huge'],
                              "Unknown model variant 'huge'"),
    'bench unknown field': (bench, ['--config.model.foo=1'], "flag 'config.model.foo'"),
    'bench too many devices': (bench, ['--devices=64', '--depth=1'], 'devices JAX sees'),
}


@pytest.mark.parametrize('row', sorted(OTHER_ROWS))
def test_other_commands_user_errors(row, trained, tmp_path, capsys):
  module, argv, expected = OTHER_ROWS[row]
  out, afile = tmp_path / 'out', _workdir(tmp_path, 'file')
  before = _snapshot(trained)
  argv = [a.format(t=trained, o=out, f=afile, w=tmp_path / 'missing') for a in argv]
  code, err = _run_in_process(module, argv, capsys)
  _assert_one_error_line(code, err, expected)
  assert not out.exists() and not pathlib.Path(f'{out}.png').exists()
  assert afile.read_text() == 'not a folder'
  assert _snapshot(trained) == before


def test_bug_keeps_its_traceback(capsys):
  """Only a user's mistake is shortened: an unexpected error still shows where it came from."""
  def main(fv):
    del fv
    return {}['not a user error']

  with pytest.raises(KeyError):
    cli.run(lambda fv: None, main, ['prog'])
  assert 'error:' not in capsys.readouterr().err


@pytest.mark.parametrize('argv,expected', [
    (['ait_jax.main', '--config=configs/nope.py', '--workdir={w}'], 'Cannot load the config'),
    (['ait_jax.main', '--config=configs/triangle.py:model=huge', '--workdir={w}'],
     "Unknown model variant 'huge'"),
    (['ait_jax.main', '--config=configs/triangle.py:quick', '--workdir='], '--workdir is empty'),
    (['ait_jax.visualize', '--config=configs/triangle.py:quick', '--config.foo=1',
      '--workdir={w}', '--out={w}'], "no field 'foo'"),
    (['ait_jax.data.prepare', '--dataset=triangle/small', '--data_dir={f}'], 'is a file'),
])
def test_real_command_path(argv, expected, tmp_path):
  workdir, afile = _workdir(tmp_path, 'new'), _workdir(tmp_path, 'file')
  argv = [a.format(w=workdir, f=afile) for a in argv]
  out = subprocess.run([sys.executable, '-m'] + argv, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  _assert_one_error_line(out.returncode, out.stderr, expected)
  assert not workdir.exists()
