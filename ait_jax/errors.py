"""The exceptions that mean "the user can fix this", at the bottom of the package.

A command (ait_jax/cli.py) prints a UserError as one line `error: ...` and exits 2; any other
exception is a bug and keeps its traceback. The library raises these types and never imports the
command layer, so a mistake is recognised by what was raised, not by where.
"""


class UserError(Exception):
  """Something the user can fix (busy workdir, damaged data, non-finite training); one line."""


class ConfigError(UserError, ValueError):
  """A config field or flag with a value that cannot work. Also a ValueError, the type Python
  gives a bad value, so callers and tests that catch ValueError keep catching it."""


class InputError(UserError, ValueError):
  """A file or folder the user named that cannot be used as it is (the wrong kind, damaged, or
  not the one the config expects); a ValueError like ConfigError."""


def one_line(text: object) -> str:
  """`text` with its line breaks and runs of spaces folded: an error line, or a reason quoted in
  one."""
  return ' '.join(str(text).split())
