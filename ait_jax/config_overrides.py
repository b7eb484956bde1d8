"""Config overrides as the command line spells them: `--config.<field>=<value>`, the one form that
`cli.load_config`, the reproduce and compile commands' printed commands, and the resume refusal's
suggested flag all share."""
from typing import Iterable, Mapping


def as_flags(overrides: Mapping[str, object] | Iterable[str]) -> list[str]:
  """{'model.depth': 2, 'question_types': ('a', 'b')} -> ['--config.model.depth=2', ...]."""
  if not isinstance(overrides, Mapping):
    return list(overrides)
  out = []
  for key, value in overrides.items():
    if isinstance(value, tuple):  # a tuple literal, as ml_collections parses tuple fields
      value = '(' + ','.join(f'"{x}"' for x in value) + ',)'
    out.append(f'--config.{key}={value}')
  return out
