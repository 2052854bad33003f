"""The README's main command, run in-process on a tiny model."""

import os

import pytest

from efficientsam_jax import main
from conftest import TINY_DIR, load_config


def test_predict_demo_job_writes_outputs(tmp_path):
  config = load_config("predict_demo")
  config.model_config = os.path.join(TINY_DIR, "config.json")
  main.run(config, str(tmp_path))
  written = sorted(os.listdir(tmp_path))
  assert any(name.endswith("overlay.png") and "UNTRAINED" in name for name in written), written
  assert any(name.endswith("mask.npy") for name in written), written


def test_unknown_task_is_a_clear_error(tmp_path):
  config = load_config("predict_demo")
  config.task = "nonsense"
  with pytest.raises(ValueError, match="unknown task 'nonsense'"):
    main.run(config, str(tmp_path))
