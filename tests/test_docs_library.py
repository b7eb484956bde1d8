"""The library as a library: what `import ait_jax` exposes, and docs/library.md's example runs."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import ait_jax
from ait_jax import hopfield
from ait_jax import models
from ait_jax import workspace
from conftest import limit, ROOT

LIBRARY_MD = (ROOT / 'docs' / 'library.md').read_text()


def test_exports_are_the_modules_objects():
  assert ait_jax.GlobalWorkspace is models.GlobalWorkspace
  assert ait_jax.create_model is models.create_model
  assert ait_jax.hopfield_retrieve is hopfield.hopfield_retrieve
  assert ait_jax.hopfield_energy is hopfield.hopfield_energy
  assert ait_jax.bottleneck_attention is workspace.bottleneck_attention
  assert set(ait_jax.__all__) <= set(dir(ait_jax))
  with pytest.raises(AttributeError, match='no attribute'):
    ait_jax.NoSuchThing  # pylint: disable=pointless-statement
  # Every name the table of docs/library.md lists is exported.
  listed = set(re.findall(r'`ait_jax\.(\w+)`', LIBRARY_MD))
  assert listed == set(ait_jax.__all__)


def test_import_is_cheap():
  """`import ait_jax` loads neither JAX nor Flax (the entry points and configs import it)."""
  out = subprocess.run(
      [sys.executable, '-c', 'import sys, ait_jax; '
       'print(sorted(m for m in ("jax", "flax", "optax", "tensorflow_datasets") if m in sys.modules))'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
      timeout=limit())
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'


def test_library_example_runs_sharded_and_matches_one_device():
  blocks = re.findall(r'^```python\n(.*?)^```', LIBRARY_MD, re.M | re.S)
  assert len(blocks) == 2
  scope = {'__name__': 'docs_library'}  # the module name the deprecation filters know
  for block in blocks:
    exec(block, scope)  # pylint: disable=exec-used  (the example's own asserts run here)
  assert jax.device_count() == 8  # tests/conftest.py
  # On the 8-device mesh, 'auto' stood for 'sharded' (32 tokens, 4 per device) ...
  mesh = scope['mesh']
  assert workspace.resolve_selection('auto', 1, 32, 16, mesh=mesh) == 'sharded'
  # ... and gave the memory and loss that one device's lax.top_k gives.
  _, _, memory_one, loss_one = scope['train_step'](
      scope['params'], scope['optimizer'].init(scope['params']), scope['memory'],
      scope['images'], scope['labels'], jax.random.key(2))
  np.testing.assert_allclose(scope['new_memory']['GlobalWorkspace_0']['slots'],
                             memory_one['GlobalWorkspace_0']['slots'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scope['loss'], loss_one, rtol=1e-5)
