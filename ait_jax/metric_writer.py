"""What the user sees of a run: a progress line, JSON-lines metrics and TensorBoard events.

Only process 0 writes. `metrics.jsonl` holds one JSON object per log or eval step.
"""
import json
import time

from etils import epath
import jax
import numpy as np


def mean_of(metrics: list[dict]) -> dict:
  """Averages a list of per-step metric dicts of device scalars (one host transfer)."""
  stacked = jax.device_get(metrics)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


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
  """JSONL + TensorBoard + console, process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    # Object stores (gs://) cannot append: there the whole file is rewritten at each write.
    self.remote = '://' in str(workdir)
    self.lines = self.path.read_text() if self.remote and self.path.exists() else ''
    self.tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def write(self, step: int, metrics: dict, prefix: str) -> None:
    if not self.active:
      return
    line = json.dumps({'step': step, 'split': prefix, **metrics}) + '\n'
    if self.remote:
      self.lines += line
      self.path.write_text(self.lines)
    else:
      with self.path.open('a') as f:
        f.write(line)
    for k, v in metrics.items():
      self.tb.add_scalar(f'{prefix}/{k}', v, step)
    self.tb.flush()
    if prefix == 'train':
      line = (f'[train] step {step}: loss {metrics["loss"]:.4f} '
              f'acc {metrics["accuracy"]:.4f}')
      if 'images_per_sec' in metrics:
        line += (f' | {metrics["images_per_sec"]:.0f} img/s'
                 f' | ETA {_format_eta(metrics["eta_sec"])}')
    else:
      # Overall and per question type; per class and per subtype stay in the JSON files.
      line = f'[{prefix}] step {step}: ' + ', '.join(
          f'{k} {v:.4f}' for k, v in metrics.items()
          if k in ('accuracy', 'loss') or (k.startswith('accuracy_') and not k[-1].isdigit()))
    print(line, flush=True)

  def log_text(self, text: str) -> None:
    if self.active:
      print(text, flush=True)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
