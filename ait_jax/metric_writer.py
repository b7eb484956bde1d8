"""What the user sees of a run: a progress line, JSON-lines metrics and TensorBoard events.

Only process 0 writes. `metrics.jsonl` holds one JSON object per log or eval step; `read_metrics`
is the one reader of it, and a resumed writer first moves aside what a killed run left past its
step (a copy of the file as it was goes into the workdir's set_aside/ folder).
"""
import json
import os
import sys
import time

from etils import epath
import jax

from ait_jax import checkpointing

METRICS_FILE = 'metrics.jsonl'


def _parse_lines(data: bytes) -> tuple[list[dict], int]:
  """The rows of a metrics.jsonl's bytes and the number of lines that are not a row (a torn last
  line after a kill, bytes that are not UTF-8 or not JSON)."""
  rows, bad = [], 0
  for line in data.split(b'\n'):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode('utf-8'))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
      bad += 1
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int) and 'split' in row:
      rows.append(row)
    else:
      bad += 1
  return rows, bad


def parse_rows(data: bytes) -> list[dict]:
  """The rows of a metrics.jsonl's bytes, without a word about the lines that are not rows."""
  return _parse_lines(data)[0]


def read_metrics(path) -> list[dict]:
  """The rows of a metrics.jsonl in file order. Lines that cannot be read are skipped with one
  warning line on stderr, so a run killed mid-write still shows everything before."""
  path = epath.Path(path)
  rows, bad = _parse_lines(path.read_bytes())
  if bad:
    print(f'warning: skipped {bad} unreadable line(s) of {path} (a run killed while writing '
          f'leaves a torn last line); using the other {len(rows)}.', file=sys.stderr, flush=True)
  return rows


def write_text_atomic(path, text: str) -> None:
  """Writes a file so that a reader (or a kill) sees the old or the new content, never a part:
  a temporary file next to it, then a rename. Object stores (gs://) write whole objects anyway.
  A failing write names the file (e.g. a full disk)."""
  path = epath.Path(path)
  try:
    if '://' in str(path):
      path.write_text(text)
      return
    tmp = f'{path}.tmp{os.getpid()}'
    try:
      with open(tmp, 'w') as f:
        f.write(text)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except OSError as e:
    raise checkpointing.disk_error(e, path) from None


class Progress:
  """Images per second and ETA between two log steps."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total, self.batch = total_steps, batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()

  def restart(self, step: int) -> None:
    """Leaves out what happened since the last update (compilation, evaluation, saving)."""
    self.last_step, self.last_time = step, time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self.last_time, 1e-9)
    sec_per_step = dt / max(step - self.last_step, 1)
    self.last_step, self.last_time = step, now
    return {'images_per_sec': self.batch / sec_per_step, 'sec_per_step': sec_per_step,
            'eta_sec': sec_per_step * (self.total - step)}


def _format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class MetricWriter:
  """JSONL + TensorBoard + console, process 0 only.

  `resume_step`: the step the run restored (0 for a fresh start). metrics.jsonl is first cut
  to the rows up to that step, without a torn last line or the rows a killed run wrote past its
  last checkpoint, so that the file stays valid JSON Lines with each step once; the file as it
  was is kept in `aside` (the workdir's set_aside/<time>/ folder of this start) first.
  """

  def __init__(self, workdir: str, resume_step: int | None = None,
               aside: checkpointing.SetAside | None = None):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / METRICS_FILE
    # Object stores (gs://) cannot append: there the whole file is rewritten at each write.
    self.remote = '://' in str(workdir)
    self.lines = ''
    if self.active and resume_step is not None:
      self.lines = self._trim(resume_step, aside or checkpointing.SetAside(workdir))
    elif self.remote and self.path.exists():
      self.lines = self.path.read_text()
    self.tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def _trim(self, step: int, aside: checkpointing.SetAside) -> str:
    """Keeps the rows up to `step`, rewriting the file (atomically) only when something goes, and
    then only after a copy of it as it was is in `aside`: nothing a run wrote is dropped."""
    if not self.path.exists():
      return ''
    data = self.path.read_bytes()
    rows, bad = _parse_lines(data)
    kept = [r for r in rows if r['step'] <= step]
    text = ''.join(json.dumps(r) + '\n' for r in kept)
    if bad or len(kept) < len(rows):
      copy = aside.keep_copy(METRICS_FILE, data)
      write_text_atomic(self.path, text)
      print(f'Moved {len(rows) - len(kept)} rows of {self.path} past step {step} and {bad} '
            f'unreadable line(s) aside: the file as it was is kept as {copy}, and it now holds '
            f'the {len(kept)} rows up to step {step}.', flush=True)
    elif data and not data.endswith(b'\n'):  # a whole last row without its newline
      write_text_atomic(self.path, text)
    return text

  def write(self, step: int, metrics: dict, prefix: str) -> None:
    if not self.active:
      return
    line = json.dumps({'step': step, 'split': prefix, **metrics}) + '\n'
    if self.remote:
      self.lines += line
      self.path.write_text(self.lines)
    else:
      try:
        with self.path.open('a') as f:
          f.write(line)
      except OSError as e:  # e.g. a full disk: name the file
        raise checkpointing.disk_error(e, self.path) from None
    try:  # the TensorBoard events file: a full disk names it too, not a bare errno
      for k, v in metrics.items():
        self.tb.add_scalar(f'{prefix}/{k}', v, step)
      self.tb.flush()
    except OSError as e:
      raise checkpointing.disk_error(e, self.tb.logdir) from None
    # The console names each loss for what it is: a train row's 'loss' is the objective
    # (cross-entropy + balance loss), an eval row's 'loss' the cross-entropy alone, so only the
    # cross-entropies compare. metrics.jsonl keeps the keys as they were.
    if prefix == 'train':
      line = f'[train] step {step}: '
      if 'ce_loss' in metrics and 'balance_loss' in metrics:
        line += (f'cross-entropy {metrics["ce_loss"]:.4f} + balance {metrics["balance_loss"]:.4f}'
                 f' = loss {metrics["loss"]:.4f}, ')
      else:
        line += f'loss {metrics["loss"]:.4f}, '
      line += f'accuracy {metrics["accuracy"]:.4f}'
      if 'images_per_sec' in metrics:
        line += (f' | {metrics["images_per_sec"]:.0f} img/s'
                 f' | ETA {_format_eta(metrics["eta_sec"])}')
    else:
      # Overall and per question type; per class and per subtype stay in the JSON files.
      line = f'[{prefix}] step {step}: ' + ', '.join(
          f'{"cross-entropy" if k == "loss" else k} {v:.4f}' for k, v in metrics.items()
          if k in ('accuracy', 'loss') or (k.startswith('accuracy_') and not k[-1].isdigit()))
    print(line, flush=True)

  def log_text(self, text: str) -> None:
    if self.active:
      print(text, flush=True)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
