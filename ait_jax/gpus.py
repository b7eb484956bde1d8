r"""NVIDIA GPUs as compile targets: their facts as data, and compile-only devices for them.

JAX's CUDA plugin (jax-cuda12-pjrt and jax-cuda12-plugin, no NVIDIA libraries, no driver) compiles
for a GPU that is not there, as libtpu does for TPU slices (`ait_jax.compile --topology=h100`):
`jax.experimental.topologies.get_topology_desc(platform='cuda', ...)` takes the GPU's facts as an
XLA `GpuTargetConfig` text proto and gives compile-only devices.

The plugin is installed beside the virtualenv's packages, not among them, and loaded only here:
installed among them, every process that starts a JAX backend (each command, and the ~35 that the
test suite starts) loads its 458 MB library, grows by about 135 MB and prints eight lines about
missing CUDA drivers on stderr, even with JAX_PLATFORMS=cpu (measured with jax 0.10.2). Install it
with
  pip install -c constraints.txt --no-deps --target "$VIRTUAL_ENV/ait_jax_cuda_plugin" \
      jax-cuda12-plugin jax-cuda12-pjrt
(or any folder named by $AIT_JAX_CUDA_PLUGIN); both wheels must match the installed jax.
"""
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import sys

from ait_jax import errors

GIB = 2 ** 30
# JAX preallocates this fraction of a GPU's memory for its buffers by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); a step fits when its compiled memory plan fits in it.
PREALLOCATED_FRACTION = 0.75
PLUGIN_ENV = 'AIT_JAX_CUDA_PLUGIN'
INSTALL = ('pip install -c constraints.txt --no-deps --target "$VIRTUAL_ENV/ait_jax_cuda_plugin" '
           'jax-cuda12-plugin jax-cuda12-pjrt')


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One GPU model, as NVIDIA publishes it (SXM form factor)."""
  name: str  # as --topology spells it
  description: str  # as CUDA names the device (cudaDeviceProp.name)
  sms: int  # streaming multiprocessors
  memory_bytes: int
  bandwidth: int  # memory bandwidth, bytes/s
  l2_bytes: int
  clock_ghz: float  # boost clock
  compute_capability: tuple
  fp32_per_sm: int  # FP32 cores per SM
  shared_per_sm: int  # bytes of shared memory per SM
  shared_per_block_optin: int  # the most a block may opt in to


# Sources: the NVIDIA A100 Tensor Core GPU datasheet and architecture whitepaper (108 SMs of 64
# FP32 cores, 40 MB L2, 164 KB shared memory per SM, 1,410 MHz boost; 40 GB HBM2 at 1,555 GB/s,
# 80 GB HBM2e at 2,039 GB/s), the NVIDIA H100 Tensor Core GPU datasheet and Hopper architecture
# whitepaper (H100 SXM5: 132 SMs of 128 FP32 cores, 50 MB L2, 228 KB shared memory per SM, 1,980 MHz
# boost, 80 GB HBM3 at 3.35 TB/s), and the NVIDIA H200 datasheet (the same GH100 with 141 GB HBM3e
# at 4.8 TB/s). Memory sizes are binary, as CUDA counts them (the HBM stacks are).
_MODELS = (
    Gpu('a100-40', 'NVIDIA A100-SXM4-40GB', 108, 40 * GIB, 1_555 * 10 ** 9, 40 * 2 ** 20, 1.41,
        (8, 0), 64, 164 * 1024, 163 * 1024),
    Gpu('a100-80', 'NVIDIA A100-SXM4-80GB', 108, 80 * GIB, 2_039 * 10 ** 9, 40 * 2 ** 20, 1.41,
        (8, 0), 64, 164 * 1024, 163 * 1024),
    Gpu('h100', 'NVIDIA H100 80GB HBM3', 132, 80 * GIB, 3_350 * 10 ** 9, 50 * 2 ** 20, 1.98,
        (9, 0), 128, 228 * 1024, 227 * 1024),
    Gpu('h200', 'NVIDIA H200', 132, 141 * GIB, 4_800 * 10 ** 9, 50 * 2 ** 20, 1.98,
        (9, 0), 128, 228 * 1024, 227 * 1024),
)
MODELS = {g.name: g for g in _MODELS}
# GPUs per host as the names take them: h100 (one), h100x2, x4, x8 (one host), x16 ... (hosts of 8).
COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Target:
  """--topology=<gpu>[x<count>]: `count` GPUs of one model, 8 to a host."""
  name: str
  gpu: Gpu
  count: int

  @property
  def hosts(self) -> int:
    return max(1, self.count // 8)

  @property
  def topology(self) -> str:  # the plugin's slices x hosts x GPUs per host
    return f'1x{self.hosts}x{self.count // self.hosts}'

  @property
  def usable_bytes(self) -> int:
    """What JAX's allocator takes of one GPU by default (PREALLOCATED_FRACTION)."""
    return int(self.gpu.memory_bytes * PREALLOCATED_FRACTION)


def targets() -> dict:
  out = {}
  for gpu in _MODELS:
    for n in COUNTS:
      name = gpu.name if n == 1 else f'{gpu.name}x{n}'
      out[name] = Target(name, gpu, n)
  return out


TARGETS = targets()


def target_config(gpu: Gpu) -> str:
  """The GpuTargetConfig text proto (xla/stream_executor/device_description.proto) of `gpu`."""
  major, minor = gpu.compute_capability
  return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_per_sm}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: {gpu.fp32_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {gpu.bandwidth}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  shared_memory_per_block_optin: {gpu.shared_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{gpu.description}"
'''


def plugin_dir() -> str:
  return os.environ.get(PLUGIN_ENV) or os.path.join(sys.prefix, 'ait_jax_cuda_plugin')


@contextlib.contextmanager
def _quiet_stderr():
  """The plugin's C++ logging, which says on stderr that this host has no CUDA driver."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, 'w') as null:
    os.dup2(null.fileno(), 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def plugin_version() -> str | None:
  """The installed jax-cuda12-pjrt's version (in plugin_dir() or among the packages), or None."""
  for path in (plugin_dir(), *sys.path):
    for dist in importlib.metadata.distributions(path=[path]):
      if dist.metadata['Name'] == 'jax-cuda12-pjrt':
        return dist.version
  return None


def load_plugin() -> None:
  """Registers JAX's CUDA plugin with JAX (once per process), from plugin_dir() unless installed."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  folder = plugin_dir()
  if importlib.util.find_spec('jax_cuda12_plugin') is None and os.path.isdir(folder):
    sys.path.append(folder)  # jax_plugins is a namespace package: it now includes the folder's
  version = plugin_version()
  if version is None or importlib.util.find_spec('jax_plugins.xla_cuda12') is None:
    raise errors.UserError(f'Compiling for a GPU needs JAX\'s CUDA plugin, not found in {folder}: '
                           f'{INSTALL}')
  if version != jax.__version__:
    raise errors.UserError(f'The CUDA plugin in {folder} is {version}, for jax {version}, and '
                           f'this is jax {jax.__version__}: reinstall it ({INSTALL}).')
  with _quiet_stderr():
    xla_bridge._discover_and_register_pjrt_plugins()  # pylint: disable=protected-access
    if not xla_client.pjrt_plugin_loaded('cuda'):  # JAX's backends had started before
      importlib.import_module('jax_plugins.xla_cuda12').initialize()


def devices(target: Target) -> list:
  """The compile-only devices of `target` (no GPU needed)."""
  load_plugin()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  with _quiet_stderr():
    return list(topologies.get_topology_desc(platform='cuda', topology=target.topology,
                                             target_config=target_config(target.gpu)).devices)
