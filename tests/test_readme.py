"""The README's commands work: its model snippet, and its runnable shell blocks.

Blocks fenced as ```bash runnable run in order in an empty scratch directory, which is the
quickstart a newcomer follows: prepare Triangle, train `quick`, evaluate, visualise. Their
`--config=configs/...` finds the shipped config although the folder has no configs/.
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np

from conftest import limit, ROOT, xla_flags

README = (ROOT / 'README.md').read_text()


def _blocks(info: str) -> list[str]:
  return re.findall(r'^```' + re.escape(info) + r'\n(.*?)^```', README, re.M | re.S)


def test_model_snippet_runs():
  (snippet,) = _blocks('python')
  scope = {}
  exec(snippet, scope)  # pylint: disable=exec-used
  logits, aux, new = scope['logits'], scope['aux'], scope['new']
  assert logits.shape == (8, 10) and np.isfinite(float(aux['balance_loss']))
  assert set(new) == {'memory'}


def test_runnable_blocks(tmp_path):
  commands = [line for block in _blocks('bash runnable') for line in block.splitlines()
              if line.strip() and not line.startswith('#')]
  assert any('ait_jax.main' in c and ':quick' in c for c in commands)
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))  # one device, as a user's CPU has
  env['PYTHONPATH'] = str(ROOT)
  # `python` is this interpreter, as in the venv the README installs into.
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  outputs = {}
  for command in commands:
    out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=limit(1200))
    assert out.returncode == 0, f'{command}\n{out.stdout}\n{out.stderr}'
    outputs[command] = out.stdout
  assert not (tmp_path / 'configs').exists()
  (train_out,) = [o for c, o in outputs.items() if 'ait_jax.main' in c and '--mode=eval' not in c]
  (eval_out,) = [o for c, o in outputs.items() if 'ait_jax.main' in c and '--mode=eval' in c]
  assert 'AiT (preset small, overridden: depth 1, width 64' in train_out  # what runs
  # Its closing line, which the README's quick start promises.
  assert train_out.strip().splitlines()[-1].startswith('Finished 60 steps of triangle: test '
                                                       'accuracy ')
  assert '  class equilateral' in eval_out  # --mode=eval's table
  workdir = tmp_path / 'workdir' / 'triangle_quick'
  final = json.loads((workdir / 'eval_final.json').read_text())
  print(f'quick Triangle eval accuracy: {final["accuracy"]:.4f}')
  assert final['num_examples'] == 10_000
  # Chance is 0.5; three standard errors on 10,000 examples are 0.015.
  assert final['accuracy'] > 0.53
  assert any((workdir / 'checkpoints').iterdir()) and any((workdir / 'best').iterdir())
  train_lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {l['split'] for l in train_lines} == {'train', 'eval', 'eval_train'}
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert json.loads((workdir / 'config.json').read_text())['dataset'] == 'triangle'
  assert json.loads((workdir / 'eval_best.json').read_text())['num_examples'] == 10_000
  assert len(list((workdir / 'figures').glob('*.png'))) == 4


def test_quick_start_is_a_front_door():
  """The quick start says what runs and how long it takes, without a log of dated measurements."""
  start = README.index('## One command')
  section = README[start:README.index('\n## ', start + 1)]
  assert not re.search(r'20\d\d-\d\d-\d\d', section), 'a dated measurement in the quick start'
  assert 'about a minute' in section and 'ait_jax.main --help' in section


def _shell_lines() -> list[str]:
  """Every command line of the README's bash blocks, continuation lines joined."""
  text = '\n'.join(_blocks('bash') + _blocks('bash runnable')).replace('\\\n', ' ')
  return [l.split('  #')[0].strip() for l in text.splitlines() if l.strip()]


def _set_override(config, arg: str) -> None:
  key, value = arg[len('--config.'):].split('=', 1)
  *path, leaf = key.split('.')
  target = config
  for p in path:
    target = target[p]
  current = target[leaf]
  target[leaf] = (value.lower() == 'true' if isinstance(current, bool) else
                  type(current)(value) if current is not None else value)


def test_training_commands_are_valid_configs():
  """The README's `ait_jax.main` commands name configs and fields that pass validation."""
  from ait_jax import validation  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  commands = [l for l in _shell_lines() if l.startswith('python -m ait_jax.main')]
  assert len(commands) >= 5
  for command in commands:
    args = shlex.split(command)
    (config_arg,) = [a for a in args if a.startswith('--config=')]
    path, _, variant = config_arg[len('--config='):].partition(':')
    config = load_config(pathlib.Path(path).stem, variant or None)
    for arg in args:
      if arg.startswith('--config.'):
        _set_override(config, arg)
    validation.validate(config)  # raises on any invalid field


def test_launch_commands_dry_run():
  """The README's launch lines run as written, with --dry-run, in the README's environment."""
  lines = _shell_lines()
  env = dict(os.environ)
  for line in lines:
    if line.startswith('export '):
      env.update(kv.split('=', 1) for kv in shlex.split(line)[1:])
  commands = [l for l in lines if l.startswith('launch/')]
  assert any('tpu_vm.sh train' in c for c in commands) and any('gpu.sh' in c for c in commands)
  for command in commands:
    args = shlex.split(command)
    out = subprocess.run(args[:2] + ['--dry-run'] + args[2:], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=limit())
    assert out.returncode == 0, f'{command}\n{out.stdout}\n{out.stderr}'
