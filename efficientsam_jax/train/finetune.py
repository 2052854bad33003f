"""EfficientSAM finetuning on SA-1B: losses, the jitted step with simulated prompts, evaluation, the job.

One step (REFERENCE.md §3): the image encoder runs once; then ``1 +
correction_steps`` rounds of prompts go through the prompt encoder and mask
decoder, the first prompt a point or a noisy box (``train/prompts.py``), every
later round one more point from the error region of the previous round's mask.
Each round's loss is ``focal_weight``·focal (α 0.25, γ 2) + ``dice_weight``·dice
on the mask logits plus ``iou_weight``·MSE between the predicted IoU and the
IoU of the predicted mask with the ground truth; rounds are summed, masks
averaged (padding masks excluded).

Which output is trained (``loss.multimask``): a prompt that is one point is
ambiguous, so the decoder's 3 multimask outputs are scored and only the one
with the lowest mask loss is back-propagated (SAM). Any other prompt (a box,
several points) trains the single-mask output (``"single"``, the default, as
SAM 2's training does; the predictor also returns it for such prompts when
``multimask_output=False``), or the best of the 3 multimask outputs (``"best"``).
The next round's error region comes from the trained output.

The loss is computed on the grid of the batch's masks: the decoder's low-res
logits (256² at 1024) as they are, or upsampled bilinearly when the reader
gives larger masks (``data.mask_size``).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from efficientsam_jax.common.multihost import barrier, host_copy
from efficientsam_jax.models.efficient_sam import EfficientSam, normalize_uint8
from efficientsam_jax.models.layers import per_example, remat_policy
from efficientsam_jax.models.vit import DROP_PATH_RNG
from efficientsam_jax.train import prompts
from efficientsam_jax.train.state import TrainState, accumulate_gradients


def focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Sigmoid focal loss averaged over the last two (pixel) axes."""
  p = jax.nn.sigmoid(logits)
  ce = optax.sigmoid_binary_cross_entropy(logits, targets)
  p_t = p * targets + (1 - p) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return jnp.mean(alpha_t * ce * (1 - p_t) ** gamma, axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``1 − (2·Σ p·t + 1) / (Σ p + Σ t + 1)`` over the pixel axes, p = sigmoid(logits)."""
  p = jax.nn.sigmoid(logits)
  inter = jnp.sum(p * targets, axis=(-2, -1))
  return 1.0 - (2.0 * inter + 1.0) / (jnp.sum(p, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1)) + 1.0)


def mask_iou(prediction: jax.Array, targets: jax.Array) -> jax.Array:
  """IoU of boolean masks over the pixel axes (1 where both are empty)."""
  inter = jnp.sum(prediction & targets, axis=(-2, -1))
  union = jnp.sum(prediction | targets, axis=(-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def to_grid(logits: jax.Array, size: int) -> jax.Array:
  """Logits [..., h, w] → [..., size, size] (bilinear when the loss grid is finer than the decoder's)."""
  if logits.shape[-1] == size:
    return logits
  return jax.image.resize(logits, (*logits.shape[:-2], size, size), "bilinear")


def round_loss(logits, iou_pred, masks, single_point, *, multimask: str, focal_weight: float, dice_weight: float,
               iou_weight: float, supervise_all_iou: bool = False):
  """One round: logits [B, N, 4, M, M] and iou_pred [B, N, 4] of all outputs (single-mask one first).

  The IoU head learns the chosen output's IoU (SAM), or every output's
  (``supervise_all_iou``, SAM 2's option: the IoU-based choice at inference
  becomes reliable sooner).
  Returns (loss per mask [B, N], chosen output's logits [B, N, M, M], its IoU with the mask [B, N]).
  """
  targets = masks[:, :, None].astype(jnp.float32)
  mask_loss = focal_weight * focal_loss(logits, targets) + dice_weight * dice_loss(logits, targets)
  multi = jnp.array([False, True, True, True])
  use_multi = single_point if multimask == "single" else jnp.ones_like(single_point)
  allowed = jnp.where(use_multi[..., None], multi, ~multi)
  chosen = jnp.argmin(jnp.where(allowed, mask_loss, jnp.inf), axis=-1)
  take = lambda x: jnp.take_along_axis(x, chosen.reshape(*chosen.shape, *([1] * (x.ndim - 2))), axis=2)[:, :, 0]
  all_iou = jax.lax.stop_gradient(mask_iou(logits > 0, masks[:, :, None]))
  iou_error = jnp.square(iou_pred - all_iou)
  iou_loss = jnp.mean(iou_error, axis=-1) if supervise_all_iou else take(iou_error)
  return take(mask_loss) + iou_weight * iou_loss, take(logits), take(all_iou)


def make_loss_fn(model: EfficientSam, loss_config) -> Callable:
  """``loss(params, batch, prompt_rng, drop_rng, example_ids=None, num_valid=None) -> (loss, (first-round
  mIoU, last-round mIoU))``: sums over the valid masks of ``batch`` divided by ``num_valid`` (default: the
  batch's own count, i.e. means), so the parts of a batch give it its share of the whole batch's mean.

  ``batch``: ``image`` uint8 [B, S, S, 3], ``masks`` uint8 [B, N, M, M],
  ``valid`` bool [B, N], ``boxes`` [B, N, 4] (x0, y0, x1, y1 in S pixels). Example ``i``'s prompts are
  drawn with ``example_ids[i]`` (default 0 … B − 1) folded into ``prompt_rng``.
  """
  c = model.config
  rounds = 1 + int(loss_config.correction_steps)
  if 2 + int(loss_config.correction_steps) > c.max_num_points:
    raise ValueError(f"correction_steps {loss_config.correction_steps}: a box (2 points) plus the corrections "
                     f"must fit EfficientSAM's {c.max_num_points}-point limit (at most "
                     f"{c.max_num_points - 2} correction steps)")
  if loss_config.multimask not in ("single", "best"):
    raise ValueError(f"loss.multimask must be 'single' or 'best', got {loss_config.multimask!r}")
  weights = dict(multimask=loss_config.multimask, focal_weight=loss_config.focal_weight,
                 dice_weight=loss_config.dice_weight, iou_weight=loss_config.iou_weight,
                 supervise_all_iou=bool(loss_config.get("supervise_all_iou", False)))

  def decode_round(params, embeddings, points, labels, masks, single_point):
    """One prompt round: the decoder's masks for every prompt, and their loss (``round_loss``)."""
    logits, iou_pred = model.apply({"params": params}, embeddings, points, labels, None, method=EfficientSam.decode)
    return round_loss(to_grid(logits.astype(jnp.float32), masks.shape[-1]), iou_pred.astype(jnp.float32), masks,
                      single_point, **weights)

  # Each prompt carries its own copy of the image tokens through the decoder, so a round's activations grow
  # with the masks per image (EfficientSAM-Ti, bf16, 64 masks, 3 rounds: 22.5 GB kept per image without remat):
  # with remat, a round keeps only what the policy saves and recomputes the rest in the backward pass.
  policy = remat_policy(model.remat)
  if policy is not None:
    decode_round = jax.checkpoint(decode_round, policy=policy)

  first_prompts = functools.partial(prompts.first_prompts, img_size=c.img_size, num_points=c.max_num_points,
                                    point_prob=loss_config.point_prob, max_noise_px=loss_config.max_box_noise_px)
  add_correction_point = functools.partial(prompts.add_correction_point, img_size=c.img_size)

  def loss_fn(params, batch, prompt_rng, drop_rng, example_ids=None, num_valid=None):
    masks = batch["masks"].astype(bool)
    valid = batch["valid"].astype(jnp.float32)
    num_valid = jnp.maximum(valid.sum(), 1.0) if num_valid is None else num_valid
    ids = jnp.arange(masks.shape[0], dtype=jnp.int32) if example_ids is None else example_ids
    embeddings = model.apply({"params": params}, normalize_uint8(batch["image"]).astype(model.dtype),
                             method=EfficientSam.encode, rngs={DROP_PATH_RNG: drop_rng})
    points, labels, is_point, next_slot = per_example(first_prompts, jax.random.fold_in(prompt_rng, 0), ids,
                                                      masks, batch["boxes"])
    total, first_iou = 0.0, None
    for r in range(rounds):
      loss, chosen, actual_iou = decode_round(params, embeddings, points, labels, masks, is_point & (r == 0))
      total = total + jnp.sum(loss * valid) / num_valid
      first_iou = actual_iou if first_iou is None else first_iou
      if r + 1 < rounds:
        prediction = jax.lax.stop_gradient(chosen) > 0
        points, labels, next_slot = per_example(add_correction_point, jax.random.fold_in(prompt_rng, r + 1), ids,
                                                points, labels, next_slot, prediction, masks)
    return total, (jnp.sum(first_iou * valid) / num_valid, jnp.sum(actual_iou * valid) / num_valid)

  return loss_fn


def make_train_step(model: EfficientSam, tx: optax.GradientTransformation, schedule: Callable, loss_config,
                    microbatches: int = 1):
  """Returns ``step(state, batch, rng) -> (state, metrics)``; jit it with ``loop.jit_train_step``.

  ``batch`` as for ``make_loss_fn``. Prompt RNG is ``fold_in(rng, step)``: a resumed run draws the same prompts.
  ``microbatches`` > 1 accumulates the gradient over that many parts of the batch
  (``train.state.accumulate_gradients``): the same prompts, loss and update as one pass (stochastic depth, if
  enabled, draws per part), with a part's activations alive at a time.
  """
  loss_fn = make_loss_fn(model, loss_config)

  def step(state: TrainState, batch, rng):
    prompt_rng, drop_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    num_valid = jnp.maximum(batch["valid"].astype(jnp.float32).sum(), 1.0)
    share = lambda params, part, ids: loss_fn(params, part, prompt_rng, jax.random.fold_in(drop_rng, ids[0]), ids,
                                              num_valid)
    (loss, (first_miou, last_miou)), grads = accumulate_gradients(share, state.params, batch, microbatches)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "miou_first_prompt": first_miou, "miou_last_round": last_miou,
               "masks": batch["valid"].astype(jnp.float32).sum()}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_point_eval(model: EfficientSam, seed: int = 0):
  """Jitted ``(params, batch) -> (iou_sum, count)``: one point uniform in each valid mask, multimask output,
  the mask with the highest predicted IoU scored against the ground truth on the mask grid."""
  c = model.config

  @jax.jit
  def evaluate(params, batch):
    masks = batch["masks"].astype(bool)
    embeddings = model.apply({"params": params}, normalize_uint8(batch["image"]).astype(model.dtype),
                             method=EfficientSam.encode)
    xy, _ = prompts.sample_in_region(jax.random.PRNGKey(seed), masks, c.img_size)
    labels = jnp.full((*xy.shape[:2], 1), prompts.POSITIVE)  # one point; the model pads as the official one
    logits, iou_pred = model.apply({"params": params}, embeddings, xy[:, :, None], labels, True,
                                   method=EfficientSam.decode)
    best = jnp.argmax(iou_pred, axis=-1)
    chosen = jnp.take_along_axis(logits, best[:, :, None, None, None], axis=2)[:, :, 0]
    iou = mask_iou(to_grid(chosen.astype(jnp.float32), masks.shape[-1]) > 0, masks)
    valid = batch["valid"].astype(jnp.float32)
    return jnp.sum(iou * valid), jnp.sum(valid)

  return evaluate


def point_miou(evaluate, params, batches) -> float:
  """Mean IoU over every valid mask of ``batches`` (numpy dicts)."""
  total, count = 0.0, 0.0
  for batch in batches:
    iou_sum, n = evaluate(params, {k: batch[k] for k in ("image", "masks", "valid")})
    total, count = total + float(iou_sum), count + float(n)
  return total / max(count, 1.0)


def _init_params(model: EfficientSam, config, rng) -> dict:
  """Random parameters, then the parts named by ``config.init`` loaded from weights directories."""
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.models.efficient_sam import init_params
  from efficientsam_jax.models.pretrained import load_pretrained
  params = dict(jax.device_get(init_params(model, rng)))
  for path, parts in ((config.init.checkpoint, ("image_encoder", "prompt_encoder", "mask_decoder")),
                      (config.init.encoder, ("image_encoder",)),
                      (config.init.decoder, ("prompt_encoder", "mask_decoder"))):
    if not path:
      continue
    loaded_model, loaded = load_pretrained(path)
    if loaded_model.config != model.config:
      raise ValueError(f"{path} holds a model of config {loaded_model.config.to_dict()}, but this job trains "
                       f"{model.config.to_dict()}: set config.model to match")
    for part in parts:
      params[part] = loaded[part]
    print(f"initialized {', '.join(parts)} from {path}")
  return params


def _synthetic_data(config, workdir: str) -> tuple[list[str], list[str]]:
  """The smoke run's generated SA-1B-format training tars and held-out folder (written once)."""
  from efficientsam_jax.data.sa1b_synth import write_sa1b  # pylint: disable=import-outside-toplevel
  s = config.data.synthetic
  root = os.path.join(workdir, "sa1b_synthetic")
  train, held_out = os.path.join(root, "train"), os.path.join(root, "held_out")
  if jax.process_index() == 0:  # the others read what process 0 wrote
    if not os.path.isdir(train):
      write_sa1b(train, s.num_images, seed=s.seed, size=s.size, tar=True, images_per_tar=s.images_per_tar)
    if not os.path.isdir(held_out):
      write_sa1b(held_out, s.held_out_images, seed=s.seed + 1, size=s.size)
  barrier("synthetic_sa1b")
  return [train], [held_out]


def train_and_evaluate(config, workdir: str) -> dict:
  """The finetuning job: SA-1B (or generated data) → sharded EfficientSAM training → weights directory.

  Resumes from the latest checkpoint in ``workdir``. With ``data.eval_sources``
  (the smoke run: generated held-out images) the single-point mIoU is measured
  before training and after it.
  """
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.common.multihost import process_sum
  from efficientsam_jax.data.sa1b import SA1BIndex, SkipStats, find_sources, process_sources, sa1b_dataset
  from efficientsam_jax.models.efficient_sam import EfficientSamConfig
  from efficientsam_jax.models.pretrained import save_pretrained
  from efficientsam_jax.models.layers import Kernels
  from efficientsam_jax.train import sharding
  from efficientsam_jax.train.loop import jit_train_step, optimizer_for, train_loop
  from efficientsam_jax.train.state import create_train_state

  sources, eval_sources = list(config.data.sources), list(config.data.eval_sources)
  if config.data.synthetic.enabled:
    sources, eval_sources = _synthetic_data(config, workdir)
  if not sources:
    raise ValueError("set data.sources to SA-1B tar files or folders (or use the :smoke config)")
  model_config = EfficientSamConfig(**config.model.to_dict())
  model = EfficientSam(model_config, dtype=jnp.dtype(config.dtype), remat=config.remat,
                       drop_path_rate=config.drop_path_rate, encoder_kernels=Kernels(**config.kernels.to_dict()))
  data_options = dict(image_size=model_config.img_size, mask_size=config.data.mask_size or
                      model_config.low_res_size, max_masks=config.data.max_masks,
                      max_area_fraction=config.data.max_area_fraction)
  stats = SkipStats()
  # Each process indexes its own share (tars through the index cache: a restart reads no tar header again).
  mine = process_sources(find_sources(sources), jax.process_index(), jax.process_count())
  index = SA1BIndex(mine, stats, cache_dir=config.data.index_cache or os.path.join(workdir, "sa1b_index"))
  num_images = process_sum(len(index))
  tx, schedule, total_steps = optimizer_for(config, num_images)

  mesh = sharding.make_mesh(config.mesh.to_dict())
  params = _init_params(model, config, jax.random.PRNGKey(config.seed))
  state, shardings = create_train_state(lambda rng: params, tx, jax.random.PRNGKey(config.seed), mesh)
  step_fn = jit_train_step(make_train_step(model, tx, schedule, config.loss, config.microbatches), shardings,
                           sharding.batch_sharding(mesh), sharding.replicated(mesh))
  iterator = iter(sa1b_dataset(sources, local_batch_size=config.global_batch_size // jax.process_count(),
                               seed=config.seed, process_index=jax.process_index(),
                               process_count=jax.process_count(), read_threads=config.data.read_threads,
                               stats=stats, index=index, **data_options))

  evaluate = make_point_eval(model) if eval_sources else None
  eval_batches = list(sa1b_dataset(eval_sources, local_batch_size=config.data.eval_batch_size, seed=0,
                                   shuffle=False, num_epochs=1, **data_options)) if eval_sources else []
  miou_before = point_miou(evaluate, state.params, eval_batches) if evaluate else None
  if evaluate:
    print(f"held-out single-point mIoU at step {int(state.step)}: {miou_before:.4f} "
          f"({sum(int(b['valid'].sum()) for b in eval_batches)} masks)")
  result = train_loop(state=state, shardings=shardings, step_fn=step_fn, iterator=iterator, mesh=mesh,
                      workdir=workdir, total_steps=total_steps, examples_per_step=config.global_batch_size,
                      log_every_steps=config.log_every_steps, checkpoint_every_steps=config.checkpoint.every_steps,
                      keep_checkpoints=config.checkpoint.keep, rng=jax.random.PRNGKey(config.seed + 1),
                      description=f"finetuning: {num_images} images, ",
                      batch_keys=("image", "masks", "valid", "boxes"))
  print(stats.summary())
  summary = {"step": result.step, "total_steps": total_steps, "first_logged_loss": result.first_logged_loss,
             "last_logged_loss": result.last_logged_loss, "state": result.state, "skipped": stats.skipped,
             "miou_before": miou_before, "miou_after": None, "exported": None}
  if evaluate and result.finished:
    summary["miou_after"] = point_miou(evaluate, result.state.params, eval_batches)
    print(f"held-out single-point mIoU: {miou_before:.4f} at the start → {summary['miou_after']:.4f} after "
          f"{result.step} steps")
  trained = host_copy(result.state.params) if result.finished else None  # every process takes part
  if result.finished and jax.process_index() == 0:
    summary["exported"] = save_pretrained(os.path.join(workdir, "efficientsam"), trained, model_config,
                                          overwrite=True)
    print(f"exported the finetuned model as an EfficientSAM weights directory: {summary['exported']}")
  return summary

