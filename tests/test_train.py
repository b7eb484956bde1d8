"""The trainer: sharded steps equal single-device ones, multi-process runs, resume, entry point."""
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from ait_jax import checkpointing
from ait_jax import cli
from ait_jax import main as main_cmd
from ait_jax import train
from ait_jax import steps
from ait_jax import validation
from ait_jax.data import input_pipeline
from conftest import limit, load_config, ROOT, xla_flags

COMPARED = ('loss', 'ce_loss', 'balance_loss', 'accuracy', 'grad_norm', 'learning_rate')


def quick_config(data_dir, **overrides):
  c = load_config('triangle', 'quick')
  c.dataset = 'triangle/small'
  c.data_dir = data_dir
  c.mesh.data = 1  # one device unless a test asks for more: 8 virtual devices share 2 cores
  for k, v in overrides.items():
    target = c
    *path, leaf = k.split('.')
    for p in path:
      target = target[p]
    target[leaf] = v
  return c


def synthetic_batch(trainer, n, seed=0):
  rng = np.random.default_rng(seed)
  h, w, ch = trainer.s.info.image_shape
  batch = {'image': rng.integers(0, 256, (n, h, w, ch), dtype=np.uint8),
           'label': rng.integers(0, 2, (n,), dtype=np.int32)}
  return jax.device_put(batch, trainer.batch_sharding)


# Scope 'batch' on 8 devices is checked at the model level (tests/test_selection.py: selected
# tokens, loss, every gradient and the memory against one device's lax.top_k) and through the
# trainer after 8 steps (tests/test_fast_loop.py); scope 'example' is checked here.
@pytest.mark.parametrize('scope,k', [('example', 2)])
def test_sharded_step_equals_single_device(generated_data_dir, scope, k):
  assert jax.device_count() == 8
  config = quick_config(generated_data_dir, **{'model.bottleneck_scope': scope, 'model.bottleneck_k': k})
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    trainer = train.Trainer(config, devices=devices)
    state = trainer.init(trainer.rng)
    batch = synthetic_batch(trainer, config.batch_size)
    grads_fn = jax.jit(functools.partial(steps.loss_and_grads, trainer.s),
                       in_shardings=(trainer.state_sharding, trainer.batch_sharding))
    loss, (_, balance, _, memory), grads = grads_fn(state, batch)
    state, metrics = trainer.train_step(state, batch)
    state, metrics2 = trainer.train_step(state, synthetic_batch(trainer, config.batch_size, 1))
    results.append(jax.device_get(((loss, balance, memory, grads, metrics), metrics2)))
  (single, single2), (sharded, sharded2) = results
  chex.assert_trees_all_close(single, sharded, rtol=2e-5, atol=2e-6)
  # After one AdamW update tiny gradient differences are amplified (g / sqrt(v)); still close.
  chex.assert_trees_all_close(single2, sharded2, rtol=1e-3)


def _read_metrics(workdir, split='train'):
  lines = [json.loads(l) for l in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  return {m['step']: m for m in lines if m['split'] == split}


@pytest.fixture(scope='module')
def uninterrupted(generated_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  config = quick_config(generated_data_dir, total_steps=24, log_every_steps=1,
                        checkpoint_every_steps=8, eval_every_steps=12)
  result = train.train_and_evaluate(config, workdir)
  return config, workdir, result


def _assert_same_tail(reference_dir, resumed_dir, from_step):
  ref, got = _read_metrics(reference_dir), _read_metrics(resumed_dir)
  steps = [s for s in ref if s > from_step]
  assert steps and all(s in got for s in steps)
  for s in steps:  # bit for bit on CPU
    assert {k: ref[s][k] for k in COMPARED} == {k: got[s][k] for k in COMPARED}, s
  ref_eval, got_eval = _read_metrics(reference_dir, 'eval'), _read_metrics(resumed_dir, 'eval')
  assert ref_eval[max(ref_eval)]['accuracy'] == got_eval[max(got_eval)]['accuracy']


def test_resume_after_preemption_is_bit_exact(uninterrupted, tmp_path, monkeypatch):
  config, reference_dir, _ = uninterrupted
  workdir = str(tmp_path)
  stop_at = 10  # not a checkpoint step: the preemption save must cover it
  original = checkpointing.PreemptionFlag.should_stop
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop',
                      lambda self, step, manager: step == stop_at)
  train.train_and_evaluate(config, workdir)
  assert max(_read_metrics(workdir)) == stop_at
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop', original)
  train.train_and_evaluate(config, workdir)
  assert max(_read_metrics(workdir)) == config.total_steps
  _assert_same_tail(reference_dir, workdir, stop_at)


def test_sigterm_saves_and_resumes(uninterrupted, tmp_path):
  config, reference_dir, _ = uninterrupted
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'ait_jax.main', '--config=configs/triangle.py:quick',
         f'--workdir={workdir}', '--config.dataset=triangle/small',
         f'--config.data_dir={config.data_dir}', '--config.total_steps=24',
         '--config.log_every_steps=1', '--config.checkpoint_every_steps=8',
         '--config.eval_every_steps=12', '--config.mesh.data=1']
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + limit()
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  out, _ = proc.communicate(timeout=limit())
  assert proc.returncode == checkpointing.EXIT_PREEMPTED == 75, out  # "requeue me"
  assert 'SIGTERM: saved step' in out and 'rerun the same command to resume' in out, out
  stopped = max(_read_metrics(workdir))
  assert stopped < config.total_steps
  ckpt = checkpointing.Checkpointer(str(workdir))
  assert ckpt.latest_step() == stopped
  ckpt.close()
  # Resume in this process with 8 devices: a different device count than the interrupted run.
  config = config.copy_and_resolve_references()
  config.mesh.data = 8
  train.train_and_evaluate(config, str(workdir))
  ref, got = _read_metrics(reference_dir), _read_metrics(workdir)
  # The first resumed step is a forward pass of the restored parameters on 8 devices: equal up to
  # the order of float sums. Later steps are chaotic at the last bit (a gradient summed in another
  # order, a top-k near-tie flipped; tests/test_fast_loop.py measures how far that goes), so they
  # must only stay on the same course; resuming on the same devices is bit-exact (above).
  first = stopped + 1
  np.testing.assert_allclose([got[first][k] for k in COMPARED], [ref[first][k] for k in COMPARED],
                             rtol=1e-4, atol=1e-6)
  for s in range(first + 1, config.total_steps + 1):
    for k in COMPARED:  # a batch's accuracy moves in steps of 1/64
      np.testing.assert_allclose(got[s][k], ref[s][k], err_msg=f'{k} at step {s}',
                                 **(dict(atol=2 / 64) if k == 'accuracy' else dict(rtol=2e-2)))


def test_restore_onto_other_device_count(uninterrupted):
  config, workdir, _ = uninterrupted
  config = config.copy_and_resolve_references()
  config.mesh.data = -1  # every device given to the Trainer
  values = []
  for devices in (jax.devices(), jax.devices()[:1], jax.devices()[:2]):
    trainer = train.Trainer(config, devices=devices)
    ckpt = checkpointing.Checkpointer(workdir)
    step, state, data_state = ckpt.restore(trainer.abstract_with_shardings())
    ckpt.close()
    assert step == config.total_steps and data_state
    assert state.params['head']['kernel'].sharding.mesh.size == len(devices)
    values.append(jax.device_get(state))
  chex.assert_trees_all_equal(values[0], values[1], values[2])


def test_eval_mode_writes_metrics_json(uninterrupted):
  config, workdir, result = uninterrupted
  out = train.evaluate(config, workdir, which='latest')
  assert out['accuracy'] == result['accuracy']
  assert out['num_examples'] == 200
  saved = json.loads(pathlib.Path(workdir, 'eval_latest.json').read_text())
  assert saved['accuracy'] == out['accuracy'] and len(saved['per_class_accuracy']) == 2


def test_train_split_is_scored_beside_the_test_split(uninterrupted):
  """Every evaluation also scores the first training examples (256 of 512 in the quick config),
  in order and without augmentation, with the evaluation's memory rule: split 'eval_train'."""
  config, workdir, _ = uninterrupted
  assert config.eval_train_examples == 256
  evals, train_evals = _read_metrics(workdir, 'eval'), _read_metrics(workdir, 'eval_train')
  assert sorted(train_evals) == sorted(evals) == [12, 24]
  assert all(r['num_examples'] == 256 for r in train_evals.values())
  trainer = train.Trainer(config)
  _, state = trainer.restore(workdir, 'latest')
  assert train_evals[24]['accuracy'] == trainer.evaluate(
      state.params, state.memory, 'train', limit=256)['accuracy']
  predictions = []  # a limit that ends inside a batch: the first 50 examples, in order
  result = trainer.evaluate(state.params, state.memory, 'train', predictions, limit=50)
  truth = input_pipeline.ExampleSource(trainer.s.info, 'train', config.data_dir).read(
      np.arange(50))['label']
  assert result['num_examples'] == len(predictions) == 50
  assert result['accuracy'] == pytest.approx(np.mean(np.asarray(predictions) == truth))


def test_train_split_subset_size(generated_data_dir, monkeypatch):
  sizes = {}
  for n in (-1, 0, 30, 10 ** 9):
    s = validation.validate(quick_config(generated_data_dir, eval_train_examples=n))
    sizes[n] = s.train_eval_examples
  assert sizes == {-1: 200, 0: 0, 30: 30, 10 ** 9: 512}  # the test split's 200; the whole split
  assert validation.validate(load_config('sort_of_clevr')).train_eval_examples == 2_000
  monkeypatch.setattr(validation, 'TRAIN_EVAL_MAX', 100)  # no dataset's test split exceeds 10,000
  assert validation.validate(quick_config(generated_data_dir,
                                                           eval_train_examples=-1)).train_eval_examples == 100


def test_sort_of_clevr_reports_question_types(generated_data_dir):
  """Per question type and subtype accuracies equal a NumPy count over the predictions."""
  c = load_config('sort_of_clevr', 'quick')
  c.dataset, c.data_dir = 'sort_of_clevr/small', generated_data_dir
  c.question_types = ('non_relational', 'binary', 'ternary')
  c.batch_size, c.eval_batch_size = 16, 500
  c.mesh.data = 1
  c.model.bottleneck_k = 64
  trainer = train.Trainer(c)
  state = trainer.init(trainer.rng)
  predictions = []
  result = trainer.evaluate(state.params, state.memory, predictions=predictions)
  source = input_pipeline.ExampleSource(trainer.s.info, 'test', generated_data_dir)
  truth = source.read(np.arange(len(source)))
  assert result['num_examples'] == len(predictions) == 50 * 30
  correct = np.asarray(predictions) == truth['label']
  assert result['accuracy'] == pytest.approx(correct.mean())
  for t, name in enumerate(('non_relational', 'binary', 'ternary')):
    of_type = truth['qtype'] == t
    assert result[f'accuracy_{name}'] == pytest.approx(correct[of_type].mean())
    for sub in range(3):
      kept = of_type & (truth['qsubtype'] == sub)
      assert result[f'accuracy_{name}_{sub}'] == pytest.approx(correct[kept].mean())


@pytest.mark.parametrize('override,message', [
    ('--config.batch_size=0', 'batch_size=0 must be a positive integer'),
    ('--config.model.bottleneck_k=100000', 'model.bottleneck_k=100000'),
    ('--config.model.patch_size=5', 'model.patch_size=5 must divide'),
    ('--config.model.preset=huge', "model.preset='huge'"),
    ('--config.eval_train_examples=-2', 'eval_train_examples=-2 must be -1'),
    ('--config.dataset=imagenet', "Unknown dataset 'imagenet'"),
])
def test_bad_config_fails_fast(generated_data_dir, override, message, capsys, tmp_path):
  """`ait_jax.main`'s own path (flags, config, checks) in process; tests/test_bad_inputs.py runs a
  few rows as real subprocesses."""
  workdir = tmp_path / 'never' / 'created'
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main_cmd.define_flags, main_cmd.main, [
        'ait_jax.main', '--config=configs/triangle.py:quick', f'--workdir={workdir}', override,
        f'--config.data_dir={generated_data_dir}'])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2  # a user's mistake (ait_jax/cli.py)
  assert message in err, err
  assert 'Traceback' not in err
  assert not (tmp_path / 'never').exists()


def test_missing_catalog_dataset_names_prepare_command(tmp_path):
  c = load_config('imagenet100', 'quick')  # CIFAR would be downloaded (test_data_download.py)
  c.data_dir = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError,
                     match='python -m ait_jax.data.prepare --dataset=imagenet100'):
    train.train_and_evaluate(c, str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_missing_generated_dataset_is_built_first(tmp_path, capfd):
  """One command from nothing: a generated dataset that data_dir lacks is built, then trained on."""
  c = quick_config(str(tmp_path / 'data'), total_steps=2, eval_every_steps=2,
                   checkpoint_every_steps=2)
  result = train.train_and_evaluate(c, str(tmp_path / 'work'))
  err = capfd.readouterr().err
  assert 'triangle/small is not prepared' in err
  assert f'Prepared triangle/small in {tmp_path / "data"}' in err
  assert result['step'] == 2 and result['num_examples'] == 200
  assert list((tmp_path / 'data' / 'triangle' / 'small').glob('*/*train.array_record*'))


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match='Unknown config variant'):
    load_config('cifar100', 'modle=base')
  with pytest.raises(ValueError, match='Unknown model variant'):
    load_config('cifar100', 'model=giant')
  assert load_config('cifar100', 'model=vit_medium').model.vit


def test_learning_rate_schedule():
  c = load_config('cifar100')
  s = validation.validate(c)
  lr = steps.learning_rate_fn(s)
  spe = s.steps_per_epoch
  assert spe == 50_000 // 512
  np.testing.assert_allclose(float(lr(0)), 1e-5, rtol=1e-6)
  np.testing.assert_allclose(float(lr(spe - 1)), 1e-5, rtol=1e-6)  # stepped per epoch
  np.testing.assert_allclose(float(lr(spe)), 1e-5 + (1e-4 - 1e-5) / 5, rtol=1e-5)
  np.testing.assert_allclose(float(lr(5 * spe)), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(float(lr(s.total_steps)), 1e-6, rtol=1e-4)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(generated_data_dir, tmp_path,
                                                              monkeypatch):
  config = quick_config(generated_data_dir, total_steps=24, log_every_steps=1,
                        checkpoint_every_steps=8, eval_every_steps=100)
  original = checkpointing.PreemptionFlag.should_stop
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop',
                      lambda self, step, manager: step == 8)
  train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(checkpointing.PreemptionFlag, 'should_stop', original)
  config.lr = 1e30  # the first update after resuming blows the parameters up
  with pytest.raises(train.NonFiniteLossError,
                     match=r'Non-finite loss.* at step 1[01].*last good checkpoint is step 8'):
    train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 8
  ckpt.close()
