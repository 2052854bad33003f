"""The embedded default: precompute → SAMI training on 8 fake devices; the loss falls; a rerun resumes."""

import os
import re

import pytest

from efficientsam_jax.train.loop import memory_report
from efficientsam_jax.train.sami import train_and_evaluate
from conftest import load_config


def test_smoke_pipeline_learns_and_resumes(tmp_path, capsys):
  config = load_config("sami_vits", "smoke")
  config.total_steps = 30
  result = train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "RANDOM, UNTRAINED" in out and "wrote 2 shard(s)" in out
  assert "mesh {'data': 8, 'fsdp': 1}" in out
  assert "SAMI: 14 views of 7 images, 30 steps of 8" in out  # 2 stored views of each bundled photograph
  assert re.search(r"compiled the training step in [\d.]+ s; XLA memory estimate per device: [\d.]+ GiB", out)
  assert result["step"] == 30
  assert result["last_logged_loss"] < 0.7 * result["first_logged_loss"], result
  assert {"20", "30"} <= set(os.listdir(tmp_path / "checkpoints"))  # every 20 steps + the end
  assert os.listdir(tmp_path / "tensorboard")

  config.total_steps = 40  # a longer run continues from the last checkpoint
  result = train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "skipped 2 finished" in out and "resumed from step 30" in out
  assert result["step"] == 40 and "step 40/40" in out

  # The student went into an EfficientSAM weights directory that the predictor loads.
  import jax
  import numpy as np
  from efficientsam_jax.inference import EfficientSamPredictor
  from efficientsam_jax.models.pretrained import load_pretrained
  model, params = load_pretrained(result["exported"])
  student = jax.device_get(result["state"].params["encoder"])
  np.testing.assert_array_equal(params["image_encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                student["blocks_1"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(params["image_encoder"]["pos_embed"], student["pos_embed"])
  predictor = EfficientSamPredictor(model, params)
  predictor.set_image(np.zeros((32, 48, 3), np.uint8))
  masks, scores, _ = predictor.predict([[10, 10]], [1])
  assert masks.shape == (3, 32, 48) and np.isfinite(scores).all()


def test_memory_report_warns_when_the_step_cannot_fit():
  assert memory_report(None, None) == "XLA memory estimate per device: not available on this backend"
  assert memory_report(3 * 2**30, None) == "XLA memory estimate per device: 3.00 GiB"
  assert memory_report(3 * 2**30, 4 * 2**30) == "XLA memory estimate per device: 3.00 GiB of 4.00 GiB"
  over = memory_report(5 * 2**30, 4 * 2**30)
  assert over.startswith("WARNING: XLA memory estimate per device: 5.00 GiB of 4.00 GiB: the step will run out")
  assert all(knob in over for knob in ("microbatches", "global_batch_size", "remat", "fsdp"))


def test_job_steps_accumulate_over_its_microbatches(tmp_path, monkeypatch):
  from efficientsam_jax.train import sami

  class Traced(Exception):
    pass

  def accumulate(*args):
    raise Traced(args[-1])  # the step's microbatches, seen while the loop compiles it

  config = load_config("sami_vits", "smoke")
  config.global_batch_size, config.microbatches = 16, 2
  monkeypatch.setattr(sami, "accumulate_gradients", accumulate)
  with pytest.raises(Traced) as traced:
    train_and_evaluate(config, str(tmp_path))
  assert traced.value.args == (2,)
