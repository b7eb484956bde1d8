"""The learning-rate schedule: linear warm-up, then cosine, stepped once per epoch (reference)."""
import types

import ml_collections
import numpy as np
import pytest

from ait_jax import steps


def _schedule(unit, warmup=5.0, steps_per_epoch=10, total_steps=1000):
  c = ml_collections.ConfigDict(dict(lr=1e-4, warmup_init_lr=1e-5, end_lr=1e-6,
                                     warmup_epochs=warmup, schedule_unit=unit))
  s = types.SimpleNamespace(config=c, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  return lambda step: float(steps.learning_rate_fn(s)(step))


def test_per_epoch_schedule_matches_the_reference_formula():
  lr = _schedule('epoch')  # 100 epochs of 10 steps, 5 warm-up epochs
  for epoch in range(100):
    if epoch < 5:
      expected = 1e-5 + (1e-4 - 1e-5) * epoch / 5
    else:
      expected = 1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + np.cos(np.pi * (epoch - 5) / 95))
    # Constant within an epoch: every step of it gets the epoch's value.
    for step in (10 * epoch, 10 * epoch + 9):
      assert lr(step) == pytest.approx(expected, rel=1e-5), (epoch, step)


def test_per_step_schedule_is_continuous_and_ends_at_end_lr():
  lr = _schedule('step', warmup=0.0, total_steps=60)
  values = [lr(s) for s in range(61)]
  assert values[0] == pytest.approx(1e-4, rel=1e-6)
  assert values[-1] == pytest.approx(1e-6, rel=1e-4)
  assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing, no steps
  assert values[30] == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6), rel=1e-5)
