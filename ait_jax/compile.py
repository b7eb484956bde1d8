r"""Compiles the train and eval steps for a Cloud TPU slice on any host, and says whether they fit.

Learning on a rented slice that a config runs out of HBM costs the slice. libtpu (the `tpu` extra)
compiles for any slice on an ordinary x86 host (jax.experimental.topologies): the steps are built
exactly as `ait_jax.main` builds them (train.Trainer: mesh, shardings, donation) and compiled on
abstract inputs; nothing runs. The report gives HBM per chip against the chip's, XLA's FLOPs and
the collectives by op and model scope, from the TPU executable itself. Usage:
  python -m ait_jax.compile --config=configs/cifar100.py:model=base --topology=v5e-256 \
      --json=out.json
  python -m ait_jax.compile --config=configs/cifar100.py:model=large --topology=v5e-16 \
      --steps=train --find_largest_batch          # also the largest per-chip batch that fits
  python -m ait_jax.compile --table=DIR           # one markdown table of a folder of --json files
--topology takes the slice names gcloud takes (v4-8, v5litepod-16 or v5e-16, v5p-8, v6e-8, ...);
--num_slices=N compiles for N such slices joined by the data-center network. Exit status: 0 when
the steps fit, 1 when one does not (one sentence says so, with the largest per-chip batch that
fits, found by compiling), 2 for a user's mistake (one `error:` line). No step time is reported:
the TPU cost model's `optimal_seconds` is no measurement (it comes out negative for some programs).
"""
import contextlib
import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import time

from absl import flags
from ml_collections import config_flags

from ait_jax import cli
from ait_jax import config_overrides
from ait_jax import errors

GIB = 2 ** 30
MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice as libtpu's topology description knows it."""
  name: str  # as users type it: v4-8 (TensorCores), v5e-16 (chips), ...
  accelerator_type: str  # as gcloud's --accelerator-type spells it (v5e: v5litepod-N)
  topology: str  # libtpu's topology name, e.g. v5e:4x4
  chip_config: str | None  # 'megacore': one JAX device per two-TensorCore chip (v4, v5p)
  chips_per_host_bounds: tuple | None  # None: libtpu's default (2x2 chips per host)
  wrap: tuple  # which torus dimensions have wrap-around links
  hbm_bytes: int  # per chip


# HBM per chip, from the Cloud TPU system architecture pages (docs.cloud.google.com/tpu/docs/v4,
# .../v5e, .../v5p, .../v6e): v4 32 GiB, v5e 16 GB, v5p 95 GiB, v6e 32 GB. The HBM stacks are
# binary sizes (the TPU compiler leaves 15.75 GiB of a v5e chip to programs).
_GENERATIONS = {
    # name: (topology prefix, megacore, TensorCores per chip in the name, HBM GiB, {chips: shape})
    'v4': ('v4', True, 2, 32, {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4',
                               128: '4x4x8', 256: '4x8x8', 512: '8x8x8', 1024: '8x8x16',
                               2048: '8x16x16'}),
    'v5p': ('v5', True, 2, 95, {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4',
                                128: '4x4x8', 256: '4x8x8', 512: '8x8x8', 1024: '8x8x16',
                                2048: '8x16x16', 4096: '16x16x16', 6144: '16x16x24'}),
    'v5e': ('v5e', False, 1, 16, {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8',
                                  128: '8x16', 256: '16x16'}),
    'v6e': ('v6e', False, 1, 32, {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8',
                                  128: '8x16', 256: '16x16'}),
}


def _slices() -> dict:
  """Every slice name users type -> Slice."""
  out = {}
  for gen, (prefix, megacore, per_chip, hbm_gib, shapes) in _GENERATIONS.items():
    for chips, shape in shapes.items():
      dims = [int(x) for x in shape.split('x')]
      if megacore:  # 3D torus: slices of whole 4x4x4 cubes wrap around in every dimension
        wrap = (chips >= 64,) * 3
      else:  # 2D torus: a dimension of the full 16-chip side wraps around
        wrap = tuple(d == 16 for d in dims) + (False,)
      name = f'{gen}-{chips * per_chip}'
      accelerator = f'v5litepod-{chips}' if gen == 'v5e' else name
      # The 8-chip v5e and v6e slices are one host of 8 chips (ct5lp-hightpu-8t, ct6e-standard-8t);
      # the others have 4 chips per host, libtpu's default, or 1.
      bounds = {1: (1, 1, 1), 8: (2, 4, 1)}.get(chips) if not megacore else None
      spec = Slice(name, accelerator, f'{prefix}:{shape}', 'megacore' if megacore else None,
                   bounds, wrap, hbm_gib * GIB)
      out[name] = spec
      if gen == 'v5e':
        out[accelerator] = spec
  return out


SLICES = _slices()


def parse_slice(name: str) -> Slice:
  if name not in SLICES:
    groups = {}
    for key in SLICES:
      gen, n = key.rsplit('-', 1)
      groups.setdefault(gen, []).append(n)
    valid = '; '.join(f'{gen}-{{{",".join(ns)}}}' for gen, ns in groups.items())
    raise errors.ConfigError(
        f'Unknown --topology={name!r}; valid slices: {valid} (v4 and v5p count '
        'TensorCores, two per chip; v5e and v6e count chips).')
  return SLICES[name]


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file with its variant, as for ait_jax.main; override any '
      'field with --config.<field>=value.', lock_config=True, flag_values=fv)
  flags.DEFINE_string('topology', None, 'The Cloud TPU slice: v4-8 ... v4-4096, v5e-1 ... '
                      'v5e-256 (or v5litepod-N), v5p-8 ..., v6e-1 ... v6e-256.', flag_values=fv)
  flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined by the data-center network '
                       '(multi-slice); the data axis spans them all.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum('steps', 'both', ['both', 'train', 'eval'], 'Which steps to compile.',
                    flag_values=fv)
  flags.DEFINE_bool('find_largest_batch', False, 'Also find, by compiling, the largest '
                    'power-of-two per-chip batch that fits (done anyway for a step that does not '
                    'fit).', flag_values=fv)
  flags.DEFINE_string('json', None, 'Write the report as JSON to this path.', flag_values=fv)
  flags.DEFINE_string('table', None, 'Print one markdown table of the train steps of every '
                      '*.json report in this folder, and compile nothing.', flag_values=fv)


@contextlib.contextmanager
def _libtpu_environment(spec: Slice):
  """What libtpu reads when it starts, set for a host that is no TPU VM (and restored).

  Without them it asks the TPU VM metadata server, and prints a warning for each of the
  accelerator type and the worker hostnames it could not learn; its lock file guards TPU chips
  that only compile-only devices are made of here, so several processes may compile at once.
  """
  values = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_ACCELERATOR_TYPE': spec.accelerator_type,
            'TPU_WORKER_HOSTNAMES': 'localhost', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  added = [k for k in values if k not in os.environ]
  os.environ.update({k: values[k] for k in added})
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


def topology_devices(spec: Slice, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `spec` (no TPU needed)."""
  if importlib.util.find_spec('libtpu') is None:
    raise errors.UserError("Compiling for a TPU needs libtpu: pip install -e '.[tpu]'.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {'wrap': spec.wrap, 'num_slices': num_slices}
  if spec.chip_config:
    kwargs['chip_config_name'] = spec.chip_config
  if spec.chips_per_host_bounds:
    kwargs['chips_per_host_bounds'] = spec.chips_per_host_bounds
  with _libtpu_environment(spec):
    return list(topologies.get_topology_desc(topology_name=spec.topology, platform='tpu',
                                             **kwargs).devices)


def hosts_of(devices) -> int:
  """Hosts (JAX processes) the devices belong to, over all slices."""
  return len({d.process_index for d in devices})


_OOM_PATTERNS = (  # the TPU compiler's out-of-memory messages, amounts in binary units
    re.compile(r'required for .*?\((?P<needed>[\d.]+)(?P<nu>[KMGT]?)\) exceeds available HBM '
               r'\((?P<avail>[\d.]+)(?P<au>[KMGT]?)\)'),
    re.compile(r'Used (?P<needed>[\d.]+)(?P<nu>[KMGT]?) of (?P<avail>[\d.]+)(?P<au>[KMGT]?) hbm'),
)
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def parse_oom(message: str) -> dict:
  """What an out-of-memory compile error says was needed and available (bytes, or None)."""
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      return {'needed_bytes': int(float(m['needed']) * _UNITS[m['nu']]),
              'available_bytes': int(float(m['avail']) * _UNITS[m['au']]),
              'message': errors.one_line(message)[:500]}
  return {'needed_bytes': None, 'available_bytes': None, 'message': errors.one_line(message)[:500]}


def _state_bytes(trainer, which: str) -> int:
  """Bytes one chip holds of what the step takes besides the batch (train: the whole state;
  eval: parameters and memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  state, shardings = trainer.abstract_state, trainer.state_sharding
  if which == 'eval':
    state, shardings = (state.params, state.memory), (shardings.params, shardings.memory)
  return sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize
             for a, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))


def compile_step(config, devices, which: str, hbm_bytes: int) -> dict:
  """Compiles the train or eval step of `config` as ait_jax.main builds it; one report."""
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax import bench  # pylint: disable=g-import-not-at-top
  from ait_jax import sharding  # pylint: disable=g-import-not-at-top
  from ait_jax import train  # pylint: disable=g-import-not-at-top
  trainer = train.Trainer(config, devices=devices)
  state = trainer.abstract_with_shardings()
  batch_size = config.batch_size if which == 'train' else config.eval_batch_size
  shards = trainer.mesh.shape[sharding.DATA]
  if which == 'train':
    k = int(config.steps_per_call)
    batch = bench.abstract_batch(trainer, batch_size)
    fn, args = trainer.steps_fn(k), (state, [batch] * k)
  else:
    fn, args = trainer.eval_step, (state.params, state.memory,
                                   bench.abstract_batch(trainer, batch_size, eval_batch=True))
  report = {'global_batch': batch_size, 'per_chip_batch': batch_size // shards,
            'state_bytes_per_chip': _state_bytes(trainer, which)}
  t0 = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    oom = parse_oom(str(e))
    report.update(compile_s=time.perf_counter() - t0, fits=False, oom=oom, hbm=None,
                  needed_bytes=oom['needed_bytes'], flops_per_chip=None, collectives=None)
  else:
    report['compile_s'] = time.perf_counter() - t0
    hbm = bench.memory_breakdown(compiled)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    parts = bench.collectives(compiled.as_text(), bench.param_shapes(trainer))
    report.update(fits=hbm['total'] <= hbm_bytes, oom=None, hbm=hbm, needed_bytes=hbm['total'],
                  flops_per_chip=cost.get('flops'),
                  collectives={'by_op': bench.collective_totals(parts, 'op'),
                               'by_scope': bench.collective_totals(parts, 'scope'),
                               'ops': parts})
  if report['needed_bytes'] is not None:
    report['margin_bytes'] = hbm_bytes - report['needed_bytes']
  return report


def largest_fitting(lo: int, hi: int | None, e_min: int, e_max: int, fits) -> int | None:
  """The largest exponent e in [e_min, e_max] with fits(e), assuming that a batch that fits
  keeps fitting when halved: lo fits (or is e_min - 1), hi does not (None: unknown). Doubles the
  step upwards until a failure, then bisects; None when nothing fits."""
  step = 1
  while hi is None:
    e = min(lo + step, e_max)
    if e <= lo:
      break
    if fits(e):
      lo, step = e, step * 2
    else:
      hi = e
  hi = e_max + 1 if hi is None else hi
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo if lo >= e_min else None


_MAX_EXPONENT = 16  # 65,536 images per chip: no search goes higher


def search_batch(config, devices, which: str, report: dict, hbm_bytes: int, hosts: int) -> dict:
  """The largest power-of-two per-chip batch of `which` that fits, by compiling; its trials."""
  from ait_jax import sharding  # pylint: disable=g-import-not-at-top
  from ait_jax import validation  # pylint: disable=g-import-not-at-top
  field = 'batch_size' if which == 'train' else 'eval_batch_size'
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model, devices)
  shards = mesh.shape[sharding.DATA]

  def with_batch(e):
    c = config.copy_and_resolve_references()
    c[field] = 2 ** e * shards
    try:  # e.g. bottleneck_k above a small batch's tokens, or more images than the dataset has
      validation.validate(c, mesh, processes=hosts, batch_fields=(field,))
    except ValueError:
      return None
    return c

  valid = [e for e in range(_MAX_EXPONENT + 1) if with_batch(e) is not None]
  trials = []
  if not valid:
    return {'largest_per_chip_batch': None, 'trials': trials}

  def fits(e):
    r = compile_step(with_batch(e), devices, which, hbm_bytes)
    trials.append({'per_chip_batch': 2 ** e, 'fits': r['fits'], 'needed_bytes': r['needed_bytes'],
                   'compile_s': r['compile_s']})
    print(f"{which} step at {2 ** e} images per chip: {'fits' if r['fits'] else 'does not fit'} "
          f"({_size(r['needed_bytes'])} per chip; compiled in {r['compile_s']:.0f} s)", flush=True)
    return r['fits']

  e_min, e_max = valid[0], valid[-1]
  p = report['per_chip_batch']
  if report['fits']:
    lo, hi = min(int(math.log2(p)), e_max), None
  else:
    lo, hi = e_min - 1, max(e_min, math.ceil(math.log2(p)))
    if report['state_bytes_per_chip'] >= hbm_bytes:  # no batch can fit: spare the compiles
      lo = hi = None
  e = largest_fitting(lo, hi, e_min, e_max, fits) if lo is not None else None
  return {'largest_per_chip_batch': None if e is None else 2 ** e,
          'largest_global_batch': None if e is None else 2 ** e * shards, 'trials': trials}


def _size(n) -> str:
  """Bytes for people: GiB from 1 GiB on, else MiB."""
  if n is None:
    return 'n/a'
  return f'{n / GIB:.2f} GiB' if abs(n) >= GIB else f'{n / MIB:.1f} MiB'


def does_not_fit_sentence(which: str, report: dict, spec: Slice, kind: str) -> str:
  """One sentence: what the step needs per chip against the chip's HBM, and what would fit."""
  needed = report['needed_bytes']
  need = (f'runs out of HBM in the compiler' if needed is None else
          f'needs {_size(needed)} of HBM per chip' +
          (" (the compiler's count)" if report['oom'] else ''))
  field = 'batch_size' if which == 'train' else 'eval_batch_size'
  best = report.get('search', {}).get('largest_per_chip_batch')
  if best:
    fix = (f'the largest per-chip batch that fits is {best} '
           f'(--config.{field}={report["search"]["largest_global_batch"]})')
  elif report['state_bytes_per_chip'] >= spec.hbm_bytes:
    what = 'the train state alone takes' if which == 'train' else 'the parameters alone take'
    fix = f'no batch fits: {what} {_size(report["state_bytes_per_chip"])} per chip'
  else:
    fix = 'no power-of-two per-chip batch fits'
  return (f'The {which} step {need} at {report["per_chip_batch"]} images per chip (global batch '
          f'{report["global_batch"]}), and a {kind} chip of {spec.name} has '
          f'{_size(spec.hbm_bytes)}; {fix}.')


def _model_label(model: dict) -> str:
  from ait_jax import models  # pylint: disable=g-import-not-at-top
  label = f"{'ViT' if model['vit'] else 'AiT'}-{model['preset'].capitalize()}"
  preset = models.PRESETS.get(model['preset'], {})
  changed = [f'{k} {model[k]}' for k in ('depth', 'width') if model[k] != preset.get(k)]
  return label + (f" ({', '.join(changed)})" if changed else '')


def _workspace(report: dict) -> tuple:
  """(mean MiB per layer, mean ops per layer) of the workspace scopes, or (None, None)."""
  scopes = [v for k, v in report['collectives']['by_scope'].items() if k.endswith('/workspace')]
  if not scopes:
    return None, None
  return (sum(v['bytes'] for v in scopes) / len(scopes) / MIB,
          sum(v['ops'] for v in scopes) / len(scopes))


def format_report(result: dict) -> str:
  steps_ = [s for s in ('train', 'eval') if s in result]
  rows = [('', *steps_)]

  def row(label, fn):
    rows.append((label, *[fn(result[s]) for s in steps_]))

  row('global batch', lambda r: str(r['global_batch']))
  row('per-chip batch', lambda r: str(r['per_chip_batch']))
  for key, label in (('arguments', 'HBM per chip: arguments'), ('temporaries', '  temporaries'),
                     ('outputs', '  outputs'), ('aliases', '  aliases (donated, subtracted)'),
                     ('generated_code', '  generated code')):
    row(label, lambda r, key=key: _size(r['hbm'] and r['hbm'][key]))
  row('  total needed', lambda r: _size(r['needed_bytes']) + (' (compiler)' if r['oom'] else ''))
  row('  capacity', lambda r: _size(result['hbm_capacity_bytes']))
  row('  fits (margin)', lambda r: ('yes' if r['fits'] else 'NO') + (
      f" ({_size(r['margin_bytes'])})" if r.get('margin_bytes') is not None else ''))
  row('largest per-chip batch that fits', lambda r: '-' if 'search' not in r else
      str(r['search']['largest_per_chip_batch'] or 'none'))
  row('XLA GFLOP per step per chip', lambda r: 'n/a' if not r['flops_per_chip'] else
      f"{r['flops_per_chip'] / 1e9:,.1f}")
  scopes = sorted({k for s in steps_ if result[s]['collectives']
                   for k in result[s]['collectives']['by_scope']},
                  key=lambda k: (k.endswith('/workspace'), k))
  ops = sorted({k for s in steps_ if result[s]['collectives']
                for k in result[s]['collectives']['by_op']})

  def coll(r, group, key):
    v = r['collectives'] and r['collectives'][group].get(key)
    return f"{v['bytes'] / MIB:,.3f} MiB, {v['ops']} ops" if v else '-'

  rows.append(('collectives per step (on one chip)', *[''] * len(steps_)))
  for op in ops:
    row(f'  {op}', lambda r, op=op: coll(r, 'by_op', op))
  for scope in scopes:
    row(f'  {scope}', lambda r, scope=scope: coll(r, 'by_scope', scope))
  row('  workspace, mean per layer', lambda r: '-' if not r['collectives'] or
      _workspace(r)[0] is None else f'{_workspace(r)[0]:,.3f} MiB, {_workspace(r)[1]:g} ops')
  row('compile s', lambda r: f"{r['compile_s']:.1f}")
  widths = [max(len(str(x[i])) for x in rows) for i in range(len(rows[0]))]
  slices = f" x {result['num_slices']} slices" if result['num_slices'] > 1 else ''
  out = [f"{result['config_spec']} on {result['slice']}{slices} "
         f"({result['device_kind']}, topology {result['topology']}): {result['chips']} chips, "
         f"{result['hosts']} hosts; compiled with libtpu {result['libtpu']}, nothing run"]
  out += ['  '.join(str(v).ljust(w) for v, w in zip(x, widths)).rstrip() for x in rows]
  return '\n'.join(out)


_TABLE_HEAD = ('config', 'model', 'dtype', 'slice', 'chips', 'global batch', 'per-chip batch',
               'HBM per chip', 'fits', 'largest per-chip batch', 'GFLOP per chip per step',
               'collectives MiB per step', 'workspace MiB per layer', 'workspace ops per layer',
               'gradients MiB', 'compile s', 'search s')


def table(folder: str) -> str:
  """The markdown table of the train steps of every report in `folder` (--table)."""
  from ait_jax import models  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(folder, '*.json')))
  if not paths:
    raise FileNotFoundError(f'No *.json report in {folder}; write them with --json.')
  order = list(models.PRESETS)
  reports = []
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    if 'train' not in r:
      continue
    m = r['model']
    reports.append(((order.index(m['preset']) if m['preset'] in order else len(order), m['vit'],
                     m['dtype'], r['slice'], r['num_slices']), r))
  lines = ['| ' + ' | '.join(_TABLE_HEAD) + ' |', '|' + '---|' * len(_TABLE_HEAD)]
  for _, r in sorted(reports, key=lambda x: x[0]):
    t = r['train']
    c = t['collectives']
    ws_mib, ws_ops = _workspace(t) if c else (None, None)
    grads = c and c['by_scope'].get('parameter gradients')
    best = t.get('search', {}).get('largest_per_chip_batch', '-') if 'search' in t else '-'
    overrides = [o for o in r.get('overrides', []) if not o.startswith('--config.model.dtype=')]
    cells = (' '.join([f"`{r['config_spec']}`"] + [f'`{o}`' for o in overrides]),
             _model_label(r['model']), r['model']['dtype'],
             r['slice'] + (f" x {r['num_slices']}" if r['num_slices'] > 1 else ''),
             r['chips'], r['train']['global_batch'], t['per_chip_batch'],
             _size(t['needed_bytes']) + (' (compiler)' if t['oom'] else ''),
             'yes' if t['fits'] else 'no', best if best is not None else 'none',
             '-' if not t['flops_per_chip'] else f"{t['flops_per_chip'] / 1e9:,.1f}",
             '-' if not c else f"{sum(v['bytes'] for v in c['by_op'].values()) / MIB:,.1f}",
             '-' if ws_mib is None else f'{ws_mib:,.2f}', '-' if ws_ops is None else f'{ws_ops:g}',
             '-' if not grads else f"{grads['bytes'] / MIB:,.1f}", f"{t['compile_s']:.0f}",
             f"{sum(x['compile_s'] for x in t['search']['trials']):.0f} "
             f"({len(t['search']['trials'])} compiles)" if t.get('search') else '-')
    lines.append('| ' + ' | '.join(str(x) for x in cells) + ' |')
  return '\n'.join(lines)


def _command(fv: flags.FlagValues, spec_arg: str) -> str:
  """This run as one shell line (also when run in process, where sys.argv is another's)."""
  words = ['python', '-m', 'ait_jax.compile', f'--config={spec_arg}']
  words += config_overrides.as_flags(config_flags.get_override_values(fv['config']))
  words += [f'--{name}={fv[name].value}' for name in ('topology', 'num_slices', 'steps', 'json')
            if fv[name].present]
  words += ['--find_largest_batch'] * bool(fv.find_largest_batch)
  return shlex.join(words)


def main(fv: flags.FlagValues) -> dict | None:
  if fv.table:
    print(table(fv.table))
    return None
  if fv.config is None:
    cli.fail('Pass --config=configs/<dataset>.py[:variant] (e.g. configs/triangle.py:quick).')
  cli.require(fv, 'topology', hint='a slice such as v5e-16 or v4-8')
  spec = parse_slice(fv.topology)
  config = fv.config
  if config.device_data:
    raise errors.ConfigError('--config.device_data=True keeps the dataset on the chips, which '
                             'ait_jax.compile does not model; compile without it.')
  from ait_jax import sharding  # pylint: disable=g-import-not-at-top
  from ait_jax import validation  # pylint: disable=g-import-not-at-top
  validation.validate(config)  # a bad config value fails here, before libtpu starts
  cli.skip_absent_tpu(force_cpu=True)  # this host only compiles
  t_start = time.perf_counter()
  devices = topology_devices(spec, fv.num_slices)
  hosts = hosts_of(devices)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model, devices)
  which = ['train', 'eval'] if fv.steps == 'both' else [fv.steps]
  # The batches against the slice's hosts, not this host's one process.
  model = validation.validate(config, mesh, processes=hosts, batch_fields=tuple(
      'batch_size' if step == 'train' else 'eval_batch_size' for step in which)).model
  c = config.model
  spec_arg = config_flags.get_config_filename(fv['config'])
  result = {
      'command': _command(fv, spec_arg),
      'config_spec': spec_arg,
      'overrides': config_overrides.as_flags(config_flags.get_override_values(fv['config'])),
      'slice': spec.name, 'accelerator_type': spec.accelerator_type, 'topology': spec.topology,
      'num_slices': fv.num_slices, 'device_kind': devices[0].device_kind, 'chips': len(devices),
      'hosts': hosts, 'hbm_capacity_bytes': spec.hbm_bytes,
      'model': {'preset': c.preset, 'vit': bool(c.vit), 'dtype': c.dtype,
                'depth': model.depth, 'width': model.width, 'selection': c.selection,
                'bottleneck_scope': c.bottleneck_scope, 'dataset': config.dataset},
      'mesh': dict(mesh.shape),
      'jax': importlib.metadata.version('jax'), 'libtpu': importlib.metadata.version('libtpu'),
      'host_cpus': os.cpu_count(),
  }
  for step in which:
    report = compile_step(config, devices, step, spec.hbm_bytes)
    if not report['fits'] or fv.find_largest_batch:
      report['search'] = search_batch(config, devices, step, report, spec.hbm_bytes, hosts)
    result[step] = report
  result['fits'] = all(result[s]['fits'] for s in which)
  result['wall_s'] = time.perf_counter() - t_start
  print(format_report(result), flush=True)
  if fv.json:
    with open(fv.json, 'w') as f:
      json.dump(result, f, indent=1)
  kind = devices[0].device_kind
  sentences = [does_not_fit_sentence(s, result[s], spec, kind) for s in which
               if not result[s]['fits']]
  if sentences:
    print('does not fit: ' + ' '.join(sentences), flush=True)
    raise SystemExit(1)
  return result


if __name__ == '__main__':
  cli.run(define_flags, main)
