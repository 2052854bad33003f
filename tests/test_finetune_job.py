"""The finetuning job end to end on generated SA-1B data and 8 fake devices: SAMI init, gradient accumulation,
kill + resume, export."""

import os

import jax
import numpy as np
import pytest

from efficientsam_jax.train import loop
from efficientsam_jax.train.finetune import train_and_evaluate
from conftest import load_config


def test_job_from_a_sami_export_killed_resumes_exactly_and_exports(tmp_path, capsys, monkeypatch):
  from efficientsam_jax.inference import EfficientSamPredictor
  from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, init_params
  from efficientsam_jax.models.pretrained import load_pretrained, save_pretrained
  config = load_config("efficientsam_ti", "smoke")
  config.model.update(img_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_dim=32,
                      decoder_num_heads=2, decoder_mlp_dim=64)
  config.data.synthetic.update(num_images=24, held_out_images=4, size=80, images_per_tar=8)
  config.data.max_masks = 4
  config.total_steps = 4
  config.log_every_steps = 2
  config.checkpoint.every_steps = 2
  config.global_batch_size, config.microbatches = 16, 2  # gradient accumulation: 2 parts of 8, one per device
  from efficientsam_jax.train import finetune
  real_accumulate, parts = finetune.accumulate_gradients, []
  monkeypatch.setattr(finetune, "accumulate_gradients",
                      lambda *a: parts.append(a[-1]) or real_accumulate(*a))  # records the step's microbatches
  # A SAMI-style export: an EfficientSAM weights directory whose encoder we can recognize.
  model_config = EfficientSamConfig(**config.model.to_dict())
  sami = jax.device_get(init_params(EfficientSam(model_config), jax.random.PRNGKey(7)))
  config.init.encoder = save_pretrained(str(tmp_path / "student"), sami, model_config)

  straight = train_and_evaluate(config, str(tmp_path / "straight"))
  out = capsys.readouterr().out
  assert "initialized image_encoder from" in out and "mesh {'data': 8, 'fsdp': 1}" in out
  assert "held-out single-point mIoU at step 0" in out and "held-out single-point mIoU:" in out
  assert straight["step"] == 4 and np.isfinite(straight["last_logged_loss"])
  assert 0.0 <= straight["miou_before"] <= 1.0 and 0.0 <= straight["miou_after"] <= 1.0
  assert sum(straight["skipped"].values()) == 0
  assert {"2", "4"} <= set(os.listdir(tmp_path / "straight" / "checkpoints"))
  assert parts and set(parts) == {2}

  real, calls = loop.sharding.global_batch, []

  def killed_at_third_batch(batch, mesh):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("killed")  # after step 2 and its checkpoint
    return real(batch, mesh)

  monkeypatch.setattr(loop.sharding, "global_batch", killed_at_third_batch)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, str(tmp_path / "killed"))
  monkeypatch.setattr(loop.sharding, "global_batch", real)
  resumed = train_and_evaluate(config, str(tmp_path / "killed"))
  out = capsys.readouterr().out
  assert "resumed from step 2" in out and "step 4/4" in out
  assert resumed["last_logged_loss"] == straight["last_logged_loss"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight["state"].params),
               jax.device_get(resumed["state"].params))

  # The export loads in the predictor; its encoder started as the SAMI student's (4 small steps moved it).
  model, params = load_pretrained(resumed["exported"])
  assert model.config == model_config
  start = sami["image_encoder"]["pos_embed"]
  assert np.abs(params["image_encoder"]["pos_embed"] - start).max() < 0.05 < np.abs(start).max()
  predictor = EfficientSamPredictor(model, params)
  predictor.set_image(np.zeros((40, 50, 3), np.uint8))
  masks, scores, _ = predictor.predict([[10, 10]], [1])
  assert masks.shape == (3, 40, 50) and np.isfinite(scores).all()
