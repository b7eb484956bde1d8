"""Reproduces the paper on the generated benchmarks (Triangle and Sort-of-CLEVR) in one command
(docs/training.md#paper-results), and checks evaluation batch independence
(docs/model.md#batch-dependence).

  python -m ait_jax.reproduce --scale=gpu --data_dir=data --out=results/gpu   # one H200
  python -m ait_jax.reproduce --scale=cpu --data_dir=data --out=results/cpu   # reduced, 2 CPU cores

Builds the datasets if missing, trains and evaluates every run (checkpoints under
--workdir_root), evaluates one checkpoint at several batch sizes with and without memory writes,
draws its figures, and writes `summary.json`, `RESULTS.md` and each run's metrics JSONL and eval
JSON into --out: the small artefacts to commit.

Rerunning it never deletes a run: a finished run's workdir is reused, a partial one resumed, and
one that belongs to another config, or that a live run holds, is refused before anything trains.
--restart moves what the selected runs' workdirs hold (never a locked one) into their
set_aside/<UTC time>/ folders, to train afresh.
"""
import json
import os
import platform
import shlex
import shutil
import time

from absl import flags

from ait_jax import cli
from ait_jax import config_overrides
from ait_jax import errors
from ait_jax.data import sort_of_clevr as clevr


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  flags.DEFINE_enum('scale', 'cpu', ['cpu', 'gpu'],
                    'gpu: the runs sized for one H200; cpu: the same runs reduced.', flag_values=fv)
  flags.DEFINE_string('data_dir', 'data', 'TFDS data_dir (generated data built here).',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'Where results go (e.g. results/cpu).', flag_values=fv)
  flags.DEFINE_list('only', [], 'Run only these run names (default: all).', flag_values=fv)
  flags.DEFINE_string('workdir_root', 'workdir/reproduce',
                      'Training workdirs (checkpoints) go here; --out keeps the small files.',
                      flag_values=fv)
  flags.DEFINE_bool('restart', False, 'Move what the selected runs\' workdirs hold aside (into '
                    '<workdir>/set_aside/<UTC time>/) and train them afresh (a workdir a live run '
                    'holds is refused); without it finished runs are reused and partial ones '
                    'resumed.', flag_values=fv)

# name -> (config file, variant, config overrides). The gpu scale differs from the paper's
# recipe only in epochs (and Sort-of-CLEVR's model size and batch), so that all runs together fit
# in about 10 minutes of one H200; each difference is stated in RESULTS.md.
RUNS = {
    'gpu': {
        'triangle_ait_small': ('triangle', 'model=small', {'num_epochs': 20}),
        'triangle_vit_small': ('triangle', 'model=vit_small', {'num_epochs': 20}),
        'sort_of_clevr_ait': ('sort_of_clevr', 'model=small', {
            'num_epochs': 8, 'batch_size': 256,
            'question_types': ('non_relational', 'binary', 'ternary')}),
    },
    'cpu': {
        'triangle_ait_small': ('triangle', 'model=small,quick', {
            'total_steps': 4000, 'eval_every_steps': 1000, 'checkpoint_every_steps': 1000,
            'model.depth': 2}),
        'triangle_vit_small': ('triangle', 'model=vit_small,quick', {
            'total_steps': 4000, 'eval_every_steps': 1000, 'checkpoint_every_steps': 1000,
            'model.depth': 2}),
        'sort_of_clevr_ait': ('sort_of_clevr', 'model=small,quick', {
            'total_steps': 3000, 'eval_every_steps': 1000, 'checkpoint_every_steps': 1000,
            'model.depth': 2, 'model.width': 128, 'model.mlp_dim': 256, 'model.num_heads': 2,
            'question_types': ('non_relational', 'binary', 'ternary')}),
    },
}
BATCH_INDEPENDENCE_RUN = 'sort_of_clevr_ait'
EVAL_BATCH_SIZES = (1, 64, 512)


def _load_config(name: str, variant: str, overrides: dict):
  """The config `_command` prints, loaded the way the command line loads it."""
  return cli.load_config(f'{name}:{variant}', overrides)


def _command(name, variant, overrides, data_dir, workdir) -> str:
  parts = [f'python -m ait_jax.main --config=configs/{name}.py:{variant}',
           f'--workdir={workdir}', f'--config.data_dir={data_dir}']
  return ' '.join(parts + [shlex.quote(a) for a in config_overrides.as_flags(overrides)])


def batch_independence(config, workdir: str) -> list[dict]:
  """Evaluates one checkpoint at several batch sizes, without and with memory writes."""
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax import train  # pylint: disable=g-import-not-at-top
  rows = []
  for writes in (False, True):
    reference = None
    for batch in EVAL_BATCH_SIZES:
      c = config.copy_and_resolve_references()
      c.model.eval_writes_memory = writes
      c.eval_batch_size = batch
      c.mesh.data = 1  # batch 1 must not be split
      trainer = train.Trainer(c, devices=jax.devices()[:1])
      step, state = trainer.restore(workdir, which='latest')
      predictions = []
      start = time.time()
      result = trainer.evaluate(state.params, state.memory, predictions=predictions)
      reference = predictions if reference is None else reference
      same = sum(a == b for a, b in zip(predictions, reference)) / len(reference)
      rows.append({'eval_writes_memory': writes, 'eval_batch_size': batch, 'step': int(step),
                   'accuracy': result['accuracy'], 'num_examples': result['num_examples'],
                   'same_predictions_as_batch_1': same, 'seconds': time.time() - start})
      print(f'  writes={writes} batch={batch}: accuracy {result["accuracy"]:.4f}, '
            f'{100 * same:.2f}% predictions as at batch 1', flush=True)
  return rows


def _markdown(summary: dict) -> str:
  lines = [f"# Reproduction on the generated benchmarks: scale `{summary['scale']}`", '',
           f"Hardware: {summary['hardware']}. Command: `{summary['command']}`. "
           f"Training wall time {sum(r['wall_seconds'] for r in summary['runs'].values()) / 60:.1f}"
           f" min (all sessions of each run); this command {summary['wall_seconds'] / 60:.1f} min.",
           '']
  if summary['scale'] == 'cpu':
    lines += ['**CPU-reduced runs**: tiny models (depth 2, width 64 for Triangle and 128 for Sort-of-CLEVR) and 3,000–4,000 steps of batch 64, '
              'not the paper\'s recipe; they show the pipeline end to end, not the paper\'s '
              'accuracy. The GPU reproduction (`--scale=gpu`) is outstanding.', '']
  lines += ['| run | command | steps | wall s | test accuracy | per type |', '|---|---|---|---|---|---|']
  for name, r in summary['runs'].items():
    types = ', '.join(f'{t} {100 * r["eval"][f"accuracy_{t}"]:.1f}' for t in clevr.QUESTION_TYPES
                      if f'accuracy_{t}' in r['eval'])
    lines.append(f"| {name} | `{r['command']}` | {r['eval']['step']} | {r['wall_seconds']:.0f} | "
                 f"{100 * r['eval']['accuracy']:.2f} | {types} |")
  sub = [f"{k.removeprefix('accuracy_')} {100 * v:.1f}"
         for k, v in summary['runs'].get(BATCH_INDEPENDENCE_RUN, {}).get('eval', {}).items()
         if k.startswith('accuracy_') and k[-1].isdigit()]
  if sub:
    lines += ['', f'Sort-of-CLEVR per subtype (type_subtype accuracy %): {", ".join(sub)}.']
  if summary.get('batch_independence'):
    lines += ['', f'## Evaluation batch independence ({BATCH_INDEPENDENCE_RUN}, one checkpoint)', '',
              '| eval_writes_memory | eval batch | accuracy | predictions equal to batch 1 |',
              '|---|---|---|---|']
    for r in summary['batch_independence']:
      lines.append(f"| {r['eval_writes_memory']} | {r['eval_batch_size']} | "
                   f"{100 * r['accuracy']:.2f} | {100 * r['same_predictions_as_batch_1']:.2f}% |")
  return '\n'.join(lines) + '\n'


def selected_runs(scale: str, only: list[str]) -> dict:
  """The runs of `scale`, or those named by --only; a name that is not a run is refused before
  anything is built, trained or overwritten."""
  runs = RUNS[scale]
  unknown = [n for n in only if n not in runs]
  if unknown:
    raise errors.ConfigError(
        f'--only={",".join(unknown)} names no run of --scale={scale}; use some of '
        f'{", ".join(runs)}.')
  return {k: v for k, v in runs.items() if not only or k in only}


def _check_writable_folder(flag: str, path: str) -> None:
  cli.check_output_path(flag, path, folder=True)


WALL_FILE = 'reproduce_wall_seconds.json'  # in a run's workdir: its training time so far


def _finished(workdir: str, total_steps: int) -> bool:
  """A workdir whose run reached its last step: eval_final.json says so, and that step's
  checkpoint is on disk (committed: orbax renames a step's folder only once it is complete)."""
  try:
    with open(os.path.join(workdir, 'eval_final.json')) as f:
      final = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(final, dict) and final.get('step') == total_steps and
          os.path.isdir(os.path.join(workdir, 'checkpoints', str(total_steps))))


def check_workdirs(plans: dict, restart: bool) -> None:
  """Refuses, before anything is trained or deleted, a workdir that a live run holds, or (unless
  it is to be restarted) one whose config.json belongs to another config: one sentence naming
  the folder."""
  from ait_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  for run, (config, workdir) in plans.items():
    if not os.path.isdir(workdir):
      continue
    busy = checkpointing.WorkdirLock(workdir).busy()
    if busy:
      raise checkpointing.WorkdirBusyError(f'Run {run}: {busy}')
    if not restart:
      try:
        train.check_resume_config(config, workdir)
      except train.ConfigMismatchError as e:
        raise train.ConfigMismatchError(
            f'Run {run}: {e} (reproduce reuses its workdirs; --restart moves the selected runs '
            'aside and retrains them).') from None


def _restart(workdir: str) -> None:
  """Moves a run's workdir aside (`checkpointing.set_aside_run`, as `main --restart` does) under
  its lock, so that a run starting meanwhile is refused; nothing is deleted."""
  from ait_jax import checkpointing  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    return
  lock = checkpointing.WorkdirLock(workdir)
  lock.acquire()
  try:
    checkpointing.set_aside_run(workdir)
  finally:
    lock.release()


def _wall_seconds(workdir: str) -> float:
  try:
    with open(os.path.join(workdir, WALL_FILE)) as f:
      return float(json.load(f)['seconds'])
  except (OSError, ValueError, KeyError, TypeError):
    return 0.0


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'out', hint='DIR (e.g. results/cpu)')
  runs = selected_runs(fv.scale, fv.only)
  for flag in ('out', 'data_dir', 'workdir_root'):
    _check_writable_folder(flag, fv[flag].value)
  scale, out, data_dir, workdir_root = fv.scale, fv.out, fv.data_dir, fv.workdir_root
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax import checkpointing, metric_writer, train, validation, visualize  # pylint: disable=g-import-not-at-top
  plans = {}
  for run, (name, variant, overrides) in runs.items():
    config = _load_config(name, variant, overrides)
    config.data_dir = data_dir
    plans[run] = (config, os.path.join(workdir_root, scale, run))
  check_workdirs(plans, fv.restart)
  if fv.restart:
    for _, workdir in plans.values():
      _restart(workdir)
  os.makedirs(out, exist_ok=True)
  start_all = time.time()
  summary = {'scale': scale,
             'hardware': f'{jax.devices()[0].device_kind} ({jax.device_count()} device(s)), '
                         f'{os.cpu_count()} CPU cores, {platform.machine()}',
             'command': f'python -m ait_jax.reproduce --scale={scale} '
                        f'--data_dir={data_dir} --out={out}',
             'runs': {}}
  for run, (name, variant, overrides) in runs.items():
    config, workdir = plans[run]
    command = _command(name, variant, overrides, data_dir, workdir)
    if _finished(workdir, validation.validate(config).total_steps):
      print(f'== {run}: reusing the finished run in {workdir} ({command})', flush=True)
    else:
      print(f'== {run}: {command}', flush=True)
      start = time.time()
      result = train.train_and_evaluate(config, workdir)
      metric_writer.write_text_atomic(os.path.join(workdir, WALL_FILE), json.dumps(
          {'seconds': _wall_seconds(workdir) + time.time() - start}))
      if result['preempted']:
        print(f'reproduce stopped in run {run}; rerun the same command to resume it (finished '
              'runs are reused).', flush=True)
        raise SystemExit(checkpointing.EXIT_PREEMPTED)
    with open(os.path.join(workdir, 'eval_final.json')) as f:
      final = json.load(f)
    os.makedirs(os.path.join(out, run), exist_ok=True)
    for f in ('metrics.jsonl', 'eval_final.json', 'config.json'):
      shutil.copy(os.path.join(workdir, f), os.path.join(out, run, f))
    summary['runs'][run] = {'command': command, 'wall_seconds': _wall_seconds(workdir),
                            'eval': final}
    if run == BATCH_INDEPENDENCE_RUN:
      summary['batch_independence'] = batch_independence(config, workdir)
      visualize.visualize(workdir, os.path.join(out, run, 'figures'), which='latest')
  summary['wall_seconds'] = time.time() - start_all
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(out, 'RESULTS.md'), 'w') as f:
    f.write(_markdown(summary))
  print(_markdown(summary), flush=True)


if __name__ == '__main__':
  cli.run(define_flags, main)
