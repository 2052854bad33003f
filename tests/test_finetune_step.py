"""Finetuning: prompt simulation, SAM's losses, the jitted step on a data × FSDP mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, init_params
from efficientsam_jax.train import prompts, sharding
from efficientsam_jax.train.benchmark import saved_residual_bytes
from efficientsam_jax.train.finetune import (dice_loss, focal_loss, make_loss_fn, make_point_eval, make_train_step,
                                             mask_iou, round_loss)
from efficientsam_jax.train.loop import jit_train_step
from efficientsam_jax.train.optim import make_optimizer
from efficientsam_jax.train.state import create_train_state

TINY = EfficientSamConfig(img_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_dim=32,
                          decoder_num_heads=2, decoder_mlp_dim=64)
LOSS = ml_collections.ConfigDict({"correction_steps": 2, "multimask": "single", "point_prob": 0.5,
                                  "max_box_noise_px": 20.0, "focal_weight": 20.0, "dice_weight": 1.0,
                                  "iou_weight": 1.0})


def _rect_masks(batch, num, grid, rng):
  """Random axis-aligned rectangles as masks [B, N, g, g] and their exact boxes in 4·g-pixel images."""
  masks = np.zeros((batch, num, grid, grid), bool)
  boxes = np.zeros((batch, num, 4), np.float32)
  scale = TINY.img_size / grid
  for b in range(batch):
    for n in range(num):
      y0, x0 = rng.integers(0, grid - 4, 2)
      y1, x1 = y0 + rng.integers(2, grid - y0), x0 + rng.integers(2, grid - x0)
      masks[b, n, y0:y1, x0:x1] = True
      boxes[b, n] = np.array([x0, y0, x1, y1]) * scale
  return masks, boxes


def test_points_are_inside_their_region_and_uniform():
  rng = np.random.default_rng(0)
  masks, _ = _rect_masks(2, 5, 16, rng)
  masks[1, 4] = False  # an empty region
  xy, found = prompts.sample_in_region(jax.random.PRNGKey(0), jnp.asarray(masks), img_size=64)
  assert found.tolist() == [[True] * 5, [True] * 4 + [False]]
  cells = np.asarray(prompts.cell_of(xy, 16, 64))
  flat = masks.reshape(2, 5, -1)
  for b in range(2):
    for n in range(5 if b == 0 else 4):
      assert flat[b, n, cells[b, n]]
  # Uniform over the region's cells: a 2-cell region is hit about half and half.
  region = np.zeros((4000, 1, 4, 4), bool)
  region[:, :, 0, 0] = region[:, :, 3, 2] = True
  xy, _ = prompts.sample_in_region(jax.random.PRNGKey(1), jnp.asarray(region), img_size=4)
  share = float(np.mean(np.asarray(prompts.cell_of(xy, 4, 4)) == 0))
  assert 0.45 < share < 0.55


def test_first_prompts_points_or_noisy_boxes():
  rng = np.random.default_rng(1)
  masks, boxes = _rect_masks(4, 32, 16, rng)
  points, labels, is_point, next_slot = prompts.first_prompts(jax.random.PRNGKey(2), jnp.asarray(masks),
                                                              jnp.asarray(boxes), img_size=64, num_points=6)
  points, labels, is_point = map(np.asarray, (points, labels, is_point))
  assert 0.3 < is_point.mean() < 0.7  # p = 0.5
  assert (labels[is_point][:, 0] == 1).all() and (labels[is_point][:, 1:] == -1).all()
  assert (labels[~is_point][:, :2] == [2, 3]).all() and (labels[~is_point][:, 2:] == -1).all()
  assert (np.asarray(next_slot) == np.where(is_point, 1, 2)).all()
  cells = np.asarray(prompts.cell_of(jnp.asarray(points[:, :, 0]), 16, 64))
  inside = np.take_along_axis(masks.reshape(4, 32, -1), cells[..., None], -1)[..., 0]
  assert inside[is_point].all()
  # Box noise: each coordinate within min(10% of the side, 20 px · 64/1024) of the exact box.
  side = np.concatenate([boxes[..., 2:] - boxes[..., :2]] * 2, -1)
  bound = np.minimum(0.1 * side, 20 * 64 / 1024)
  noisy = points[:, :, :2].reshape(4, 32, 4)
  assert (np.abs(noisy - boxes)[~is_point] <= bound[~is_point] + 1e-4).all()
  assert (np.abs(noisy - boxes)[~is_point] > 0).any()


def test_correction_point_comes_from_the_error_region():
  masks = np.zeros((1, 3, 8, 8), bool)
  masks[0, :, 2:6, 2:6] = True
  prediction = masks.copy()
  prediction[0, 0, 2:6, 2:4] = False  # false negatives only → a positive point there
  prediction[0, 1, 0, 0] = True  # one false positive → a negative point at that cell
  points = jnp.full((1, 3, 6, 2), -1.0)
  labels = jnp.full((1, 3, 6), -1.0)
  slot = jnp.array([[1, 2, 3]])
  points, labels, slot = prompts.add_correction_point(jax.random.PRNGKey(0), points, labels, slot,
                                                      jnp.asarray(prediction), jnp.asarray(masks), img_size=32)
  labels, points = np.asarray(labels), np.asarray(points)
  assert labels[0, 0, 1] == 1 and labels[0, 1, 2] == 0
  assert (labels[0, 2] == -1).all()  # exact prediction: nothing added
  assert np.asarray(slot).tolist() == [[2, 3, 3]]
  cell = np.asarray(prompts.cell_of(jnp.asarray(points[0, 0, 1]), 8, 32))
  assert (cell // 8, cell % 8) in {(y, x) for y in range(2, 6) for x in range(2, 4)}
  assert np.asarray(prompts.cell_of(jnp.asarray(points[0, 1, 2]), 8, 32)) == 0


def test_losses_match_their_formulas():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 5)).astype(np.float32) * 3
  targets = (rng.random((2, 5, 5)) > 0.5).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  ce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
  p_t = p * targets + (1 - p) * (1 - targets)
  a_t = 0.25 * targets + 0.75 * (1 - targets)
  np.testing.assert_allclose(focal_loss(logits, targets), (a_t * ce * (1 - p_t) ** 2).mean((1, 2)), rtol=1e-5)
  dice = 1 - (2 * (p * targets).sum((1, 2)) + 1) / (p.sum((1, 2)) + targets.sum((1, 2)) + 1)
  np.testing.assert_allclose(dice_loss(logits, targets), dice, rtol=1e-5)
  a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
  a[:2], b[1:3] = True, True
  assert float(mask_iou(a, b)) == pytest.approx(4 / 12)


def test_single_point_prompts_train_the_best_multimask_output():
  masks = np.zeros((1, 2, 4, 4), bool)
  masks[..., :2, :] = True
  good = np.where(masks[:, :, None], 8.0, -8.0)
  bad = -good
  # Outputs: single-mask output is perfect, multimask outputs 1 and 3 bad, 2 perfect.
  logits = np.concatenate([good, bad, good, bad], axis=2).astype(np.float32)
  iou_pred = np.full((1, 2, 4), 0.5, np.float32)
  single_point = np.array([[True, False]])
  kw = dict(multimask="single", focal_weight=20.0, dice_weight=1.0, iou_weight=1.0)
  loss, chosen, actual = round_loss(jnp.asarray(logits), jnp.asarray(iou_pred), jnp.asarray(masks),
                                    jnp.asarray(single_point), **kw)
  np.testing.assert_array_equal(np.asarray(chosen) > 0, masks)  # output 2 for the point, 0 for the box
  np.testing.assert_allclose(actual, [[1.0, 1.0]])
  # Only the chosen output's IoU prediction is trained: (0.5 − 1)² on top of a tiny mask loss.
  assert np.all(np.asarray(loss) > 0.25) and np.all(np.asarray(loss) < 0.3)
  logits[0, 1, 0] = bad[0, 1, 0]  # the box's single-mask output is now wrong: "single" must still train it
  loss, chosen, _ = round_loss(jnp.asarray(logits), jnp.asarray(iou_pred), jnp.asarray(masks),
                               jnp.asarray(single_point), **kw)
  assert float(loss[0, 1]) > 1.0
  loss, _, _ = round_loss(jnp.asarray(logits), jnp.asarray(iou_pred), jnp.asarray(masks),
                          jnp.asarray(single_point), **{**kw, "multimask": "best"})
  assert float(loss[0, 1]) < 0.3  # "best": the perfect multimask output 2
  # IoU head: predicting 1 everywhere is right for the chosen (perfect) output only; with
  # supervise_all_iou the two bad outputs' errors (1 − 0)² count too: mean over 4 outputs ≥ 0.5.
  ones = jnp.ones((1, 2, 4))
  chosen_only, _, _ = round_loss(jnp.asarray(logits), ones, jnp.asarray(masks), jnp.asarray(single_point),
                                 **{**kw, "multimask": "best"})
  every, _, _ = round_loss(jnp.asarray(logits), ones, jnp.asarray(masks), jnp.asarray(single_point),
                           **{**kw, "multimask": "best", "supervise_all_iou": True})
  np.testing.assert_allclose(np.asarray(every - chosen_only), [[0.5, 0.75]], atol=1e-6)


def _batch(step, batch=8, num=4):
  rng = np.random.default_rng(step)
  masks, boxes = _rect_masks(batch, num, TINY.low_res_size, rng)
  valid = np.ones((batch, num), bool)
  valid[:, -1] = False  # padding masks must not count
  return {"image": rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8), "masks": masks.astype(np.uint8),
          "valid": valid, "boxes": boxes}


def _run(mesh, steps=2):
  model = EfficientSam(TINY)
  tx, schedule = make_optimizer({"optimizer": {"b1": 0.9, "b2": 0.999, "weight_decay": 0.1},
                                 "lr": {"base_lr": 4e-4, "base_batch": 8, "warmup_steps": 0, "schedule": "linear"},
                                 "global_batch_size": 8, "total_steps": 10})
  params = init_params(model, jax.random.PRNGKey(0))
  state, shardings = create_train_state(lambda rng: params, tx, jax.random.PRNGKey(0), mesh)
  step = jit_train_step(make_train_step(model, tx, schedule, LOSS), shardings, sharding.batch_sharding(mesh),
                        sharding.replicated(mesh))
  losses = []
  for i in range(steps):
    state, metrics = step(state, sharding.global_batch(_batch(i), mesh), jax.random.PRNGKey(5))
    losses.append(float(metrics["loss"]))
    assert float(metrics["masks"]) == 8 * 3
  return state, losses


def test_step_on_data_fsdp_mesh_matches_one_device_and_ignores_padding():
  _, single = _run(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  state, sharded = _run(sharding.make_mesh({"data": 2, "fsdp": 4}))
  np.testing.assert_allclose(sharded, single, rtol=1e-4)
  assert single[0] != single[1] and all(np.isfinite(single))
  moments = jax.tree_util.tree_leaves(state.opt_state)
  assert any("fsdp" in getattr(m.sharding, "spec", ()) for m in moments)
  # Padding masks carry no weight: changing them changes nothing.
  model = EfficientSam(TINY)
  tx = optax.sgd(0.0)
  params = init_params(model, jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(model, tx, lambda s: 0.0, LOSS))
  from efficientsam_jax.train.state import TrainState
  base = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  batch = _batch(0)
  altered = {**batch, "masks": batch["masks"].copy()}
  altered["masks"][:, -1] = 1 - altered["masks"][:, -1]
  a = step(base, batch, jax.random.PRNGKey(0))[1]["loss"]
  b = step(base, altered, jax.random.PRNGKey(0))[1]["loss"]
  assert float(a) == float(b)


def test_microbatches_give_the_step_of_one_pass():
  """Gradient accumulation over 2 parts whose valid-mask counts differ: the same prompts, mean over the whole
  batch's valid masks, metrics and update as one pass."""
  from efficientsam_jax.train.state import TrainState
  model = EfficientSam(TINY)
  tx = optax.sgd(1.0)
  params = init_params(model, jax.random.PRNGKey(0))
  base = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  batch = _batch(3, batch=4)
  batch["valid"][0, :2] = False  # part 0 (rows 0, 2) has 4 valid masks, part 1 (rows 1, 3) has 6
  loss = ml_collections.ConfigDict({**LOSS.to_dict(), "correction_steps": 1})  # one correction round: faster
  results = [jax.jit(make_train_step(model, tx, lambda s: 0.0, loss, microbatches=k))(
      base, batch, jax.random.PRNGKey(1)) for k in (1, 2)]
  (whole_state, whole), (parts_state, parts) = results
  assert float(whole["masks"]) == float(parts["masks"]) == 10
  for key in ("loss", "miou_first_prompt", "miou_last_round", "grad_norm"):
    np.testing.assert_allclose(float(parts[key]), float(whole[key]), rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree_util.tree_leaves(parts_state.params), jax.tree_util.tree_leaves(whole_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_remat_keeps_the_loss_and_gradients_and_saves_less():
  """``remat`` applies to the encoder blocks and to each decoder round (decode + loss) of the step."""
  params = init_params(EfficientSam(TINY), jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in _batch(0, batch=2).items()}
  prompt_rng, drop_rng = jax.random.split(jax.random.PRNGKey(3))

  def loss_of(remat):
    loss_fn = make_loss_fn(EfficientSam(TINY, remat=remat), LOSS)
    return lambda p: loss_fn(p, batch, prompt_rng, drop_rng)[0]

  # The finetuning configs' policy gives the loss and gradients of no remat (each compile takes ~20 s here).
  reference_loss, reference_grads = jax.jit(jax.value_and_grad(loss_of("none")))(params)
  loss, grads = jax.jit(jax.value_and_grad(loss_of("projections")))(params)
  np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(reference_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)
  kept = {policy: saved_residual_bytes(loss_of(policy), params) for policy in ("none", "dots", "projections", "full")}
  assert kept["none"] > kept["dots"] > kept["projections"] > kept["full"]
  # Beyond the encoder's blocks: with "full", about as little is kept as the rounds' inputs and outputs.
  assert kept["full"] < kept["none"] / 20


def test_point_eval_counts_valid_masks_and_is_reproducible():
  model = EfficientSam(TINY)
  params = init_params(model, jax.random.PRNGKey(0))
  evaluate = make_point_eval(model)
  batch = _batch(1)
  iou_sum, count = evaluate(params, batch)
  assert float(count) == 8 * 3 and 0.0 <= float(iou_sum) / float(count) <= 1.0  # padding masks excluded
  assert float(evaluate(params, batch)[0]) == float(iou_sum)  # seeded clicks: the same number every time


def test_drop_path_only_with_its_rng():
  from efficientsam_jax.models.efficient_sam import normalize_uint8
  from efficientsam_jax.models.vit import DROP_PATH_RNG
  params = init_params(EfficientSam(TINY), jax.random.PRNGKey(0))
  images = normalize_uint8(jnp.asarray(_batch(0)["image"]))
  encode = lambda model, **kw: model.apply({"params": params}, images, method=EfficientSam.encode, **kw)
  plain = encode(EfficientSam(TINY))
  dropping = EfficientSam(TINY, drop_path_rate=0.5)
  np.testing.assert_array_equal(encode(dropping), plain)  # inference: no RNG, no drop-path
  a = encode(dropping, rngs={DROP_PATH_RNG: jax.random.PRNGKey(1)})
  b = encode(dropping, rngs={DROP_PATH_RNG: jax.random.PRNGKey(2)})
  assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-3 and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  # The training step takes the drop-path model as it is.
  tx = optax.sgd(1e-3)
  from efficientsam_jax.train.state import TrainState
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  _, metrics = jax.jit(make_train_step(dropping, tx, lambda s: 1e-3, LOSS))(state, _batch(0), jax.random.PRNGKey(0))
  assert np.isfinite(float(metrics["loss"]))
