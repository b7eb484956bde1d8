"""The TPU compile command (ait_jax/compile.py): real TPU executables compiled by libtpu on this
CPU host for a v5e and a v4 slice, their report, a config that does not fit, the batch search,
and a user's mistakes. Nothing runs on a TPU; CI installs libtpu (the `tpu` extra).
"""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('libtpu', reason="the tpu extra (pip install -e '.[tpu]') is not installed")

from ait_jax import cli  # pylint: disable=wrong-import-position
from ait_jax import compile as tpu_compile  # pylint: disable=wrong-import-position
from conftest import limit, ROOT  # pylint: disable=wrong-import-position

QUICK = f'--config={ROOT}/configs/triangle.py:quick'
GIB = 2 ** 30


def _run(argv):
  """(exit code, stdout, stderr) of the command run in process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    with pytest.raises(SystemExit) as exit_info:
      cli.run(tpu_compile.define_flags, tpu_compile.main, ['ait_jax.compile', *argv])
  return exit_info.value.code, out.getvalue(), err.getvalue()


def _report(tmp_path_factory, *argv):
  path = tmp_path_factory.mktemp('compile') / 'report.json'
  code, out, err = _run([QUICK, *argv, f'--json={path}'])
  assert code == 0, err + out
  return json.loads(path.read_text()), out


@pytest.fixture(scope='module')
def v5e(tmp_path_factory):
  """The quick Triangle config's train and eval steps compiled for v5e-4 (4 chips, 1 host)."""
  return _report(tmp_path_factory, '--topology=v5e-4')


@pytest.fixture(scope='module')
def v4(tmp_path_factory):
  """Its train step for v4-8: 8 TensorCores, i.e. 4 megacore chips."""
  return _report(tmp_path_factory, '--topology=v4-8', '--steps=train')


def test_v5e_report(v5e):
  result, out = v5e
  assert (result['slice'], result['topology'], result['chips'], result['hosts']) == (
      'v5e-4', 'v5e:2x2', 4, 1)
  assert result['device_kind'] == 'TPU v5 lite' and result['hbm_capacity_bytes'] == 16 * GIB
  assert result['fits'] and result['mesh'] == {'data': 4, 'model': 1}
  for step, batch in (('train', 64), ('eval', 256)):  # the quick config's two batch sizes
    r = result[step]
    assert (r['global_batch'], r['per_chip_batch']) == (batch, batch // 4)
    hbm = r['hbm']
    assert 0 < hbm['total'] < 16 * GIB and r['fits']
    assert r['margin_bytes'] == 16 * GIB - hbm['total']
    assert hbm['total'] == (hbm['arguments'] + hbm['outputs'] + hbm['temporaries']
                            - hbm['aliases'] + hbm['generated_code'])
    assert r['flops_per_chip'] > 0 and r['compile_s'] > 0
  # The train state is donated: its outputs reuse the arguments' buffers.
  assert result['train']['hbm']['aliases'] > 0 and result['eval']['hbm']['aliases'] == 0
  scopes = result['train']['collectives']['by_scope']
  grads = [p for p in result['train']['collectives']['ops'] if p['scope'] == 'parameter gradients']
  assert len(grads) == 1 and grads[0]['op'] == 'all-reduce'
  assert 'f32[3072,64]' in grads[0]['shape']  # the patch embedding's kernel (32·32·3 → 64)
  # The sharded top-k gathers Hm·M·k candidates of every chip: f32[8, 32, 4·64], once per layer.
  assert scopes['block0/workspace']['bytes'] >= 8 * 32 * 4 * 64 * 4
  gathers = [p for p in result['train']['collectives']['ops'] if p['op'] == 'all-gather']
  assert [(p['shape'], p['scope']) for p in gathers] == [('f32[8,32,256]', 'block0/workspace')]
  assert 'parameter gradients' not in result['eval']['collectives']['by_scope']
  assert 'total needed' in out and 'block0/workspace' in out and 'compile s' in out


def test_table_of_a_folder_of_reports(v5e, v4, tmp_path):
  for name, (result, _) in (('a', v5e), ('b', v4)):
    (tmp_path / f'{name}.json').write_text(json.dumps(result))
  code, out, _ = _run([f'--table={tmp_path}'])
  head, rule, *rows = out.strip().splitlines()
  assert code == 0 and head.startswith('| config | model | dtype | slice |') and len(rows) == 2
  cells = [row.split(' | ') for row in rows]
  assert [c[3] for c in cells] == ['v4-8', 'v5e-4'] and all(c[8] == 'yes' for c in cells)
  assert {c[1] for c in cells} == {'AiT-Small (depth 1, width 64)'}, cells
  code, _, err = _run([f'--table={tmp_path / "empty"}'])
  assert code == 2 and err.startswith('error: No *.json report in'), err


def test_v4_megacore_report(v4):
  result, _ = v4
  assert (result['topology'], result['chips'], result['hosts'], result['device_kind']) == (
      'v4:2x2x1', 4, 1, 'TPU v4')
  assert result['hbm_capacity_bytes'] == 32 * GIB and 'eval' not in result
  train = result['train']
  assert train['per_chip_batch'] == 16 and 0 < train['hbm']['total'] < 32 * GIB and train['fits']
  assert train['collectives']['by_scope']['parameter gradients']['ops'] == 1
  assert 'block0/workspace' in train['collectives']['by_scope']


def test_a_config_that_cannot_fit_says_so_in_one_sentence(tmp_path):
  """Width 16,384 (3.3 G parameters, AdamW): the compiler runs out of v5e's HBM, and the state
  alone exceeds it, so no batch is tried."""
  path = tmp_path / 'report.json'
  code, out, err = _run([QUICK, '--topology=v5e-4', '--steps=train', '--config.model.width=16384',
                         '--config.model.mlp_dim=65536', f'--json={path}'])
  assert code == 1 and err == '', err
  sentence, = [l for l in out.splitlines() if l.startswith('does not fit: ')]
  assert 'GiB of HBM per chip' in sentence and 'has 16.00 GiB' in sentence, sentence
  assert 'no batch fits: the train state alone takes' in sentence, sentence
  train = json.loads(path.read_text())['train']
  assert not train['fits'] and train['oom']['needed_bytes'] > 16 * GIB
  assert train['state_bytes_per_chip'] > 16 * GIB and train['search']['trials'] == []


def test_every_slice_name_gives_its_chips_and_hosts():
  hosts = {'v4-8': 1, 'v4-32': 4, 'v5p-8': 1, 'v5e-1': 1, 'v5e-4': 1, 'v5e-8': 1, 'v5e-16': 4,
           'v5litepod-16': 4, 'v5e-256': 64, 'v6e-8': 1, 'v6e-16': 4}
  for name, spec in tpu_compile.SLICES.items():
    devices = tpu_compile.topology_devices(spec)
    per_chip = 2 if name.startswith(('v4', 'v5p')) else 1  # v4 and v5p names count TensorCores
    assert len(devices) * per_chip == int(name.rsplit('-', 1)[1]), name
    if name in hosts:
      assert tpu_compile.hosts_of(devices) == hosts[name], name
  two = tpu_compile.topology_devices(tpu_compile.SLICES['v5e-4'], num_slices=2)
  assert len(two) == 8 and tpu_compile.hosts_of(two) == 2


def test_multi_slice_mesh_spans_the_slices():
  from ait_jax import sharding  # pylint: disable=g-import-not-at-top
  devices = tpu_compile.topology_devices(tpu_compile.SLICES['v5e-4'], num_slices=2)
  mesh = sharding.make_mesh(-1, 1, devices)
  assert dict(mesh.shape) == {'data': 8, 'model': 1}
  slices = [d.slice_index for d in mesh.devices[:, 0]]
  assert slices == [0] * 4 + [1] * 4  # each slice holds a contiguous half of the data axis


def test_largest_fitting_bisects_powers_of_two():
  for limit in range(-1, 10):  # fits(e) <=> e <= limit (below 10, known to fail)
    calls = []

    def fits(e, limit=limit):
      calls.append(e)
      return e <= limit

    # From a failure at 2^10 down, and from a fit at 2^0 up (exponents 0..12 valid).
    assert tpu_compile.largest_fitting(-1, 10, 0, 12, fits) == (limit if limit >= 0 else None)
    assert len(calls) <= 4, calls
    if limit >= 0:
      assert tpu_compile.largest_fitting(0, None, 0, 12, fits) == limit
  # Everything valid fits: the search stops at the largest valid exponent.
  assert tpu_compile.largest_fitting(3, None, 2, 9, lambda e: True) == 9


def test_parse_oom_messages():
  # What libtpu 0.0.42.1 said for the width-16,384 config above, and the classic form (as quoted
  # in github.com/erfanzar/EasyDeL/issues/78).
  new = tpu_compile.parse_oom('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
                              'required for HLO temporaries (40.71G) exceeds available HBM '
                              '(15.75G).')
  old = tpu_compile.parse_oom('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of '
                              'memory in memory space hbm. Used 21.90G of 7.48G hbm. Exceeded '
                              'hbm capacity by 14.42G.')
  assert (new['needed_bytes'], new['available_bytes']) == (int(40.71 * GIB), int(15.75 * GIB))
  assert (old['needed_bytes'], old['available_bytes']) == (int(21.90 * GIB), int(7.48 * GIB))
  assert tpu_compile.parse_oom('RESOURCE_EXHAUSTED: something else')['needed_bytes'] is None


@pytest.mark.parametrize('argv,expected', [
    (['--topology=v5e-3'], "Unknown --topology='v5e-3'; valid slices: v4-{8,16,"),
    (['--topology=v5e-4', '--num_slices=0'], 'flag --num_slices=0: 0 is not a positive integer'),
    (['--topology=v5e-4', '--config.batch_size=66'],
     'batch_size=66 must be divisible by the 4 data shards and the 1 processes'),
    # v5e-16 has 4 hosts: with 8-way model parallelism the 2 data shards do not cover them.
    (['--topology=v5e-16', '--config.mesh.model=8', '--config.batch_size=2',
      '--config.model.bottleneck_k=8', '--steps=train'],
     'batch_size=2 must be divisible by the 2 data shards and the 4 processes'),
    (['--topology=v4-8', '--config.model.depth=0'], 'model.depth=0'),
    (['--topology='], '--topology is empty'),
    (['--topology=v5e-4', '--config.device_data=True'], 'device_data=True'),
])
def test_user_mistakes_are_one_error_line(argv, expected):
  code, out, err = _run([QUICK, *argv])
  assert code == cli.EXIT_USER_ERROR and out == ''
  assert err.count('\n') == 1 and err.startswith('error: ') and expected in err, err


def _quiet_env():
  """This test run's environment without the JAX_PLATFORMS that conftest.py sets, as a user's."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env['PYTHONPATH'] = str(ROOT)
  return env


@pytest.mark.parametrize('command', [
    # starts libtpu for the topology, then refuses the batch
    ['ait_jax.compile', QUICK, '--topology=v5e-4', '--config.batch_size=66'],
    # any other command on a host without TPU chips (libtpu installed)
    ['ait_jax.bench', '--devices=64'],
], ids=['compile', 'bench'])
def test_libtpu_prints_nothing_on_a_host_without_tpu(command, tmp_path):
  proc = subprocess.run([sys.executable, '-m', *command], cwd=tmp_path, capture_output=True,
                        text=True, timeout=limit(1200), env=_quiet_env())
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
  assert proc.stderr.startswith('error: '), proc.stderr
