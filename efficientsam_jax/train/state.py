"""Train state, its sharded initialization and gradient accumulation, shared by every training phase."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from efficientsam_jax.train import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _initializer(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation):
  def init(rng):
    params = init_params(rng)
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))

  return init


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       rng: jax.Array, mesh: Mesh) -> tuple[TrainState, Any]:
  """Initializes parameters and optimizer state directly in their shardings.

  Shapes first (``jax.eval_shape``), shardings second, then one jitted
  initialization with ``out_shardings``, so no array is ever materialized whole
  on one device. Returns (state, state_shardings).
  """
  init = _initializer(init_params, tx)
  shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def abstract_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                         mesh: Mesh) -> tuple[TrainState, Any]:
  """``create_train_state``'s (state, shardings) with the state as shapes in their shardings: nothing is
  allocated (to compile a step for devices that are not attached, ``train.hlo_kernels``)."""
  abstract = jax.eval_shape(_initializer(init_params, tx), jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return state, shardings


def accumulate_gradients(share_fn: Callable, params, batch, microbatches: int = 1):
  """Sums ``share_fn(params, part, ids) -> (value, aux)`` and its gradient over ``microbatches`` parts of ``batch``.

  ``share_fn`` returns its part's share of the whole batch's value (e.g. the sum
  of the part's per-example losses over the whole batch size), so the sums are
  the whole batch's value and gradient; ``ids`` [part size] are the part's rows'
  indices in the whole batch, for per-example randomness that does not depend on
  the split. Part ``j`` holds rows j, j + k, j + 2k, ...: each device's
  contiguous block of the batch splits into k blocks that stay on it. The parts
  run one after the other (``lax.scan``), so the activations of one part at a
  time are alive; with 1 the function is called once on the whole batch.
  Returns ((value, aux), grads).
  """
  rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
  if rows % microbatches:
    raise ValueError(f"a batch of {rows} does not split into {microbatches} microbatches")
  value_and_grad = jax.value_and_grad(share_fn, has_aux=True)
  ids = jnp.arange(rows, dtype=jnp.int32)
  if microbatches == 1:
    return value_and_grad(params, batch, ids)
  split = lambda x: jnp.swapaxes(x.reshape(rows // microbatches, microbatches, *x.shape[1:]), 0, 1)
  parts = jax.tree_util.tree_map(split, (batch, ids))
  part_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), parts)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(value_and_grad, params, *part_shapes))

  def add_part(total, part):
    return jax.tree_util.tree_map(jnp.add, total, value_and_grad(params, *part)), None

  return jax.lax.scan(add_part, zeros, parts)[0]
