"""The acceptance test: converted official weights reproduce the official outputs.

Fixtures come from the official PyTorch EfficientSAM run in fp32 on a CPU with
random weights (../shared/fixtures/README.md). "Matches" means
max|ours - ref| <= 2e-4 * max|ref| for every array.
"""

import os

import numpy as np
import pytest

from efficientsam_jax.convert import torch_io
from efficientsam_jax.convert.efficient_sam import params_from_state_dict
from efficientsam_jax.models import EfficientSam, EfficientSamConfig
from efficientsam_jax.models import efficient_sam as es
from efficientsam_jax.models.layers import Kernels
from conftest import SHARED_FIXTURES, TINY_DIR

TOLERANCE = 2e-4


def assert_matches(ours, ref, name):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
  error = np.abs(ours - ref).max() / np.abs(ref).max()
  assert error <= TOLERANCE, f"{name}: max|ours - ref| / max|ref| = {error:.2e} > {TOLERANCE}"


def check_fixture(model, params, ref):
  images = np.repeat(ref["image"][None].astype(np.float32) / 255.0, ref["points"].shape[0], axis=0)
  input_hw = images.shape[1:3]
  embeddings = es.get_image_embeddings(model, params, images)
  assert_matches(np.transpose(embeddings, (0, 3, 1, 2)), ref["image_embeddings"], "image_embeddings")

  low_res, iou = es.predict_masks(model, params, embeddings, ref["points"], ref["labels"],
                                  input_hw=input_hw, multimask_output=True)
  assert_matches(low_res, ref["low_res_masks"], "low_res_masks")
  assert_matches(iou, ref["iou"], "iou (predict_masks)")
  single, single_iou = es.predict_masks(model, params, embeddings, ref["points"], ref["labels"],
                                        input_hw=input_hw, multimask_output=False)
  assert_matches(single, ref["single_mask"], "single_mask")
  assert_matches(single_iou, ref["single_iou"], "single_iou")

  masks, iou = es.forward(model, params, images, ref["points"], ref["labels"])
  assert masks.shape == tuple(ref["masks_shape"])
  assert_matches(np.asarray(masks)[..., ::7, ::7], ref["masks_stride7"], "masks_stride7")
  assert_matches(iou, ref["iou"], "iou (forward)")


def test_tiny_fixture(tiny_model, tiny_reference):
  check_fixture(*tiny_model, tiny_reference)


def test_tiny_fixture_with_the_training_kernels(tiny_model, tiny_reference):
  """The one-pass LayerNorm (a ``config.kernels`` choice of the training jobs) keeps the official outputs."""
  model, params = tiny_model
  check_fixture(model.clone(encoder_kernels=Kernels(layer_norm="one_pass")), params, tiny_reference)


def test_ti_fixture():
  """EfficientSAM-Ti at 1024: the released architecture, variant inferred from shapes."""
  directory = os.path.join(SHARED_FIXTURES, "efficientsam_ti")
  state_dict = torch_io.load_state_dict(os.path.join(directory, "efficient_sam_random.pt"))
  config, params = params_from_state_dict(state_dict)
  assert config == EfficientSamConfig.from_variant("ti")
  assert sum(v.size for v in state_dict.values()) == 10_223_460
  check_fixture(EfficientSam(config), params, dict(np.load(os.path.join(directory, "reference.npz"))))


def test_bfloat16_compute_is_close_to_float32(tiny_model, tiny_reference):
  model, params = tiny_model
  bf16 = EfficientSam(model.config, dtype="bfloat16")
  image = tiny_reference["image"][None].astype(np.float32) / 255.0
  ref = np.asarray(es.get_image_embeddings(model, params, image))
  ours = es.get_image_embeddings(bf16, params, image)
  assert ours.dtype.name == "bfloat16"
  error = np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max()
  assert 0 < error < 0.05, error
  masks, iou = es.predict_masks(bf16, params, ours, tiny_reference["points"][:1],
                                tiny_reference["labels"][:1], input_hw=image.shape[1:3])
  assert masks.dtype == np.float32 and np.isfinite(np.asarray(masks)).all()
  ref_iou = tiny_reference["iou"][:1]
  assert np.abs(np.asarray(iou) - ref_iou).max() < 0.05 * np.abs(ref_iou).max() + 1e-2


def test_new_image_size_does_not_recompile_encoder(tiny_model):
  model, params = tiny_model
  rng = np.random.default_rng(0)
  before = es._encode._cache_size()
  for hw in [(300, 200), (123, 456), (256, 256), (999, 31)]:
    es.get_image_embeddings(model, params, rng.random((1, *hw, 3), dtype=np.float32))
  assert es._encode._cache_size() - before <= 1


def test_bad_images_are_named(tiny_model):
  model, params = tiny_model
  with pytest.raises(ValueError, match=r"images must be float \[B, H, W, 3\]"):
    es.get_image_embeddings(model, params, np.zeros((1, 8, 8), np.float32))
  with pytest.raises(ValueError, match="floating point"):
    es.get_image_embeddings(model, params, np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    es.get_image_embeddings(model, params, np.zeros((1, 0, 8, 3), np.float32))


def test_tiny_fixture_is_the_shared_one():
  shared = os.path.join(SHARED_FIXTURES, "efficientsam_tiny")
  for name in ("config.json", "efficient_sam_random.pt", "reference.npz"):
    with open(os.path.join(shared, name), "rb") as a, open(os.path.join(TINY_DIR, name), "rb") as b:
      assert a.read() == b.read(), name
