"""Orbax checkpoints of the train state and the data iterator, kept in two places.

`<workdir>/checkpoints` holds the last K saves (periodic, final, on SIGTERM); `<workdir>/best`
holds the one with the best eval accuracy. Restores take abstract targets carrying the current
shardings, so a run can resume on another device count.
"""
import signal

from etils import epath
import jax
import orbax.checkpoint as ocp


def workdir_path(workdir: str) -> epath.Path:
  """The workdir as an absolute epath: local folders or gs:// buckets (with the `gcs` extra)."""
  path = epath.Path(workdir)
  return path if '://' in str(workdir) else epath.Path(path.absolute())


class Checkpointer:
  """Saves and restores {'state': pytree, 'data': JSON} under a workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    root = workdir_path(workdir)
    self.latest = ocp.CheckpointManager(
        root / 'checkpoints',
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        root / 'best',
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m['accuracy'],
                                             best_mode='max', create=True))

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

  def restore(self, abstract_state, *, which: str = 'latest'):
    """Returns (step, state, data_state) or None when there is nothing to restore."""
    manager = self.latest if which == 'latest' else self.best
    step = manager.latest_step() if which == 'latest' else manager.best_step()
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return step, restored['state'], restored['data']

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


class PreemptionFlag:
  """Set by SIGTERM (Cloud TPU / SLURM preemption); the loop checks it once per step."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.raised = True

  def should_stop(self, step: int, manager: Checkpointer) -> bool:
    """Local flag, or orbax's multi-host preemption sync point where JAX provides one."""
    if self.raised:
      return True
    if jax.process_count() > 1:
      return bool(manager.latest.reached_preemption(step))
    return False

  def restore_handler(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)
