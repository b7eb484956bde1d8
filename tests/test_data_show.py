"""The show command draws generated examples with their question and answer in words."""
from ait_jax.data import show


def test_show_writes_a_grid_from_the_generators(tmp_path):
  items = show.examples('sort_of_clevr', 6, data_dir=None, seed=1)
  assert len(items) == 6 and all('?' in caption and '→' in caption for _, caption in items)
  assert show.examples('triangle', 2, data_dir=None)[0][1] in ('equilateral', 'random')
  out = tmp_path / 'grid.png'
  show.save_grid(items, str(out))
  assert out.stat().st_size > 1000
