"""ait_jax with weights ported from the published PyTorch AiT reproduces its numbers.

The fixtures in tests/data/ hold a tiny reference model's state_dict, its inputs and what the
reference computed (docs/reference_port.md): the evaluation protocol over three batches (memory
written by every batch), one training forward/backward with every gradient, and the logits after
one AdamW step. Gradients go through the same mapping as the weights, so a mapping mistake that the
initial LayerNorm weights (ones and zeros) would hide still shows. Perturbing the mapping (one
tensor transposed, permuted or swapped, or the head interleaving left in place) must break the
equivalence: that shows the comparison can fail.
"""
import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np
import optax
import pytest

from ait_jax import convert
from ait_jax import models
from ait_jax import steps
from ait_jax import validation
from conftest import limit

DATA = pathlib.Path(__file__).resolve().parent / 'data'
FIXTURES = ('cifar_tiny', 'clevr_tiny')
RTOL = 1e-5
# Elements that are ~0 by cancellation carry float32 rounding of the size of the tensor's largest
# terms, which no rtol covers: allow 2e-6 of the tensor's largest magnitude (measured need: <8e-7).
ATOL_OF_SCALE = 2e-6
# The fixture's config fields that are model fields of the same name.
MODEL_FIELDS = ('depth', 'width', 'mlp_dim', 'num_heads', 'patch_size', 'memory_slots',
                'memory_dim', 'memory_heads', 'bottleneck_k', 'hopfield_beta', 'memory_momentum',
                'balance_coef')


@dataclasses.dataclass(frozen=True)
class Port:
  """One fixture, its model and the compiled functions that reproduce the reference's runs."""
  data: Any
  model: Any
  target: Any
  eval_fn: Any
  train_fn: Any

  @property
  def state_dict(self):
    return {k[len('state_dict/'):]: self.data[k] for k in self.data if k.startswith('state_dict/')}

  @property
  def grads(self):
    return {k[len('train/grad/'):]: self.data[k] for k in self.data if k.startswith('train/grad/')}

  def question(self, t):
    return self.data.get(f'inputs/questions{t}')


@functools.lru_cache(maxsize=None)
def port(name: str) -> Port:
  with np.load(DATA / f'{name}.npz') as f:
    data = {k: f[k] for k in f.files}
  cfg = json.loads(str(data['config_json']))
  model_cfg = models.default_config()
  model_cfg.update({k: cfg[k] for k in MODEL_FIELDS})
  # The reference protocol: evaluation writes the memory; training with every dropout at 0.
  model_cfg.update(eval_writes_memory=True, write_dropout=0.0)
  image_shape = (cfg['image_size'], cfg['image_size'], 3)
  model = models.create_model(model_cfg, num_classes=cfg['num_classes'], image_shape=image_shape,
                              question_dim=cfg['question_dim'], batch_size=cfg['batch_size'])
  target = convert.abstract_variables(model, image_shape, cfg['question_dim'], cfg['batch_size'])
  labels = data['inputs/labels']

  @jax.jit
  def eval_fn(params, memory, images, question):
    (logits, aux), new = model.apply({'params': params, 'memory': memory}, images, question,
                                     train=False, mutable=['memory'])
    return logits, aux['balance_loss'], new['memory']

  @jax.jit
  def train_fn(params, memory, images, question):
    def loss_fn(p):
      (logits, aux), new = model.apply({'params': p, 'memory': memory}, images, question,
                                       train=True, mutable=['memory'],
                                       rngs={'dropout': jax.random.key(0)})
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return ce + aux['balance_loss'], dict(ce_loss=ce, balance_loss=aux['balance_loss'],
                                            logits=logits, memory=new['memory'])
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return dict(out, loss=loss), grads

  return Port(data, model, target, eval_fn, train_fn)


def close(ours, ref) -> bool:
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  if ours.shape != ref.shape:
    return False
  atol = ATOL_OF_SCALE * float(np.max(np.abs(ref), initial=0.0))
  return bool(np.allclose(ours, ref, rtol=RTOL, atol=atol))


def layers(memory) -> list:
  return [memory[k]['workspace']['slots'] for k in sorted(memory, key=lambda b: int(b[5:]))]


def eval_mismatches(p: Port, variables) -> list[str]:
  """The reference's evaluation protocol: three batches in order, each writing the memory."""
  bad, memory = [], variables['memory']
  with jax.default_matmul_precision('highest'):
    for t in range(3):
      logits, balance, memory = p.eval_fn(variables['params'], memory, p.data[f'inputs/images{t}'],
                                          p.question(t))
      bad += [f'eval/logits{t}'] * (not close(logits, p.data[f'eval/logits{t}']))
      bad += [f'eval/balance_loss{t}'] * (not close(balance, p.data[f'eval/balance_loss{t}']))
      for i, m in enumerate(layers(memory)):
        key = f'eval/memory{t}/layer{i}'
        bad += [key] * (not close(m, p.data[key]))
  return bad


def train_step(p: Port, variables, batch: int = 0):
  with jax.default_matmul_precision('highest'):
    return p.train_fn(variables['params'], variables['memory'], p.data[f'inputs/images{batch}'],
                      p.question(batch))


def train_mismatches(p: Port, variables, mapping=None) -> list[str]:
  """Training forward/backward on batch 0: losses, logits, memory and every gradient."""
  out, grads = train_step(p, variables)
  bad = [f'train/{k}' for k in ('loss', 'ce_loss', 'balance_loss', 'logits')
         if not close(out[k], p.data[f'train/{k}'])]
  bad += [f'train/memory/layer{i}' for i, m in enumerate(layers(out['memory']))
          if not close(m, p.data[f'train/memory/layer{i}'])]
  ref = _mapped_grads(p, mapping)
  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                       jax.tree_util.tree_leaves_with_path(tree)}
  ours, theirs = flat(grads), flat(ref)
  return bad + [f'grad{k}' for k in theirs if not close(ours[k], theirs[k])]


def _mapped_grads(p: Port, mapping=None):
  return convert.convert(p.grads, p.model, {'params': p.target['params']}, mapping)['params']


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def ported(p: Port, mapping=None):
  return convert.convert(p.state_dict, p.model, p.target, mapping)


@pytest.mark.parametrize('name', FIXTURES)
def test_evaluation_protocol_matches(name):
  p = port(name)
  assert eval_mismatches(p, ported(p)) == []


@pytest.mark.parametrize('name', FIXTURES)
def test_training_step_matches_every_gradient(name):
  p = port(name)
  assert train_mismatches(p, ported(p)) == []
  # The tensors the reference creates but never uses get no gradient there either.
  for unused in convert.UNUSED:
    assert not np.any(p.grads[unused]), unused


@pytest.mark.parametrize('name', FIXTURES)
def test_gradients_that_the_reference_leaves_at_zero_are_zero(name):
  # Wv, Wo and the write's LayerNorm act only through the stop-gradient EMA (docs/model.md).
  p = port(name)
  _, grads = train_step(p, ported(p))
  for i in range(p.model.depth):
    ws = grads[f'block{i}']['workspace']
    for leaf in jax.tree.leaves([ws['value'], ws['out'], ws['write_norm']]):
      assert not np.any(np.asarray(leaf))
    assert np.any(np.asarray(ws['query']['kernel'])) and np.any(np.asarray(ws['key']['kernel']))


@pytest.mark.parametrize('name', FIXTURES)
def test_logits_after_one_adamw_step_match(name):
  # The project's AdamW, whose decay skips what the reference's torch AdamW skips.
  p = port(name)
  variables = ported(p)
  out, grads = train_step(p, variables)
  tx = steps.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, model=p.model)
  params = jax.jit(lambda prm, g: optax.apply_updates(prm, tx.update(g, tx.init(prm), prm)[0]))(
      variables['params'], grads)
  next_logits = lambda prm: train_step(p, {'params': prm, 'memory': out['memory']}, batch=1)[0][
      'logits']
  assert close(next_logits(params), p.data['adamw/next_logits'])
  # ... and the step moved them: the comparison is not against the logits before the step.
  assert not close(next_logits(variables['params']), p.data['adamw/next_logits'])


@pytest.mark.parametrize('name', FIXTURES)
def test_published_query_gradient_differs_from_the_true_one(name):
  # The published code differentiates Wq against the in-place-updated memory
  # (docs/reference_port.md); we compute the true gradient, which the fixture's train/grad holds.
  p = port(name)
  _, grads = train_step(p, ported(p))
  for i in range(p.model.depth):
    ours = np.asarray(grads[f'block{i}']['workspace']['query']['kernel'])
    published = p.data[f'train/grad_as_published/transformer.layers.{i}.1.fn.memoryupdate.mha.'
                       'w_qs.weight'].T
    rel = np.linalg.norm(ours - published) / np.linalg.norm(ours)
    assert 0.03 < rel < 0.5, rel


# --- Weight decay as the published code has it (docs/training.md#recipe). ---------------------

def _quick_setup(**model) -> steps.Setup:
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config('triangle', 'quick')
  config.model.update(model)
  return validation.validate(config)


def _leaves(tree, keep) -> set[str]:
  return {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(tree) if keep(v)}


WRITE_ONLY_LEAVES = {f"['block0']['workspace']['{m}']['{p}']" for m, p in (
    ('value', 'kernel'), ('out', 'kernel'), ('write_norm', 'scale'), ('write_norm', 'bias'))}


@pytest.mark.parametrize('model,undecayed', [
    ({}, WRITE_ONLY_LEAVES),
    ({'bottleneck': False}, WRITE_ONLY_LEAVES),
    ({'retrieval': 'cross_attention'}, WRITE_ONLY_LEAVES),  # its own 'query' and 'out' decay
    ({'memory_reset': True}, WRITE_ONLY_LEAVES),
    ({'vit': True}, set()),
    ({'gradient_mode': 'learned_write'}, set())],
    ids=['reference', 'no_bottleneck', 'no_hopfield', 'memory_reset', 'vit', 'learned_write'])
def test_weight_decay_skips_the_parameters_that_get_no_gradient(model, undecayed):
  # torch's AdamW skips a parameter whose gradient is None: in gradient_mode 'reference' these are
  # the workspace's value and output projections and write LayerNorm (the test above shows their
  # gradient is zero). With learned_write they learn; the ViT has no workspace.
  s = _quick_setup(**model)
  params = jax.eval_shape(functools.partial(steps.init_state, s, steps.make_optimizer(s)),
                          jax.random.PRNGKey(0)).params
  mask = steps.weight_decay_mask(s.model)
  decays = mask(params) if mask else jax.tree.map(lambda _: True, params)
  assert _leaves(decays, lambda d: not d) == undecayed
  assert _leaves(params, lambda _: True) >= undecayed
  # The optimizer state is laid out as optax.adamw's, so checkpoints of every mode restore.
  state = jax.eval_shape(steps.make_optimizer(s).init, params)
  schedule = optax.adamw(steps.learning_rate_fn(s))
  assert jax.tree.structure(state) == jax.tree.structure(jax.eval_shape(schedule.init, params))


@pytest.mark.parametrize('mode', ['reference', 'learned_write'])
def test_several_adamw_steps_leave_the_write_parameters_exactly_at_init(mode):
  # The project's optimizer and train step: in reference mode the write's parameters get neither
  # a gradient nor decay, so they keep their initial values bit for bit; every other parameter
  # moves. With learned_write they move too.
  from ait_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config('triangle', 'quick')
  config.model.gradient_mode = mode
  config.mesh.data = 1
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  s = trainer.s
  assert s.config.weight_decay > 0
  state = trainer.init(trainer.rng)
  start = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {'image': rng.integers(0, 256, (s.config.batch_size,) + s.info.image_shape, np.uint8),
             'label': rng.integers(0, s.info.num_classes, (s.config.batch_size,), np.int32)}
    state, _ = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), start)
  assert _leaves(moved, lambda m: not m) == (WRITE_ONLY_LEAVES if mode == 'reference' else set())


# --- The equivalence check can fail: perturb the mapping one tensor at a time. ----------------

def _reversed(transform):
  return lambda a: transform(a)[..., ::-1]


def _perturbations():
  """Mappings wrong in exactly one place (one tensor, or one pair swapped), on the clevr rules
  (a superset of the cifar ones)."""
  base = convert.rules(depth=2, memory_heads=8, question=True)

  def replaced(i, **change):
    mapping = list(base)
    mapping[i] = mapping[i]._replace(**change)
    return mapping

  out = []
  for i, rule in enumerate(base):
    out.append((f'reverse:{rule.source}', replaced(i, transform=_reversed(rule.transform))))
    if rule.transform is convert.linear:
      out.append((f'no_transpose:{rule.source}', replaced(i, transform=convert.copy)))
    if rule.source.endswith('mha.fc.weight'):
      out.append((f'no_deinterleave:{rule.source}', replaced(i, transform=convert.linear)))
  index = {r.source: i for i, r in enumerate(base)}
  layer = 'transformer.layers.'
  swaps = [(f'{layer}0.1.fn.memoryupdate.mha.w_ks.weight',
            f'{layer}0.1.fn.memoryupdate.mha.w_vs.weight'),
           (f'{layer}0.0.norm.weight', f'{layer}0.1.norm.weight'),
           (f'{layer}0.1.fn.norm.bias', f'{layer}0.1.norm.bias'),
           (f'{layer}1.1.fn.norm.weight', f'{layer}1.1.fn.norm.bias'),
           (f'{layer}0.1.fn.fc1.weight', f'{layer}1.1.fn.fc1.weight'),
           (f'{layer}0.1.fn.memoryupdate.memory', f'{layer}1.1.fn.memoryupdate.memory')]
  for a, b in swaps:
    mapping = list(base)
    mapping[index[a]] = base[index[a]]._replace(source=b)
    mapping[index[b]] = base[index[b]]._replace(source=a)
    out.append((f'swap:{a}<>{b}', mapping))
  return [pytest.param(mapping, id=pid) for pid, mapping in out]


@pytest.mark.parametrize('mapping', _perturbations())
def test_a_wrong_mapping_breaks_the_equivalence(mapping, request):
  p = port('clevr_tiny')
  try:
    variables = ported(p, mapping)
  except ValueError as e:  # a non-square kernel left untransposed: the shape check names it
    assert request.node.callspec.id.split(':', 1)[1] in str(e)
    return
  if _same(variables, ported(p)) and _same(_mapped_grads(p, mapping), _mapped_grads(p)):
    # The write's LayerNorm stays at its init (ones, zeros) and gets no gradient, so reversing
    # or swapping its vectors changes no number: nothing to detect.
    pytest.skip('this change leaves every ported weight and gradient as it was')
  assert eval_mismatches(p, variables) or train_mismatches(p, variables, mapping)


# --- Errors and the command. ------------------------------------------------------------------

def test_a_shape_mismatch_names_the_tensor():
  p = port('cifar_tiny')
  state_dict = dict(p.state_dict)
  name = 'transformer.layers.1.1.fn.fc2.weight'
  state_dict[name] = state_dict[name][:, :64]
  with pytest.raises(ValueError, match=f'{name} has shape \\(128, 64\\) but the config needs'):
    ported_from(p, state_dict)


def test_missing_and_unexpected_tensors_are_named():
  p = port('cifar_tiny')
  state_dict = dict(p.state_dict)
  del state_dict['mlp_head.1.bias']
  with pytest.raises(ValueError, match="no tensor 'mlp_head.1.bias'"):
    ported_from(p, state_dict)
  with pytest.raises(ValueError, match='does not use.*question_to_embedding'):
    ported_from(p, dict(p.state_dict, **{'question_to_embedding.0.weight': np.ones(18)}))
  with pytest.raises(ValueError, match='memory_momentum'):
    ported_from(p, dict(p.state_dict, **{
        'transformer.layers.0.1.fn.memoryupdate.beta': np.float32(0.5)}))


def ported_from(p: Port, state_dict):
  return convert.convert(state_dict, p.model, p.target)


def test_reading_a_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
  path = tmp_path / 'model.pth'
  path.write_bytes(b'')
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)  # import torch -> ImportError
  with pytest.raises(ValueError, match=r'pip install -c constraints.txt -e \.\[convert\]'):
    convert.load_state_dict(str(path))


def _synthetic_state_dict(model, target):
  """Random tensors under the reference's names and layouts for `model` (as a trained one)."""
  rng = np.random.default_rng(0)
  leaves = {c: {tuple(k.key for k in path): leaf for path, leaf in
                jax.tree_util.tree_leaves_with_path(target[c])} for c in ('params', 'memory')}
  out = {}
  for rule in convert.model_rules(model, target):
    shape = leaves[rule.collection][rule.path].shape
    out[rule.source] = rng.normal(size=shape if rule.transform is convert.copy else shape[::-1])
  for i in range(model.depth):
    out[f'transformer.layers.{i}.1.fn.memoryupdate.beta'] = np.float32(0.9)
  return {k: np.asarray(v, np.float32) for k, v in dict(out, cls_token=np.zeros((1, 1, 8))).items()}


def test_command_writes_a_checkpoint_that_training_code_restores(tmp_path):
  from ait_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config('triangle', 'quick')
  trainer = train.Trainer(config)
  abstract = trainer.abstract_state
  target = {'params': abstract.params, 'memory': abstract.memory}
  state_dict = _synthetic_state_dict(trainer.s.model, target)
  np.savez(tmp_path / 'reference.npz', **state_dict)
  convert.write_checkpoint(config, str(tmp_path / 'reference.npz'), str(tmp_path / 'wd'))
  step, state = trainer.restore(str(tmp_path / 'wd'))  # what --mode=eval and visualize call
  expected = convert.convert(state_dict, trainer.s.model, target)
  assert step == 0
  assert _same(jax.device_get(state.params), expected['params'])
  assert _same(jax.device_get(state.memory), expected['memory'])
  with pytest.raises(ValueError, match='already holds a checkpoint'):
    convert.write_checkpoint(config, str(tmp_path / 'reference.npz'), str(tmp_path / 'wd'))


def test_command_errors_are_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = DATA.parents[1]
  result = subprocess.run(
      [sys.executable, '-m', 'ait_jax.convert', f'--reference={DATA / "cifar_tiny.npz"}',
       f'--config={root / "configs/triangle.py"}:quick', f'--workdir={tmp_path / "wd"}'],
      capture_output=True, text=True, cwd=root, timeout=limit(),
      env=dict(__import__('os').environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: Reference tensor to_patch_embedding.1'), (
      result.stderr)
