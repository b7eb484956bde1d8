"""What one step computes, as pure functions of (Setup, state, batch): the validated setup of a run,
the schedule and optimizer, the train state, the loss and its gradients, the train step and the
eval step. `train.py` compiles them once (jax.jit, state donated) and runs the loop around them.
"""
import dataclasses
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ait_jax import errors
from ait_jax import models
from ait_jax import sharding
from ait_jax.data import augment
from ait_jax.data import datasets
from ait_jax.data import device_data
from ait_jax.data import sort_of_clevr as clevr

QUESTION_TYPES = clevr.QUESTION_TYPES


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  memory: Any
  rng: jax.Array  # raw uint32 key; per-step randomness is fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from a config, computed and checked before anything is compiled."""
  config: ml_collections.ConfigDict
  info: Any
  model: models.AiT
  image_shape: tuple
  question_dim: int
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  num_train: int


def _host_memory_bytes() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _size(n: float) -> str:
  return f'{n / 2 ** 30:.1f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def _check_pipeline(config: ml_collections.ConfigDict, info) -> None:
  """The input pipeline's options (`setup`): reader threads, prefetched batches, the evaluation
  batch and device_data, against this host's memory and the devices' budget."""
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
  processes = jax.process_count()
  ready = max(int(config.prefetch), 1) * (config.batch_size // processes) * per_example
  if ready > budget:
    raise errors.ConfigError(f'prefetch={config.prefetch} batches of {config.batch_size} need '
                             f'{_size(ready)} of host memory, more than half of this host\'s '
                             f'{_size(2 * budget)}; lower prefetch.')
  # A larger eval batch than the split is cut to the split (train.Trainer.eval_batch_size).
  evaluated = min(int(config.eval_batch_size), info.num_test) // processes * per_example
  if evaluated > budget:
    raise errors.ConfigError(
        f'eval_batch_size={config.eval_batch_size} needs {_size(evaluated)} of host '
        f'memory per evaluation batch, more than half of this host\'s '
        f'{_size(2 * budget)}; lower eval_batch_size.')
  if config.device_data:
    records = info.num_train
    if info.has_question:  # one record per image, expanded to its questions of the kept types
      kept = clevr.question_type_indices(tuple(config.question_types) or None)
      records = info.num_train // (clevr.QUESTIONS_PER_TYPE * len(kept))
    size = -(-records // processes) * int(np.prod(info.image_shape))
    if size > device_data.MAX_BYTES:
      raise errors.ConfigError(f'device_data=True would put {_size(size)} of {info.name} images on '
                               f'every device (at most {_size(device_data.MAX_BYTES)}); set '
                               'device_data=False for this dataset.')


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config (each bad value raises one ValueError naming its field)."""
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
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
  info = datasets.get_info(config.dataset, tuple(config.question_types) or None)
  _check_pipeline(config, info)
  if int(config.steps_per_call) < 1:
    raise errors.ConfigError(f'steps_per_call={config.steps_per_call} must be a positive integer '
                             '(1: one step per call).')
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
  return Setup(config, info, model, info.input_shape, info.question_dim, steps_per_epoch,
               total_steps, eval_every, info.num_train)


TRAIN_EVAL_MAX = 10_000  # the default train-split subset: min(test split, this)


def train_eval_examples(s: Setup) -> int:
  """How many train-split examples each evaluation also scores (`config.eval_train_examples`);
  raises one ValueError for a value other than -1, 0 or a positive whole number."""
  n = s.config.eval_train_examples
  if not isinstance(n, int) or isinstance(n, bool) or n < -1:
    raise errors.ConfigError(
        f'eval_train_examples={n!r} must be -1 (as many as the test split, at most '
        f'{TRAIN_EVAL_MAX:,}), 0 (none) or a positive whole number.')
  if n == -1:
    n = min(s.info.num_test, TRAIN_EVAL_MAX)
  return min(n, s.num_train)


def learning_rate_fn(s: Setup) -> optax.Schedule:
  """Linear warm-up from warmup_init_lr, then cosine to end_lr (docs/training.md#schedule).

  optax's warmup-cosine over epochs; with schedule_unit 'epoch' the epoch is floored first, so the
  rate changes once per epoch as in the reference recipe.
  """
  c = s.config
  total_epochs = s.total_steps / s.steps_per_epoch
  by_epoch = optax.warmup_cosine_decay_schedule(
      init_value=c.warmup_init_lr, peak_value=c.lr, warmup_steps=c.warmup_epochs,
      decay_steps=max(total_epochs, c.warmup_epochs + 1e-9), end_value=c.end_lr)

  def lr(step):
    epoch = step / s.steps_per_epoch
    return by_epoch(jnp.floor(epoch) if c.schedule_unit == 'epoch' else epoch)

  return lr


# The workspace's submodules that reach the loss only through the stop-gradient memory write of
# gradient_mode 'reference' (models.GlobalWorkspace, docs/model.md#gradient-flow).
WRITE_ONLY = ('value', 'out', 'write_norm')


def weight_decay_mask(model: models.AiT):
  """AdamW's decay mask as the published code has it, or None when every parameter decays.

  torch.optim.AdamW skips a parameter whose gradient is None, so in gradient_mode 'reference' the
  published code never decays the workspace's `WRITE_ONLY` parameters, which get no gradient
  (docs/training.md#recipe). With `learned_write` they learn and decay; the ViT has no workspace.
  The mask is a function of the parameter tree, by module name: True where AdamW decays.
  """
  if model.vit or models.GlobalWorkspace(**dict(model.workspace)).gradient_mode != 'reference':
    return None

  def decays(path) -> bool:
    names = [getattr(k, 'key', None) for k in path]
    return not (len(names) >= 3 and names[-3] == 'workspace' and names[-2] in WRITE_ONLY)

  return lambda params: jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def adamw(learning_rate, *, b1: float, b2: float, eps: float, weight_decay: float,
          model: models.AiT) -> optax.GradientTransformation:
  """optax.adamw with `weight_decay_mask(model)`, and the same optimizer state in every mode.

  optax's own `mask=` wraps the decay's state (optax.masked), which would make the checkpoints
  written before the mask existed unreadable; this decay keeps optax.EmptyState.
  """
  mask = weight_decay_mask(model) or (lambda params: jax.tree.map(lambda _: True, params))

  def decay(updates, state, params):  # optax.add_decayed_weights where the mask is True
    return jax.tree.map(lambda u, p, d: u + weight_decay * p if d else u, updates, params,
                        mask(params)), state

  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.GradientTransformation(lambda _: optax.EmptyState(), decay),
                     optax.scale_by_learning_rate(learning_rate))


def make_optimizer(s: Setup) -> optax.GradientTransformation:
  c = s.config
  tx = adamw(learning_rate_fn(s), b1=c.b1, b2=c.b2, eps=c.adam_eps,
             weight_decay=c.weight_decay, model=s.model)
  if c.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  return tx


def _dummy_inputs(s: Setup, batch: int):
  images = jnp.zeros((batch,) + s.image_shape, jnp.float32)
  question = jnp.zeros((batch, s.question_dim), jnp.float32) if s.question_dim else None
  return images, question


def init_state(s: Setup, tx, rng) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  images, question = _dummy_inputs(s, s.config.batch_size)
  variables = s.model.init({'params': params_rng, 'dropout': params_rng}, images, question,
                           train=True)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    memory=variables.get('memory', {}), rng=state_rng)


def state_shardings(mesh, abstract_state: TrainState):
  rep = sharding.replicated(mesh)
  return TrainState(step=rep, params=sharding.param_sharding(mesh, abstract_state.params),
                    opt_state=sharding.param_sharding(mesh, abstract_state.opt_state),
                    memory=jax.tree.map(lambda _: rep, abstract_state.memory), rng=rep)


def _model_inputs(s: Setup, batch, rng, train: bool):
  images = augment.preprocess(batch['image'], rng, dataset=s.config.dataset, train=train,
                              augment=s.config.augment)
  return images, batch.get('question')


def loss_and_grads(s: Setup, state: TrainState, batch):
  """CE + balance loss of one training batch, its gradients and the written memory."""
  rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, dropout_rng = jax.random.split(rng)
  images, question = _model_inputs(s, batch, aug_rng, train=True)
  labels = batch['label']

  def loss_fn(params):
    (logits, aux), new_vars = s.model.apply(
        {'params': params, 'memory': state.memory}, images, question, train=True,
        mutable=['memory'], rngs={'dropout': dropout_rng})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + aux['balance_loss'], (ce, aux['balance_loss'], logits,
                                      new_vars.get('memory', {}))

  (loss, (ce, balance, logits, memory)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  return loss, (ce, balance, logits, memory), grads


def train_step(s: Setup, tx, state: TrainState, batch):
  """One optimisation step; returns the new state and this step's metrics (device arrays)."""
  loss, (ce, balance, logits, memory), grads = loss_and_grads(s, state, batch)
  labels = batch['label']
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss, 'ce_loss': ce, 'balance_loss': balance,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'grad_norm': optax.tree.norm(grads),
      'learning_rate': learning_rate_fn(s)(state.step),
      # One reduction on device; the host reads it only at log and save steps (_non_finite).
      'state_finite': _all_finite((params, opt_state, memory)),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, memory=memory,
                       rng=state.rng), metrics


def train_steps(s: Setup, tx, state: TrainState, batches, data=None, batch_sharding=None):
  """Several optimisation steps in one call (`config.steps_per_call`): a lax.scan of train_step.

  `batches` is either a list of K batches (host data, stacked here) or, with `data` (the
  `device_data.DeviceData` arrays), [K, B] example indices gathered on device each step. Returns
  the state after the K steps and each step's metrics stacked along a leading axis of K.
  Per-step randomness stays fold_in(rng, step), so K steps here equal K calls of train_step.
  """
  if data is None:
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

  def body(state, xs):
    batch = device_data.gather(data, xs) if data is not None else xs
    if batch_sharding is not None:  # the gathered batch is split like a host batch
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return train_step(s, tx, state, batch)

  return jax.lax.scan(body, state, batches)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.float32(1)


def eval_step(s: Setup, params, memory, batch):
  """Sums of correct predictions and losses over the real (unmasked) examples of a batch."""
  images, question = _model_inputs(s, batch, None, train=False)
  variables = {'params': params, 'memory': memory}
  if s.config.model.eval_writes_memory and not s.config.model.vit:
    # The padding of the last batch stays out of the write (docs/model.md#batch-dependence).
    (logits, _), new_vars = s.model.apply(variables, images, question, train=False,
                                          mutable=['memory'], example_mask=batch['mask'])
    memory = new_vars['memory']
  else:
    logits, _ = s.model.apply(variables, images, question, train=False)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask
  n = s.info.num_classes
  sums = {
      'correct': correct.sum(), 'loss': ce.sum(), 'count': mask.sum(),
      'class_correct': jax.ops.segment_sum(correct, labels, n),
      'class_count': jax.ops.segment_sum(mask, labels, n),
  }
  if s.question_dim:
    kind = batch['qtype'] * 3 + batch['qsubtype']
    sums['type_correct'] = jax.ops.segment_sum(correct, kind, 9)
    sums['type_count'] = jax.ops.segment_sum(mask, kind, 9)
  return sums, memory, jnp.argmax(logits, -1).astype(jnp.int32)


def summarize_eval(s: Setup, sums) -> dict:
  """Turns eval sums into accuracies: overall, per class, per question type and subtype."""
  sums = jax.tree.map(np.asarray, jax.device_get(sums))
  count = max(float(sums['count']), 1.0)
  out = {'accuracy': float(sums['correct']) / count, 'loss': float(sums['loss']) / count,
         'num_examples': int(sums['count'])}
  with np.errstate(invalid='ignore', divide='ignore'):
    per_class = sums['class_correct'] / sums['class_count']
  out['per_class_accuracy'] = [None if np.isnan(a) else float(a) for a in per_class]
  if 'type_correct' in sums:
    for t, tname in enumerate(QUESTION_TYPES):
      c, n = sums['type_correct'][3 * t:3 * t + 3], sums['type_count'][3 * t:3 * t + 3]
      if n.sum() == 0:
        continue
      out[f'accuracy_{tname}'] = float(c.sum() / n.sum())
      for sub in range(3):
        if n[sub]:
          out[f'accuracy_{tname}_{sub}'] = float(c[sub] / n[sub])
  return out
