"""Reproduces the paper on the generated benchmarks (Triangle and Sort-of-CLEVR) in one command
(docs/training.md#paper-results), and checks evaluation batch independence
(docs/model.md#batch-dependence).

  python -m ait_jax.reproduce --scale=gpu --data_dir=data --out=results/gpu   # one H200
  python -m ait_jax.reproduce --scale=cpu --data_dir=data --out=results/cpu   # ~100 min, 2 CPU cores
  python -m ait_jax.reproduce --scale=tiny --data_dir=data --out=/tmp/tiny     # the same, seconds

`--scale=cpu` is a small experiment: Triangle, AiT against the dense ViT of the same
dims, 3 seeds each, on fresh training triangles; Sort-of-CLEVR binary questions, AiT against ViT,
3 seeds; all three question types, AiT against ViT, one seed; one ablation pair (AiT without its
bottleneck on Triangle, beside AiT's seed 0); and AiT's seed 0 on the stored Triangle train split
(what fresh images change); two runs train at a time (--jobs). RESULTS.md gives mean ± std over
seeds with the paper's number and the question-only or chance baseline beside each, the recipe
fields that differ from the paper, train-split against test accuracy (memorisation), the
workspace's numbers, the hand-written diagnosis (diagnosis.md in --out), and `curves.png`.
`--scale=tiny` runs the same groups on the small builder configs for a few steps (its test).

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
from typing import NoReturn

from absl import flags

from ait_jax import cli
from ait_jax import config_overrides
from ait_jax import errors


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  flags.DEFINE_enum('scale', 'cpu', ['cpu', 'gpu', 'tiny'],
                    'gpu: the runs sized for one H200; cpu: the small experiment sized for about '
                    '2 hours of an idle 2-core CPU; tiny: the same runs for a few steps on the '
                    'small builder configs (a test).', flag_values=fv)
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
  flags.DEFINE_integer('jobs', None, 'How many runs train at once (default: 2 for --scale=cpu, '
                       'else 1). 1 trains them one by one in this process; N > 1 trains N at a '
                       'time, each as its own `python -m ait_jax.main` writing <workdir>/train.log '
                       '(on 2 CPU cores, 2 train about 1.45 times the images per second of 1).',
                       lower_bound=1, flag_values=fv)

SEEDS = (0, 1, 2)
ALL_TYPES = ('non_relational', 'binary', 'ternary')
# The CPU runs' model: depth 2; width 64 (Triangle) or 128 (Sort-of-CLEVR); `quick` gives lr 1e-3,
# no warm-up, a per-step cosine and batch 64.
_SOC_MODEL = {'model.depth': 2, 'model.width': 128, 'model.mlp_dim': 256, 'model.num_heads': 2}


def experiment(triangle_steps: int, soc_steps: int, soc_all_steps: int, seeds=SEEDS,
               soc_seeds=SEEDS, small: bool = False) -> dict:
  """The runs of the small experiment: name -> (config, variant, overrides). A run's name is its
  group (`group_of`) and `_s<seed>`; the groups are the rows of RESULTS.md's table."""
  tri = {'model.depth': 2, 'fresh_train_data': True, 'total_steps': triangle_steps,
         'eval_every_steps': max(1, triangle_steps // 10),
         'checkpoint_every_steps': max(1, triangle_steps // 10), 'eval_train_examples': 2000}
  # 4,000 train-split questions per evaluation: enough to see memorisation, a fraction of the
  # 98,000 binary ones.
  soc = {**_SOC_MODEL, 'total_steps': soc_steps, 'eval_every_steps': max(1, soc_steps // 6),
         'checkpoint_every_steps': max(1, soc_steps // 6), 'eval_train_examples': 4000}
  soc_all = dict(soc, total_steps=soc_all_steps, question_types=ALL_TYPES,
                 eval_every_steps=max(1, soc_all_steps // 6),
                 checkpoint_every_steps=max(1, soc_all_steps // 6))
  if small:  # the builders' small configs, one layer, one save (a test: compile time is its cost)
    small_run = {'model.depth': 1, 'checkpoint_every_steps': triangle_steps}
    tri.update(small_run, dataset='triangle/small', eval_train_examples=64, eval_batch_size=200)
    for c in (soc, soc_all):
      c.update(small_run, dataset='sort_of_clevr/small', eval_train_examples=-1)
  runs = {}
  for seed in seeds:
    runs[f'triangle_ait_s{seed}'] = ('triangle', 'model=small,quick', dict(tri, seed=seed))
    runs[f'triangle_vit_s{seed}'] = ('triangle', 'model=vit_small,quick', dict(tri, seed=seed))
  runs[f'triangle_ait_no_bottleneck_s{seeds[0]}'] = (
      'triangle', 'model=small,quick,ablation=no_bottleneck', dict(tri, seed=seeds[0]))
  # What fresh images change: AiT seed 0 again, on the stored 50,000-image train split.
  runs[f'triangle_ait_stored_split_s{seeds[0]}'] = (
      'triangle', 'model=small,quick', dict(tri, seed=seeds[0], fresh_train_data=False))
  for seed in soc_seeds:
    runs[f'soc_binary_ait_s{seed}'] = ('sort_of_clevr', 'model=small,quick', dict(soc, seed=seed))
    runs[f'soc_binary_vit_s{seed}'] = ('sort_of_clevr', 'model=vit_small,quick',
                                       dict(soc, seed=seed))
  for model in ('ait', 'vit'):
    runs[f'soc_all_{model}_s{soc_seeds[0]}'] = (
        'sort_of_clevr', f'model={"vit_" if model == "vit" else ""}small,quick',
        dict(soc_all, seed=soc_seeds[0]))
  return runs


# scale -> run name -> (config file, variant, config overrides). The gpu scale differs from the
# paper's recipe only in epochs (and Sort-of-CLEVR's model size and batch), so that all runs
# together fit in about 10 minutes of one H200; each difference is stated in RESULTS.md.
RUNS = {
    'gpu': {
        'triangle_ait_small': ('triangle', 'model=small', {'num_epochs': 20}),
        'triangle_vit_small': ('triangle', 'model=vit_small', {'num_epochs': 20}),
        'sort_of_clevr_ait': ('sort_of_clevr', 'model=small', {
            'num_epochs': 8, 'batch_size': 256,
            'question_types': ('non_relational', 'binary', 'ternary')}),
    },
    # Triangle 60,000 steps of 64 (77 epochs of fresh images), Sort-of-CLEVR binary 3,000 (about
    # two epochs of the 98,000 questions) and all types 6,000 (1.3 epochs of 294,000). Sized by
    # ESTIMATE_MS_PER_STEP to about 100 minutes with --jobs=2 (docs/training.md#cpu-experiment).
    'cpu': experiment(60_000, 3_000, 6_000),
    'tiny': experiment(2, 2, 2, seeds=(0, 1), soc_seeds=(0,), small=True),
}
# The run whose checkpoint is evaluated at several batch sizes, and whose figures are drawn.
BATCH_INDEPENDENCE_RUN = {'gpu': 'sort_of_clevr_ait', 'cpu': 'soc_all_ait_s0'}
EVAL_BATCH_SIZES = (1, 64, 512)

# Milliseconds per training step of one run while a second trains beside it (`--jobs=2`) on an
# idle 2-core x86_64 CPU, evaluations included, per group: measured by this command's run of
# 2026-12-08 (results/cpu/summary.json, each run's wall seconds over its steps, the mean over
# seeds). One run alone steps 1.45 times as fast as one of two (`ALONE_SPEEDUP`: Triangle AiT,
# 4,971 images/s alone against 3,600 side by side, docs/training.md#cpu-experiment). An estimate,
# printed at the start.
ESTIMATE_MS_PER_STEP = {'triangle_ait': 21, 'triangle_vit': 13, 'triangle_ait_no_bottleneck': 15,
                        'triangle_ait_stored_split': 21,
                        'soc_binary_ait': 171, 'soc_binary_vit': 83, 'soc_all_ait': 144,
                        'soc_all_vit': 81}
ALONE_SPEEDUP = 1.45

# Per group: the task, the paper's number (docs/training.md#paper-results), the baseline, and the
# recipe fields that differ from the paper's.
_WHY = ('; why: the runs share about two hours of 2 CPU cores, and the trials chose the width and '
        'the learning rate (docs/training.md#cpu-trials)')
_TRI_DIFF = ('width 64, depth 2, 1 head (paper: AiT-Base, width 768, depth 12); batch 64 '
             '(not given); lr 1e-3, no warm-up, per-step cosine (paper: 1e-4, 5 warm-up epochs); '
             '77 epochs of fresh images (paper: 100)' + _WHY)
_SOC_DIFF = ('width 128, depth 2, 2 heads (paper: AiT-Base); lr 1e-3, no warm-up, per-step cosine '
             '(paper: 1e-4, 5 warm-up epochs); 2 epochs or fewer (paper: 100); batch 64 as the '
             'paper' + _WHY)
GROUPS = {
    'triangle_ait': dict(task='Triangle', paper='99.64 (AiT-Base)', baseline='50.0 (chance)',
                         differs=_TRI_DIFF),
    'triangle_vit': dict(task='Triangle', paper='99.63 (ViT-Base)', baseline='50.0 (chance)',
                         differs=_TRI_DIFF),
    'triangle_ait_no_bottleneck': dict(
        task='Triangle', paper='ablation: AiT-Small 79.70 → 72.75 without bottleneck (mean of '
        'the paper\'s benchmarks)', baseline='50.0 (chance)', differs=_TRI_DIFF),
    'triangle_ait_stored_split': dict(
        task='Triangle', paper='— (the published code draws fresh triangles; this run trains on '
        'the stored 50,000-image split)', baseline='50.0 (chance)', differs=_TRI_DIFF),
    'soc_binary_ait': dict(task='Sort-of-CLEVR binary', paper='80.03 (AiT-Base)',
                           baseline='43.7 (majority per subtype)', differs=_SOC_DIFF),
    'soc_binary_vit': dict(task='Sort-of-CLEVR binary', paper='—', baseline='43.7 (majority per '
                           'subtype)', differs=_SOC_DIFF),
    'soc_all_ait': dict(task='Sort-of-CLEVR, three types', paper='binary 80.03 (AiT-Base); '
                        'Relation Networks ≈ 99 non-relational, ≈ 89 relational',
                        baseline='50.0 / 43.7 / 54.0 (majority per subtype)', differs=_SOC_DIFF),
    'soc_all_vit': dict(task='Sort-of-CLEVR, three types', paper='—',
                        baseline='50.0 / 43.7 / 54.0 (majority per subtype)', differs=_SOC_DIFF),
}


def group_of(run: str) -> str:
  """'triangle_ait_s2' -> 'triangle_ait'; a name without a seed suffix is its own group."""
  head, sep, seed = run.rpartition('_s')
  return head if sep and seed.isdigit() else run


def estimate_minutes(runs: dict, jobs: int = 2) -> float | None:
  """The plan's training time on an idle 2-core CPU with `jobs` runs at a time, by
  ESTIMATE_MS_PER_STEP (None if a group has no measurement)."""
  total = 0.0
  for run, (_, _, overrides) in runs.items():
    ms = ESTIMATE_MS_PER_STEP.get(group_of(run))
    if ms is None or 'total_steps' not in overrides:
      return None
    total += ms * overrides['total_steps'] / 1000
  return total / 60 / (ALONE_SPEEDUP if jobs == 1 else 2)


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


def workspace_stats(config, workdir: str) -> dict | None:
  """For an AiT run's last checkpoint: per layer, the stored slots' mean |cos| (against the value
  at initialisation: a collapsed memory is near 1) and the fraction of the first test batch's
  tokens that no slot's top-k selects (tokens the bottleneck never lets into the memory); None
  for a ViT. The quantities of `visualize`'s figures, as numbers beside every AiT run."""
  if config.model.vit:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax import visualize  # pylint: disable=g-import-not-at-top
  trainer, _, state = visualize.restore(config, workdir, 'latest')
  data = visualize.collect(trainer, state)
  memory = jax.device_get(state.memory)
  dim = memory['block0']['workspace']['slots'].shape[-1]
  return {'memory_mean_abs_cos': visualize.memory_mean_abs_cos(memory),
          'memory_mean_abs_cos_at_init': visualize.random_mean_abs_cos(dim),
          'tokens_never_selected': [float((layer['selections'].sum((0, 1)) == 0).mean())
                                    for layer in data['layers']]}


MAX_TRAIN_ROWS = 1000  # train rows kept in --out's copy of a run's metrics.jsonl


def thin_rows(rows: list[dict], max_train_rows: int = MAX_TRAIN_ROWS) -> list[dict]:
  """Every evaluation row, and at most `max_train_rows` train rows evenly spaced, the last kept:
  --out's copy of metrics.jsonl, small enough to commit (a 60,000-step run logs 6,000 train rows,
  2.2 MB); the workdir keeps every row."""
  train = [i for i, r in enumerate(rows) if r.get('split') == 'train']
  stride = -(-len(train) // max_train_rows) if train else 1
  keep = set(train[::-1][::stride])
  return [r for i, r in enumerate(rows) if r.get('split') != 'train' or i in keep]


def _pct(values) -> str:
  """'98.12 ± 0.31' (sample std over seeds) or '98.12' for one value; '' for none."""
  values = [100 * v for v in values if v is not None]
  if not values:
    return ''
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f'{mean:.2f}'
  std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
  return f'{mean:.2f} ± {std:.2f}'


def _last(rows: list[dict], split: str, key: str = 'accuracy'):
  values = [r[key] for r in rows if r.get('split') == split and key in r]
  return values[-1] if values else None


def groups(summary_runs: dict) -> dict:
  """Per group: its runs and seeds, the test accuracy's mean and std over seeds (and per question
  type), and the train split's accuracy at the end (memorisation shows as train ≫ test)."""
  out = {}
  for run, r in summary_runs.items():
    out.setdefault(group_of(run), []).append((run, r))
  table = {}
  for group, members in out.items():
    evals = [r['eval'] for _, r in members]
    keys = ['accuracy'] + [f'accuracy_{t}' for t in ALL_TYPES if f'accuracy_{t}' in evals[0]]
    table[group] = {
        **GROUPS.get(group, {}),
        'runs': [run for run, _ in members], 'seeds': [r.get('seed') for _, r in members],
        'epochs': members[0][1].get('epochs'),
        'test': {k: [e.get(k) for e in evals] for k in keys},
        'test_mean_std': {k: _pct([e.get(k) for e in evals]) for k in keys},
        'train_split_accuracy': [r.get('train_split_accuracy') for _, r in members],
    }
  return table


def _markdown(summary: dict) -> str:
  lines = [f"# Reproduction on the generated benchmarks: scale `{summary['scale']}`", '',
           f"Hardware: {summary['hardware']}. Command: `{summary['command']}`. "
           f"Training time summed over the runs "
           f"{sum(r['wall_seconds'] for r in summary['runs'].values()) / 60:.1f} min (each run "
           f"over all its sessions, {summary.get('jobs', 1)} at a time); this invocation's wall "
           f"time {summary['wall_seconds'] / 60:.1f} min.", '']
  if summary.get('estimate_minutes') is not None:
    lines += [f"Estimated training time before the run: {summary['estimate_minutes']:.0f} min "
              f"on an idle 2-core CPU, {summary.get('jobs', 1)} run(s) at a time "
              '(`reproduce.ESTIMATE_MS_PER_STEP`, from measured trials).', '']
  if summary['scale'] in ('cpu', 'tiny'):
    lines += ['**CPU-scale runs**, not the paper\'s recipe: small models and few epochs; each '
              'row says which recipe fields differ from the paper. Parameters start as the '
              'published code\'s (`model.init=reference`); Triangle trains on fresh images every '
              'epoch (`fresh_train_data`), except `triangle_ait_stored_split` (the stored '
              '50,000-image split, to show what fresh images change), and is tested on the '
              'stored test split.', '']
  if summary.get('groups'):
    lines += ['| group | task | seeds | test accuracy % (mean ± std) | per type | train split % '
              '(end) | paper | baseline | epochs (paper: 100) | differs from the paper |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for group, g in summary['groups'].items():
      types = ', '.join(f'{k.removeprefix("accuracy_")} {v}' for k, v in g['test_mean_std'].items()
                        if k != 'accuracy')
      lines.append(f"| {group} | {g.get('task', '')} | {len(g['runs'])} | "
                   f"{g['test_mean_std']['accuracy']} | {types} | "
                   f"{_pct(g['train_split_accuracy'])} | {g.get('paper', '')} | "
                   f"{g.get('baseline', '')} | {g.get('epochs') or 0:.3g} | "
                   f"{g.get('differs', '')} |")
    lines += ['', '![train-split and test accuracy against step, every run](curves.png)', '']
  lines += ['## Diagnosis', '']
  lines += [summary['diagnosis'].strip() if summary.get('diagnosis') else
            f'Not written yet: it is kept by hand in `{DIAGNOSIS_FILE}` beside this file, from '
            'the tables, the curves and the figures, and copied here on every run.', '']
  lines += ['## Every run', '',
            '| run | steps | wall s | test % | train split % | per subtype % | balance loss (end) '
            '| memory mean \\|cos\\| per layer (at init) | tokens no slot selects, per layer |',
            '|---|---|---|---|---|---|---|---|---|']
  for name, r in summary['runs'].items():
    subtypes = ', '.join(f'{k.removeprefix("accuracy_")} {100 * v:.1f}'
                         for k, v in r['eval'].items()
                         if k.startswith('accuracy_') and k[-1].isdigit())
    ws = r.get('workspace') or {}
    cos = (', '.join(f'{c:.2f}' for c in ws['memory_mean_abs_cos']) +
           f" ({ws['memory_mean_abs_cos_at_init']:.2f})" if ws else '—')
    never = ', '.join(f'{100 * f:.0f}%' for f in ws['tokens_never_selected']) if ws else '—'
    train_split = r.get('train_split_accuracy')
    balance = r.get('balance_loss_end')
    lines.append(
        f"| {name} | {r['eval']['step']} | {r['wall_seconds']:.0f} | "
        f"{100 * r['eval']['accuracy']:.2f} | "
        f"{'' if train_split is None else f'{100 * train_split:.2f}'} | {subtypes} | "
        f"{'—' if not balance else f'{balance:.3f}'} | {cos} | {never} |")
  lines += ['', 'Each run\'s command:', '']
  lines += [f"- {name}: `{r['command']}`" for name, r in summary['runs'].items()]
  bi_run = summary.get('batch_independence_run')
  if summary.get('batch_independence'):
    lines += ['', f'## Evaluation batch independence ({bi_run}, one checkpoint)', '',
              '| eval_writes_memory | eval batch | accuracy | predictions equal to batch 1 |',
              '|---|---|---|---|']
    for r in summary['batch_independence']:
      lines.append(f"| {r['eval_writes_memory']} | {r['eval_batch_size']} | "
                   f"{100 * r['accuracy']:.2f} | {100 * r['same_predictions_as_batch_1']:.2f}% |")
  return '\n'.join(lines) + '\n'


def plot_curves(summary: dict, out_dir: str) -> str:
  """curves.png: test (solid) and train-split (dotted) accuracy against step, one panel per task,
  one colour per group, one line per seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = {}
  for group, g in summary['groups'].items():
    tasks.setdefault(g.get('task', group), []).append(group)
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  for ax, (task, names) in zip(axes[0], tasks.items()):
    for colour, group in enumerate(names):
      for i, run in enumerate(summary['groups'][group]['runs']):
        curve = summary['runs'][run].get('curve', {})
        for split, style in (('eval', '-'), ('eval_train', ':')):
          points = curve.get(split, [])
          if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], style,
                    color=f'C{colour}', alpha=0.8,
                    label=f'{group} ({"test" if split == "eval" else "train split"})'
                    if i == 0 else None)
    ax.set(title=task, xlabel='step', ylabel='accuracy %')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, 'curves.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


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
DIAGNOSIS_FILE = 'diagnosis.md'  # in --out, written by hand; RESULTS.md includes it


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


def _add_wall_seconds(workdir: str, seconds: float) -> None:
  from ait_jax import metric_writer  # pylint: disable=g-import-not-at-top
  metric_writer.write_text_atomic(os.path.join(workdir, WALL_FILE), json.dumps(
      {'seconds': _wall_seconds(workdir) + seconds}))


def _stopped(run: str | None = None) -> NoReturn:
  from ait_jax import checkpointing  # pylint: disable=g-import-not-at-top
  where = f' in run {run}' if run else ''
  print(f'reproduce stopped{where}; rerun the same command to resume (finished runs are '
        'reused).', flush=True)
  raise SystemExit(checkpointing.EXIT_PREEMPTED)


def _train_in_processes(runs: dict, plans: dict, setups: dict, data_dir: str,
                        jobs: int) -> set[str]:
  """--jobs > 1: trains the unfinished runs `jobs` at a time, each as its own `main` process
  (`run_pool`); the datasets are built here first, so that no two children build one. Returns
  the names of the runs it trained."""
  from ait_jax import run_pool  # pylint: disable=g-import-not-at-top
  from ait_jax.data import prepare  # pylint: disable=g-import-not-at-top
  pending = []
  for run, (name, variant, overrides) in runs.items():
    _, workdir = plans[run]
    setup = setups[run]
    if _finished(workdir, setup.total_steps):
      continue
    prepare.ensure_prepared(setup.info, data_dir)
    args = [f'--config={name}:{variant}', f'--workdir={workdir}', f'--config.data_dir={data_dir}',
            *config_overrides.as_flags(overrides)]
    ms = ESTIMATE_MS_PER_STEP.get(group_of(run))
    pending.append(run_pool.Job(run, run_pool.main_command(args), workdir, setup.total_steps,
                                estimate_s=ms * setup.total_steps / 1000 if ms else None))
  if pending:
    print(f'Runs to train: {len(pending)}, {jobs} at a time, each in its own process.', flush=True)
  signal_name = run_pool.train(pending, jobs,
                               on_done=lambda job, o: _add_wall_seconds(job.workdir, o.seconds))
  if signal_name:
    _stopped()
  return {job.name for job in pending}


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'out', hint='DIR (e.g. results/cpu)')
  runs = selected_runs(fv.scale, fv.only)
  for flag in ('out', 'data_dir', 'workdir_root'):
    _check_writable_folder(flag, fv[flag].value)
  scale, out, data_dir, workdir_root = fv.scale, fv.out, fv.data_dir, fv.workdir_root
  jobs = fv.jobs or (2 if scale == 'cpu' else 1)
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax import metric_writer, train, validation, visualize  # pylint: disable=g-import-not-at-top
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
                        f'--data_dir={data_dir} --out={out} --jobs={jobs}',
             'jobs': jobs, 'estimate_minutes': estimate_minutes(runs, jobs), 'runs': {}}
  if summary['estimate_minutes'] is not None:
    print(f'{len(runs)} runs, estimated {summary["estimate_minutes"]:.0f} min of training on an '
          f'idle 2-core CPU, {jobs} at a time (reproduce.ESTIMATE_MS_PER_STEP).', flush=True)
  setups = {run: validation.validate(config) for run, (config, _) in plans.items()}
  trained = _train_in_processes(runs, plans, setups, data_dir, jobs) if jobs > 1 else set()
  for run, (name, variant, overrides) in runs.items():
    config, workdir = plans[run]
    command = _command(name, variant, overrides, data_dir, workdir)
    setup = setups[run]
    if run in trained:
      print(f'== {run}: trained above ({command})', flush=True)
    elif _finished(workdir, setup.total_steps):
      print(f'== {run}: reusing the finished run in {workdir} ({command})', flush=True)
    else:
      print(f'== {run}: {command}', flush=True)
      start = time.time()
      result = train.train_and_evaluate(config, workdir)
      _add_wall_seconds(workdir, time.time() - start)
      if result['preempted']:
        _stopped(run)
    with open(os.path.join(workdir, 'eval_final.json')) as f:
      final = json.load(f)
    os.makedirs(os.path.join(out, run), exist_ok=True)
    for f in ('eval_final.json', 'config.json'):
      shutil.copy(os.path.join(workdir, f), os.path.join(out, run, f))
    rows = metric_writer.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    metric_writer.write_text_atomic(os.path.join(out, run, 'metrics.jsonl'), ''.join(
        json.dumps(r) + '\n' for r in thin_rows(rows)))
    summary['runs'][run] = {
        'command': command, 'wall_seconds': _wall_seconds(workdir), 'eval': final,
        'group': group_of(run), 'seed': config.seed,
        'epochs': setup.total_steps / setup.steps_per_epoch,
        'train_split_accuracy': _last(rows, 'eval_train'),
        'balance_loss_end': _last(rows, 'train', 'balance_loss'),
        'workspace': workspace_stats(config, workdir),
        'curve': {split: [(r['step'], r['accuracy']) for r in rows
                          if r.get('split') == split and 'accuracy' in r]
                  for split in ('eval', 'eval_train')}}
    if run == BATCH_INDEPENDENCE_RUN.get(scale):
      summary['batch_independence_run'] = run
      summary['batch_independence'] = batch_independence(config, workdir)
      visualize.visualize(workdir, os.path.join(out, run, 'figures'), which='latest')
  summary['wall_seconds'] = time.time() - start_all
  diagnosis = os.path.join(out, DIAGNOSIS_FILE)  # written by hand; none before the first run
  if os.path.exists(diagnosis):
    with open(diagnosis) as f:
      summary['diagnosis'] = f.read()
  summary['groups'] = groups(summary['runs'])
  plot_curves(summary, out)
  metric_writer.write_text_atomic(os.path.join(out, 'summary.json'), json.dumps(summary, indent=2))
  metric_writer.write_text_atomic(os.path.join(out, 'RESULTS.md'), _markdown(summary))
  print(_markdown(summary), flush=True)


if __name__ == '__main__':
  cli.run(define_flags, main)
