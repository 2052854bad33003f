"""Image files and JPEG bytes: one place, one error message."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def load_rgb(path: str) -> np.ndarray:
  """Any image PIL reads → uint8 [H, W, 3] (gray/RGBA/palette converted); ValueError naming the file."""
  try:
    with Image.open(path) as picture:
      image = np.asarray(picture.convert("RGB"))
  except OSError as error:
    raise ValueError(f"cannot read image {path!r}: {error}") from error
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"cannot read image {path!r}: it has no pixels (shape {image.shape})")
  return image


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  """uint8 [H, W, 3] → JPEG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()
