"""Entry point: `python -m ait_jax.main --config=configs/cifar100.py[:variant] --workdir=DIR`.

Parses flags, starts multi-host JAX when asked, then trains (resuming) or evaluates.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ait_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A configs/*.py file, optionally with :variant (e.g. :model=base,quick).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train (resumes from the workdir) or eval (restores a checkpoint).')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                                'Which checkpoint --mode=eval restores.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', None, ['auto', 'on', 'off'],
    'Multi-host start-up; default: $AIT_JAX_DISTRIBUTED or auto (see ait_jax/distributed.py).')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('Pass --config=configs/<dataset>.py (e.g. configs/triangle.py:quick).')
  if _WORKDIR.value is None:
    raise app.UsageError('Pass --workdir=DIR: checkpoints and metrics are written there.')
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  distributed.maybe_initialize(_DISTRIBUTED.value)
  from ait_jax import train  # pylint: disable=g-import-not-at-top  (after distributed start-up)
  config = _CONFIG.value
  try:
    if _MODE.value == 'train':
      train.train_and_evaluate(config, _WORKDIR.value)
    else:
      result = train.evaluate(config, _WORKDIR.value, which=_CHECKPOINT.value)
      print({k: v for k, v in result.items() if not isinstance(v, list)}, flush=True)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
    # A user's mistake gets one sentence, not a traceback from deep inside JAX.
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  app.run(main)
