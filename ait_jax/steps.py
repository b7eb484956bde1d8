"""What one step computes, as pure functions of (Setup, state, batch): the schedule and optimizer,
the train state, the loss and its gradients, the train step and the eval step. They take arrays
and the dataset's registry entry (`Setup.info`), and know nothing else of the data layer: the
preprocessing comes in `Setup.preprocess` and the device feed's gather as an argument.
`validation.py` builds the Setup; `train.py` compiles these once (jax.jit, state donated) and
runs the loop around them.
"""
import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ait_jax import models
from ait_jax import sharding
from ait_jax.data.datasets import DatasetInfo


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  memory: Any
  rng: jax.Array  # raw uint32 key; per-step randomness is fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from a config, computed and checked before anything is compiled
  (`validation.validate` builds it): the dataset's registry entry, the model, the step counts and
  the on-device preprocessing (uint8 images, rng, train -> float32 model inputs)."""
  config: ml_collections.ConfigDict
  info: DatasetInfo
  model: models.AiT
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  train_eval_examples: int  # train-split examples scored at every evaluation
  preprocess: Callable[..., jax.Array]


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
  images = jnp.zeros((batch,) + s.info.input_shape, jnp.float32)
  question = (jnp.zeros((batch, s.info.question_dim), jnp.float32) if s.info.has_question else
              None)
  return images, question


def init_state(s: Setup, tx, rng, *, boxed: bool = False) -> TrainState:
  """The initial state; boxed=True keeps the parameters (and the optimizer state initialised
  from them) in their nn.LogicallyPartitioned boxes, which `state_shardings` reads."""
  params_rng, state_rng = jax.random.split(rng)
  images, question = _dummy_inputs(s, s.config.batch_size)
  variables = s.model.init({'params': params_rng, 'dropout': params_rng}, images, question,
                           train=True)
  params = variables['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     memory=variables.get('memory', {}), rng=state_rng)
  return state if boxed else nn.unbox(state)


def state_shardings(mesh, boxed_state: TrainState, rules: str) -> TrainState:
  """The state's shardings from the parameters' logical axes (`init_state(boxed=True)`, abstract)
  and the rule set `rules` (`config.sharding`, sharding.RULES); the memory is replicated."""
  rep = sharding.replicated(mesh)
  return TrainState(
      step=rep, params=sharding.logical_shardings(mesh, boxed_state.params, rules,
                                                  require_axes=True),
      opt_state=sharding.logical_shardings(mesh, boxed_state.opt_state, rules),
      memory=jax.tree.map(lambda _: rep, boxed_state.memory), rng=rep)


def _model_inputs(s: Setup, batch, rng, train: bool):
  return s.preprocess(batch['image'], rng, train=train), batch.get('question')


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


def train_steps(s: Setup, tx, state: TrainState, batches, data=None, *, gather=None,
                batch_sharding=None):
  """K optimisation steps in one call (`config.steps_per_call`; K = 1 too): a lax.scan of
  train_step, the one train path that the Trainer compiles.

  `batches` is either a list of K batches (host data, stacked here) or, with `data` (arrays that
  stay on the devices), [K, B] example indices that `gather(data, indices)` turns into each
  step's batch on device (the device feed's gather). Returns the state after the K steps and each
  step's metrics stacked along a leading axis of K. Per-step randomness stays
  fold_in(rng, step), so K steps here equal K calls of train_step.
  """
  if data is None:
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

  def body(state, xs):
    batch = gather(data, xs) if data is not None else xs
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
  if s.info.has_question:  # per (question type, subtype) of the registry
    per_type = s.info.question_subtypes
    kinds = len(s.info.question_types) * per_type
    kind = batch['qtype'] * per_type + batch['qsubtype']
    sums['type_correct'] = jax.ops.segment_sum(correct, kind, kinds)
    sums['type_count'] = jax.ops.segment_sum(mask, kind, kinds)
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
    per_type = s.info.question_subtypes
    for t, tname in enumerate(s.info.question_types):
      rows = slice(per_type * t, per_type * (t + 1))
      c, n = sums['type_correct'][rows], sums['type_count'][rows]
      if n.sum() == 0:
        continue
      out[f'accuracy_{tname}'] = float(c.sum() / n.sum())
      for sub in range(per_type):
        if n[sub]:
          out[f'accuracy_{tname}_{sub}'] = float(c[sub] / n[sub])
  return out
