"""How every `python -m ait_jax.<command>` runs: one flag parser, one config loader, one rule for
errors (a user's mistake is one line `error: ...` on stderr and exit code 2; a bug keeps its
traceback).

An entry module defines `define_flags(fv)` (its flags, on the FlagValues it is given) and
`main(fv)`, and ends with `cli.run(define_flags, main)`. Tests call `cli.run(..., argv=[...])` in
process: each run gets fresh flags, so it can be called any number of times.
"""
import contextlib
import difflib
import errno
import importlib.util
import inspect
import os
import sys
import textwrap
from typing import Callable, Iterable, Mapping

from absl import flags
from absl import logging
from ml_collections import config_flags

from ait_jax import config_overrides
from ait_jax import errors
from ait_jax import paths

EXIT_USER_ERROR = 2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The configs ship inside the wheel as ait_jax/configs (setup.cfg maps the repository's configs/
# there); a checkout or an editable install has them beside the package.
_CONFIGS_DIR = os.path.join(_PACKAGE_DIR, 'configs')
if not os.path.isdir(_CONFIGS_DIR):
  _CONFIGS_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), 'configs')
# OS errors about the user's paths (missing, not a folder, not writable, full disk).
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                errno.EROFS, errno.EEXIST, errno.ENOSPC, errno.EDQUOT}
_HELP = ('--help', '-h', '--helpshort', '--helpfull', '-?')
# What parsing the flags, and the config file they name, raises for a user's mistake (a bad flag,
# a missing or broken file, a misspelt field); parse_error_message has a sentence for each.
_PARSE_ERRORS = (flags.Error, ValueError, TypeError, OSError, AttributeError, KeyError)


def _innermost(error: BaseException) -> BaseException:
  """The original exception under absl's and ml_collections' re-raises."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def config_names() -> list[str]:
  """The configs that ship with the package, by name: ['cifar10', 'cifar100', ...]."""
  if not os.path.isdir(_CONFIGS_DIR):
    return []
  return sorted(f[:-3] for f in os.listdir(_CONFIGS_DIR)
                if f.endswith('.py') and not f.startswith('_'))


def config_file(name: str) -> str:
  """The path of the shipped config `name` (e.g. 'cifar100'), whatever the current folder."""
  return os.path.join(_CONFIGS_DIR, f'{name}.py')


def resolve_config(spec: str) -> str:
  """`--config`'s value with its file made loadable: a file that exists is kept; otherwise a
  shipped config's name (`cifar100:quick`) or the README's `configs/cifar100.py:quick` run from
  another folder is the shipped file. Anything else is left for the loader to refuse."""
  path, colon, variant = spec.partition(':')
  if os.path.isfile(path):
    return spec
  head, base = os.path.split(path)
  name = base[:-3] if base.endswith('.py') else base
  if head.rstrip('/') in ('', 'configs') and name in config_names():
    return config_file(name) + colon + variant
  return spec


def _resolve_config_args(argv: list[str]) -> list[str]:
  """argv with `--config=X` (or `--config X`) resolved by `resolve_config`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(('--config=', '-config=')):
      flag, value = arg.split('=', 1)
      out[i] = f'{flag}={resolve_config(value)}'
    elif arg in ('--config', '-config') and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def _config_arg(argv: Iterable[str]) -> str | None:
  for arg in argv:
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def parse_error_message(error: BaseException, argv: list[str]) -> str:
  """The sentence for an error raised while flags (and the config file they name) are parsed."""
  inner = _innermost(error)
  spec = _config_arg(argv)
  if isinstance(inner, (AttributeError, KeyError)):
    field = str(inner).strip('"\'')
    fields = [a.split('=')[0].split('config.', 1)[1] for a in argv
              if a.startswith(('--config.', '--noconfig.')) and
              a.split('=')[0].split('.')[-1] == field] or [field]
    guess = _close_field(spec, fields[0]) if spec else None
    return (f'The config has no field {fields[0]!r}; ' +
            (f'did you mean --config.{guess}?' if guess else
             f'check the spelling of --config.{fields[0]} against the fields of '
             f'{(spec or "the config file").split(":")[0]}.'))
  if isinstance(inner, OSError) and 'config file' in str(inner):
    reason = [l for l in str(inner).splitlines() if l.strip()][-1].strip()
    return (f'Cannot load the config file of --config={spec} ({reason}); pass an existing '
            f'file, or a shipped config by name ({", ".join(config_names())}; the files are in '
            f'{_CONFIGS_DIR}), e.g. --config=triangle:quick.')
  if isinstance(inner, (ValueError, TypeError)) and 'Error whilst parsing config file' in str(inner):
    # ml_collections folds the config's own error into a traceback; its last line is the sentence.
    last = [l for l in str(inner).splitlines() if l.strip()][-1].strip()
    return last.split(': ', 1)[1] if ': ' in last and last.split(':')[0].isidentifier() else last
  message = str(error)
  if 'Error whilst parsing config file' in message:
    last = [l for l in message.splitlines() if l.strip()][-1].strip()
    return last.split(': ', 1)[1] if ': ' in last else last
  return f'{message} (see --help for the flags).'


def _close_field(spec: str, field: str) -> str | None:
  """The config's field nearest to a misspelt dotted `field` ('batchsize' -> 'batch_size',
  'model.presett' -> 'model.preset'), or None when none is close (difflib's ratio >= 0.6)."""
  try:
    node = load_config(spec)
  except errors.ConfigError:
    return None
  *parents, leaf = field.split('.')
  for i, part in enumerate(parents):
    if not hasattr(node, 'keys') or part not in node:
      leaf, parents = part, parents[:i]
      break
    node = node[part]
  if not hasattr(node, 'keys'):
    return None
  match = difflib.get_close_matches(leaf, list(node.keys()), n=1, cutoff=0.6)
  return '.'.join([*parents, match[0]]) if match else None


def is_user_error(error: BaseException) -> bool:
  """True for mistakes in the user's input; anything else is a bug and keeps its traceback.

  The library raises its own refusals as errors.UserError (ConfigError, InputError, ...); a plain
  ValueError, from deep inside JAX or from a bug here, still shows where it came from.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  if isinstance(error, (errors.UserError, app.UsageError, flags.Error)):
    return True
  if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError, FileExistsError)):
    return True
  return isinstance(error, OSError) and error.errno in _USER_ERRNOS


def user_message(error: BaseException) -> str:
  """The sentence for a user's error: our own messages as they are, bare OS errors completed."""
  if isinstance(error, OSError) and error.strerror and error.filename is not None:
    return (f'{error.strerror}: {error.filename}; check that path (a folder you can write to, '
            'or an existing file to read).')
  return str(error)


def fail(message: str) -> None:
  """Prints `error: <message>` as one line on stderr and exits with EXIT_USER_ERROR."""
  sys.stdout.flush()
  print(f'error: {errors.one_line(message)}', file=sys.stderr, flush=True)
  raise SystemExit(EXIT_USER_ERROR)


@contextlib.contextmanager
def _sys_argv(argv: list[str]):
  """config_flags reads the --config.x overrides from sys.argv; show it this run's argv."""
  saved = sys.argv
  sys.argv = list(argv)
  try:
    yield
  finally:
    sys.argv = saved


def help_text(define_flags: Callable[[flags.FlagValues], None], command: str,
              full: bool = False) -> str:
  """`--help`: a usage line, the command module's docstring (its purpose first), its own flags;
  absl's flags (logging) only with --helpfull. The docstring is the one description of a command,
  so the help and the source cannot disagree."""
  own = flags.FlagValues()
  define_flags(own)
  synopsis = []
  for name, flag in own._flags().items():  # pylint: disable=protected-access  (definition order)
    if name != flag.name:
      continue  # a short name
    values = getattr(flag.parser, 'enum_values', None)
    if flag.boolean:
      synopsis.append(f'[--[no]{name}]')
    elif 'ConfigFlag' in type(flag).__name__:  # ml_collections' config file flag
      synopsis.append(f'[--{name}=FILE[:VARIANT]] [--{name}.X=Y\0...]')
    else:
      synopsis.append(f'[--{name}={"|".join(values) if values else name.upper()}]')
  usage = textwrap.fill(f'usage: python -m {command} ' + ' '.join(synopsis), width=100,
                        subsequent_indent=' ' * len(f'usage: python -m {command} '),
                        break_on_hyphens=False, break_long_words=False).replace('\0', ' ')
  module = sys.modules.get(define_flags.__module__)
  doc = inspect.cleandoc(getattr(module, '__doc__', None) or '')
  # get_help groups flags under a line naming their module: the usage line already names it.
  listed = [l for l in own.get_help(prefix='', include_special_flags=False).splitlines()
            if l.startswith(' ')]
  parts = [usage, '', doc, '', 'flags:', *listed, '']
  if full:
    parts += ['absl flags:', flags.FLAGS.get_help(include_special_flags=False)]
  else:
    parts.append("absl's logging flags (--verbosity, --logtostderr, ...): see --helpfull.")
  return '\n'.join(parts)


def _command_name(define_flags: Callable, argv: list[str]) -> str:
  """`ait_jax.main` for `python -m ait_jax.main` (whose module is __main__) and for tests."""
  module = sys.modules.get(define_flags.__module__)
  spec = getattr(module, '__spec__', None)
  if spec is not None and spec.name != '__main__':
    return spec.name
  if define_flags.__module__ != '__main__':
    return define_flags.__module__
  return os.path.splitext(os.path.basename(argv[0]))[0] if argv else 'ait_jax'


def parse_flags(define_flags: Callable[[flags.FlagValues], None],
                argv: list[str]) -> flags.FlagValues:
  """Fresh FlagValues with absl's own flags (logging) and the command's; exits 2 on a bad one."""
  fv = flags.FlagValues()
  fv.append_flag_values(flags.FLAGS)  # shared Flag objects: --verbosity etc. still take effect
  define_flags(fv)
  argv = paths.expand_home_args(argv)
  given, argv = argv, _resolve_config_args(argv)
  asked = [a.split('=')[0] for a in argv[1:] if a.split('=')[0] in _HELP]
  if asked:
    try:
      print(help_text(define_flags, _command_name(define_flags, argv),
                      full='--helpfull' in asked), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader stopped early, which is no error
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing flushes at exit
    raise SystemExit(0)
  try:
    with _sys_argv(argv):
      rest = fv(argv)
      for name in ('config',):  # a missing config file only raises when the config is read
        if name in fv and fv[name].value is not None:
          fv[name].value.keys()
  except _PARSE_ERRORS as e:
    fail(parse_error_message(e, given))
  if len(rest) > 1:
    fail(f'Unexpected arguments {rest[1:]}; every option is a --flag=value.')
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging checks this before it formats records
  return fv


def skip_absent_tpu(force_cpu: bool = False) -> None:
  """Runs JAX on the CPU when this host has no TPU chip (nor GPU) but libtpu is installed.

  JAX starts libtpu on every host where it is installed (the `tpu` extra, for ait_jax.compile);
  on a host without TPU chips libtpu then prints warnings about TPU_ACCELERATOR_TYPE and
  TPU_WORKER_HOSTNAMES on stderr and holds /tmp/libtpu_lockfile, before JAX falls back to the CPU
  anyway. `force_cpu`: the host's accelerator is not wanted (ait_jax.compile only compiles). A
  JAX_PLATFORMS set by the user wins. Child processes inherit the choice.
  """
  if 'JAX_PLATFORMS' in os.environ:
    return
  if not force_cpu:
    if importlib.util.find_spec('libtpu') is None:
      return
    try:  # the check JAX itself makes at import (cloud_tpu_init), so new TPU generations count
      from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
      chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
      gpu = hardware_utils.has_visible_nvidia_gpu() or os.path.exists('/dev/kfd')
    except Exception:  # pylint: disable=broad-except  (a jax without it: leave JAX's choice)
      return
    if chips or gpu:
      return
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')  # jax may be imported already; backends start later


def run(define_flags: Callable[[flags.FlagValues], None],
        main: Callable[[flags.FlagValues], None], argv: list[str] | None = None) -> None:
  """Parses `argv` (default sys.argv), runs `main(flags)`, exits 0, or 2 on a user's error."""
  argv = list(sys.argv if argv is None else argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  skip_absent_tpu()
  fv = parse_flags(define_flags, argv)
  logging.use_absl_handler()
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  try:
    main(fv)
  except SystemExit:
    raise
  except BaseException as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    fail(user_message(e))
  sys.stdout.flush()
  raise SystemExit(0)


def require(fv: flags.FlagValues, *names: str, hint: str = '') -> None:
  """Refuses to start when a flag is unset or empty (e.g. --workdir=$WORKDIR with it unset)."""
  for name in names:
    if fv[name].value in (None, ''):
      fail(f'--{name} is {"empty" if fv[name].value == "" else "missing"}'
           f'{" (is the shell variable in it set?)" if fv[name].value == "" else ""}; '
           f'pass --{name}={hint or "..."}.')


def load_config(spec: str, overrides: Mapping[str, object] | Iterable[str] = ()):
  """`configs/x.py:variant` (or `x:variant`) plus overrides, parsed exactly as `--config=...
  --config.k=v` are.

  Raises ValueError with the same sentence the command line would print.
  """
  given = ['load_config', f'--config={spec}', *config_overrides.as_flags(overrides)]
  argv = _resolve_config_args(given)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
    fv.config.keys()
  except _PARSE_ERRORS as e:
    raise errors.ConfigError(parse_error_message(e, given)) from None
  return fv.config


def check_output_path(flag: str, path: str | None, *, folder: bool = False) -> None:
  """Refuses, before any work, an output path that cannot be written: a folder where a file is
  wanted (or a file where a folder is), a parent that is a file, or one this user cannot write.
  Nothing is created; gs:// paths are left to their writer. An empty one (`--json=$OUT` with
  $OUT unset) is refused: it would write nothing, or into the current folder."""
  if path == '':
    raise errors.InputError(f'--{flag} is empty (is the shell variable in it set?); pass a path, '
                            'or leave the flag out.')
  if not path or '://' in str(path):
    return
  path = os.path.abspath(path)
  if os.path.exists(path):
    if folder and not os.path.isdir(path):
      raise errors.InputError(f'--{flag}={path} is a file; pass a folder.')
    if not folder and os.path.isdir(path):
      raise errors.InputError(f'--{flag}={path} is a folder; pass a file name.')
    if not os.access(path, os.W_OK):
      raise PermissionError(f'--{flag}={path} is not writable for this user; pass another path.')
    return
  existing = paths.nearest_existing(path)  # path does not exist: its nearest ancestor
  if not os.path.isdir(existing):
    raise errors.InputError(
        f'--{flag}={path} is inside {existing}, which is a file; pass another path.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f'--{flag}={path} cannot be created: {existing} is read-only for this '
                          'user; pass another path.')
