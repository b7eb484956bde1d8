"""The show command draws generated examples with their question and answer in words."""
import matplotlib.colors
import matplotlib.image
import numpy as np

from ait_jax.data import show


def test_show_writes_a_grid_from_the_generators(tmp_path):
  items = show.examples('sort_of_clevr', 6, data_dir=None, seed=1)
  assert len(items) == 6 and all('?' in caption and '→' in caption for _, caption in items)
  assert show.examples('triangle', 2, data_dir=None)[0][1] in ('equilateral', 'random')
  out = tmp_path / 'grid.png'
  show.save_grid(items, str(out))
  assert out.stat().st_size > 1000


def test_every_image_has_a_frame(tmp_path):
  """White-background images need a border, or their objects seem to belong to the next one."""
  items = show.examples('sort_of_clevr', 3, data_dir=None, seed=1)
  out = tmp_path / 'grid.png'
  show.save_grid(items, str(out))
  pixels = matplotlib.image.imread(out)[..., :3]
  frame = np.array(matplotlib.colors.to_rgb(show.FRAME_COLOUR))
  on_frame = np.all(np.abs(pixels - frame) < 0.02, axis=-1)
  # Each image's frame: its four sides, about 2 pixels wide; Sort-of-CLEVR draws no such grey.
  side = pixels.shape[0] * 0.8
  assert on_frame.sum() > len(items) * 4 * side * 1.5, on_frame.sum()
