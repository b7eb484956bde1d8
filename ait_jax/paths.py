"""Local paths, for the checks that refuse a workdir, data_dir or output path before anything is
written: whether it can be created is decided by the nearest part of it that exists."""
import os


def nearest_existing(path: str) -> str:
  """The absolute `path` itself when it exists, else its nearest ancestor that does (at worst
  the root)."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing
