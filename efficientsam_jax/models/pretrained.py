"""Saving and loading model weights as an orbax checkpoint directory.

One directory format serves EfficientSAM and SAM's ViT image encoder (the
SAMI teacher)::

    DIR/config.json   {"model": "efficientsam" | "sam_encoder", ...config fields}
    DIR/params/       orbax StandardCheckpointer tree of fp32 parameters

The config fields are ``EfficientSamConfig``'s or ``SamEncoderConfig``'s (the
fixtures' key names). A ``config.json`` without ``"model"`` is EfficientSAM:
directories written before the field existed still load.

``save_pretrained(DIR, params, config)`` picks the kind from the config's type;
``load_pretrained(DIR)`` returns ``(EfficientSam, params)`` and
``load_sam_encoder(DIR)`` returns ``(SamImageEncoder, params)``, each refusing
the other kind's directory. Restoring uses abstract shapes: nothing is
initialized or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from efficientsam_jax.common.files import atomic_directory
from efficientsam_jax.models import efficient_sam, sam_vit
from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig
from efficientsam_jax.models.sam_vit import SamEncoderConfig, SamImageEncoder

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
MODEL_FIELD = "model"
DEFAULT_MODEL = "efficientsam"  # what a config.json without MODEL_FIELD holds

Config = Union[EfficientSamConfig, SamEncoderConfig]


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """What a weights directory needs to know about one model family."""

  name: str  # the value of config.json's "model" field
  description: str
  config_type: type
  module_type: type
  loader: str  # the function that loads this kind, named in errors
  abstract_params: Callable[[nn.Module], Any]  # model → tree of ShapeDtypeStruct


KINDS = {
    "efficientsam": ModelKind("efficientsam", "an EfficientSAM model", EfficientSamConfig, EfficientSam,
                              "load_pretrained", efficient_sam.abstract_params),
    "sam_encoder": ModelKind("sam_encoder", "a SAM image encoder (SAMI teacher)", SamEncoderConfig,
                             SamImageEncoder, "load_sam_encoder", sam_vit.abstract_params),
}


def kind_of(config: Config) -> ModelKind:
  for kind in KINDS.values():
    if isinstance(config, kind.config_type):
      return kind
  raise TypeError(f"cannot save a {type(config).__name__}; known configs: "
                  f"{[k.config_type.__name__ for k in KINDS.values()]}")


def _read_json(path: str) -> dict:
  with open(path) as f:
    values = json.load(f)
  if not isinstance(values, dict):
    raise ValueError(f"{path} does not hold a JSON object")
  return values


def config_from_dict(values: dict, default_model: str = DEFAULT_MODEL) -> Config:
  """A config.json's contents → config; ``"model"`` picks the type (``default_model`` if absent)."""
  values = dict(values)
  name = values.pop(MODEL_FIELD, default_model)
  if name not in KINDS:
    raise ValueError(f"unknown model {name!r} in {CONFIG_FILE}; known: {sorted(KINDS)}")
  return KINDS[name].config_type.from_dict(values)


def config_from_json(path: str, model: str) -> Config:
  """Reads a config file expected to describe ``model``: a fixture's plain config or a weights directory's.

  A ``"model"`` field, if present, must agree, so that a directory's config of
  the other kind is refused by name instead of by its unknown keys.
  """
  values = _read_json(path)
  found = values.get(MODEL_FIELD, model)
  if found != model:
    raise ValueError(f"{path} describes model {found!r}, not {model!r}")
  return config_from_dict(values, default_model=model)


def save_pretrained(directory: str, params, config: Config, overwrite: bool = False) -> str:
  """Writes ``config`` (with its model kind) and host ``params`` to ``directory`` atomically.

  Only the calling process takes part: in a multi-host job, gather the
  parameters on every process (``common.multihost.host_copy``), then save from one.
  """
  kind = kind_of(config)
  with atomic_directory(directory, overwrite=overwrite) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump({MODEL_FIELD: kind.name, **config.to_dict()}, f, indent=1)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)  # host arrays
    # Written by the calling process alone (in a multi-host job, process 0 exports host copies).
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
      checkpointer.wait_until_finished()
  return directory


def load_config(directory: str) -> Config:
  """The config of a weights directory, of whichever kind it holds."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not a weights directory (no {CONFIG_FILE})")
  return config_from_dict(_read_json(path))


def _load(directory: str, model_name: str, dtype) -> tuple[nn.Module, dict]:
  directory = os.path.abspath(directory)
  config = load_config(directory)
  wanted, found = KINDS[model_name], kind_of(config)
  if found is not wanted:
    raise ValueError(f"{directory} holds {found.description} ({CONFIG_FILE} model {found.name!r}), "
                     f"not {wanted.description}; load it with {found.loader}")
  model = wanted.module_type(config, dtype=dtype)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), wanted.abstract_params(model))
  return model, params


def load_pretrained(directory: str, dtype=jnp.float32) -> tuple[EfficientSam, dict]:
  """Loads an EfficientSAM weights directory written by ``save_pretrained`` or the converter CLI."""
  return _load(directory, "efficientsam", dtype)


def load_sam_encoder(directory: str, dtype=jnp.float32) -> tuple[SamImageEncoder, dict]:
  """Loads a SAM image encoder directory (``python -m efficientsam_jax.convert sam-to-jax``)."""
  return _load(directory, "sam_encoder", dtype)
