"""`model.init`: 'reference' starts every parameter as the published PyTorch code does, 'xavier'
is the project's earlier scheme (docs/model.md#init)."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ait_jax import models


def _params(init: str, **fields) -> dict[str, np.ndarray]:
  """Flat {path: value} of a width-256 AiT on 32×32 images (the fields override)."""
  cfg = dict(preset='small', width=256, mlp_dim=1024, num_heads=4, init=init, **fields)
  model = models.create_model(cfg, num_classes=10, image_shape=(32, 32, 3), batch_size=8)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                                         train=False))()
  flat = flax.traverse_util.flatten_dict(flax.core.unbox(variables['params']), sep='/')
  flat.update({f'memory/{k}': v for k, v in flax.traverse_util.flatten_dict(
      variables['memory'], sep='/').items()})
  return {k: np.asarray(v) for k, v in flat.items()}


def _fan_in(path: str, kernel_shape) -> int:
  """The in-features of the torch.nn.Linear a kernel stands for. A Dense kernel is [in, out];
  the cross-attention's query/key/value kernels are [D, heads, head_dim] (in = D) and its output
  kernel [heads, head_dim, D] (in = heads·head_dim)."""
  if '/cross_attention/' in path and not path.split('/')[-2] == 'out':
    return kernel_shape[0]
  return math.prod(kernel_shape[:-1])


def ks_uniform(x: np.ndarray, bound: float, c_alpha: float = 1.36) -> tuple[float, float]:
  """Kolmogorov–Smirnov statistic of x against U(-bound, bound), and its critical value (c_alpha
  1.36: 5%, 1.63: 1%)."""
  x = np.sort(x.ravel().astype(np.float64))
  n = len(x)
  cdf = np.clip((x + bound) / (2 * bound), 0, 1)
  d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  return d, c_alpha / math.sqrt(n)


def expected_rule(path: str, flat: dict) -> tuple[str, float]:
  """The published code's rule for one parameter: ('uniform', bound), ('ones', 0), ('zeros', 0)
  or ('normal', std)."""
  leaf, module = path.split('/')[-1], path.rsplit('/', 1)[0]
  if path.startswith('memory/') or leaf in ('posemb', 'cls'):
    return 'normal', 1.0  # torch.randn
  if leaf == 'scale':
    return 'ones', 0.0  # nn.LayerNorm
  if leaf == 'bias' and f'{module}/kernel' not in flat:
    return 'zeros', 0.0  # nn.LayerNorm's bias
  kernel = flat[f'{module}/kernel']
  return 'uniform', _fan_in(path, kernel.shape) ** -0.5  # nn.Linear: weight and bias


@pytest.mark.parametrize('fields', [{}, {'retrieval': 'cross_attention', 'posemb': 'learned',
                                          'head': 'cls'}], ids=['faithful', 'options'])
def test_reference_init_follows_the_published_rule_for_every_parameter(fields):
  flat = _params('reference', **fields)
  checked = set()
  for path, x in flat.items():
    rule, value = expected_rule(path, flat)
    if rule == 'uniform':
      assert np.abs(x).max() <= value, path
      # The draws fill the interval: a bound from another fan would leave a gap or overshoot.
      assert np.abs(x).max() >= value * (1 - 10 / x.size), path
    elif rule == 'ones':
      np.testing.assert_array_equal(x, 1, err_msg=path)
    elif rule == 'zeros':
      np.testing.assert_array_equal(x, 0, err_msg=path)
    else:
      assert abs(x.std() - value) < 5 / math.sqrt(x.size) + 0.02, path
    checked.add(rule)
  assert checked == {'uniform', 'ones', 'zeros', 'normal'}


def test_reference_init_is_uniform_on_a_large_layer_by_ks():
  """fc1 (256 → 1024, 262,144 weights) and the fused qkv (196,608) against U(±1/√256), and every
  bias of the model, each divided by its rule's bound, pooled (about 4,000 values) against
  U(±1), at 1%: one pooled test rather than one per bias (ten tests at 5% fail one by chance;
  here fc1's 1,024 biases alone sit at 1.1 times the 5% value, 0.9 times the 1% value)."""
  flat = _params('reference')
  for path in ('block0/ffn/fc1/kernel', 'block1/attn/qkv/kernel'):
    d, critical = ks_uniform(flat[path], expected_rule(path, flat)[1])
    assert d < critical, (path, d, critical)
  biases = [x.ravel() / rule[1] for path, x in flat.items()
            if path.endswith('/bias') and (rule := expected_rule(path, flat))[0] == 'uniform']
  d, critical = ks_uniform(np.concatenate(biases), 1.0, c_alpha=1.63)
  assert len(biases) == 10 and d < critical, (len(biases), d, critical)
  # The statistic has the power to see a wrong fan: fc2 (fan-in 1024) against fc1's bound.
  d, critical = ks_uniform(flat['block0/ffn/fc2/kernel'], 256 ** -0.5)
  assert d > 10 * critical


def test_xavier_is_the_earlier_scheme():
  flat = _params('xavier')
  kernel = flat['block0/ffn/fc1/kernel']
  bound = math.sqrt(6 / sum(kernel.shape))
  assert bound * 0.99 < np.abs(kernel).max() <= bound
  np.testing.assert_array_equal(flat['block0/ffn/fc1/bias'], 0)


def test_faithful_default_is_reference_and_other_values_are_refused():
  assert models.default_config().init == 'reference'
  with pytest.raises(ValueError, match=r"model.init='kaiming' is not one of 'reference', "
                                       r"'xavier'"):
    models.create_model(dict(init='kaiming'), num_classes=2, image_shape=(8, 8, 3))
