"""Local paths: a flag's `~` expanded for every command, and, for the checks that refuse a workdir,
data_dir or output path before anything is written, the nearest part of a path that exists (which
decides whether it can be created)."""
import os


def nearest_existing(path: str) -> str:
  """The absolute `path` itself when it exists, else its nearest ancestor that does (at worst
  the root)."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing


def expand_home_args(argv: list[str]) -> list[str]:
  """argv with a leading `~` in a flag's value expanded, as the shell does for a word of its own:
  bash expands `--workdir ~/x` but not `--workdir=~/x` (nor `--config.data_dir=~/x`), which would
  otherwise make a folder literally named `~` in the current folder while TFDS, which expands it
  itself, writes into the home folder. Every command's flags pass through here (cli.parse_flags),
  so each path flag means the same folder for every part of a run."""
  out = []
  for arg in argv:
    flag, eq, value = arg.partition('=')
    if eq and flag.startswith('-') and value.startswith('~'):
      arg = f'{flag}={os.path.expanduser(value)}'
    out.append(arg)
  return out
