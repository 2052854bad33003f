"""Official EfficientSAM checkpoints (``{"model": state_dict}``) ↔ our parameters."""

from __future__ import annotations

import re
from typing import Mapping, Optional

import jax
import numpy as np

from efficientsam_jax.convert import torch_keys
from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, abstract_params
from efficientsam_jax.models.vit import VIT_SIZES

_DEFAULT_DECODER_HEADS = {256: 8}


def is_transposed_conv(path: tuple[str, ...]) -> bool:
  return len(path) >= 2 and re.fullmatch(r"final_output_upscaling_layers_\d+_0", path[-2]) is not None


def _shape(state_dict, key):
  if key not in state_dict:
    raise torch_keys.StateDictMismatch(f"cannot infer the model size: missing key {key}")
  return np.shape(state_dict[key])


def infer_config(state_dict: Mapping[str, np.ndarray], img_size: int = 1024) -> EfficientSamConfig:
  """Reads the model size off tensor shapes.

  The input size and numbers of heads are not stored in the tensors: the
  input size defaults to the release's 1024, heads come from the variant table
  (ViT width 192/384/768 → 3/6/12 heads; decoder width 256 → 8 heads). For any
  other size pass an explicit config (``--config config.json``).
  """
  width = _shape(state_dict, "image_encoder.pos_embed")[-1]
  depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
  decoder_dim = _shape(state_dict, "image_encoder.neck.0.weight")[0]
  mlp_dim = _shape(state_dict, "mask_decoder.transformer.layers.0.mlp.layers.0.0.weight")[0]
  encoder_heads = {s.width: s.num_heads for s in VIT_SIZES.values()}.get(width)
  decoder_heads = _DEFAULT_DECODER_HEADS.get(decoder_dim)
  if encoder_heads is None or decoder_heads is None:
    raise ValueError(f"checkpoint has encoder width {width} and decoder width {decoder_dim}, which are "
                     "not a released variant: the numbers of heads cannot be read from tensor shapes, "
                     "so pass the model config (--config config.json)")
  return EfficientSamConfig(img_size=img_size, encoder_embed_dim=width, encoder_depth=depth,
                            encoder_num_heads=encoder_heads, decoder_dim=decoder_dim,
                            decoder_num_heads=decoder_heads, decoder_mlp_dim=mlp_dim)


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           config: Optional[EfficientSamConfig] = None) -> tuple[EfficientSamConfig, dict]:
  """Official state dict → (config, params). Raises naming every bad key."""
  config = config or infer_config(state_dict)
  expected = abstract_params(EfficientSam(config))
  params = torch_keys.state_dict_to_params(state_dict, expected, is_transposed_conv)
  return config, params


def state_dict_from_params(params) -> dict[str, np.ndarray]:
  """Our params → the official state dict (same keys, shapes and values)."""
  return torch_keys.params_to_state_dict(jax.device_get(params), is_transposed_conv)
