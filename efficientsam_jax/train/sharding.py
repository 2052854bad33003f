"""Device mesh and shardings shared by every training phase.

The mesh axes come from the config (``config.mesh``, e.g. ``{"data": -1, "fsdp": 1}``;
one axis may be -1 = all remaining devices). The batch is split over every
axis (data parallel × FSDP); parameters and optimizer state are sharded along
the ``fsdp`` axis on their largest divisible dimension and replicated over
``data``. Models stay sharding-agnostic: XLA propagates the rest.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def make_mesh(axes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with the given named axis sizes; one size may be -1 (the rest of the devices)."""
  devices = list(devices if devices is not None else jax.devices())
  names, sizes = list(axes), [int(v) for v in axes.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise ValueError(f"mesh {dict(axes)} does not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over (all of them: data parallel × FSDP)."""
  return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**12) -> P:
  """Shards the largest dimension divisible by ``fsdp_size``; small arrays stay replicated."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, min_size: int = 2**12):
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer state, ...)."""
  fsdp_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP_AXIS, 1)

  def leaf_sharding(leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

  return jax.tree_util.tree_map(leaf_sharding, abstract_state)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's share of the batch → global arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
