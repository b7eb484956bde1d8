"""ait_jax: the Associative Transformer (AiT) in JAX/Flax.

Model math lives in `workspace` and `hopfield`, the Linen modules in `models`. The pieces a
researcher reuses are importable from here (docs/library.md); each loads JAX and Flax on first
use, so `import ait_jax` itself stays cheap (the command-line entry points import it first).
"""
import importlib
from typing import TYPE_CHECKING

__version__ = '0.1.0'

_EXPORTS = {  # name -> the module that defines it
    'GlobalWorkspace': 'models',
    'AiT': 'models',
    'create_model': 'models',
    'default_config': 'models',
    'hopfield_retrieve': 'hopfield',
    'hopfield_energy': 'hopfield',
    'bottleneck_attention': 'workspace',
    'balance_loss': 'workspace',
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
  from ait_jax.hopfield import hopfield_energy, hopfield_retrieve  # noqa: F401
  from ait_jax.models import AiT, GlobalWorkspace, create_model, default_config  # noqa: F401
  from ait_jax.workspace import balance_loss, bottleneck_attention  # noqa: F401


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
