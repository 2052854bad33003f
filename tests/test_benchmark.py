"""The PyTorch encoder used for speed comparison, and the benchmark CLI, on the tiny config."""

import contextlib
import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from efficientsam_jax import benchmark  # pylint: disable=wrong-import-position
from efficientsam_jax.convert.efficient_sam import state_dict_from_params  # pylint: disable=wrong-import-position
from efficientsam_jax.convert.torch_encoder import encoder_from_state_dict  # pylint: disable=wrong-import-position

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "data", "efficientsam_tiny", "config.json")
TOLERANCE = 2e-4  # of max|reference|, the project's parity bound
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _max_rel_diff(actual: np.ndarray, reference: np.ndarray) -> float:
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


def _torch_embeddings(encoder, images_nchw: np.ndarray) -> np.ndarray:
  with torch.inference_mode():
    return encoder(torch.from_numpy(np.ascontiguousarray(images_nchw))).numpy()


def test_torch_encoder_matches_jax_on_exported_weights(tiny_config):
  import jax
  from efficientsam_jax.models import efficient_sam as esam

  model = esam.EfficientSam(tiny_config)
  params = esam.init_params(model, jax.random.PRNGKey(3))
  images = jax.random.normal(jax.random.PRNGKey(4), (2, tiny_config.img_size, tiny_config.img_size, 3))
  expected = np.asarray(esam._encode(model, params, images))  # pylint: disable=protected-access

  state_dict = state_dict_from_params(params)
  encoder = encoder_from_state_dict(state_dict, tiny_config)  # load_state_dict(strict=True) inside
  assert not encoder.training
  encoder_keys = {k.removeprefix("image_encoder.") for k in state_dict if k.startswith("image_encoder.")}
  assert set(encoder.state_dict()) == encoder_keys

  actual = _torch_embeddings(encoder, np.asarray(images).transpose(0, 3, 1, 2))
  assert actual.shape == (2, tiny_config.decoder_dim, *tiny_config.embedding_hw)
  assert _max_rel_diff(actual.transpose(0, 2, 3, 1), expected) <= TOLERANCE


def test_torch_encoder_reproduces_official_embeddings(tiny_state_dict, tiny_config, tiny_reference):
  import torch.nn.functional as F

  encoder = encoder_from_state_dict(tiny_state_dict, tiny_config)
  # Official preprocessing: [0, 1] NCHW, bilinear (no antialias) to img_size, ImageNet mean/std.
  image = torch.from_numpy(tiny_reference["image"]).permute(2, 0, 1)[None].float() / 255
  size = tiny_config.img_size
  image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
  image = (image - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]
  reference = tiny_reference["image_embeddings"]
  images = image.repeat(reference.shape[0], 1, 1, 1).numpy()

  actual = _torch_embeddings(encoder, images)
  assert actual.shape == reference.shape
  assert _max_rel_diff(actual, reference) <= TOLERANCE


def test_encoder_from_state_dict_rejects_missing_keys(tiny_state_dict, tiny_config):
  broken = {k: v for k, v in tiny_state_dict.items() if k != "image_encoder.neck.3.bias"}
  with pytest.raises(RuntimeError, match="neck.3.bias"):
    encoder_from_state_dict(broken, tiny_config)
  with pytest.raises(ValueError, match="image_encoder"):
    encoder_from_state_dict({"mask_decoder.x": np.zeros(1)}, tiny_config)


def test_benchmark_cli_prints_table(tmp_path):
  out_json = tmp_path / "rows.json"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = benchmark.main(["--config", TINY_CONFIG, "--batch-sizes", "1", "--dtypes", "float32",
                           "--queries", "2", "--repeats", "1", "--warmup", "1", "--torch", "--quiet",
                           "--json", str(out_json)])
  assert code == 0
  text = stdout.getvalue()
  assert "random weights" in text
  assert "process peak RSS" in text or "peak_bytes_in_use" in text
  header = next(line for line in text.splitlines() if line.strip().startswith("variant"))
  for column in ("dtype", "batch", "enc ms", "enc img/s", "enc compile s", "dec ms", "dec prompts/s",
                 "peak MiB", "torch enc ms", "torch/jax", "max rel diff"):
    assert column in header
  data_rows = [line for line in text.splitlines() if line.strip().startswith("efficientsam_tiny |")]
  assert len(data_rows) == 1 and "float32" in data_rows[0]

  rows = json.loads(out_json.read_text())["rows"]
  assert len(rows) == 1
  row = rows[0]
  assert (row["variant"], row["dtype"], row["batch"], row["attention"]) == ("efficientsam_tiny", "float32", 1, "xla")
  assert row["encoder_ms"] > 0 and row["decoder_prompts_per_s"] > 0 and row["peak_mem_mib"] > 0
  assert row["max_rel_diff"] <= TOLERANCE  # same weights and input in both frameworks
  assert row["torch_over_jax"] == pytest.approx(row["torch_ms"] / row["encoder_ms"])


@pytest.mark.parametrize("argv", [["--dtypes", "float64"], ["--warmup", "0"], ["--batch-sizes", "0"],
                                  ["--attention", "flash"]])
def test_benchmark_cli_rejects_bad_arguments(argv):
  stderr = io.StringIO()
  with pytest.raises(SystemExit), contextlib.redirect_stderr(stderr):
    benchmark.main(argv)
  assert "error" in stderr.getvalue()
