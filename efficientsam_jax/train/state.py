"""Train state and its sharded initialization, shared by every training phase."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import optax
from jax.sharding import Mesh

from efficientsam_jax.train import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       rng: jax.Array, mesh: Mesh) -> tuple[TrainState, Any]:
  """Initializes parameters and optimizer state directly in their shardings.

  Shapes first (``jax.eval_shape``), shardings second, then one jitted
  initialization with ``out_shardings``, so no array is ever materialized whole
  on one device. Returns (state, state_shardings).
  """

  def init(rng):
    params = init_params(rng)
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings
