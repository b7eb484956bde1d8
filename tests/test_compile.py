"""The compile command (ait_jax/compile.py): real TPU executables compiled by libtpu on this CPU
host for a v5e and a v4 slice, and GPU executables compiled by JAX's CUDA plugin for one H100 and
a host of 8; their report, a config that does not fit, the batch search, progress, Ctrl-C, and a
user's mistakes. Nothing runs on a TPU or GPU; CI installs libtpu (the `tpu` extra) and the CUDA
plugin (ait_jax/gpus.py says where).
"""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip('libtpu', reason="the tpu extra (pip install -e '.[tpu]') is not installed")

from ait_jax import cli  # pylint: disable=wrong-import-position
from ait_jax import compile as tpu_compile  # pylint: disable=wrong-import-position
from ait_jax import gpus  # pylint: disable=wrong-import-position
from ait_jax import validation  # pylint: disable=wrong-import-position
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
  """Its train step for v4-8: 8 TensorCores, i.e. 4 megacore chips, with a progress line every
  0.2 s (30 s by default)."""
  saved, tpu_compile.PROGRESS_S = tpu_compile.PROGRESS_S, 0.2
  try:
    return _report(tmp_path_factory, '--topology=v4-8', '--steps=train')
  finally:
    tpu_compile.PROGRESS_S = saved


needs_cuda_plugin = pytest.mark.skipif(
    gpus.plugin_version() is None, reason=f'the CUDA plugin is not installed: {gpus.INSTALL}')


@pytest.fixture(scope='module')
def h100(tmp_path_factory):
  """The quick config's train step compiled for one H100 by JAX's CUDA plugin."""
  return _report(tmp_path_factory, '--topology=h100', '--steps=train')


@pytest.fixture(scope='module')
def h100x8(tmp_path_factory):
  """... and for one host of 8 H100s."""
  return _report(tmp_path_factory, '--topology=h100x8', '--steps=train')


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
  # 'auto' on a 4-chip data axis, named in the report's first line and the JSON
  assert result['model']['auto_selection'] == 'sharded' and "'auto' is 'sharded' here" in out


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
  result, out = v4
  # progress while it compiles: which step, then the elapsed time (every 0.2 s in this test)
  assert 'compiling the train step for 4 TPU v4 at 16 images per device ...' in out, out
  assert ': 0 s so far' in out or ': 1 s so far' in out, out
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


@needs_cuda_plugin
def test_h100_report(h100):
  result, out = h100
  assert (result['slice'], result['topology'], result['chips'], result['hosts']) == (
      'h100', '1x1x1', 1, 1)
  assert result['gpu'] and result['device_kind'] == 'NVIDIA H100 80GB HBM3'
  assert result['memory_bytes'] == 80 * GIB and result['hbm_capacity_bytes'] == 60 * GIB
  train = result['train']
  assert 0 < train['hbm']['total'] < 60 * GIB and train['fits']
  assert train['margin_bytes'] == 60 * GIB - train['hbm']['total']
  # FLOPs and bytes from the CPU client's cost analysis of the GPU module (the GPU has none)
  assert train['flops_per_chip'] > 0 and train['bytes_accessed_per_chip'] > 0
  kernels = train['kernels']
  assert kernels['gemm'] > 0 and kernels['fusion'] > 0 and kernels['collective'] == 0
  # lax.top_k of k = 32 (the quick config) over the batch's tokens: a sort in its one layer
  assert kernels['sort'] >= 1, kernels
  assert result['model']['auto_selection'] == 'full'
  assert "JAX's CUDA plugin" in out and 'capacity' in out and '(75% of 80.00 GiB)' in out


@needs_cuda_plugin
def test_h100x8_report_has_the_gradient_all_reduce(h100x8):
  result, _ = h100x8
  assert (result['chips'], result['hosts'], result['mesh']) == (8, 1, {'data': 8, 'model': 1})
  train = result['train']
  assert 0 < train['hbm']['total'] < 60 * GIB and train['per_chip_batch'] == 8
  grads = [p for p in train['collectives']['ops'] if p['scope'] == 'parameter gradients']
  assert grads and all(p['op'] == 'all-reduce' for p in grads), train['collectives']['ops']
  # XLA:GPU concatenates the gradients; most of the 288,706 parameters' bytes are in them
  assert sum(p['bytes'] for p in grads) > 0.9 * 288_706 * 4
  assert train['kernels']['collective'] >= 2 and train['kernels']['sort'] >= 1
  assert result['model']['auto_selection'] == 'sharded'


@needs_cuda_plugin
def test_gpu_table(h100, h100x8, v4, tmp_path):
  for name, (result, _) in (('a', h100), ('b', h100x8), ('c', v4)):
    (tmp_path / f'{name}.json').write_text(json.dumps(result))
  code, out, _ = _run([f'--table={tmp_path}'])
  tpu, gpu = out.strip().split('\n\n')
  assert code == 0 and len(tpu.splitlines()) == 3, out
  head, _, *rows = gpu.splitlines()
  assert head.startswith('| config | model | dtype | GPUs | global batch | per-GPU batch |')
  assert [r.split(' | ')[3] for r in rows] == ['h100', 'h100x8']


@needs_cuda_plugin
def test_a_config_that_cannot_fit_a_gpu_says_so_in_one_sentence(tmp_path):
  """A GPU compile never fails for memory: the sentence comes from the memory plan against the
  75% of the H100's 80 GiB that JAX takes. Width 40,960: the eval step's 20 G parameters (a train
  step would compile for 40 s more, and at width 16,384 its state's 36.7 GiB fit)."""
  path = tmp_path / 'report.json'
  code, out, err = _run([QUICK, '--topology=h100', '--steps=eval', '--config.model.width=40960',
                         '--config.model.mlp_dim=163840', f'--json={path}'])
  assert code == 1 and err == '', err
  sentence, = [l for l in out.splitlines() if l.startswith('does not fit: ')]
  assert 'GiB of memory per GPU at 256 images per GPU' in sentence, sentence
  assert ('JAX gets 60.00 GiB of each NVIDIA H100 80GB HBM3 (h100): the 75% of its 80.00 GiB '
          'that it preallocates by default') in sentence, sentence
  assert 'no batch fits: the parameters alone take' in sentence, sentence
  evaluation = json.loads(path.read_text())['eval']
  assert not evaluation['fits'] and evaluation['needed_bytes'] > 60 * GIB
  assert evaluation['oom'] is None and evaluation['search']['trials'] == []


def test_linear_bound_of_the_largest_batch():
  report = {'state_bytes_per_chip': 1 * GIB, 'needed_bytes': 3 * GIB, 'per_chip_batch': 512}
  # 59 GiB left for images at 2 GiB per 512 of them: 15,104 images, 8,192 as a power of two
  assert tpu_compile.linear_bound(report, 60 * GIB) == 8192
  assert tpu_compile.linear_bound(report, 2 * GIB) == 256
  assert tpu_compile.linear_bound(report, GIB) is None  # the state alone fills it
  assert tpu_compile.linear_bound(dict(report, needed_bytes=None), 60 * GIB) is None


def test_every_gpu_name_gives_its_gpus_and_hosts():
  assert {n: (t.count, t.hosts, t.topology) for n, t in gpus.TARGETS.items()
          if n.startswith('h100')} == {
              'h100': (1, 1, '1x1x1'), 'h100x2': (2, 1, '1x1x2'), 'h100x4': (4, 1, '1x1x4'),
              'h100x8': (8, 1, '1x1x8'), 'h100x16': (16, 2, '1x2x8'), 'h100x32': (32, 4, '1x4x8'),
              'h100x64': (64, 8, '1x8x8')}
  assert {'a100-40', 'a100-80', 'h100', 'h200', 'h100x8', 'h200x8'} <= set(gpus.TARGETS)
  config = gpus.target_config(gpus.MODELS['h200'])
  assert 'core_count: 132' in config and f'device_memory_size: {141 * GIB}' in config
  assert 'cuda_compute_capability { major: 9 minor: 0 }' in config


def test_planned_hosts_match_the_topologies():
  for name in ('v4-8', 'v4-32', 'v5e-1', 'v5e-8', 'v5e-16', 'v5e-256', 'v6e-16', 'v5p-8'):
    spec = tpu_compile.SLICES[name]
    assert tpu_compile.planned_hosts(spec, 2) == 2 * tpu_compile.hosts_of(
        tpu_compile.topology_devices(spec)), name
  assert tpu_compile.planned_hosts(gpus.TARGETS['h100x16']) == 2


def test_prefetch_is_checked_per_host_of_the_target(monkeypatch):
  """ImageNet-100 at a global batch of 65,536 with prefetch=4 on v5e-256: each of its 64 hosts
  reads 1,024 images per batch (0.6 GiB ready), not the whole batch (36.8 GiB), which a host of
  16 GiB (this test's) could not hold."""
  monkeypatch.setattr(validation, '_host_memory_bytes', lambda: 16 * GIB)
  monkeypatch.setattr(tpu_compile, '_compile_all', lambda *a: {'device_kind': 'TPU v5 lite'})
  argv = [f'--config={ROOT}/configs/imagenet100.py:model=medium', '--topology=v5e-256',
          '--config.batch_size=65536', '--config.prefetch=4', '--steps=train']
  code, out, err = _run(argv)
  assert code == 0 and err == '', err
  code, _, err = _run(argv[:1] + ['--topology=v5e-4'] + argv[2:])  # one host takes it all
  assert code == 2 and 'prefetch=4 batches of 65536 need' in err, err


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
    # refused before libtpu builds anything (100,000 slices once grew to 24 GB and was killed)
    (['--topology=v5e-4', '--num_slices=100000'],
     '--num_slices=100000 of v5e-4 (400,000 chips) is more than Cloud TPU Multislice offers: at '
     'most 65,536 chips in all'),
    (['--topology=h100', '--num_slices=2'], '--num_slices=2 is for Cloud TPU slices'),
    (['--topology=h100x3'], 'or GPUs: a100-40, a100-80, h100, h200, each also with {x2,x4,x8,'),
    (['--topology=v5e-4', '--config.batch_size=66'],
     'batch_size=66 must be divisible by the 4 data shards and the 1 processes'),
    # v5e-16 has 4 hosts: with 8-way model parallelism the 2 data shards do not cover them.
    (['--topology=v5e-16', '--config.mesh.model=8', '--config.batch_size=2',
      '--config.model.bottleneck_k=8', '--steps=train'],
     'batch_size=2 must be divisible by the 2 data shards and the 4 processes'),
    (['--topology=v4-8', '--config.model.depth=0'], 'model.depth=0'),
    (['--topology='], '--topology is empty'),
    # blank (an unset shell variable): it compiled, wrote nothing and exited 0
    (['--topology=v5e-4', '--json='], '--json is empty (is the shell variable in it set?)'),
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


@pytest.mark.parametrize('signum,status', [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=['SIGINT', 'SIGTERM'])
def test_a_signal_ends_a_compile_at_once_in_one_line(signum, status, tmp_path):
  """Ctrl-C (SIGINT) or SIGTERM while XLA compiles: no KeyboardInterrupt traceback after the
  compile (which runs in C++ for minutes), but one line within seconds, and no report written."""
  report = tmp_path / 'report.json'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'ait_jax.compile', QUICK, '--topology=v5e-4', f'--json={report}'],
      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_quiet_env())
  try:
    line = proc.stdout.readline()  # printed as the train step's compile starts
    assert line.startswith('compiling the train step'), line + proc.stderr.read()
    time.sleep(3)  # into XLA's compile (about 10 s of C++ on an idle host), past the tracing
    proc.send_signal(signum)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=limit(60))
  finally:
    proc.kill()
  assert time.monotonic() - t0 < limit(5)
  assert proc.returncode == status, err
  name = signal.Signals(signum).name
  assert err == (f'error: interrupted by {name} while compiling the train step for v5e-4; '
                 'stopped, nothing more written.\n'), err
  assert 'KeyboardInterrupt' not in err and list(tmp_path.iterdir()) == []


def test_gpu_sh_compile_runs_here(tmp_path):
  """`launch/gpu.sh compile` is `python -m ait_jax.compile` for the GPU named, from the checkout."""
  gpu_sh = ROOT / 'launch' / 'gpu.sh'
  out = subprocess.run([gpu_sh, 'compile', '--dry-run', '--gpu', 'h200', '--config',
                        'configs/cifar100.py:model=base', '--', '--config.batch_size=256'],
                       cwd=tmp_path, capture_output=True, text=True, check=True).stdout
  assert out.splitlines() == ['python -m ait_jax.compile --config=configs/cifar100.py:model=base '
                              '--topology=h200 --config.batch_size=256']
  out = subprocess.run([gpu_sh, 'compile', '--dry-run', '--config', 'configs/c.py'],
                       cwd=tmp_path, capture_output=True, text=True, check=True).stdout
  assert out.strip().endswith('--topology=h100x8')  # the default: one host of 8 H100s


def test_gpu_without_the_cuda_plugin_is_one_error_line(tmp_path):
  env = dict(_quiet_env(), AIT_JAX_CUDA_PLUGIN=str(tmp_path / 'none'))
  proc = subprocess.run([sys.executable, '-m', 'ait_jax.compile', QUICK, '--topology=h100'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=limit(600), env=env)
  assert proc.returncode == 2 and proc.stdout == '', proc.stdout + proc.stderr
  assert proc.stderr.startswith("error: Compiling for a GPU needs JAX's CUDA plugin, not found in "
                                f"{tmp_path / 'none'}: pip install") and proc.stderr.count('\n') == 1
