"""Faults from outside the config: a disk that fails or fills up while saving, damaged data and
checkpoints, torn metrics, kill -9 at any moment, and reproduce reruns that must never delete.

Every fault ends in one sentence (or one warning line and a success), no traceback, no hang, and
the last intact checkpoint kept. Runs that must be real processes (kill -9, a private tmpfs) are
forked from one warm "zygote" process, which has imported everything once, so that each run
costs its steps rather than Python's and JAX's start-up; the rest run in this process.
"""
import contextlib
import errno
import faulthandler
import io
import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ait_jax import checkpointing
from ait_jax import cli
from ait_jax import main as main_cmd
from ait_jax import metric_writer
from ait_jax import reproduce
from ait_jax import train
from ait_jax import visualize
from conftest import limit, once_per_run, ROOT, xla_flags

# absl log records (W1129 15:27:08.78 ... file.py:12] text) and libtpu's start-up notes (it is
# installed, and probes for a TPU) are not error output.
_NOISE = re.compile(r'^([IWEF]\d{4} |Failed to find host bounds|WARNING: Logging before|'
                    r'=== Source Location|learning/|E0000 )')
QUICK = ['--config=configs/triangle.py:quick', '--config.dataset=triangle/small',
         '--config.mesh.data=1', '--config.log_every_steps=1']
# One tiny run for every test here: the same total_steps and eval batch (both are compiled into
# the steps), so that after the first run each loads its steps from the compilation cache.
TINY = dict(total_steps=12, checkpoint_every_steps=2, eval_every_steps=4, eval_batch_size=40,
            keep_checkpoints=20, log_every_steps=1)
HANG = limit()  # seconds: a safety net against a hang, not a speed check


@contextlib.contextmanager
def no_hang(seconds: int = HANG):
  """Ends this process with every thread's traceback if the block hangs (the test then fails
  as a crashed worker instead of hanging the suite)."""
  faulthandler.dump_traceback_later(seconds, exit=True)
  try:
    yield
  finally:
    faulthandler.cancel_dump_traceback_later()


def _error_lines(err: str) -> list[str]:
  return [l for l in err.splitlines() if l.strip() and not _NOISE.match(l)]


def _assert_one_error(code, err, *fragments):
  lines = _error_lines(err)
  assert code == cli.EXIT_USER_ERROR, err
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for fragment in fragments:
    assert str(fragment) in lines[0], lines[0]
  return lines[0]


@contextlib.contextmanager
def _absl_log():
  """What absl's log records print, with their tracebacks, as lines 'W0000 message' (absl's own
  handler may still write to a stream of an earlier test's capture)."""
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  handler.setFormatter(logging.Formatter('%(levelname).1s0000 %(message)s'))
  handler.setLevel(logging.WARNING)
  logger = logging.getLogger('absl')
  logger.addHandler(handler)
  try:
    yield stream
  finally:
    logger.removeHandler(handler)


def _run(module, argv, capfd):
  """`python -m ait_jax.<module>` in this process: (exit code, stdout, stderr at the fd level
  plus the log records)."""
  with no_hang(), _absl_log() as log, pytest.raises(SystemExit) as exit_info:
    cli.run(module.define_flags, module.main, [module.__name__] + argv)
  out, err = capfd.readouterr()
  return exit_info.value.code, out, err + log.getvalue()


def _run_main(argv, capfd):
  return _run(main_cmd, argv, capfd)


def _files(folder: pathlib.Path) -> dict:
  """Every file under folder with its bytes: 'unchanged' means byte for byte."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file()}


def _restorable(config, workdir, step):
  """The latest checkpoint of workdir is `step` and restores, with finite parameters."""
  trainer = train.Trainer(config)
  restored_step, state = trainer.restore(str(workdir), 'latest')
  assert restored_step == step
  import jax  # pylint: disable=g-import-not-at-top
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def _config(data_dir, **overrides):
  from test_train import quick_config  # pylint: disable=g-import-not-at-top
  return quick_config(data_dir, **{**TINY, **overrides})


def _argv(workdir, data_dir, **overrides):
  """The command line of a TINY run, with `overrides`."""
  return QUICK + [f'--workdir={workdir}', f'--config.data_dir={data_dir}'] + [
      f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]


# ---------------------------------------------------------------------------------------------
# A save that fails while training: permissions, a full disk, a vanished bucket.

def _fail_commits_from(monkeypatch, error):
  """The orbax boundary: from now on the background commit of a checkpoint (the renames of its
  finished temporary folders) raises `error`, as a read-only folder, a full disk or a deleted
  bucket makes it do (tests/test_faults.py's tmpfs test fills a real disk where it can)."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top

  async def rename(src, dst):
    raise error(str(dst)) if callable(error) else error

  monkeypatch.setattr(async_path, 'rename', rename)


def _make_unwritable(folder: pathlib.Path) -> bool:
  """Makes `folder` refuse new entries for real: chmod for a normal user, the immutable flag for
  root (whom chmod does not stop); False when neither works here."""
  if os.geteuid() != 0:
    folder.chmod(0o555)
    return True
  if shutil.which('chattr') is None:
    return False
  return subprocess.run(['chattr', '+i', str(folder)], capture_output=True).returncode == 0


def _make_writable(folder: pathlib.Path) -> None:
  if not folder.exists():
    return
  if os.geteuid() != 0:
    folder.chmod(0o755)
  elif shutil.which('chattr'):
    subprocess.run(['chattr', '-i', str(folder)], capture_output=True)


DISK_FULL = ValueError('RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database: Failed '
                       'writing: No space left on device')


@pytest.mark.parametrize('fault,when', [('unwritable folder', 'training'),
                                        ('disk full', 'training'), ('disk full', 'preempted')])
def test_failing_save_stops_in_one_sentence(fault, when, generated_data_dir, tmp_path, capfd,
                                            monkeypatch):
  """Saves every 2 steps; once step 2 is on disk, saving breaks (at step 4, or at the
  preemption save of step 3). The run stops at that save, at the latest when the next one would
  start, in one sentence naming the folder, the step and step 2 (the last intact checkpoint),
  which still restores, byte for byte as it was; a failed preemption save is not reported as
  saved, and no orbax thread is left waiting (which kept the process alive: the hang).

  'unwritable folder' makes the checkpoints folder refuse writes for real where it can (chmod,
  or for root, whom chmod does not stop, the immutable flag), else at the orbax boundary."""
  failing = 4 if when == 'training' else 3
  workdir = tmp_path / 'run'
  ckpts = workdir / 'checkpoints'
  save, kept, fragment = checkpointing.Checkpointer.save, {}, ['RESOURCE_EXHAUSTED']

  def break_then_save(self, step, *args, **kwargs):
    if step == failing:
      self.wait()  # step 2 is on disk
      kept.update(_files(ckpts / '2'))
      if fault == 'disk full':
        _fail_commits_from(monkeypatch, DISK_FULL)
      elif _make_unwritable(ckpts):
        fragment[0] = 'Operation not permitted' if os.geteuid() == 0 else 'Permission denied'
      else:
        _fail_commits_from(monkeypatch, lambda dst: PermissionError(
            errno.EACCES, 'Permission denied', dst))
        fragment[0] = 'Permission denied'
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing.Checkpointer, 'save', break_then_save)
  if when == 'preempted':
    monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop',
                        lambda self, step, manager: step == 3)
  try:
    code, out, err = _run_main(_argv(workdir, generated_data_dir), capfd)
  finally:
    _make_writable(ckpts)
  line = _assert_one_error(code, err, f'Saving the checkpoint of step {failing} into {ckpts} '
                           'failed', fragment[0], f'The last intact checkpoint is step 2 in {ckpts}')
  assert 'the state in memory is not saved' in line
  assert 'saved step' not in out  # a failed preemption save is not reported as saved
  assert '[train] step 7:' not in out  # stopped by the next save at the latest
  # No orbax thread is left waiting for the failed save (it would keep the process from exiting
  # for orbax's coordination timeout, minutes: the hang of a failing save). One that is ending is
  # waited for with threading's own join: orbax's raises CancelledError for a cancelled signal,
  # which a busy machine leaves still listed here (seen under load, never on an idle machine).
  waiting = [t for t in threading.enumerate() if type(t).__name__ == '_SignalingThread']
  for thread in waiting:
    threading.Thread.join(thread, limit(60))
  assert not [t for t in waiting if t.is_alive()]
  assert not (workdir / checkpointing.LOCK_FILE).exists()
  assert _files(ckpts / '2') == kept
  monkeypatch.undo()
  _restorable(_config(generated_data_dir), workdir, 2)


@pytest.mark.parametrize('error,user', [
    (PermissionError(errno.EACCES, 'Permission denied', '/w/checkpoints/4'), True),
    (DISK_FULL, True),
    (ValueError('NOT_FOUND: Error writing "params/0": The specified bucket does not exist.'), True),
    (None, True),  # orbax logged the failure and carried on: the step's folder is missing
    (TypeError("unsupported operand type(s) for +: 'int' and 'str'"), False),  # a bug
])
def test_save_failure_sentence(error, user, tmp_path):
  """Which failures of a save are the disk's or the bucket's (one sentence, exit 2) and which
  are bugs (a RuntimeError that keeps the traceback of its cause)."""
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  try:
    with pytest.raises(Exception) as raised:
      ckpt._fail(ckpt.latest, 4, error)  # pylint: disable=protected-access
  finally:
    ckpt.close()
  assert cli.is_user_error(raised.value) == user
  assert isinstance(raised.value, checkpointing.CheckpointSaveError if user else RuntimeError)
  assert raised.value.__cause__ is error
  assert str(raised.value).startswith(f'Saving the checkpoint of step 4 into {tmp_path}')
  assert 'There is no intact checkpoint yet' in str(raised.value)


_MOUNT_TMPFS = r'''
import ctypes, os, subprocess
CLONE_NEWNS = 0x00020000
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(CLONE_NEWNS) != 0:  # a private mount namespace: the tmpfs vanishes with us
  raise SystemExit(97)
subprocess.run(['mount', '--make-rprivate', '/'], check=True, capture_output=True)
subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size={size}', 'tmpfs', {mount!r}], check=True,
               capture_output=True)
if {fill}:
  fd = os.open(os.path.join({mount!r}, 'fill'), os.O_WRONLY | os.O_CREAT)
  try:
    while True:
      os.write(fd, b'0' * 4096)
  except OSError:
    os.close(fd)
import atexit, shutil
atexit.register(shutil.copytree, {mount!r}, {copy!r}, symlinks=True)
'''


def _can_mount() -> bool:
  return os.geteuid() == 0 and shutil.which('mount') is not None and shutil.which('unshare') and \
      subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode == 0


@pytest.mark.parametrize('moment', ['mid-run', 'start-up'])
def test_disk_that_fills_up(moment, zygote, generated_data_dir, tmp_path):
  """A real tmpfs, mounted in the run's own mount namespace: 10 MB fill up after about three
  checkpoints (each ~3 MB, with the best one); at start-up the disk is full before the lock is
  written."""
  if not _can_mount():
    pytest.skip('cannot mount a tmpfs here; test_failing_save_stops_in_one_sentence injects the '
                'full disk at the orbax boundary instead')
  mount, copy = tmp_path / 'tmpfs', tmp_path / 'copy'
  mount.mkdir()
  workdir = mount / 'run'
  setup = _MOUNT_TMPFS.format(size='10m' if moment == 'mid-run' else '64k', mount=str(mount),
                              fill=moment == 'start-up', copy=str(copy))
  child = zygote.start('main', _argv(workdir, generated_data_dir), tmp_path, setup=setup)
  code = zygote.wait(child)
  if code == 97:
    pytest.skip('no mount namespace here')
  err = child.err()
  if moment == 'start-up':
    _assert_one_error(code, err, f'Cannot write {workdir / checkpointing.LOCK_FILE}',
                      'No space left on device')
    assert not (copy / 'run' / checkpointing.LOCK_FILE).exists()  # no empty lock left
    return
  # Whichever write meets the full disk first says so in one sentence: a checkpoint's save (with
  # the last intact step), or the metrics or TensorBoard file (naming it).
  line = _assert_one_error(code, err)
  if 'Saving the checkpoint' in line:
    assert f'into {workdir / "checkpoints"} failed (' in line, line
    last = int(re.search(r'The last intact checkpoint is step (\d+)', line).group(1))
  else:
    assert re.match(rf'error: Cannot write {re.escape(str(workdir))}/\S+: No space left on device',
                    line), line
    ckpt = checkpointing.Checkpointer(str(copy / 'run'))
    last = ckpt.last_intact_step()
    ckpt.close()
    assert last is not None, line
  assert not (copy / 'run' / checkpointing.LOCK_FILE).exists()
  _restorable(_config(generated_data_dir), copy / 'run', last)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and data.

@pytest.fixture(scope='module')
def saved_run(generated_data_dir, tmp_path_factory):
  """A TINY run stopped (as on SIGTERM) at step 4: checkpoints of steps 2 and 4, a metrics row
  per step and the eval of step 4."""
  workdir = tmp_path_factory.mktemp('saved_run')
  config = _config(generated_data_dir)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpointing.PreemptionFlag, 'should_stop', lambda self, step, _: step == 4)
    assert train.train_and_evaluate(config, str(workdir))['preempted']
  return config, workdir


def _copy_run(saved_run, tmp_path):
  config, source = saved_run
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  return config, workdir


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')  # 'Event loop is closed'
def test_damaged_checkpoint_skip_is_one_warning(saved_run, generated_data_dir, tmp_path, capfd):
  """Garbage in the newest checkpoint's folder (its metadata, its arrays and files added); the
  resume skips it with one warning line, sets it aside, and exits 0; step 2 stays as it was."""
  _, workdir = _copy_run(saved_run, tmp_path)
  step_dir = workdir / 'checkpoints' / '4'
  rng = np.random.default_rng(0)
  for path in [step_dir / '_CHECKPOINT_METADATA', step_dir / 'state' / 'manifest.ocdbt'] + [
      p for p in (step_dir / 'state').rglob('*') if p.is_file() and 'ocdbt.process' in str(p)]:
    path.write_bytes(rng.bytes(300))
  for name in ('x', 'state/y', 'data/z'):
    (step_dir / name).write_bytes(rng.bytes(300))
  kept = _files(workdir / 'checkpoints' / '2')
  code, out, err = _run_main(_argv(workdir, generated_data_dir), capfd)
  assert code == 0, err
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err
  logged = [l for l in err.splitlines() if re.match(r'^[WEF]0000 ', l)]
  assert _error_lines(err) == [] and len(logged) == 1, err
  assert 'Skipping the damaged checkpoint of step 4' in logged[0], err
  assert 'Resumed from step 2' in out
  assert _files(workdir / 'checkpoints' / '2') == kept
  moved, = (workdir / checkpointing.DAMAGED_DIR).iterdir()
  assert moved.name.startswith('checkpoints_4_')


def _damage_mid_file(path: pathlib.Path, info, split, data_dir) -> None:
  """Random bytes over a band inside an ArrayRecord file, where the start-up check (the first and
  last records) does not look: the first band of a few that leaves those two readable (Triangle's
  records fill the first half of its file, its index the middle)."""
  from ait_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  original = path.read_bytes()
  rng = np.random.default_rng(1)
  for start, end in ((0.1, 0.45), (0.3, 0.7), (0.2, 0.3), (0.6, 0.9)):
    damaged = bytearray(original)
    a, b = int(len(original) * start), int(len(original) * end)
    damaged[a:b] = rng.bytes(b - a)
    path.write_bytes(bytes(damaged))
    source = input_pipeline.ExampleSource(info, split, data_dir)
    try:
      source.read([0, len(source) - 1])
    except input_pipeline.DamagedDataError:
      continue
    with pytest.raises(input_pipeline.DamagedDataError):
      source.read(np.arange(len(source)))  # passes the start-up check, not a full read
    return
  pytest.fail('found no damage that the start-up check misses')


@pytest.mark.parametrize('split', ['train', 'test'])
def test_data_damaged_mid_run_is_the_start_up_sentence(split, generated_data_dir, tmp_path,
                                                       capfd, monkeypatch):
  """train: random bytes mid-file pass the start-up check, then grain's reader thread meets
  them; test: the test split is overwritten with garbage after training started, and the first
  evaluation meets it. Both end in the start-up check's sentence, with a checkpoint from before
  kept (one is saved every step)."""
  from ait_jax.data import datasets  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'data'
  shutil.copytree(generated_data_dir, data_dir)
  info = datasets.get_info('triangle/small')
  record, = (data_dir / 'triangle/small').glob(f'*/*{split}.array_record*')
  if split == 'train':  # damage the start-up check misses, written into the file mid-run
    original = record.read_bytes()
    _damage_mid_file(record, info, 'train', str(data_dir))
    damaged = record.read_bytes()
    record.write_bytes(original)
  else:  # garbage over the whole file
    damaged = np.random.default_rng(2).bytes(record.stat().st_size)
  write = metric_writer.MetricWriter.write

  def write_then_damage(self, step, metrics, prefix):
    write(self, step, metrics, prefix)
    if step == 2:
      with open(record, 'r+b') as f:  # in place, as a failing disk would
        f.write(damaged)

  monkeypatch.setattr(metric_writer.MetricWriter, 'write', write_then_damage)
  workdir = tmp_path / 'run'
  code, _, err = _run_main(_argv(workdir, data_dir, checkpoint_every_steps=1), capfd)
  _assert_one_error(code, err, f'The {split} split of triangle/small in {data_dir} cannot be read',
                    'truncated or damaged', 'python -m ait_jax.data.prepare')
  ckpt = checkpointing.Checkpointer(str(workdir))
  kept = ckpt.latest_step()
  ckpt.close()
  assert kept is not None and kept >= 2
  monkeypatch.undo()
  _restorable(_config(generated_data_dir), workdir, kept)


# ---------------------------------------------------------------------------------------------
# metrics.jsonl: torn lines and rows past the checkpoint; one reader for all.

def test_resume_moves_aside_what_lies_past_its_checkpoint(saved_run, generated_data_dir,
                                                         tmp_path, capfd):
  """What kill -9 leaves when the best checkpoint of step 4 was committed and the latest was not,
  after step 5's row: rows (steps 3 to 5, and the evaluations of step 4) and a best checkpoint
  past the checkpoint of step 2, and a torn last line. The resume moves them aside, with a copy
  of metrics.jsonl as it was and the line saying where; every step then appears once and
  parses, and the best checkpoint is this run's."""
  _, workdir = _copy_run(saved_run, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  best = _files(workdir / 'best' / '4')
  metrics = workdir / metric_writer.METRICS_FILE
  with open(metrics, 'ab') as f:
    f.write(b'{"step": 5, "split": "train", "loss": 9.0}\n{"step": 6, "split": "train", "lo')
  before = metrics.read_bytes()
  code, out, err = _run_main(_argv(workdir, generated_data_dir), capfd)
  assert code == 0 and 'Traceback' not in err, err
  aside, = (workdir / checkpointing.SET_ASIDE_DIR).iterdir()
  assert (f'Moved 5 rows of {metrics} past step 2 and 1 unreadable line(s) aside: the file as '
          f'it was is kept as {aside / metric_writer.METRICS_FILE}') in out, out
  assert (aside / metric_writer.METRICS_FILE).read_bytes() == before
  assert (f'Moved the best checkpoint of step 4 into {aside}: they are past step 2, where this '
          'run resumes') in out, out
  assert _files(aside / 'best' / '4') == best
  rows = [json.loads(l) for l in metrics.read_text().splitlines()]  # every line parses
  assert [r['step'] for r in rows if r['split'] == 'train'] == list(range(1, 13))
  assert [r for r in rows if r['step'] == 5][0]['loss'] != 9.0
  evals = {r['step']: r['accuracy'] for r in rows if r['split'] == 'eval'}
  ckpt = checkpointing.Checkpointer(str(workdir))
  try:
    assert ckpt.best.best_step() == max(evals, key=lambda s: (evals[s], -s))
  finally:
    ckpt.close()


def test_fresh_start_over_an_earlier_run_is_refused_until_restart(saved_run, generated_data_dir,
                                                                  tmp_path, capfd):
  """checkpoints/ removed (by hand, or lost), then the command again with another lr: a fresh
  start there would drop that run's metrics and keep its best checkpoint as this run's. It is
  refused in one sentence, touching nothing; with --restart the earlier run is moved aside,
  byte for byte, and the new run's best checkpoint and metrics are its own."""
  _, workdir = _copy_run(saved_run, tmp_path)
  shutil.rmtree(workdir / 'checkpoints')
  before = _files(workdir)
  argv = _argv(workdir, generated_data_dir) + ['--config.lr=1e-6']
  code, out, err = _run_main(argv, capfd)
  _assert_one_error(code, err, f'{workdir} holds an earlier run (metrics up to step 4, the best '
                    'checkpoint of step 4) but no checkpoint to resume it from', '--restart')
  assert 'Resuming' not in out
  assert _files(workdir) == before
  code, out, err = _run_main(argv + ['--restart'], capfd)
  assert code == 0 and 'Traceback' not in err, err
  aside, = (workdir / checkpointing.SET_ASIDE_DIR).iterdir()
  assert f'--restart: moved what {workdir} held into {aside}' in out, out
  assert 'Resuming' not in out
  assert _files(aside) == before
  rows = [json.loads(l) for l in (workdir / metric_writer.METRICS_FILE).read_text().splitlines()]
  assert [r['step'] for r in rows if r['split'] == 'train'] == list(range(1, 13))
  evals = {r['step']: r['accuracy'] for r in rows if r['split'] == 'eval'}
  ckpt = checkpointing.Checkpointer(str(workdir))
  try:
    assert ckpt.best.all_steps() == [max(evals, key=lambda s: (evals[s], -s))]
  finally:
    ckpt.close()


def test_fresh_start_after_a_run_killed_before_its_first_save(generated_data_dir, tmp_path,
                                                             capfd):
  """A run killed at step 1, before its first checkpoint (step 2), then the command again with
  another lr: it starts afresh without --restart, but nothing is dropped: the metrics row and the
  other config.json are moved aside, and no line speaks of resuming."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / metric_writer.METRICS_FILE).write_text(
      '{"step": 1, "split": "train", "loss": 9.0}\n')
  config = _config(generated_data_dir)
  (workdir / train.CONFIG_FILE).write_text(config.to_json())
  code, out, err = _run_main(_argv(workdir, generated_data_dir) + ['--config.lr=1e-6'], capfd)
  assert code == 0 and 'Traceback' not in err, err
  aside, = (workdir / checkpointing.SET_ASIDE_DIR).iterdir()
  assert 'Resuming' not in out, out
  assert f'Moved config.json of another config (lr 0.001 -> 1e-06) into {aside}' in out, out
  assert json.loads((aside / train.CONFIG_FILE).read_text())['lr'] == config.lr
  assert '"loss": 9.0' in (aside / metric_writer.METRICS_FILE).read_text()
  assert json.loads((workdir / train.CONFIG_FILE).read_text())['lr'] == 1e-6


def test_every_reader_skips_what_it_cannot_parse(saved_run, tmp_path, capfd):
  _, workdir = _copy_run(saved_run, tmp_path)
  metrics = workdir / metric_writer.METRICS_FILE
  rows = len(metrics.read_text().splitlines())
  with open(metrics, 'ab') as f:
    f.write(b'\xff\xfe not utf-8\n{"step": 7, "split": "train", "lo')  # bad bytes, a torn line
  assert len(metric_writer.read_metrics(metrics)) == rows
  err = capfd.readouterr().err
  assert err.count('warning: skipped 2 unreadable line(s) of') == 1 and str(metrics) in err
  out = tmp_path / 'figures'
  code, _, err = _run(visualize, [f'--workdir={workdir}', f'--out={out}', '--checkpoint=latest'],
                      capfd)
  assert code == 0, err
  assert 'Traceback' not in err
  assert _error_lines(err) == [f'warning: skipped 2 unreadable line(s) of {metrics} (a '
                                        'run killed while writing leaves a torn last line); '
                                        f'using the other {rows}.']
  assert (out / 'training_curves.png').exists()


# ---------------------------------------------------------------------------------------------
# One rule for a workdir's config.

@pytest.mark.parametrize('override,field,old,new', [
    ('model.bottleneck_k=32', 'model.bottleneck_k', '64', '32'),
    ('batch_size=32', 'batch_size', '64', '32'),
    ('seed=1', 'seed', '0', '1'),
    ('grad_clip_norm=1.0', 'grad_clip_norm', '0.0', '1.0'),
])
def test_resume_refuses_a_field_that_changes_the_run(override, field, old, new, saved_run,
                                                     generated_data_dir, tmp_path, capfd):
  _, workdir = _copy_run(saved_run, tmp_path)
  before = _files(workdir)
  code, _, err = _run_main(_argv(workdir, generated_data_dir) + [f'--config.{override}'], capfd)
  line = _assert_one_error(code, err, f'{field}={old}', f'{field}={new}', str(workdir),
                           f'pass --config.{field}={old}')
  assert 'config.json' in line
  assert _files(workdir) == before  # config.json, metrics, checkpoints: untouched


def test_resume_records_a_field_that_may_change(saved_run, generated_data_dir, tmp_path, capfd):
  config, workdir = _copy_run(saved_run, tmp_path)
  code, out, err = _run_main(_argv(workdir, generated_data_dir, checkpoint_every_steps=3,
                                   eval_every_steps=6, log_every_steps=2), capfd)
  assert code == 0, err
  assert ('Resuming with a changed config (checkpoint_every_steps 2 -> 3; eval_every_steps 4 -> '
          '6; log_every_steps 1 -> 2)') in out, out
  saved = json.loads((workdir / 'config.json').read_text())
  assert (saved['checkpoint_every_steps'], saved['eval_every_steps']) == (3, 6)
  assert not list(workdir.glob('config.json.tmp*'))  # written, then renamed
  assert set(train.RESUMABLE_FIELDS) <= set(train._flat(json.loads(config.to_json())))  # pylint: disable=protected-access


def test_eval_mode_refuses_another_model(saved_run, generated_data_dir, capfd):
  _, workdir = saved_run
  code, _, err = _run_main(_argv(workdir, generated_data_dir) + [
      '--mode=eval', '--config.model.memory_momentum=0.5'], capfd)
  _assert_one_error(code, err, 'model.memory_momentum=0.9', 'model.memory_momentum=0.5')


# ---------------------------------------------------------------------------------------------
# reproduce: resumes, reuses, refuses; never deletes without --restart.

def _tiny_runs(**changes):
  quick = {'dataset': 'triangle/small', 'mesh.data': 1, 'log_every_steps': 1, **TINY, **changes}
  return {'cpu': {'tiny_a': ('triangle', 'quick', dict(quick)),
                  'tiny_b': ('triangle', 'quick', dict(quick, seed=1))}}


def _reproduce_argv(root, data_dir, *extra):
  # One run at a time, in the process under test (--jobs=2, the cpu scale's default, trains in
  # child processes: tests/test_run_pool.py).
  return [f'--out={root / "out"}', f'--data_dir={data_dir}', f'--workdir_root={root / "work"}',
          '--jobs=1', *extra]


@pytest.fixture(scope='module')
def reproduced(generated_data_dir, tmp_path_factory, request):
  """A finished reproduce of the two tiny runs (its --out and its workdirs), forked from the
  zygote once per test run (pytest-xdist's workers share it): the uninterrupted reference of the
  kill tests (its tiny_a is the command they run) and what the rerun tests copy."""
  def build(root):
    zygote = request.getfixturevalue('zygote')  # started only where the run is built
    child = zygote.start('reproduce', _reproduce_argv(root, generated_data_dir),
                         root.with_name(root.name + '_logs'), setup=_TINY_RUNS_SETUP)
    assert zygote.wait(child) == 0, child.err()
  return once_per_run(tmp_path_factory, 'reproduced', build)


@pytest.fixture
def tiny_reproduce(reproduced, generated_data_dir, tmp_path, monkeypatch):
  """A copy of `reproduced` to rerun: (argv, the workdirs' folder)."""
  shutil.copytree(reproduced, tmp_path / 'root')
  monkeypatch.setattr(reproduce, 'RUNS', _tiny_runs())
  return _reproduce_argv(tmp_path / 'root', generated_data_dir), tmp_path / 'root' / 'work' / 'cpu'


def _summary(argv) -> dict:
  out = pathlib.Path(argv[0].split('=', 1)[1])
  runs = json.loads((out / 'summary.json').read_text())['runs']
  return {run: r['eval'] for run, r in runs.items()}


def test_reproduce_reuses_a_finished_run(tiny_reproduce, capfd):
  argv, root = tiny_reproduce
  before, summary = _files(root), _summary(argv)
  code, out, err = _run(reproduce, argv, capfd)
  assert code == 0, err
  assert out.count('reusing the finished run in') == 2
  assert _files(root) == before  # not retrained, not deleted
  assert _summary(argv) == summary


def test_reproduce_resumes_a_partial_run(tiny_reproduce, capfd):
  """tiny_a as a run stopped at step 10 leaves it (no step 12, no eval_final.json)."""
  argv, root = tiny_reproduce
  shutil.rmtree(root / 'tiny_a' / 'checkpoints' / '12')
  (root / 'tiny_a' / 'eval_final.json').unlink()
  kept = _files(root / 'tiny_a' / 'checkpoints' / '10')
  summary = _summary(argv)
  code, out, err = _run(reproduce, argv, capfd)
  assert code == 0, err
  assert 'Resumed from step 10' in out and out.count('reusing the finished run in') == 1
  assert _files(root / 'tiny_a' / 'checkpoints' / '10') == kept
  assert _summary(argv) == summary


@pytest.mark.parametrize('damage', ['missing', 'torn'])
def test_killed_after_the_final_save_writes_eval_final(damage, tiny_reproduce, capfd):
  """A kill between the final checkpoint and eval_final.json (or while writing it): the rerun
  evaluates that step and writes the file (reproduce reads it), with the result of the
  uninterrupted run; a torn one is moved aside first, not kept as the run's result."""
  _, root = tiny_reproduce
  workdir = root / 'tiny_a'
  final = json.loads((workdir / 'eval_final.json').read_text())
  if damage == 'missing':
    (workdir / 'eval_final.json').unlink()
  else:
    (workdir / 'eval_final.json').write_text('{"step": 12, "accura')
  code, out, err = _run_main(_argv(workdir, json.loads(
      (workdir / 'config.json').read_text())['data_dir']), capfd)
  assert code == 0, err
  assert 'nothing to train' in out
  assert json.loads((workdir / 'eval_final.json').read_text()) == final
  if damage == 'torn':
    aside, = (workdir / checkpointing.SET_ASIDE_DIR).iterdir()
    assert (aside / 'eval_final.json').read_text() == '{"step": 12, "accura'


def test_reproduce_refuses_another_config_and_a_locked_workdir(tiny_reproduce, monkeypatch,
                                                               capfd):
  argv, root = tiny_reproduce
  before = _files(root)
  runs = _tiny_runs()
  runs['cpu']['tiny_b'][2]['model.bottleneck_k'] = 32
  monkeypatch.setattr(reproduce, 'RUNS', runs)
  code, _, err = _run(reproduce, argv, capfd)
  _assert_one_error(code, err, f'Run tiny_b: {root / "tiny_b"} holds a run with '
                    'model.bottleneck_k=64', '--restart')
  assert _files(root) == before
  monkeypatch.setattr(reproduce, 'RUNS', _tiny_runs())
  shutil.rmtree(root / 'tiny_a' / 'checkpoints' / '12')  # tiny_a would resume, if anything ran
  (root / 'tiny_a' / 'eval_final.json').unlink()
  holder = subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()'])
  try:
    (root / 'tiny_b' / checkpointing.LOCK_FILE).write_text(
        json.dumps({'host': os.uname().nodename, 'pid': holder.pid}))
    before = _files(root)
    for extra in ([], ['--restart']):
      code, _, err = _run(reproduce, argv + extra, capfd)
      _assert_one_error(code, err, f'Run tiny_b: {root / "tiny_b"} is in use by pid {holder.pid}')
      assert _files(root) == before  # nothing trained or deleted first, not even tiny_a
  finally:
    holder.kill()
    holder.wait()


def test_reproduce_restart_moves_aside_and_retrains(tiny_reproduce, capfd):
  """--restart moves what the workdir held into its set_aside/ folder, the way `main --restart`
  does (checkpointing.set_aside_run), and retrains: nothing is deleted."""
  argv, root = tiny_reproduce
  marker = root / 'tiny_a' / 'note.txt'
  marker.write_text('from the earlier run')
  before = _files(root / 'tiny_a')
  summary = _summary(argv)
  code, out, err = _run(reproduce, argv + ['--restart', '--only=tiny_a'], capfd)
  assert code == 0, err
  aside, = (root / 'tiny_a' / checkpointing.SET_ASIDE_DIR).iterdir()
  assert f'--restart: moved what {root / "tiny_a"} held into {aside}' in out, out
  assert _files(aside) == before  # every file of the earlier run, byte for byte
  assert not marker.exists() and 'reusing' not in out
  assert _summary(argv)['tiny_a'] == summary['tiny_a']  # retrained from scratch, same result


# ---------------------------------------------------------------------------------------------
# The tests under a user's XLA_FLAGS.

_SHOW_TEST_SETUP = (
    'import os, sys, warnings; sys.path.insert(0, "tests"); import conftest, jax; '
    'print(jax.device_count(), conftest.xla_flags(1), conftest.xla_flag_conflicts(), sep="|")')


@pytest.mark.parametrize('user_flags', ['--xla_cpu_enable_fast_math=false', '',
                                        '--xla_force_host_platform_device_count=2'])
def test_the_tests_add_their_xla_flags_to_the_user_s(user_flags):
  """GPU hosts and NVIDIA's JAX containers set XLA_FLAGS: the tests keep the user's flags, add
  their own (8 devices here, and in the commands they run), and name a user flag they replace."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTEST_XDIST_WORKER', 'AIT_JAX_TESTS_USER_XLA_FLAGS')}  # as a user's
  env['XLA_FLAGS'] = user_flags
  out = subprocess.run([sys.executable, '-c', _SHOW_TEST_SETUP], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=limit(120))
  devices, one_device_flags, conflicts = out.stdout.strip().split('|')
  assert devices == '8', out.stderr
  assert '--xla_force_host_platform_device_count=1' in one_device_flags
  if user_flags.startswith('--xla_cpu'):
    assert one_device_flags.startswith(user_flags)
  assert ('device_count=2' in conflicts) == ('device_count=2' in user_flags)


# ---------------------------------------------------------------------------------------------
# kill -9, for real: processes forked from a warm zygote.

_ZYGOTE = r'''
import json, os, sys
sys.path.insert(0, 'tests')
from ait_jax import cli, main, reproduce, train, visualize  # imported once, before any backend
MODULES = {'main': main, 'reproduce': reproduce}
print('ready', flush=True)
for line in sys.stdin:
  job = json.loads(line)
  if job['op'] == 'wait':
    deadline, code = job['deadline'], None
    import time
    while time.time() < deadline:
      pid, status = os.waitpid(job['pid'], os.WNOHANG)
      if pid:
        code = os.waitstatus_to_exitcode(status)
        break
      time.sleep(0.02)
    if code is None:  # a hang: end it, and say so
      os.kill(job['pid'], 9)
      os.waitpid(job['pid'], 0)
    print(json.dumps(code), flush=True)
    continue
  pid = os.fork()
  if pid:
    print(pid, flush=True)
    continue
  # The child: the command itself, with its own output files and a normal interpreter exit
  # (threads joined, atexit run), as `python -m` would end.
  for fd, name in ((1, 'stdout'), (2, 'stderr')):
    os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  exec(job['setup'], {'__name__': 'setup'})
  module = MODULES[job['module']]
  cli.run(module.define_flags, module.main, [module.__name__] + job['argv'])
'''


class Child:
  def __init__(self, pid, folder):
    self.pid, self.folder = pid, folder

  def _read(self, name) -> str:
    path = self.folder / name
    return path.read_text(errors='replace') if path.exists() else ''  # not opened yet

  def out(self) -> str:
    return self._read('stdout')

  def err(self) -> str:
    return self._read('stderr')


class Zygote:
  """One process that imported ait_jax (not yet any JAX backend) and forks a command on demand.
  Its commands see 8 virtual devices, as this process does, so that a run resumed here (on one of
  them, mesh.data=1) continues what a forked run began on the same kind of XLA client: with 1
  device in the fork and XLA's fusion emitters on, the same run's eval loss once differed from
  this process's at the 8th digit."""

  def __init__(self):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS='cpu', OPENBLAS_NUM_THREADS='1',
               PYTHONPATH=str(ROOT))
    self.proc = subprocess.Popen([sys.executable, '-c', _ZYGOTE], cwd=ROOT, env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert self.proc.stdout.readline().strip() == 'ready'
    self.count = 0

  def _ask(self, job) -> str:
    self.proc.stdin.write(json.dumps(job) + '\n')
    self.proc.stdin.flush()
    return self.proc.stdout.readline().strip()

  def start(self, module, argv, folder, setup='') -> Child:
    self.count += 1
    folder = pathlib.Path(folder) / f'child_{self.count}'
    folder.mkdir(parents=True)
    pid = int(self._ask({'op': 'run', 'module': module, 'argv': [str(a) for a in argv],
                         'setup': setup, 'stdout': str(folder / 'stdout'),
                         'stderr': str(folder / 'stderr')}))
    return Child(pid, folder)

  def wait(self, child, timeout=HANG):
    """The child's exit code (negative: the signal that ended it); fails the test on a hang."""
    code = json.loads(self._ask({'op': 'wait', 'pid': child.pid, 'deadline': time.time() + timeout}))
    assert code is not None, f'hang: pid {child.pid} ran past {timeout} s\n{child.out()}\n{child.err()}'
    return code

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=limit())


@pytest.fixture(scope='module')
def zygote():
  z = Zygote()
  yield z
  z.close()


def _wait_for(child, event, timeout=HANG) -> bool:
  """Polls for an observed event (a line printed, a folder written); False if the child ended
  first. `event` takes the child and says whether it happened."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if event(child):
      return True
    try:
      os.kill(child.pid, 0)
    except ProcessLookupError:
      return False
    if os.path.exists(f'/proc/{child.pid}/stat') and open(
        f'/proc/{child.pid}/stat').read().split(') ')[1].startswith('Z'):
      return False  # ended, not yet reaped
    time.sleep(0.01)
  raise AssertionError(f'no event after {timeout} s:\n{child.out()}\n{child.err()}')


def _rows(workdir) -> dict:
  """(split, step) -> row of metrics.jsonl; every line must parse and each pair appear once."""
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  keys = [(r['split'], r['step']) for r in rows]
  assert len(keys) == len(set(keys)), f'repeated rows: {sorted(keys)}'
  return {k: {m: v for m, v in r.items() if m not in ('images_per_sec', 'sec_per_step', 'eta_sec')}
          for k, r in zip(keys, rows)}




def _moments(rng: random.Random, total: int, every_eval: int, every_save: int) -> list:
  """10 kill moments in run order: during data generation, then 9 at steps drawn at random,
  each of a kind that step allows, at least one during evaluation and one during a save."""
  evals = list(range(every_eval, total, every_eval))
  moments = [('evaluating', rng.choice(evals)), ('saving', rng.choice(evals))]
  others = rng.sample([s for s in range(1, total) if s not in {m[1] for m in moments}], 7)
  for s in others:
    moments.append((rng.choice(['training', 'restoring'] + (
        ['saving'] if s % every_save == 0 else [])), s))
  return [('generating', 0)] + sorted(moments, key=lambda m: (m[1], m[0] != 'evaluating'))


def _event(kind, step, workdir, eval_every):
  """When to kill for a moment: the printed line or written folder that comes just before it."""
  if kind == 'generating':  # the first run builds triangle/small before training
    return lambda c: 'is not prepared in' in c.err()
  if kind == 'restoring':  # after the restore, while compiling and at the first steps
    return lambda c: re.search(r'Resumed from step|AiT \(preset small', c.out()) is not None
  if kind == 'saving':  # a save starts right after its step's last row (eval, else train)
    row = f'[{"eval" if step % eval_every == 0 else "train"}] step {step}:'
    return lambda c: row in c.out() or any(workdir.glob(f'checkpoints/{step}.orbax-checkpoint-tmp*'))
  # 'evaluating': the train row of an eval step is written just before evaluating
  return lambda c: f'[train] step {step}:' in c.out()


_TINY_RUNS_SETUP = ('from ait_jax import reproduce\nimport test_faults\n'
                    'reproduce.RUNS = test_faults._tiny_runs()')


def test_kill_9_at_ten_moments_then_rerun(zygote, reproduced, tmp_path):
  """kill -9 at 10 moments of a quick run (during data generation, training, evaluation, saving
  and restoring), each followed by the same command again; the run that finally completes has
  the metrics of an uninterrupted run, bit for bit, each step's row once; no run printed a
  traceback. The uninterrupted run is reproduce's tiny_a, the same config on the test data,
  which is byte-identical to what the first run here generates."""
  reference_dir = reproduced / 'work' / 'cpu' / 'tiny_a'
  workdir = tmp_path / 'run'
  data_dir = tmp_path / 'data'  # absent: the first run generates it, and is killed doing so
  moments = _moments(random.Random(25), TINY['total_steps'], TINY['eval_every_steps'],
                     TINY['checkpoint_every_steps'])
  kinds, children = {}, []
  for kind, step in moments:
    child = zygote.start('main', _argv(workdir, data_dir), tmp_path)
    children.append(child)
    happened = _wait_for(child, _event(kind, step, workdir, TINY['eval_every_steps']))
    os.kill(child.pid, signal.SIGKILL)
    code = zygote.wait(child)
    assert happened, f'{kind} at step {step}: the run ended first\n{child.out()}\n{child.err()}'
    assert code == -signal.SIGKILL, (code, child.err())
    kinds[kind] = kinds.get(kind, 0) + 1
  final = zygote.start('main', _argv(workdir, data_dir), tmp_path)
  children.append(final)
  assert zygote.wait(final) == 0, final.err()
  for child in children:
    assert 'Traceback' not in child.err(), child.err()
  assert _rows(workdir) == _rows(reference_dir)  # every train and eval row, bit for bit
  assert json.loads((workdir / 'eval_final.json').read_text()) == json.loads(
      (reference_dir / 'eval_final.json').read_text())
  print(f'kill -9 moments: {kinds}; {len(moments)} kills, {len(moments)} reruns')
  assert sum(kinds.values()) == 10 and kinds.get('evaluating') and kinds.get('saving')


def test_reproduce_killed_mid_run_resumes_on_rerun(zygote, reproduced,
                                                   generated_data_dir, tmp_path):
  """kill -9 of reproduce while its second run trains; the rerun reuses the first run, resumes
  the second and ends with the summary of an uninterrupted reproduce, bit for bit; nothing was
  deleted."""
  argv = _reproduce_argv(tmp_path, generated_data_dir)
  child = zygote.start('reproduce', argv, tmp_path, setup=_TINY_RUNS_SETUP)
  assert _wait_for(child, lambda c: re.search(r'== tiny_b(.*\n)*\[train\] step 5:', c.out())
                   is not None)
  os.kill(child.pid, signal.SIGKILL)
  assert zygote.wait(child) == -signal.SIGKILL
  kept = _files(tmp_path / 'work' / 'cpu' / 'tiny_a')
  rerun = zygote.start('reproduce', argv, tmp_path, setup=_TINY_RUNS_SETUP)
  assert zygote.wait(rerun) == 0, rerun.err()
  assert 'Traceback' not in child.err() + rerun.err()
  assert 'reusing the finished run in' in rerun.out() and 'Resumed from step' in rerun.out()
  assert _files(tmp_path / 'work' / 'cpu' / 'tiny_a') == kept
  assert _summary(argv) == _summary(_reproduce_argv(reproduced, generated_data_dir))
