"""SAMI pretraining: the jitted training step and the job (teacher records → student → export)."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from efficientsam_jax.models.efficient_sam import normalize_uint8
from efficientsam_jax.models.sami import SamiModel, sami_loss
from efficientsam_jax.train.state import TrainState, accumulate_gradients


def make_loss_fn(model: SamiModel, loss_kind: str = "mse", loss_tokens: str = "all") -> Callable:
  """``loss(params, batch, mask_rng, example_ids=None)``: the batch's mean SAMI loss.

  ``batch``: ``images`` uint8 [B, S, S, 3] (normalized here), ``targets`` [B, N, C] teacher
  features in token order; ``example_ids`` pick each example's mask (``random_masking``).
  """

  def loss(params, batch, mask_rng, example_ids=None):
    predictions, mask = model.apply({"params": params}, normalize_uint8(batch["images"]), mask_rng, example_ids)
    return sami_loss(predictions, batch["targets"], mask, loss_kind, loss_tokens).mean()

  return loss


def make_train_step(model: SamiModel, tx: optax.GradientTransformation, schedule: Callable,
                    loss_kind: str = "mse", loss_tokens: str = "all", microbatches: int = 1):
  """Returns ``step(state, batch, rng) -> (state, metrics)``; jit it with shardings and donation.

  ``batch`` as for ``make_loss_fn``. The mask RNG is ``fold_in(rng, step)``, so a resumed
  run draws the same masks as an uninterrupted one. ``microbatches`` > 1 accumulates the
  gradient over that many parts of the batch (``train.state.accumulate_gradients``): the same
  masks, loss and update as one pass, with a part's activations alive at a time.
  """
  loss_fn = make_loss_fn(model, loss_kind, loss_tokens)

  def step(state: TrainState, batch, rng):
    mask_rng = jax.random.fold_in(rng, state.step)
    rows = batch["images"].shape[0]
    share = lambda params, part, ids: (loss_fn(params, part, mask_rng, ids) * (ids.shape[0] / rows), ())
    (loss, _), grads = accumulate_gradients(share, state.params, batch, microbatches)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def export_student(params, sami_config, output_dir: str, seed: int = 0) -> str:
  """Writes an EfficientSAM weights directory whose image encoder is the SAMI student (``params``: host copies).

  The ViT (patch embedding, position table, blocks) comes from the student; the
  neck, prompt encoder and mask decoder are freshly initialized for finetuning.
  The predictor and the finetuning job load it with ``load_pretrained``.
  """
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, init_params
  from efficientsam_jax.models.pretrained import save_pretrained
  from efficientsam_jax.models.sami import student_encoder_params
  if sami_config.img_size != 224 or sami_config.patch_size != 16:
    raise ValueError("EfficientSAM's position table is the 14×14 grid of 224-pixel, patch-16 pre-training; "
                     f"this student uses img_size {sami_config.img_size}, patch {sami_config.patch_size}")
  config = EfficientSamConfig(encoder_embed_dim=sami_config.encoder_embed_dim,
                              encoder_depth=sami_config.encoder_depth,
                              encoder_num_heads=sami_config.encoder_num_heads)
  full = jax.device_get(init_params(EfficientSam(config), jax.random.PRNGKey(seed)))
  encoder = dict(full["image_encoder"])
  encoder.update(student_encoder_params(params))
  full = {**full, "image_encoder": encoder}
  return save_pretrained(output_dir, full, config, overwrite=True)


def train_and_evaluate(config, workdir: str) -> dict:
  """The SAMI job: teacher records → sharded student training with checkpoints, logs and export.

  Resumes from the latest checkpoint in ``workdir`` (model, optimizer and input
  iterator together); SIGTERM saves a checkpoint and stops.
  """
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.common.multihost import barrier, host_copy
  from efficientsam_jax.data import teacher_records
  from efficientsam_jax.data.precompute import run_precompute
  from efficientsam_jax.data.sami_input import sami_dataset
  from efficientsam_jax.models.layers import Kernels
  from efficientsam_jax.models.sami import SamiConfig
  from efficientsam_jax.train import sharding
  from efficientsam_jax.train.loop import jit_train_step, optimizer_for, train_loop
  from efficientsam_jax.train.state import create_train_state

  records_dir = config.data.records_dir or os.path.join(workdir, "teacher_records")
  if config.precompute.enabled:
    run_precompute(config.precompute.copy_and_resolve_references(), workdir)  # skips finished shards
    barrier("teacher_precompute")  # every process's shards are in the manifests before anyone reads them
  # The manifest lists the finished shards: a stray or half-written file is never read.
  shards = teacher_records.Manifest(records_dir).entries()
  if not shards:
    raise FileNotFoundError(f"no teacher records listed in a manifest in {records_dir}: run the "
                            "teacher_precompute job first or set data.records_dir")
  paths = [os.path.join(records_dir, name) for name in sorted(shards)]
  if config.data.verify:  # grain's reader skips CRCs: check every shard once, naming a damaged one
    teacher_records.verify_shards(records_dir)
  num_records = sum(entry["count"] for entry in shards.values())
  # An epoch is a pass over the source images (the paper's 400 ImageNet epochs), not over their stored views.
  if all("images" in entry for entry in shards.values()):
    num_images = sum(entry["images"] for entry in shards.values())
  else:
    num_images = num_records
    print(f"warning: the manifests in {records_dir} do not count source images (written by an older version): "
          "an epoch here is a pass over the stored views; set total_steps to train for a given length")

  global_batch = config.global_batch_size
  tx, schedule, total_steps = optimizer_for(config, num_images)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  model = SamiModel(SamiConfig(**config.model.to_dict()), dtype=jnp.dtype(config.dtype), remat=config.remat,
                    kernels=Kernels(**config.kernels.to_dict()))
  side = config.model.img_size
  init = lambda rng: model.init(rng, jnp.zeros((1, side, side, 3)), rng)["params"]
  state, shardings = create_train_state(init, tx, jax.random.PRNGKey(config.seed), mesh)
  step_fn = jit_train_step(make_train_step(model, tx, schedule, config.loss.kind, config.loss.tokens,
                                           config.microbatches),
                           shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh))
  iterator = iter(sami_dataset(paths, local_batch_size=global_batch // jax.process_count(), seed=config.seed,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               shuffle_window=config.data.shuffle_window, cycle_length=config.data.cycle_length))
  result = train_loop(state=state, shardings=shardings, step_fn=step_fn, iterator=iterator, mesh=mesh,
                      workdir=workdir, total_steps=total_steps, examples_per_step=global_batch,
                      log_every_steps=config.log_every_steps, checkpoint_every_steps=config.checkpoint.every_steps,
                      keep_checkpoints=config.checkpoint.keep, rng=jax.random.PRNGKey(config.seed + 1),
                      description=f"SAMI: {num_records} views of {num_images} images, ")
  exported = None
  student = host_copy(result.state.params) if result.finished else None  # every process takes part
  if result.finished and jax.process_index() == 0:
    exported = export_student(student, model.config, os.path.join(workdir, "efficientsam_student"))
    print(f"exported the student encoder as an EfficientSAM weights directory: {exported}")
  return {"step": result.step, "total_steps": total_steps, "first_logged_loss": result.first_logged_loss,
          "last_logged_loss": result.last_logged_loss, "state": result.state, "exported": exported}
