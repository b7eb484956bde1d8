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


def test_gate_colours_are_centred_on_uniform_and_labelled_in_corners(kept_figures):
  config = load_config('triangle', 'quick')  # 64×64 images, patch 32, k = 64
  rng = np.random.default_rng(0)
  data = _synthetic_data(rng)
  layer = data['layers'][0]
  # Gates within ±2% of uniform, as in a trained run: the scale must not stretch them.
  layer['gates'] = layer['selections'] * rng.uniform(0.98, 1.02, layer['gates'].shape) / 64
  visualize.plot_bottleneck_selection(config, data, 'unused.png', 4, step=1)
  (fig,) = kept_figures
  images = [ax for ax in fig.axes if ax.get_label() != '<colorbar>']
  slot_rows = [ax for ax in images if ax.get_subplotspec().rowspan.start > 0]
  labels = [t for ax in slot_rows for t in ax.texts]
  assert labels
  relative = [float(g) * 64 for g in layer['gates'][layer['selections'] > 0]]
  for text in labels:
    x, y = getattr(text, 'xy', None) or text.get_position()  # an annotation's anchor
    assert x % 32 == 0 and y % 32 == 0, (x, y)  # a patch's corner, not its centre
    percent = float(text.get_text().rstrip('%'))  # gate × k − 1 in percent, e.g. +1.3%
    assert min(abs(1 + percent / 100 - r) for r in relative) < 6e-4, text.get_text()
  # The gate colour scale is centred on uniform and spans at least ±GATE_SCALE.
  bars = [ax for ax in fig.axes if ax.get_label() == '<colorbar>']
  assert len(bars) == 2  # one for the selection counts, one for the slots' gates
  lo, hi = bars[1].get_ylim()
  assert lo == -hi and hi >= 100 * visualize.GATE_SCALE, (lo, hi)
  # Rows are labelled horizontally, images are columns titled by their caption, and the
  # images fill the width (no empty right margin).
  first = [ax for ax in images if ax.get_subplotspec().colspan.start == 0]
  assert all(ax.yaxis.label.get_rotation() == 0 for ax in first)
  assert 'test image 0' in images[0].get_title()
  assert 'the 2 (head, slot) pairs that put the most gate weight' in fig._suptitle.get_text()
  fig.canvas.draw()
  left = min(ax.get_position().x0 for ax in images)
  right = max(ax.get_position().x1 for ax in images)
  assert right - left > 0.6, (left, right)


def test_energy_joins_each_token_on_a_log_scale(kept_figures):
  data = _synthetic_data(np.random.default_rng(1))
  visualize.plot_hopfield_energy(data, 'unused.png', step=1)
  (fig,) = kept_figures
  (ax,) = [a for a in fig.axes if a.get_visible() and a.has_data()]  # one panel: no histogram
  before = data['layers'][0]['energy_before'].reshape(-1)
  after = data['layers'][0]['energy_after'].reshape(-1)
  assert ax.get_yscale() == 'log'
  lo, hi = ax.get_ylim()
  assert lo <= after.min() and before.max() <= hi  # both ends of every token on the axes
  assert len(ax.get_lines()) == before.size  # one line per token, before to after
  assert 'do not rise' in ax.get_title()


def test_memory_similarity_gives_the_value_at_initialisation(kept_figures):
  rng = np.random.default_rng(2)
  # The reference: E|cos| of random directions, which is what N(0, 1) slots start at.
  a, b = rng.normal(size=(2, 20_000, 32))
  sampled = np.abs(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
  sampled = sampled.mean()
  assert abs(visualize.random_mean_abs_cos(32) - sampled) < 0.005
  memory = {'block0': {'workspace': {'slots': rng.normal(size=(8, 32))}}}
  visualize.plot_memory_similarity(memory, 'unused.png', step=1)
  (fig,) = kept_figures
  assert f'initialisation, independent N(0, 1) slots in 32 dimensions: ' \
         f'{visualize.random_mean_abs_cos(32):.2f}' in fig.axes[0].get_title()


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
