"""Checkpoint conversion: official PyTorch <-> orbax weights directory."""

import os

import jax
import numpy as np
import pytest

from efficientsam_jax.convert import __main__ as cli
from efficientsam_jax.convert import torch_io
from efficientsam_jax.convert.efficient_sam import (infer_config, params_from_state_dict,
                                                    state_dict_from_params)
from efficientsam_jax.convert.torch_keys import StateDictMismatch, torch_key
from efficientsam_jax.models import EfficientSam, EfficientSamConfig
from efficientsam_jax.models.efficient_sam import abstract_params
from efficientsam_jax.models.pretrained import load_pretrained
from conftest import SHARED_FIXTURES, TINY_DIR

TINY_PT = os.path.join(TINY_DIR, "efficient_sam_random.pt")
TINY_CONFIG = os.path.join(TINY_DIR, "config.json")


def assert_same_state_dict(ours, ref):
  assert list(ours) == list(ref) or set(ours) == set(ref)
  for key, value in ref.items():
    assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
    assert np.array_equal(ours[key], value), f"{key} differs"


def test_torch_key_naming():
  assert torch_key(("image_encoder", "blocks_11", "attn", "qkv", "kernel")) == "image_encoder.blocks.11.attn.qkv.weight"
  assert torch_key(("mask_decoder", "final_output_upscaling_layers_0_1", "scale")) == \
      "mask_decoder.final_output_upscaling_layers.0.1.weight"
  assert torch_key(("mask_decoder", "iou_token", "embedding")) == "mask_decoder.iou_token.weight"
  assert torch_key(("image_encoder", "pos_embed")) == "image_encoder.pos_embed"


@pytest.mark.parametrize("fixture", ["tiny", "ti"])
def test_round_trip_through_cli_is_bit_exact(tmp_path, fixture):
  if fixture == "tiny":
    source, extra = TINY_PT, ["--config", TINY_CONFIG]
  else:
    source, extra = os.path.join(SHARED_FIXTURES, "efficientsam_ti", "efficient_sam_random.pt"), []
  weights, exported = str(tmp_path / "weights"), str(tmp_path / "exported.pt")
  assert cli.main(["torch-to-jax", "--input", source, "--output", weights] + extra) == 0
  assert cli.main(["jax-to-torch", "--input", weights, "--output", exported]) == 0
  ref = torch_io.load_state_dict(source)
  # What the official EfficientSam.load_state_dict(strict=True) checks: same keys and shapes.
  assert_same_state_dict(torch_io.load_state_dict(exported), ref)
  import torch
  raw = torch.load(exported, map_location="cpu", weights_only=True)
  assert list(raw) == ["model"]


def test_load_pretrained_restores_the_converted_params(tmp_path, tiny_model):
  _, params = tiny_model
  weights = str(tmp_path / "w")
  cli.torch_to_jax(TINY_PT, weights, config_path=TINY_CONFIG)
  model, loaded = load_pretrained(weights)
  assert model.config == EfficientSamConfig.from_json(TINY_CONFIG)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.device_get(loaded))


def test_variant_inference(tiny_state_dict):
  with pytest.raises(ValueError, match="numbers of heads cannot be read"):
    infer_config(tiny_state_dict)
  ti = torch_io.load_state_dict(os.path.join(SHARED_FIXTURES, "efficientsam_ti", "efficient_sam_random.pt"))
  assert infer_config(ti) == EfficientSamConfig.from_variant("ti")
  # An S-sized state dict (shapes only) is recognized as EfficientSAM-S.
  s_params = abstract_params(EfficientSam(EfficientSamConfig.from_variant("s")))
  s_dict = state_dict_from_params(jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), s_params))
  assert infer_config(s_dict) == EfficientSamConfig.from_variant("s")


def test_mismatches_name_every_key_and_both_shapes(tiny_state_dict, tiny_config):
  bad = dict(tiny_state_dict)
  bad["image_encoder.extra.weight"] = np.zeros((3,), np.float32)
  del bad["mask_decoder.iou_token.weight"]
  bad["image_encoder.blocks.0.attn.qkv.weight"] = np.zeros((10, 48), np.float32)
  with pytest.raises(StateDictMismatch) as info:
    params_from_state_dict(bad, tiny_config)
  message = str(info.value)
  assert "3 problem(s)" in message
  assert "unexpected key image_encoder.extra.weight (shape (3,))" in message
  assert "missing key mask_decoder.iou_token.weight (expected torch shape (1, 64))" in message
  assert ("shape mismatch for image_encoder.blocks.0.attn.qkv.weight: checkpoint has (10, 48), "
          "model expects (144, 48)") in message


def test_failed_conversion_writes_nothing(tmp_path, tiny_state_dict, capsys):
  bad = dict(tiny_state_dict)
  del bad["image_encoder.neck.3.bias"]
  bad_pt = str(tmp_path / "bad.pt")
  torch_io.save_state_dict(bad, bad_pt)
  out = tmp_path / "out"
  assert cli.main(["torch-to-jax", "--input", bad_pt, "--output", str(out), "--config", TINY_CONFIG]) == 2
  assert "missing key image_encoder.neck.3.bias" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["bad.pt"]


def test_unreadable_and_existing_outputs(tmp_path, capsys):
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a checkpoint")
  assert cli.main(["torch-to-jax", "--input", str(junk), "--output", str(tmp_path / "o")]) == 2
  assert "cannot read PyTorch checkpoint" in capsys.readouterr().err
  assert cli.main(["torch-to-jax", "--input", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o")]) == 2
  assert "not found" in capsys.readouterr().err
  (tmp_path / "exists").mkdir()
  assert cli.main(["torch-to-jax", "--input", TINY_PT, "--output", str(tmp_path / "exists"),
                   "--config", TINY_CONFIG]) == 2
  assert "--overwrite" in capsys.readouterr().err
