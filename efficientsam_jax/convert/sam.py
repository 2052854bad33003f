"""segment-anything checkpoints (``sam_vit_h_4b8939.pth``) → our SAM image encoder.

The checkpoint is a flat state dict of the whole SAM; the encoder's keys are
under ``image_encoder.``, prompt-encoder and mask-decoder keys are ignored.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from efficientsam_jax.convert import torch_keys
from efficientsam_jax.models.sam_vit import SamEncoderConfig, SamImageEncoder, abstract_params

PREFIX = "image_encoder."


def encoder_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: SamEncoderConfig) -> dict:
  """SAM state dict → SamImageEncoder params; raises naming every bad ``image_encoder.`` key."""
  encoder_only = {k: v for k, v in state_dict.items() if k.startswith(PREFIX)}
  if not encoder_only:
    raise torch_keys.StateDictMismatch(f"no '{PREFIX}*' keys: this is not a SAM checkpoint")
  return torch_keys.state_dict_to_params(encoder_only, abstract_params(SamImageEncoder(config)),
                                         prefix=PREFIX)


def state_dict_from_encoder_params(params) -> dict[str, np.ndarray]:
  return torch_keys.params_to_state_dict(jax.device_get(params), prefix=PREFIX)
