"""The device mesh, and the shardings of the train state and batches (jax.jit with shardings).

Batches are split over the 'data' axis. Every parameter names its dimensions with logical axes
(`models.LOGICAL_AXES`, through nn.with_logical_partitioning), and one rule table per
`config.sharding` maps those names to mesh axes, as Flax's logical_axis_rules and big_vision's
parameter rules do: adding a parameter needs no edit here. Under every rule set a 'model' axis
> 1 splits the attention heads and the MLP (tensor parallelism); 'fsdp' also splits each
parameter's 'embed' dimension (and the head's input) over 'data', so parameters and optimizer
state take 1/data of the memory and XLA gathers them where they are used. The memory state is
small and replicated.
"""
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ait_jax import errors

DATA, MODEL = 'data', 'model'

# {config.sharding: ((logical axis, mesh axis), ...)}. A logical axis that no rule names stays
# replicated, and so does a dimension that its mesh axis does not divide.
_TENSOR_PARALLEL = (('heads', MODEL), ('mlp', MODEL))
RULES = {
    'replicated': _TENSOR_PARALLEL,
    'fsdp': _TENSOR_PARALLEL + (('embed', DATA), ('head_in', DATA)),
}


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


def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def logical_shardings(mesh, boxed_tree, rules: str, *, require_axes: bool = False):
  """The NamedSharding of every leaf of a tree whose leaves are nn.LogicallyPartitioned boxes
  (parameters, and optimizer state initialised from them) or plain arrays (replicated).

  require_axes: every leaf must name its axes (the parameters), else ValueError names the first
  that does not.
  """
  table = dict(RULES[rules])

  def shard(path, x):
    if not _is_boxed(x):
      if require_axes:
        raise ValueError(f'Parameter {jax.tree_util.keystr(path)} has no logical axes: create '
                         'it with nn.with_logical_partitioning (ait_jax/models.py).')
      return replicated(mesh)
    shape, names = x.value.shape, x.names
    if len(names) != len(shape):
      raise ValueError(f'Parameter {jax.tree_util.keystr(path)} of shape {shape} names '
                       f'{len(names)} axes {names}.')
    spec = [table.get(name) for name in names]
    spec = [axis if axis and mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0 else None
            for axis, dim in zip(spec, shape)]
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(shard, boxed_tree, is_leaf=_is_boxed)


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
