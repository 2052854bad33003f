"""Shared test fixtures: the tiny official-format model from tests/data."""

import os

import jax
import pytest

# Sharded code is tested on 8 fake CPU devices; must be set before JAX starts its backend.
jax.config.update("jax_num_cpu_devices", 8)

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
TINY_DIR = os.path.join(DATA_DIR, "efficientsam_tiny")
# The full-size Ti fixture lives in the shared folder beside the repository (CI has it).
SHARED_FIXTURES = os.environ.get(
    "EFFICIENTSAM_SHARED_FIXTURES",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))


@pytest.fixture(scope="session")
def tiny_state_dict():
  from efficientsam_jax.convert import torch_io
  return torch_io.load_state_dict(os.path.join(TINY_DIR, "efficient_sam_random.pt"))


@pytest.fixture(scope="session")
def tiny_config():
  from efficientsam_jax.models import EfficientSamConfig
  return EfficientSamConfig.from_json(os.path.join(TINY_DIR, "config.json"))


@pytest.fixture(scope="session")
def tiny_model(tiny_state_dict, tiny_config):
  """(EfficientSam, params) of the tiny fixture, converted from its PyTorch checkpoint."""
  from efficientsam_jax.convert.efficient_sam import params_from_state_dict
  from efficientsam_jax.models import EfficientSam
  config, params = params_from_state_dict(tiny_state_dict, tiny_config)
  return EfficientSam(config), params


@pytest.fixture(scope="session")
def tiny_reference():
  import numpy as np
  return dict(np.load(os.path.join(TINY_DIR, "reference.npz")))


def load_config(name: str, arg=None):
  """``configs/<name>.py``'s ``get_config(arg)``, as ``--config=configs/<name>.py:arg`` gives it."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()
