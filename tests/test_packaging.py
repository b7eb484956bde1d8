"""The package outside the checkout: configs resolved by name, and a wheel that works from any
folder (the configs ship inside it as ait_jax.configs; setup.cfg)."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from ait_jax import cli
from ait_jax import main as main_cmd
from conftest import limit, ROOT, xla_flags

SHIPPED = sorted(p.stem for p in (ROOT / 'configs').glob('*.py'))


def test_config_names_are_the_repository_configs():
  assert cli.config_names() == SHIPPED
  assert 'imagenet100' in SHIPPED and 'triangle' in SHIPPED


def test_resolve_config_by_name_and_from_another_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # an empty folder: no configs/ here
  shipped = cli.config_file('triangle')
  assert cli.resolve_config('triangle:quick') == shipped + ':quick'
  assert cli.resolve_config('triangle.py') == shipped
  assert cli.resolve_config('configs/triangle.py:model=base,quick') == shipped + ':model=base,quick'
  # Not a shipped name, or a path elsewhere: left for the loader (which then says so).
  assert cli.resolve_config('configs/nope.py') == 'configs/nope.py'
  assert cli.resolve_config('other/triangle.py') == 'other/triangle.py'
  # A file of the user's own is loaded as given, even with a shipped name.
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'triangle.py').write_text('def get_config(arg=None): return None\n')
  assert cli.resolve_config('configs/triangle.py:quick') == 'configs/triangle.py:quick'
  assert cli.load_config('triangle:quick').model.depth == 1  # a bare name is the shipped one


def test_unknown_config_names_the_shipped_ones(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main_cmd.define_flags, main_cmd.main,
            ['ait_jax.main', '--config=configs/nope.py', f'--workdir={tmp_path / "w"}'])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  assert err.startswith('error: Cannot load the config file of --config=configs/nope.py'), err
  assert ', '.join(SHIPPED) in err and cli._CONFIGS_DIR in err  # pylint: disable=protected-access
  assert not (tmp_path / 'w').exists()


# The README's main job, bench, reproduce --help and visualize, each as `python -m` runs it
# (runpy, in one interpreter so that JAX is imported once), from an empty folder.
_DRIVER = textwrap.dedent('''
    import json, os, runpy, sys
    import ait_jax
    from ait_jax import cli
    print(json.dumps({'package': ait_jax.__file__, 'configs': cli._CONFIGS_DIR}))
    for argv in json.loads(sys.argv[1]):
      sys.argv = list(argv)
      try:
        runpy.run_module(argv[0], run_name='__main__', alter_sys=True)
      except SystemExit as e:
        if e.code not in (0, None):
          raise SystemExit(f'{argv[0]} exited {e.code}')
''')


def _venv_with_our_dependencies(venv: pathlib.Path) -> tuple[str, str]:
  """A venv without pip whose site-packages reach this venv's packages (jax, flax, ..., pip,
  setuptools) through a plain path line, so that this venv's editable ait_jax is not activated.
  Returns its python and its site-packages."""
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True,
                 timeout=limit())
  python = str(venv / 'bin' / 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                        check=True, capture_output=True, text=True).stdout.strip()
  ours = {sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}
  (pathlib.Path(site) / 'test_env.pth').write_text('\n'.join(sorted(ours)) + '\n')
  return python, site


def test_wheel_runs_from_an_empty_folder(generated_data_dir, tmp_path):
  """Build the wheel, install it (no dependencies: they are this venv's) into a new venv, and run
  the commands there: the package and its configs come from the wheel, not from this checkout."""
  src = tmp_path / 'src'  # a copy, so that the build writes nothing into the checkout
  src.mkdir()
  for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, src / name)
  for name in ('ait_jax', 'configs'):
    shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns('__pycache__'))
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INDEX='1', XLA_FLAGS=xla_flags(1))
  pip = [sys.executable, '-m', 'pip']
  subprocess.run(pip + ['wheel', '-q', '--no-deps', '--no-build-isolation', '-w',
                        str(tmp_path / 'dist'), str(src)], check=True, env=env, timeout=limit())
  (wheel,) = (tmp_path / 'dist').glob('ait_jax-*.whl')
  packaged = set(zipfile.ZipFile(wheel).namelist())
  expected = {str(p.relative_to(ROOT)) for p in (ROOT / 'ait_jax').rglob('*.py')}
  expected |= {f'ait_jax/configs/{name}.py' for name in SHIPPED}
  assert expected <= packaged, sorted(expected - packaged)

  python, site = _venv_with_our_dependencies(tmp_path / 'venv')
  subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', str(wheel)], check=True,
                 env=env, timeout=limit())

  empty = tmp_path / 'empty'
  empty.mkdir()
  quick = ['--config=configs/triangle.py:quick', '--config.dataset=triangle/small',
           f'--config.data_dir={generated_data_dir}', '--config.total_steps=2',
           '--config.log_every_steps=1', '--config.eval_every_steps=2',
           '--config.checkpoint_every_steps=2']
  commands = [
      ['ait_jax.main', *quick, '--workdir=w'],
      ['ait_jax.bench', '--depth=1', '--width=64', '--mlp_dim=128', '--num_heads=1', '--batch=8',
       '--steps=1', '--warmup=1', '--devices=1', '--json=bench.json'],
      ['ait_jax.reproduce', '--help'],
      ['ait_jax.visualize', '--workdir=w', '--out=figures', '--num_images=2'],
  ]
  out = subprocess.run([python, '-c', _DRIVER, json.dumps(commands)], cwd=empty, env=env,
                       capture_output=True, text=True, timeout=limit(1200))
  assert out.returncode == 0, f'{out.stdout[-3000:]}\n{out.stderr[-3000:]}'
  where = json.loads(out.stdout.splitlines()[0])
  assert where['package'].startswith(site), where  # the wheel's package, not the checkout's
  assert where['configs'] == os.path.join(site, 'ait_jax', 'configs'), where
  assert json.loads((empty / 'w' / 'eval_final.json').read_text())['num_examples'] > 0
  assert 'AiT (preset small, overridden: depth 1, width 64' in out.stdout  # what runs
  assert json.loads((empty / 'bench.json').read_text())['rows'][0]['steps'] == 1
  assert '--scale' in out.stdout  # reproduce's help
  assert len(list((empty / 'figures').glob('*.png'))) == 4


def test_editable_clone_runs_from_its_parent_folder(tmp_path):
  """The README clones into a folder named ait_jax, and its one command makes data/ in it. From
  the folder above, Python sees that clone as a namespace package `ait_jax` (the current folder
  comes first on sys.path), whose data/ hid ait_jax.data under setuptools' default editable
  install (an import hook that runs after the path search). setup.cfg's layout (package_dir '.')
  makes the editable install a path entry instead, and a regular package on any path entry wins
  over a namespace folder."""
  clone = tmp_path / 'ait_jax'
  clone.mkdir()
  for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, clone / name)
  for name in ('ait_jax', 'configs'):
    shutil.copytree(ROOT / name, clone / name, symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__'))
  (clone / 'data').mkdir()  # what the README's one command makes (--config.data_dir=data)
  python, _ = _venv_with_our_dependencies(tmp_path / 'venv')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INDEX='1')
  subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '-e',
                  str(clone)], check=True, capture_output=True, env=env, timeout=limit())
  # From the clone's parent: prepare's and reproduce's --help (each command imports
  # ait_jax.data through the same package), in one interpreter with the package's location.
  commands = [['ait_jax.data.prepare', '--help'], ['ait_jax.reproduce', '--help']]
  out = subprocess.run([python, '-c', _DRIVER, json.dumps(commands)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=limit())
  assert out.returncode == 0, f'{out.stdout[-3000:]}\n{out.stderr[-3000:]}'
  where = json.loads(out.stdout.splitlines()[0])
  assert where['package'] == str(clone / 'ait_jax' / '__init__.py'), where
  assert '--dataset' in out.stdout and '--scale' in out.stdout  # prepare's and reproduce's help


def test_documented_installs_go_through_constraints():
  """Every `pip install` that the docs give to run (their code blocks) pins through
  constraints.txt, so that TPU and GPU machines get the versions CI tests, as the CPU does."""
  docs = [ROOT / 'README.md', ROOT / 'launch' / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
  unpinned = []
  for doc in docs:
    blocks = re.findall(r'^```[^\n]*\n(.*?)^```', doc.read_text(), re.M | re.S)
    unpinned += [f'{doc.relative_to(ROOT)}: {line.strip()}' for block in blocks
                 for line in block.splitlines()
                 if 'pip install' in line and not re.search(r'-c \S*constraints\.txt', line)]
  assert not unpinned, unpinned
