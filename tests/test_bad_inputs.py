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
import zipfile

import numpy as np
import pytest

from ait_jax import bench
from ait_jax import checkpointing
from ait_jax import cli
from ait_jax import convert
from ait_jax import main as main_cmd
from ait_jax import reproduce
from ait_jax import steps
from ait_jax import validation
from ait_jax import train
from ait_jax import visualize
from ait_jax.data import benchmark
from ait_jax.data import device_data
from ait_jax.data import prepare
from ait_jax.data import show
from conftest import limit, ROOT

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
    'prefetch=-1': (QUICK + ['--config.prefetch=-1', '--workdir={w}'],
                    'prefetch=-1 must be 0 (read in the training thread) or a positive number'),
    'read_threads=0': (QUICK + ['--config.read_threads=0', '--workdir={w}'],
                       'read_threads=0 must be between 1 and'),
    'read_threads=10**6': (QUICK + ['--config.read_threads=1000000', '--workdir={w}'],
                           'read_threads=1000000 must be between 1 and'),
}


@pytest.mark.parametrize('text', ['[1, 2]', '"lr"', '{"lr": 0.1'])
def test_a_config_json_that_is_no_config_is_one_sentence(text, generated_data_dir, tmp_path,
                                                         capsys):
  """A workdir's config.json that is valid JSON but no object (or not JSON) once ended in
  `AttributeError: 'list' object has no attribute 'items'`; main and visualize name the file."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(text)
  (workdir / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
  code, err = _run_in_process(main_cmd, QUICK + [f'--workdir={workdir}',
                                                 f'--config.data_dir={generated_data_dir}'], capsys)
  _assert_one_error_line(code, err, f'{workdir / "config.json"} cannot be read')
  code, err = _run_in_process(visualize, [f'--workdir={workdir}', f'--out={tmp_path / "f"}'],
                              capsys)
  _assert_one_error_line(code, err, f'{workdir / "config.json"} is not a config')
  assert (workdir / 'config.json').read_text() == text


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
@pytest.mark.parametrize('config_json', [True, False])
def test_other_width_is_refused_and_config_json_kept(trained, generated_data_dir, mode,
                                                     config_json, capsys, tmp_path):
  """config.json names the field (the one rule for a workdir's config); without it (a workdir
  of an older version) the checkpoint's shapes still refuse it."""
  workdir = trained
  if not config_json:
    workdir = tmp_path / 'run'
    shutil.copytree(trained, workdir)
    (workdir / 'config.json').unlink()
  before = _snapshot(workdir)
  code, err = _run_in_process(main_cmd, QUICK + [
      f'--workdir={workdir}', f'--mode={mode}', '--checkpoint=latest',
      '--config.model.width=128', f'--config.data_dir={generated_data_dir}'], capsys)
  _assert_one_error_line(code, err, 'holds a run with model.width=64 (its config.json), but this '
                         'config has model.width=128' if config_json else
                         'was saved by a different model')
  assert 'Event loop is closed' not in err
  assert _snapshot(workdir) == before  # config.json, metrics, checkpoints: untouched


def test_busy_workdir_is_refused(trained, generated_data_dir, capsys):
  holder = subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()'])
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
                              'names no run of --scale=cpu; use some of triangle_ait_s0'),
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
    'bench peak_tflops=-5': (bench, ['--peak_tflops=-5'], '--peak_tflops=-5.0 must be positive'),
    'bench peak_tflops=0': (bench, ['--peak_tflops=0'], '--peak_tflops=0.0 must be positive'),
    'bench --json is a folder': (bench, ['--json={t}'], 'is a folder; pass a file name'),
    'bench --json inside a file': (bench, ['--json={f}/out.json'], 'which is a file'),
    'reproduce workdir_root is a file': (reproduce, ['--out={o}', '--workdir_root={f}'],
                                         'is a file; pass a folder'),
    # A blank path (an unset shell variable) trained reproduce's runs into the current folder.
    'reproduce workdir_root is empty': (reproduce, ['--out={o}', '--workdir_root='],
                                        '--workdir_root is empty'),
    'reproduce data_dir is empty': (reproduce, ['--out={o}', '--data_dir='],
                                    '--data_dir is empty'),
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


def _pickled_npz(path):
  np.savez(path, **{'mlp_head.1.weight': np.array([{'not': 'an array'}], dtype=object)})


def _not_a_zip(path):
  path.write_bytes(b'\x80\x04\x95 pickled bytes, not a zip')


def _zip_without_arrays(path):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('README.txt', 'no arrays here')


CONVERT_ROWS = {
    'pickled objects': ('ref.npz', _pickled_npz, 'holds pickled objects (mlp_head.1.weight), '
                        'which are not loaded'),
    'not a zip': ('ref.npz', _not_a_zip, 'is not a .npz (not a zip archive of arrays)'),
    'zip without arrays': ('ref.npz', _zip_without_arrays, "holds 'README.txt', which is not a "
                           'numeric array'),
    'not an npz or pth': ('ref.txt', lambda p: p.write_text('weights'),
                          'is not a checkpoint this command reads'),
}


@pytest.mark.parametrize('row', sorted(CONVERT_ROWS))
def test_convert_refuses_what_is_not_a_checkpoint(row, tmp_path, capsys):
  """Never unpickled (np.load(allow_pickle=False)); one sentence naming the file; no workdir."""
  name, make, expected = CONVERT_ROWS[row]
  reference = tmp_path / name
  make(reference)
  workdir = tmp_path / 'ported'
  code, err = _run_in_process(convert, [f'--reference={reference}', f'--workdir={workdir}',
                                        '--config=configs/cifar10.py:model=small'], capsys)
  line = _assert_one_error_line(code, err, expected)
  assert str(reference) in line
  assert not workdir.exists()


def test_device_data_and_memory_budgets(generated_data_dir, tmp_path, capsys, monkeypatch):
  """device_data beyond its device budget, and an eval batch or prefetched batches beyond this
  host's memory (shrunk here so that the sizes stay small), are refused by the config check."""
  argv = QUICK + [f'--workdir={tmp_path / "run"}', f'--config.data_dir={generated_data_dir}']
  monkeypatch.setattr(device_data, 'MAX_BYTES', 2 ** 20)
  _assert_one_error_line(*_run_in_process(main_cmd, argv + ['--config.device_data=True'], capsys),
                         'device_data=True would put 2.0 MiB of triangle/small images on every '
                         'device (at most 1.0 MiB)')
  monkeypatch.setattr(validation, '_host_memory_bytes', lambda: 3 * 2 ** 19)  # 1.5 MiB
  _assert_one_error_line(*_run_in_process(main_cmd, argv, capsys),
                         'eval_batch_size=256 needs 0.8 MiB of host memory per evaluation batch')
  monkeypatch.setattr(validation, '_host_memory_bytes', lambda: 2 ** 30)
  _assert_one_error_line(*_run_in_process(main_cmd, argv + ['--config.prefetch=3000'], capsys),
                         'prefetch=3000 batches of 64 need 752.9 MiB of host memory, more than '
                         "half of this host's 1.0 GiB")
  assert not (tmp_path / 'run').exists()


def test_eval_batch_larger_than_the_split_is_cut_to_it(generated_data_dir):
  """--config.eval_batch_size=1000000000 once tried to allocate 3.73 TiB; a batch larger than
  the split now holds the split (rounded up to the data shards), and the memory check counts
  that."""
  config = cli.load_config(str(ROOT / 'configs/triangle.py:quick'), QUICK[1:] + [
      f'--config.data_dir={generated_data_dir}', '--config.eval_batch_size=1000000000'])
  trainer = train.Trainer(config)
  assert trainer.eval_batch_size() == 200  # triangle/small's 200 test examples
  config.mesh.data = 8
  config.eval_batch_size = 200 * 8
  assert train.Trainer(config).eval_batch_size() == 200  # 200 divides over 8 devices


def test_bench_checks_its_paths_before_benchmarking(tmp_path, capsys, monkeypatch):
  """A --json (or --dump_hlo) that cannot be written is refused before anything is compiled or
  timed."""
  def never(*args, **kwargs):
    raise AssertionError('benchmarked before checking --json')

  monkeypatch.setattr(bench, 'benchmark', never)
  monkeypatch.setattr(bench, 'collective_report', never)
  for flags in ([], ['--collectives']):
    code, err = _run_in_process(bench, [f'--json={tmp_path}'] + flags, capsys)
    _assert_one_error_line(code, err, f'--json={tmp_path} is a folder; pass a file name')
  for flag in ('json', 'dump_hlo'):  # blank (an unset shell variable): it wrote nothing, exit 0
    code, err = _run_in_process(bench, [f'--{flag}='], capsys)
    _assert_one_error_line(code, err, f'--{flag} is empty (is the shell variable in it set?)')


def test_full_disk_at_start_up_names_the_lock(generated_data_dir, tmp_path, capsys, monkeypatch):
  """The lock is the first file a run writes; on a full disk (injected here, and for real in
  tests/test_faults.py where a tmpfs can be mounted) the error names it and no empty lock is
  left."""
  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(checkpointing.json, 'dump', disk_full)
  workdir = tmp_path / 'run'
  code, err = _run_in_process(main_cmd, QUICK + [f'--workdir={workdir}',
                                                 f'--config.data_dir={generated_data_dir}'],
                              capsys)
  _assert_one_error_line(code, err, f'Cannot write {workdir / checkpointing.LOCK_FILE}: No space '
                         'left on device; free space on that disk')
  assert not (workdir / checkpointing.LOCK_FILE).exists()


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
                       timeout=limit())
  _assert_one_error_line(out.returncode, out.stderr, expected)
  assert not workdir.exists()


_PATH_FLAGS = [('main', 'workdir'), ('prepare', 'data_dir'), ('compile', 'json'),
               ('bench', 'json'), ('bench', 'dump_hlo'), ('visualize', 'workdir'),
               ('visualize', 'out'), ('reproduce', 'out'), ('reproduce', 'data_dir'),
               ('reproduce', 'workdir_root'), ('show', 'out'), ('show', 'data_dir'),
               ('benchmark', 'data_dir'), ('convert', 'reference'), ('convert', 'workdir')]


@pytest.mark.parametrize('command,flag', _PATH_FLAGS)
def test_a_flag_s_tilde_is_the_home_folder(command, flag, tmp_path, monkeypatch):
  """bash leaves `~` in `--flag=~/x` as it is; every command expands it as the shell would, so
  that no folder named `~` appears in the current folder while TFDS, which expands it itself,
  writes into the home folder."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(
      f'ait_jax.{"data." if command in ("prepare", "show", "benchmark") else ""}{command}')
  monkeypatch.setenv('HOME', str(tmp_path))
  fv = cli.parse_flags(module.define_flags, [command, f'--{flag}=~/x'])
  assert fv[flag].value == str(tmp_path / 'x')


def test_tilde_in_config_fields_and_prepare_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(cwd)
  fv = cli.parse_flags(main_cmd.define_flags, ['main', '--config=triangle:quick',
                                               '--config.data_dir=~/tdata', '--workdir=~'])
  assert (fv.config.data_dir, fv.workdir) == (str(home / 'tdata'), str(home))
  code, err = _run_in_process(prepare, ['--dataset=triangle/small', '--data_dir=~/tdata'], capsys)
  assert code == 0, err
  assert (home / 'tdata' / 'triangle' / 'small').is_dir()
  assert list(cwd.iterdir()) == []  # no folder named ~
  assert not list(home.rglob('.incomplete*'))  # TFDS's scratch went with ours


def test_split_sizes_other_than_the_published_ones_get_one_line(generated_data_dir, capfd):
  """A dataset folder with far fewer records than the published split (e.g. built from a
  patched archive) trains, but says so at start-up, in one line."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = cli.load_config(str(ROOT / 'configs/triangle.py:quick'),
                           QUICK[1:] + [f'--config.data_dir={generated_data_dir}'])
  s = validation.validate(config)
  train.check_dataset_files(s)
  assert capfd.readouterr().err == ''  # the sizes it knows
  published = dataclasses.replace(s.info, num_train=50_000, num_test=200)
  train.check_dataset_files(dataclasses.replace(s, info=published))
  err = capfd.readouterr().err
  assert err.count('\n') == 1 and err.startswith(
      f'warning: triangle/small in {generated_data_dir} holds other split sizes than the '
      'published ones (train 512 examples, not 50,000); steps per epoch count the published '
      '50,000.'), err
