"""Orbax checkpoints of the train state and the data iterator, and the safety around them.

`<workdir>/checkpoints` holds the last K saves (periodic, final, on SIGTERM/SIGINT);
`<workdir>/best` holds the one with the best eval accuracy. Restores take abstract targets
carrying the current shardings, so a run can resume on another device count; a damaged latest
checkpoint is skipped for the newest intact one, and a save that fails in orbax's background
thread stops the run in one sentence. `WorkdirLock` keeps two runs out of one workdir, and
`PreemptionFlag` makes every process agree on the step at which to stop.
"""
import contextlib
import errno
import importlib.util
import itertools
import json
import logging as py_logging
import os
import signal
import socket
import sys
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from ait_jax import errors
from ait_jax import paths

LOCK_FILE = 'run.lock'
DAMAGED_DIR = 'damaged_checkpoints'  # where a resumed run moves the checkpoints it skipped
# Where a run moves what it must neither keep in place nor delete: an earlier run (--restart),
# and the metrics rows, best checkpoints and results past the step a run continues from.
SET_ASIDE_DIR = 'set_aside'
# The exit status of a run stopped by SIGTERM or SIGINT after saving: sysexits.h's EX_TEMPFAIL
# ("try again later"), which a job script or scheduler can requeue on (README, launch/README.md).
EXIT_PREEMPTED = 75


class IncompatibleCheckpointError(errors.UserError):
  """The checkpoint was saved by a different model (another width, depth, ...)."""


class WorkdirBusyError(errors.UserError):
  """Another live run holds the workdir's lock."""


class CheckpointSaveError(errors.UserError):
  """A save failed (permissions, a full disk, a vanished bucket); the run stops at once."""


# Signs that a save failed because of the disk or the bucket, not because of a bug: OS errors,
# and the status names TensorStore puts in its messages.
_ENVIRONMENT_SIGNS = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'NOT_FOUND', 'UNAVAILABLE',
                      'DEADLINE_EXCEEDED', 'No space left', 'Permission denied',
                      'Operation not permitted', 'Read-only file system', 'Disk quota')


def _is_environment(error) -> bool:
  if error is None or isinstance(error, (str, OSError)):
    return True
  return any(sign in str(error) for sign in _ENVIRONMENT_SIGNS)


class _OrbaxLog(py_logging.Filter):
  """Orbax logs the tracebacks of its own threads (a failed background save, a metadata file it
  cannot read) and then raises, or swallows, the error. The run reports each such failure in one
  sentence (CheckpointSaveError, the damaged-checkpoint warning), so orbax's records that carry
  a traceback are dropped here and their error is kept for that sentence; while `quiet` (the
  restore walk, which warns once per skipped step) orbax's other records are dropped too."""

  # A step folder without readable metadata: damaged (the restore walk warns about it once) or
  # half-written (it is no checkpoint yet). Orbax logs it from its own threads, at any time.
  _DAMAGED_METADATA = ('Failed to read Metadata file', 'Metadata file does not exist')

  def __init__(self):
    super().__init__()
    self.last_error = None
    self.quiet = False

  def filter(self, record: py_logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    if record.exc_info and record.exc_info[1] is not None:
      self.last_error = record.exc_info[1]
      return False
    if str(record.msg).startswith(self._DAMAGED_METADATA):
      return False
    return not self.quiet or record.levelno >= py_logging.CRITICAL


_ORBAX_LOG = _OrbaxLog()
py_logging.getLogger('absl').addFilter(_ORBAX_LOG)  # absl.logging, which orbax logs through


def _quiet_closed_loop_callbacks() -> None:
  """Installed by every Checkpointer. After a restore that failed on a damaged step, or a save
  that failed, TensorStore still completes the reads and writes it had started, and their
  callbacks find orbax's event loop for that step closed; Python prints each such
  `RuntimeError: Event loop is closed` with a traceback (dozens, often at exit). Only that error
  is dropped (the failure was reported in one sentence or warning); every other one prints."""
  previous = sys.unraisablehook
  if getattr(previous, 'ait_jax_quiet', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      previous(unraisable)

  hook.ait_jax_quiet = True
  sys.unraisablehook = hook


def workdir_path(workdir: str) -> epath.Path:
  """The workdir as an absolute epath: local folders or gs:// buckets (with the `gcs` extra)."""
  path = epath.Path(workdir)
  return path if '://' in str(workdir) else epath.Path(path.absolute())


def check_workdir(workdir: str | None, *, writable: bool = True) -> None:
  """One sentence, before anything is compiled or written, for a workdir that cannot work."""
  if not workdir or not str(workdir).strip():
    raise errors.InputError('The workdir is empty (is $WORKDIR set?); pass --workdir=DIR.')
  workdir = str(workdir)
  if '://' in workdir:
    scheme = workdir.split('://', 1)[0]
    if scheme == 'gs' and not any(importlib.util.find_spec(m)
                                  for m in ('gcsfs', 'tensorflow')):
      raise errors.InputError(
          f'--workdir={workdir} is on Google Cloud Storage, which needs gcsfs: '
          'pip install -c constraints.txt -e .[gcs] (or pip install gcsfs), or use a local folder.')
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.InputError(f'--workdir={workdir} is a file, not a folder; pass a folder (it is '
                            'created if missing).')
  existing = paths.nearest_existing(path)
  if not os.path.isdir(existing):
    raise errors.InputError(
        f'--workdir={workdir} is inside {existing}, which is a file; pass a folder.')
  if writable and not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f'--workdir={workdir} is not writable ({existing} is read-only for '
                          'this user); pass a folder you can write to.')


def disk_error(error: OSError, path) -> Exception:
  """The one sentence for a write to `path` that failed: a full disk says so, others name the
  path (the command line completes them)."""
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return errors.UserError(f'Cannot write {path}: {error.strerror or error}; free space on that '
                            'disk (or pass a --workdir on another one) and rerun.')
  return OSError(error.errno, error.strerror or str(error), str(path))


class SetAside:
  """`<workdir>/set_aside/<UTC time>/`, made at its first use: where a run moves what it must not
  keep in place and must not delete (docs/design.md#set-aside). One per run start, so that what
  one start moved lies together; process 0 only."""

  def __init__(self, workdir: str):
    self.root = workdir_path(workdir)
    self.used = None  # the folder, once something was moved into it

  def _folder(self) -> epath.Path:
    if self.used is None:
      stamp = time.strftime('%Y-%m-%dT%H%M%SZ', time.gmtime())
      for n in itertools.count():  # two starts within a second get two folders
        folder = self.root / SET_ASIDE_DIR / (stamp if n == 0 else f'{stamp}.{n}')
        try:
          folder.mkdir(parents=True)
        except FileExistsError:
          continue
        except OSError as e:
          raise disk_error(e, folder) from None
        self.used = folder
        break
    return self.used

  def move(self, relative: str) -> epath.Path:
    """Moves `<workdir>/<relative>` (a file or a folder) to the same place in this folder."""
    target = self._folder() / relative
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.root / relative).rename(target)
    except OSError as e:
      raise disk_error(e, target) from None
    return target

  def keep_copy(self, relative: str, data: bytes) -> epath.Path:
    """Writes `data` (what `<workdir>/<relative>` held before it is rewritten) into this folder."""
    target = self._folder() / relative
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(data)
    except OSError as e:
      raise disk_error(e, target) from None
    return target


def set_aside_run(workdir: str) -> epath.Path | None:
  """`--restart` (of `ait_jax.main` and of `reproduce`): moves everything the workdir holds, but
  its lock and what earlier starts set aside, into a new `set_aside/<UTC time>/`, and says where.
  Nothing is deleted. The caller holds the workdir's lock."""
  aside = SetAside(workdir)
  if not aside.root.is_dir():
    return None
  for entry in sorted(aside.root.iterdir()):
    if entry.name not in (LOCK_FILE, SET_ASIDE_DIR):
      aside.move(entry.name)
  if aside.used is not None:
    print(f'--restart: moved what {workdir} held into {aside.used} (nothing is deleted); '
          'training afresh.', flush=True)
  return aside.used


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

  def busy(self) -> str | None:
    """The sentence refusing this workdir while another live run (or another host) holds its
    lock; None when it is free or its owner is dead."""
    if self.path is None or not os.path.exists(self.path):
      return None
    owner, host = self._owner(), socket.gethostname()
    if owner.get('host') not in (None, host):
      return (f'{self.workdir} is in use by pid {owner.get("pid")} on host {owner["host"]}; '
              f'wait for that run to end or pass another --workdir (if it is gone, delete '
              f'{self.path}).')
    if owner.get('pid') and owner['pid'] != os.getpid() and _pid_alive(int(owner['pid'])):
      return (f'{self.workdir} is in use by pid {owner["pid"]} on this host; wait for that run '
              'to end or pass another --workdir.')
    return None

  def acquire(self) -> None:
    if self.path is None:
      return
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        refusal = self.busy()
        if refusal:
          raise WorkdirBusyError(refusal) from None
        # The owner is dead: remove its lock and try the exclusive create again, so that of two
        # runs taking over at once only one wins.
        pid = self._owner().get('pid')
        logging.warning('Taking over %s from %s.', self.path,
                        f'dead pid {pid}' if pid else 'a run that left it unreadable')
        with contextlib.suppress(FileNotFoundError):  # another run removed it first
          os.remove(self.path)
        continue
      try:
        with os.fdopen(fd, 'w') as f:
          json.dump(me, f)
      except OSError as e:  # a full disk: no empty lock is left behind, and the path is named
        with contextlib.suppress(OSError):
          os.remove(self.path)
        raise disk_error(e, self.path) from None
      self.held = True
      return
    raise WorkdirBusyError(f'Could not take {self.path}; another run is starting in '
                           f'{self.workdir}. Pass another --workdir.')

  def release(self) -> None:
    """Removes the lock; never raises, so that it cannot hide the error a run stops on (a lock
    left behind names a dead pid, which the next run takes over)."""
    if self.held:
      self.held = False
      if self._owner().get('pid') == os.getpid():
        try:
          os.remove(self.path)
        except OSError as e:
          logging.warning('Could not remove %s (%s); the next run takes it over.', self.path,
                          e.strerror or e)


def _release_orbax_waiters() -> None:
  """Ends orbax's threads that wait for a signal a failed save will never send.

  A save starts threads that wait, through orbax's signaling client, for its earlier stages
  (e.g. creating the step's folder). When such a stage fails they keep waiting until orbax's
  coordination timeout (minutes), and as they are not daemon threads the process cannot exit
  meanwhile: the run would hang after printing its error. Each is cancelled and woken here, the
  way orbax's own cancellation ends them (private API, so any mismatch leaves them alone)."""
  try:
    from orbax.checkpoint._src.futures import future as ocp_future  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    for thread in threading.enumerate():
      if isinstance(thread, ocp_future._SignalingThread) and thread.is_alive():  # pylint: disable=protected-access
        thread.cancel()
        ocp_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    logging.warning('Could not end orbax\'s waiting threads; the process may take minutes to exit.')


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


def _barriers_named(prefix: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f'ait_jax_{prefix}')


class Checkpointer:
  """Saves and restores {'state': pytree, 'data': JSON} under a workdir.

  Saves run in orbax's background threads. `check_saves` (called by the loop every step, a
  lookup while nothing is pending) turns a save that failed there into one CheckpointSaveError
  naming the folder and the last intact checkpoint, so a failing disk stops the run at once
  instead of when the next save waits, or never when orbax swallows the error.
  """

  def __init__(self, workdir: str, keep: int = 3):
    _quiet_closed_loop_callbacks()  # they can print before a failure is even seen
    self.root = workdir_path(workdir)
    # With several processes every save meets the others at barriers named for what it is doing
    # and its step's folder; the two managers save the same step at once (an evaluated step is
    # saved as latest and as best), so each names its barriers apart, or one process's `best`
    # meets another's `latest` and a save fails or hangs.
    self.latest = ocp.CheckpointManager(
        self.root / 'checkpoints', item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             multiprocessing_options=_barriers_named('latest')))
    self.best = ocp.CheckpointManager(
        self.root / 'best', item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m['accuracy'],
                                             best_mode='max', create=True,
                                             multiprocessing_options=_barriers_named('best')))
    self.skipped = []  # (manager dir, step, reason) of the damaged checkpoints restore skipped
    self._pending = {}  # manager -> the step it is saving in the background

  def save(self, step: int, state, data_state=None, *, best_metrics=None,
           force: bool = True) -> None:
    """Starts saving `state` (and the iterator state) at `step`; also as best if best_metrics
    say so. It is saved once `check_saves(wait=True)` returns."""
    # Orbax waits for the previous save before starting one anyway; waiting here first makes a
    # failure of that one its own sentence, with its own step.
    self.check_saves(wait=True)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    if self.latest.latest_step() != step:
      self._start(self.latest, step, args=args, force=force)
    if best_metrics is not None:
      current = self.best.best_step()
      best = None
      if current is not None:
        best = self.best.metrics(current)  # may be None on old orbax; then save anyway
      if best is None or best_metrics['accuracy'] > best['accuracy']:
        self._start(self.best, step, args=args, metrics=dict(best_metrics), force=True)

  def _start(self, manager, step: int, **kwargs) -> None:
    _ORBAX_LOG.last_error = None
    try:
      manager.save(step, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (creating the step folder, ...)
      self._fail(manager, step, e)
    self._pending[manager] = step

  def check_saves(self, wait: bool = False) -> None:
    """Raises CheckpointSaveError for a background save that failed; with `wait`, first waits
    for those still running, so that afterwards every save so far is known to be on disk."""
    for manager, step in list(self._pending.items()):
      if not wait and manager.is_saving_in_progress():
        continue
      del self._pending[manager]
      try:
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        self._fail(manager, step, e)
      manager.reload()  # orbax may log a failed commit and carry on: look at the disk
      if step not in manager.all_steps():
        self._fail(manager, step, _ORBAX_LOG.last_error)

  def _fail(self, manager, step: int, error) -> None:
    """Raises the sentence for a failed save of `step`; a failure that is not the disk's or the
    bucket's (a bug) keeps its traceback."""
    self._pending.clear()
    _release_orbax_waiters()
    reason = (errors.one_line(f'{type(error).__name__}: {error}')[:300]
              if isinstance(error, BaseException) else 'its folder was not written')
    last = self.last_intact_step(exclude=step)
    where = self.root / 'checkpoints'
    message = (f'Saving the checkpoint of step {step} into {manager.directory} failed ({reason}); '
               'the state in memory is not saved. ' +
               (f'The last intact checkpoint is step {last} in {where}: fix the disk (free space, '
                'permissions, the bucket) and rerun the same command to resume from it.'
                if last is not None else
                'There is no intact checkpoint yet: fix the disk (free space, permissions, the '
                'bucket) and rerun the same command to start again.'))
    cls = CheckpointSaveError if _is_environment(error) else RuntimeError
    raise cls(message) from (error if isinstance(error, BaseException) else None)

  def last_intact_step(self, exclude: int | None = None) -> int | None:
    """The newest step whose save completed, as the disk says."""
    _ORBAX_LOG.quiet = True  # a half-written step's missing metadata is not news here
    try:
      self.latest.reload()
      done = [s for s in self.latest.all_steps() if s != exclude]
      return max(done) if done else None
    except Exception:  # pylint: disable=broad-except  (a vanished folder has none)
      return None
    finally:
      _ORBAX_LOG.quiet = False

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

    A checkpoint that cannot be read is skipped (one warning line, kept on disk) for the next
    older one; orbax's own records about it are silenced meanwhile.
    """
    manager = self.latest if which == 'latest' else self.best
    if which == 'latest':
      steps = sorted(manager.all_steps(), reverse=True)
    else:
      steps = [s for s in [manager.best_step()] if s is not None]
    for step in steps:
      _ORBAX_LOG.quiet = True
      try:
        self._check_compatible(manager, step, abstract_state)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any damage: skip, never delete)
        reason = errors.one_line(f'{type(e).__name__}: {e}')[:300]
        self.skipped.append((manager.directory, step, reason))
        logging.warning('Skipping the damaged checkpoint of step %d in %s (%s); trying an older '
                        'one. The damaged folder is kept.', step, manager.directory, reason)
        continue
      finally:
        _ORBAX_LOG.quiet = False
      return step, restored['state'], restored['data']
    damaged = [s for d, s, _ in self.skipped if d == manager.directory]
    if damaged and which == 'latest':
      raise errors.UserError(
          f'Every checkpoint in {manager.directory} is damaged (steps '
          f'{", ".join(str(s) for s in damaged)}); restore it from a copy, or pass --restart to '
          'move the run aside (nothing is deleted) and train afresh.')
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

  def set_aside_best_after(self, step: int, aside: SetAside) -> list[tuple[int, epath.Path]]:
    """Moves the best checkpoints of steps after `step` (where a run continues from) into
    `aside`: a best checkpoint never comes from later than the history it belongs to. Process 0;
    every process then calls `reload`. Returns (step, new path) of each."""
    return [(s, aside.move(f'best/{s}')) for s in sorted(self.best.all_steps()) if s > step]

  def reload(self) -> None:
    """Reads both managers' steps from the disk again (after process 0 moved some)."""
    self.latest.reload()
    self.best.reload()

  def wait(self) -> None:
    """Waits for the saves in flight; raises CheckpointSaveError if one failed."""
    self.check_saves(wait=True)

  def close(self, *, failing: bool = False) -> None:
    """Waits for the saves in flight (raising CheckpointSaveError for a failed one), then closes
    both managers, so that no orbax thread outlives the run. `failing`: the run is already
    stopping on an error, which a save's error must not replace; nothing is reported as saved."""
    try:
      if not failing:
        self.check_saves(wait=True)
    finally:
      self._pending.clear()
      _ORBAX_LOG.quiet = failing  # a failed save was reported in one sentence already
      try:
        for manager in (self.latest, self.best):
          with contextlib.suppress(*([Exception] if failing else [])):
            manager.close()
      finally:
        _ORBAX_LOG.quiet = False
        if failing:
          _release_orbax_waiters()


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
