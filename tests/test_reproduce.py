"""`python -m ait_jax.reproduce --scale=tiny`: the CPU experiment's runs for a few steps on the
small builder configs, and the files it writes (summary.json, RESULTS.md, curves.png)."""
import json

import pytest

from ait_jax import cli
from ait_jax import reproduce


def test_cpu_experiment_has_the_issue_35_runs_within_two_hours_at_two_jobs():
  runs = reproduce.RUNS['cpu']
  groups = {}
  for run in runs:
    groups.setdefault(reproduce.group_of(run), []).append(run)
  assert {g: len(r) for g, r in groups.items()} == {
      'triangle_ait': 3, 'triangle_vit': 3, 'triangle_ait_no_bottleneck': 1,
      'triangle_ait_stored_split': 1,
      'soc_binary_ait': 3, 'soc_binary_vit': 3, 'soc_all_ait': 1, 'soc_all_vit': 1}
  assert set(groups) == set(reproduce.GROUPS) == set(reproduce.ESTIMATE_MS_PER_STEP)
  assert [r for r in runs if r.startswith('triangle') and not runs[r][2]['fresh_train_data']] == [
      'triangle_ait_stored_split_s0']  # the one run that shows what fresh images change
  assert 60 < reproduce.estimate_minutes(runs, jobs=2) <= 120
  # The tiny scale is the same experiment: the same groups.
  assert {reproduce.group_of(r) for r in reproduce.RUNS['tiny']} == set(groups)


def test_tiny_reproduce_writes_the_table_and_curves(generated_data_dir, tmp_path, capfd):
  out, work = tmp_path / 'out', tmp_path / 'work'
  argv = ['reproduce', '--scale=tiny', f'--data_dir={generated_data_dir}', f'--out={out}',
          f'--workdir_root={work}']
  out.mkdir()
  (out / reproduce.DIAGNOSIS_FILE).write_text('The hand-written diagnosis.\n')
  with pytest.raises(SystemExit) as exit_info:
    cli.run(reproduce.define_flags, reproduce.main, argv)
  _, err = capfd.readouterr()
  assert exit_info.value.code == 0, err
  summary = json.loads((out / 'summary.json').read_text())
  assert set(summary['runs']) == set(reproduce.RUNS['tiny'])
  groups = summary['groups']
  assert groups['triangle_ait']['runs'] == ['triangle_ait_s0', 'triangle_ait_s1']
  assert ' ± ' in groups['triangle_ait']['test_mean_std']['accuracy']  # two seeds
  assert ' ± ' not in groups['soc_binary_ait']['test_mean_std']['accuracy']  # one
  assert set(groups['soc_all_vit']['test_mean_std']) == {
      'accuracy', 'accuracy_non_relational', 'accuracy_binary', 'accuracy_ternary'}
  for run in summary['runs'].values():
    assert run['eval']['step'] == 2 and [s for s, _ in run['curve']['eval']] == [1, 2]
    assert run['train_split_accuracy'] is not None
  results = (out / 'RESULTS.md').read_text()
  for group, g in groups.items():
    row = f"| {group} | {g['task']} | {len(g['runs'])} | {g['test_mean_std']['accuracy']} |"
    assert row in results
  assert '99.64 (AiT-Base)' in results and '43.7 (majority per subtype)' in results
  assert '## Diagnosis\n\nThe hand-written diagnosis.\n' in results
  for name, run in summary['runs'].items():  # the workspace's numbers, for AiT runs only
    ws = run['workspace']
    if '_vit_' in name:
      assert ws is None
    else:
      assert len(ws['memory_mean_abs_cos']) == len(ws['tokens_never_selected']) == 1  # depth 1
      assert 0 < ws['memory_mean_abs_cos'][0] <= 1 and 0 <= ws['tokens_never_selected'][0] <= 1
  assert '| triangle_vit_s0 | 2 |' in results and '| — | — |' in results
  assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  for run in summary['runs']:
    assert (out / run / 'metrics.jsonl').exists() and (out / run / 'eval_final.json').exists()


def test_thin_rows_keeps_every_evaluation_and_the_last_train_row():
  rows = [{'step': s, 'split': 'train'} for s in range(1, 26)]
  rows.insert(10, {'step': 10, 'split': 'eval'})
  rows.append({'step': 25, 'split': 'eval_train'})
  thinned = reproduce.thin_rows(rows, max_train_rows=5)
  assert [r['step'] for r in thinned if r['split'] == 'train'] == [5, 10, 15, 20, 25]
  assert [r['split'] for r in thinned if r['split'] != 'train'] == ['eval', 'eval_train']
  assert reproduce.thin_rows(rows, max_train_rows=100) == rows
