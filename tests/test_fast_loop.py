"""Device-resident data and several steps per call: same batches, same steps, exact resume."""
import chex
import jax
import numpy as np
import pytest

from ait_jax import checkpointing
from ait_jax import sharding
from ait_jax import validation
from ait_jax import train
from ait_jax.data import device_data
from ait_jax.data import input_pipeline
from conftest import load_config


def quick_config(data_dir, **overrides):
  c = load_config('triangle', 'quick')
  c.dataset, c.data_dir = 'triangle/small', data_dir
  c.mesh.data = overrides.pop('mesh_data', 1)
  c.update(overrides)
  return c


@pytest.mark.parametrize('name,devices', [('triangle/small', 8), ('sort_of_clevr/small', 2)])
def test_device_batches_equal_host_batches(generated_data_dir, name, devices):
  mesh = sharding.make_mesh(-1, 1, jax.devices()[:devices])
  kwargs = dict(data_dir=generated_data_dir, global_batch_size=64, seed=7)
  host = input_pipeline.make_train_iterator(name, sharding=sharding.batch_sharding(mesh),
                                            prefetch=0, **kwargs)
  data, order = device_data.make_device_batches(name, mesh, **kwargs)
  gather = jax.jit(device_data.gather)
  # triangle/small has 8 batches per epoch: 10 batches cross an epoch's end (a new permutation).
  for i, k in enumerate((1, 3, 1, 5)):
    indices = order.next_indices(k)
    for row in range(k):
      want = next(host)
      got = gather(data.arrays, indices[row])
      assert set(got) == set(want)
      for key in got:
        assert got[key].sharding.is_equivalent_to(want[key].sharding, got[key].ndim), key
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), (i, key))
  # The positions are interchangeable: each pipeline resumes from the other's state.
  assert order.get_state() == host.get_state()
  host.set_state(order.get_state())
  order.set_state(host.get_state())
  np.testing.assert_array_equal(np.asarray(gather(data.arrays, order.next_indices(1)[0])['label']),
                                np.asarray(next(host)['label']))
  order.close()


def test_bad_steps_per_call_is_one_sentence():
  c = load_config('triangle', 'quick')
  c.steps_per_call = 0
  with pytest.raises(ValueError, match='steps_per_call=0 must be a positive integer'):
    validation.validate(c)


@pytest.fixture(scope='module')
def trainer(generated_data_dir):
  """One single-device trainer with both options, shared so that its steps compile once: every
  call here takes 4 steps (logs and saves every 4), and 12 steps of 64 cross an epoch's end."""
  config = quick_config(generated_data_dir, device_data=True, steps_per_call=4, total_steps=12,
                        log_every_steps=4, checkpoint_every_steps=4, eval_every_steps=100)
  return train.Trainer(config, devices=jax.devices()[:1])


def test_k_step_scan_equals_k_single_steps(trainer):
  c = trainer.s.config
  feed = trainer.train_feed()
  state, metrics = feed.run(trainer.init(trainer.rng), 4)
  feed.close()
  scanned = jax.device_get((state, metrics))
  host = trainer.train_iterator()  # the host pipeline's batches, same seed
  state, single = trainer.init(trainer.rng), []
  for _ in range(4):
    batch = {k: v for k, v in next(host).items() if k in ('image', 'label')}
    state, m = trainer.train_step(state, batch)
    single.append(m)
  single = jax.device_get((state, jax.tree.map(lambda *x: np.stack(x), *single)))
  assert int(scanned[0].step) == 4 and scanned[1]['loss'].shape == (4,)
  assert c.batch_size == 64
  # The scanned steps are the same computation, fed by the device gather. With XLA's CPU fusion
  # emitters (its default) they were equal bit for bit; the tests turn those off
  # (conftest.xla_flags), and the older emitters fuse a loop body otherwise than the same ops at
  # the top level, which moves the last bits of float sums. Measured against each leaf's largest
  # value, parameters, optimizer state and metrics then differ by up to 1.8e-5; one step more or
  # less, or other batches, moves some leaf by 0.85 to 2 of its largest value.
  chex.assert_trees_all_equal_structs(scanned, single)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(scanned)[0],
                               jax.tree.leaves(single)):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want), initial=0))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))


def _run_feed(trainer, calls):
  feed = trainer.train_feed()
  state, losses = trainer.init(trainer.rng), []
  for k in calls:
    state, metrics = feed.run(state, k)
    losses.append(metrics['loss'])
  feed.close()
  return jax.device_get((state.params, np.concatenate(losses)))


def test_sharded_equals_single_device_with_both_options(trainer):
  config = trainer.s.config.copy_and_resolve_references()
  config.mesh.data = -1
  single = _run_feed(trainer, (4, 4))
  sharded = _run_feed(train.Trainer(config, devices=jax.devices()), (4, 4))
  assert single[1].shape == (8,)
  # The first step's loss is one forward pass of the same parameters on other shards: equal up to
  # the order of float sums.
  np.testing.assert_allclose(sharded[1][0], single[1][0], rtol=1e-5)
  # Later steps are chaotic at the last bit: 8 devices sum gradients in another order, and a
  # top-k near-tie that such a difference flips selects another token. A single-device run whose
  # initial parameters were scaled by 1 + 3e-7 noise (4 seeds) moved its 8 losses by up to 3.2e-4
  # and its parameters by up to 5.2e-4; a learning rate 5% too high moves the losses by 1.4e-2.
  np.testing.assert_allclose(sharded[1], single[1], rtol=2e-3)
  chex.assert_trees_all_close(sharded[0], single[0], rtol=0, atol=2e-3)


def _final_state(trainer, workdir):
  ckpt = checkpointing.Checkpointer(workdir)
  step, state, data_state = ckpt.restore(trainer.abstract_with_shardings())
  ckpt.close()
  return step, jax.device_get(state), data_state


def _train(trainer, workdir):
  """The training loop on the shared trainer (train_and_evaluate would compile anew)."""
  checkpointing.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
  return train._train(trainer, workdir)  # pylint: disable=protected-access


def test_resume_with_both_options_is_bit_exact(trainer, tmp_path, monkeypatch):
  reference = _train(trainer, str(tmp_path / 'once'))
  workdir = str(tmp_path / 'twice')
  original = checkpointing.PreemptionFlag.should_stop
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop',
                      lambda self, step, manager: step == 4)  # mid-epoch
  assert _train(trainer, workdir)['step'] == 4
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop', original)
  resumed = _train(trainer, workdir)
  assert resumed['step'] == 12 and resumed['train_loss'] == reference['train_loss']
  assert resumed['accuracy'] == reference['accuracy']
  want, got = (_final_state(trainer, str(tmp_path / d)) for d in ('once', 'twice'))
  assert got[0] == want[0] == 12 and got[2] == want[2] == {
      'grain': {'next_index': 12}, 'fingerprint': want[2]['fingerprint']}
  chex.assert_trees_all_equal(got[1], want[1])


def test_too_large_split_stays_on_host(generated_data_dir, monkeypatch):
  monkeypatch.setattr(device_data, 'MAX_BYTES', 1000)
  with pytest.raises(ValueError, match='set device_data=False for this dataset'):
    device_data.make_device_batches('triangle/small', sharding.make_mesh(1, 1),
                                    data_dir=generated_data_dir, global_batch_size=64, seed=0)
