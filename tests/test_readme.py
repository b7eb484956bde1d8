"""The README's commands work: its five-line model snippet, and its runnable shell blocks.

Blocks fenced as ```bash runnable run in order in a scratch directory (with configs/ linked),
which is the quickstart a newcomer follows: prepare Triangle, train `quick`, evaluate, visualise.
"""
import json
import os
import re
import subprocess

import numpy as np

from conftest import ROOT

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
  (tmp_path / 'configs').symlink_to(ROOT / 'configs')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # as a user would run it
  env['PYTHONPATH'] = str(ROOT)
  for command in commands:
    out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f'{command}\n{out.stdout}\n{out.stderr}'
  workdir = tmp_path / 'workdir' / 'triangle_quick'
  final = json.loads((workdir / 'eval_final.json').read_text())
  print(f'quick Triangle eval accuracy: {final["accuracy"]:.4f}')
  assert final['num_examples'] == 10_000
  # Chance is 0.5; three standard errors on 10,000 examples are 0.015.
  assert final['accuracy'] > 0.53
  assert any((workdir / 'checkpoints').iterdir()) and any((workdir / 'best').iterdir())
  train_lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {l['split'] for l in train_lines} == {'train', 'eval'}
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert json.loads((workdir / 'config.json').read_text())['dataset'] == 'triangle'
  assert json.loads((workdir / 'eval_best.json').read_text())['num_examples'] == 10_000
  assert len(list((workdir / 'figures').glob('*.png'))) == 4
