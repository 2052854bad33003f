"""The SAM image encoder (SAMI teacher) reproduces segment-anything's ImageEncoderViT."""

import json
import os

import jax
import numpy as np
import pytest

from efficientsam_jax.convert import __main__ as cli
from efficientsam_jax.convert import torch_io
from efficientsam_jax.convert.sam import encoder_params_from_state_dict, state_dict_from_encoder_params
from efficientsam_jax.convert.torch_keys import StateDictMismatch
from efficientsam_jax.models.sam_vit import (SAM_PRESETS, SamEncoderConfig, SamImageEncoder,
                                             relative_position_bias_table, sam_attention, window_partition,
                                             window_unpartition)
from efficientsam_jax.models.pretrained import load_pretrained, load_sam_encoder, save_pretrained
from conftest import SHARED_FIXTURES, TINY_DIR

FIXTURE = os.path.join(SHARED_FIXTURES, "sam_encoder_small")
FIXTURE_PTH = os.path.join(FIXTURE, "sam_encoder_random.pth")
FIXTURE_CONFIG = os.path.join(FIXTURE, "config.json")


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


def test_fused_attention_form_matches_official_encoder(small, monkeypatch):
  """attention="cudnn" folds the relative positions into q·k (``fold_relative_positions``) for cuDNN's
  fused kernel. With jax's XLA kernel swapped in for it (no cuDNN here), the encoder still matches
  segment-anything's, in the global blocks and in the padded windows of a 224 view, and with odd token counts
  (a 240 view: 15 × 15 global tokens, padded to an even count for cuDNN)."""
  config, state_dict, ref = small
  params = {"params": encoder_params_from_state_dict(state_dict, config)}
  view, odd = (np.random.default_rng(0).normal(size=(2, s, s, 3)).astype(np.float32) for s in (224, 240))
  official_form, official_odd = SamImageEncoder(config).apply(params, view), SamImageEncoder(config).apply(params, odd)
  real, kernels, lengths = jax.nn.dot_product_attention, [], set()

  def xla_kernel(q, k, v, *args, implementation=None, **kwargs):
    kernels.append(implementation)
    lengths.update((q.shape[1], k.shape[1]))
    return real(q, k, v, *args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_kernel)
  fused = SamImageEncoder(config, attention="cudnn")
  native = fused.apply(params, np.transpose(ref["input"], (0, 2, 3, 1)))
  scale = np.abs(ref["features"]).max()
  np.testing.assert_allclose(np.transpose(native, (0, 3, 1, 2)), ref["features"], atol=2e-4 * scale)
  np.testing.assert_allclose(fused.apply(params, view), official_form, atol=1e-5 * scale)
  assert kernels == ["cudnn"] * (2 * config.depth)
  np.testing.assert_allclose(fused.apply(params, odd), official_odd, atol=1e-5 * scale)
  assert all(n % 2 == 0 for n in lengths) and 226 in lengths, lengths


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_attention_in_blocks_of_query_rows_equals_all_at_once(use_rel_pos):
  """The logits budget splits the queries into blocks of rows (lax.map); the result does not change."""
  rng = np.random.default_rng(0)
  b, h, w, n, d = 2, 6, 5, 3, 8
  q, k, v = (jax.numpy.asarray(rng.normal(size=(b, h, w, n, d)), jax.numpy.float32) for _ in range(3))
  tables = [relative_position_bias_table(jax.numpy.asarray(rng.normal(size=(2 * s - 1, d)), jax.numpy.float32), s)
            for s in (h, w)] if use_rel_pos else [None, None]
  whole = sam_attention(q, k, v, *tables)
  per_row = b * n * w * h * w
  for budget, blocks in ((per_row, h), (2 * per_row, 3), (5 * per_row, 2)):  # 1, 2 and 3 rows per block
    attend = lambda q, k, v: sam_attention(q, k, v, *tables, max_logits=budget)  # pylint: disable=cell-var-from-loop
    np.testing.assert_allclose(attend(q, k, v), whole, rtol=1e-5, atol=1e-6)
    assert f"length={blocks}" in str(jax.make_jaxpr(attend)(q, k, v))  # really computed block by block


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


# --- The teacher through the converter CLI and load_sam_encoder. ---


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """The small fixture converted by ``sam-to-jax --config``."""
  out = str(tmp_path_factory.mktemp("teacher") / "sam_small")
  assert cli.main(["sam-to-jax", "--input", FIXTURE_PTH, "--output", out, "--config", FIXTURE_CONFIG]) == 0
  return out


def test_cli_directory_loads_and_matches_official_encoder(teacher_dir, small):
  config, _, ref = small
  with open(os.path.join(teacher_dir, "config.json")) as f:
    assert json.load(f)["model"] == "sam_encoder"
  model, params = load_sam_encoder(teacher_dir)
  assert isinstance(model, SamImageEncoder) and model.config == config
  features = jax.jit(model.apply)({"params": params}, np.transpose(ref["input"], (0, 2, 3, 1)))
  ours = np.transpose(np.asarray(features), (0, 3, 1, 2))
  assert ours.shape == ref["features"].shape
  error = np.abs(ours - ref["features"]).max() / np.abs(ref["features"]).max()
  assert error <= 2e-4, error


def test_each_loader_refuses_the_other_kind(teacher_dir, tmp_path, capsys):
  with pytest.raises(ValueError, match=r"holds a SAM image encoder .*load it with load_sam_encoder"):
    load_pretrained(teacher_dir)
  efficientsam_dir = str(tmp_path / "tiny")
  assert cli.main(["torch-to-jax", "--input", os.path.join(TINY_DIR, "efficient_sam_random.pt"),
                   "--output", efficientsam_dir, "--config", os.path.join(TINY_DIR, "config.json")]) == 0
  with pytest.raises(ValueError, match=r"holds an EfficientSAM model .*load it with load_pretrained"):
    load_sam_encoder(efficientsam_dir)
  # jax-to-torch exports EfficientSAM only: a teacher directory is a clean error, no file.
  exported = tmp_path / "exported.pt"
  assert cli.main(["jax-to-torch", "--input", teacher_dir, "--output", str(exported)]) == 2
  assert "load_sam_encoder" in capsys.readouterr().err and not exported.exists()


def test_config_without_model_field_is_efficientsam(tmp_path, tiny_model):
  """Directories written before the "model" field existed still load."""
  model, params = tiny_model
  directory = save_pretrained(str(tmp_path / "old"), params, model.config)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    values = json.load(f)
  assert values.pop("model") == "efficientsam"
  with open(path, "w") as f:
    json.dump(values, f)
  loaded_model, loaded = load_pretrained(directory)
  assert loaded_model.config == model.config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.device_get(loaded))
  with pytest.raises(ValueError, match="load it with load_pretrained"):
    load_sam_encoder(directory)


def test_default_preset_on_small_checkpoint_fails_and_writes_nothing(tmp_path, capsys):
  out = tmp_path / "sam_vit_h"
  assert cli.main(["sam-to-jax", "--input", FIXTURE_PTH, "--output", str(out)]) == 2
  err = capsys.readouterr().err
  assert "preset vit_h" in err and "--config" in err
  assert ("shape mismatch for image_encoder.pos_embed: checkpoint has (1, 16, 16, 64), "
          "model expects (1, 64, 64, 1280)") in err
  assert "missing key image_encoder.blocks.31.attn.qkv.weight (expected torch shape (3840, 1280))" in err
  assert not out.exists() and os.listdir(tmp_path) == []


def test_sam_to_jax_config_handling(teacher_dir, tmp_path, capsys):
  # A weights directory's config.json (with its "model" field) serves as --config again.
  again = tmp_path / "again"
  assert cli.main(["sam-to-jax", "--input", FIXTURE_PTH, "--output", str(again),
                   "--config", os.path.join(teacher_dir, "config.json")]) == 0
  # ...but not for the other kind: the refusal names the model, not the unknown keys.
  assert cli.main(["torch-to-jax", "--input", os.path.join(TINY_DIR, "efficient_sam_random.pt"),
                   "--output", str(tmp_path / "x"), "--config", os.path.join(teacher_dir, "config.json")]) == 2
  assert "describes model 'sam_encoder', not 'efficientsam'" in capsys.readouterr().err
  # --preset and --config together is a usage error (argparse exits 2).
  with pytest.raises(SystemExit) as info:
    cli.main(["sam-to-jax", "--input", FIXTURE_PTH, "--output", str(tmp_path / "y"),
              "--preset", "vit_b", "--config", FIXTURE_CONFIG])
  assert info.value.code == 2
  assert sorted(os.listdir(tmp_path)) == ["again"]


def test_teacher_features_on_student_views(small):
  """Both alignments give [B, S/16, S/16, C]; "upsample" equals running at the native size then pooling."""
  from efficientsam_jax.models.resize import resize
  from efficientsam_jax.models.sam_vit import teacher_features
  config, state_dict, _ = small
  params = encoder_params_from_state_dict(state_dict, config)
  model = SamImageEncoder(config)
  views = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  up = teacher_features(model, params, views, "upsample")
  assert up.shape == (2, 4, 4, config.out_chans)
  big = model.apply({"params": params}, resize(views, (256, 256), "bilinear"))  # [2, 16, 16, C]
  expected = np.asarray(big).reshape(2, 4, 4, 4, 4, -1).mean(axis=(2, 4))  # 16/4: exact 4x4 bins
  np.testing.assert_allclose(up, expected, atol=1e-5 * np.abs(expected).max())
  native = teacher_features(model, params, views, "native")
  assert native.shape == (2, 4, 4, config.out_chans)
  assert not np.allclose(native, up)
  with pytest.raises(ValueError, match="unknown teacher mode"):
    teacher_features(model, params, views, "pooled")
