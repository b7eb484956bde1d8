"""Checkpoint safety: damaged checkpoints are skipped (and kept), only finite states are saved,
one run per workdir, and all processes stop at the same step when one is preempted."""
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ait_jax import checkpointing
from ait_jax import errors
from ait_jax import metric_writer
from ait_jax import train
from conftest import limit, ROOT, xla_flags
from test_train import quick_config


@pytest.fixture(scope='module')
def three_saves(generated_data_dir, tmp_path_factory):
  """A workdir with checkpoints at steps 2, 4 and 6, and a trainer to restore them."""
  workdir = tmp_path_factory.mktemp('three_saves')
  config = quick_config(generated_data_dir, total_steps=6, log_every_steps=2,
                        checkpoint_every_steps=2, eval_every_steps=6)
  train.train_and_evaluate(config, str(workdir))
  return config, workdir, train.Trainer(config)


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir):
  path = _largest_file(step_dir / 'state')
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size // 2)


def _remove_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').unlink()


def _empty_folder(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


DAMAGES = {'truncated array file': _truncate_array_file, 'missing metadata': _remove_metadata,
           'empty step folder': _empty_folder}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_latest_is_skipped_and_kept(three_saves, tmp_path, damage, caplog):
  _, source, trainer = three_saves
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  DAMAGES[damage](workdir / 'checkpoints' / '6')
  ckpt = checkpointing.Checkpointer(str(workdir))
  with caplog.at_level(logging.WARNING):
    step, state, data_state = ckpt.restore(trainer.abstract_with_shardings())
  ckpt.close()
  assert step == 4 and data_state
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  assert [s for _, s, _ in ckpt.skipped] == [6]
  assert 'Skipping the damaged checkpoint of step 6' in caplog.text
  assert (workdir / 'checkpoints' / '6').is_dir()  # never deleted


def test_resumed_run_sets_the_damaged_one_aside(three_saves, tmp_path):
  config, source, _ = three_saves
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  _truncate_array_file(workdir / 'checkpoints' / '6')
  damaged = sorted((workdir / 'checkpoints' / '6').rglob('*'))
  result = train.train_and_evaluate(config, str(workdir))
  assert result['step'] == 6
  kept, = (workdir / checkpointing.DAMAGED_DIR).iterdir()
  assert kept.name.startswith('checkpoints_6_')
  assert len(sorted(kept.rglob('*'))) == len(damaged)
  ckpt = checkpointing.Checkpointer(str(workdir))
  assert ckpt.latest_step() == 6  # saved again by the resumed run
  ckpt.close()


def test_every_checkpoint_damaged_is_one_sentence(three_saves, tmp_path):
  _, source, trainer = three_saves
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  for step in (2, 4, 6):
    _empty_folder(workdir / 'checkpoints' / str(step))
  ckpt = checkpointing.Checkpointer(str(workdir))
  with pytest.raises(errors.UserError, match='Every checkpoint in .* is damaged'):
    ckpt.restore(trainer.abstract_with_shardings())
  ckpt.close()


def test_set_aside_moves_and_never_deletes(tmp_path, monkeypatch):
  """--restart's set_aside_run moves everything but the lock and what earlier starts set aside;
  two starts within one second get two folders (the second would otherwise overwrite the
  first's copies)."""
  monkeypatch.setattr(time, 'gmtime', lambda *_: time.struct_time((2026, 1, 2, 3, 4, 5, 0, 2, 0)))
  workdir = tmp_path / 'run'
  assert checkpointing.set_aside_run(str(workdir)) is None  # nothing there: nothing made
  for name in ('metrics.jsonl', 'best/7/x', checkpointing.LOCK_FILE):
    (workdir / name).parent.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text(name)
  first = checkpointing.set_aside_run(str(workdir))
  assert first == workdir / checkpointing.SET_ASIDE_DIR / '2026-01-02T030405Z'
  assert sorted(p.name for p in workdir.iterdir()) == [checkpointing.LOCK_FILE,
                                                        checkpointing.SET_ASIDE_DIR]
  assert (first / 'best/7/x').read_text() == 'best/7/x'
  (workdir / 'metrics.jsonl').write_text('second')
  copy = checkpointing.SetAside(str(workdir)).keep_copy('metrics.jsonl', b'copy')
  assert copy == first.with_name(f'{first.name}.1') / 'metrics.jsonl'
  assert (first / 'metrics.jsonl').read_text() == 'metrics.jsonl'


def test_non_finite_state_is_never_saved(generated_data_dir, tmp_path):
  # lr=1e30: step 1's update is huge but finite; step 2 overflows. A checkpoint every step.
  config = quick_config(generated_data_dir, total_steps=6, log_every_steps=3,
                        checkpoint_every_steps=1, eval_every_steps=100, lr=1e30)
  with pytest.raises(train.NonFiniteLossError) as failure:
    train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  last = ckpt.latest_step()
  ckpt.close()
  assert last is not None and last < 6
  assert f'The last good checkpoint is step {last} in' in str(failure.value)
  assert not (tmp_path / 'eval_final.json').exists()
  trainer = train.Trainer(config)
  step, state = trainer.restore(str(tmp_path), 'latest')
  assert step == last
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(
      (state.params, state.opt_state, state.memory))))


def test_non_finite_state_with_finite_loss_is_not_saved(generated_data_dir, tmp_path):
  # lr=1e39 is infinite in float32: step 1's loss and gradients are finite, its updated
  # parameters are not. That state must not be saved, although step 1 is a checkpoint step.
  config = quick_config(generated_data_dir, total_steps=6, log_every_steps=3,
                        checkpoint_every_steps=1, eval_every_steps=100, lr=1e39)
  with pytest.raises(train.NonFiniteLossError,
                     match=r'Non-finite parameters or optimizer state at step 1;.*There is no '
                           'checkpoint yet'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists() or not any(
      (tmp_path / 'checkpoints').iterdir())


_HOLD_LOCK = """
import signal, sys
from ait_jax import checkpointing
checkpointing.WorkdirLock(sys.argv[1]).acquire()
print('locked', flush=True)
signal.pause()
"""


def test_one_run_per_workdir(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checkpointing.WorkdirBusyError, match=f'in use by pid {holder.pid}'):
      checkpointing.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  lock = checkpointing.WorkdirLock(str(tmp_path))
  lock.acquire()  # the owner is dead: taken over
  owner = json.loads((tmp_path / checkpointing.LOCK_FILE).read_text())
  assert owner['pid'] == os.getpid() and owner['host'] == socket.gethostname()
  lock.release()
  assert not (tmp_path / checkpointing.LOCK_FILE).exists()


def test_a_torn_lock_is_taken_over_without_a_wrong_pid(tmp_path, caplog):
  """A lock its owner left unreadable (killed while writing it) is taken over; the line said
  'from dead pid None'."""
  (tmp_path / checkpointing.LOCK_FILE).write_text('{"host": "h')
  lock = checkpointing.WorkdirLock(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  lock.release()
  assert 'from a run that left it unreadable' in caplog.text and 'None' not in caplog.text


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(code: str, *args: str) -> list[subprocess.Popen]:
  """`python -c code *args` as the 2 processes (one CPU device each) of one JAX job."""
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, '-c', code, *args], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, AIT_JAX_COORDINATOR=f'127.0.0.1:{port}', AIT_JAX_NUM_PROCESSES='2',
               AIT_JAX_PROCESS_ID=str(i), XLA_FLAGS=xla_flags(1))) for i in range(2)]


def _outputs(procs) -> list[str]:
  """Every process's output; past the limit all are killed and the test fails with all their
  outputs (one hung process keeps the others waiting in a collective, so each tells half)."""
  deadline = time.time() + limit()
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      rest = [q.communicate()[0] for q in procs[len(outs):]]
      pytest.fail('\n'.join(f'--- process {i} (killed after {limit():.0f} s) ---\n{out}'
                             for i, out in enumerate(outs + rest)))
  return outs


_DRIVER = """
import json, sys
from ait_jax import distributed
distributed.maybe_initialize('on')
import jax
from ait_jax import train
sys.path.insert(0, 'tests')
from test_train import quick_config
config = quick_config(sys.argv[1], total_steps=400, log_every_steps=2, eval_every_steps=4,
                      checkpoint_every_steps=1000, **{'mesh.data': -1})
result = train.train_and_evaluate(config, sys.argv[2])
print('RESULT', json.dumps({'process': jax.process_index(), 'devices': jax.device_count(),
                            'step': result['step'], 'loss': result['loss'],
                            'train_loss': result['train_loss']}), flush=True)
"""


def test_one_process_preempted_both_stop_at_the_same_step(generated_data_dir, tmp_path):
  """Two processes over gloo train one model (the same losses on both, metrics written once by
  process 0); only process 1 receives SIGTERM, and both save the same step and stop."""
  procs = _two_processes(_DRIVER, generated_data_dir, str(tmp_path))
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + limit()
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      procs[1].send_signal(signal.SIGTERM)  # only process 1 is preempted
      break
    time.sleep(0.05)
  outs = _outputs(procs)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  results = [json.loads(out.split('RESULT ', 1)[1].splitlines()[0]) for out in outs]
  assert [r['process'] for r in results] == [0, 1]
  assert all(r['devices'] == 2 for r in results)
  assert results[0]['step'] == results[1]['step'] < 400
  assert results[0]['train_loss'] == results[1]['train_loss']
  assert results[0]['loss'] == results[1]['loss'] and np.isfinite(results[0]['loss'])
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  steps = [l['step'] for l in lines if l['split'] == 'train']
  assert steps == list(range(2, results[0]['step'] + 1, 2))  # written once, by process 0
  assert 'saved step' in outs[0]
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == results[0]['step']
  ckpt.close()


_SAVES = """
import sys
from ait_jax import distributed
distributed.maybe_initialize('on')
import jax, jax.numpy as jnp, numpy as np
from ait_jax import checkpointing
replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ('data',)),
                                        jax.sharding.PartitionSpec())
make = jax.jit(lambda i: {'w': jnp.full((256, 256), i, jnp.float32), 'b': jnp.arange(64.0) * i},
               out_shardings=replicated)
ckpt = checkpointing.Checkpointer(sys.argv[1])
for step in range(1, 5):
  ckpt.save(step, make(step), {'step': step}, best_metrics={'accuracy': float(step)})
  ckpt.check_saves()
ckpt.close()
print('SAVED', jax.process_count(), flush=True)
"""


def test_two_processes_save_latest_and_best_at_once(tmp_path):
  """Every step saved as latest and as best by two processes, each manager in the background
  while the other starts: their barriers must not meet across managers. (With orbax's default
  names, step 1's save failed on one process, a barrier 'already ongoing', and the other hung.)"""
  procs = _two_processes(_SAVES, str(tmp_path))
  for p, out in zip(procs, _outputs(procs)):
    assert p.returncode == 0 and 'SAVED 2' in out, out
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest.all_steps() == [2, 3, 4] and ckpt.best.all_steps() == [4]
  ckpt.close()


def test_ctrl_c_saves_like_sigterm(generated_data_dir, tmp_path, monkeypatch, capfd):
  """Ctrl-C mid-run: the step is saved and the run stops, as on SIGTERM. In process (the signal is
  sent to this process from the loop's own metric write); test_train's SIGTERM test covers the
  same save-and-stop path in a separate process, and the resume after it."""
  config = quick_config(generated_data_dir, total_steps=400, log_every_steps=1,
                        checkpoint_every_steps=1000, eval_every_steps=1000)
  write = metric_writer.MetricWriter.write

  def write_then_ctrl_c(self, step, metrics, prefix):
    write(self, step, metrics, prefix)
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(metric_writer.MetricWriter, 'write', write_then_ctrl_c)
  previous = signal.getsignal(signal.SIGINT)
  train.train_and_evaluate(config, str(tmp_path))  # no KeyboardInterrupt
  assert signal.getsignal(signal.SIGINT) is previous  # the loop put Ctrl-C's handler back
  # The signal lands while step 3 is logged; the loop sees it after the next step and saves that.
  assert 'SIGINT: saved step 4 and stopped' in capfd.readouterr().out
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 4
  ckpt.close()
