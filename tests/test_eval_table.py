"""`--mode=eval` prints a table: overall, then per class or per question type and subtype."""
from ait_jax import cli
from ait_jax import main


def _rows(table: str) -> dict[str, str]:
  """{'overall': '56.18%', ...} from the table's lines below its two header lines."""
  return {line[:-8].strip(): line[-8:].strip() for line in table.splitlines()[2:]}


def test_classes_by_name():
  result = {'step': 60, 'checkpoint': 'best', 'split': 'test', 'accuracy': 0.5618,
            'loss': 0.7365, 'num_examples': 10_000, 'per_class_accuracy': [0.6583, 0.4652]}
  table = main.eval_table(result, cli.load_config('triangle:quick'))
  assert table.splitlines()[0].startswith('Best checkpoint (step 60) on triangle test: 10,000 '
                                          'examples, cross-entropy 0.7365; all numbers in eval_best.json')
  assert _rows(table) == {'overall': '56.18%', 'class equilateral': '65.83%',
                          'class random': '46.52%'}


def test_question_types_and_subtypes():
  config = cli.load_config('sort_of_clevr:quick', {'question_types': ('binary',)})
  result = {'step': 5, 'checkpoint': 'latest', 'split': 'test', 'accuracy': 0.43, 'loss': 1.0,
            'num_examples': 100, 'per_class_accuracy': [None] * 10, 'accuracy_binary': 0.43,
            'accuracy_binary_0': 0.4, 'accuracy_binary_1': 0.41, 'accuracy_binary_2': 0.48}
  assert _rows(main.eval_table(result, config)) == {
      'overall': '43.00%', 'binary': '43.00%', 'closest_shape': '40.00%',
      'furthest_shape': '41.00%', 'count_same_shape': '48.00%'}


def test_many_classes_show_the_weakest_and_strongest():
  accuracies = [i / 100 for i in range(100)]
  accuracies[0] = None  # a class absent from the split
  result = {'step': 1, 'checkpoint': 'best', 'split': 'test', 'accuracy': 0.5, 'loss': 2.0,
            'num_examples': 10_000, 'per_class_accuracy': accuracies}
  rows = _rows(main.eval_table(result, cli.load_config('cifar100:quick')))
  assert list(rows) == ['overall', 'class 1 (weakest)', 'class 2 (weakest)',
                        'class 3 (weakest)', 'class 97 (strongest)', 'class 98 (strongest)',
                        'class 99 (strongest)']
  assert rows['class 99 (strongest)'] == '99.00%'
