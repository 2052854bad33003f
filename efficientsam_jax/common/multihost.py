"""Multi-host helpers: starting ``jax.distributed`` and waiting for every process."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging


def initialize_distributed() -> None:
  """``jax.distributed.initialize()``; JAX_NUM_PROCESSES / JAX_PROCESS_ID (``launch/multihost.sh``) are passed on.

  JAX itself reads JAX_COORDINATOR_ADDRESS and detects SLURM, Open MPI and TPU
  pods; the process count and id of a hand-started job come from these two.
  """
  explicit = {name: int(os.environ[var]) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                           ("process_id", "JAX_PROCESS_ID")) if var in os.environ}
  jax.distributed.initialize(**explicit)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def barrier(name: str) -> None:
  """Waits for every JAX process (no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def process_sum(value: int) -> int:
  """The sum of an integer over every JAX process (each passes its own); every process must call it."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def host_copy(tree):
  """Numpy copies of a pytree of (possibly multi-process) arrays; every process must call it.

  Arrays this process holds whole (or fully replicated ones) are copied
  locally; arrays sharded across processes are gathered first.
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def copy(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree_util.tree_map(copy, tree)
