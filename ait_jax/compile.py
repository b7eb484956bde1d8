r"""Compiles the train and eval steps for a Cloud TPU slice or NVIDIA GPUs on any host, and says
whether they fit.

Learning on a rented slice that a config runs out of HBM costs the slice. libtpu (the `tpu` extra)
compiles for any slice on an ordinary x86 host (jax.experimental.topologies), and JAX's CUDA
plugin for any GPU that ait_jax/gpus.py describes (no GPU, driver or CUDA library needed): the
steps are built exactly as `ait_jax.main` builds them (train.Trainer: mesh, shardings, donation)
and compiled on abstract inputs; nothing runs. The report gives memory per chip (or GPU) against
its capacity, XLA's FLOPs and the collectives by op and model scope, from the executable itself.
A compile takes from seconds (the quick configs) to several minutes (Base and Large models on
many chips); a line every 30 s says that it goes on. Usage:
  python -m ait_jax.compile --config=configs/cifar100.py:model=base --topology=v5e-256 \
      --json=out.json
  python -m ait_jax.compile --config=configs/cifar100.py:model=large --topology=v5e-16 \
      --steps=train --find_largest_batch          # also the largest per-chip batch that fits
  python -m ait_jax.compile --config=configs/cifar100.py:model=base --topology=h100x8
  python -m ait_jax.compile --table=DIR           # one markdown table of a folder of --json files
--topology takes the slice names gcloud takes (v4-8, v5litepod-16 or v5e-16, v5p-8, v6e-8, ...),
or a GPU (a100-40, a100-80, h100, h200) with its count (h100x8: one host of 8; x16 and up: hosts
of 8); --num_slices=N compiles for N TPU slices joined by the data-center network.

On a GPU the compiler never fails for memory (a 120 GiB program compiles for an 80 GB H100):
a step fits when its memory plan (memory_analysis) fits in the 75% of the GPU's memory that JAX
preallocates by default. The GPU executable has no cost analysis: its FLOPs and bytes accessed are
the CPU client's cost analysis of the optimised GPU HLO module. With no GPU to autotune on, GEMM
tiles are untuned defaults and sorts take a fallback algorithm: kernel counts are no timing.
Exit status: 0 when
the steps fit, 1 when one does not (one sentence says so, with the largest per-chip batch that
fits, found by compiling), 2 for a user's mistake (one `error:` line). No step time is reported:
the TPU cost model's `optimal_seconds` is no measurement (it comes out negative for some programs).
SIGINT or SIGTERM ends a compile at once with one line (exit status 130 or 143), writing nothing.
"""
import collections
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
import signal
import socket
import sys
import threading
import time

from absl import flags
from ml_collections import config_flags

from ait_jax import cli
from ait_jax import config_overrides
from ait_jax import errors
from ait_jax import gpus

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


# Cloud TPU Multislice joins slices over the data-center network; the largest such job Google has
# published ran 50,944 TPU v5e chips (199 v5e-256 slices, cloud.google.com/blog, November 2023).
# Beyond this many chips in all, no Cloud TPU offers it (and libtpu's topology alone would fill
# this host's memory: 100,000 slices grew to 24 GB before the kernel killed it).
MAX_MULTISLICE_CHIPS = 65_536


def parse_slice(name: str) -> Slice:
  if name not in SLICES:
    groups = {}
    for key in SLICES:
      gen, n = key.rsplit('-', 1)
      groups.setdefault(gen, []).append(n)
    valid = '; '.join(f'{gen}-{{{",".join(ns)}}}' for gen, ns in groups.items())
    models_ = ', '.join(gpus.MODELS)
    counts = ','.join(f'x{n}' for n in gpus.COUNTS[1:])
    raise errors.ConfigError(
        f'Unknown --topology={name!r}; valid slices: {valid} (v4 and v5p count '
        'TensorCores, two per chip; v5e and v6e count chips); or GPUs: '
        f'{models_}, each also with {{{counts}}} GPUs (8 per host).')
  return SLICES[name]


def parse_target(name: str, num_slices: int = 1):
  """A Slice, or a gpus.Target for a GPU name; refuses what no Cloud TPU or GPU host offers."""
  if name in gpus.TARGETS:
    if num_slices != 1:
      raise errors.ConfigError(f'--num_slices={num_slices} is for Cloud TPU slices; for more '
                               f'GPUs name their count, e.g. --topology={name.split("x")[0]}x16.')
    return gpus.TARGETS[name]
  spec = parse_slice(name)
  chips = chips_of(spec)
  if chips * num_slices > MAX_MULTISLICE_CHIPS:
    raise errors.ConfigError(
        f'--num_slices={num_slices} of {name} ({chips * num_slices:,} chips) is more than Cloud '
        f'TPU Multislice offers: at most {MAX_MULTISLICE_CHIPS:,} chips in all (the largest '
        f'published job ran 50,944), i.e. --num_slices={MAX_MULTISLICE_CHIPS // chips} or fewer.')
  return spec


def is_gpu(spec) -> bool:
  return isinstance(spec, gpus.Target)


def chips_of(spec: Slice) -> int:
  """Chips (JAX devices) of one slice."""
  return math.prod(int(x) for x in spec.topology.split(':')[1].split('x'))


def planned_hosts(spec, num_slices: int = 1) -> int:
  """The hosts of the target, known before any device is made (hosts_of() counts them after)."""
  if is_gpu(spec):
    return spec.hosts
  chips = chips_of(spec)
  per_host = math.prod(spec.chips_per_host_bounds) if spec.chips_per_host_bounds else 4
  return max(1, chips // per_host) * num_slices


def capacity_bytes(spec) -> int:
  """What one chip (or GPU) gives a program: a TPU chip's HBM, JAX's default share of a GPU's."""
  return spec.usable_bytes if is_gpu(spec) else spec.hbm_bytes


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  config_flags.DEFINE_config_file(
      'config', None, 'A configs/*.py file with its variant, as for ait_jax.main; override any '
      'field with --config.<field>=value.', lock_config=True, flag_values=fv)
  flags.DEFINE_string('topology', None, 'The Cloud TPU slice: v4-8 ... v4-4096, v5e-1 ... '
                      'v5e-256 (or v5litepod-N), v5p-8 ..., v6e-1 ... v6e-256; or GPUs: a100-40, '
                      'a100-80, h100, h200, and e.g. h100x8 for one host of 8.', flag_values=fv)
  flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined by the data-center network '
                       f'(multi-slice; at most {MAX_MULTISLICE_CHIPS:,} chips in all); the data '
                       'axis spans them all.', lower_bound=1, flag_values=fv)
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


def topology_devices(spec, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `spec`, or of the GPUs (no TPU needed)."""
  if is_gpu(spec):
    return gpus.devices(spec)
  if importlib.util.find_spec('libtpu') is None:
    raise errors.UserError("Compiling for a TPU needs libtpu: pip install -c constraints.txt -e '.[tpu]'.")
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


# What the GPU compiler's top-level instructions launch, by kind (kernels()).
_NOT_KERNELS = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while',
                'conditional', 'call', 'after-all', 'partition-id', 'replica-id', 'add-dependency',
                'opt-barrier', 'custom-call-done', 'copy-done', 'send-done', 'recv-done'}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
                'collective-broadcast')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?[\w.\-]+ = .*?\s([a-z][a-z0-9\-]*)\((.*)$')


def kernels(hlo_text: str) -> dict:
  """Kernels of an optimised GPU HLO module by kind: gemm (cuBLAS, cuDNN or Triton GEMMs),
  fusion, sort, custom call (other library calls, e.g. __gpu$TopK), collective, copy, other.

  Each top-level instruction of the entry computation and of its loops' bodies launches (at
  most) one kernel; fused computations, reducers and comparators are inside one, and are skipped.
  A loop's body counts once, as the text has it.
  """
  comps, name, inner = {}, None, set()
  for line in hlo_text.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if head and not line.startswith(' '):
      name = 'ENTRY' if head[1] else head[2]
      comps[name] = []
      continue
    if name is None or line.startswith('}'):
      continue
    comps[name].append(line)
    inner.update(re.findall(r'(?:calls|to_apply|comparator)=%?([\w.\-]+)', line))
  counts = collections.Counter()
  for comp, lines in comps.items():
    if comp in inner:
      continue
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      op = m[1]
      if op in _NOT_KERNELS or op.endswith('-done'):
        continue
      body = re.search(r'calls=%?([\w.\-]+)', line) if op == 'fusion' else None
      if op.startswith(_COLLECTIVES):
        kind = 'collective'
      elif '__cublas' in line or '__cudnn' in line or re.search(r'"kind":"__triton\w*gemm', line):
        kind = 'gemm'
      elif op == 'custom-call':
        kind = 'custom call'
      elif op == 'sort' or body and any(' sort(' in l for l in comps.get(body[1], ())):
        kind = 'sort'  # XLA:GPU wraps a sort in a fusion of its own
      elif op in ('fusion', 'copy'):
        kind = op
      else:
        kind = 'other'
      counts[kind] += 1
  out = {k: counts.get(k, 0) for k in ('gemm', 'fusion', 'sort', 'custom call', 'collective',
                                      'copy', 'other')}
  out['total'] = sum(counts.values())
  return out


def gpu_cost(compiled) -> dict:
  """FLOPs and bytes accessed of a GPU executable, which has no cost analysis of its own: the CPU
  client's HLO cost analysis of the optimised GPU module (XLA's per-op counts; cuBLAS calls and
  fusions counted by what they compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  modules = compiled.runtime_executable().hlo_modules()
  cost = _jax.hlo_module_cost_analysis(jax.devices('cpu')[0].client, modules[0])
  return {'flops': cost.get('flops'), 'bytes accessed': cost.get('bytes accessed')}


@contextlib.contextmanager
def progress(label: str, every_s: float | None = None):
  """Says that a compile goes on: `label` now, then the elapsed time every `every_s` seconds."""
  every_s = PROGRESS_S if every_s is None else every_s
  t0, done = time.perf_counter(), threading.Event()
  print(f'{label} ...', flush=True)

  def tick():
    while not done.wait(every_s):
      print(f'  ... {label}: {time.perf_counter() - t0:.0f} s so far', flush=True)

  thread = threading.Thread(target=tick, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


PROGRESS_S = 30.0  # seconds between progress lines


@contextlib.contextmanager
def exit_on_signals(what):
  """SIGINT and SIGTERM end the process within a second, with one line and status 130 or 143.

  A compile runs in XLA's C++ for minutes, where Python runs no signal handler, so a Ctrl-C used
  to wait for the whole compile and then print a KeyboardInterrupt traceback. Python's C-level
  handler still writes the signal's number to the wakeup fd from whatever thread gets it; a
  thread reading it ends the process. `what()` says what was going on. Only the reports already
  written exist (each is written whole, under a temporary name first). In the main thread only.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  read, write = socket.socketpair()
  write.setblocking(False)
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  old_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
  stop = threading.Event()

  def watch():
    while True:
      data = read.recv(1)
      if stop.is_set() or not data:
        return
      if data[0] in previous:
        name = signal.Signals(data[0]).name
        sys.stdout.flush()
        os.write(2, f'error: interrupted by {name} while {what()}; stopped, nothing more '
                    'written.\n'.encode())
        os._exit(128 + data[0])  # pylint: disable=protected-access

  for s in previous:
    signal.signal(s, lambda *_: None)  # the watcher acts; the main thread's handler does nothing
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    signal.set_wakeup_fd(old_fd)
    for s, handler in previous.items():
      signal.signal(s, handler)
    write.send(b'\0')
    thread.join()
    read.close()
    write.close()


_DEFINITION = re.compile(r'^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = '
                         r'(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]\S* '
                         r'(?P<opcode>[a-z][a-z0-9\-]*)\((?P<operands>[^)]*)\)(?P<rest>.*)$')


def _gradients_concatenated(parts: list, hlo_text: str, param_sizes: set) -> list:
  """XLA:GPU concatenates arrays into one flat all-reduce (f32[N] of a `wrapped_concatenate`),
  whose parts no shape or name gives away (bench.collectives scopes them 'other'). A concatenated
  array of a parameter's size computed in the backward pass (op_name under `transpose(`) is a
  gradient: those bytes go to 'parameter gradients', the rest stays where it was."""
  defs = {}
  for line in hlo_text.splitlines():
    d = _DEFINITION.match(line)
    if d:
      op_name = re.search(r'op_name="([^"]*)"', d['rest'])
      operands = [o.strip().lstrip('%') for o in re.sub(r'/\*.*?\*/', '', d['operands']).split(',')]
      defs[d['name']] = (d['dtype'], math.prod(int(x) for x in d['dims'].split(',') if x),
                         d['opcode'], operands, op_name[1] if op_name else '')

  def source_name(name):  # the op_name of what a bitcast or copy passes on
    for _ in range(8):
      if name not in defs:
        return ''
      _, _, opcode, operands, op_name = defs[name]
      if op_name or opcode not in ('bitcast', 'copy'):
        return op_name
      name = operands[0]
    return ''

  out = []
  for part in parts:
    d = defs.get(part['name'])
    concat = d and d[3][0] if d else None
    if (part['op'] != 'all-reduce' or part['scope'] != 'other' or not concat or
        not concat.startswith('wrapped_concatenate') or concat not in defs):
      out.append(part)
      continue
    dtype, _, _, operands, _ = defs[concat]
    grads = sum(defs[o][1] for o in operands
                if o in defs and defs[o][1] in param_sizes and 'transpose(' in source_name(o))
    if not grads:
      out.append(part)
      continue
    itemsize = part['bytes'] // max(1, defs[part['name']][1])
    out.append(dict(part, scope='parameter gradients', bytes=grads * itemsize,
                    shape=f'{dtype}[{grads}] of {part["shape"]}'))
    if part['bytes'] > grads * itemsize:
      out.append(dict(part, bytes=part['bytes'] - grads * itemsize))
  return out


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
  gpu = devices[0].platform != 'tpu'
  t0 = time.perf_counter()
  target = f'{len(devices)} {devices[0].device_kind}'
  try:
    with progress(f'compiling the {which} step for {target} at {batch_size // shards} images '
                  'per device'):
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
    text = compiled.as_text()
    if gpu:
      cost = gpu_cost(compiled)
      report.update(cost_source='CPU client cost analysis of the GPU HLO module',
                    bytes_accessed_per_chip=cost.get('bytes accessed'), kernels=kernels(text))
    else:
      cost = compiled.cost_analysis()
      cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    parts = bench.collectives(text, bench.param_shapes(trainer))
    if gpu:
      parts = _gradients_concatenated(
          parts, text, {math.prod(shape) for shape in bench.param_shapes(trainer)})
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


def does_not_fit_sentence(which: str, report: dict, spec, kind: str) -> str:
  """One sentence: what the step needs per chip (GPU) against what it has, and what would fit."""
  needed = report['needed_bytes']
  unit, memory = ('GPU', 'memory') if is_gpu(spec) else ('chip', 'HBM')
  need = (f'runs out of HBM in the compiler' if needed is None else
          f'needs {_size(needed)} of {memory} per {unit}' +
          (" (the compiler's count)" if report['oom'] else ''))
  field = 'batch_size' if which == 'train' else 'eval_batch_size'
  best = report.get('search', {}).get('largest_per_chip_batch')
  if best:
    fix = (f'the largest per-{unit} batch that fits is {best} '
           f'(--config.{field}={report["search"]["largest_global_batch"]})')
  elif report['state_bytes_per_chip'] >= capacity_bytes(spec):
    what = 'the train state alone takes' if which == 'train' else 'the parameters alone take'
    fix = f'no batch fits: {what} {_size(report["state_bytes_per_chip"])} per {unit}'
  else:
    fix = f'no power-of-two per-{unit} batch fits'
  if is_gpu(spec):
    has = (f'JAX gets {_size(spec.usable_bytes)} of each {kind} ({spec.name}): the '
           f'{gpus.PREALLOCATED_FRACTION:.0%} of its {_size(spec.gpu.memory_bytes)} that it '
           'preallocates by default')
  else:
    has = f'a {kind} chip of {spec.name} has {_size(spec.hbm_bytes)}'
  return (f'The {which} step {need} at {report["per_chip_batch"]} images per {unit} (global '
          f'batch {report["global_batch"]}), and {has}; {fix}.')


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
  memory = 'memory per GPU' if result.get('gpu') else 'HBM per chip'
  for key, label in (('arguments', f'{memory}: arguments'), ('temporaries', '  temporaries'),
                     ('outputs', '  outputs'), ('aliases', '  aliases (donated, subtracted)'),
                     ('generated_code', '  generated code')):
    row(label, lambda r, key=key: _size(r['hbm'] and r['hbm'][key]))
  row('  total needed', lambda r: _size(r['needed_bytes']) + (' (compiler)' if r['oom'] else ''))
  row('  capacity', lambda r: _size(result['hbm_capacity_bytes']) + (
      f" ({result['preallocated_fraction']:.0%} of {_size(result['memory_bytes'])})"
      if result.get('gpu') else ''))
  row('  fits (margin)', lambda r: ('yes' if r['fits'] else 'NO') + (
      f" ({_size(r['margin_bytes'])})" if r.get('margin_bytes') is not None else ''))
  row('largest per-chip batch that fits', lambda r: '-' if 'search' not in r else
      str(r['search']['largest_per_chip_batch'] or 'none'))
  row('XLA GFLOP per step per chip', lambda r: 'n/a' if not r['flops_per_chip'] else
      f"{r['flops_per_chip'] / 1e9:,.1f}")
  if result.get('gpu'):
    row('  GB accessed per step per chip', lambda r: 'n/a' if not r.get('bytes_accessed_per_chip')
        else f"{r['bytes_accessed_per_chip'] / 1e9:,.2f}")
    row('kernels (GEMM, fusion, sort, custom call, collective, copy, other)', lambda r: '-' if
        not r.get('kernels') else f"{r['kernels']['total']} ({r['kernels']['gemm']}, "
        f"{r['kernels']['fusion']}, {r['kernels']['sort']}, {r['kernels']['custom call']}, "
        f"{r['kernels']['collective']}, {r['kernels']['copy']}, {r['kernels']['other']})")
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
  compiler = (f"JAX's CUDA plugin {result['cuda_plugin']} (capacity: the "
              f"{gpus.PREALLOCATED_FRACTION:.0%} of each GPU's memory that JAX preallocates; "
              "FLOPs and bytes: the CPU cost analysis of the GPU module)" if result.get('gpu')
              else f"libtpu {result['libtpu']}")
  chose = result['model'].get('auto_selection')
  out = [f"{result['config_spec']} on {result['slice']}{slices} "
         f"({result['device_kind']}, topology {result['topology']}): {result['chips']} "
         f"{'GPUs' if result.get('gpu') else 'chips'}, {result['hosts']} hosts; compiled with "
         f"{compiler}, nothing run" + (f"; selection 'auto' is {chose!r} here" if chose else '')]
  out += ['  '.join(str(v).ljust(w) for v, w in zip(x, widths)).rstrip() for x in rows]
  return '\n'.join(out)


_TABLE_HEAD = ('config', 'model', 'dtype', 'slice', 'chips', 'global batch', 'per-chip batch',
               'HBM per chip', 'fits', 'largest per-chip batch', 'GFLOP per chip per step',
               'collectives MiB per step', 'workspace MiB per layer', 'workspace ops per layer',
               'gradients MiB', 'compile s', 'search s')


_GPU_HEAD = ('config', 'model', 'dtype', 'GPUs', 'global batch', 'per-GPU batch',
             'memory per GPU', 'fits (JAX\'s 75%)', 'largest per-GPU batch',
             'GFLOP per GPU per step', 'GB accessed per GPU per step', 'kernels', 'GEMMs', 'sorts',
             'gradients all-reduced MiB', 'compile s', 'search s')


def _search_cells(t: dict) -> tuple:
  best = t['search']['largest_per_chip_batch'] if 'search' in t else '-'
  searched = (f"{sum(x['compile_s'] for x in t['search']['trials']):.0f} "
              f"({len(t['search']['trials'])} compiles)" if t.get('search') else '-')
  return (best if best is not None else 'none'), searched


def _config_cell(r: dict) -> str:
  overrides = [o for o in r.get('overrides', []) if not o.startswith('--config.model.dtype=')]
  return ' '.join([f"`{r['config_spec']}`"] + [f'`{o}`' for o in overrides])


def linear_bound(report: dict, capacity: int) -> int | None:
  """The largest power-of-two per-chip batch that fits if the memory plan is affine in the batch,
  from the one compile: what the plan holds beyond the train state, spread over its images as if
  all of it grew with them. The part that does not (gradients, the optimizer's temporaries) makes
  this a lower bound of what a search would find. None when it cannot say."""
  state, needed = report['state_bytes_per_chip'], report['needed_bytes']
  b = report['per_chip_batch']
  if needed is None or needed <= state or capacity <= state:
    return None
  images = (capacity - state) * b // (needed - state)
  return 2 ** int(math.log2(images)) if images >= 1 else None


def _gpu_row(r: dict) -> tuple:
  t = r['train']
  c, k = t['collectives'], t.get('kernels')
  grads = c and c['by_scope'].get('parameter gradients')
  best, searched = _search_cells(t)
  if 'search' not in t:  # not searched: the bound from the one compile, marked
    bound = linear_bound(t, r['hbm_capacity_bytes'])
    best = '-' if bound is None else f'≥ {bound} (linear)'

  return (_config_cell(r), _model_label(r['model']), r['model']['dtype'], r['slice'],
          t['global_batch'], t['per_chip_batch'], _size(t['needed_bytes']),
          ('yes' if t['fits'] else 'no') + f" ({_size(t.get('margin_bytes'))} left)",
          best, '-' if not t['flops_per_chip'] else f"{t['flops_per_chip'] / 1e9:,.1f}",
          '-' if not t.get('bytes_accessed_per_chip') else
          f"{t['bytes_accessed_per_chip'] / 1e9:,.1f}",
          '-' if not k else k['total'], '-' if not k else k['gemm'], '-' if not k else k['sort'],
          '-' if not grads else f"{grads['bytes'] / MIB:,.1f}", f"{t['compile_s']:.0f}", searched)


def table(folder: str) -> str:
  """The markdown table of the train steps of every report in `folder` (--table): one for the
  TPU slices, one for the GPUs."""
  from ait_jax import models  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(folder, '*.json')))
  if not paths:
    raise FileNotFoundError(f'No *.json report in {folder}; write them with --json.')
  order = list(models.PRESETS)
  gpu_order = list(gpus.TARGETS)
  reports = []
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    if 'train' not in r:
      continue
    m = r['model']
    where = (gpu_order.index(r['slice']), 0) if r.get('gpu') else (r['slice'], r['num_slices'])
    reports.append(((bool(r.get('gpu')), order.index(m['preset']) if m['preset'] in order else
                     len(order), m['vit'], m['dtype'], where), r))
  tables = []
  for gpu in (False, True):
    rows = [r for key, r in sorted(reports, key=lambda x: x[0]) if key[0] == gpu]
    if not rows:
      continue
    head = _GPU_HEAD if gpu else _TABLE_HEAD
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
      cells = _gpu_row(r) if gpu else _tpu_row(r)
      lines.append('| ' + ' | '.join(str(x) for x in cells) + ' |')
    tables.append('\n'.join(lines))
  return '\n\n'.join(tables)


def _tpu_row(r: dict) -> tuple:
  t = r['train']
  c = t['collectives']
  ws_mib, ws_ops = _workspace(t) if c else (None, None)
  grads = c and c['by_scope'].get('parameter gradients')
  best, searched = _search_cells(t)
  return (_config_cell(r), _model_label(r['model']), r['model']['dtype'],
          r['slice'] + (f" x {r['num_slices']}" if r['num_slices'] > 1 else ''),
          r['chips'], r['train']['global_batch'], t['per_chip_batch'],
          _size(t['needed_bytes']) + (' (compiler)' if t['oom'] else ''),
          'yes' if t['fits'] else 'no', best,
          '-' if not t['flops_per_chip'] else f"{t['flops_per_chip'] / 1e9:,.1f}",
          '-' if not c else f"{sum(v['bytes'] for v in c['by_op'].values()) / MIB:,.1f}",
          '-' if ws_mib is None else f'{ws_mib:,.2f}', '-' if ws_ops is None else f'{ws_ops:g}',
          '-' if not grads else f"{grads['bytes'] / MIB:,.1f}", f"{t['compile_s']:.0f}",
          searched)


def _command(fv: flags.FlagValues, spec_arg: str) -> str:
  """This run as one shell line (also when run in process, where sys.argv is another's)."""
  words = ['python', '-m', 'ait_jax.compile', f'--config={spec_arg}']
  words += config_overrides.as_flags(config_flags.get_override_values(fv['config']))
  words += [f'--{name}={fv[name].value}' for name in ('topology', 'num_slices', 'steps', 'json')
            if fv[name].present]
  words += ['--find_largest_batch'] * bool(fv.find_largest_batch)
  return shlex.join(words)


def _selection(config, mesh) -> str | None:
  """What the model's `selection` stands for on this mesh ('auto' resolved as the model resolves
  it at trace time), or None for a model without the bottleneck's top-k."""
  from ait_jax import workspace  # pylint: disable=g-import-not-at-top
  c = config.model
  if c.vit or not c.get('bottleneck', True):
    return None
  groups = 1 if c.bottleneck_scope == 'batch' else 2  # the batch's tokens split evenly (validated)
  return workspace.resolve_selection(c.selection, groups, 0, 1, mesh)


@contextlib.contextmanager
def _no_compilation_cache():
  """JAX's persistent compilation cache off (a user's JAX_COMPILATION_CACHE_DIR, the tests' one):
  a compile-only executable cannot be loaded back from it, and JAX warns on stderr each time it
  tries (seen with the cache the test suite sets)."""
  import jax  # pylint: disable=g-import-not-at-top
  saved = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', saved)


def _write_json(path: str, result: dict) -> None:
  """The report, whole or not at all (a signal may end the process at any moment)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def main(fv: flags.FlagValues) -> dict | None:
  if fv.table:
    print(table(fv.table))
    return None
  if fv.config is None:
    cli.fail('Pass --config=configs/<dataset>.py[:variant] (e.g. configs/triangle.py:quick).')
  cli.require(fv, 'topology', hint='a slice such as v5e-16 or v4-8, or GPUs such as h100x8')
  spec = parse_target(fv.topology, fv.num_slices)  # before anything is built
  config = fv.config
  if config.device_data:
    raise errors.ConfigError('--config.device_data=True keeps the dataset on the chips, which '
                             'ait_jax.compile does not model; compile without it.')
  from ait_jax import validation  # pylint: disable=g-import-not-at-top
  # A bad config value fails here, before libtpu or the CUDA plugin starts; the input pipeline's
  # host memory is that of one of the target's hosts, reading its share of the global batch.
  validation.validate(config, processes=planned_hosts(spec, fv.num_slices))
  cli.skip_absent_tpu(force_cpu=True)  # this host only compiles
  cli.check_output_path('json', fv.json)
  now = {'what': f'starting the compiler for {fv.topology}'}
  with exit_on_signals(lambda: now['what']), _no_compilation_cache():
    result = _compile_all(fv, spec, config, now)
  kind = result['device_kind']
  sentences = [does_not_fit_sentence(s, result[s], spec, kind) for s in ('train', 'eval')
               if s in result and not result[s]['fits']]
  if sentences:
    print('does not fit: ' + ' '.join(sentences), flush=True)
    raise SystemExit(1)
  return result


def _compile_all(fv, spec, config, now: dict) -> dict:
  """The report of main(): every step compiled (and searched), printed and written."""
  from ait_jax import sharding  # pylint: disable=g-import-not-at-top
  from ait_jax import validation  # pylint: disable=g-import-not-at-top
  gpu = is_gpu(spec)
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
  capacity = capacity_bytes(spec)
  result = {
      'command': _command(fv, spec_arg),
      'config_spec': spec_arg,
      'overrides': config_overrides.as_flags(config_flags.get_override_values(fv['config'])),
      'slice': spec.name, 'topology': spec.topology, 'gpu': gpu,
      'num_slices': fv.num_slices, 'device_kind': devices[0].device_kind, 'chips': len(devices),
      'hosts': hosts, 'hbm_capacity_bytes': capacity,
      'model': {'preset': c.preset, 'vit': bool(c.vit), 'dtype': c.dtype,
                'depth': model.depth, 'width': model.width, 'selection': c.selection,
                'auto_selection': _selection(config, mesh) if c.selection == 'auto' else None,
                'bottleneck_scope': c.bottleneck_scope, 'dataset': config.dataset},
      'mesh': dict(mesh.shape),
      'jax': importlib.metadata.version('jax'),
      'host_cpus': os.cpu_count(),
  }
  if gpu:
    result.update(memory_bytes=spec.gpu.memory_bytes,
                  preallocated_fraction=gpus.PREALLOCATED_FRACTION,
                  cuda_plugin=gpus.plugin_version(), gpu_spec=dataclasses.asdict(spec.gpu))
  else:
    result.update(accelerator_type=spec.accelerator_type,
                  libtpu=importlib.metadata.version('libtpu'))
  for step in which:
    now['what'] = f'compiling the {step} step for {fv.topology}'
    report = compile_step(config, devices, step, capacity)
    if not report['fits'] or fv.find_largest_batch:
      now['what'] = f'searching the largest {step} batch for {fv.topology}'
      report['search'] = search_batch(config, devices, step, report, capacity, hosts)
    result[step] = report
  result['fits'] = all(result[s]['fits'] for s in which)
  result['wall_s'] = time.perf_counter() - t_start
  print(format_report(result), flush=True)
  if fv.json:
    now['what'] = f'writing {fv.json}'
    _write_json(fv.json, result)
  return result


if __name__ == '__main__':
  cli.run(define_flags, main)
