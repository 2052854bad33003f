"""SAMI pretraining: the jitted training step (and, next, the training loop)."""

from __future__ import annotations

from typing import Callable

import jax
import optax

from efficientsam_jax.models.sami import SamiModel, sami_loss
from efficientsam_jax.train.state import TrainState


def make_train_step(model: SamiModel, tx: optax.GradientTransformation, schedule: Callable,
                    loss_kind: str = "mse", loss_tokens: str = "all"):
  """Returns ``step(state, batch, rng) -> (state, metrics)``; jit it with shardings and donation.

  ``batch``: ``images`` [B, S, S, 3] normalized, ``targets`` [B, N, C] teacher
  features in token order. The mask RNG is ``fold_in(rng, step)``, so a resumed
  run draws the same masks as an uninterrupted one.
  """

  def step(state: TrainState, batch, rng):
    mask_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      predictions, mask = model.apply({"params": params}, batch["images"], mask_rng)
      return sami_loss(predictions, batch["targets"], mask, loss_kind, loss_tokens).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def jit_train_step(step_fn, state_shardings, batch_sharding, replicated):
  """The step jitted over the mesh: state in/out in its shardings (donated), batch split over devices."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
