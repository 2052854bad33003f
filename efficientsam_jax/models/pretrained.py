"""Saving and loading EfficientSAM weights as an orbax checkpoint directory.

Layout of a weights directory::

    DIR/config.json   the EfficientSamConfig (fixture key names)
    DIR/params/       orbax StandardCheckpointer tree of fp32 parameters

``load_pretrained(DIR)`` returns ``(model, params)`` in one call.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from efficientsam_jax.common.files import atomic_directory
from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, init_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_pretrained(directory: str, params, config: EfficientSamConfig, overwrite: bool = False) -> str:
  """Writes ``config`` and ``params`` to ``directory`` atomically (temp dir + rename)."""
  with atomic_directory(directory, overwrite=overwrite) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config.to_dict(), f, indent=1)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
      checkpointer.wait_until_finished()
  return directory


def load_config(directory: str) -> EfficientSamConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not an EfficientSAM weights directory (no {CONFIG_FILE})")
  return EfficientSamConfig.from_json(path)


def load_pretrained(directory: str, dtype=jnp.float32) -> tuple[EfficientSam, dict]:
  """Loads a weights directory written by ``save_pretrained`` or the converter CLI."""
  directory = os.path.abspath(directory)
  config = load_config(directory)
  model = EfficientSam(config, dtype=dtype)
  abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), abstract)
  return model, params
