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
import textwrap

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
MAX_ROWS = 4  # rows of images in bottleneck_selection.png
MAX_LAYERS_SHOWN = 4  # deeper models: this many layers, first to last, in bottleneck_selection
GATE_SCALE = 0.1  # the gate colours span at least ±10% of the uniform weight 1/k
MAX_ENERGY_LINES = 512  # tokens drawn in hopfield_energy.png (a random subset of a large batch)


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
  text = f'test image {i}\ntrue {names[label]}\npredicted {names[pred]}'
  if data['question'] is not None:
    text = textwrap.fill(clevr.question_in_words(data['question'][i]), 30) + '\n' + text
  return text


def _show_image(ax, image: np.ndarray) -> None:
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=255,
            extent=(0, image.shape[1], image.shape[0], 0))
  ax.set_xticks([])
  ax.set_yticks([])


def _layers_shown(depth: int) -> list[int]:
  """Every layer of a shallow model; of a deep one MAX_LAYERS_SHOWN, first to last."""
  if depth <= MAX_LAYERS_SHOWN:
    return list(range(depth))
  return sorted({round(x) for x in np.linspace(0, depth - 1, MAX_LAYERS_SHOWN)})


def plot_bottleneck_selection(config, data: dict, path: str, num_images: int,
                              step: int) -> str:
  """Columns: test images. Per layer, a row with the number of (head, slot) pairs whose top-k
  holds each patch, then (for shallow models) a row for each of the SLOTS_SHOWN (head, slot)
  pairs that put the most gate weight on these images: their selected patches, coloured by how
  far the gate weight is from the uniform 1/k.

  The softmax over a slot's k winners is nearly uniform (gate × k within a few percent of 1), so
  the gate colours are centred on uniform (white) on a scale of at least ±GATE_SCALE: a tiny
  range stays pale instead of being stretched over the whole colour ramp; the figure states the
  actual range."""
  patch = config.model.patch_size
  k = config.model.bottleneck_k
  h, w = data['images'].shape[1:3]
  gh, gw = h // patch, w // patch
  depth = len(data['layers'])
  layers = _layers_shown(depth)
  # At most MAX_ROWS rows of images, so that they stay large: 2 slots for 1 layer, 1 for 2.
  slots = (min(SLOTS_SHOWN, MAX_ROWS // len(layers) - 1) if depth <= MAX_LAYERS_WITH_SLOTS
           else 0)
  hm, m = data['layers'][0]['selections'].shape[:2]
  extent = (0, gw * patch, gh * patch, 0)
  annotate = gh * gw <= MAX_ANNOTATED_PATCHES

  # Which (head, slot) pairs, and one gate scale for all of them: centred on uniform.
  chosen, deviation = {}, []
  for layer in layers:
    d = data['layers'][layer]
    extra = d['selections'].shape[-1] - gh * gw  # question / CLS tokens come before the patches
    mass = d['gates'][:, :, :num_images, extra:].sum(axis=(2, 3)).reshape(-1)
    chosen[layer] = [divmod(int(f), m) for f in np.argsort(-mass, kind='stable')[:slots]]
    for head, slot in chosen[layer]:
      picked = d['selections'][head, slot, :num_images, extra:] > 0
      deviation.append(d['gates'][head, slot, :num_images, extra:][picked] * k - 1)
  deviation = np.concatenate(deviation) if deviation else np.zeros(0)
  limit = max(GATE_SCALE, float(np.abs(deviation).max()) if deviation.size else 0.0)
  gate_norm = matplotlib.colors.Normalize(-100 * limit, 100 * limit)

  fig, axes = _new_figure(len(layers) * (1 + slots), num_images, layout='compressed')
  row = 0
  for layer in layers:
    d = data['layers'][layer]
    extra = d['selections'].shape[-1] - gh * gw
    per_token = d['selections'].sum(axis=(0, 1))  # [batch, N]: pairs selecting each token
    mean = float(per_token.mean())  # what every token would get if all were equally likely
    counts = per_token[:num_images, extra:]
    vmax = max(float(counts.max()), 2 * mean, 1.0)
    for i in range(num_images):
      ax = axes[row, i]
      _show_image(ax, data['images'][i])
      grid = counts[i].reshape(gh, gw)
      im = ax.imshow(grid, cmap='viridis', alpha=0.6, vmin=0, vmax=vmax, extent=extent,
                     interpolation='nearest')
      if annotate:
        for r in range(gh):
          for q in range(gw):
            _corner_label(ax, q * patch, r * patch, f'{int(grid[r, q])}')
      if extra:
        ax.set_xlabel(f'non-patch tokens: {int(per_token[i, :extra].sum())} selections',
                      fontsize=8)
      if layer == layers[0]:
        ax.set_title(_caption(config, data, i), fontsize=9)
    _row_label(axes[row, 0], f'layer {layer}\nselections\nper patch')
    _colorbar(fig, im, axes[row, :], f'(head, slot) pairs, of {hm * m};\nbatch mean {mean:.0f}')
    row += 1
    for j, (head, slot) in enumerate(chosen[layer]):
      relative = d['gates'][head, slot, :num_images, extra:] * k
      selected = d['selections'][head, slot, :num_images, extra:] > 0
      for i in range(num_images):
        ax = axes[row, i]
        _show_image(ax, data['images'][i])
        for t in np.nonzero(selected[i])[0]:
          r, q = divmod(int(t), gw)
          percent = 100 * (relative[i, t] - 1)
          ax.add_patch(mpatches.Rectangle(
              (q * patch, r * patch), patch, patch, facecolor=plt.cm.RdBu_r(gate_norm(percent)),
              alpha=0.6, edgecolor='none'))
          ax.add_patch(mpatches.Rectangle(  # the outline says "selected" whatever the colour
              (q * patch, r * patch), patch, patch, fill=False, edgecolor='lime', linewidth=2))
          if annotate:
            _corner_label(ax, q * patch, r * patch, f'{round(percent, 1) + 0.0:+.1f}%')  # no -0.0
        ax.set_xlabel(f'patches selected: {int(selected[i].sum())}', fontsize=8)
      _row_label(axes[row, 0], f'layer {layer}\nhead {head}, slot {slot}\n'
                 f'(#{j + 1} by gate\nweight here)')
      row += 1
    if slots:
      _colorbar(fig, matplotlib.cm.ScalarMappable(gate_norm, 'RdBu_r'),
                axes[row - slots:row, :], 'gate weight vs uniform 1/k (%)')
  shown = ('' if len(layers) == depth else
           f' Layers {", ".join(map(str, layers))} of {depth}.')
  slot_text = (f' Then the {slots} (head, slot) pair{"s" if slots > 1 else ""} that put the most '
               f'gate weight on these images (outlined: their selected patches; colour: '
               f'gate × k − 1, white = uniform; '
               f'shown here {100 * deviation.min():+.1f}% to {100 * deviation.max():+.1f}%).'
               if slots and deviation.size else '')
  fig.suptitle(textwrap.fill(
      f'Bottleneck selection, step {step}: each of {hm} heads × {m} slots keeps the top {k} '
      f'tokens of a test batch of {data["images"].shape[0]} (bottleneck_scope '
      f'{config.model.bottleneck_scope!r}). Rows: per layer, how many (head, slot) pairs select '
      f'each patch.{slot_text}{shown}', 160), fontsize=10)
  return _save(fig, path)


def _row_label(ax, text: str) -> None:
  """A row's label left of its first image, horizontal and readable."""
  ax.set_ylabel(text, rotation=0, ha='right', va='center', fontsize=9, labelpad=8)


def _colorbar(fig, mappable, axes, label: str, fmt: str | None = None) -> None:
  """A slim colourbar right of a row (or rows) of images, with few ticks."""
  bar = fig.colorbar(mappable, ax=axes, shrink=0.9, aspect=15, pad=0.02, format=fmt)
  bar.locator = matplotlib.ticker.MaxNLocator(5)
  bar.update_ticks()
  bar.ax.tick_params(labelsize=8)
  bar.set_label(label, fontsize=8)


def _corner_label(ax, x: float, y: float, text: str) -> None:
  """`text` in the top-left corner of the patch at (x, y), on a dark box: off the patch's centre,
  where the objects usually are."""
  ax.annotate(text, (x, y), xytext=(2, -2), textcoords='offset points', ha='left', va='top',
              color='white', fontsize=8, bbox=dict(boxstyle='square,pad=0.15', facecolor='black',
                                                   alpha=0.6, linewidth=0))


def memory_similarity(slots: np.ndarray) -> np.ndarray:
  """Cosine similarity [M, M] of the memory slots [M, Dm]."""
  x = np.asarray(slots, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x @ x.T


def memory_mean_abs_cos(memory) -> list[float]:
  """Per layer, the mean |cos| between distinct stored slots (1: every slot points the same way,
  a collapsed memory; about `random_mean_abs_cos` at initialisation)."""
  out = []
  for layer in range(len(memory)):
    sim = memory_similarity(np.asarray(memory[f'block{layer}']['workspace']['slots']))
    out.append(float(np.abs(sim[~np.eye(len(sim), dtype=bool)]).mean()))
  return out


def random_mean_abs_cos(dim: int) -> float:
  """E|cos| of two independent random directions in `dim` dimensions: Γ(d/2) / (√π Γ((d+1)/2)),
  about √(2 / (π d)). The memory starts as independent N(0, 1) slots (models.py), so this is the
  mean |cos| between distinct slots at initialisation, the reference for a trained memory."""
  return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


def plot_memory_similarity(memory, path: str, step: int) -> str:
  """One heatmap per layer of the cosine similarity between the stored memory slots, with the
  mean |cos| at initialisation beside the trained one."""
  depth = len(memory)
  rows, cols = _grid(depth)
  fig, axes = _new_figure(rows, cols)
  for ax in axes.flat[depth:]:
    ax.axis('off')
  for layer, mean_abs_cos in enumerate(memory_mean_abs_cos(memory)):
    slots = np.asarray(memory[f'block{layer}']['workspace']['slots'])
    sim = memory_similarity(slots)
    ax = axes.flat[layer]
    im = ax.imshow(sim, cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
    ax.set_title(f'layer {layer}: mean |cos| between distinct slots {mean_abs_cos:.2f}\n'
                 f'(expected at initialisation, independent N(0, 1) slots in '
                 f'{slots.shape[-1]} dimensions: {random_mean_abs_cos(slots.shape[-1]):.2f}; '
                 f'1 = the same direction)', fontsize=10)
    ax.set_xlabel('memory slot')
    ax.set_ylabel('memory slot')
    fig.colorbar(im, ax=ax, shrink=0.8, label='cosine similarity')
  fig.suptitle(f'Cosine similarity of the {len(sim)} stored memory slots, step {step}')
  return _save(fig, path)


def plot_hopfield_energy(data: dict, path: str, step: int) -> str:
  """Per layer, every token's Hopfield energy before retrieval E(s) joined by a line to its
  energy after E(r), on a log scale that holds both (one step usually lowers it by orders of
  magnitude): how far each token falls, and whether any rises."""
  depth = len(data['layers'])
  rows, cols = _grid(depth)
  fig, axes = _new_figure(rows, cols)
  for ax in axes.flat[depth:]:
    ax.axis('off')
  rng = np.random.default_rng(0)
  for layer, d in enumerate(data['layers']):
    b, a = d['energy_before'].reshape(-1), d['energy_after'].reshape(-1)
    ax = axes.flat[layer]
    shown = (np.arange(b.size) if b.size <= MAX_ENERGY_LINES else
             np.sort(rng.choice(b.size, MAX_ENERGY_LINES, replace=False)))
    rose = a[shown] > b[shown]
    for mask, colour in ((~rose, 'C0'), (rose, 'C3')):
      if mask.any():
        ax.plot(np.stack([np.zeros(mask.sum()), np.ones(mask.sum())]),
                np.stack([b[shown][mask], a[shown][mask]]), color=colour, alpha=0.2,
                linewidth=0.6)
    ax.scatter(np.zeros(shown.size), b[shown], s=8, color='black', zorder=3)
    ax.scatter(np.ones(shown.size), a[shown], s=8, color='black', zorder=3)
    positive = (b > 0).all() and (a > 0).all()
    if positive:
      ax.set_yscale('log')
    ax.set_xticks([0, 1], ['before retrieval E(s)', 'after retrieval E(r)'])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel('Hopfield energy' + (' (log scale)' if positive else ''))
    ax.grid(axis='y', alpha=0.3, which='both')
    for x, values in ((0, b), (1, a)):
      ax.annotate(f'median {np.median(values):.3g}\nrange {values.min():.3g} to '
                  f'{values.max():.3g}', (x, np.median(values)),
                  xytext=(-14 if x == 0 else 14, 0), textcoords='offset points',
                  ha='right' if x == 0 else 'left', va='center', fontsize=9,
                  bbox=dict(boxstyle='round', facecolor='white', alpha=0.8))
    fall = (f'E(s) / E(r) from {(b / a).min():.3g} to {(b / a).max():.3g}' if positive else
            f'E(s) − E(r) from {(b - a).min():.3g} to {(b - a).max():.3g}')
    ax.set_title(f'layer {layer}: {shown.size} of {b.size} tokens drawn; '
                 f'{(a <= b).mean():.1%} do not rise (a rise would be red)\n{fall}',
                 fontsize=10)
  fig.suptitle(f'Hopfield energy of each token of a test batch of {data["images"].shape[0]}, '
               f'step {step}, before and after its retrieval step\n(the step is the '
               'concave–convex update of this energy, so no token should rise)')
  return _save(fig, path)


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
