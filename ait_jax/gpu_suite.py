"""The GPU measurement in one command: `python -m ait_jax.bench --suite=gpu --out=DIR`.

On one GPU, within a wall-clock budget (default 8 minutes, compiles included; docs/gpu.md):
1. correctness on the device: every one-device exact selection ('full' is `lax.top_k`,
   'chunked', 'threshold') keeps the same tokens as `lax.top_k`, in float32 and bfloat16, on
   inputs full of ties and on Gaussian ones; and 20 train steps on the device match the same 20
   steps on the host's CPU backend (matmuls at 'highest' precision on both, so that TF32 does
   not stand in for float32);
2. timings of AiT (every one-device selection) and of the dense ViT of the same dims, in the
   same process, at Small and Base, float32 (default precision) and bfloat16, batch 512 and
   2048, with the step's planned memory (memory_analysis) and the device's peak (memory_stats);
3. a profile of AiT-Small and ViT-Small in bfloat16 (`profiling.py`), with the time of each op
   kind side by side, so that the table says where AiT spends what ViT does not;
4. the targets of the GPU issue, met or not, and the anchors measured before.
The cells run in order of importance; before each one the guard compares the time left with
what the last cell of its kind took, and skips it with a note rather than overrun. The JSON
(DIR/gpu_suite.json) is rewritten after every cell, so a killed run keeps what it measured; the
table is printed last.

`--smoke` runs the same code on a CPU with tiny models and batches (CI runs it). Nothing here
imports the data pipeline (grain, tensorflow_datasets): the GPU host installs the package
without its dependencies.
"""
import functools
import json
import os
import platform
import signal
import sys
import time
import traceback

from ait_jax import errors
from ait_jax import profiling

RESULT_FILE = 'gpu_suite.json'
SELECTIONS = ('full', 'chunked', 'threshold')  # the one-device exact selections
DEFAULT_BUDGET_S = 480.0
# Earlier measurements on one H200 (issue 38), batch 512, CIFAR shapes, AiT-Small dims.
ANCHORS = (
    ('published PyTorch AiT-Small, fp32', 102.2),
    ('published PyTorch AiT-Small, TF32', 50.4),
    ('JAX dense ViT (AiT-Small dims), TF32', 20.0),
    ('JAX dense ViT (AiT-Small dims), bf16', 9.58),
)
# What the full suite runs, most important first (the targets' cells, then the rest):
# (preset, dtype, batch). Each group times the ViT, then AiT with every selection.
GROUPS = (('small', 'bfloat16', 512), ('small', 'bfloat16', 2048), ('small', 'float32', 512),
          ('base', 'bfloat16', 512), ('small', 'float32', 2048), ('base', 'bfloat16', 2048),
          ('base', 'float32', 512), ('base', 'float32', 2048))
PROFILED = ('small', 'bfloat16', 512)  # the group whose ViT and AiT ('full') are profiled
# --smoke: the same groups and code on a CPU, with tiny models and batches.
SMOKE_DIMS = {'small': dict(depth=1, width=32, mlp_dim=64, num_heads=1),
              'base': dict(depth=2, width=32, mlp_dim=64, num_heads=1)}
SMOKE_BATCH = {512: 8, 2048: 16}
# A CPU compiles each cell for seconds: one group, and 'chunked' only in the selection check.
SMOKE_GROUPS = (('small', 'bfloat16', 512),)
SMOKE_SELECTIONS = ('full', 'threshold')
SMOKE_K = 16
# A first cell's guess before any of its kind ran (compile + timed steps), seconds on one GPU.
FIRST_GUESS_S = {'small': 40.0, 'base': 90.0}
TRAIN_MATCH_STEPS = 20
# 20 steps at 'highest' matmul precision: XLA's GPU and CPU kernels sum in other orders
# (float32 rounding, ~1e-7 relative per op), which 20 AdamW steps grow; a top-k choice that
# flips on a near-tie shows as a larger jump.
TRAIN_MATCH_RTOL = 1e-3


def _targets(cells: list) -> list:
  """The GPU issue's targets against the measured cells: the best AiT cell of each (over the
  selections and batches), and for the ratio, AiT and ViT at the same batch."""
  def best(arch, preset, dtype, batch=None):
    rows = [c for c in cells if c.get('images_per_s') and c['arch'] == arch and
            c['preset'] == preset and c['dtype'] == dtype and (batch is None or c['batch'] == batch)]
    return max(rows, key=lambda c: c['images_per_s'], default=None)

  def where(c):
    return f"batch {c['batch']}, {c['selection'] or 'dense'}" if c else 'not measured'

  out = []
  ait = best('ait', 'small', 'bfloat16')
  ratio, ratio_cell = None, None
  for c in cells:
    if c.get('images_per_s') and c['arch'] == 'ait' and c['preset'] == 'small' and (
        c['dtype'] == 'bfloat16'):
      vit = best('vit', 'small', 'bfloat16', c['batch'])
      if vit and (ratio is None or c['images_per_s'] / vit['images_per_s'] > ratio):
        ratio, ratio_cell = c['images_per_s'] / vit['images_per_s'], c
  out.append({'target': 'AiT-Small bf16 >= 0.9x ViT-Small bf16 (images/s, same batch)',
              'value': ratio, 'goal': 0.9, 'where': where(ratio_cell)})
  out.append({'target': 'AiT-Small bf16 >= 48,000 images/s',
              'value': ait and ait['images_per_s'], 'goal': 48000.0, 'where': where(ait)})
  fp32 = best('ait', 'small', 'float32')
  out.append({'target': 'AiT-Small default precision >= 25,000 images/s',
              'value': fp32 and fp32['images_per_s'], 'goal': 25000.0, 'where': where(fp32)})
  base = best('ait', 'base', 'bfloat16')
  out.append({'target': 'AiT-Base bf16 >= 8,000 images/s',
              'value': base and base['images_per_s'], 'goal': 8000.0, 'where': where(base)})
  for t in out:
    t['met'] = None if t['value'] is None else bool(t['value'] >= t['goal'])
  return out


class Suite:
  """One run of the suite: its budget, its results and the JSON it keeps up to date."""

  def __init__(self, out_dir: str, *, smoke: bool, budget_s: float, steps: int, warmup: int,
               command: str):
    import jax  # pylint: disable=g-import-not-at-top
    self.t0 = time.monotonic()
    self.out_dir, self.smoke, self.budget_s = out_dir, smoke, budget_s
    self.steps, self.warmup = steps, warmup
    self.device = jax.devices()[0]
    self.durations = {}  # (arch, preset) -> seconds of the last cell of that kind
    stats = _memory_stats(self.device)
    self.result = {
        'command': command, 'smoke': smoke, 'budget_s': budget_s,
        'hardware': {'platform': self.device.platform, 'device_kind': self.device.device_kind,
                     'devices_seen': jax.device_count(), 'memory_bytes': stats.get('bytes_limit'),
                     'host_cpus': os.cpu_count(), 'machine': platform.machine(),
                     'python': platform.python_version(), 'jax': jax.__version__},
        'steps_per_cell': steps, 'warmup_per_cell': warmup,
        'correctness': {}, 'cells': [], 'skipped': [], 'profiles': {}, 'targets': [],
        'anchors_h200_batch512_ms': dict(ANCHORS), 'elapsed_s': 0.0}

  def elapsed(self) -> float:
    return time.monotonic() - self.t0

  def save(self) -> None:
    self.result['elapsed_s'] = self.elapsed()
    self.result['targets'] = _targets(self.result['cells'])
    os.makedirs(self.out_dir, exist_ok=True)
    path = os.path.join(self.out_dir, RESULT_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(self.result, f, indent=2, default=str)
    os.replace(path + '.tmp', path)

  def config(self, preset: str, dtype: str, batch: int, vit: bool, selection: str = 'full'):
    from ait_jax import cli  # pylint: disable=g-import-not-at-top
    c = cli.load_config('cifar10:model=small')
    c.model.preset, c.model.vit, c.model.dtype, c.model.selection = preset, vit, dtype, selection
    c.batch_size = c.eval_batch_size = SMOKE_BATCH[batch] if self.smoke else batch
    if self.smoke:
      c.model.update(SMOKE_DIMS[preset], bottleneck_k=SMOKE_K)
    c.mesh.data, c.mesh.model = -1, 1
    return c

  # Correctness ------------------------------------------------------------------------------

  def check_selections(self) -> dict:
    """Every one-device selection against lax.top_k on the device, float32 and bfloat16, on
    inputs with ties (integer logits, checked also against NumPy's float64 order) and Gaussian
    ones, at AiT-Small's workspace shapes (8 heads, 32 slots, 32-dim heads, batch 512 of 64
    tokens, k = 512)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from ait_jax import sharding  # pylint: disable=g-import-not-at-top
    from ait_jax import workspace  # pylint: disable=g-import-not-at-top
    heads, slots, dim = 8, 32, 32
    n, k = (SMOKE_BATCH[512] * 64, SMOKE_K) if self.smoke else (512 * 64, 512)
    mesh = sharding.make_mesh(1, 1, [self.device])
    rng = np.random.default_rng(0)
    inputs = {'ties': (rng.integers(-1, 2, (heads, slots, dim)),
                       rng.integers(-1, 2, (1, heads, n, dim))),
              'gaussian': (rng.standard_normal((heads, slots, dim)),
                           rng.standard_normal((1, heads, n, dim)))}
    v = rng.standard_normal((1, heads, n, dim))
    out = {'shape': {'heads': heads, 'slots': slots, 'tokens': n, 'k': k}, 'checks': []}
    fns = {selection: jax.jit(functools.partial(workspace.bottleneck_attention, top_k=k,
                                                selection=selection, mesh=mesh))
           for selection in SELECTIONS}  # compiled once per dtype
    for name, (q, kk) in inputs.items():
      for dtype in ('float32', 'bfloat16'):
        args = [jax.device_put(jnp.asarray(a, dtype), self.device) for a in (q, kk, v)]
        picked = {}
        for selection, fn in fns.items():
          with jax.set_mesh(mesh):
            picked[selection] = np.asarray(fn(*args).indices)
        want = picked['full']
        if name == 'ties':  # exact logits: NumPy's order, ties to the lower index
          logits = np.einsum('hmd,hnd->hmn', q.astype(np.float64), kk[0].astype(np.float64))
          order = np.lexsort((np.broadcast_to(np.arange(n), logits.shape), -logits), axis=-1)
          out['checks'].append({'inputs': name, 'dtype': dtype, 'selection': 'full vs NumPy',
                                'mismatched': int((want[0] != order[..., :k]).sum())})
        for selection in SELECTIONS[1:]:
          out['checks'].append({'inputs': name, 'dtype': dtype, 'selection': selection,
                                'mismatched': int((picked[selection] != want).sum())})
    out['passed'] = all(c['mismatched'] == 0 for c in out['checks'])
    return out

  def check_train_steps(self) -> dict:
    """TRAIN_MATCH_STEPS train steps of a narrow AiT on the device and on the host's CPU
    backend, from the same initial state on the same batch; every step's loss compared."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from ait_jax import bench  # pylint: disable=g-import-not-at-top
    from ait_jax import train  # pylint: disable=g-import-not-at-top
    c = self.config('small', 'float32', 512, vit=False)
    c.model.update(depth=1, width=64, mlp_dim=128, num_heads=1, bottleneck_k=64)
    c.batch_size = c.eval_batch_size = 8 if self.smoke else 64
    losses, params = {}, {}
    cpu = jax.devices('cpu')[0]
    # On a CPU host (--smoke) the device is the host's CPU backend: one run, compared with itself.
    runs = (('device', self.device),) if self.device == cpu else (
        ('device', self.device), ('cpu', cpu))
    with jax.default_matmul_precision('highest'):
      for name, device in runs:
        trainer = train.Trainer(c, devices=[device])
        state = trainer.init(trainer.rng)
        batch = bench.synthetic_batch(trainer, c.batch_size)
        step = trainer.steps_fn(1)
        got = []
        for _ in range(TRAIN_MATCH_STEPS):
          state, metrics = step(state, [batch])
          got.append(metrics['loss'][0])
        losses[name] = np.asarray(jax.device_get(got), np.float64)
        params[name] = jax.device_get(state.params)
    losses.setdefault('cpu', losses['device'])
    params.setdefault('cpu', params['device'])
    rel = np.abs(losses['device'] - losses['cpu']) / np.maximum(np.abs(losses['cpu']), 1e-12)
    param_rel = max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) /
                          max(np.linalg.norm(np.asarray(b, np.float64)), 1e-12))
                    for a, b in zip(jax.tree.leaves(params['device']),
                                    jax.tree.leaves(params['cpu'])))
    return {'steps': TRAIN_MATCH_STEPS, 'batch': c.batch_size, 'dims': dict(
                depth=1, width=64, mlp_dim=128, num_heads=1, bottleneck_k=64),
            'precision': 'highest', 'rtol': TRAIN_MATCH_RTOL,
            'loss_device': losses['device'].tolist(), 'loss_cpu': losses['cpu'].tolist(),
            'max_loss_rel_diff': float(rel.max()), 'max_param_rel_diff': param_rel,
            'passed': bool(rel.max() <= TRAIN_MATCH_RTOL)}

  def correctness(self) -> None:
    for name, check in (('selections', self.check_selections),
                        ('train_steps_vs_cpu', self.check_train_steps)):
      t = time.monotonic()
      try:
        self.result['correctness'][name] = check()
      except Exception as e:  # pylint: disable=broad-except  (recorded; the timings still run)
        self.result['correctness'][name] = {'passed': False, 'error': _error(e)}
      self.result['correctness'][name]['seconds'] = time.monotonic() - t
      print(f"correctness {name}: "
            f"{'passed' if self.result['correctness'][name]['passed'] else 'FAILED'} "
            f"({self.result['correctness'][name]['seconds']:.1f} s)", flush=True)
      self.save()

  # Timings ----------------------------------------------------------------------------------

  def cells(self):
    for preset, dtype, batch in SMOKE_GROUPS if self.smoke else GROUPS:
      yield preset, dtype, batch, True, None
      for selection in SMOKE_SELECTIONS if self.smoke else SELECTIONS:
        yield preset, dtype, batch, False, selection

  def run_cell(self, preset, dtype, batch, vit, selection) -> None:
    from ait_jax import bench  # pylint: disable=g-import-not-at-top
    arch = 'vit' if vit else 'ait'
    cell = {'arch': arch, 'preset': preset, 'dtype': dtype, 'batch': batch,
            'selection': selection}
    kind = (arch, preset)
    guess = self.durations.get(kind, 0.0 if self.smoke else FIRST_GUESS_S[preset])
    left = self.budget_s - self.elapsed()
    if guess > left:
      took = (f'the last {arch}-{preset} cell took' if kind in self.durations else
              f'a first {arch}-{preset} cell is guessed at')
      cell['skipped'] = f'{left:.0f} s of the {self.budget_s:.0f} s budget left; {took} {guess:.0f} s'
      self.result['skipped'].append(cell)
      print(f"skipped {arch}-{preset} {dtype} batch {batch} {selection or ''}: "
            f"{cell['skipped']}", flush=True)
      return
    profile_dir = None
    if (preset, dtype, batch) == PROFILED and selection in (None, 'full'):
      profile_dir = os.path.join(self.out_dir, 'profile', f'{arch}_{preset}_{dtype}')
    t = time.monotonic()
    try:
      config = self.config(preset, dtype, batch, vit, selection or 'full')
      row = bench.benchmark(config, devices=[self.device], steps=self.steps, warmup=self.warmup,
                            peak_tflops=None, profile_dir=profile_dir)
      cell.update({k: row[k] for k in (
          'batch', 'dims', 'compile_s', 'ms_per_step_median', 'ms_per_step_pipelined',
          'images_per_s', 'analytic_flops_per_step', 'achieved_tflops', 'peak_bytes_in_use',
          'xla_bytes_per_device', 'xla_memory', 'final_loss')})
      if row.get('profile'):
        self.result['profiles'][arch] = row['profile']
    except Exception as e:  # pylint: disable=broad-except  (an OOM must not lose the run)
      cell['error'] = _error(e)
    cell['seconds'] = time.monotonic() - t
    self.durations[kind] = cell['seconds']
    self.result['cells'].append(cell)
    self.save()
    if 'error' in cell:
      print(f"{arch}-{preset} {dtype} batch {batch} {selection or ''}: error {cell['error']}",
            flush=True)
    else:
      print(f"{arch}-{preset} {dtype} batch {batch} {selection or 'dense'}: "
            f"{cell['ms_per_step_pipelined']:.2f} ms/step, {cell['images_per_s']:,.0f} images/s, "
            f"compiled in {cell['compile_s']:.1f} s, cell {cell['seconds']:.1f} s "
            f"({self.elapsed():.0f} s of {self.budget_s:.0f})", flush=True)

  def run(self) -> dict:
    print(f"GPU suite on {self.device.device_kind} ({self.device.platform}); budget "
          f"{self.budget_s:.0f} s{'; smoke sizes' if self.smoke else ''}", flush=True)
    def stop(signum, frame):
      del frame
      raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)  # launch/gpu_measure.sh's hard limit
    try:
      self.correctness()
      for cell in self.cells():
        self.run_cell(*cell)
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM: stop, and still save and print the table
      self.result['interrupted'] = f'stopped by {e or "SIGINT"} after {self.elapsed():.0f} s'
      print(self.result['interrupted'], flush=True)
    finally:
      signal.signal(signal.SIGTERM, previous)
    self.save()
    print('\n' + format_report(self.result), flush=True)
    return self.result


def _memory_stats(device) -> dict:
  try:
    return device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (not every backend has them)
    return {}


def _error(e: BaseException) -> str:
  """One line: the exception's type and first line, and where in this package it came from."""
  frames = [f for f in traceback.extract_tb(e.__traceback__) if 'ait_jax' in f.filename]
  at = f' at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}' if frames else ''
  return f'{type(e).__name__}: {errors.one_line(str(e))[:300]}{at}'


def _gib(x) -> str:
  return 'n/a' if x is None else f'{x / 2 ** 30:.2f}'


def _table(head, lines) -> list:
  lines = [tuple(head)] + [tuple(map(str, line)) for line in lines]
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  out = ['  '.join(v.rjust(w) for v, w in zip(line, widths)) for line in lines]
  out.insert(1, '  '.join('-' * w for w in widths))
  return out


def format_report(result: dict) -> str:
  """The suite's table: correctness, timings with AiT/ViT, memory, profiles, targets, anchors."""
  hw = result['hardware']
  out = [f"GPU suite: {hw['device_kind']} ({hw['platform']}), jax {hw['jax']}, "
         f"{result['elapsed_s']:.0f} s of a {result['budget_s']:.0f} s budget"
         f"{', SMOKE sizes (not a measurement)' if result['smoke'] else ''}"
         f"{', ' + result['interrupted'] if result.get('interrupted') else ''}", '']
  sel = result['correctness'].get('selections', {})
  tr = result['correctness'].get('train_steps_vs_cpu', {})
  out.append('Correctness')
  if 'checks' in sel:
    bad = [c for c in sel['checks'] if c['mismatched']]
    out.append(f"  selections vs lax.top_k ({len(sel['checks'])} checks: ties and Gaussian, "
               f"float32 and bfloat16, {', '.join(SELECTIONS)}): "
               + ('all picked the same tokens' if not bad else
                  'MISMATCH in ' + '; '.join(f"{c['selection']} {c['dtype']} {c['inputs']}: "
                                             f"{c['mismatched']}" for c in bad)))
  else:
    out.append(f"  selections: {sel.get('error', 'not run')}")
  if 'max_loss_rel_diff' in tr:
    out.append(f"  {tr['steps']} train steps, device vs host CPU (precision highest): max "
               f"relative loss difference {tr['max_loss_rel_diff']:.2e} (tolerance "
               f"{tr['rtol']:.0e}: {'passed' if tr['passed'] else 'FAILED'}), parameters "
               f"{tr['max_param_rel_diff']:.2e}")
  else:
    out.append(f"  train steps vs CPU: {tr.get('error', 'not run')}")
  out.append('')
  cells = result['cells']
  vit_ips = {(c['preset'], c['dtype'], c['batch']): c['images_per_s'] for c in cells
             if c['arch'] == 'vit' and c.get('images_per_s')}
  rows = []
  for c in cells:
    name = f"{c['arch']}-{c['preset']}"
    if 'error' in c:
      rows.append((name, c['dtype'], c['batch'], c['selection'] or 'dense', 'error', '', '', '',
                   '', c['error'][:60]))
      continue
    vit = vit_ips.get((c['preset'], c['dtype'], c['batch']))
    ratio = f"{c['images_per_s'] / vit:.3f}" if vit and c['arch'] == 'ait' else ''
    rows.append((name, c['dtype'], c['batch'], c['selection'] or 'dense',
                 f"{c['ms_per_step_pipelined']:.2f}", f"{c['images_per_s']:,.0f}", ratio,
                 _gib(c['xla_bytes_per_device']), _gib(c['peak_bytes_in_use']),
                 f"{c['compile_s']:.1f}"))
  out.append(f"Timings ({result['steps_per_cell']} steps per cell after {result['warmup_per_cell']}"
             " warm-up; ms/step of the pipelined pass; XLA GiB: the step's planned memory; "
             "peak GiB: the device's peak so far in this process, which never resets)")
  out += ['  ' + line for line in _table(
      ('model', 'dtype', 'batch', 'selection', 'ms/step', 'images/s', 'AiT/ViT', 'XLA GiB',
       'peak GiB', 'compile s'), rows)]
  for s in result['skipped']:
    out.append(f"  skipped {s['arch']}-{s['preset']} {s['dtype']} batch {s['batch']} "
               f"{s['selection'] or ''}: {s['skipped']}")
  profiles = result['profiles']
  if profiles:
    out += ['', 'Profile, Small bfloat16 batch 512 (ms per step by op kind; AiT selection full)']
    kinds = sorted({k for p in profiles.values() for k in p['by_kind_ms']},
                   key=lambda k: -profiles.get('ait', {}).get('by_kind_ms', {}).get(k, 0.0))
    get = lambda arch, k: profiles.get(arch, {}).get('by_kind_ms', {}).get(k)
    rows = []
    for k in kinds + ['all ops']:
      a = profiles['ait']['ops_ms_per_step'] if k == 'all ops' and 'ait' in profiles else get(
          'ait', k)
      v = profiles['vit']['ops_ms_per_step'] if k == 'all ops' and 'vit' in profiles else get(
          'vit', k)
      rows.append((k, _ms(a), _ms(v), _ms(None if a is None else a - (v or 0.0))))
    out += ['  ' + line for line in _table(('kind', 'AiT ms', 'ViT ms', 'AiT - ViT'), rows)]
    if 'ait' in profiles and profiles['ait'].get('by_scope_ms'):
      out.append('  AiT by scope: ' + ', '.join(
          f'{k} {v:.3f} ms' for k, v in profiles['ait']['by_scope_ms'].items()))
    for arch in ('ait', 'vit'):
      if arch in profiles:
        out.append(f'  top ops, {arch}:')
        for r in profiles[arch]['top_ops'][:8]:
          out.append(f"    {r['ms_per_step']:>8.3f} ms {r['share']:>6.1%}  {r['op'][:34]:<34} "
                     f"{r['kind']:<20} {r['scope'] or ''}")
  out += ['', 'Targets (issue 38)']
  out += ['  ' + line for line in _table(
      ('target', 'reached', 'where', 'met'),
      [(t['target'], 'n/a' if t['value'] is None else (
          f"{t['value']:.3f}" if t['goal'] < 10 else f"{t['value']:,.0f}"), t['where'],
        {True: 'yes', False: 'NO', None: 'not measured'}[t['met']]) for t in result['targets']])]
  out += ['', 'Anchors measured earlier on one H200, batch 512 (ms/step; images/s = 512000/ms)']
  for name, ms in ANCHORS:
    out.append(f'  {name}: {ms} ms ({512000 / ms:,.0f} images/s)')
  return '\n'.join(out)


def _ms(x) -> str:
  return 'n/a' if x is None else f'{x:.3f}'


def run(out_dir: str, *, smoke: bool, budget_s: float | None = None, command: str = '') -> dict:
  """Runs the suite into out_dir; returns its result (also in out_dir/gpu_suite.json)."""
  import jax  # pylint: disable=g-import-not-at-top
  platform_name = jax.devices()[0].platform
  if platform_name != 'gpu' and not smoke:
    raise errors.ConfigError(
        f'--suite=gpu measures a GPU, and JAX sees {platform_name} devices; add --smoke to run '
        'it with tiny sizes here (a check of the code, not a measurement).')
  steps, warmup = (2, 1) if smoke else (10, 2)
  suite = Suite(out_dir, smoke=smoke, budget_s=DEFAULT_BUDGET_S if budget_s is None else budget_s,
                steps=steps, warmup=warmup, command=command or ' '.join(sys.argv))
  return suite.run()

