"""Trains a model of a config (resuming) or evaluates its checkpoint.

  python -m ait_jax.main --config=triangle:quick --config.data_dir=data --workdir=workdir/tq
  python -m ait_jax.main --config=configs/cifar100.py:model=base --workdir=DIR [--mode=eval]

--config names a configs/*.py file or a shipped config by name (cifar10, cifar100, pet,
imagenet100, triangle, sort_of_clevr), with an optional variant after the colon, comma separated:
  model=small|medium|base|large|coordination   the preset, or vit_small|vit_medium|vit_base|
                                               vit_large|vit_coordination for the dense ViT
  ablation=no_bottleneck|no_self_attention|no_hopfield|no_balance_loss|memory_reset|no_memory
                                               (or none)
  quick                                        a CPU smoke run: a 1-layer model, 60 steps
                                               (quick=true|false, 1|0, yes|no also work)
e.g. --config=cifar100:model=small,ablation=no_hopfield,quick. Any field of the config is
overridden with --config.X=Y (--config.batch_size=256, --config.model.dtype=bfloat16); a
misspelt field is refused with the nearest name. The data folder is --config.data_dir (default
$TFDS_DATA_DIR or ~/tensorflow_datasets): the first run generates or downloads what it lacks.

Starts multi-host JAX when asked (ait_jax/distributed.py). A user's mistake ends in one `error:`
line and exit code 2 (ait_jax/cli.py); a run stopped by SIGTERM or SIGINT after saving exits with
75 (checkpointing.EXIT_PREEMPTED): rerun it to resume.
"""
from absl import flags
from ml_collections import config_flags

from ait_jax import cli
from ait_jax import distributed

MAX_CLASS_ROWS = 20  # more classes (CIFAR-100, ImageNet-100): the weakest and strongest only


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file or a shipped config by name (e.g. cifar100), '
      'optionally with :variant (e.g. :model=base,quick).',
      lock_config=True, flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.', flag_values=fv)
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                    'train (resumes from the workdir) or eval (restores a checkpoint).',
                    flag_values=fv)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                    'Which checkpoint --mode=eval restores.', flag_values=fv)
  flags.DEFINE_bool('restart', False,
                    'Train afresh: first move everything --workdir holds (an earlier run) into '
                    '<workdir>/set_aside/<UTC time>/; nothing is deleted.', flag_values=fv)
  distributed.define_flags(fv)


def main(fv: flags.FlagValues) -> None:
  if fv.config is None:
    cli.fail('Pass --config=configs/<dataset>.py (e.g. configs/triangle.py:quick).')
  cli.require(fv, 'workdir', hint='DIR (checkpoints and metrics are written there)')
  if fv.restart and fv.mode != 'train':
    cli.fail('--restart trains afresh, so it goes with --mode=train only; leave it out to '
             'evaluate the run in --workdir.')
  distributed.maybe_initialize(fv.distributed)
  from ait_jax import train  # pylint: disable=g-import-not-at-top  (after distributed start-up)
  if fv.mode == 'train':
    result = train.train_and_evaluate(fv.config, fv.workdir, restart=fv.restart)
    if result['preempted']:  # saved and stopped: a scheduler can requeue on this status
      raise SystemExit(train.checkpointing.EXIT_PREEMPTED)
  else:
    result = train.evaluate(fv.config, fv.workdir, which=fv.checkpoint)
    print(eval_table(result, fv.config), flush=True)


def eval_table(result: dict, config) -> str:
  """`--mode=eval`'s summary: overall accuracy, then per question type and subtype (Sort-of-CLEVR)
  or per class; every number is also in eval_<checkpoint>.json."""
  from ait_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from ait_jax.data import sort_of_clevr as clevr  # pylint: disable=g-import-not-at-top
  info = datasets.get_info(config.dataset, tuple(config.question_types) or None)
  pct = lambda a: '     n/a' if a is None else f'{100 * a:7.2f}%'
  rows = [('overall', result['accuracy'])]
  if info.has_question:
    for t, tname in enumerate(clevr.QUESTION_TYPES):
      if f'accuracy_{tname}' in result:
        rows.append((tname, result[f'accuracy_{tname}']))
        rows += [(f'  {sub}', result[f'accuracy_{tname}_{i}'])
                 for i, sub in enumerate(clevr.SUBTYPES[t]) if f'accuracy_{tname}_{i}' in result]
  else:
    names = info.label_names or [str(i) for i in range(info.num_classes)]
    per_class = list(zip(names, result['per_class_accuracy']))
    if len(per_class) > MAX_CLASS_ROWS:
      ranked = sorted((a, n) for n, a in per_class if a is not None)
      rows += [(f'class {n} (weakest)', a) for a, n in ranked[:3]]
      rows += [(f'class {n} (strongest)', a) for a, n in ranked[-3:]]
    else:
      rows += [(f'class {n}', a) for n, a in per_class]
  width = max(len(name) for name, _ in rows)
  head = (f'{result["checkpoint"].capitalize()} checkpoint (step {result["step"]}) on '
          f'{config.dataset} {result["split"]}: {result["num_examples"]:,} examples, '
          f'cross-entropy {result["loss"]:.4f}; all numbers in eval_{result["checkpoint"]}.json')
  lines = [head, f'  {"":{width}}  accuracy']
  lines += [f'  {name:{width}}  {pct(a)}' for name, a in rows]
  return '\n'.join(lines)


if __name__ == '__main__':
  cli.run(define_flags, main)
