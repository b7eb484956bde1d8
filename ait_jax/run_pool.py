"""Trains several runs at once, each as its own `python -m ait_jax.main` process
(`reproduce --jobs=N`).

Why processes: the CPU experiment's models are small (a width-64 Triangle step is a few
milliseconds of matrix work), so one process leaves part of a 2-core machine idle; two runs side by
side train about 1.45 times the images per second of one (docs/training.md#cpu-experiment).
Threads in one process would share JAX's dispatch and the GIL.

Each child is the command `reproduce` prints for its run, writes its console into
`<workdir>/train.log`, and resumes from its own checkpoints like any `main`. Children run in
their own session, so a Ctrl-C reaches only this process, which passes each signal on once:
the children save and stop, as `main` does on one signal (a second signal ends them at once).
Every minute this process prints each live run's step and ETA from its metrics.jsonl.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from ait_jax import checkpointing
from ait_jax import errors

PROGRESS_EVERY_S = 60.0
LOG_FILE = 'train.log'  # in each run's workdir: the child's console


@dataclasses.dataclass
class Job:
  """One run to train: its name, its command (argv), workdir and last step, and the seconds it is
  expected to take (for the pool's ETA before the run reports its own)."""
  name: str
  command: list[str]
  workdir: str
  total_steps: int
  estimate_s: float | None = None


@dataclasses.dataclass
class Outcome:
  """How a child ended: its exit status and the seconds it ran."""
  returncode: int
  seconds: float


def main_command(args: list[str]) -> list[str]:
  """`python -m ait_jax.main ARGS` with this interpreter."""
  return [sys.executable, '-m', 'ait_jax.main', *args]


def last_train_row(workdir: str) -> dict | None:
  """The last train row of a run's metrics.jsonl (read from the file's tail), or None."""
  path = os.path.join(workdir, 'metrics.jsonl')
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 8192))
      lines = f.read().decode('utf-8', 'replace').splitlines()
  except OSError:
    return None
  for line in reversed(lines):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get('split') == 'train' and 'step' in row:
      return row
  return None


def _progress(live: dict, queue: list[Job], done: int, parallel: int) -> str:
  """One line: each live run's step and ETA, and the whole pool's ETA (the live runs' ETAs and
  the waiting runs' estimates, shared over `parallel`) when every run has one."""
  parts, left = [], 0.0
  for job, _, _ in live.values():
    row = last_train_row(job.workdir)
    eta = row.get('eta_sec') if row else None
    if not isinstance(eta, (int, float)):
      eta = job.estimate_s
    left = left + eta if left is not None and eta is not None else None
    parts.append(f'{job.name} starting' if row is None else
                 f'{job.name} step {row["step"]}/{job.total_steps}' +
                 (f' (ETA {eta / 60:.0f} min)' if eta is not None else ''))
  for job in queue:
    left = left + job.estimate_s if left is not None and job.estimate_s is not None else None
  total = f'; all runs ETA {left / parallel / 60:.0f} min' if left is not None else ''
  return (f'[reproduce] {done} finished, {len(live)} training, {len(queue)} waiting{total}: ' +
          '; '.join(parts))


def _tail(path: str) -> str:
  try:
    with open(path, errors='replace') as f:
      lines = [l.strip() for l in f.read().splitlines() if l.strip()]
  except OSError:
    return ''
  return lines[-1] if lines else ''


def train(jobs: list[Job], parallel: int, on_done=None) -> str | None:
  """Trains `jobs`, `parallel` at a time. `on_done(job, outcome)` is called as each child ends.

  Returns the name of the signal that stopped the pool (the children saved and stopped; rerun
  to resume), or None once every job finished. A child that fails otherwise stops the pool from
  starting more; once the running ones end, one sentence names the run and its log's last line.
  """
  queue = list(jobs)
  live = {}  # pid -> (job, Popen, start time)
  stopped = []  # the signals received, in order
  failed = []

  def forward(signum, frame):  # pylint: disable=unused-argument
    stopped.append(signal.Signals(signum).name)
    for _, child, _ in live.values():
      if child.poll() is None:
        child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  last_progress = time.time()
  done = 0
  try:
    while live or (queue and not stopped and not failed):
      while queue and not stopped and not failed and len(live) < parallel:
        job = queue.pop(0)
        os.makedirs(job.workdir, exist_ok=True)
        with open(os.path.join(job.workdir, LOG_FILE), 'ab') as log:
          child = subprocess.Popen(job.command,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        live[child.pid] = (job, child, time.time())
        if stopped:  # a signal came while it started: it has not been passed on to this one
          child.send_signal(signal.Signals[stopped[-1]])
        print(f'== {job.name}: started ({os.path.join(job.workdir, LOG_FILE)})', flush=True)
      time.sleep(0.5)
      for pid in list(live):
        job, child, start = live[pid]
        if child.poll() is None:
          continue
        del live[pid]
        outcome = Outcome(child.returncode, time.time() - start)
        if on_done is not None:
          on_done(job, outcome)
        log = os.path.join(job.workdir, LOG_FILE)
        if outcome.returncode == 0:
          done += 1
          print(f'== {job.name}: finished in {outcome.seconds / 60:.1f} min', flush=True)
        elif outcome.returncode == checkpointing.EXIT_PREEMPTED:
          print(f'== {job.name}: saved and stopped ({log})', flush=True)
        elif stopped:  # a second signal ends a run without saving (main's rule)
          print(f'== {job.name}: stopped with exit status {outcome.returncode}, resumes from its '
                f'last checkpoint ({log})', flush=True)
        else:
          failed.append((job, outcome, log))
          print(f'== {job.name}: failed with exit status {outcome.returncode} ({log})',
                flush=True)
      if live and time.time() - last_progress >= PROGRESS_EVERY_S:
        last_progress = time.time()
        print(_progress(live, queue, done, parallel), flush=True)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if failed:
    job, outcome, log = failed[0]
    raise errors.InputError(
        f'Run {job.name} failed (exit status {outcome.returncode}); the last line of {log}: '
        f'{_tail(log)}')
  return stopped[0] if stopped else None
