"""The predict CLI on a saved tiny checkpoint, and the random-weight demo at a tiny size."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from efficientsam_jax import predict
from efficientsam_jax.inference import EfficientSamPredictor
from efficientsam_jax.models.pretrained import save_pretrained


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model, tiny_reference):
  """(checkpoint dir, image path) of the tiny model and the 300×200 fixture image."""
  root = tmp_path_factory.mktemp("cli")
  model, params = tiny_model
  checkpoint = save_pretrained(str(root / "tiny_weights"), params, model.config)
  image_path = str(root / "image.png")
  Image.fromarray(tiny_reference["image"]).save(image_path)
  return checkpoint, image_path


@pytest.fixture(scope="module")
def predictor(tiny_model, tiny_reference):
  predictor = EfficientSamPredictor(*tiny_model)
  predictor.set_image(tiny_reference["image"])
  return predictor


def test_points_write_overlay_and_npy(files, predictor, tmp_path, capsys):
  checkpoint, image_path = files
  overlay, mask_path = tmp_path / "out" / "overlay.png", tmp_path / "mask.npy"
  code = predict.main(["--checkpoint", checkpoint, "--image", image_path, "--point", "50,60",
                       "--point", "120,200,0", "--output", str(overlay), "--mask-out", str(mask_path)])
  assert code == 0
  out = capsys.readouterr().out
  assert "encoder:" in out and "decoder:" in out and str(overlay) in out
  with Image.open(overlay) as picture:
    assert picture.mode == "RGB" and picture.width == 200 and picture.height > 300  # Title strip on top.
  mask = np.load(mask_path)
  assert mask.shape == (300, 200) and mask.dtype == np.bool_
  expected = predictor.predict([[50, 60], [120, 200]], [1, 0])[0][0]
  np.testing.assert_array_equal(mask, expected)


def test_several_boxes_are_one_batch(files, predictor, tmp_path):
  checkpoint, image_path = files
  boxes = [[0, 0, 60, 90], [40, 50, 190, 280]]
  args = ["--checkpoint", checkpoint, "--image", image_path, "--output", str(tmp_path / "o.png")]
  for box in boxes:
    args += ["--box", ",".join(str(v) for v in box)]
  assert predict.main(args + ["--mask-out", str(tmp_path / "m.npy")]) == 0
  masks = np.load(tmp_path / "m.npy")
  assert masks.shape == (2, 300, 200)
  np.testing.assert_array_equal(masks, predictor.predict_batch(boxes=boxes)[0][:, 0])
  assert predict.main(args + ["--mask-out", str(tmp_path / "m.png")]) == 0
  labels = np.asarray(Image.open(tmp_path / "m.png"))
  assert labels.shape == (300, 200) and set(np.unique(labels)) <= {0, 1, 2}
  np.testing.assert_array_equal(labels == 2, masks[1])


def test_single_mask_png(files, predictor, tmp_path):
  checkpoint, image_path = files
  mask_path = tmp_path / "m.png"
  assert predict.main(["--checkpoint", checkpoint, "--image", image_path, "--box", "30,40,150,260",
                       "--single-mask", "--output", str(tmp_path / "o.png"), "--mask-out", str(mask_path)]) == 0
  mask = np.asarray(Image.open(mask_path))
  assert mask.shape == (300, 200) and set(np.unique(mask)) <= {0, 255}
  expected = predictor.predict(box=[30, 40, 150, 260], multimask_output=False)[0][0]
  np.testing.assert_array_equal(mask == 255, expected)


def test_bfloat16_compute_agrees_with_float32(files, predictor, tmp_path, capsys):
  checkpoint, image_path = files
  mask_path = tmp_path / "m.npy"
  assert predict.main(["--checkpoint", checkpoint, "--image", image_path, "--box", "30,40,150,260",
                       "--dtype", "bfloat16", "--output", str(tmp_path / "o.png"),
                       "--mask-out", str(mask_path)]) == 0
  assert "compute dtype: bfloat16" in capsys.readouterr().out
  expected = predictor.predict(box=[30, 40, 150, 260])[0][0]
  # bf16 flips only pixels near the decision boundary.
  assert (np.load(mask_path) != expected).mean() < 0.05


@pytest.mark.parametrize("extra, message", [
    (["--point", "a,b"], "--point expects numbers"),
    (["--point", "abc"], "--point expects X,Y or X,Y,LABEL"),
    (["--point", "1,2,3,4"], "--point expects X,Y or X,Y,LABEL"),
    (["--point", "10,10,2"], "LABEL must be 1"),
    (["--point", "nan,3"], "finite"),
    (["--box", "1,2,3"], "--box expects four"),
    ([], "at least one --point"),
    (["--point", "10,10", "--box", "0,0,5,5", "--box", "1,1,6,6"], "cannot be combined"),
    (["--point", "10,10", "--mask-out", "m.jpg"], "must end with .png or .npy"),
    (["--point", "500,10"], r"outside the image"),
    (["--point", "1,1"] * 7, "at most 6"),
])
def test_bad_input_exits_nonzero(files, tmp_path, capsys, extra, message):
  checkpoint, image_path = files
  with pytest.raises(SystemExit) as exit_info:
    predict.main(["--checkpoint", checkpoint, "--image", image_path,
                  "--output", str(tmp_path / "o.png")] + extra)
  assert exit_info.value.code != 0
  assert message in capsys.readouterr().err
  assert not (tmp_path / "o.png").exists()


def test_missing_files_exit_nonzero(files, tmp_path, capsys):
  checkpoint, image_path = files
  for args, message in ((["--image", image_path], "missing --checkpoint"),
                        (["--checkpoint", str(tmp_path / "nope"), "--image", image_path], "not a directory"),
                        (["--checkpoint", checkpoint, "--image", str(tmp_path / "nope.png")], "does not exist")):
    with pytest.raises(SystemExit) as exit_info:
      predict.main(args + ["--point", "1,1", "--output", str(tmp_path / "o.png")])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_module_entry_point_rejects_bad_point(files, tmp_path):
  checkpoint, image_path = files
  result = subprocess.run(
      [sys.executable, "-m", "efficientsam_jax.predict", "--checkpoint", checkpoint, "--image", image_path,
       "--point", "12;34", "--output", str(tmp_path / "o.png")],
      capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2
  assert "--point expects" in result.stderr


def test_run_demo_at_tiny_size(tiny_config, tmp_path, capsys):
  info = predict.run_demo(str(tmp_path / "demo"), seed=3, config=tiny_config)
  out = capsys.readouterr().out
  assert "UNTRAINED" in out and "encoder:" in out and "decoder:" in out
  assert info["untrained"] is True and info["img_size"] == tiny_config.img_size
  assert info["image_hw"] == (512, 512)  # skimage's astronaut.
  assert "UNTRAINED" in os.path.basename(info["overlay_path"])
  assert "UNTRAINED" in os.path.basename(info["mask_path"])
  with Image.open(info["overlay_path"]) as picture:
    assert picture.width == 512 and picture.height > 512
  mask = np.load(info["mask_path"])
  assert mask.shape == (512, 512) and mask.dtype == np.bool_
  assert len(info["scores"]) == 1
  for key in ("encoder_seconds", "decoder_seconds", "decoder_warm_seconds", "init_seconds"):
    assert info[key] > 0


def test_demo_flags_conflict(capsys):
  with pytest.raises(SystemExit) as exit_info:
    predict.main(["--demo", "--checkpoint", "x"])
  assert exit_info.value.code != 0
  assert "--demo uses random weights" in capsys.readouterr().err
