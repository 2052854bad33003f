"""Reading and writing PyTorch checkpoint files (needs the optional ``torch`` extra)."""

from __future__ import annotations

import os

import numpy as np

from efficientsam_jax.common.files import atomic_file


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading or writing PyTorch checkpoints needs torch: "
                      "pip install 'efficientsam-jax[torch]'") from e
  return torch


def load_state_dict(path: str, key: str | None = "model") -> dict[str, np.ndarray]:
  """Loads ``torch.save`` output as {name: float32/... numpy array}.

  Accepts the official release format ``{"model": state_dict}`` or a flat
  state dict (as SAM's ``sam_vit_h_4b8939.pth``). Loaded with
  ``weights_only=True``: no code in the file is executed.
  """
  torch = _torch()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for corrupt files
    raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
  if key is not None and isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
    obj = obj[key]
  if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
    raise ValueError(f"{path} does not hold a state dict (or {{{key!r}: state_dict}})")
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def save_state_dict(state_dict: dict[str, np.ndarray], path: str, key: str | None = "model") -> None:
  """Writes ``torch.save({key: state_dict})`` atomically (temp file + rename)."""
  torch = _torch()
  tensors = {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in state_dict.items()}
  payload = {key: tensors} if key is not None else tensors
  with atomic_file(path, suffix=".pt") as tmp:
    torch.save(payload, tmp)
