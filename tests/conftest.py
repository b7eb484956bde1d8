"""Test set-up: 8 virtual CPU devices (set before JAX starts) and small generated datasets."""
import fcntl
import importlib.util
import os
import pathlib
import shutil
import tempfile

# The user's own XLA_FLAGS (GPU hosts and NVIDIA's JAX containers set some as a matter of course):
# the tests add theirs to these, in this process and in every command they run. A process the
# tests started (a pytest-xdist worker, a command that imports this file) inherits them in
# _USER_XLA_FLAGS_VAR, and its XLA_FLAGS (e.g. 1 device) are already the tests' own.
_USER_XLA_FLAGS_VAR = 'AIT_JAX_TESTS_USER_XLA_FLAGS'
STARTED_BY_THE_TESTS = _USER_XLA_FLAGS_VAR in os.environ
USER_XLA_FLAGS = os.environ.get(_USER_XLA_FLAGS_VAR if STARTED_BY_THE_TESTS else 'XLA_FLAGS', '')


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0].lstrip('-')


def _test_xla_flags(devices: int) -> list[str]:
  """Tests check numbers, not speed: XLA's backend optimisations roughly double compile time on
  CPU for no gain here (compiling dominates these tiny steps), and its fusion emitters double it
  again (3.0 against 1.5 s for a tiny model's forward and gradient), so both are off in tests and
  in the commands tests run."""
  return [f'--xla_force_host_platform_device_count={devices}',
          '--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
          '--xla_cpu_use_fusion_emitters=false']


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` virtual CPU devices: the user's XLA_FLAGS with the tests' flags
  added (a user flag that the tests set too gives way to the tests' value:
  `xla_flag_conflicts` names it, and a warning says so)."""
  ours = _test_xla_flags(devices)
  names = {_flag_name(f) for f in ours}
  return ' '.join([f for f in USER_XLA_FLAGS.split() if _flag_name(f) not in names] + ours)


def xla_flag_conflicts(devices: int = 8) -> list[str]:
  """The user's XLA flags that the tests replace with another value."""
  ours = {_flag_name(f): f for f in _test_xla_flags(devices)}
  return [f'{f} (the tests use {ours[_flag_name(f)]})' for f in USER_XLA_FLAGS.split()
          if _flag_name(f) in ours and f != ours[_flag_name(f)]]


if STARTED_BY_THE_TESTS:
  os.environ.setdefault('XLA_FLAGS', xla_flags(8))
else:
  os.environ[_USER_XLA_FLAGS_VAR] = USER_XLA_FLAGS
  os.environ['XLA_FLAGS'] = xla_flags(8)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Tests run on the CPU. With libtpu installed (the tpu extra, for tests/test_compile.py) JAX
# would otherwise start it in every test process, where it warns on stderr and holds its lock file.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests run `python -m ait_jax.<command>` in a subprocess that compiles the same small steps:
# one compilation cache for the whole run (shared by pytest-xdist's workers) lets the later ones
# load instead of compile (about 9 of 21 s for a quick Triangle run on 2 cores).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(),
    f'ait_jax_test_xla_cache_{os.environ.get("PYTEST_XDIST_TESTRUNUID", os.getpid())}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  """Says once, in pytest's warnings summary, which of the user's XLA flags the tests replace
  (e.g. --xla_force_host_platform_device_count: the tests need 8 devices)."""
  conflicts = xla_flag_conflicts()
  if conflicts and not STARTED_BY_THE_TESTS:
    config.issue_config_time_warning(pytest.PytestConfigWarning(
        f'XLA_FLAGS: the tests add their own flags to yours and replace {", ".join(conflicts)}.'),
        stacklevel=2)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def limit(seconds: float = 600) -> float:
  """A wall-clock limit for a subprocess or a wait: a safety net against a hang, never a speed
  check. `seconds` is many times what the step takes on an idle 2-core machine, so that a machine
  kept busy by other jobs still passes; AIT_JAX_TEST_TIME_SCALE (default 1) multiplies every
  limit, for a slower machine or a heavier load."""
  return seconds * float(os.environ.get('AIT_JAX_TEST_TIME_SCALE', '1'))


def load_config(name: str, arg: str | None = None):
  """`configs/<name>.py:<arg>` as `--config` would load it."""
  spec = importlib.util.spec_from_file_location(f'config_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def once_per_run(tmp_path_factory, name: str, build) -> pathlib.Path:
  """The folder `name`, filled by `build(folder)` once per test run: pytest-xdist's workers share
  it (the first builds it under a file lock, the others wait for it, which costs them no more than
  building it themselves)."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    shared = shared.parent  # the run's folder, above every worker's own
  folder, done = shared / name, shared / f'{name}.done'
  with open(shared / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


@pytest.fixture(scope='session')
def generated_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding triangle/small and sort_of_clevr/small, built once per test run."""
  from ait_jax.data import builders  # pylint: disable=g-import-not-at-top

  def build(data_dir):
    builders.prepare_generated('triangle', str(data_dir), 'small')
    builders.prepare_generated('sort_of_clevr', str(data_dir), 'small')
  return str(once_per_run(tmp_path_factory, 'tfds_generated', build))


# Files whose tests run whole commands or multi-device steps (tens of seconds each) go first, so
# that pytest-xdist's workers do not end with one of them alone at the tail of the run. Only then:
# a serial run keeps the order of its command line (`-p no:randomly` and the files reversed runs
# the suite backwards, to show that no test leans on one that ran before it).
_SLOW_FIRST = ('test_reproduce.py', 'test_readme.py', 'test_train.py', 'test_compile.py',
               'test_checkpointing.py', 'test_bench.py', 'test_fast_loop.py', 'test_selection.py',
               'test_data_imagenet100.py')


def pytest_collection_modifyitems(items):
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    return

  def rank(item):
    name = item.path.name
    return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)

  items.sort(key=rank)
