"""A small generated COCO-format dataset: the smoke configs' data and the tests' ground truth.

Images of a few sizes with filled shapes (small, medium and large by COCO's
area buckets), annotated with polygons, compressed and uncompressed RLE, plus
the kinds of bad annotation real files contain (crowd, empty segmentation, box
outside the image), and a detections file in COCO results format (jittered GT
boxes with scores, and a false positive per image).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from efficientsam_jax.common.files import atomic_file

IMAGE_SIZES = ((144, 176), (160, 128), (128, 150), (150, 150))  # (H, W)
CATEGORIES = [{"id": 1, "name": "box"}, {"id": 2, "name": "blob"}, {"id": 3, "name": "bar"}]
# The untrained model the evaluation smoke configs run on this data (EfficientSamConfig fields).
TINY_RANDOM_MODEL = {"img_size": 64, "encoder_embed_dim": 48, "encoder_depth": 2, "encoder_num_heads": 3,
                     "decoder_dim": 64, "decoder_num_heads": 4, "decoder_mlp_dim": 128}


def _ellipse_polygon(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[float]:
  angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], -1).reshape(-1).round(2).tolist()


def _rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def _objects(rng: np.random.Generator, height: int, width: int) -> list[tuple[int, list[float]]]:
  """(category, polygon) of a large ellipse, a medium rectangle and a small square, placed apart."""
  rx, ry = 0.36 * width, 0.33 * height  # area ≈ π·rx·ry > 96²
  cx, cy = width * 0.55 + rng.uniform(-4, 4), height * 0.55 + rng.uniform(-4, 4)
  medium_w, medium_h = rng.uniform(40, 48), rng.uniform(36, 44)  # 32² < area < 96²
  small = rng.uniform(10, 16)  # area < 32²
  return [
      (2, _ellipse_polygon(cx, cy, rx, ry)),
      (1, _rect_polygon(3.0, 3.0, 3.0 + medium_w, 3.0 + medium_h)),
      (3, _rect_polygon(width - small - 2, 2.0, width - 2.0, 2.0 + small)),
  ]


def write_synthetic_dataset(folder: str, seed: int = 0, num_images: int = 4, bad_annotations: bool = True) -> dict:
  """Writes ``folder/images/*.png``, ``annotations.json`` and ``detections.json`` (kept if present).

  ``bad_annotations=False`` leaves out the crowd, empty and out-of-image annotations.

  Returns {"annotations", "images", "detections"} paths.
  """
  paths = {"annotations": os.path.join(folder, "annotations.json"), "images": os.path.join(folder, "images"),
           "detections": os.path.join(folder, "detections.json")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  rng = np.random.default_rng(seed)
  os.makedirs(paths["images"], exist_ok=True)
  images, annotations, detections = [], [], []
  next_id = 1
  for index in range(num_images):
    height, width = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    image_id = 1000 + index
    pixels = (rng.uniform(0, 60, (height, width, 1)) + np.linspace(0, 60, width)[None, :, None]).repeat(3, -1)
    for number, (category, polygon) in enumerate(_objects(rng, height, width)):
      rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
      mask = mask_utils.decode(rle).astype(bool)
      pixels[mask] = rng.uniform(90, 255, 3)
      if number == 0:
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}  # compressed RLE
      elif number == 2 and index % 2:
        flat = mask.reshape(-1, order="F")  # uncompressed RLE
        runs = np.diff(np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]]))
        segmentation = {"size": [height, width], "counts": ([0] if flat[0] else []) + runs.tolist()}
      else:
        segmentation = [polygon]
      bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
      annotations.append({"id": next_id, "image_id": image_id, "category_id": category, "iscrowd": 0,
                          "segmentation": segmentation, "area": float(mask_utils.area(rle)), "bbox": bbox})
      jitter = rng.uniform(-2, 2, 4)
      box = [max(bbox[0] + jitter[0], 0.0), max(bbox[1] + jitter[1], 0.0), bbox[2] + jitter[2], bbox[3] + jitter[3]]
      box[2], box[3] = min(box[2], width - box[0]), min(box[3], height - box[1])
      detections.append({"image_id": image_id, "category_id": category, "bbox": [round(v, 2) for v in box],
                         "score": round(float(rng.uniform(0.5, 1.0)), 4)})
      next_id += 1
    # The kinds of bad annotation that real files contain: counted and skipped, never fatal.
    if bad_annotations:
      corner = np.pad(np.ones((8, 8), np.uint8), ((height - 10, 2), (2, width - 10)))
      crowd = mask_utils.encode(np.asfortranarray(corner))
      annotations.append({"id": next_id, "image_id": image_id, "category_id": 1, "iscrowd": 1, "area": 64.0,
                          "segmentation": {"size": [height, width], "counts": crowd["counts"].decode("ascii")},
                          "bbox": [2.0, height - 10.0, 8.0, 8.0]})
      annotations.append({"id": next_id + 1, "image_id": image_id, "category_id": 2, "iscrowd": 0, "area": 0.0,
                          "segmentation": [], "bbox": [10.0, 10.0, 5.0, 5.0]})
      annotations.append({"id": next_id + 2, "image_id": image_id, "category_id": 3, "iscrowd": 0, "area": 100.0,
                          "segmentation": [_rect_polygon(width - 12.0, height - 12.0, width - 2.0, height - 2.0)],
                          "bbox": [width - 12.0, height - 12.0, 60.0, 60.0]})
      next_id += 3
    detections.append({"image_id": image_id, "category_id": 1, "bbox": [width / 2, height / 4, 20.0, 15.0],
                       "score": 0.05})
    file_name = f"{image_id:012d}.png"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(paths["images"], file_name))
    images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
  data = {"info": {"description": "efficientsam_jax synthetic evaluation set"}, "images": images,
          "annotations": annotations, "categories": CATEGORIES}
  for key, payload in (("detections", detections), ("annotations", data)):
    with atomic_file(paths[key]) as tmp, open(tmp, "w") as f:
      json.dump(payload, f)
  return paths
