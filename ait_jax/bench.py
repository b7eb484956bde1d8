r"""Speed benchmark of the jitted train step: ms/step, images/s, FLOPs, MFU, peak memory.

Usage (synthetic uint8 batches of the config's dataset shape; no data on disk needed):
  python -m ait_jax.bench --config=configs/cifar10.py:model=small --config.model.dtype=bfloat16 \
      --compare=vit --json=out.json
  python -m ait_jax.bench --model=small --depth=1 --batch=64 --compare=vit --devices=1   # CPU-sized
  python -m ait_jax.bench --collectives --depth=1 --config.model.selection=sharded  # compile only
  python -m ait_jax.bench --model=small --dtype=bfloat16 --profile=/tmp/prof  # + a trace, top ops
  python -m ait_jax.bench --suite=gpu --out=DIR   # the whole GPU measurement (docs/gpu.md)
  python -m ait_jax.bench --suite=gpu --smoke --out=DIR   # the same code on a CPU, tiny sizes
--config takes a configs/*.py file and variant as for ait_jax.main, and any field can be overridden
with --config.<field>=value; --model, --batch, --dtype, --scope, --depth, --width, --mlp_dim,
--num_heads and --bottleneck_k are shortcuts that override the config only when given.
"""
import json
import math
import os
import platform
import re
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

from ait_jax import cli
from ait_jax import errors
from ait_jax import profiling


DEFAULT_CONFIG = 'cifar10:model=small'


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  config_flags.DEFINE_config_file(
      'config', None,
      'A configs/*.py file or shipped config name with its variant, as for ait_jax.main '
      f'(default {DEFAULT_CONFIG}); its dataset fixes the input shape. Override any field '
      'with --config.<field>=value, e.g. --config.model.width=64 --config.model.dtype=bfloat16.',
      lock_config=True, flag_values=fv)
  # Shortcuts for the most used fields; each overrides the config only when given.
  flags.DEFINE_string('model', None, 'Shortcut: a preset (small|medium|base|large|coordination) '
                      'or vit_<preset>.', flag_values=fv)
  flags.DEFINE_integer('batch', None, 'Shortcut: the global batch (batch_size).', flag_values=fv)
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Shortcut: model.dtype.',
                    flag_values=fv)
  flags.DEFINE_enum('scope', None, ['batch', 'example'], 'Shortcut: model.bottleneck_scope '
                    '(example needs bottleneck_k <= tokens per image).', flag_values=fv)
  flags.DEFINE_integer('devices', 0, 'Use the first N devices (0: all of them).', lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer('steps', 20, 'Timed steps.', lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation (at least 1, so that the '
                       'timed steps never include compilation).', lower_bound=1, flag_values=fv)
  flags.DEFINE_enum('compare', 'none', ['none', 'vit'],
                    'vit: also time the dense ViT of the same dims and print AiT/ViT.',
                    flag_values=fv)
  flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device for MFU; default 989 '
                     '(H100/H200 bf16 dense) on GPU, none (MFU n/a) elsewhere.', flag_values=fv)
  flags.DEFINE_string('json', None, 'Write the results as JSON to this path.', flag_values=fv)
  flags.DEFINE_string('dump_hlo', None, 'Write the optimised HLO of the train step here (ViT: '
                      '.vit added).', flag_values=fv)
  flags.DEFINE_bool('collectives', False, 'Only compile the train step and list the collectives '
                    'of its optimised HLO (op, shape, bytes per step, per layer); nothing is run.',
                    flag_values=fv)
  flags.DEFINE_integer('depth', None, 'Shortcut: model.depth.', flag_values=fv)
  flags.DEFINE_integer('width', None, 'Shortcut: model.width.', flag_values=fv)
  flags.DEFINE_integer('mlp_dim', None, 'Shortcut: model.mlp_dim.', flag_values=fv)
  flags.DEFINE_integer('num_heads', None, 'Shortcut: model.num_heads.', flag_values=fv)
  flags.DEFINE_integer('bottleneck_k', None, 'Shortcut: model.bottleneck_k.', flag_values=fv)
  flags.DEFINE_string('profile', None, 'Also trace --profile_steps steps with jax.profiler into '
                      'this folder (TensorBoard: tensorboard --logdir DIR) and print the ops that '
                      'took the most time.', flag_values=fv)
  flags.DEFINE_integer('profile_steps', 3, 'Steps traced with --profile.', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum('suite', None, ['gpu'], 'gpu: the whole GPU measurement '
                    '(ait_jax/gpu_suite.py, docs/gpu.md): correctness on the device, AiT and ViT '
                    'timings, memory, profiles, targets; into --out. The other flags are ignored.',
                    flag_values=fv)
  flags.DEFINE_string('out', None, 'The folder of --suite (gpu_suite.json, profile/).',
                      flag_values=fv)
  flags.DEFINE_bool('smoke', False, 'With --suite: tiny models and batches, on any backend (a '
                    'check of the code, not a measurement).', flag_values=fv)
  flags.DEFINE_float('budget_s', None, 'With --suite: the wall-clock budget in seconds '
                     '(default 480); cells that would overrun it are skipped with a note.',
                     flag_values=fv)


GPU_PEAK_TFLOPS = 989.0  # H100/H200 SXM, bf16 dense tensor cores


def forward_flops(model, batch: int, image_shape, question_dim: int = 0) -> dict:
  """Matmul FLOPs (2 per multiply-add) of one forward pass of `model` on `batch` images.

  Only matmuls and einsums are counted (no norms, softmax, GELU, top-k, optimizer). With B the
  batch, N tokens per image (patches [+ question] [+ CLS]), T = B·N, D width, F MLP width, P·P·C the
  patch length, L depth, M slots, Dm memory width, Hm memory heads, k bottleneck size, G groups
  (1 for scope 'batch', B for 'example'), S Hopfield steps:
    patch embed   2·B·(H/P)(W/P)·P²C·D            (+ 2·B·18·D for the Sort-of-CLEVR question)
    per block     attention 2·T·4D² (qkv, out) + 2·2·B·N²·D (scores, weighted sum);  FFN 2·2·T·D·F
    per workspace q 2·M·Dm·Hm·Dm; k, v 2·2·T·D·Hm·Dm; bottleneck logits 2·Hm·M·T·Dm;
                  gather-read 2·G·Hm·M·k·Dm (dense write without bottleneck: 2·Hm·M·T·Dm);
                  out 2·M·Hm·Dm·Dm; prior projection 2·M·Dm·D; Hopfield S·2·2·T·M·D
                  (cross-attention ablation instead: 2·2·T·D² + 2·2·B·M·D² + 2·2·T·M·D)
    head          2·B·N·D·classes (flatten) or 2·B·D·classes (mean, cls)
  Returns {'backbone', 'workspace', 'total'} in FLOPs; a train step is counted as 3× forward.
  """
  from ait_jax import models  # pylint: disable=g-import-not-at-top
  b, d, f, L = batch, model.width, model.mlp_dim, model.depth
  h, w = image_shape[:2]
  p = model.patch_size
  c = image_shape[2] if len(image_shape) > 2 else 3
  patches = (h // p) * (w // p)
  n = models.num_tokens({'patch_size': p, 'head': model.head}, image_shape, question_dim)
  t = b * n
  backbone = 2 * b * patches * p * p * c * d + 2 * b * question_dim * d
  per_block = 2 * 2 * t * d * f
  if model.self_attention:
    per_block += 2 * t * 4 * d * d + 2 * 2 * b * n * n * d
  backbone += L * per_block
  backbone += 2 * b * (n * d if model.head == 'flatten' else d) * model.num_classes
  workspace = 0
  if not model.vit:
    ws = model.workspace
    m, dm, hm = ws['memory_slots'], ws['memory_dim'], ws['memory_heads']
    groups = 1 if ws['bottleneck_scope'] == 'batch' else b
    top_k = ws['bottleneck_k'] if ws.get('bottleneck', True) else None
    per_ws = 2 * m * dm * hm * dm + 2 * 2 * t * d * hm * dm + 2 * hm * m * t * dm
    per_ws += (2 * groups * hm * m * top_k * dm if top_k is not None else 2 * hm * m * t * dm)
    per_ws += 2 * m * hm * dm * dm + 2 * m * dm * d
    if ws['retrieval'] == 'hopfield':
      per_ws += ws['hopfield_steps'] * 2 * 2 * t * m * d
    else:
      per_ws += 2 * 2 * t * d * d + 2 * 2 * b * m * d * d + 2 * 2 * t * m * d
    workspace = L * per_ws
  return {'backbone': backbone, 'workspace': workspace, 'total': backbone + workspace}


def train_step_flops(model, batch: int, image_shape, question_dim: int = 0) -> int:
  """Analytical FLOPs of one train step: 3 × forward (backward ≈ 2 × forward), the MFU convention."""
  return 3 * forward_flops(model, batch, image_shape, question_dim)['total']


def _xla_flops(compiled, num_devices: int):
  """FLOPs of the whole step from XLA's cost analysis (per-device program × devices), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost or cost['flops'] <= 0:
    return None
  return float(cost['flops']) * num_devices


def memory_breakdown(compiled) -> dict | None:
  """Bytes XLA plans for one device, by kind, and their total: arguments + outputs + temporaries
  + generated code − aliases (outputs that reuse a donated argument's buffer); None if
  unknown."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {'arguments': m.argument_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
         'outputs': m.output_size_in_bytes, 'aliases': m.alias_size_in_bytes,
         'generated_code': m.generated_code_size_in_bytes}
  out = {k: int(v) for k, v in out.items()}
  out['total'] = (out['arguments'] + out['outputs'] + out['temporaries'] - out['aliases']
                  + out['generated_code'])
  return out


def _xla_memory(compiled):
  """Bytes XLA plans for one device (memory_breakdown's total), or None."""
  breakdown = memory_breakdown(compiled)
  return breakdown and breakdown['total']


def _peak_memory(devices):
  """Largest peak_bytes_in_use over the devices (process-wide, never reset), or None on CPU."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(stats['peak_bytes_in_use'])
  return max(peaks) if peaks else None


def benchmark(config, *, devices, steps: int, warmup: int, peak_tflops=None,
              dump_hlo: str | None = None, profile_dir: str | None = None,
              profile_steps: int = 3) -> dict:
  """Compiles, warms up and times the train step of `config` on synthetic batches; one result row.

  Every timed step is followed by `jax.block_until_ready`, so the per-step times are device times
  plus one dispatch; images/s and TFLOP/s come from a second, pipelined pass of the same number of
  steps with one synchronisation at its end, as in training. With `profile_dir`, `profile_steps`
  more steps are then traced there (ait_jax/profiling.py) and the row's 'profile' summarises them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ait_jax import train  # pylint: disable=g-import-not-at-top

  trainer = train.Trainer(config, devices=devices)
  s = trainer.s
  b = config.batch_size
  batch = synthetic_batch(trainer, b)
  state = jax.block_until_ready(trainer.init(trainer.rng))

  t0 = time.perf_counter()
  compiled = trainer.steps_fn(1).lower(state, [batch]).compile()
  compile_s = time.perf_counter() - t0
  if dump_hlo:
    with open(dump_hlo, 'w') as f:
      f.write(compiled.as_text())

  for _ in range(warmup):
    state, metrics = compiled(state, [batch])
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, [batch])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  # The training loop does not wait on the device between steps; neither does this measure, which
  # gives images/s (the per-step times above add one dispatch latency each).
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, [batch])
  jax.block_until_ready((state, metrics))
  pipelined = (time.perf_counter() - t0) / steps
  profile = None
  if profile_dir:
    with profiling.Trace(profile_dir) as trace:
      for i in range(profile_steps):
        with jax.profiler.StepTraceAnnotation('train', step_num=i):
          state, metrics = compiled(state, [batch])
      jax.block_until_ready((state, metrics))
    profile = profiling.summarize(trace.run_dir, steps=profile_steps,
                                  hlo_text=compiled.as_text(), module='train_step')
  loss = float(metrics['loss'][0])  # steps_fn(1) stacks one step's metrics
  if not math.isfinite(loss):
    raise errors.ConfigError(
        f'The benchmarked step gave a non-finite loss ({loss}); try dtype=float32.')

  n_dev = len(devices)
  median = statistics.median(times)
  analytic = forward_flops(s.model, b, s.info.input_shape, s.info.question_dim)
  flops = 3 * analytic['total']
  xla = _xla_flops(compiled, n_dev)
  tflops = flops / pipelined / 1e12
  c = config.model
  row = {
      'arch': 'vit' if c.vit else 'ait', 'preset': c.preset, 'dtype': c.dtype,
      'scope': None if c.vit else c.bottleneck_scope, 'batch': b, 'devices': n_dev,
      'dims': {k: getattr(s.model, k) for k in ('depth', 'width', 'mlp_dim', 'num_heads')},
      'bottleneck_k': None if c.vit else c.bottleneck_k,
      'image_shape': list(s.info.input_shape), 'steps': steps, 'warmup': warmup,
      'compile_s': compile_s,
      'ms_per_step_median': 1e3 * median, 'ms_per_step_mean': 1e3 * statistics.fmean(times),
      'ms_per_step_min': 1e3 * min(times), 'ms_per_step_max': 1e3 * max(times),
      'ms_per_step_pipelined': 1e3 * pipelined,
      'images_per_s': b / pipelined,
      'analytic_flops_per_step': flops,
      'analytic_forward_flops': analytic,
      'xla_flops_per_step': xla,
      'achieved_tflops': tflops,
      'peak_tflops_per_device': peak_tflops,
      'mfu': tflops / (peak_tflops * n_dev) if peak_tflops else None,
      'peak_bytes_in_use': _peak_memory(devices),
      'xla_bytes_per_device': _xla_memory(compiled),
      'xla_memory': memory_breakdown(compiled),
      'final_loss': loss,
      'profile': profile,
  }
  del state, metrics, batch, compiled, trainer
  return row


_HLO_COLLECTIVE = re.compile(
    r'^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>.+?) (?P<op>all-gather|all-reduce|'
    r'reduce-scatter|all-to-all|ragged-all-to-all|collective-permute|collective-broadcast)'
    r'(?P<start>-start)?\((?P<operands>[^)]*)\)')
_HLO_DEFINITION = re.compile(
    r'^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = .*?op_name="(?P<op_name>[^"]*)"')
# The parts of a combined collective are read back by index; their op names are the ops'.
_HLO_PART = re.compile(
    r'get-tuple-element\(%(?P<of>[\w.\-]+)\), index=(?P<index>\d+).*?op_name="(?P<op_name>[^"]*)"')
_HLO_ARRAY = re.compile(
    r'\b(?P<dtype>pred|[sub]\d+|f8\w*|bf16|f16|f32|f64|c64|c128)\[(?P<dims>[\d,]*)\]')
_HLO_SCOPE = re.compile(r'(block\d+)(/workspace)?')
_HLO_CHAIN = re.compile(r'chain_id="(\d+)"')
_DTYPE_BYTES = {'pred': 1, 'bf16': 2, 'f16': 2, 'f32': 4, 'f64': 8, 'c64': 8, 'c128': 16}
GRADIENTS = 'parameter gradients'


def _array_bytes(dtype: str, dims: str) -> int:
  size = _DTYPE_BYTES.get(dtype) or (1 if dtype.startswith('f8') else int(dtype[1:]) // 8)
  return size * math.prod(int(d) for d in dims.split(',') if d)


def _scope(op_name: str, dims: tuple, param_sizes: set) -> str:
  """'parameter gradients' for the partitioner's sum of a parameter's gradient (backward pass,
  a parameter's size, not an explicit collective of the workspace's shard_map), else the model
  scope in the op's name: 'block<i>/workspace', 'block<i>' or 'other'. Sizes, not shapes: XLA
  may sum a gradient in another shape (f32[64,768] for a LayerNorm scale of 49,152)."""
  if math.prod(dims) in param_sizes and 'transpose(' in op_name and (
      'shard_map' not in op_name):
    return GRADIENTS
  scope = _HLO_SCOPE.search(op_name)
  return scope[0] if scope else 'other'


def _result_arrays(op: str, start: bool, shape: str) -> list:
  """The (dtype, dims) of what the op delivers on one device. An async '-start' op of an
  all-gather returns (operands, results); of a collective-permute (operand, result, contexts)."""
  arrays = _HLO_ARRAY.findall(shape)
  if start and op == 'all-gather':
    return arrays[len(arrays) // 2:]
  if start and op == 'collective-permute':
    return arrays[1:2]
  return arrays


def collectives(hlo_text: str, param_shapes=None) -> list:
  """Every collective of an optimised HLO module, split by model scope: op, bytes, scope.

  One entry per (collective op, scope): `name` is the op's HLO instruction (the same for the
  parts of one op, so counting distinct names counts ops, i.e. rounds of communication), `bytes`
  the size on one device of what it delivers (an all-gather's gathered array, an all-reduce's
  arrays), `shape` those arrays. XLA combines several all-reduces into one: each array goes to the
  scope of the op it stands for, named where the array is read back (else at its operand):
  'block<i>/workspace', 'block<i>', 'other', or 'parameter gradients' when `param_shapes`, the
  set of parameter shapes, holds its size (see _scope).
  XLA:TPU's async collective fusion splits one collective into a start, steps and a done, each
  holding a copy of the op with the same chain_id: the chain counts once. An op inside a loop
  body counts once.
  """
  lines = hlo_text.splitlines()
  param_sizes = {math.prod(shape) for shape in param_shapes or ()}
  op_names, part_names = {}, {}
  for line in lines:
    d = _HLO_DEFINITION.match(line)
    if d:
      op_names[d['name']] = d['op_name']
    g = _HLO_PART.search(line)
    if g:
      part_names[(g['of'], int(g['index']))] = g['op_name']
  out, chains = [], set()
  for line in lines:
    m = _HLO_COLLECTIVE.match(line)
    if not m:
      continue
    chain = _HLO_CHAIN.search(line)
    if chain:
      key = (m['op'], chain[1])
      if key in chains:
        continue
      chains.add(key)
    arrays = _result_arrays(m['op'], bool(m['start']), m['shape'])
    own = op_names.get(m['name'], '')
    operands = re.sub(r'/\*.*?\*/', '', m['operands']).split(',')  # drop /*index=5*/
    operands = [o.strip().lstrip('%') for o in operands]
    sources = operands if len(operands) == len(arrays) else [m['name']] * len(arrays)
    parts = {}
    for i, ((dtype, dims), source) in enumerate(zip(arrays, sources)):
      shape = tuple(int(x) for x in dims.split(',') if x)
      # The name of the part as it is read back, else of its operand (a copy has none), else
      # of the combined op.
      name = (part_names.get((m['name'], i)) if len(arrays) > 1 else None) or op_names.get(source)
      scope = _scope(name or own, shape, param_sizes)
      part = parts.setdefault(scope, {'op': m['op'], 'name': m['name'], 'shape': [], 'bytes': 0,
                                      'scope': scope})
      part['shape'].append(f'{dtype}[{dims}]')
      part['bytes'] += _array_bytes(dtype, dims)
    for part in parts.values():
      part['shape'] = ', '.join(part['shape'])
      out.append(part)
  return out


def collective_totals(parts: list, key: str) -> dict:
  """{value of `key` ('op' or 'scope'): {'bytes', 'ops' (distinct ops)}} over collectives()."""
  totals, names = {}, {}
  for part in parts:
    t = totals.setdefault(part[key], {'bytes': 0, 'ops': 0})
    t['bytes'] += part['bytes']
    names.setdefault(part[key], set()).add(part['name'])
    t['ops'] = len(names[part[key]])
  return totals


def param_shapes(trainer) -> set:
  """Shapes of the trainer's parameters, whole and as one device holds them (mesh.model > 1)."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes = set()
  for leaf, sh in zip(jax.tree.leaves(trainer.abstract_state.params),
                      jax.tree.leaves(trainer.state_sharding.params)):
    shapes.add(tuple(leaf.shape))
    shapes.add(tuple(sh.shard_shape(leaf.shape)))
  return shapes


def abstract_batch(trainer, batch_size: int, eval_batch: bool = False) -> dict:
  """ShapeDtypeStructs, with the batch sharding, of what the train (or eval) step is fed."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  s, b = trainer.s, batch_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
  batch = {'image': spec((b,) + tuple(s.info.image_shape), np.uint8), 'label': spec((b,), np.int32)}
  if s.info.has_question:
    batch['question'] = spec((b, s.info.question_dim), np.float32)
  if eval_batch:  # train.Trainer.evaluate feeds these keys (train._EVAL_KEYS)
    batch['mask'] = spec((b,), np.bool_)
    if s.info.has_question:
      batch['qtype'] = spec((b,), np.int32)
      batch['qsubtype'] = spec((b,), np.int32)
  return batch


def synthetic_batch(trainer, batch_size: int) -> dict:
  """A batch of abstract_batch's shapes and sharding filled from seed 0: random uint8 images,
  labels of the dataset's classes and (Sort-of-CLEVR) Gaussian questions."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  draw = {'image': lambda shape: rng.integers(0, 256, shape, dtype=np.uint8),
          'label': lambda shape: rng.integers(0, trainer.s.info.num_classes, shape, dtype=np.int32),
          'question': lambda shape: rng.standard_normal(shape).astype(np.float32)}
  batch = {k: draw[k](spec.shape) for k, spec in abstract_batch(trainer, batch_size).items()}
  return jax.device_put(batch, trainer.batch_sharding)


def compile_train_step(config, devices):
  """(trainer, the compiled train step of `config` on abstract inputs); nothing is run."""
  from ait_jax import train  # pylint: disable=g-import-not-at-top
  trainer = train.Trainer(config, devices=devices)
  batch = abstract_batch(trainer, config.batch_size)
  return trainer, trainer.steps_fn(1).lower(trainer.abstract_with_shardings(), [batch]).compile()


def collective_report(config, devices) -> dict:
  """Compiles the train step of `config` and lists its collectives, with bytes per scope."""
  trainer, compiled = compile_train_step(config, devices)
  ops = collectives(compiled.as_text(), param_shapes(trainer))
  per_scope = collective_totals(ops, 'scope')
  c = config.model
  return {'selection': c.selection, 'batch': config.batch_size, 'devices': len(devices),
          'depth': c.depth, 'collectives': ops,
          'bytes_per_scope': {k: v['bytes'] for k, v in per_scope.items()},
          'ops_per_scope': {k: v['ops'] for k, v in per_scope.items()},
          'total_bytes': sum(v['bytes'] for v in per_scope.values())}


def format_collectives(report: dict) -> str:
  mib = 2 ** 20
  lines = [f"selection {report['selection']}, global batch {report['batch']}, "
           f"{report['devices']} devices: {report['total_bytes'] / mib:.3f} MiB of collectives "
           'per step (result bytes on one device)']
  for op in report['collectives']:
    lines.append(f"  {op['scope']:<18} {op['op']:<15} {op['bytes'] / mib:>10.3f} MiB  "
                 f"{op['shape'][:90]}")
  for scope, n in sorted(report['bytes_per_scope'].items()):
    ops = report['ops_per_scope'][scope]
    lines.append(f'  total {scope:<18} {n / mib:>10.3f} MiB in {ops} ops')
  return '\n'.join(lines)


def _fmt(x, spec: str, scale: float = 1.0) -> str:
  return 'n/a' if x is None else format(x / scale, spec)


def format_table(rows) -> str:
  head = ('arch', 'preset', 'dtype', 'batch', 'ms/step', 'images/s', 'GFLOP/step (analytic)',
          'GFLOP/step (XLA)', 'TFLOP/s', 'MFU', 'peak mem GiB', 'XLA mem GiB')
  lines = [head]
  for r in rows:
    lines.append((r['arch'], r['preset'], r['dtype'], str(r['batch']),
                  f"{r['ms_per_step_pipelined']:.2f}", f"{r['images_per_s']:,.0f}",
                  _fmt(r['analytic_flops_per_step'], ',.1f', 1e9),
                  _fmt(r['xla_flops_per_step'], ',.1f', 1e9), f"{r['achieved_tflops']:.3f}",
                  _fmt(r['mfu'], '.1%'), _fmt(r['peak_bytes_in_use'], '.2f', 2 ** 30),
                  _fmt(r['xla_bytes_per_device'], '.2f', 2 ** 30)))
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  out = ['  '.join(v.rjust(wd) for v, wd in zip(line, widths)) for line in lines]
  out.insert(1, '  '.join('-' * wd for wd in widths))
  return '\n'.join(out)


def _build_config(fv: flags.FlagValues, vit: bool):
  """The --config, with the shortcut flags that were given, and the ViT when `vit`."""
  from ait_jax import config_lib  # pylint: disable=g-import-not-at-top  (imports jax)
  c = fv.config.copy_and_resolve_references()
  preset = fv.model
  if preset is not None:
    c.model.vit, c.model.preset = config_lib.split_preset(preset)
  c.model.vit = c.model.vit or vit
  for flag, field in (('dtype', 'dtype'), ('scope', 'bottleneck_scope'), ('depth', 'depth'),
                      ('width', 'width'), ('mlp_dim', 'mlp_dim'), ('num_heads', 'num_heads'),
                      ('bottleneck_k', 'bottleneck_k')):
    if fv[flag].value is not None:
      c.model[field] = fv[flag].value
  if fv.batch is not None:
    c.batch_size = fv.batch
  c.eval_batch_size = c.batch_size  # the bench never evaluates; keeps the mesh check simple
  c.mesh.data, c.mesh.model = -1, 1
  return c


def _check_flags(fv: flags.FlagValues) -> None:
  """The numbers and paths the user gave, before anything is compiled or timed."""
  from ait_jax import cli  # pylint: disable=g-import-not-at-top
  if fv.peak_tflops is not None and not fv.peak_tflops > 0:
    raise errors.ConfigError(
        f'--peak_tflops={fv.peak_tflops} must be positive: the peak TFLOP/s of one '
        'device (e.g. 989 for an H100 or H200 in bf16), or leave it out.')
  cli.check_output_path('json', fv.json)
  if fv.suite:
    cli.require(fv, 'out', hint='DIR (a folder for gpu_suite.json and the profiles)')
    cli.check_output_path('out', fv.out, folder=True)
  elif fv.smoke or fv.out or fv.budget_s is not None:
    raise errors.ConfigError('--smoke, --out and --budget_s go with --suite=gpu; add it, or '
                             'leave them out.')
  if fv.budget_s is not None and not fv.budget_s > 0:
    raise errors.ConfigError(f'--budget_s={fv.budget_s} must be a positive number of seconds.')
  if fv.profile:
    cli.check_output_path('profile', fv.profile, folder=True)
  cli.check_output_path('dump_hlo', fv.dump_hlo)


def _write_json(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)


def main(fv: flags.FlagValues) -> dict:
  _check_flags(fv)
  command = 'python -m ait_jax.bench ' + ' '.join(sys.argv[1:])
  if fv.suite == 'gpu':
    from ait_jax import gpu_suite  # pylint: disable=g-import-not-at-top
    return gpu_suite.run(fv.out, smoke=fv.smoke, budget_s=fv.budget_s, command=command)
  import jax  # pylint: disable=g-import-not-at-top

  all_devices = jax.devices()
  n = fv.devices or len(all_devices)
  if not 1 <= n <= len(all_devices):
    raise errors.ConfigError(f'--devices={n} must be between 1 and the {len(all_devices)} devices '
                             'JAX sees.')
  devices = all_devices[:n]
  if fv.compare == 'vit' and _build_config(fv, False).model.vit:
    raise errors.ConfigError('--compare=vit compares an AiT with its ViT; pass --model=<preset> '
                             'without vit_.')
  platform_name = devices[0].platform
  peak = fv.peak_tflops if fv.peak_tflops is not None else (
      GPU_PEAK_TFLOPS if platform_name == 'gpu' else None)
  # With --compare=vit the ViT runs first: peak_bytes_in_use never resets, and the ViT needs less
  # memory than the AiT (a subset of its parameters and activations), so both peaks stay right.
  archs = [True, False] if fv.compare == 'vit' else [False]  # False: as the config says
  if fv.collectives:
    reports = [collective_report(_build_config(fv, vit), devices) for vit in archs]
    for report in reports:
      print(format_collectives(report), flush=True)
    result = {'command': command, 'reports': reports}
    if fv.json:
      _write_json(fv.json, result)
    return result
  rows = []
  for vit in archs:
    hlo = fv.dump_hlo
    if hlo and vit and len(archs) > 1:
      hlo = f'{hlo}.vit'
    config = _build_config(fv, vit)
    profile_dir = fv.profile and os.path.join(fv.profile, 'vit' if config.model.vit else 'ait')
    row = benchmark(config, devices=devices, steps=fv.steps,
                    warmup=fv.warmup, peak_tflops=peak, dump_hlo=hlo, profile_dir=profile_dir,
                    profile_steps=fv.profile_steps)
    print(f"{row['arch']} {row['preset']} {row['dtype']} batch {row['batch']}: "
          f"{row['ms_per_step_median']:.2f} ms/step (mean {row['ms_per_step_mean']:.2f}, "
          f"min {row['ms_per_step_min']:.2f}; pipelined {row['ms_per_step_pipelined']:.2f}), "
          f"{row['images_per_s']:,.0f} images/s, "
          f"compiled in {row['compile_s']:.1f} s", flush=True)
    if row['profile']:
      print(profiling.format_summary(row['profile']), flush=True)
    rows.append(row)
  rows = rows[::-1] if len(rows) > 1 else rows  # AiT first in the table
  result = {
      'command': command,
      'hardware': {'platform': platform_name, 'device_kind': devices[0].device_kind,
                   'devices': n, 'host_cpus': os.cpu_count(), 'machine': platform.machine(),
                   'jax': jax.__version__},
      'peak_tflops_per_device': peak,
      'rows': rows,
  }
  mfu_note = (f'MFU against {peak:g} TFLOP/s per device' if peak else
              'MFU n/a (no peak for this platform; pass --peak_tflops)')
  print(f'\n{n} × {devices[0].device_kind} ({platform_name}); {mfu_note}; FLOPs and MFU from the '
        'analytic count (3 × forward matmuls)')
  print(format_table(rows))
  if len(rows) == 2:
    ait, vit = rows
    result['ait_over_vit_images_per_s'] = ait['images_per_s'] / vit['images_per_s']
    result['ait_over_vit_analytic_flops'] = (ait['analytic_flops_per_step']
                                             / vit['analytic_flops_per_step'])
    print(f"AiT/ViT throughput ratio: {result['ait_over_vit_images_per_s']:.3f} "
          f"(analytic FLOP ratio {result['ait_over_vit_analytic_flops']:.3f})")
  if fv.json:
    _write_json(fv.json, result)
  return result


def with_default_config(argv: list[str]) -> list[str]:
  """argv with --config=DEFAULT_CONFIG first when it names no config (the flag's default is
  None, so that --help shows no path of this machine)."""
  if any(a.split('=')[0] in ('--config', '-config') for a in argv[1:]):
    return list(argv)
  return [argv[0], f'--config={DEFAULT_CONFIG}', *argv[1:]]


if __name__ == '__main__':
  cli.run(define_flags, main, with_default_config(sys.argv))
