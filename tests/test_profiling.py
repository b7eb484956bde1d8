"""--config.profile_steps: a jax.profiler trace of the train loop in the workdir, summarised."""
import gzip
import json

import pytest

from ait_jax import train
from conftest import load_config


def test_train_writes_a_profile_of_the_steps_after_the_warm_up(generated_data_dir, tmp_path):
  c = load_config('triangle', 'quick')
  c.dataset, c.data_dir, c.mesh.data = 'triangle/small', generated_data_dir, 1
  # No log at step 2: its call is still running when the trace would start, unless waited for.
  c.total_steps, c.log_every_steps, c.profile_steps, c.profile_skip_steps = 6, 5, 2, 2
  workdir = tmp_path / 'run'
  train.train_and_evaluate(c, str(workdir))
  # Where TensorBoard's profile plugin looks: the logdir of the run's scalars.
  (session,) = (workdir / 'tensorboard' / 'plugins' / 'profile').iterdir()
  assert list(session.glob('*.xplane.pb'))
  summary = json.loads((workdir / 'profile_summary.json').read_text())
  assert (summary['first_step'], summary['steps'], summary['run_dir']) == (3, 2, str(session))
  assert summary['modules'] == ['jit_train_steps']  # the train step, and nothing else
  assert summary['top_ops'] and summary['ops_ms_per_step'] > 0
  assert 'matmul' in summary['by_kind_ms'] and summary['by_scope_ms'] is None  # no HLO given
  # Steps 3 and 4 alone: the steps before ran to their end before the trace began.
  events = json.loads(gzip.decompress(next(session.glob('*.trace.json.gz')).read_bytes()))
  steps = sorted(e['args']['step_num'] for e in events['traceEvents'] if e.get('name') == 'train')
  assert steps == ['3', '4']
  top = summary['top_ops'][0]
  assert top['calls_per_step'] == pytest.approx(round(top['calls_per_step'])), top


def test_profile_fields_are_checked(generated_data_dir, tmp_path):
  from ait_jax import errors  # pylint: disable=g-import-not-at-top
  c = load_config('triangle', 'quick')
  c.dataset, c.data_dir, c.mesh.data = 'triangle/small', generated_data_dir, 1
  c.profile_skip_steps = 0
  with pytest.raises(errors.ConfigError, match=r'profile_skip_steps=0 must be a whole number >= 1'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
