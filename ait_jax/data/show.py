"""Writes a grid of examples with their label, or question and answer, in words, to check by eye.

Usage: python -m ait_jax.data.show --dataset=sort_of_clevr --out=FILE.png [--data_dir=DIR]
Without --data_dir, triangle and sort_of_clevr are generated on the fly from --seed.
"""
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from ait_jax import cli  # pylint: disable=wrong-import-position
from ait_jax import errors
from ait_jax.data import datasets
from ait_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from ait_jax.data import sort_of_clevr as clevr  # pylint: disable=wrong-import-position
from ait_jax.data import triangle as tri  # pylint: disable=wrong-import-position

FRAME_COLOUR = '#606060'  # the border drawn around each example's image
FRAME_WIDTH = 1.5  # points


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  flags.DEFINE_string('dataset', None, f'One of {sorted(datasets.DATASETS)}.',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'PNG file to write.', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'Read a prepared dataset from here.', flag_values=fv)
  flags.DEFINE_string('split', 'train', 'Split to read with --data_dir.', flag_values=fv)
  flags.DEFINE_integer('num', 16, 'Number of examples.', lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Seed when generating without --data_dir.', flag_values=fv)


def examples(name: str, num: int, data_dir: str | None, split: str = 'train',
             seed: int = 0) -> list[tuple[np.ndarray, str]]:
  """(image uint8 [H, W, C], caption) pairs, read from data_dir or generated from seed."""
  base = name.partition('/')[0]
  if data_dir is None:
    if base == 'triangle':
      d = tri.generate(num, seed)
      return [(d['image'][i], tri.LABEL_NAMES[d['label'][i]]) for i in range(num)]
    if base == 'sort_of_clevr':
      d = clevr.generate(-(-num // 3), seed)
      rng = np.random.default_rng(seed)
      out = []
      for i in range(num):
        # One question of each type per image, so a small grid shows all three types.
        q = (i % 3) * clevr.QUESTIONS_PER_TYPE + int(rng.integers(clevr.QUESTIONS_PER_TYPE))
        out.append((d['image'][i // 3], _clevr_caption(d['questions'][i // 3, q],
                                                       d['answers'][i // 3, q])))
      return out
    raise errors.ConfigError(f'{name!r} is read from a prepared dataset; pass --data_dir.')
  info = datasets.get_info(name)
  source = input_pipeline.ExampleSource(info, split, data_dir)
  step = max(1, len(source) // num)
  out = []
  for i in range(0, step * num, step)[:num]:
    e = source[i]
    if info.has_question:
      out.append((e['image'], _clevr_caption(e['question'], e['label'])))
    elif base == 'triangle':
      out.append((e['image'], tri.LABEL_NAMES[e['label']]))
    else:
      out.append((e['image'], f'label {int(e["label"])}'))
  return out


def _clevr_caption(question: np.ndarray, answer: int) -> str:
  return f'{clevr.question_in_words(question)}\n→ {clevr.ANSWERS[int(answer)]}'


def save_grid(items: list[tuple[np.ndarray, str]], path: str) -> None:
  cols = min(4, len(items))
  rows = -(-len(items) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
  for ax in axes.flat[len(items):]:
    ax.axis('off')
  for ax, (image, caption) in zip(axes.flat, items):
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=255)
    ax.set_title(caption, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    # A frame on every image: white-background images would otherwise run into each other.
    for spine in ax.spines.values():
      spine.set(visible=True, color=FRAME_COLOUR, linewidth=FRAME_WIDTH)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(fv: flags.FlagValues) -> None:
  cli.require(fv, 'dataset', hint=f'NAME (one of {", ".join(sorted(datasets.DATASETS))})')
  cli.require(fv, 'out', hint='FILE.png')
  items = examples(fv.dataset, fv.num, fv.data_dir, fv.split, fv.seed)
  save_grid(items, fv.out)
  print(f'Wrote {fv.out}.')


if __name__ == '__main__':
  cli.run(define_flags, main)
