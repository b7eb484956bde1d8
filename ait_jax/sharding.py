"""The device mesh and the shardings of the train state and batches (jax.jit with shardings).

Batches are split over the 'data' axis; parameters are replicated, or with a 'model' axis > 1 their
large kernels are split along their output dimension. The memory state is small and replicated.
"""
import math

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ait_jax import errors

DATA, MODEL = 'data', 'model'
# Kernels smaller than this stay replicated even with a model axis: splitting them costs more in
# communication than it saves in memory.
MIN_SHARDED_SIZE = 2 ** 16


def make_mesh(data: int = -1, model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh; data=-1 takes every device the model axis leaves.

  A smaller mesh than the device count uses the first data × model devices (debugging, tests).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model:
    raise errors.ConfigError(f'mesh.model={model} must divide the {n} available devices.')
  if data == -1:
    data = n // model
  if data < 1 or data * model > n:
    raise errors.ConfigError(f'mesh.data={data} × mesh.model={model} exceeds the {n} devices; '
                             'set mesh.data=-1 to use them all.')
  devices = devices[:data * model]
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:  # multi-slice: 'data' spans the slices over the data-center network
    if data % slices:
      raise errors.ConfigError(f'mesh.data={data} must be a multiple of the {slices} slices.')
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, model), (slices, 1), devices)
    return jax.sharding.Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(mesh, abstract_tree):
  """Shardings for a pytree of parameters (or optimizer state shaped like them)."""
  model_size = mesh.shape[MODEL]

  def spec(x):
    shape = getattr(x, 'shape', ())
    if (model_size > 1 and len(shape) >= 2 and shape[-1] % model_size == 0
        and math.prod(shape) >= MIN_SHARDED_SIZE):
      return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), MODEL))
    return replicated(mesh)

  return jax.tree.map(spec, abstract_tree)


def check_batch_size(batch_size: int, mesh, name: str = 'batch_size',
                     processes: int | None = None) -> None:
  """Global batches must split evenly over the data axis and over the processes (default: this
  run's; ait_jax.compile passes the target slice's hosts)."""
  shards = mesh.shape[DATA]
  processes = processes or jax.process_count()
  if batch_size % shards or batch_size % processes:
    raise errors.ConfigError(
        f'{name}={batch_size} must be divisible by the {shards} data shards and the '
        f'{processes} processes; pick a multiple of {np.lcm(shards, processes)}.')
