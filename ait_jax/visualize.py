"""Figures of a trained run: which patches the memory slots select, how alike the slots are, the
Hopfield energy before and after retrieval, and the training curves.

Usage: python -m ait_jax.visualize --workdir=DIR --out=DIR [--config=configs/x.py[:variant]]
  [--num_images=4] [--checkpoint=best|latest]
Writes bottleneck_selection.png, memory_similarity.png, hopfield_energy.png and training_curves.png,
each 1280×960 pixels (FIGSIZE inches at DPI). Without --config, <workdir>/config.json is used.
"""
import functools
import json
import math
import os

from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import patches as mpatches  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from ait_jax import cli  # pylint: disable=wrong-import-position
from ait_jax import config_lib  # pylint: disable=wrong-import-position
from ait_jax import errors  # pylint: disable=wrong-import-position
from ait_jax import metric_writer  # pylint: disable=wrong-import-position
from ait_jax import train  # pylint: disable=wrong-import-position
from ait_jax import workspace  # pylint: disable=wrong-import-position
from ait_jax.data import input_pipeline  # pylint: disable=wrong-import-position
from ait_jax.data import sort_of_clevr as clevr  # pylint: disable=wrong-import-position
from ait_jax.data import triangle as tri  # pylint: disable=wrong-import-position

FIGSIZE = (12.8, 9.6)  # inches
DPI = 100  # FIGSIZE × DPI = 1280×960 pixels for every figure
FIGURES = ('bottleneck_selection.png', 'memory_similarity.png', 'hopfield_energy.png',
           'training_curves.png')
SLOTS_SHOWN = 2  # individual (head, slot) columns per layer in bottleneck_selection.png
MAX_LAYERS_WITH_SLOTS = 2  # deeper models show only the all-slot overview per layer
MAX_ANNOTATED_PATCHES = 16  # write the count on each patch when the grid is this small


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file[:variant], with the --config.x overrides the run was '
      'trained with; default: <workdir>/config.json.', lock_config=True, flag_values=fv)
  flags.DEFINE_string('workdir', None, 'A training workdir (checkpoints, metrics).',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'Folder for the PNG figures (created if missing).',
                      flag_values=fv)
  flags.DEFINE_integer('num_images', 4, 'Test images in bottleneck_selection.png.',
                       flag_values=fv)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint to restore.',
                    flag_values=fv)


def load_config(workdir: str, config: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """`config` if given, else the run's own config rebuilt from <workdir>/config.json."""
  if config is not None:
    return config
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No config.json in {workdir}; pass --config=configs/<dataset>.py '
                            '(with the overrides the run was trained with).')
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):  # valid JSON, but not a config
      raise ValueError(f'it holds a JSON {type(saved).__name__}, not an object')
  except ValueError as e:  # a damaged file raises deep inside json
    raise errors.InputError(f'{path} is not a config ({e}); pass --config=configs/<dataset>.py '
                            'instead.') from None
  # A run saved before a field of base_config existed (device_data, steps_per_call, ...) ran
  # with that field's default: the library reads every such field as an attribute.
  return ml_collections.ConfigDict({**config_lib.base_config().to_dict(), **saved})


def read_metrics(workdir: str) -> dict[str, dict[int, dict]]:
  """metrics.jsonl as {split: {step: record}}; a resumed run's repeated steps keep the last."""
  path = os.path.join(workdir, metric_writer.METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No metrics.jsonl in {workdir}; train first with the same --workdir.')
  out = {'train': {}, 'eval': {}}
  for record in metric_writer.read_metrics(path):  # skips a torn or undecodable line, warning once
    out.setdefault(record['split'], {})[record['step']] = record
  if not out['train']:
    raise errors.InputError(
        f'{path} holds no training metrics; train for at least log_every_steps.')
  return out


def restore(config: ml_collections.ConfigDict, workdir: str, which: str = 'best'):
  """(trainer, step, state) for the run in workdir; the trainer's model writes memory at eval.

  The bottleneck selection only exists when the memory is written, so the model is rebuilt with
  eval_writes_memory=True (the reference protocol, docs/model.md#batch-dependence); the parameters are unchanged.
  """
  config = config.copy_and_resolve_references()
  if config.model.vit:
    raise errors.ConfigError('model.vit=True has no memory to visualise; pick an AiT run.')
  config.model.eval_writes_memory = True
  trainer = train.Trainer(config)
  step, state = trainer.restore(workdir, which)
  return trainer, step, state


def collect(trainer, state) -> dict:
  """Runs the restored model on the first test batch and gathers what the figures need.

  The batch has the training batch size, so in scope 'batch' the top-k competes over as many
  tokens as in training. Returns host arrays: 'images' uint8 [B, H, W, C] as stored, 'labels',
  'predictions' [B], 'question' or None, and per layer 'selections' [Hm, M, B, N] (1 where the
  slot's top-k holds the token), 'gates' [Hm, M, B, N], 'energy_before'/'energy_after' [B, N].
  """
  s, c = trainer.s, trainer.s.config
  batches = input_pipeline.make_eval_iterator(
      c.dataset, data_dir=c.data_dir, global_batch_size=c.batch_size,
      sharding=trainer.batch_sharding, question_types=tuple(c.question_types) or None)
  batch = next(batches)
  batches.close()
  images = s.preprocess(batch['image'], None, train=False)
  question = batch.get('question')
  apply = jax.jit(functools.partial(s.model.apply, train=False,
                                    mutable=['memory', 'intermediates']))
  (logits, _), new_vars = apply({'params': state.params, 'memory': state.memory}, images,
                                question)
  inter = jax.device_get(new_vars['intermediates'])
  b = batch['image'].shape[0]
  layers = []
  for i in range(s.model.depth):
    sown = inter[f'block{i}']['workspace']
    indices = sown.get('bottleneck_indices', (None,))[0]
    weights = sown['bottleneck_weights'][0]
    before, after = sown['energy_before'][0], sown['energy_after'][0]
    n = before.shape[1]
    g, hm, m, _ = weights.shape
    if indices is None:  # dense write ('no_bottleneck'): every token is selected
      selections = np.ones((hm, m, b * n), np.float32)
      gates = np.asarray(workspace.dense_gates(workspace.BottleneckOutput(
          None, None, jnp.asarray(weights), None, None)))
    else:
      # dense_gates reads the group size from `importance` [Hm, T]; zeros stand in for it.
      out = workspace.BottleneckOutput(None, jnp.asarray(indices), jnp.asarray(weights),
                                       jnp.zeros((hm, b * n)), None)
      gates = np.asarray(workspace.dense_gates(out))
      selections = np.asarray(workspace.dense_gates(out._replace(
          weights=jnp.ones_like(out.weights))))
    # Token t of the squashed batch is token t % N of image t // N (groups are whole images).
    layers.append({
        'selections': selections.reshape(hm, m, b, n),
        'gates': gates.reshape(hm, m, b, n) * g,  # undo the 1/G of scope 'example'
        'energy_before': np.asarray(before, np.float64),
        'energy_after': np.asarray(after, np.float64),
    })
  host = jax.device_get({'image': batch['image'], 'label': batch['label'],
                         'mask': batch['mask'], 'logits': logits})
  return {'images': host['image'], 'labels': host['label'], 'mask': host['mask'],
          'predictions': np.argmax(host['logits'], -1),
          'question': None if question is None else np.asarray(jax.device_get(question)),
          'layers': layers}


def _new_figure(rows: int, cols: int, layout: str = 'constrained'):
  # 'compressed' suits grids of images: it closes the gaps that their fixed aspect leaves.
  fig, axes = plt.subplots(rows, cols, figsize=FIGSIZE, dpi=DPI, squeeze=False, layout=layout)
  return fig, axes


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=DPI)  # no bbox_inches='tight': it would change the pixel size
  plt.close(fig)
  return path


def _grid(n: int) -> tuple[int, int]:
  cols = math.ceil(math.sqrt(n))
  return math.ceil(n / cols), cols


def _caption(config, data: dict, i: int) -> str:
  base = config.dataset.partition('/')[0]
  label, pred = int(data['labels'][i]), int(data['predictions'][i])
  if base == 'triangle':
    names = tri.LABEL_NAMES
  elif base == 'sort_of_clevr':
    names = clevr.ANSWERS
  else:
    names = [str(k) for k in range(max(label, pred) + 1)]
  text = f'test image {i}\ntrue {names[label]}, predicted {names[pred]}'
  if data['question'] is not None:
    text = clevr.question_in_words(data['question'][i]) + '\n' + text
  return text


def _show_image(ax, image: np.ndarray) -> None:
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=255,
            extent=(0, image.shape[1], image.shape[0], 0))
  ax.set_xticks([])
  ax.set_yticks([])


def plot_bottleneck_selection(config, data: dict, path: str, num_images: int,
                              step: int) -> str:
  """Rows: test images. Per layer, the number of (head, slot) pairs whose top-k holds each patch,
  then (for shallow models) the most selective individual slots: their selected patches outlined,
  coloured by gate weight relative to the uniform 1/k, the value in the patch's corner."""
  patch = config.model.patch_size
  k = config.model.bottleneck_k
  h, w = data['images'].shape[1:3]
  gh, gw = h // patch, w // patch
  depth = len(data['layers'])
  slots = SLOTS_SHOWN if depth <= MAX_LAYERS_WITH_SLOTS else 0
  fig, axes = _new_figure(num_images, depth * (1 + slots), layout='compressed')
  hm, m = data['layers'][0]['selections'].shape[:2]
  for layer, d in enumerate(data['layers']):
    n = d['selections'].shape[-1]
    extra = n - gh * gw  # question / CLS tokens come before the patches
    counts = d['selections'][:, :, :num_images].sum(axis=(0, 1))  # [images, N]
    col = layer * (1 + slots)
    vmax = max(float(counts[:, extra:].max()), 1.0)
    for i in range(num_images):
      ax = axes[i, col]
      _show_image(ax, data['images'][i])
      grid = counts[i, extra:].reshape(gh, gw)
      im = ax.imshow(grid, cmap='viridis', alpha=0.6, vmin=0, vmax=vmax,
                     extent=(0, gw * patch, gh * patch, 0), interpolation='nearest')
      if gh * gw <= MAX_ANNOTATED_PATCHES:
        for r in range(gh):
          for q in range(gw):
            _corner_label(ax, q * patch, r * patch, f'{int(grid[r, q])}')
      if extra:
        ax.set_xlabel(f'non-patch tokens: {int(counts[i, :extra].sum())} selections',
                      fontsize=7)
      if col == 0:
        ax.set_ylabel(_caption(config, data, i), fontsize=7)
      if i == 0:
        ax.set_title(f'layer {layer}: selections per patch\n(of {hm} heads × {m} slots)',
                     fontsize=9)
    _colorbar(fig, im, axes[:, col], '(head, slot) pairs selecting the patch')
    # The (head, slot) pairs with the most gate mass on the shown patches.
    mass = d['gates'][:, :, :num_images, extra:].sum(axis=(2, 3)).reshape(-1)
    for j, flat in enumerate(np.argsort(-mass, kind='stable')[:slots]):
      head, slot = divmod(int(flat), m)
      # The softmax over a slot's k winners is close to uniform, so weights are shown as
      # multiples of 1/k, coloured over this slot's own range on the shown images.
      relative = d['gates'][head, slot, :num_images, extra:] * k
      selected = d['selections'][head, slot, :num_images, extra:] > 0
      lo, hi = ((float(relative[selected].min()), float(relative[selected].max()))
                if selected.any() else (1.0, 1.0))
      colours = matplotlib.colors.Normalize(lo, hi if hi > lo else lo + 1e-6)
      for i in range(num_images):
        ax = axes[i, col + 1 + j]
        _show_image(ax, data['images'][i])
        for t in np.nonzero(selected[i])[0]:
          r, q = divmod(int(t), gw)
          colour = plt.cm.autumn(colours(relative[i, t]))  # red to yellow: both show on black
          ax.add_patch(mpatches.Rectangle(
              (q * patch, r * patch), patch, patch, fill=True, facecolor=(*colour[:3], 0.15),
              edgecolor=colour, linewidth=3))
          if gh * gw <= MAX_ANNOTATED_PATCHES:
            _corner_label(ax, q * patch, r * patch, f'{relative[i, t]:.3f}')
        ax.set_xlabel(f'patches selected: {int(selected[i].sum())}', fontsize=7)
        if i == 0:
          ax.set_title(f'layer {layer}, head {head}, slot {slot}: selected patches,\n'
                       f'gate × k (1 = uniform), {lo:.3f} to {hi:.3f}', fontsize=9)
      _colorbar(fig, matplotlib.cm.ScalarMappable(colours, 'autumn'), axes[:, col + 1 + j],
                'gate weight × k', fmt='%.3f')
  fig.suptitle(f'Bottleneck selection: top-k = {k} per slot over the tokens of a test batch '
               f'of {data["images"].shape[0]} (bottleneck_scope '
               f'{config.model.bottleneck_scope!r}), step {step}; the first {num_images} images')
  return _save(fig, path)


def _colorbar(fig, mappable, axes, label: str, fmt: str | None = None) -> None:
  """A slim colourbar beside `axes`, half their height, with few ticks."""
  bar = fig.colorbar(mappable, ax=axes, shrink=0.5, aspect=30, pad=0.01, format=fmt)
  bar.locator = matplotlib.ticker.MaxNLocator(5)
  bar.update_ticks()
  bar.ax.tick_params(labelsize=7)
  bar.set_label(label, fontsize=8)


def _corner_label(ax, x: float, y: float, text: str) -> None:
  """`text` in the top-left corner of the patch at (x, y), on a dark box: off the patch's centre,
  where the objects usually are."""
  ax.annotate(text, (x, y), xytext=(2, -2), textcoords='offset points', ha='left', va='top',
              color='white', fontsize=7, bbox=dict(boxstyle='square,pad=0.15', facecolor='black',
                                                   alpha=0.6, linewidth=0))


def memory_similarity(slots: np.ndarray) -> np.ndarray:
  """Cosine similarity [M, M] of the memory slots [M, Dm]."""
  x = np.asarray(slots, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x @ x.T


def plot_memory_similarity(memory, path: str, step: int) -> str:
  """One heatmap per layer of the cosine similarity between the stored memory slots."""
  depth = len(memory)
  rows, cols = _grid(depth)
  fig, axes = _new_figure(rows, cols)
  for ax in axes.flat[depth:]:
    ax.axis('off')
  for layer in range(depth):
    sim = memory_similarity(memory[f'block{layer}']['workspace']['slots'])
    off = sim[~np.eye(len(sim), dtype=bool)]
    ax = axes.flat[layer]
    im = ax.imshow(sim, cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
    ax.set_title(f'layer {layer}: mean |cos| between distinct slots {np.abs(off).mean():.2f}',
                 fontsize=10)
    ax.set_xlabel('memory slot')
    ax.set_ylabel('memory slot')
    fig.colorbar(im, ax=ax, shrink=0.8, label='cosine similarity')
  fig.suptitle(f'Cosine similarity of the {len(sim)} stored memory slots, step {step}')
  return _save(fig, path)


def plot_hopfield_energy(data: dict, path: str, step: int) -> str:
  """Per layer, each token's Hopfield energy after retrieval against before (with y = x), and
  the histograms of both."""
  depth = len(data['layers'])
  rows, cols = _grid(depth)
  fig, axes = _new_figure(rows, 2 * cols)
  for ax in axes.flat[2 * depth:]:
    ax.axis('off')
  for layer, d in enumerate(data['layers']):
    before, after = d['energy_before'].reshape(-1), d['energy_after'].reshape(-1)
    ax, hist = axes.flat[2 * layer], axes.flat[2 * layer + 1]
    ax.scatter(before, after, s=6, alpha=0.5, label=f'{before.size} tokens')
    lo, hi = min(before.min(), after.min()), max(before.max(), after.max())
    # The axes follow the tokens, not y = x: retrieval can lower the energy by orders of
    # magnitude, and a diagonal spanning both ranges squashes the tokens into a strip.
    ax.set_xlim(*_padded(before))
    ax.set_ylim(*_padded(after))
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    if max(x0, y0) < min(x1, y1):  # some of y = x lies inside the axes
      ax.plot([x0, x1], [x0, x1], 'k--', linewidth=1, label='y = x (no change)')
    else:
      ax.plot([], [], ' ', label='y = x lies ' + ('above' if y1 <= x0 else 'below') +
              ' these axes')
    ax.set_xlabel('energy before retrieval E(s)')
    ax.set_ylabel('energy after retrieval E(r)')
    ax.set_title(f'layer {layer}: mean {before.mean():.3f} → {after.mean():.3f}\n'
                 f'{(after <= before).mean():.0%} of tokens do not increase', fontsize=10)
    ax.legend(loc='upper left')
    # The energy is non-negative; when it drops by orders of magnitude a log axis shows both.
    log = lo > 0 and hi / lo > 20
    bins = np.geomspace(lo, hi, 50) if log else np.linspace(lo, hi, 50)
    hist.hist(before, bins=bins, alpha=0.6, label='before retrieval')
    hist.hist(after, bins=bins, alpha=0.6, label='after retrieval')
    if log:
      hist.set_xscale('log')
    hist.set_xlabel('Hopfield energy' + (' (log scale)' if log else ''))
    hist.set_ylabel('tokens')
    hist.set_title(f'layer {layer}: energy distribution', fontsize=10)
    hist.legend()
  fig.suptitle(f'Hopfield energy of the tokens of a test batch of '
               f'{data["images"].shape[0]}, step {step}')
  return _save(fig, path)


def _padded(values: np.ndarray, margin: float = 0.05) -> tuple[float, float]:
  """The range of `values` widened by `margin` of its span (a tiny span gets a tiny margin)."""
  lo, hi = float(values.min()), float(values.max())
  pad = margin * (hi - lo) or margin * max(abs(lo), 1e-6)
  return lo - pad, hi + pad


def plot_training_curves(metrics: dict, path: str) -> str:
  """2×2: loss, accuracy, learning rate, balance loss against step. Loss and accuracy show the
  training batches, the evaluation of the train-split subset (split 'eval_train': a gap to the
  test split is memorisation) and the test split."""
  fig, axes = _new_figure(2, 2)
  panels = (('loss', [('train', 'loss', 'train loss (CE + balance)'),
                      ('train', 'ce_loss', 'train CE loss'),
                      ('eval_train', 'loss', 'train split, evaluated: CE loss'),
                      ('eval', 'loss', 'test split: CE loss')]),
            ('accuracy', [('train', 'accuracy', 'training batches'),
                          ('eval_train', 'accuracy', 'train split, evaluated'),
                          ('eval', 'accuracy', 'test split')]),
            ('learning rate', [('train', 'learning_rate', 'learning rate')]),
            ('balance loss', [('train', 'balance_loss', 'balance loss (sum over layers)')]))
  colors = {'train': 'C0', 'eval_train': 'C1', 'eval': 'C2'}  # one colour per split in each panel
  for ax, (title, series) in zip(axes.flat, panels):
    for split, key, label in series:
      points = sorted((s, r[key]) for s, r in metrics.get(split, {}).items() if key in r)
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker='o', markersize=3, label=label, color=colors[split],
                linestyle='--' if key == 'ce_loss' else '-')
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend()
  fig.suptitle('Training curves (metrics.jsonl)')
  return _save(fig, path)


def visualize(workdir: str, out: str, *, config: ml_collections.ConfigDict | None = None,
              num_images: int = 4, which: str = 'best') -> dict:
  """Writes the four figures into `out`; returns {'paths': [...], 'step': int, 'data': ...}."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'No workdir {workdir}; pass the --workdir of a training run.')
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.InputError(f'--out={out} is a file; pass a folder for the figures.')
  metrics = read_metrics(workdir)
  config = load_config(workdir, config)
  if num_images < 1 or num_images > config.batch_size:
    raise errors.ConfigError(f'num_images={num_images} must be between 1 and batch_size='
                             f'{config.batch_size}.')
  trainer, step, state = restore(config, workdir, which)
  data = collect(trainer, state)
  num_images = min(num_images, int(data['mask'].sum()))
  os.makedirs(out, exist_ok=True)
  memory = jax.device_get(state.memory)
  paths = [
      plot_bottleneck_selection(trainer.s.config, data, os.path.join(out, FIGURES[0]),
                                num_images, step),
      plot_memory_similarity(memory, os.path.join(out, FIGURES[1]), step),
      plot_hopfield_energy(data, os.path.join(out, FIGURES[2]), step),
      plot_training_curves(metrics, os.path.join(out, FIGURES[3])),
  ]
  return {'paths': paths, 'step': step, 'data': data}


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'workdir', hint='DIR (a training run)')
  cli.require(fv, 'out', hint='DIR (for the figures)')
  result = visualize(fv.workdir, fv.out, config=fv.config, num_images=fv.num_images,
                     which=fv.checkpoint)
  print(f'Figures of step {result["step"]}:')
  for path in result['paths']:
    print(path, flush=True)


if __name__ == '__main__':
  cli.run(define_flags, main)
