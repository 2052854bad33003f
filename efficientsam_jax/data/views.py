"""Augmented views for SAMI: RandomResizedCrop + horizontal flip, recorded as parameters.

A view is fully described by ``View`` (crop box and flip), so the teacher
precompute job can store it next to the teacher's features and the student
sees exactly the pixels the teacher saw. Sampling follows torchvision's
``RandomResizedCrop.get_params`` (10 tries of a log-uniform aspect ratio and
uniform area, then a centre-crop fallback) with MAE's settings (scale
0.2–1, ratio 3/4–4/3, bicubic resampling). Each view's randomness is derived
from (seed, source id, view index), so any view can be redrawn on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class View:
  top: int
  left: int
  height: int
  width: int
  flip: bool


def view_rng(seed: int, source_id: str, view_index: int) -> np.random.Generator:
  """Independent, reproducible randomness for one view of one source image."""
  digest = hashlib.sha256(f"{seed}/{source_id}/{view_index}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def sample_view(rng: np.random.Generator, image_hw: tuple[int, int], scale=(0.2, 1.0),
                ratio=(3 / 4, 4 / 3), flip_probability: float = 0.5) -> View:
  """A random crop covering ``scale`` of the area with aspect ``ratio`` (w/h), and a flip."""
  height, width = image_hw
  if height <= 0 or width <= 0:
    raise ValueError(f"cannot crop an empty image of size {image_hw}")
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  flip = bool(rng.random() < flip_probability)
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return View(top, left, h, w, flip)
  # Fallback: the largest centred crop within the ratio bounds.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return View((height - h) // 2, (width - w) // 2, h, w, flip)


def render_view(image: np.ndarray, view: View, size: int) -> np.ndarray:
  """uint8 [H, W, 3] → the view as uint8 [size, size, 3] (PIL bicubic, as torchvision)."""
  crop = Image.fromarray(image).crop((view.left, view.top, view.left + view.width, view.top + view.height))
  crop = crop.resize((size, size), Image.Resampling.BICUBIC)
  if view.flip:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(crop)
