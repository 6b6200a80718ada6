"""Multi-process start-up: `jax.distributed.initialize` when the job has several.

A job has several processes (one per host on a TPU pod or GPU cluster, or
several on one machine for testing) when any of these says so:

- the flags `--coordinator_address HOST:PORT --num_processes N --process_id I`
  (passed here as arguments);
- the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`;
- a cluster JAX detects by itself: Slurm (`SLURM_NTASKS` > 1), Open MPI
  (`OMPI_COMM_WORLD_SIZE` > 1), a multi-host Cloud TPU (`TPU_WORKER_HOSTNAMES`
  with several hosts).

Otherwise the job is one process and nothing is initialised. On CPU the
cross-process collectives use gloo. Must run before anything touches a device.
"""

import os

import jax
from absl import logging


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else None


def cluster_detected() -> bool:
  """True if the environment describes a job of more than one process."""
  if (_env_int('SLURM_NTASKS') or 1) > 1:
    return True
  if (_env_int('OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def maybe_initialize(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initialises the distributed runtime if the job is multi-process.

  Returns True if this call (or an earlier one) initialised it.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None:
    num_processes = _env_int('JAX_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int('JAX_PROCESS_ID')
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if not explicit and not cluster_detected():
    return False
  if explicit and None in (coordinator_address, num_processes, process_id):
    raise ValueError(
        'a multi-process run needs all of --coordinator_address, --num_processes '
        f'and --process_id (got {coordinator_address!r}, {num_processes!r}, '
        f'{process_id!r})')
  if jax.config.jax_cpu_collectives_implementation is None:
    # Collectives between CPU processes (tests, CPU clusters).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('process %d of %d; %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
