"""Checks the AiT modules (docs/model.md#block): memory state, gradient flow, batch (in)dependence, sizes,
tracing, bfloat16, a short training run, config validation and the ablation switches.

Tiny models throughout (one block, width 64) so the file runs in well under a minute on 2 CPU cores.
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ait_jax import models

TINY = dict(preset='coordination', depth=1, width=64, mlp_dim=128, num_heads=1)
NUM_CLASSES = 5


def tiny_model(image=8, batch_size=None, **overrides):
  cfg = dict(TINY)
  cfg.update(overrides)
  return models.create_model(cfg, num_classes=NUM_CLASSES, image_shape=(image, image, 3),
                             batch_size=batch_size)


def random_images(seed, batch, image=8):
  # NumPy: eager jax.random would compile threefry for every new shape.
  return np.random.default_rng(seed).uniform(size=(batch, image, image, 3)).astype(np.float32)


def _key(seed):
  return jax.random.PRNGKey(seed) if isinstance(seed, int) else seed


def init(model, image=8, seed=0):
  return model.init(_key(seed), jnp.zeros((2, image, image, 3)), train=False)


@functools.lru_cache(maxsize=None)
def base_variables():
  """Initial variables of the tiny 8×8 model, shared by every test whose switches leave the
  parameter tree unchanged (scope, gradient_mode, eval_writes_memory, dtype, ...): initialising
  (threefry for every parameter) costs more to compile than the forward itself."""
  return jax.jit(lambda: init(tiny_model(bottleneck_k=16)))()


def train_apply(model, variables, images, seed=0):
  """One training forward: returns (logits, balance_loss, new memory collection)."""
  (logits, aux), new_vars = model.apply(variables, images, train=True, mutable=['memory'],
                                        rngs={'dropout': _key(seed)})
  return logits, aux['balance_loss'], new_vars.get('memory', {})


def losses(params, memory, model, images, labels, rng):
  """(CE, balance) of one training forward, with the memory passed in as an argument."""
  variables = {'params': params}
  if memory is not None:
    variables['memory'] = memory
  logits, balance, _ = train_apply(model, variables, images, rng)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ce, balance


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# NumPy, not jnp: an eager jnp op per leaf would compile a kernel per leaf shape.
def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def all_zero(tree):
  return all((x == 0).all() for x in _leaves(tree))


def all_nonzero(tree):
  """Every leaf (kernel, scale, bias) received some gradient."""
  return all((x != 0).any() for x in _leaves(tree))


def all_finite(tree):
  return all(np.isfinite(x).all() for x in _leaves(tree))


# ---------------------------------------------------------------- memory state and gradient flow

@functools.lru_cache(maxsize=None)
def _write_and_grads(gradient_mode, scope):
  """One jitted run of a tiny model: init, one memory write, then the gradients of CE and of the
  balance loss (separately, d[CE, balance]) w.r.t. the parameters and the memory passed in."""
  k = 16 if scope == 'batch' else 2  # 8 images × 4 tokens: 32 tokens in scope 'batch', 4 per image
  model = tiny_model(bottleneck_k=k, bottleneck_scope=scope, gradient_mode=gradient_mode)
  labels = np.arange(8) % NUM_CLASSES

  @jax.jit
  def run(variables, write_images, images):
    # Write once so that the memory is not at its initial value.
    _, _, memory = train_apply(model, variables, write_images)
    both = lambda p, m: jnp.stack(losses(p, m, model, images, labels, 5))
    jac_params, jac_memory = jax.jacrev(both, argnums=(0, 1))(variables['params'], memory)
    return variables['memory'], memory, both(variables['params'], memory), jac_params, jac_memory

  before, after, (ce, balance), jac_params, jac_memory = run(
      base_variables(), random_images(4, 8), random_images(3, 8))
  jac_params, jac_memory = jax.device_get((jac_params, jac_memory))
  split = lambda tree, i: jax.tree_util.tree_map(lambda g: g[i], tree)
  return dict(before=before, after=after, ce=float(ce), balance=float(balance),
              g_ce=split(jac_params, 0), g_balance=split(jac_params, 1),
              g_mem_ce=split(jac_memory, 0), g_mem_balance=split(jac_memory, 1))


@pytest.mark.parametrize('scope', ['batch', 'example'])
def test_memory_rows_have_unit_norm_after_write(scope):
  run = _write_and_grads('reference', scope)
  before = run['before']['block0']['workspace']['slots']
  after = run['after']['block0']['workspace']['slots']
  chex.assert_shape(before, (32, 32))
  chex.assert_shape(after, (32, 32))
  assert not np.allclose(after, before)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(after, np.float64), axis=-1), 1.0,
                             rtol=0, atol=1e-5)


WRITE = ('value', 'out', 'write_norm')
SCORE = ('query', 'key')


@pytest.mark.parametrize('gradient_mode,scope', [
    ('reference', 'batch'), ('reference', 'example'), ('learned_write', 'batch')])
def test_no_gradient_reaches_the_memory(gradient_mode, scope):
  run = _write_and_grads(gradient_mode, scope)
  assert count(run['g_mem_ce']) == 32 * 32
  assert all_zero(run['g_mem_ce'])
  assert all_zero(run['g_mem_balance'])


@pytest.mark.parametrize('scope', ['batch', 'example'])
def test_reference_mode_gradient_flow(scope):
  """docs/model.md#gradient-flow: Wv, Wo and the write LayerNorm get no gradient at all; Wq, Wk only the balance loss.

  (balance_coef=0 is checked in test_ablation_builds_runs_and_differentiates.)
  """
  run = _write_and_grads('reference', scope)
  assert run['balance'] > 0
  ws_ce = run['g_ce']['block0']['workspace']
  ws_balance = run['g_balance']['block0']['workspace']
  for name in WRITE:
    assert all_zero(ws_ce[name]), name
    assert all_zero(ws_balance[name]), name
  for name in SCORE:
    assert all_zero(ws_ce[name]), name  # not from the classification loss
    assert all_nonzero(ws_balance[name]), name  # from the balance loss
  # The classification loss reaches the memory branch through the prior projection.
  assert all_nonzero(ws_ce['prior_proj'])


def test_learned_write_mode_trains_the_write_from_the_classification_loss():
  run = _write_and_grads('learned_write', 'batch')
  ws = run['g_ce']['block0']['workspace']
  for name in WRITE + SCORE + ('prior_proj',):
    assert all_nonzero(ws[name]), name


# ---------------------------------------------------------------- batch (in)dependence (docs/model.md#batch-dependence)

@pytest.mark.parametrize('scope,k', [('batch', 8), ('example', 2)])
@pytest.mark.parametrize('eval_writes_memory', [False, True])
def test_batch_dependence_of_evaluation(scope, k, eval_writes_memory):
  image = 8  # 4 tokens per image
  model = tiny_model(image=image, bottleneck_k=k, bottleneck_scope=scope,
                     eval_writes_memory=eval_writes_memory)
  mutable = ['memory'] if eval_writes_memory else False

  @jax.jit
  def run(variables, write_batches, batch, others):
    for step in range(2):  # write the memory twice so that it is not its symmetric N(0, 1) init
      _, _, memory = train_apply(model, variables, write_batches[step], step)
      variables = {**variables, 'memory': memory}
    evaluate = lambda x: model.apply(variables, x, train=False, mutable=mutable)
    logits = lambda out: (out[0] if eval_writes_memory else out)[0]
    # The image alone, first among 31 others, and last after 31 different ones.
    return (logits(evaluate(batch[:1])), logits(evaluate(batch)),
            logits(evaluate(jnp.concatenate([others, batch[:1]]))))

  write_batches = np.stack([random_images(10 + step, 32, image) for step in range(2)])
  alone, among, after_others = run(base_variables(), write_batches, random_images(20, 32, image),
                                   random_images(21, 31, image))
  chex.assert_shape(among, (32, NUM_CLASSES))
  diff = float(np.max(np.abs(np.asarray(among[0]) - np.asarray(alone[0]))))
  if eval_writes_memory:  # the reference protocol: a prediction depends on the rest of its batch
    assert diff > 1e-3, diff
  else:  # the default: read-only memory, predictions independent of the batch
    chex.assert_trees_all_close(alone[0], among[0], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(after_others[-1], among[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sizes (docs/model.md#sizes)

@pytest.mark.parametrize('preset,expected', [
    ('small', 15_673_322), ('medium', 45_761_770), ('base', 90_894_442)])
def test_parameter_counts_on_cifar10(preset, expected):
  model = models.create_model(preset, num_classes=10, image_shape=(32, 32, 3))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False))
  print(f'{preset}: {count(shapes["params"]):,} params')
  assert count(shapes['params']) == expected
  depth = models.PRESETS[preset]['depth']
  memory = shapes['memory']
  assert set(memory) == {f'block{i}' for i in range(depth)}
  for i in range(depth):
    assert count(memory[f'block{i}']) == 1_024
    chex.assert_shape(memory[f'block{i}']['workspace']['slots'], (32, 32))


# ---------------------------------------------------------------- tracing and bfloat16

def test_jitted_forward_traces_once():
  model = tiny_model(bottleneck_k=16)
  variables = base_variables()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(variables, images):
    return model.apply(variables, images, train=False)[0]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_forward(variables, images, rng):
    return train_apply(model, variables, images, rng)

  for seed in range(3):
    chex.assert_shape(forward(variables, random_images(seed, 8)), (8, NUM_CLASSES))
    _, _, memory = train_forward(variables, random_images(seed, 8), jax.random.PRNGKey(seed))
    variables = {**variables, 'memory': memory}


BF16_REL_L2_BOUND = 5e-2


def test_bfloat16_logits_close_to_float32():
  image = 8
  f32 = tiny_model(image=image, bottleneck_k=16)
  bf16 = tiny_model(image=image, bottleneck_k=16, dtype='bfloat16', param_dtype='float32')

  @jax.jit
  def run(variables, write_images, images):
    _, _, memory = train_apply(f32, variables, write_images)
    variables = {**variables, 'memory': memory}
    ref = f32.apply(variables, images, train=False)[0]
    got = bf16.apply(variables, images, train=False)[0]
    # The bf16 training forward (bottleneck write included) runs and writes a unit-norm memory.
    return ref, got, train_apply(bf16, variables, images)

  ref, got, (logits, balance, new_memory) = run(base_variables(), random_images(1, 16, image),
                                                random_images(2, 32, image))
  assert got.dtype == jnp.float32  # logits come back in float32
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
  print(f'bfloat16 vs float32 logits: relative L2 error {rel:.3e} (bound {BF16_REL_L2_BOUND})')
  assert rel < BF16_REL_L2_BOUND
  assert all_finite((logits, balance, new_memory))
  slots = np.asarray(new_memory['block0']['workspace']['slots'], np.float64)
  np.testing.assert_allclose(np.linalg.norm(slots, axis=-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- a short training run

def test_training_lowers_the_loss():
  """Tiny task: is the bright 2×2 spot of an 8×8 image in its left half?

  (A plain brightness offset per half would be invisible: the patch embedding starts with a
  LayerNorm over each 4×4 patch, docs/model.md#backbone, which removes a patch's mean and scale.)
  """
  model = tiny_model(bottleneck_k=16)  # 5 outputs, labels in {0, 1}
  variables = base_variables()
  tx = optax.adamw(1e-3, weight_decay=0.01)
  opt_state = tx.init(variables['params'])

  def batch(rng, n=32):
    r1, r2, r3, r4 = jax.random.split(rng, 4)
    labels = jax.random.bernoulli(r1, 0.5, (n,)).astype(jnp.int32)
    row = jax.random.randint(r2, (n,), 0, 7)
    col = jax.random.randint(r3, (n,), 0, 3) + 4 * (1 - labels)  # label 1: columns 0..3
    rows, cols = jnp.arange(8)[None, :, None], jnp.arange(8)[None, None, :]
    spot = ((rows >= row[:, None, None]) & (rows < row[:, None, None] + 2)
            & (cols >= col[:, None, None]) & (cols < col[:, None, None] + 2))
    images = 0.3 * jax.random.uniform(r4, (n, 8, 8, 3))
    return jnp.where(spot[..., None], 1.0, images), labels

  @jax.jit
  def step(params, memory, opt_state, rng):
    images, labels = batch(jax.random.fold_in(rng, 0))

    def loss_fn(p):
      (logits, aux), new = model.apply({'params': p, 'memory': memory}, images, train=True,
                                       mutable=['memory'],
                                       rngs={'dropout': jax.random.fold_in(rng, 1)})
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return ce + aux['balance_loss'], (ce, new['memory'])

    grads, (ce, memory) = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), memory, opt_state, ce

  @jax.jit
  def eval_loss(params, memory):
    images, labels = batch(jax.random.PRNGKey(999), 256)
    logits, _ = model.apply({'params': params, 'memory': memory}, images, train=False)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
            jnp.mean(jnp.argmax(logits, -1) == labels))

  params, memory = variables['params'], variables['memory']
  before, _ = eval_loss(params, memory)
  rng = jax.random.PRNGKey(0)
  for i in range(30):
    params, memory, opt_state, ce = step(params, memory, opt_state, jax.random.fold_in(rng, i))
    assert np.isfinite(ce)
  after, accuracy = eval_loss(params, memory)
  print(f'held-out loss {float(before):.3f} -> {float(after):.3f}, accuracy {float(accuracy):.2f}')
  assert after < 0.5 * before
  assert accuracy > 0.7  # chance is 0.5


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize('overrides,kwargs,field', [
    (dict(bottleneck_k=5, bottleneck_scope='example'), {}, 'model.bottleneck_k'),  # 4 tokens per image
    (dict(bottleneck_k=9, bottleneck_scope='batch'), dict(batch_size=2), 'model.bottleneck_k'),  # 8 in scope
    (dict(bottleneck_k=0), {}, 'model.bottleneck_k'),
    (dict(patch_size=3), {}, 'model.patch_size'),
    (dict(patch_size=0), {}, 'model.patch_size'),
    (dict(preset='huge'), {}, 'model.preset'),
    (dict(bottleneck_scope='global'), {}, 'model.bottleneck_scope'),
    (dict(gradient_mode='sound'), {}, 'model.gradient_mode'),
    (dict(retrieval='attention'), {}, 'model.retrieval'),
    (dict(dtype='float16'), {}, 'model.dtype'),
    (dict(num_heads=3), {}, 'model.width'),
    (dict(hopfield_steps=0), {}, 'model.hopfield_steps'),
    (dict(memory_momentum=1.0), {}, 'model.memory_momentum'),
    (dict(bottleneck_kk=3), {}, 'bottleneck_kk'),
])
def test_invalid_config_raises_value_error_naming_the_field(overrides, kwargs, field):
  cfg = dict(TINY)
  cfg.update(overrides)
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    models.create_model(cfg, num_classes=2, image_shape=(8, 8, 3), **kwargs)


def test_training_batch_too_small_for_bottleneck_k_raises():
  """Built without batch_size, scope 'batch' can only be checked when a training batch arrives."""
  model = tiny_model(bottleneck_k=16)  # 16 > 2 images × 4 tokens
  with pytest.raises(ValueError, match='bottleneck_k'):
    jax.eval_shape(lambda v, x: train_apply(model, v, x), base_variables(), random_images(0, 2))


def test_valid_bottleneck_k_bounds_are_accepted():
  for scope, k, batch in (('example', 4, None), ('batch', 8, 2), ('batch', 512, None)):
    models.create_model(dict(TINY, bottleneck_k=k, bottleneck_scope=scope), num_classes=2,
                        image_shape=(8, 8, 3), batch_size=batch)
  # bottleneck=False makes bottleneck_k irrelevant.
  models.create_model(dict(TINY, bottleneck=False, bottleneck_k=10_000, bottleneck_scope='example'),
                      num_classes=2, image_shape=(8, 8, 3))


def test_default_config_is_the_faithful_setting():
  cfg = models.default_config()
  assert cfg.preset == 'small' and cfg.bottleneck_scope == 'batch' and cfg.gradient_mode == 'reference'
  assert cfg.bottleneck_k == 512 and cfg.memory_slots == 32 and cfg.memory_dim == 32
  assert cfg.memory_heads == 8 and cfg.balance_coef == 0.01 and not cfg.eval_writes_memory
  # A ConfigDict is accepted as is.
  cfg.update(TINY)
  cfg.bottleneck_k = 16
  model = models.create_model(cfg, num_classes=2, image_shape=(8, 8, 3))
  assert model.depth == 1 and model.width == 64


# ---------------------------------------------------------------- ablation switches (docs/model.md#ablations)

ABLATIONS = {  # the full model is exercised by the gradient-flow tests above
    'without_bottleneck': dict(bottleneck=False),
    'without_self_attention': dict(self_attention=False),
    'without_hopfield': dict(retrieval='cross_attention'),
    'without_balance_loss': dict(balance_coef=0.0),
    'memory_reset': dict(memory_reset=True),
    'vit': dict(vit=True),
}


@functools.lru_cache(maxsize=None)
def _param_count(name):
  model = tiny_model(bottleneck_k=16, **ABLATIONS[name])
  return count(jax.eval_shape(lambda: init(model))['params'])


@functools.lru_cache(maxsize=None)
def _full_param_count():
  return count(jax.eval_shape(lambda: init(tiny_model(bottleneck_k=16)))['params'])


@pytest.mark.parametrize('name', sorted(ABLATIONS))
def test_ablation_builds_runs_and_differentiates(name):
  cfg = models.default_config()
  cfg.update(TINY)
  cfg.bottleneck_k = 16
  cfg.update(ABLATIONS[name])
  model = models.create_model(cfg, num_classes=NUM_CLASSES, image_shape=(8, 8, 3))
  images, labels = random_images(7, 8), jnp.arange(8) % NUM_CLASSES

  same_params = name in ('without_bottleneck', 'without_balance_loss', 'memory_reset')

  @jax.jit
  def run(images):
    variables = base_variables() if same_params else init(model)
    eval_logits, _ = model.apply(variables, images, train=False)
    train_out = train_apply(model, variables, images)
    total = lambda p: sum(losses(p, variables.get('memory'), model, images, labels, 0))
    return variables, eval_logits, train_out, jax.value_and_grad(total)(variables['params'])

  variables, eval_logits, (logits, balance, new_memory), (loss, grads) = run(images)
  memory = variables.get('memory')
  chex.assert_shape(eval_logits, (8, NUM_CLASSES))
  assert all_finite((eval_logits, logits, balance, new_memory))
  assert np.isfinite(loss) and all_finite(grads)
  assert not all_zero(grads)

  if name == 'vit':
    assert 'memory' not in variables and not new_memory
    assert float(balance) == 0.0
    assert _param_count('vit') < _full_param_count()
  else:
    chex.assert_shape(memory['block0']['workspace']['slots'], (32, 32))
  if name == 'memory_reset':  # every batch writes from the initial memory: the state stays put
    chex.assert_trees_all_close(new_memory, memory, rtol=0, atol=0)
  elif name != 'vit':
    assert not np.allclose(new_memory['block0']['workspace']['slots'],
                           memory['block0']['workspace']['slots'])
  if name == 'without_balance_loss':  # reference mode: nothing trains Wq, Wk, Wv, Wo, write LN
    assert float(balance) == 0.0
    ws = grads['block0']['workspace']
    for part in WRITE + SCORE:
      assert all_zero(ws[part]), part
    assert all_nonzero(ws['prior_proj'])
  elif name not in ('vit', 'without_bottleneck'):
    assert float(balance) > 0.0
  if name == 'without_bottleneck':  # dense gates: every token is in every slot's "top-k"
    # So cv²(load) is 0 and the loss is 0.01 · Σ_heads cv²(importance) of the softmax gates.
    _, inter = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                mutable=['memory', 'intermediates'],
                                                rngs={'dropout': _key(0)}))(variables, images)
    gates = np.asarray(inter['intermediates']['block0']['workspace']['bottleneck_weights'][0],
                       np.float64)  # [G, Hm, M, n]
    importance = np.moveaxis(gates.sum(axis=2), 0, 1).reshape(gates.shape[1], -1)
    cv2 = importance.var(axis=1, ddof=1) / (importance.mean(axis=1) ** 2 + 1e-10)
    assert float(balance) > 0
    np.testing.assert_allclose(float(balance), 0.01 * cv2.sum(), rtol=1e-4)
  if name == 'without_hopfield':
    assert 'cross_attention' in variables['params']['block0']['workspace']
  if name == 'without_self_attention':
    assert 'attn' not in variables['params']['block0']
    assert _param_count(name) < _full_param_count()


def test_writing_without_mutable_memory_says_what_to_do():
  model = models.create_model('coordination', num_classes=2, image_shape=(8, 8, 3), patch_size=4,
                              depth=1, width=64, mlp_dim=128, num_heads=1, bottleneck_k=4,
                              eval_writes_memory=True)
  x = jnp.ones((2, 8, 8, 3))
  # The error is raised while tracing: shapes are enough, nothing needs compiling.
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  with pytest.raises(ValueError, match=r"pass mutable=\['memory'\]"):
    jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
