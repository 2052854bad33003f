"""The SAM image encoder (SAMI teacher) reproduces segment-anything's ImageEncoderViT."""

import os

import jax
import numpy as np
import pytest

from efficientsam_jax.convert import torch_io
from efficientsam_jax.convert.sam import encoder_params_from_state_dict, state_dict_from_encoder_params
from efficientsam_jax.convert.torch_keys import StateDictMismatch
from efficientsam_jax.models.sam_vit import (SAM_PRESETS, SamEncoderConfig, SamImageEncoder,
                                             window_partition, window_unpartition)
from conftest import SHARED_FIXTURES

FIXTURE = os.path.join(SHARED_FIXTURES, "sam_encoder_small")


@pytest.fixture(scope="module")
def small():
  config = SamEncoderConfig.from_json(os.path.join(FIXTURE, "config.json"))
  state_dict = torch_io.load_state_dict(os.path.join(FIXTURE, "sam_encoder_random.pth"), key=None)
  return config, state_dict, dict(np.load(os.path.join(FIXTURE, "reference.npz")))


def test_matches_official_encoder(small):
  config, state_dict, ref = small
  params = encoder_params_from_state_dict(state_dict, config)
  images = np.transpose(ref["input"], (0, 2, 3, 1))
  features = jax.jit(SamImageEncoder(config).apply)({"params": params}, images)
  ours = np.transpose(np.asarray(features), (0, 3, 1, 2))
  assert ours.shape == ref["features"].shape
  error = np.abs(ours - ref["features"]).max() / np.abs(ref["features"]).max()
  assert error <= 2e-4, error


def test_other_keys_ignored_and_encoder_round_trip(small):
  config, state_dict, _ = small
  assert any(not k.startswith("image_encoder.") for k in state_dict)
  params = encoder_params_from_state_dict(state_dict, config)
  back = state_dict_from_encoder_params(params)
  encoder_keys = {k for k in state_dict if k.startswith("image_encoder.")}
  assert set(back) == encoder_keys
  for key in encoder_keys:
    assert np.array_equal(back[key], state_dict[key]), key


def test_bad_checkpoint_names_the_keys(small):
  config, state_dict, _ = small
  bad = dict(state_dict)
  bad["image_encoder.blocks.0.attn.rel_pos_h"] = np.zeros((3, 16), np.float32)
  with pytest.raises(StateDictMismatch, match=r"image_encoder\.blocks\.0\.attn\.rel_pos_h: checkpoint has \(3, 16\)"):
    encoder_params_from_state_dict(bad, config)
  with pytest.raises(StateDictMismatch, match="not a SAM checkpoint"):
    encoder_params_from_state_dict({"mask_decoder.x": np.zeros(1)}, config)


def test_runs_at_another_input_size(small):
  """SAMI views are 224×224: the 16×16-token tables are resized to 14×14 (and 6-windows pad)."""
  config, state_dict, ref = small
  params = encoder_params_from_state_dict(state_dict, config)
  images = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  features = SamImageEncoder(config).apply({"params": params}, images)
  assert features.shape == (1, 14, 14, config.out_chans)
  assert np.isfinite(np.asarray(features)).all()
  # At the native size the resize is the identity, so the same path gives the fixture.
  native = SamImageEncoder(config).apply({"params": params}, np.transpose(ref["input"][:1], (0, 2, 3, 1)))
  np.testing.assert_allclose(np.transpose(native, (0, 3, 1, 2)), ref["features"][:1], atol=2e-4 * np.abs(ref["features"]).max())


def test_window_partition_round_trip_with_padding():
  x = np.random.default_rng(0).normal(size=(2, 16, 13, 5)).astype(np.float32)
  windows, padded = window_partition(x, 6)
  assert windows.shape == (2 * 3 * 3, 6, 6, 5) and padded == (18, 18)
  np.testing.assert_array_equal(window_unpartition(windows, 6, padded, (16, 13)), x)
  # Padding is zeros, as F.pad does.
  assert not np.asarray(windows).reshape(2, 3, 3, 6, 6, 5)[:, 2, :, 4:].any()


def test_presets():
  assert SAM_PRESETS["vit_h"] == SamEncoderConfig()
  assert SamEncoderConfig.preset("vit_b").global_attn_indexes == (2, 5, 8, 11)
  with pytest.raises(ValueError, match="unknown SAM encoder preset"):
    SamEncoderConfig.preset("vit_x")
