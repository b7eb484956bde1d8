"""Orbax checkpoints of the train state and the data iterator, and the safety around them.

`<workdir>/checkpoints` holds the last K saves (periodic, final, on SIGTERM/SIGINT);
`<workdir>/best` holds the one with the best eval accuracy. Restores take abstract targets
carrying the current shardings, so a run can resume on another device count; a damaged latest
checkpoint is skipped for the newest intact one. `WorkdirLock` keeps two runs out of one
workdir, and `PreemptionFlag` makes every process agree on the step at which to stop.
"""
import contextlib
import importlib.util
import json
import os
import signal
import socket
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from ait_jax import cli

LOCK_FILE = 'run.lock'
DAMAGED_DIR = 'damaged_checkpoints'  # where a resumed run moves the checkpoints it skipped


class IncompatibleCheckpointError(cli.UserError):
  """The checkpoint was saved by a different model (another width, depth, ...)."""


class WorkdirBusyError(cli.UserError):
  """Another live run holds the workdir's lock."""


def workdir_path(workdir: str) -> epath.Path:
  """The workdir as an absolute epath: local folders or gs:// buckets (with the `gcs` extra)."""
  path = epath.Path(workdir)
  return path if '://' in str(workdir) else epath.Path(path.absolute())


def check_workdir(workdir: str | None, *, writable: bool = True) -> None:
  """One sentence, before anything is compiled or written, for a workdir that cannot work."""
  if not workdir or not str(workdir).strip():
    raise ValueError('The workdir is empty (is $WORKDIR set?); pass --workdir=DIR.')
  workdir = str(workdir)
  if '://' in workdir:
    scheme = workdir.split('://', 1)[0]
    if scheme == 'gs' and not any(importlib.util.find_spec(m)
                                  for m in ('gcsfs', 'tensorflow')):
      raise ValueError(f'--workdir={workdir} is on Google Cloud Storage, which needs gcsfs: '
                       'pip install -e .[gcs] (or pip install gcsfs), or use a local folder.')
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir={workdir} is a file, not a folder; pass a folder (it is '
                     'created if missing).')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'--workdir={workdir} is inside {existing}, which is a file; pass a folder.')
  if writable and not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f'--workdir={workdir} is not writable ({existing} is read-only for '
                          'this user); pass a folder you can write to.')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


class WorkdirLock:
  """`<workdir>/run.lock` with the owner's host and pid: one training run per workdir.

  A lock whose owner died on this host (pid gone) is taken over; one held by a live process, or
  by another host, is refused. Object stores (gs://) have no atomic create, so they are not locked.
  """

  def __init__(self, workdir: str):
    self.workdir = str(workdir)
    self.path = None if '://' in self.workdir else os.path.join(
        os.path.abspath(self.workdir), LOCK_FILE)
    self.held = False

  def _owner(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}  # being written, or damaged: treated as a dead owner below

  def acquire(self) -> None:
    if self.path is None:
      return
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner.get('host') not in (None, me['host']):
          raise WorkdirBusyError(
              f'{self.workdir} is in use by pid {owner.get("pid")} on host {owner["host"]}; '
              f'wait for that run to end or pass another --workdir (if it is gone, delete '
              f'{self.path}).') from None
        if owner.get('pid') and owner['pid'] != me['pid'] and _pid_alive(int(owner['pid'])):
          raise WorkdirBusyError(
              f'{self.workdir} is in use by pid {owner["pid"]} on this host; wait for that run '
              'to end or pass another --workdir.') from None
        # The owner is dead: remove its lock and try the exclusive create again, so that of two
        # runs taking over at once only one wins.
        logging.warning('Taking over %s from dead pid %s.', self.path, owner.get('pid'))
        with contextlib.suppress(FileNotFoundError):  # another run removed it first
          os.remove(self.path)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return
    raise WorkdirBusyError(f'Could not take {self.path}; another run is starting in '
                           f'{self.workdir}. Pass another --workdir.')

  def release(self) -> None:
    if self.held:
      self.held = False
      if self._owner().get('pid') == os.getpid():
        os.remove(self.path)


def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shapes(tree) -> list:
  """(path, shape) of each leaf, with paths spelled the same for dataclasses and saved dicts."""
  return [('.'.join(_key_name(k) for k in p), tuple(getattr(x, 'shape', ()))) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


def _handlers():
  # Named handlers let item_metadata read a step's shapes without restoring it.
  return {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Saves and restores {'state': pytree, 'data': JSON} under a workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    self.root = workdir_path(workdir)
    self.latest = ocp.CheckpointManager(
        self.root / 'checkpoints', item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        self.root / 'best', item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m['accuracy'],
                                             best_mode='max', create=True))
    self.skipped = []  # (manager dir, step, reason) of the damaged checkpoints restore skipped

  def save(self, step: int, state, data_state=None, *, best_metrics=None,
           force: bool = True) -> None:
    """Saves `state` (and the iterator state) at `step`; also as best if best_metrics say so."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    if self.latest.latest_step() != step:
      self.latest.save(step, args=args, force=force)
    if best_metrics is not None:
      current = self.best.best_step()
      best = None
      if current is not None:
        best = self.best.metrics(current)  # may be None on old orbax; then save anyway
      if best is None or best_metrics['accuracy'] > best['accuracy']:
        self.best.save(step, args=args, metrics=dict(best_metrics), force=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def _check_compatible(self, manager, step: int, abstract_state) -> None:
    """Raises IncompatibleCheckpointError when the saved arrays have other shapes than the
    model's; a checkpoint whose metadata cannot be read is damaged (the caller skips it)."""
    saved = manager.item_metadata(step)['state']
    if saved is None:
      raise ValueError('no state metadata')
    want, got = dict(_shapes(abstract_state)), dict(_shapes(saved))
    diff = [k for k in want if k in got and want[k] != got[k]]
    if diff or set(want) != set(got):
      k = diff[0] if diff else sorted(set(want) ^ set(got))[0]
      detail = (f'{k} is {got[k]} there, {want[k]} here' if diff else
                f'{k} is in only one of them')
      raise IncompatibleCheckpointError(
          f'The checkpoint of step {step} in {manager.directory} was saved by a different model '
          f'({detail}); pass the config the run was trained with (see '
          f'{self.root / "config.json"}) or another --workdir.')

  def restore(self, abstract_state, *, which: str = 'latest'):
    """Returns (step, state, data_state), or None when there is nothing to restore.

    A checkpoint that cannot be read is skipped (logged, kept on disk) for the next older one.
    """
    manager = self.latest if which == 'latest' else self.best
    if which == 'latest':
      steps = sorted(manager.all_steps(), reverse=True)
    else:
      steps = [s for s in [manager.best_step()] if s is not None]
    for step in steps:
      try:
        self._check_compatible(manager, step, abstract_state)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any damage: skip, never delete)
        reason = cli.one_line(f'{type(e).__name__}: {e}')[:300]
        self.skipped.append((manager.directory, step, reason))
        logging.warning('Skipping the damaged checkpoint of step %d in %s (%s); trying an older '
                        'one. The damaged folder is kept.', step, manager.directory, reason)
        continue
      return step, restored['state'], restored['data']
    if self.skipped and which == 'latest':
      raise cli.UserError(
          f'Every checkpoint in {manager.directory} is damaged (steps '
          f'{", ".join(str(s) for _, s, _ in self.skipped)}); move that folder away to start '
          'afresh, or restore it from a copy.')
    return None

  def set_aside_skipped(self) -> list[str]:
    """Moves the damaged checkpoints restore skipped to <workdir>/damaged_checkpoints/, so that
    a resumed run can save those steps again; nothing is deleted. Returns the new paths."""
    moved = []
    if jax.process_index() == 0:
      for directory, step, _ in self.skipped:
        target = self.root / DAMAGED_DIR / f'{directory.name}_{step}_{int(time.time())}'
        target.parent.mkdir(parents=True, exist_ok=True)
        (directory / str(step)).rename(target)
        moved.append(str(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('ait_jax_set_aside_damaged')
    self.latest.reload()
    self.best.reload()
    return moved

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


class PreemptionFlag:
  """Set by SIGTERM (Cloud TPU / SLURM preemption) or SIGINT (Ctrl-C); checked once per step.

  With several processes only some may receive the signal, and a save that not all of them
  join hangs; so there the flag is shared (an all-gather of one int) every `agree_every` steps,
  the same steps on every process, and everyone stops at the same step. A second signal of the
  same kind gets the previous handler (Ctrl-C twice interrupts at once).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, agree_every: int = 1):
    self.raised = None  # the name of the signal received
    self.agree_every = max(int(agree_every), 1)
    self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

  def _handler(self, signum, frame):
    del frame
    self.raised = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])

  def should_stop(self, step: int, manager: Checkpointer) -> bool:
    """True on every process at the same step once any process received a signal."""
    if jax.process_count() == 1:
      return self.raised is not None
    # JAX's own preemption service (where enabled) agrees on a step by itself.
    stop = bool(manager.latest.reached_preemption(step))
    if step % self.agree_every == 0:
      flags = multihost_utils.process_allgather(np.array([self.raised is not None], np.int32))
      stop = stop or bool(np.any(flags))
    return stop

  def restore_handler(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
