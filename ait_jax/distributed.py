"""Multi-host start-up: one place that decides whether to call `jax.distributed.initialize`.

  python -m ait_jax.distributed [--distributed=auto|on|off]   # the launch scripts' preflight

starts JAX as `ait_jax.main` would and prints what this process sees (process index and count,
local and global devices). Cloud TPU VMs and SLURM/GPU clusters are auto-detected by JAX; a
coordinator can be forced with environment variables for hosts that JAX cannot detect (and for
tests on 127.0.0.1):
  AIT_JAX_COORDINATOR=host0:1234 AIT_JAX_NUM_PROCESSES=N AIT_JAX_PROCESS_ID=i
  AIT_JAX_DISTRIBUTED=auto|on|off   the default of --distributed (auto when unset)
"""
import os

from absl import flags
import jax

from ait_jax import cli
from ait_jax import errors

# Set these to start a multi-process run by hand (JAX's auto-detection needs none of them).
ENV_COORDINATOR = 'AIT_JAX_COORDINATOR'  # host:port of process 0
ENV_NUM_PROCESSES = 'AIT_JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'AIT_JAX_PROCESS_ID'
ENV_DISTRIBUTED = 'AIT_JAX_DISTRIBUTED'  # 'auto' (default), '1' / 'on', '0' / 'off'

_initialized = False


def maybe_initialize(mode: str | None = None) -> None:
  """Initialises multi-host JAX once, before any other JAX call touches the backend.

  mode: 'on' always initialises (auto-detected cluster or the env coordinator), 'off' never,
  'auto' initialises when a coordinator is given in the environment or a multi-worker TPU
  (TPU_WORKER_HOSTNAMES) or SLURM job is detected; Cloud TPU VM pods that do not export
  TPU_WORKER_HOSTNAMES need 'on' (launch/tpu_vm.sh sets it). None reads `AIT_JAX_DISTRIBUTED` (default 'auto').
  """
  global _initialized
  if _initialized:
    return
  mode = (mode or os.environ.get(ENV_DISTRIBUTED, 'auto')).lower()
  mode = {'1': 'on', 'true': 'on', '0': 'off', 'false': 'off'}.get(mode, mode)
  if mode not in ('auto', 'on', 'off'):
    raise errors.ConfigError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}.")
  if mode == 'off':
    return
  # Cross-process collectives between CPU devices (tests, CPU clusters) go through gloo; the
  # setting is ignored by GPU and TPU backends.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  coordinator = os.environ.get(ENV_COORDINATOR)
  if coordinator:
    missing = [v for v in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if v not in os.environ]
    if missing:
      raise errors.ConfigError(f'{ENV_COORDINATOR} is set, so also set {" and ".join(missing)}.')
    numbers = {}
    for name in (ENV_NUM_PROCESSES, ENV_PROCESS_ID):
      try:
        numbers[name] = int(os.environ[name])
      except ValueError:
        raise errors.ConfigError(f'{name}={os.environ[name]!r} must be an integer.') from None
    _start(f'the coordinator {coordinator}', coordinator_address=coordinator,
           num_processes=numbers[ENV_NUM_PROCESSES], process_id=numbers[ENV_PROCESS_ID])
    return
  detected = ('TPU_WORKER_HOSTNAMES' in os.environ and
              len(os.environ['TPU_WORKER_HOSTNAMES'].split(',')) > 1) or (
                  int(os.environ.get('SLURM_NTASKS', '1')) > 1)
  if mode == 'on' or detected:
    _start('the auto-detected cluster')


def _start(where: str, **kwargs) -> None:
  """jax.distributed.initialize, its failures (unreachable coordinator, no cluster found) as one
  sentence that says what to check."""
  global _initialized
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    raise errors.UserError(
        f'Multi-host start-up with {where} failed ({errors.one_line(e)[:200]}); check that every '
        f'process runs with the same {ENV_COORDINATOR} and {ENV_NUM_PROCESSES} (or pass '
        '--distributed=off for one host).') from None
  _initialized = True


def describe() -> str:
  """One line for logs and the launch preflight: who am I and what do I see."""
  return (f'process {jax.process_index()}/{jax.process_count()}: '
          f'{jax.local_device_count()} local / {jax.device_count()} global devices '
          f'({jax.devices()[0].platform}: {jax.devices()[0].device_kind})')


def define_flags(fv: flags.FlagValues) -> None:
  """--distributed, the one flag of this command, which ait_jax.main also takes."""
  flags.DEFINE_enum(
      'distributed', None, ['auto', 'on', 'off'],
      f'Multi-host start-up: on always calls jax.distributed.initialize, off never, auto when '
      f'{ENV_COORDINATOR} is set or a multi-worker TPU or SLURM job is detected; default: '
      f'${ENV_DISTRIBUTED} or auto.', flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  """`python -m ait_jax.distributed`: the preflight that launch scripts run before training."""
  maybe_initialize(fv.distributed)
  print(describe(), flush=True)


if __name__ == '__main__':
  cli.run(define_flags, main)
