"""Optimizer and schedule: lr values, weight-decay and frozen masks, AdamW step, layer decay, config checks."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from efficientsam_jax.models import EfficientSam, EfficientSamConfig, init_params
from efficientsam_jax.models.sami import SamiConfig, SamiModel
from efficientsam_jax.train.optim import (frozen_mask, layer_decay_scales, learning_rate_schedule,
                                          make_optimizer, scaled_learning_rate, weight_decay_mask)

TINY_SAMI = dict(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=3, img_size=64,
                 decoder_dim=32, decoder_depth=2, decoder_num_heads=4, target_dim=8)
TINY_CONFIG = os.path.join(os.path.dirname(__file__), "data", "efficientsam_tiny", "config.json")
GAUSSIAN = "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"


def _random_like(shapes, seed=0):
  """Random values for an eval_shape tree: no model initialization needed."""
  # NumPy draws: jax.random would compile one kernel per distinct shape.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def sami_params():
  """A real SAMI tree, including the top-level "params" collection as ``model.init`` returns it."""
  model = SamiModel(SamiConfig(**TINY_SAMI))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             jax.random.PRNGKey(1)))
  return _random_like(shapes)


@pytest.fixture(scope="module")
def esam_params():
  shapes = jax.eval_shape(lambda: init_params(EfficientSam(EfficientSamConfig.from_json(TINY_CONFIG)),
                                              jax.random.PRNGKey(0)))
  return _random_like(shapes, seed=1)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _config(**overrides):
  """SAMI recipe at a test scale; ``overrides`` keys are "group.field" or top-level names."""
  config = ml_collections.ConfigDict({
      "global_batch_size": 256, "total_steps": 100,
      "optimizer": {"name": "adamw", "b1": 0.9, "b2": 0.95, "weight_decay": 0.05, "grad_clip_norm": 0.0,
                    "layer_decay": None, "freeze": []},
      "lr": {"base_lr": 1e-3, "base_batch": 256, "schedule": "cosine", "warmup_steps": 0, "end_lr": 0.0},
  })
  for key, value in overrides.items():
    group, _, field = key.rpartition(".")
    node = config[group] if group else config
    node[field] = value
  return config


def _step(tx, params, grads):
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  return optax.apply_updates(params, updates), state


# ----------------------------------------------------------------------------
# Learning rate.
# ----------------------------------------------------------------------------


def test_scaled_learning_rate_mae_rule():
  assert scaled_learning_rate(1.5e-4, 4096) == pytest.approx(2.4e-3, rel=1e-12)
  assert scaled_learning_rate(4e-4, 128, base_batch=128) == pytest.approx(4e-4, rel=1e-12)
  with pytest.raises(ValueError, match="global_batch_size"):
    scaled_learning_rate(1.5e-4, 0)


def test_cosine_schedule_values():
  peak, end = 1e-3, 1e-4
  schedule = learning_rate_schedule(peak, total_steps=110, warmup_steps=10, kind="cosine", end_lr=end)
  expected = {
      0: 0.0,
      5: 0.5 * peak,  # halfway through the warm-up
      10: peak,  # end of warm-up
      35: end + (peak - end) * (1 + math.sqrt(0.5)) / 2,  # a quarter of the decay: cos(pi/4)
      60: (peak + end) / 2,  # cosine midpoint
      110: end,
      500: end,  # held after the end
  }
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
  # Traced steps (as in a jitted train step) give the same values.
  np.testing.assert_allclose(float(jax.jit(schedule)(jnp.int32(35))), expected[35], rtol=1e-6)


def test_linear_schedule_values():
  schedule = learning_rate_schedule(4e-4, total_steps=1100, warmup_steps=100, kind="linear")
  for step, value in {0: 0.0, 50: 2e-4, 100: 4e-4, 600: 2e-4, 850: 1e-4, 1100: 0.0, 2000: 0.0}.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-6, atol=1e-12, err_msg=f"step {step}")
  no_warmup = learning_rate_schedule(4e-4, total_steps=1000, warmup_steps=0, kind="linear")
  np.testing.assert_allclose([float(no_warmup(s)) for s in (0, 250, 1000)], [4e-4, 3e-4, 0.0], rtol=1e-6,
                             atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_steps=0, warmup_steps=0), "total_steps"),
    (dict(total_steps=10, warmup_steps=11), "warmup_steps"),
    (dict(total_steps=10, warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=10.5, warmup_steps=1), "total_steps must be an integer"),
    (dict(total_steps=10, warmup_steps=1, kind="step"), "schedule must be one of"),
    (dict(total_steps=10, warmup_steps=1, end_lr=2e-3), "end_lr"),
])
def test_schedule_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    learning_rate_schedule(1e-3, **kwargs)


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


def test_weight_decay_mask_sami(sami_params):
  mask = _flat(weight_decay_mask(sami_params))
  decays = ["params/encoder/blocks_0/attn/qkv/kernel", "params/encoder/blocks_1/mlp/fc2/kernel",
            "params/encoder/patch_embed/proj/kernel", "params/decoder_embed/kernel",
            "params/decoder_blocks_1/q/kernel", "params/head/kernel"]
  no_decay = ["params/encoder/blocks_0/attn/qkv/bias", "params/encoder/blocks_0/norm1/scale",
              "params/encoder/blocks_0/norm2/bias", "params/encoder/pos_embed", "params/decoder_pos_embed",
              "params/mask_token", "params/encoder_norm/scale", "params/decoder_norm/bias",
              "params/decoder_blocks_0/norm_kv/scale", "params/head/bias"]
  assert all(mask[p] is True for p in decays), {p: mask[p] for p in decays}
  assert all(mask[p] is False for p in no_decay), {p: mask[p] for p in no_decay}
  # In this tree exactly the kernels decay.
  assert {p for p, m in mask.items() if m} == {p for p in mask if p.endswith("/kernel")}


def test_weight_decay_mask_efficient_sam(esam_params):
  mask = _flat(weight_decay_mask(esam_params))
  decays = ["image_encoder/blocks_1/attn/proj/kernel", "image_encoder/neck_2/kernel",
            "mask_decoder/final_output_upscaling_layers_0_0/kernel",
            "mask_decoder/transformer/layers_0/self_attn/q_proj/kernel",
            "mask_decoder/iou_prediction_head/fc/kernel"]
  no_decay = ["image_encoder/pos_embed", "image_encoder/neck_1/scale",
              "mask_decoder/final_output_upscaling_layers_0_1/scale",  # GroupNorm
              "mask_decoder/iou_token/embedding", "mask_decoder/mask_tokens/embedding",
              "prompt_encoder/point_embeddings/embedding", "prompt_encoder/invalid_points/embedding",
              "prompt_encoder/bbox_top_left_embeddings/embedding", GAUSSIAN,
              "mask_decoder/transformer/norm_final_attn/bias"]
  assert all(mask[p] is True for p in decays), {p: mask[p] for p in decays}
  assert all(mask[p] is False for p in no_decay), {p: mask[p] for p in no_decay}
  assert {p for p, m in mask.items() if m} == {p for p in mask if p.endswith("/kernel")}


def test_frozen_mask(esam_params, sami_params):
  mask = _flat(frozen_mask(esam_params))
  assert {p for p, m in mask.items() if m} == {GAUSSIAN}
  mask = _flat(frozen_mask(esam_params, ["image_encoder"]))
  assert {p for p, m in mask.items() if m} == {p for p in mask if p.startswith("image_encoder/")} | {GAUSSIAN}
  # "a/b" strings, and a leading "params" level in the tree is skipped.
  mask = _flat(frozen_mask(sami_params, ["encoder/blocks_0", ("head",)]))
  assert {p for p, m in mask.items() if m} == {p for p in mask if p.startswith(
      ("params/encoder/blocks_0/", "params/head/"))}
  with pytest.raises(ValueError, match="image_encodr.*match no parameter"):
    frozen_mask(esam_params, ["image_encodr"])


def test_layer_decay_scales(sami_params, esam_params):
  scales = _flat(layer_decay_scales(sami_params, 0.5))  # depth 2
  assert scales["params/encoder/blocks_0/attn/qkv/kernel"] == 0.25
  assert scales["params/encoder/blocks_1/norm1/scale"] == 0.5
  assert scales["params/encoder/patch_embed/proj/kernel"] == 0.125
  assert scales["params/encoder/pos_embed"] == 0.125
  for rest in ("params/encoder_norm/scale", "params/decoder_blocks_0/q/kernel", "params/head/kernel",
               "params/mask_token", "params/decoder_pos_embed"):
    assert scales[rest] == 1.0, rest
  scales = _flat(layer_decay_scales(esam_params, 0.5))
  assert scales["image_encoder/blocks_1/mlp/fc1/kernel"] == 0.5
  assert scales["image_encoder/neck_0/kernel"] == 1.0
  assert scales["mask_decoder/transformer/layers_0/norm1/scale"] == 1.0
  with pytest.raises(ValueError, match="exactly one ViT encoder"):
    layer_decay_scales({"head": {"kernel": jnp.zeros((2, 2))}}, 0.5)
  with pytest.raises(ValueError, match="exactly one ViT encoder"):
    layer_decay_scales({"a": sami_params["params"]["encoder"], "b": sami_params["params"]["encoder"]}, 0.5)


# ----------------------------------------------------------------------------
# The optimizer.
# ----------------------------------------------------------------------------


def test_adamw_step_decays_only_masked_leaves(sami_params):
  tx, schedule = make_optimizer(_config())
  lr, wd = 1e-3, 0.05
  assert float(schedule(0)) == pytest.approx(lr)
  zeros = jax.tree.map(jnp.zeros_like, sami_params)
  new, _ = _step(tx, sami_params, zeros)
  old, new, decay = _flat(sami_params), _flat(new), _flat(weight_decay_mask(sami_params))
  kernel = "params/encoder/blocks_0/attn/qkv/kernel"
  np.testing.assert_allclose(new[kernel], old[kernel] - lr * wd * old[kernel], rtol=1e-6, atol=1e-12)
  for path in old:
    if decay[path]:  # zero gradients: only the decoupled decay moves a parameter
      np.testing.assert_allclose(new[path], old[path] * (1 - lr * wd), rtol=1e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(new[path], old[path], err_msg=path)
  for excluded in ("params/head/bias", "params/encoder/pos_embed", "params/mask_token"):
    assert not decay[excluded]


def test_frozen_leaves_get_no_update(esam_params):
  ones = jax.tree.map(jnp.ones_like, esam_params)
  tx, _ = make_optimizer(_config(**{"optimizer.grad_clip_norm": 1.0}))
  new, _ = _step(tx, esam_params, ones)
  old, new = _flat(esam_params), _flat(new)
  np.testing.assert_array_equal(new[GAUSSIAN], old[GAUSSIAN])
  assert all(not np.allclose(new[p], old[p]) for p in old if p != GAUSSIAN)

  tx, _ = make_optimizer(_config(**{"optimizer.freeze": ["image_encoder"]}))
  new, state = _step(tx, esam_params, ones)
  new = _flat(new)
  for path in old:
    frozen = path.startswith("image_encoder/") or path == GAUSSIAN
    assert np.array_equal(new[path], old[path]) == frozen, path
  # Frozen leaves carry no Adam moments: two per trainable leaf, nothing for the rest.
  trainable = sum(not p.startswith("image_encoder/") and p != GAUSSIAN for p in old)
  assert sum(np.ndim(x) > 0 for x in jax.tree.leaves(state)) == 2 * trainable

  with pytest.raises(ValueError, match="match no parameter"):
    make_optimizer(_config(**{"optimizer.freeze": ["encoder"]}))[0].init(esam_params)


def test_layer_decay_scales_updates(sami_params):
  # First Adam step with unit gradients and no weight decay: update = -lr · scale · 1/(1 + eps).
  ones = jax.tree.map(jnp.ones_like, sami_params)
  tx, schedule = make_optimizer(_config(**{"optimizer.layer_decay": 0.5, "optimizer.weight_decay": 0.0}))
  new, _ = _step(tx, sami_params, ones)
  lr = float(schedule(0))
  change = {p: float(np.mean(_flat(sami_params)[p] - v)) for p, v in _flat(new).items()}
  for path, scale in [("params/encoder/blocks_0/mlp/fc1/kernel", 0.25), ("params/encoder/blocks_1/attn/qkv/bias", 0.5),
                      ("params/encoder/pos_embed", 0.125), ("params/encoder/patch_embed/proj/kernel", 0.125),
                      ("params/head/kernel", 1.0), ("params/decoder_blocks_1/mlp/fc2/kernel", 1.0)]:
    assert change[path] == pytest.approx(lr * scale, rel=1e-4), path


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.name": "sgd"}, "optimizer.name must be 'adamw'"),
    ({"optimizer.b2": 1.0}, r"optimizer.b2 must be in \[0, 1\)"),
    ({"optimizer.weight_decay": -0.1}, "optimizer.weight_decay"),
    ({"optimizer.grad_clip_norm": -1.0}, "grad_clip_norm"),
    ({"optimizer.layer_decay": 1.5}, "layer_decay"),
    ({"optimizer.freeze": [""]}, "freeze prefix"),
    ({"lr.schedule": "step"}, "schedule must be one of"),
    ({"lr.warmup_steps": 200}, "warmup_steps"),
    ({"lr.base_lr": 0.0}, "base_lr"),
    ({"total_steps": 0}, "total_steps"),
    ({"global_batch_size": 0}, "global_batch_size"),
])
def test_make_optimizer_rejects_bad_config(overrides, message):
  with pytest.raises(ValueError, match=message):
    make_optimizer(_config(**overrides))


def test_make_optimizer_reports_missing_fields():
  config = _config()
  del config.lr["warmup_steps"]
  with pytest.raises(ValueError, match="lr is missing the required field 'warmup_steps'"):
    make_optimizer(config)
  # Plain mappings work too, with the optional fields left out.
  tx, schedule = make_optimizer({"global_batch_size": 4096, "total_steps": 400, "optimizer": {
      "b1": 0.9, "b2": 0.95, "weight_decay": 0.05}, "lr": {"base_lr": 1.5e-4, "warmup_steps": 40}})
  assert float(schedule(40)) == pytest.approx(2.4e-3, rel=1e-6)
