"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

One jitted train step (forward, CE + balance loss, AdamW) with the state donated; the memory
collection is part of the state. The host only waits on the device at log, eval and save steps.
"""
import dataclasses
import functools
import json
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ait_jax import checkpointing
from ait_jax import metric_writer
from ait_jax import models
from ait_jax import sharding
from ait_jax.data import augment
from ait_jax.data import input_pipeline
from ait_jax.data import sort_of_clevr as clevr

QUESTION_TYPES = clevr.QUESTION_TYPES


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm of a logged step is NaN or infinite; the run stops."""


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


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config (each bad value raises one ValueError naming its field)."""
  info = input_pipeline.get_info(config.dataset)
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
    if int(config[field]) < 1:
      raise ValueError(f'{field}={config[field]} must be a positive integer.')
  for field in ('lr', 'warmup_init_lr', 'end_lr', 'weight_decay', 'grad_clip_norm',
                'warmup_epochs'):
    if not config[field] >= 0:
      raise ValueError(f'{field}={config[field]} must be non-negative.')
  if config.schedule_unit not in ('epoch', 'step'):
    raise ValueError(f"schedule_unit={config.schedule_unit!r} must be 'epoch' or 'step'.")
  question_types = tuple(config.question_types) or None
  if question_types:
    if not info.has_question:
      raise ValueError(f'question_types is only for sort_of_clevr, not {config.dataset!r}.')
    bad = [q for q in question_types if q not in QUESTION_TYPES]
    if bad:
      raise ValueError(f'question_types has {bad}; use some of {QUESTION_TYPES}.')
  info = input_pipeline.get_info(config.dataset, question_types)
  num_train = info.num_train
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size={config.batch_size} is larger than the {num_train} training '
                     'examples.')
  total_steps = (config.total_steps if config.total_steps > 0 else
                 int(round(config.num_epochs * steps_per_epoch)))
  if total_steps < 1:
    raise ValueError('num_epochs or total_steps must give at least one step.')
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  image_shape = jax.eval_shape(
      functools.partial(augment.preprocess, dataset=config.dataset, train=False),
      jax.ShapeDtypeStruct((1,) + tuple(info.image_shape), jnp.uint8),
      jax.random.key(0)).shape[1:]
  question_dim = 18 if info.has_question else 0
  model = models.create_model(config.model, num_classes=info.num_classes,
                              image_shape=image_shape, question_dim=question_dim,
                              batch_size=config.batch_size)
  return Setup(config, info, model, tuple(image_shape), question_dim, steps_per_epoch,
               total_steps, eval_every, num_train)


def learning_rate_fn(s: Setup):
  """Linear warm-up from warmup_init_lr, then cosine to end_lr (SPEC §2), per epoch or step."""
  c = s.config
  total_epochs = s.total_steps / s.steps_per_epoch

  def lr(step):
    epoch = step / s.steps_per_epoch
    if c.schedule_unit == 'epoch':
      epoch = jnp.floor(epoch)
    warm = c.warmup_init_lr + (c.lr - c.warmup_init_lr) * epoch / max(c.warmup_epochs, 1e-9)
    frac = jnp.clip((epoch - c.warmup_epochs) / max(total_epochs - c.warmup_epochs, 1e-9), 0, 1)
    cosine = c.end_lr + 0.5 * (c.lr - c.end_lr) * (1 + jnp.cos(jnp.pi * frac))
    return jnp.where(epoch < c.warmup_epochs, warm, cosine)

  return lr


def make_optimizer(s: Setup) -> optax.GradientTransformation:
  c = s.config
  adamw = optax.adamw(learning_rate_fn(s), b1=c.b1, b2=c.b2, eps=c.adam_eps,
                      weight_decay=c.weight_decay)
  if c.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adamw)
  return adamw


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
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, memory=memory,
                       rng=state.rng), metrics


def eval_step(s: Setup, params, memory, batch):
  """Sums of correct predictions and losses over the real (unmasked) examples of a batch."""
  images, question = _model_inputs(s, batch, None, train=False)
  variables = {'params': params, 'memory': memory}
  if s.config.model.eval_writes_memory and not s.config.model.vit:
    (logits, _), new_vars = s.model.apply(variables, images, question, train=False,
                                          mutable=['memory'])
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


def _under_mesh(mesh, fn, *bound):
  """`partial(fn, *bound)` traced with `mesh` as the context mesh, so that the workspace's
  'sharded' top-k finds the 'data' axis (jax.sharding.get_abstract_mesh)."""
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*bound, *args)

  traced.__name__ = fn.__name__  # names the jitted program (jit_train_step)
  return traced


class Trainer:
  """Holds the compiled steps, mesh and shardings of one run."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    self.s = setup(config)
    c = config
    self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.model, devices)
    sharding.check_batch_size(c.batch_size, self.mesh, 'batch_size')
    sharding.check_batch_size(c.eval_batch_size, self.mesh, 'eval_batch_size')
    self.tx = make_optimizer(self.s)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    rng = jax.random.PRNGKey(c.seed)
    self.abstract_state = jax.eval_shape(functools.partial(init_state, self.s, self.tx), rng)
    self.state_sharding = state_shardings(self.mesh, self.abstract_state)
    self.init = jax.jit(_under_mesh(self.mesh, init_state, self.s, self.tx),
                        out_shardings=self.state_sharding)
    self.train_step = jax.jit(_under_mesh(self.mesh, train_step, self.s, self.tx),
                              in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                              donate_argnums=(0,))
    self.eval_step = jax.jit(_under_mesh(self.mesh, eval_step, self.s),
                             in_shardings=(self.state_sharding.params, self.state_sharding.memory,
                                           self.batch_sharding),
                             out_shardings=(sharding.replicated(self.mesh),
                                            self.state_sharding.memory,
                                            sharding.replicated(self.mesh)))
    self.rng = rng

  def restore(self, workdir: str, which: str = 'best'):
    """(step, state) of the `which` ('best' or 'latest') checkpoint of workdir, with this
    trainer's shardings; 'best' falls back to the latest when no eval has been saved yet."""
    root = checkpointing.workdir_path(workdir)
    if not any((root / d).exists() for d in ('checkpoints', 'best')):  # and create nothing
      raise FileNotFoundError(f'No checkpoint in {workdir}; train first with the same --workdir.')
    ckpt = checkpointing.Checkpointer(workdir, keep=self.s.config.keep_checkpoints)
    restored = ckpt.restore(self.abstract_with_shardings(), which=which)
    if restored is None and which == 'best':
      restored = ckpt.restore(self.abstract_with_shardings(), which='latest')
    ckpt.close()
    if restored is None:
      raise FileNotFoundError(f'No checkpoint in {workdir}; train first with the same --workdir.')
    step, state, _ = restored
    return int(step), state

  def abstract_with_shardings(self):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        self.abstract_state, self.state_sharding)

  def train_iterator(self, data_state=None):
    c = self.s.config
    return input_pipeline.make_train_iterator(
        c.dataset, data_dir=c.data_dir, global_batch_size=c.batch_size, seed=c.seed,
        sharding=self.batch_sharding, question_types=tuple(c.question_types) or None,
        start_state=data_state, prefetch=c.prefetch, worker_count=c.worker_count)

  def evaluate(self, params, memory, split: str = 'test', predictions: list | None = None) -> dict:
    """Eval metrics over every example of `split`; appends the predicted classes of the real
    examples to `predictions` when given (a host transfer per batch, so only when asked)."""
    c = self.s.config
    batches = input_pipeline.make_eval_iterator(
        c.dataset, data_dir=c.data_dir, global_batch_size=c.eval_batch_size,
        sharding=self.batch_sharding, split=split,
        question_types=tuple(c.question_types) or None)
    total = None
    for batch in batches:
      batch = {k: v for k, v in batch.items() if k in _EVAL_KEYS}
      sums, memory, predicted = self.eval_step(params, memory, batch)
      if predictions is not None:
        mask = np.asarray(jax.device_get(batch['mask']))
        predictions.extend(np.asarray(jax.device_get(predicted))[mask].tolist())
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return summarize_eval(self.s, total)


_TRAIN_KEYS = ('image', 'label', 'question')
_EVAL_KEYS = ('image', 'label', 'question', 'mask', 'qtype', 'qsubtype')


def _save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    (checkpointing.workdir_path(workdir) / 'config.json').write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))


def _check_finite(metrics: dict, step: int) -> None:
  bad = [k for k in ('loss', 'grad_norm') if k in metrics and not math.isfinite(metrics[k])]
  if bad:
    raise NonFiniteLossError(
        f'Non-finite {" and ".join(bad)} at step {step}; stopping. The last good checkpoint is '
        'kept in the workdir: lower lr, set grad_clip_norm, or try dtype=float32.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir if it holds a checkpoint).

  Returns the last eval metrics and the last logged train loss ('train_loss').
  """
  checkpointing.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
  trainer = Trainer(config)
  s, c = trainer.s, config
  for split in (s.info.train_split, s.info.test_split):  # fail before compiling anything
    input_pipeline.ExampleSource(s.info, split, c.data_dir, tuple(c.question_types) or None)
  _save_config(config, workdir)
  writer = metric_writer.MetricWriter(workdir)
  ckpt = checkpointing.Checkpointer(workdir, keep=c.keep_checkpoints)
  restored = ckpt.restore(trainer.abstract_with_shardings())
  if restored is None:
    state, data_state = trainer.init(trainer.rng), None
    start = 0
  else:
    start, state, data_state = restored
    data_state = data_state or None
    writer.log_text(f'Resumed from step {start} in {workdir}.')
  writer.log_text(f'{"ViT" if c.model.vit else "AiT"}-{c.model.preset} (depth {s.model.depth}, '
                  f'width {s.model.width}) on {c.dataset}: {s.total_steps} steps, '
                  f'{s.steps_per_epoch} per epoch, batch {c.batch_size}, mesh '
                  f'{dict(trainer.mesh.shape)}, {jax.process_count()} process(es).')
  if start >= s.total_steps:
    writer.log_text(f'{workdir} already holds the final step {start}; nothing to train. Use '
                    '--mode=eval to evaluate it.')
  train_iter = trainer.train_iterator(data_state)
  preemption = checkpointing.PreemptionFlag()
  pending, last_eval, summary = [], None, {}
  progress = metric_writer.Progress(start, s.total_steps, c.batch_size)
  step = start
  try:
    while step < s.total_steps:
      batch = {k: v for k, v in next(train_iter).items() if k in _TRAIN_KEYS}
      state, metrics = trainer.train_step(state, batch)
      step += 1
      if step == start + 1:  # keep compilation out of the images/s and ETA figures
        jax.block_until_ready(metrics)
        progress.restart(step)
      pending.append(metrics)
      is_last = step == s.total_steps
      evaluated = step % s.eval_every == 0 or is_last
      stop = preemption.should_stop(step, ckpt)
      save = step % c.checkpoint_every_steps == 0 or is_last or stop or evaluated
      if step % c.log_every_steps == 0 or save:  # a state is checked finite before it is saved
        summary = metric_writer.mean_of(pending)  # the only host sync of ordinary steps
        pending = []
        _check_finite(summary, step)
        summary['epoch'] = step / s.steps_per_epoch
        summary.update(progress.update(step))
        writer.write(step, summary, prefix='train')
      if evaluated:
        last_eval = trainer.evaluate(state.params, state.memory)
        writer.write(step, _scalars(last_eval), prefix='eval')
      if save:
        ckpt.save(step, state, train_iter.get_state(),
                  best_metrics=_scalars(last_eval) if evaluated else None)
      if evaluated:
        progress.restart(step)  # images/s counts training steps only
      if stop:
        writer.log_text(f'SIGTERM: saved step {step} and stopped; rerun the same command to '
                        'resume.')
        break
  finally:
    preemption.restore_handler()
    ckpt.wait()
    ckpt.close()
    writer.close()
    close = getattr(train_iter, 'close', None)
    if close:
      close()
  if last_eval is not None and step == s.total_steps and jax.process_index() == 0:
    (checkpointing.workdir_path(workdir) / 'eval_final.json').write_text(
        json.dumps({'step': step, **last_eval}, indent=2))
  return {**(last_eval or {}), 'train_loss': summary.get('loss')}


def _scalars(d: dict) -> dict:
  return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, which: str = 'best',
             split: str = 'test') -> dict:
  """`--mode=eval`: restores the best (or latest) checkpoint and writes eval_<which>.json."""
  trainer = Trainer(config)
  step, state = trainer.restore(workdir, which)
  result = {'step': step, 'checkpoint': which, 'split': split,
            'eval_writes_memory': bool(config.model.eval_writes_memory),
            'eval_batch_size': config.eval_batch_size,
            **trainer.evaluate(state.params, state.memory, split)}
  if jax.process_index() == 0:
    (checkpointing.workdir_path(workdir) / f'eval_{which}.json').write_text(
        json.dumps(result, indent=2))
  return result
