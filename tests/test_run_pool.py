"""`run_pool`, which trains `reproduce --jobs=N`'s runs side by side: signals passed on once, a
failed child named in one sentence, progress read from metrics.jsonl; and `reproduce --jobs=2`
end to end on the tiny scale."""
import json
import os
import signal
import sys
import threading
import time

import pytest

from ait_jax import cli
from ait_jax import errors
from ait_jax import reproduce
from ait_jax import run_pool

# A stand-in for `main`: notes its process group, logs a train row, then waits; on a signal it
# notes it and, like main on its first signal, "saves" and exits 75. Exits 0 after `seconds`, or
# `status` at once.
_CHILD = r'''
import json, os, signal, sys, time
workdir, seconds, status = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
def stop(signum, frame):
  with open(os.path.join(workdir, 'signals'), 'a') as f:
    f.write(signal.Signals(signum).name + '\n')
  sys.exit(75)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
with open(os.path.join(workdir, 'group'), 'w') as f:
  f.write(str(os.getpgrp()))
with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
  f.write(json.dumps({'step': 5, 'split': 'train', 'eta_sec': 120.0}) + '\n')
print('the last line before exiting', flush=True)
if status:
  sys.exit(status)
end = time.time() + seconds
while time.time() < end:
  time.sleep(0.05)
'''


def _job(tmp_path, name, seconds=60.0, status=0):
  workdir = tmp_path / name
  workdir.mkdir()
  return run_pool.Job(name, [sys.executable, '-c', _CHILD, str(workdir), str(seconds),
                             str(status)], str(workdir), total_steps=10)


def _when_started(jobs, then):
  """Calls `then` once every job's child has written its metrics row."""
  def watch():
    deadline = time.time() + 30
    while time.time() < deadline:
      if all(os.path.exists(os.path.join(j.workdir, 'metrics.jsonl')) for j in jobs):
        then()
        return
      time.sleep(0.05)
  threading.Thread(target=watch, daemon=True).start()


def test_a_ctrl_c_is_passed_on_once_and_nothing_new_starts(tmp_path, capsys):
  jobs = [_job(tmp_path, f'run{i}') for i in range(3)]
  ended = []
  before = signal.getsignal(signal.SIGINT)
  _when_started(jobs[:2], lambda: os.kill(os.getpid(), signal.SIGINT))
  stopped = run_pool.train(jobs, 2, on_done=lambda job, o: ended.append((job.name, o.returncode)))
  assert stopped == 'SIGINT'
  assert sorted(ended) == [('run0', 75), ('run1', 75)]  # saved and stopped; run2 never started
  for job in jobs[:2]:
    assert (tmp_path / job.name / 'signals').read_text() == 'SIGINT\n'  # once, not twice
    # Its own process group: a terminal's Ctrl-C reaches only the pool, which passes it on.
    assert int((tmp_path / job.name / 'group').read_text()) != os.getpgrp()
  assert not (tmp_path / 'run2' / run_pool.LOG_FILE).exists()
  assert 'run1: saved and stopped' in capsys.readouterr().out
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_failed_run_is_one_sentence_after_the_others_end(tmp_path):
  jobs = [_job(tmp_path, 'fails', status=3), _job(tmp_path, 'finishes', seconds=1.0),
          _job(tmp_path, 'never')]
  ended = []
  with pytest.raises(errors.InputError, match=r'^Run fails failed \(exit status 3\); the last '
                     r'line of .*train.log: the last line before exiting$'):
    run_pool.train(jobs, 2, on_done=lambda job, o: ended.append((job.name, o.returncode)))
  assert sorted(ended) == [('fails', 3), ('finishes', 0)]
  assert not (tmp_path / 'never' / run_pool.LOG_FILE).exists()


def test_progress_names_each_live_run_step_and_eta(tmp_path):
  job = _job(tmp_path, 'r')
  (tmp_path / 'r' / 'metrics.jsonl').write_text(
      json.dumps({'step': 10, 'split': 'train', 'eta_sec': 300.0}) + '\n' +
      json.dumps({'step': 10, 'split': 'eval', 'accuracy': 0.5}) + '\n{"torn')
  starting = _job(tmp_path, 's')
  queue = [_job(tmp_path, f'q{i}') for i in range(3)]
  live = {1: (job, None, 0), 2: (starting, None, 0)}
  assert run_pool._progress(live, queue, done=4, parallel=2) == (
      '[reproduce] 4 finished, 2 training, 3 waiting: r step 10/10 (ETA 5 min); s starting')
  for j, seconds in zip([starting] + queue, (60, 120, 180, 240)):
    j.estimate_s = seconds
  # (300 + 60 + 120 + 180 + 240) s over two at a time: 7.5 min.
  assert run_pool._progress(live, queue, done=4, parallel=2) == (
      '[reproduce] 4 finished, 2 training, 3 waiting; all runs ETA 8 min: r step 10/10 (ETA 5 '
      'min); s starting')


def test_tiny_reproduce_with_two_jobs(generated_data_dir, tmp_path, capfd):
  out, work = tmp_path / 'out', tmp_path / 'work'
  runs = ['triangle_vit_s0']  # one child: the pool's concurrency is tested above, without JAX
  argv = ['reproduce', '--scale=tiny', '--jobs=2', f'--only={",".join(runs)}',
          f'--data_dir={generated_data_dir}', f'--out={out}', f'--workdir_root={work}']
  with pytest.raises(SystemExit) as exit_info:
    cli.run(reproduce.define_flags, reproduce.main, argv)
  captured = capfd.readouterr()
  assert exit_info.value.code == 0, captured.err
  assert 'Runs to train: 1, 2 at a time' in captured.out
  summary = json.loads((out / 'summary.json').read_text())
  assert set(summary['runs']) == set(runs)
  # No diagnosis.md in --out yet: RESULTS.md says where it is to be written.
  assert 'Not written yet: it is kept by hand in `diagnosis.md`' in (out / 'RESULTS.md').read_text()
  for run in runs:
    assert summary['runs'][run]['eval']['step'] == 2
    assert summary['runs'][run]['wall_seconds'] > 0
    assert 'Finished 2 steps' in (work / 'tiny' / run / run_pool.LOG_FILE).read_text()
