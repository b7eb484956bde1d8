"""What a run prints: each loss named for what it is (a train row's objective holds the balance
loss, an eval row's is the cross-entropy alone), and a closing line with the final and best
accuracy and where the results are; metrics.jsonl keeps its keys for its readers."""
import json
import re

from ait_jax import cli
from ait_jax import main
from ait_jax import train
from conftest import ROOT

QUICK = ['--config.dataset=triangle/small', '--config.mesh.data=1', '--config.total_steps=2',
         '--config.log_every_steps=1', '--config.eval_every_steps=2',
         '--config.eval_train_examples=0']


def test_losses_are_labelled_and_the_run_ends_with_a_summary(generated_data_dir, tmp_path,
                                                              capfd):
  config = cli.load_config(str(ROOT / 'configs/triangle.py:quick'),
                           QUICK + [f'--config.data_dir={generated_data_dir}'])
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  out = capfd.readouterr().out
  train_lines = [l for l in out.splitlines() if l.startswith('[train]')]
  (eval_line,) = [l for l in out.splitlines() if l.startswith('[eval]')]
  assert len(train_lines) == 2
  assert re.search(r'cross-entropy \d\.\d{4} \+ balance \d\.\d{4} = loss \d\.\d{4}, accuracy ',
                   train_lines[0]), train_lines[0]
  assert re.fullmatch(r'\[eval\] step 2: accuracy \d\.\d{4}, cross-entropy \d\.\d{4}', eval_line)

  last = out.strip().splitlines()[-1]
  final = json.loads((workdir / 'eval_final.json').read_text())
  assert last.startswith(f'Finished 2 steps of triangle/small: test accuracy '
                         f'{100 * final["accuracy"]:.2f}% at the last step; best '
                         f'{100 * final["accuracy"]:.2f}% at step 2 (checkpoint in '
                         f'{workdir / "best"}); results in {workdir}'), last
  assert f'python -m ait_jax.visualize --workdir={workdir} --out={workdir / "figures"}' in last

  # The JSON lines keep their keys (visualize, reproduce and the tests read them).
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_row = [r for r in rows if r['split'] == 'train'][-1]
  assert abs(train_row['loss'] - train_row['ce_loss'] - train_row['balance_loss']) < 1e-4
  assert 'loss' in [r for r in rows if r['split'] == 'eval'][-1]

  # A rerun of the finished run trains nothing and ends with the same summary.
  train.train_and_evaluate(config, str(workdir))
  assert capfd.readouterr().out.strip().splitlines()[-1] == last


def test_eval_table_names_its_numbers():
  result = {'step': 60, 'checkpoint': 'best', 'split': 'test', 'accuracy': 0.5618,
            'loss': 0.7365, 'num_examples': 10_000, 'per_class_accuracy': [0.6583, 0.4652]}
  head = main.eval_table(result, cli.load_config('triangle:quick')).splitlines()[0]
  assert head.endswith('10,000 examples, cross-entropy 0.7365; all numbers in eval_best.json')
