"""The figure command: four readable PNGs of a known size from a quick run, clear errors."""
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from ait_jax import train
from ait_jax import validation
from ait_jax import visualize
from conftest import limit, load_config, ROOT

EXPECTED_SHAPE = (round(visualize.FIGSIZE[1] * visualize.DPI),
                  round(visualize.FIGSIZE[0] * visualize.DPI))


@pytest.fixture(scope='module')
def trained_workdir(generated_data_dir, tmp_path_factory):
  config = load_config('triangle', 'quick')
  config.dataset = 'triangle/small'
  config.data_dir = generated_data_dir
  config.total_steps, config.log_every_steps, config.eval_every_steps = 4, 1, 4
  config.mesh.data = 1  # one device compiles fastest; sharded restores are test_train's job
  workdir = str(tmp_path_factory.mktemp('vis_run'))
  train.train_and_evaluate(config, workdir)
  return workdir


def test_writes_four_figures_of_the_stated_size(trained_workdir, tmp_path):
  out = str(tmp_path / 'figures')
  result = visualize.visualize(trained_workdir, out, num_images=3, which='latest')
  assert result['step'] == 4
  assert [os.path.basename(p) for p in result['paths']] == list(visualize.FIGURES)
  assert EXPECTED_SHAPE == (960, 1280)
  for path in result['paths']:
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == EXPECTED_SHAPE, path
    assert image[..., :3].std() > 0.01, path  # not a blank canvas

  layer = result['data']['layers'][0]
  hm, m, b, n = layer['selections'].shape
  assert (b, n) == (64, 4)  # the training batch size, 4 patches of 32x32 per 64x64 image
  k = 64  # configs/triangle.py: every (head, slot) keeps exactly k tokens of the batch
  np.testing.assert_array_equal(layer['selections'].sum(axis=(2, 3)), np.full((hm, m), k))
  np.testing.assert_allclose(layer['gates'].sum(axis=(2, 3)), 1.0, rtol=1e-5)
  # The Hopfield update is the concave-convex step of its energy (docs/model.md#hopfield).
  assert layer['energy_after'].mean() <= layer['energy_before'].mean()
  assert np.all(layer['energy_after'] <= layer['energy_before'] + 1e-4)


def test_config_json_round_trips(trained_workdir):
  config = visualize.load_config(trained_workdir)
  assert config.dataset == 'triangle/small' and config.model.patch_size == 32
  assert validation.validate(config).model.depth == 1


def test_missing_checkpoint_is_one_sentence(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    visualize.visualize(str(tmp_path), str(tmp_path / 'out'),
                        config=load_config('triangle', 'quick'))
  out = subprocess.run([sys.executable, '-m', 'ait_jax.visualize',
                        f'--workdir={tmp_path / "missing"}', f'--out={tmp_path / "out"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=limit())
  assert out.returncode == 2  # a user's mistake (ait_jax/cli.py)
  assert out.stderr.strip().startswith('error: No workdir'), out.stderr
  assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'out').exists()


def test_missing_metrics_is_one_sentence(tmp_path):
  with pytest.raises(FileNotFoundError, match='No metrics.jsonl in'):
    visualize.visualize(str(tmp_path), str(tmp_path / 'out'))


@pytest.fixture
def kept_figures(monkeypatch):
  """The figures the plot functions draw, kept open instead of saved."""
  figures = []
  monkeypatch.setattr(visualize, '_save', lambda fig, path: figures.append(fig) or path)
  yield figures
  for fig in figures:
    matplotlib.pyplot.close(fig)


def _synthetic_data(rng, images=4, heads=2, slots=3, tokens=4):
  """What `collect` returns for one layer, made up: gates within ±10% of the uniform 1/k, and
  energies that retrieval lowers a hundredfold."""
  selections = (rng.random((heads, slots, images, tokens)) < 0.6).astype(np.float32)
  k = 64
  gates = selections * rng.uniform(0.9, 1.1, selections.shape) / k
  before = rng.uniform(30, 35, (images, tokens))
  return {'images': rng.integers(0, 255, (images, 64, 64, 1), dtype=np.uint8),
          'labels': np.zeros(images, int), 'predictions': np.ones(images, int),
          'mask': np.ones(images, bool), 'question': None,
          'layers': [{'selections': selections, 'gates': gates, 'energy_before': before,
                      'energy_after': before / 200 + rng.uniform(0, 0.02, before.shape)}]}


def test_gate_labels_sit_in_patch_corners_as_multiples_of_uniform(kept_figures):
  config = load_config('triangle', 'quick')  # 64×64 images, patch 32, k = 64
  data = _synthetic_data(np.random.default_rng(0))
  visualize.plot_bottleneck_selection(config, data, 'unused.png', 4, step=1)
  (fig,) = kept_figures
  layer = data['layers'][0]
  slot_axes = [ax for ax in fig.axes if ax.get_label() != '<colorbar>' and ax.get_subplotspec()
               and ax.get_subplotspec().colspan.start > 0]
  labels = [t for ax in slot_axes for t in ax.texts]
  assert labels
  relative = {round(float(g) * 64, 3) for g in layer['gates'][layer['selections'] > 0]}
  for text in labels:
    x, y = getattr(text, 'xy', None) or text.get_position()  # an annotation's anchor
    assert x % 32 == 0 and y % 32 == 0, (x, y)  # a patch's corner, not its centre
    assert float(text.get_text()) in relative  # gate × k, e.g. 1.037, not 0.016
  assert len({t.get_text() for t in labels}) > 1
  # One slim colourbar per column, beside it: no wide gap between the columns of images.
  bars = [ax for ax in fig.axes if ax.get_label() == '<colorbar>']
  assert len(bars) == 1 + visualize.SLOTS_SHOWN
  fig.canvas.draw()
  columns = sorted({(round(ax.get_position().x0, 3), round(ax.get_position().x1, 3))
                    for ax in fig.axes if ax.get_label() != '<colorbar>'})
  gaps = [b[0] - a[1] for a, b in zip(columns, columns[1:])]
  assert len(gaps) == visualize.SLOTS_SHOWN and max(gaps) < 0.1, gaps


def test_energy_scatter_axes_follow_the_tokens(kept_figures):
  data = _synthetic_data(np.random.default_rng(1))
  visualize.plot_hopfield_energy(data, 'unused.png', step=1)
  (fig,) = kept_figures
  scatter = fig.axes[0]
  before = data['layers'][0]['energy_before']
  after = data['layers'][0]['energy_after']
  for (lo, hi), values in ((scatter.get_xlim(), before), (scatter.get_ylim(), after)):
    span = values.max() - values.min()
    assert lo <= values.min() and values.max() <= hi
    assert hi - lo <= 1.11 * span  # not stretched to a y = x across both ranges
  assert 'y = x lies above these axes' in [t.get_text() for t in scatter.get_legend().texts]


def test_training_curves_show_the_train_split_beside_the_test_split(tmp_path, monkeypatch):
  figures = []
  monkeypatch.setattr(visualize, '_save', lambda fig, path: figures.append(fig) or path)
  metrics = {'train': {s: {'loss': 1.0, 'ce_loss': 0.9, 'accuracy': 0.5, 'learning_rate': 1e-3,
                           'balance_loss': 0.1} for s in (10, 20)},
             'eval': {10: {'loss': 0.8, 'accuracy': 0.6}, 20: {'loss': 0.7, 'accuracy': 0.65}},
             'eval_train': {10: {'loss': 0.5, 'accuracy': 0.7}, 20: {'loss': 0.3, 'accuracy': 0.9}}}
  visualize.plot_training_curves(metrics, str(tmp_path / 'curves.png'))
  accuracy = next(ax for ax in figures[0].axes if ax.get_title() == 'accuracy')
  lines = {line.get_label(): list(line.get_ydata()) for line in accuracy.get_lines()}
  assert lines == {'training batches': [0.5, 0.5], 'train split, evaluated': [0.7, 0.9],
                   'test split': [0.6, 0.65]}
