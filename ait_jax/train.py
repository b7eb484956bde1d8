"""The training loop and evaluation: `train_and_evaluate(config, workdir)`, `evaluate(config, workdir)`.

`Trainer` compiles the functions of `steps.py` once (the train step with the state donated) over
the device mesh; the loop feeds it grain batches, logs, evaluates and saves. The host only waits on
the device at log, eval and save steps.
"""
import contextlib
import functools
import json
import math
import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ait_jax import checkpointing
from ait_jax import config_overrides
from ait_jax import errors
from ait_jax import metric_writer
from ait_jax import models
from ait_jax import profiling
from ait_jax import sharding
from ait_jax import steps
from ait_jax import validation
# The data modules (grain, tensorflow_datasets) are imported where data is read, not here:
# `python -m ait_jax.bench --suite=gpu` builds Trainers on synthetic batches on hosts that lack
# them (docs/gpu.md).

class NonFiniteLossError(errors.UserError, RuntimeError):
  """The loss, gradient norm or updated state of a logged step is NaN or infinite; the run stops
  without saving that state, and the message names the last good checkpoint."""


class ConfigMismatchError(errors.UserError):
  """A resume with a config that changes the model, the data or the optimizer state."""




def __getattr__(name: str):
  if name == 'DamagedDataError':  # a dataset file cannot be read
    from ait_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.DamagedDataError
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

class EarlierRunError(errors.UserError):
  """A fresh start in a workdir that holds an earlier run's history but no checkpoint of it."""


CONFIG_FILE = 'config.json'
# The one list of config fields a resumed run may change; a change is logged and config.json
# records it. Every other field defines the run (the model, the data and its order, the
# optimizer state), so a resume that changes it is refused (`check_resume_config`).
RESUMABLE_FIELDS = frozenset({
    # how long the run is, and how often it logs, evaluates and saves
    'total_steps', 'num_epochs', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
    'keep_checkpoints',
    # where the data lies and how it is read: the same examples in the same order
    'data_dir', 'prefetch', 'read_threads', 'device_data', 'steps_per_call', 'eval_batch_size',
    # the devices: a run resumes on another device count
    'mesh.data', 'mesh.model', 'sharding',
    # the learning-rate recipe of the remaining steps (e.g. lowered after a non-finite loss)
    'lr', 'warmup_epochs', 'warmup_init_lr', 'end_lr', 'schedule_unit', 'weight_decay',
    # how the same parameters are computed with or evaluated
    'model.dtype', 'model.selection', 'model.eval_writes_memory',
    # what is measured (ait_jax/profiling.py)
    'profile_steps', 'profile_skip_steps',
})
# What a refused field changes, for its sentence (first matching prefix).
_FIELD_ROLES = (('model.', 'the model'), ('dataset', 'the data'), ('question_types', 'the data'),
                ('batch_size', 'the data order'), ('seed', 'the data order and random keys'),
                ('augment', 'the data'), ('b1', 'the optimizer state'),
                ('b2', 'the optimizer state'), ('adam_eps', 'the optimizer state'),
                ('grad_clip_norm', 'the optimizer state'))


class _MeshJit:
  """`jax.jit(fn, **jit_kwargs)`, traced, lowered and run under `jax.set_mesh(mesh)`: the one
  mesh context of the Trainer's functions, so that the workspace's 'sharded' and 'threshold'
  selections find the mesh axis 'data' (jax.sharding.get_abstract_mesh) whoever calls them (the
  loop, evaluate, bench, compile, tests). jax.set_mesh may only be entered outside jit, so it is
  entered here, around each call and lowering."""

  def __init__(self, mesh, fn, **jit_kwargs):
    self.mesh = mesh
    self.jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


class Trainer:
  """Holds the compiled steps, mesh and shardings of one run."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    c = config
    self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.model, devices)
    self.s = validation.validate(config, self.mesh)  # every field, before any workdir
    self.tx = steps.make_optimizer(self.s)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.rng = jax.random.PRNGKey(c.seed)
    boxed = jax.eval_shape(functools.partial(steps.init_state, self.s, self.tx, boxed=True),
                           self.rng)
    self.abstract_state = nn.unbox(boxed)
    self.state_sharding = steps.state_shardings(self.mesh, boxed, c.sharding)
    rep = sharding.replicated(self.mesh)
    self.init = _MeshJit(self.mesh, functools.partial(steps.init_state, self.s, self.tx),
                         out_shardings=self.state_sharding)
    self.eval_step = _MeshJit(self.mesh, functools.partial(steps.eval_step, self.s),
                              in_shardings=(self.state_sharding.params, self.state_sharding.memory,
                                            self.batch_sharding),
                              out_shardings=(rep, self.state_sharding.memory, rep))
    self._steps_fns = {}  # steps_fn's: one program per k (host data), one for device data

  def restore(self, workdir: str, which: str = 'best'):
    """(step, state) of the `which` ('best' or 'latest') checkpoint of workdir, with this
    trainer's shardings; 'best' falls back to the latest when no eval has been saved yet."""
    root = checkpointing.workdir_path(workdir)
    if not any((root / d).exists() for d in ('checkpoints', 'best')):  # and create nothing
      raise FileNotFoundError(f'No checkpoint in {workdir}; train first with the same --workdir.')
    ckpt = checkpointing.Checkpointer(workdir, keep=self.s.config.keep_checkpoints)
    try:  # closed on failure too: an open manager's threads print noise at exit
      restored = ckpt.restore(self.abstract_with_shardings(), which=which)
      if restored is None and which == 'best':
        restored = ckpt.restore(self.abstract_with_shardings(), which='latest')
    finally:
      ckpt.close()
    if restored is None:
      raise FileNotFoundError(f'No checkpoint in {workdir}; train first with the same --workdir.')
    step, state, _ = restored
    return int(step), state

  def abstract_with_shardings(self):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        self.abstract_state, self.state_sharding)

  def train_iterator(self, data_state=None):
    from ait_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    c = self.s.config
    return input_pipeline.make_train_iterator(
        c.dataset, data_dir=c.data_dir, global_batch_size=c.batch_size, seed=c.seed,
        sharding=self.batch_sharding, question_types=tuple(c.question_types) or None,
        start_state=data_state, prefetch=c.prefetch, threads=c.read_threads)

  def train_feed(self, data_state=None) -> '_HostFeed | _DeviceFeed':
    """What the loop runs steps with: host batches, or the device-resident split
    (`config.device_data`); both resume from the same saved position."""
    from ait_jax.data import device_data  # pylint: disable=g-import-not-at-top
    c = self.s.config
    fresh = c.get('fresh_train_data', False)  # Triangle drawn on the devices (docs/data.md#fresh)
    if not (c.device_data or fresh):
      return _HostFeed(self, self.train_iterator(data_state))
    data, order = device_data.make_device_batches(
        c.dataset, self.mesh, data_dir=c.data_dir, global_batch_size=c.batch_size, seed=c.seed,
        question_types=tuple(c.question_types) or None, start_state=data_state, fresh=fresh)
    return _DeviceFeed(self, data, order)

  def steps_fn(self, k: int, data=None) -> _MeshJit:
    """The one jitted train path: the state-donating function of k steps (`steps.train_steps`),
    compiled once per k (with device data, once per k through its index shape)."""
    key = 'device' if data is not None else k
    if key not in self._steps_fns:
      gather = None
      if data is not None:
        from ait_jax.data import device_data  # pylint: disable=g-import-not-at-top
        gather = device_data.gather
      fn = functools.partial(steps.train_steps, self.s, self.tx, gather=gather,
                             batch_sharding=self.batch_sharding)
      batches = ((data.index_sharding(), data.shardings()) if data is not None else
                 ([self.batch_sharding] * k,))
      self._steps_fns[key] = _MeshJit(
          self.mesh, fn, in_shardings=(self.state_sharding, *batches),
          out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
          donate_argnums=(0,))
    return self._steps_fns[key]

  def train_step(self, state, batch):
    """One step on one host batch, `steps_fn(1)` with its metrics unstacked (tests, examples)."""
    state, metrics = self.steps_fn(1)(state, [batch])
    return state, jax.tree.map(lambda m: m[0], metrics)

  def eval_batch_size(self, split: str | None = None) -> int:
    """config.eval_batch_size, or, for a smaller split, the split's size rounded up to the data
    shards: a larger batch would hold only padding (and memory for it)."""
    n = self.s.info.num_examples(split or self.s.info.test_split)
    multiple = math.lcm(self.mesh.shape[sharding.DATA], jax.process_count())
    return min(self.s.config.eval_batch_size, -(-n // multiple) * multiple)

  def evaluate(self, params, memory, split: str | None = None,
               predictions: list | None = None, limit: int | None = None) -> dict:
    """Eval metrics over every example of `split` (default: the dataset's test split, e.g.
    ImageNet's 'validation'), or over its first `limit`, read in order with eval preprocessing;
    appends the predicted classes of the real examples to `predictions` when given (a host
    transfer per batch, so only when asked)."""
    from ait_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    c = self.s.config
    split = split or self.s.info.test_split
    batches = input_pipeline.make_eval_iterator(
        c.dataset, data_dir=c.data_dir, global_batch_size=self.eval_batch_size(split),
        sharding=self.batch_sharding, split=split,
        question_types=tuple(c.question_types) or None, limit=limit)
    total = None
    for batch in batches:
      batch = {k: v for k, v in batch.items() if k in _EVAL_KEYS}
      sums, memory, predicted = self.eval_step(params, memory, batch)
      if predictions is not None:
        mask = np.asarray(jax.device_get(batch['mask']))
        predictions.extend(np.asarray(jax.device_get(predicted))[mask].tolist())
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return steps.summarize_eval(self.s, total)


_TRAIN_KEYS = ('image', 'label', 'question')


class _HostFeed:
  """Steps on grain batches: k of them stacked into one call."""

  def __init__(self, trainer: Trainer, iterator):
    self.trainer, self.iterator = trainer, iterator

  def run(self, state, k: int):
    batches = [{key: v for key, v in next(self.iterator).items() if key in _TRAIN_KEYS}
               for _ in range(k)]
    return self.trainer.steps_fn(k)(state, batches)

  def get_state(self):
    return self.iterator.get_state()

  def close(self):
    close = getattr(self.iterator, 'close', None)
    if close:
      close()


class _DeviceFeed:
  """Steps on the device-resident split: k index rows per call, gathered on device."""

  def __init__(self, trainer: Trainer, data, order):
    self.trainer, self.data, self.order = trainer, data, order

  def run(self, state, k: int):
    return self.trainer.steps_fn(k, self.data)(state, self.order.next_indices(k),
                                               self.data.arrays)

  def get_state(self):
    return self.order.get_state()

  def close(self):
    self.order.close()


def _calls_end(step: int, c, s: steps.Setup) -> int:
  """Where the call starting after `step` ends: at most steps_per_call steps, never past a log,
  eval, save or the last step, and aligned to multiples of steps_per_call, so a resumed run
  makes the same calls as an uninterrupted one."""
  every = (c.log_every_steps, c.checkpoint_every_steps, s.eval_every, c.steps_per_call)
  return min([s.total_steps] + [(step // e + 1) * e for e in every])


def _mean_of(pending: list[dict]) -> dict:
  """Means over every pending step, whether a call returned one step's scalars or k steps'."""
  got = jax.device_get(pending)
  return {k: float(np.mean(np.concatenate([np.atleast_1d(m[k]) for m in got])))
          for k in got[0]}


_EVAL_KEYS = ('image', 'label', 'question', 'mask', 'qtype', 'qsubtype')


def _save_config(config, workdir: str) -> None:
  """Writes config.json atomically (process 0): a kill leaves the old one or the new one."""
  if jax.process_index() == 0:
    metric_writer.write_text_atomic(checkpointing.workdir_path(workdir) / CONFIG_FILE,
                                    config.to_json_best_effort(indent=2, sort_keys=True))


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Compares `config` with the workdir's config.json, the one rule for a workdir's config.

  Returns the changes of RESUMABLE_FIELDS (and of fields only one side has: another version of
  the code) as 'field old -> new'; a change of any other field raises ConfigMismatchError, one
  sentence naming the field, the saved value and the new one. Nothing is written here.
  """
  path = checkpointing.workdir_path(workdir) / CONFIG_FILE
  if not path.exists():
    return []
  try:
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):  # valid JSON, but not a config: damaged or another file
      raise ValueError(f'it holds a JSON {type(saved).__name__}, not an object')
    saved = _flat(saved)
  except (OSError, ValueError) as e:
    raise ConfigMismatchError(
        f'{path} cannot be read ({errors.one_line(e)[:120]}), so this config cannot be checked '
        f'against the run in {workdir}: restore that file, or move it away to accept this '
        'config.') from None
  new = _flat(json.loads(config.to_json_best_effort()))
  changes = []
  missing = object()
  for field in sorted(set(saved) | set(new)):
    old, value = saved.get(field, missing), new.get(field, missing)
    if old == value:
      continue
    if field in RESUMABLE_FIELDS or missing in (old, value):
      changes.append(f'{field} {"(none)" if old is missing else repr(old)} -> '
                     f'{"(none)" if value is missing else repr(value)}')
      continue
    role = next((r for prefix, r in _FIELD_ROLES if field.startswith(prefix)), 'that run')
    flag = config_overrides.as_flags({field: tuple(old) if isinstance(old, list) else old})[0]
    raise ConfigMismatchError(
        f'{workdir} holds a run with {field}={old!r} (its {CONFIG_FILE}), but this config has '
        f'{field}={value!r}, which changes {role}: pass {flag} to resume that run, or another '
        '--workdir for a new one.')
  return changes


def _non_finite(summary: dict) -> list[str]:
  """What of a logged window is not finite: the loss, the gradients, or the updated state."""
  bad = [k for k in ('loss', 'grad_norm') if k in summary and not math.isfinite(summary[k])]
  if summary.get('state_finite', 1.0) < 1.0:
    bad.append('parameters or optimizer state')
  return bad


def _last_good_sentence(ckpt: checkpointing.Checkpointer, workdir: str) -> str:
  step = ckpt.latest_step()
  if step is None:
    return 'There is no checkpoint yet, so a rerun starts afresh'
  return f'The last good checkpoint is step {step} in {workdir}; a rerun resumes from it'


def check_dataset_files(s: steps.Setup) -> None:
  """Opens the train and test splits and reads their first and last example, so a missing or
  truncated file fails now, in one sentence, not after compiling; split sizes other than the
  published ones (`datasets.DatasetInfo`) get one warning line.

  Damage in the middle of a file is left to the reader, which raises the same sentence when it
  meets it (any split, any time, `input_pipeline.DamagedDataError`): reading every record here
  would cost a full pass over the data at every start (gigabytes for ImageNet-100), and a file
  damaged after the start would still only be found by the reader."""
  from ait_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  c = s.config
  differ = []
  for split in (s.info.train_split, s.info.test_split):
    source = input_pipeline.ExampleSource(s.info, split, c.data_dir,
                                          tuple(c.question_types) or None)
    source.read([0, len(source) - 1])
    if len(source) != s.info.num_examples(split):
      differ.append(f'{split} {len(source):,} examples, not {s.info.num_examples(split):,}')
  if differ and jax.process_index() == 0:
    # A folder built from another or a patched archive, or by hand: it trains, but the run's
    # steps per epoch come from the published sizes, and its accuracy is not the dataset's.
    print(f'warning: {s.info.name} in {c.data_dir} holds other split sizes than the published '
          f'ones ({"; ".join(differ)}); steps per epoch count the published '
          f'{s.info.num_train:,}. If that is not meant, delete its folder and run '
          f'`{input_pipeline.prepare_command(s.info.name, c.data_dir)}`.', file=sys.stderr,
          flush=True)


def _take_lock(workdir: str) -> checkpointing.WorkdirLock:
  """Process 0 takes the workdir lock; every process learns whether it got it."""
  lock = checkpointing.WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except checkpointing.WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if refused and error is None:
      error = checkpointing.WorkdirBusyError(
          f'{workdir} is in use by another run (process 0 refused it); pass another --workdir.')
  if error is not None:
    raise error
  return lock


def _write_result(workdir: str, name: str, result: dict) -> None:
  """Writes a result JSON into the workdir; if that fails, the result goes to a temp file and
  stdout, with one line on stderr: a finished evaluation is never lost."""
  text = json.dumps(result, indent=2)
  try:
    (checkpointing.workdir_path(workdir) / name).write_text(text)
    return
  except OSError as e:
    fallback = os.path.join(tempfile.gettempdir(), f'ait_jax_{os.getpid()}_{name}')
    with open(fallback, 'w') as f:
      f.write(text)
    print(text, flush=True)
    print(f'warning: could not write {name} into {workdir} ({e.strerror or e}); the result is '
          f'printed above and saved as {fallback}.', file=sys.stderr, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart: bool = False) -> dict:
  """Trains (resuming from the workdir if it holds a checkpoint).

  Everything that can be checked is checked before the workdir is touched: the config (also
  against the workdir's config.json, `check_resume_config`), the workdir itself, the dataset
  files and the workdir lock; config.json is rewritten only once the checkpoint (if any)
  restored. `restart`: first move everything the workdir holds aside
  (`checkpointing.set_aside_run`) and train afresh. Returns the last eval metrics, the last
  logged train loss ('train_loss'), the step the run stopped at ('step') and 'preempted': the
  signal that stopped it after saving, or None (`python -m ait_jax.main` then exits with
  checkpointing.EXIT_PREEMPTED).
  """
  from ait_jax.data import prepare  # pylint: disable=g-import-not-at-top
  checkpointing.check_workdir(workdir)
  trainer = Trainer(config)
  s = trainer.s
  changes = [] if restart else check_resume_config(s.config, workdir)
  prepare.ensure_prepared(s.info, s.config.data_dir)  # Triangle, Sort-of-CLEVR: one command
  check_dataset_files(s)
  root = checkpointing.workdir_path(workdir)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise checkpointing.disk_error(e, root) from None
  lock = _take_lock(workdir)
  try:
    if restart:
      _on_process_0(lambda: checkpointing.set_aside_run(workdir))
    return _train(trainer, workdir, changes)
  finally:
    lock.release()


def _train(trainer: 'Trainer', workdir: str, changes: list[str] = ()) -> dict:
  s, c = trainer.s, trainer.s.config
  ckpt = checkpointing.Checkpointer(workdir, keep=c.keep_checkpoints)
  writer = feed = None
  try:
    restored = ckpt.restore(trainer.abstract_with_shardings())
    moved = ckpt.set_aside_skipped() if ckpt.skipped else []
    start = 0 if restored is None else int(restored[0])
    aside = checkpointing.SetAside(workdir)  # what this start moves aside lies together
    notes = _on_process_0(lambda: _set_aside_past(
        s, workdir, ckpt, start, fresh=restored is None, changes=changes, aside=aside))
    ckpt.reload()
    _save_config(c, workdir)  # accepted: the checkpoint restored and the config matches
    writer = metric_writer.MetricWriter(workdir, resume_step=start, aside=aside)
    for (_, step, reason), path in zip(ckpt.skipped, moved or [None] * len(ckpt.skipped)):
      writer.log_text(f'Skipped the damaged checkpoint of step {step} ({reason}); kept it as '
                      f'{path}.')
    for note in notes or ():
      writer.log_text(note)
    if changes and restored is not None:
      writer.log_text(f'Resuming with a changed config ({"; ".join(changes)}); '
                      f'{checkpointing.workdir_path(workdir) / CONFIG_FILE} records it.')
    if restored is None:
      state, data_state = trainer.init(trainer.rng), None
    else:
      _, state, data_state = restored
      data_state = data_state or None
      writer.log_text(f'Resumed from step {start} in {workdir}.')
    feed = trainer.train_feed(data_state)
    result = _loop(trainer, workdir, ckpt, writer, feed, state, start)
    best = _best_of(ckpt) if result['step'] == s.total_steps else None
  except BaseException:
    # Stopping on an error: nothing more is saved or reported as saved, and no orbax or grain
    # thread is left to print at exit.
    ckpt.close(failing=True)
    for part in (writer, feed):
      if part is not None:
        with contextlib.suppress(Exception):
          part.close()
    raise
  ckpt.close()
  writer.close()
  feed.close()
  if result['step'] == s.total_steps and 'accuracy' in result and jax.process_index() == 0:
    _write_result(workdir, 'eval_final.json',
                  {'step': result['step'], **_without(result, 'train_loss', 'step', 'preempted')})
  if result['step'] == s.total_steps and jax.process_index() == 0:
    print(closing_line(workdir, s, result, best), flush=True)
  return result


def _best_of(ckpt: checkpointing.Checkpointer) -> tuple[int, float] | None:
  """(step, test accuracy) of the best checkpoint, or None when none was saved as best (or its
  metrics cannot be read: the closing line then leaves it out rather than fail a finished run)."""
  try:
    step = ckpt.best.best_step()
    metrics = ckpt.best.metrics(step) if step is not None else None
  except Exception:  # pylint: disable=broad-except
    return None
  if not metrics or 'accuracy' not in metrics:
    return None
  return int(step), float(metrics['accuracy'])


def closing_line(workdir: str, s: steps.Setup, result: dict,
                 best: tuple[int, float] | None) -> str:
  """A finished run's last line: the final and the best test accuracy, and where the results
  are and how to draw the figures."""
  root = checkpointing.workdir_path(workdir)
  final = result.get('accuracy')
  if final is None and (root / 'eval_final.json').exists():  # rerun of a finished run
    final = json.loads((root / 'eval_final.json').read_text()).get('accuracy')
  parts = [f'Finished {s.total_steps} steps of {s.config.dataset}']
  if final is not None:
    parts[0] += f': {s.info.test_split} accuracy {100 * final:.2f}% at the last step'
  if best is not None:
    parts.append(f'best {100 * best[1]:.2f}% at step {best[0]} (checkpoint in {root / "best"})')
  parts.append(f'results in {root} (eval_final.json, metrics.jsonl, tensorboard/); figures: '
               f'python -m ait_jax.visualize --workdir={workdir} '
               f'--out={str(workdir).rstrip("/")}/figures')
  return '; '.join(parts) + '.'


_RESULT_FILES = ('eval_final.json', 'eval_best.json', 'eval_latest.json')


def _on_process_0(fn):
  """`fn()` on process 0 only (the one that writes the workdir's files), its result there (None
  elsewhere); an error it raises stops every process (the others would wait for it forever)."""
  error = result = None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (raised below, on every process)
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if refused and error is None:
      error = errors.UserError('Process 0 stopped at start-up (its error line says why).')
  if error is not None:
    raise error
  return result


def _result_step(path) -> int | None:
  try:
    step = json.loads(path.read_text()).get('step')
  except (OSError, ValueError, AttributeError):
    return None
  return step if isinstance(step, int) else None


def _set_aside_past(s: steps.Setup, workdir: str, ckpt: checkpointing.Checkpointer, start: int,
                    *, fresh: bool, changes: list[str], aside: checkpointing.SetAside
                    ) -> list[str]:
  """Makes the workdir's history end at `start`, the step this run continues from, before
  anything is written; returns the lines that say what moved where.

  - A fresh start (no checkpoint to restore) in a workdir that holds more of an earlier run than
    a run killed before its first save was on disk leaves (a best checkpoint past that save,
    metrics past the second save, which waits for the first: saves run in the background; a
    result file) is refused: that run's checkpoints are gone (removed, lost), and training here
    would mix two runs. `--restart` moves such a run aside first.
  - The best checkpoints and results (eval_*.json) of steps after `start` are moved aside: a
    best checkpoint never comes from later than the history this run continues. (The metrics
    rows after `start` go too, by the MetricWriter, into the same folder.)
  - On a fresh start, a config.json of another config is moved aside (a resume records the
    change instead).
  """
  root = checkpointing.workdir_path(workdir)
  metrics = root / metric_writer.METRICS_FILE
  rows = metric_writer.parse_rows(metrics.read_bytes()) if metrics.exists() else []
  best = sorted(ckpt.best.all_steps())
  results = {name: _result_step(root / name) for name in _RESULT_FILES if (root / name).exists()}
  if fresh:
    every = (s.config.checkpoint_every_steps, s.eval_every)
    first = min(*every, s.total_steps)
    second = min([s.total_steps] + [(first // e + 1) * e for e in every])
    last_row = max((r['step'] for r in rows), default=0)
    if last_row > second or any(b > first for b in best) or results:
      held = ([f'metrics up to step {last_row}'] if rows else []) + [
          f'the best checkpoint of step {b}' for b in best] + list(results)
      raise EarlierRunError(
          f'{workdir} holds an earlier run ({", ".join(held)}) but no checkpoint to resume '
          f'it from in {root / "checkpoints"}; pass --restart to move that run aside (into '
          f'{root / checkpointing.SET_ASIDE_DIR}/, nothing is deleted) and train afresh, or '
          'pass another --workdir.')
  moved = [f'the best checkpoint of step {b}' for b, _ in ckpt.set_aside_best_after(start, aside)]
  for name, step in results.items():
    if step is None or step > start:
      aside.move(name)
      moved.append(name if step is None else f'{name} (step {step})')
  if fresh and changes and (root / CONFIG_FILE).exists():
    aside.move(CONFIG_FILE)
    moved.append(f'{CONFIG_FILE} of another config ({"; ".join(changes)})')
  if not moved:
    return []
  why = ('this run starts afresh' if fresh else
         f'they are past step {start}, where this run resumes')
  return [f'Moved {", ".join(moved)} into {aside.used}: {why}.']


def _without(d: dict, *keys) -> dict:
  return {k: v for k, v in d.items() if k not in keys}


def _log_start(trainer: 'Trainer', writer: metric_writer.MetricWriter) -> None:
  """The run's first lines: the model, the data, the steps and the mesh; an eval batch larger
  than the test split."""
  s, c = trainer.s, trainer.s.config
  # Name the preset only with the sizes that run: `quick` overrides them.
  changed = [f'{k} {getattr(s.model, k)}' for k, v in models.PRESETS[c.model.preset].items()
             if getattr(s.model, k) != v]
  arch = 'ViT' if c.model.vit else 'AiT'
  writer.log_text((f'{arch} (preset {c.model.preset}, overridden: {", ".join(changed)})' if changed
                   else f'{arch}-{c.model.preset} (depth {s.model.depth}, width {s.model.width})') +
                  f' on {c.dataset}: {s.total_steps} steps, '
                  f'{s.steps_per_epoch} per epoch, batch {c.batch_size}, mesh '
                  f'{dict(trainer.mesh.shape)}, {jax.process_count()} process(es).')
  if trainer.eval_batch_size() < c.eval_batch_size:
    writer.log_text(f'eval_batch_size={c.eval_batch_size} is larger than the '
                    f'{s.info.num_test} {s.info.test_split} examples: they are evaluated in one '
                    f'batch of {trainer.eval_batch_size()}.')


def _final_eval_if_done(trainer: 'Trainer', workdir: str, writer: metric_writer.MetricWriter,
                        state, start: int) -> dict | None:
  """A workdir that holds the final step trains nothing; its final evaluation runs again only
  when a kill came between the final save and eval_final.json."""
  if start < trainer.s.total_steps:
    return None
  writer.log_text(f'{workdir} already holds the final step {start}; nothing to train. Use '
                  '--mode=eval to evaluate it.')
  if not (checkpointing.workdir_path(workdir) / 'eval_final.json').exists():
    # Stopped between the final save and eval_final.json (a kill): finish that part (its
    # metrics row was written before the save).
    return trainer.evaluate(state.params, state.memory)
  return None


def _log_train(writer: metric_writer.MetricWriter, progress: metric_writer.Progress,
               s: steps.Setup, step: int, pending: list[dict]) -> tuple[dict, str | None]:
  """The means of the pending steps' metrics (the only host sync of ordinary steps), written;
  or, with them, the failure sentence when one is not finite (nothing is written then)."""
  summary = _mean_of(pending)
  bad = _non_finite(summary)
  if bad:
    return summary, f'Non-finite {" and ".join(bad)} at step {step}; that state is not saved.'
  del summary['state_finite']
  summary['epoch'] = step / s.steps_per_epoch
  if step > progress.last_step:  # a first call that fills the window measured nothing
    summary.update(progress.update(step))
  writer.write(step, summary, prefix='train')
  return summary, None


def _evaluate_and_log(trainer: 'Trainer', writer: metric_writer.MetricWriter, state,
                      step: int) -> dict:
  """The test split's metrics at `step`, written, and beside them the train examples'
  (memorisation shows); returns the test split's."""
  last_eval = trainer.evaluate(state.params, state.memory)
  writer.write(step, _scalars(last_eval), prefix='eval')
  if trainer.s.train_eval_examples:
    writer.write(step, _scalars(trainer.evaluate(
        state.params, state.memory, trainer.s.info.train_split,
        limit=trainer.s.train_eval_examples)), prefix='eval_train')
  return last_eval


def _loop(trainer: 'Trainer', workdir: str, ckpt: checkpointing.Checkpointer,
          writer: metric_writer.MetricWriter, feed, state, start: int) -> dict:
  """Steps from `start` to the last step (or a signal), logging, evaluating and saving."""
  s, c = trainer.s, trainer.s.config
  _log_start(trainer, writer)
  last_eval = _final_eval_if_done(trainer, workdir, writer, state, start)
  # Processes agree on a signal at log steps, which already wait for the device.
  preemption = checkpointing.PreemptionFlag(agree_every=c.log_every_steps)
  pending, summary, failure, stopped_by = [], {}, None, None
  progress = metric_writer.Progress(start, s.total_steps, c.batch_size)
  profiler = profiling.StepProfiler(c, workdir, start, s.total_steps)  # --config.profile_steps
  step = start
  try:
    while step < s.total_steps:
      k = _calls_end(step, c, s) - step
      profiler.before(step, state)
      state, metrics = feed.run(state, k)
      ckpt.check_saves()  # a save that failed in the background stops the run now
      first = step == start
      step += k
      if profiler.after(step, metrics):
        writer.log_text(profiling.one_line(profiler.summary))
      if first:  # keep compilation out of the images/s and ETA figures
        jax.block_until_ready(metrics)
        progress.restart(step)
      pending.append(metrics)
      is_last = step == s.total_steps
      evaluated = step % s.eval_every == 0 or is_last
      stop = preemption.should_stop(step, ckpt)
      save = step % c.checkpoint_every_steps == 0 or is_last or stop or evaluated
      if step % c.log_every_steps == 0 or save:  # a state is checked finite before it is saved
        summary, failure = _log_train(writer, progress, s, step, pending)
        pending = []
        if failure:
          break
      if evaluated:
        last_eval = _evaluate_and_log(trainer, writer, state, step)
      if save:
        ckpt.save(step, state, feed.get_state(),
                  best_metrics=_scalars(last_eval) if evaluated else None)
      if evaluated:
        progress.restart(step)  # images/s counts training steps only
      if stop:
        ckpt.wait()  # on disk before it is reported as saved
        stopped_by = preemption.raised or 'A signal to another process'
        writer.log_text(f'{stopped_by}: saved step {step} and stopped; rerun the same command '
                        f'to resume (exit status {checkpointing.EXIT_PREEMPTED}).')
        break
    if failure:
      ckpt.wait()  # the last good checkpoint is the last one on disk
      raise NonFiniteLossError(
          f'{failure} {_last_good_sentence(ckpt, workdir)}: lower lr or set model.dtype=float32 '
          'and rerun, or start a new --workdir with grad_clip_norm > 0.')
    ckpt.wait()  # the final save is on disk before eval_final.json says the run finished
  finally:
    profiler.close()
    preemption.restore_handler()
  return {**(last_eval or {}), 'train_loss': summary.get('loss'), 'step': step,
          'preempted': stopped_by}


def _scalars(d: dict) -> dict:
  return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, which: str = 'best',
             split: str | None = None) -> dict:
  """`--mode=eval`: restores the best (or latest) checkpoint and writes eval_<which>.json
  (`split` defaults to the dataset's test split).

  A read-only workdir is fine: the result then goes to a temp file and stdout."""
  checkpointing.check_workdir(workdir, writable=False)
  trainer = Trainer(config)
  check_resume_config(trainer.s.config, workdir)  # the same model and data as the run
  split = split or trainer.s.info.test_split
  step, state = trainer.restore(workdir, which)
  result = {'step': step, 'checkpoint': which, 'split': split,
            'eval_writes_memory': bool(config.model.eval_writes_memory),
            'eval_batch_size': trainer.eval_batch_size(split),
            **trainer.evaluate(state.params, state.memory, split)}
  if jax.process_index() == 0:
    _write_result(workdir, f'eval_{which}.json', result)
  return result
