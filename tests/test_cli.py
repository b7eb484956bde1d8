"""What every command says about itself and about a misspelt config: `--help` opens with a usage
line and the module's purpose, `main --help` names the override syntax, the variants and the data
folder, a variant's boolean takes only its spellings, and a misspelt field gets a "did you mean"
(ait_jax/cli.py, ait_jax/config_lib.py)."""
import importlib
import subprocess
import sys

import pytest

from ait_jax import cli
from ait_jax import config_lib
from ait_jax import main as main_cmd
from ait_jax import models
from conftest import limit, load_config, ROOT

COMMANDS = ('ait_jax.main', 'ait_jax.bench', 'ait_jax.visualize', 'ait_jax.reproduce',
            'ait_jax.convert', 'ait_jax.distributed', 'ait_jax.compile', 'ait_jax.data.prepare',
            'ait_jax.data.show', 'ait_jax.data.benchmark')


def _help(name: str, capsys) -> str:
  module = importlib.import_module(name)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(module.define_flags, module.main, [name, '--help'])
  assert exit_info.value.code == 0
  return capsys.readouterr().out


@pytest.mark.parametrize('name', COMMANDS)
def test_help_starts_with_usage_and_purpose(name, capsys):
  text = _help(name, capsys)
  lines = text.splitlines()
  assert lines[0].startswith(f'usage: python -m {name}'), lines[0]
  module = importlib.import_module(name)
  purpose = module.__doc__.strip().splitlines()[0]
  after_usage = lines[lines.index('') + 1]  # the usage line may wrap
  assert after_usage == purpose, lines[:6]
  # The command's own flags, then a pointer to absl's (not their pages of text).
  assert '--helpfull' in text and '--log_dir' not in text


def test_main_help_names_overrides_variants_and_data_dir(capsys):
  text = _help('ait_jax.main', capsys)
  for phrase in ('--config.X=Y', '--config.data_dir', 'quick', 'model=', 'ablation=',
                 '--workdir', '--mode'):
    assert phrase in text, phrase
  # Every variant the configs accept, so the help cannot fall behind config_lib.
  for preset in models.PRESETS:
    assert preset in text and f'vit_{preset}' in text
  for ablation in config_lib.ABLATIONS:
    assert ablation in text, ablation


def test_distributed_help_shows_its_flag_and_environment(capsys):
  text = _help('ait_jax.distributed', capsys)
  assert '--distributed' in text
  for name in ('AIT_JAX_COORDINATOR', 'AIT_JAX_NUM_PROCESSES', 'AIT_JAX_PROCESS_ID'):
    assert name in text


def test_distributed_flag_decides_the_start(monkeypatch, capsys):
  """`python -m ait_jax.distributed --distributed=off` starts nothing, whatever the environment
  says (a coordinator that does not exist would hang or fail)."""
  from ait_jax import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('AIT_JAX_COORDINATOR', '127.0.0.1:1')
  monkeypatch.setenv('AIT_JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('AIT_JAX_PROCESS_ID', '0')
  with pytest.raises(SystemExit) as exit_info:
    cli.run(distributed.define_flags, distributed.main,
            ['ait_jax.distributed', '--distributed=off'])
  assert exit_info.value.code == 0
  assert 'process 0/1' in capsys.readouterr().out


def test_help_runs_as_a_command():
  out = subprocess.run([sys.executable, '-m', 'ait_jax.main', '--help'], cwd=ROOT,
                       capture_output=True, text=True, timeout=limit())
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('usage: python -m ait_jax.main [--config='), out.stdout[:200]


def test_help_into_a_closed_pipe_is_quiet():
  """`python -m ait_jax.main --help | head -1`: a reader that stops early is no error."""
  process = subprocess.Popen([sys.executable, '-m', 'ait_jax.main', '--help'], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  process.stdout.close()  # before the command writes: its write meets a closed pipe
  err = process.stderr.read().decode()
  assert process.wait(timeout=limit()) == 0, err
  assert 'Traceback' not in err and 'BrokenPipeError' not in err, err


@pytest.mark.parametrize('word', ['maybe', 'on', 'y', 'off', ''])
def test_variant_boolean_refuses_other_spellings(word):
  with pytest.raises(ValueError, match=f"quick={word!r} is not a boolean"):
    load_config('triangle', f'quick={word}')


@pytest.mark.parametrize('word,quick', [('', True), ('=true', True), ('=1', True),
                                        ('=YES', True), ('=false', False), ('=0', False),
                                        ('=no', False)])
def test_variant_boolean_accepted_spellings(word, quick):
  config = load_config('triangle', f'quick{word}')
  assert (config.total_steps == 60) == quick


def _run(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main_cmd.define_flags, main_cmd.main, ['ait_jax.main'] + argv)
  return exit_info.value.code, capsys.readouterr().err


def test_bad_variant_boolean_is_one_line(tmp_path, capsys):
  # --mode=eval on an empty workdir: were the variant read as False, this ends at once too.
  code, err = _run(['--config=triangle:quick=maybe', '--mode=eval',
                    f'--workdir={tmp_path / "w"}'], capsys)
  assert code == cli.EXIT_USER_ERROR
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: Config variant quick='maybe' is not a "
                                                 'boolean'), err
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('flag,field,guess', [
    ('--config.batchsize=32', 'batchsize', 'batch_size'),
    ('--config.model.presett=base', 'model.presett', 'model.preset'),
    ('--config.modle.preset=base', 'modle', 'model'),
])
def test_misspelt_field_gets_did_you_mean(flag, field, guess, tmp_path, capsys):
  code, err = _run(['--config=triangle:quick', flag, f'--workdir={tmp_path / "w"}'], capsys)
  assert code == cli.EXIT_USER_ERROR
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert f"no field '{field}'" in lines[0] and f'did you mean --config.{guess}?' in lines[0], err


def test_field_far_from_any_gets_no_guess(tmp_path, capsys):
  code, err = _run(['--config=triangle:quick', '--config.zzzzqqq=1',
                    f'--workdir={tmp_path / "w"}'], capsys)
  assert code == cli.EXIT_USER_ERROR
  assert "no field 'zzzzqqq'" in err and 'did you mean' not in err
