"""Profiles of the train step: a `jax.profiler` trace that TensorBoard's profile plugin reads, and
a summary of the ops that took the most time.

`Trace(log_dir)` writes `log_dir/plugins/profile/<session>/<host>.xplane.pb` (what TensorBoard's
profile plugin, XProf, reads: `tensorboard --logdir log_dir`) and, beside it,
`<host>.trace.json.gz`, the same events in the trace viewer's JSON (Chrome trace-event format).
`summarize` reads that JSON with the standard library's gzip and json readers: every XLA op the
runtime ran carries its HLO instruction in the event's `hlo_op` argument (the CPU backend's
thunks, the GPU's kernels on their device streams), so no binary xplane parser is needed.

Two users: `--config.profile_steps=N` in training (`StepProfiler`, called by the loop of
ait_jax/train.py) and `python -m ait_jax.bench --profile=DIR`.
"""
import glob
import gzip
import json
import os
import re

TRACE_PATTERN = os.path.join('plugins', 'profile', '*', '*.trace.json.gz')
SUMMARY_FILE = 'profile_summary.json'
# The kind of an op, from its HLO instruction name, kernel names and (when known) its HLO line
# without the metadata; first match wins. GEMMs on GPU are cuBLAS custom calls or Triton/cuBLAS-LT
# "gemm" fusions (kernels named *gemm*), and on CPU the YNNPACK/oneDNN fusions and `dot`s.
_KINDS = (
    ('collective', r'all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute'),
    ('sort / top-k', r'\bsort|topk|top_k|TopK'),
    ('matmul', r'gemm|cublas|\bdot[.(]|^dot$|matmul|ynn_fusion|onednn|cudnn|convolution'),
    ('scatter / gather', r'scatter|gather|dynamic-update-slice|dynamic-slice'),
    ('copy / transpose', r'\bcopy|transpose'),
    ('reduction', r'reduce'),
    ('custom call', r'custom-call|custom_call'),
)
# Where in the model an op was traced, from its HLO metadata op_name (models.py's module names).
_SCOPES = (('workspace', r'block\d+/workspace'), ('transformer blocks', r'block\d+'),
           ('optimizer', r'optax|adam|clip|scale_by'))
_HLO_LINE = re.compile(r'^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = ')
# An instruction's opcode and attributes, without its shape and operands (whose names, such as
# %dot.3 feeding an add, say nothing of the op's own kind).
_HLO_OP = re.compile(r' = (?:\([^)]*\)|\S+) (?P<opcode>[\w\-]+)\([^)]*\)(?P<attrs>.*)')
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')


class Trace:
  """A jax.profiler trace of what runs between start() and stop() (or inside a `with` block)
  into log_dir; stop() returns, and `run_dir` holds, the session folder written
  (log_dir/plugins/profile/<session>)."""

  def __init__(self, log_dir: str):
    self.log_dir = str(log_dir)
    self.run_dir = None
    self._before = set()

  def _sessions(self) -> set:
    return set(glob.glob(os.path.join(self.log_dir, 'plugins', 'profile', '*')))

  def start(self) -> 'Trace':
    import jax  # pylint: disable=g-import-not-at-top
    os.makedirs(self.log_dir, exist_ok=True)
    self._before = self._sessions()
    jax.profiler.start_trace(self.log_dir)
    return self

  def stop(self) -> str:
    import jax  # pylint: disable=g-import-not-at-top
    jax.profiler.stop_trace()
    # A new session folder; a trace stopped within the same second as an earlier one into the
    # same log_dir reuses that folder, so fall back to the newest.
    new = self._sessions() - self._before
    self.run_dir = max(new or self._sessions(), key=os.path.getmtime)
    return self.run_dir

  def __enter__(self) -> 'Trace':
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def trace_files(run_dir: str) -> list:
  return sorted(glob.glob(os.path.join(run_dir, '*.trace.json.gz')))


def _classify(patterns, *texts) -> str | None:
  for name, pattern in patterns:
    if any(t and re.search(pattern, t) for t in texts):
      return name
  return None


def hlo_index(hlo_text: str | None) -> dict:
  """{HLO instruction name: its line} of an optimised HLO module (compiled.as_text())."""
  index = {}
  for line in (hlo_text or '').splitlines():
    m = _HLO_LINE.match(line)
    if m:
      index.setdefault(m['name'], line)
  return index


def op_events(trace_json: dict) -> list:
  """The XLA ops of a trace: (hlo_op, kernel or event name, hlo_module, duration in µs).

  Events on a device's streams (a GPU) are the ops' own run times; when the trace has none (the
  CPU backend), the host's thunk events are."""
  processes = {e['pid']: e['args'].get('name', '') for e in trace_json.get('traceEvents', [])
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  ops = []
  for e in trace_json.get('traceEvents', []):
    args = e.get('args') or {}
    on_device = processes.get(e.get('pid'), '').startswith('/device:')
    # A device's event without hlo_op (a profiler that does not map kernels back) counts under
    # its kernel name.
    if e.get('ph') == 'X' and ('hlo_op' in args or on_device):
      ops.append((on_device, args.get('hlo_op', e.get('name', '')), e.get('name', ''),
                  args.get('hlo_module', ''), float(e.get('dur', 0.0))))
  if any(o[0] for o in ops):
    ops = [o for o in ops if o[0]]
  return [o[1:] for o in ops]


def summarize(run_dir: str, *, steps: int, hlo_text: str | None = None, top: int = 15,
              module: str | None = None) -> dict:
  """The ops that took the most time in the trace of run_dir, per step, with their kind
  (matmul, sort / top-k, ...) and, given the step's optimised HLO, where in the model they were
  traced (workspace, transformer blocks, optimizer, other), and the totals by kind and scope.

  `steps`: how many steps the trace holds (times are divided by it); `module`: keep the ops of
  HLO modules whose name contains it (e.g. 'train_step'), default every module.
  """
  files = trace_files(run_dir)
  if not files:
    raise FileNotFoundError(f'No *.trace.json.gz in {run_dir}; was the trace stopped?')
  index = hlo_index(hlo_text)
  per_op, modules = {}, set()
  for path in files:
    with gzip.open(path, 'rt') as f:
      events = op_events(json.load(f))
    for op, kernel, hlo_module, dur in events:
      if module and module not in hlo_module:
        continue
      modules.add(hlo_module)
      row = per_op.setdefault(op, {'op': op, 'us': 0.0, 'count': 0, 'kernels': set()})
      row['us'] += dur
      row['count'] += 1
      if kernel != op:
        row['kernels'].add(kernel)
  total = sum(r['us'] for r in per_op.values())
  rows = []
  for r in per_op.values():
    line = index.get(r['op'], '')
    op_name = _OP_NAME.search(line)
    op = _HLO_OP.search(line.split('metadata={')[0])  # nor do the op names of what it fused
    line = f"{op['opcode']} {op['attrs']}" if op else ''
    kernels = sorted(r['kernels'])
    rows.append({
        'op': r['op'],
        'kind': _classify(_KINDS, r['op'], line, *kernels) or 'elementwise / fusion',
        'scope': (_classify(_SCOPES, op_name['op_name']) or 'other') if op_name else None,
        'ms_per_step': r['us'] / 1e3 / steps, 'calls_per_step': r['count'] / steps,
        'share': r['us'] / total if total else 0.0,
        'kernels': kernels[:3],
        'op_name': op_name['op_name'][-120:] if op_name else None})
  rows.sort(key=lambda r: -r['ms_per_step'])

  def totals(key):
    out = {}
    for r in rows:
      out[r[key] or 'unknown'] = out.get(r[key] or 'unknown', 0.0) + r['ms_per_step']
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

  return {'run_dir': run_dir, 'trace_files': files, 'modules': sorted(modules), 'steps': steps,
          'ops_ms_per_step': total / 1e3 / steps, 'distinct_ops': len(rows),
          'by_kind_ms': totals('kind'),
          'by_scope_ms': totals('scope') if index else None, 'top_ops': rows[:top]}


def format_summary(summary: dict, top: int = 10) -> str:
  lines = [f"ops {summary['ops_ms_per_step']:.3f} ms per step ({summary['distinct_ops']} distinct "
           f"HLO ops, {summary['steps']} step(s) traced in {summary['run_dir']})",
           '  by kind: ' + ', '.join(f'{k} {v:.3f} ms' for k, v in summary['by_kind_ms'].items())]
  if summary.get('by_scope_ms'):
    lines.append('  by scope: ' + ', '.join(f'{k} {v:.3f} ms'
                                            for k, v in summary['by_scope_ms'].items()))
  for r in summary['top_ops'][:top]:
    lines.append(f"  {r['ms_per_step']:>9.3f} ms {r['share']:>6.1%}  {r['op']:<28} {r['kind']:<20}"
                 f" {r['scope'] or ''}")
  return '\n'.join(lines)


def one_line(summary: dict, top: int = 3) -> str:
  """A log line: where the trace is, the ops' time per step and the top ops."""
  ops = ', '.join(f"{r['op']} ({r['kind']}) {r['ms_per_step']:.2f} ms"
                  for r in summary['top_ops'][:top])
  return (f"Profiled {summary['steps']} step(s) into {summary['run_dir']} (TensorBoard's profile "
          f"tab): XLA ops {summary['ops_ms_per_step']:.2f} ms per step; the most time: {ops}.")


class StepProfiler:
  """The train loop's `--config.profile_steps`: traces the steps after the first
  `profile_skip_steps` of this process (the first call compiles) until `profile_steps` more have
  run, into <workdir>/tensorboard (beside the metrics' TensorBoard events, so that one
  `tensorboard --logdir <workdir>/tensorboard` shows both), and writes the summary to
  <workdir>/profile_summary.json. A call of several steps (steps_per_call) is traced whole."""

  def __init__(self, config, workdir: str, start: int, total_steps: int):
    self.steps = int(config.profile_steps)
    self.first = start + int(config.profile_skip_steps)
    self.workdir = str(workdir)
    self.total_steps = total_steps
    self._trace = self._annotation = self._from = None
    self.summary = None

  def before(self, step: int, state) -> None:
    """Before the call that runs the steps after `step` on `state`."""
    import jax  # pylint: disable=g-import-not-at-top
    if self.steps and self._trace is None and self.summary is None and step >= self.first:
      jax.block_until_ready(state)  # the steps before run outside the trace
      self._trace, self._from = Trace(os.path.join(self.workdir, 'tensorboard')).start(), step
    if self._trace is not None:
      self._annotation = jax.profiler.StepTraceAnnotation('train', step_num=step + 1)
      self._annotation.__enter__()  # pylint: disable=unnecessary-dunder-call

  def after(self, step: int, metrics) -> dict | None:
    """After the call that ended at `step`; returns the summary when the trace ended there."""
    import jax  # pylint: disable=g-import-not-at-top
    if self._trace is None:
      return None
    self._annotation.__exit__(None, None, None)
    if step - self._from < self.steps and step < self.total_steps:
      return None
    jax.block_until_ready(metrics)
    run_dir = self._stop()
    self.summary = {'first_step': self._from + 1,
                    **summarize(run_dir, steps=step - self._from, module='train_step')}
    if jax.process_index() == 0:
      from ait_jax import metric_writer  # pylint: disable=g-import-not-at-top
      metric_writer.write_text_atomic(os.path.join(self.workdir, SUMMARY_FILE),
                                      json.dumps(self.summary, indent=2))
    return self.summary

  def _stop(self) -> str:
    trace_, self._trace = self._trace, None
    return trace_.stop()

  def close(self) -> None:
    """Stops a trace still running (the loop ended or failed inside it)."""
    if self._trace is not None:
      self._stop()
