"""Shardings by name: every parameter names its axes, the rule tables place them, and FSDP
(`config.sharding='fsdp'`) trains like the replicated run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ait_jax import models
from ait_jax import sharding
from ait_jax import steps
from ait_jax import train
from conftest import load_config

# Every module and option that adds parameters: the question token, CLS and learned posemb, the
# ViT, and the cross-attention retrieval.
VARIANTS = [
    dict(),
    dict(vit=True),
    dict(head='cls', posemb='learned'),
    dict(retrieval='cross_attention', width=128, num_heads=2),
    dict(head='mean', bottleneck=False, gradient_mode='learned_write'),
]


def _boxed_params(question_dim=0, **fields):
  cfg = dict(preset='small', depth=1, width=64, mlp_dim=128, num_heads=1, bottleneck_k=16)
  cfg.update(fields)
  model = models.create_model(cfg, num_classes=10, image_shape=(8, 8, 3),
                              question_dim=question_dim, batch_size=4)
  x = jnp.zeros((4, 8, 8, 3))
  q = jnp.zeros((4, question_dim)) if question_dim else None
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, q, train=True))['params']


@pytest.mark.parametrize('fields', VARIANTS + [dict(question_dim=6)], ids=str)
def test_every_parameter_names_its_axes(fields):
  """Fails for a parameter created without nn.with_logical_partitioning: the rule tables could
  not place it."""
  params = _boxed_params(**fields)
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(
      x, nn.LogicallyPartitioned))
  assert len(leaves) > 10
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    assert set(leaf.names) - {None} <= set(models.LOGICAL_AXES), leaf.names


def test_a_parameter_without_axes_is_refused():
  params = nn.unbox(_boxed_params())
  mesh = sharding.make_mesh(-1, 1)
  with pytest.raises(ValueError, match=r"Parameter \['block0'\].* has no logical axes"):
    sharding.logical_shardings(mesh, params, 'fsdp', require_axes=True)


def _state_specs(rules, data=8, model=1):
  c = load_config('triangle', 'quick')
  c.mesh.data, c.mesh.model, c.sharding = data, model, rules
  trainer = train.Trainer(c)
  return jax.tree.map(lambda sh: sh.spec, trainer.state_sharding)


def test_rule_tables():
  """'replicated' keeps every parameter whole on one data axis; 'fsdp' splits 'embed' (and the
  head's input) over 'data', for the parameters and both Adam moments alike; a 'model' axis
  splits the heads and the MLP under either."""
  rep = _state_specs('replicated')
  assert all(spec == P() or all(a is None for a in spec)
             for spec in jax.tree.leaves(rep, is_leaf=lambda x: isinstance(x, P)))
  fsdp = _state_specs('fsdp')
  block = fsdp.params['block0']
  assert block['ffn']['fc1']['kernel'] == P('data', None)
  assert block['ffn']['fc2']['kernel'] == P(None, 'data')
  assert block['attn']['qkv']['kernel'] == P('data', None)
  assert block['workspace']['query']['kernel'] == P(None, None)  # no embed axis: replicated
  assert block['norm1']['scale'] == P(None)  # norms stay whole
  assert fsdp.params['head']['kernel'] == P('data', None)
  adam = fsdp.opt_state[0]
  assert adam.mu['block0']['ffn']['fc1']['kernel'] == P('data', None)
  assert adam.nu['block0']['ffn']['fc1']['kernel'] == P('data', None)
  tp = _state_specs('replicated', data=4, model=2)
  assert tp.params['block0']['ffn']['fc1']['kernel'] == P(None, 'model')
  assert tp.params['block0']['ffn']['fc2']['kernel'] == P('model', None)
  assert tp.params['block0']['attn']['qkv']['kernel'] == P(None, 'model')


def _run(rules, steps_count=3):
  c = load_config('triangle', 'quick')
  c.mesh.data, c.sharding = -1, rules
  trainer = train.Trainer(c)
  state = trainer.init(trainer.rng)
  rng = np.random.default_rng(0)
  h, w, ch = trainer.s.info.image_shape
  losses = []
  for _ in range(steps_count):
    batch = {'image': rng.integers(0, 256, (c.batch_size, h, w, ch), dtype=np.uint8),
             'label': rng.integers(0, trainer.s.info.num_classes, (c.batch_size,), np.int32)}
    state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
    losses.append(metrics['loss'])
  return state, np.asarray(jax.device_get(losses))


def test_fsdp_trains_like_replicated():
  """8 devices, 3 steps: the same losses and parameters, with each FSDP kernel held 1/8 per
  device. The first step's forward pass sees the same parameters, so it is compared tightly;
  later steps only closely (a last-bit difference can flip a top-k near-tie,
  tests/test_fast_loop.py)."""
  assert jax.device_count() == 8
  rep_state, rep_losses = _run('replicated')
  fsdp_state, fsdp_losses = _run('fsdp')
  kernel = fsdp_state.params['block0']['ffn']['fc1']['kernel']
  assert kernel.sharding.spec == P('data', None)
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 8, kernel.shape[1])
  np.testing.assert_allclose(fsdp_losses[0], rep_losses[0], rtol=1e-5)
  np.testing.assert_allclose(fsdp_losses, rep_losses, rtol=2e-3)
  for a, b in zip(jax.tree.leaves(jax.device_get(fsdp_state.params)),
                  jax.tree.leaves(jax.device_get(rep_state.params))):
    np.testing.assert_allclose(a, b, atol=2e-3)
  assert not np.allclose(rep_losses[0], rep_losses[-1])  # the steps learned something
