"""Entry point: `python -m ait_jax.main --config=configs/cifar100.py[:variant] --workdir=DIR`.

Parses flags, starts multi-host JAX when asked, then trains (resuming) or evaluates. A user's
mistake ends in one `error:` line and exit code 2 (ait_jax/cli.py); a run stopped by SIGTERM or
SIGINT after saving exits with 75 (checkpointing.EXIT_PREEMPTED): rerun it to resume.
"""
from absl import flags
from ml_collections import config_flags

from ait_jax import cli


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file, optionally with :variant (e.g. :model=base,quick).',
      lock_config=True, flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.', flag_values=fv)
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                    'train (resumes from the workdir) or eval (restores a checkpoint).',
                    flag_values=fv)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                    'Which checkpoint --mode=eval restores.', flag_values=fv)
  flags.DEFINE_enum(
      'distributed', None, ['auto', 'on', 'off'],
      'Multi-host start-up; default: $AIT_JAX_DISTRIBUTED or auto (see ait_jax/distributed.py).',
      flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  if fv.config is None:
    cli.fail('Pass --config=configs/<dataset>.py (e.g. configs/triangle.py:quick).')
  cli.require(fv, 'workdir', hint='DIR (checkpoints and metrics are written there)')
  from ait_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(fv.distributed)
  from ait_jax import train  # pylint: disable=g-import-not-at-top  (after distributed start-up)
  if fv.mode == 'train':
    result = train.train_and_evaluate(fv.config, fv.workdir)
    if result['preempted']:  # saved and stopped: a scheduler can requeue on this status
      raise SystemExit(train.checkpointing.EXIT_PREEMPTED)
  else:
    result = train.evaluate(fv.config, fv.workdir, which=fv.checkpoint)
    print({k: v for k, v in result.items() if not isinstance(v, list)}, flush=True)


if __name__ == '__main__':
  cli.run(define_flags, main)
