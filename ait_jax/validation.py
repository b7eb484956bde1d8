"""One check of a whole config at the boundary: `validate(config, mesh)` -> `steps.Setup`.

Every field is checked here, once, before anything is built or compiled, and each bad value
raises one errors.ConfigError that names its field and says what to do (docs/training.md): the
optimizer and loop fields, the parameter sharding, the dataset, the input pipeline's options
against this host's memory, the step counts, the model (`models.validate`, through
`models.create_model`) and, with a mesh, the batch sizes against its data shards and the
processes. The Trainer, `ait_jax.compile` and `reproduce` all start here.
"""
import functools
import os

import jax
import ml_collections
import numpy as np

from ait_jax import errors
from ait_jax import models
from ait_jax import sharding
from ait_jax import steps
from ait_jax.data import augment
from ait_jax.data import datasets
from ait_jax.data import sort_of_clevr as clevr

TRAIN_EVAL_MAX = 10_000  # the default train-split subset: min(test split, this)


def validate(config: ml_collections.ConfigDict, mesh=None, *, processes: int | None = None,
             batch_fields=('batch_size', 'eval_batch_size')) -> steps.Setup:
  """The run's Setup from `config`; with `mesh`, the `batch_fields` are also checked against
  its 'data' axis and `processes` (default: this run's; ait_jax.compile passes the target
  slice's hosts, and only the fields of the steps it compiles), and so is each host's share of
  the prefetched batches against the host's memory."""
  _check_fields(config)
  info = datasets.get_info(config.dataset, tuple(config.question_types) or None)
  _check_pipeline(config, info, processes or jax.process_count())
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch < 1:
    raise errors.ConfigError(f'batch_size={config.batch_size} is larger than the {info.num_train} '
                             'training examples.')
  total_steps = (config.total_steps if config.total_steps > 0 else
                 int(round(config.num_epochs * steps_per_epoch)))
  if total_steps < 1:
    raise errors.ConfigError('num_epochs or total_steps must give at least one step.')
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  model = models.create_model(config.model, num_classes=info.num_classes,
                              image_shape=info.input_shape, question_dim=info.question_dim,
                              batch_size=config.batch_size)
  if mesh is not None:
    for field in batch_fields:
      sharding.check_batch_size(config[field], mesh, field, processes=processes)
  return steps.Setup(
      config=config, info=info, model=model, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, eval_every=eval_every,
      train_eval_examples=_train_eval_examples(config, info),
      preprocess=functools.partial(augment.preprocess, info=info, augment=config.augment))


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """The loop's, optimizer's and sharding's own fields."""
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'steps_per_call'):
    if int(config[field]) < 1:
      raise errors.ConfigError(f'{field}={config[field]} must be a positive integer.')
  for field in ('lr', 'warmup_init_lr', 'end_lr', 'weight_decay', 'grad_clip_norm',
                'warmup_epochs'):
    if not config[field] >= 0:
      raise errors.ConfigError(f'{field}={config[field]} must be non-negative.')
  for field in ('b1', 'b2'):  # AdamW's moment decays; 1 would never forget, >1 diverges
    if not 0 <= config[field] < 1:
      raise errors.ConfigError(f'{field}={config[field]} must be in [0, 1) (e.g. 0.9 and 0.999).')
  if not config.adam_eps > 0:
    raise errors.ConfigError(f'adam_eps={config.adam_eps} must be positive (e.g. 1e-8).')
  if config.schedule_unit not in ('epoch', 'step'):
    raise errors.ConfigError(f"schedule_unit={config.schedule_unit!r} must be 'epoch' or 'step'.")
  for field, least in (('profile_steps', 0), ('profile_skip_steps', 1)):  # ait_jax/profiling.py
    value = config.get(field, least)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise errors.ConfigError(
          f'{field}={value!r} must be a whole number >= {least} (profile_steps: steps to trace, '
          '0 for none; profile_skip_steps: steps run before the trace starts, the first compiles).')
  if config.sharding not in sharding.RULES:
    raise errors.ConfigError(f'sharding={config.sharding!r} must be one of '
                             f'{", ".join(map(repr, sharding.RULES))}.')


def _host_memory_bytes() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _size(n: float) -> str:
  return f'{n / 2 ** 30:.1f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def _check_pipeline(config: ml_collections.ConfigDict, info: datasets.DatasetInfo,
                    processes: int) -> None:
  """The input pipeline's options: reader threads, prefetched batches, the evaluation batch and
  device_data, against this host's memory and the devices' budget. Each of the `processes` hosts
  reads its share of a global batch (ait_jax.compile passes the target's hosts)."""
  if int(config.prefetch) < 0:
    raise errors.ConfigError(
        f'prefetch={config.prefetch} must be 0 (read in the training thread) or a '
        'positive number of batches to keep ready (default 2).')
  most_threads = 8 * (os.cpu_count() or 1)
  if not 1 <= int(config.read_threads) <= most_threads:
    raise errors.ConfigError(
        f'read_threads={config.read_threads} must be between 1 and {most_threads} '
        '(8 per CPU core of this host); the default is 1.')
  per_example = int(np.prod(info.image_shape)) + 4 * info.question_dim + 16  # uint8 image, labels
  budget = _host_memory_bytes() // 2  # the other half: the process, grain, the eval batch
  ready = max(int(config.prefetch), 1) * (config.batch_size // processes) * per_example
  if ready > budget:
    share = f' ({config.batch_size // processes} per host)' if processes > 1 else ''
    raise errors.ConfigError(f'prefetch={config.prefetch} batches of {config.batch_size}{share} '
                             f'need {_size(ready)} of host memory, more than half of this host\'s '
                             f'{_size(2 * budget)}; lower prefetch.')
  # A larger eval batch than the split is cut to the split (train.Trainer.eval_batch_size).
  evaluated = min(int(config.eval_batch_size), info.num_test) // processes * per_example
  if evaluated > budget:
    raise errors.ConfigError(
        f'eval_batch_size={config.eval_batch_size} needs {_size(evaluated)} of host '
        f'memory per evaluation batch, more than half of this host\'s '
        f'{_size(2 * budget)}; lower eval_batch_size.')
  if config.device_data:
    # Imported here: it reads data through grain, which the GPU measurement's hosts lack.
    from ait_jax.data import device_data  # pylint: disable=g-import-not-at-top
    records = info.num_train
    if info.has_question:  # one record per image, expanded to its questions of the kept types
      kept = clevr.question_type_indices(tuple(config.question_types) or None)
      records = info.num_train // (clevr.QUESTIONS_PER_TYPE * len(kept))
    size = -(-records // processes) * int(np.prod(info.image_shape))
    if size > device_data.MAX_BYTES:
      raise errors.ConfigError(f'device_data=True would put {_size(size)} of {info.name} images on '
                               f'every device (at most {_size(device_data.MAX_BYTES)}); set '
                               'device_data=False for this dataset.')


def _train_eval_examples(config: ml_collections.ConfigDict, info: datasets.DatasetInfo) -> int:
  """How many train-split examples each evaluation also scores (`config.eval_train_examples`)."""
  n = config.eval_train_examples
  if not isinstance(n, int) or isinstance(n, bool) or n < -1:
    raise errors.ConfigError(
        f'eval_train_examples={n!r} must be -1 (as many as the test split, at most '
        f'{TRAIN_EVAL_MAX:,}), 0 (none) or a positive whole number.')
  if n == -1:
    n = min(info.num_test, TRAIN_EVAL_MAX)
  return min(n, info.num_train)
