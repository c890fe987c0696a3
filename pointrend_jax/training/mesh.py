"""Data-parallel device mesh: one ``'data'`` axis over every device of every process.

Parameters and optimizer state are replicated; batches are split along their leading axis.
The step is an ordinary ``jax.jit`` over global arrays (SPMD), so the same code runs on one
CPU, one host with 8 GPUs, or many hosts after :func:`initialize_distributed`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "initialize_distributed", "make_mesh", "data_sharding",
           "replicated_sharding", "shard_batch", "replicate"]

logger = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto_detect: bool = False,
                           local_device_ids: Sequence[int] | None = None) -> tuple[int, int]:
  """Starts JAX's multi-process runtime, if asked to; a no-op for single-process runs.

  Call before any other JAX call. With an explicit ``coordinator_address`` (``host:port`` of
  process 0) all three of ``coordinator_address, num_processes, process_id`` are passed on;
  with ``auto_detect`` JAX reads them from the cluster environment (SLURM, Open MPI, TPU pods,
  Kubernetes/GKE).

  Returns:
    ``(jax.process_index(), jax.process_count())``.
  """
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError("coordinator_address needs num_processes and process_id")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
  elif auto_detect:
    jax.distributed.initialize()
  logger.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_index(), jax.process_count()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all global devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``'data'``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Fully replicated (parameters, optimizer state, keys, scalars)."""
  return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's batch (leading axis = its images) -> global arrays split over ``'data'``.

  Every process passes its own slice; the global leading size is the sum over processes (the
  grain pipeline gives process ``p`` the rows ``[p*B, (p+1)*B)`` of the global batch, which is
  the order ``make_array_from_process_local_data`` assumes).
  """
  sharding = data_sharding(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.ndim == 0:
      raise ValueError(f"batch entry {k!r} is a scalar; batch entries need a leading axis")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every array of ``tree`` on all devices of ``mesh`` (same values on every process)."""
  return jax.device_put(tree, replicated_sharding(mesh))
