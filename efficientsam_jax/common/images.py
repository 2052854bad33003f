"""Image files and JPEG bytes: one place, one error message."""

from __future__ import annotations

import io
from typing import Optional

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


class ImageSizeError(ValueError):
  """The encoded image is not the size its metadata says."""


def decode_image(data: bytes, expected_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, …) → uint8 [H, W, 3] RGB.

  ``expected_hw``: raise ``ImageSizeError`` from the header, before decoding, if the size differs.
  Undecodable bytes raise PIL's errors (OSError and its subclasses).
  """
  with Image.open(io.BytesIO(data)) as picture:
    if expected_hw is not None and picture.size != (expected_hw[1], expected_hw[0]):
      raise ImageSizeError(f"image is {picture.size[1]}×{picture.size[0]}, expected {expected_hw[0]}×{expected_hw[1]}")
    return np.asarray(picture if picture.mode == "RGB" else picture.convert("RGB"))
