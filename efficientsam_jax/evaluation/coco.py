"""COCO-format data for the evaluations: loading, checking, decoding masks, prompts and mIoU.

Reads any COCO-format annotation file (COCO val2017, LVIS v1 val, the tests'
generated sets). A malformed file is a ``ValueError`` naming the file and the
key; bad annotations (empty segmentation, box outside the image, crowd, masks
under one pixel) are counted by reason and skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Optional

import numpy as np
from pycocotools import mask as mask_utils

# COCO's size buckets, by the annotation's "area": small < 32², medium < 96², large otherwise.
SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2
SIZE_BUCKETS = ("small", "medium", "large")
BOX_TOLERANCE = 1.0  # pixels a GT box may stick out of the image (rounding in the annotation tools)


def size_bucket(area: float) -> str:
  if area < SMALL_AREA:
    return "small"
  return "medium" if area < MEDIUM_AREA else "large"


@dataclasses.dataclass
class CocoData:
  """A COCO-format annotation file, indexed: images by id, annotations per image, categories."""

  path: str
  images: dict[int, dict]
  annotations: dict[int, list[dict]]  # image id → its annotations, in file order
  categories: dict[int, dict]
  kind: str  # "coco" or "lvis"

  @property
  def image_ids(self) -> list[int]:
    return sorted(self.images)


def read_json(path: str, what: str) -> Any:
  if not path:
    raise ValueError(f"no {what} given (empty path)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{what} {path!r} is not valid JSON: {error}") from error


def load_coco(path: str, kind: str = "auto") -> CocoData:
  """Loads and checks a COCO-format annotation file; ``kind`` "coco", "lvis" or "auto" (LVIS has frequencies)."""
  data = read_json(path, "annotation file")
  if not isinstance(data, dict):
    raise ValueError(f"annotation file {path!r} must hold a JSON object with 'images' and 'annotations', "
                     f"got {type(data).__name__}")
  for key in ("images", "annotations"):
    if not isinstance(data.get(key), list):
      raise ValueError(f"annotation file {path!r} has no list {key!r} (keys: {sorted(data)})")
  images = {}
  for position, image in enumerate(data["images"]):
    missing = [k for k in ("id", "width", "height") if k not in image]
    if missing:
      raise ValueError(f"annotation file {path!r}: images[{position}] lacks {missing}")
    images[int(image["id"])] = image
  annotations: dict[int, list[dict]] = {image_id: [] for image_id in images}
  for position, annotation in enumerate(data["annotations"]):
    if "image_id" not in annotation or "id" not in annotation:
      raise ValueError(f"annotation file {path!r}: annotations[{position}] lacks 'id' or 'image_id'")
    image_id = int(annotation["image_id"])
    if image_id not in images:
      raise ValueError(f"annotation file {path!r}: annotation {annotation['id']} refers to image {image_id}, "
                       "which is not in 'images'")
    annotations[image_id].append(annotation)
  categories = {int(c["id"]): c for c in data.get("categories", [])}
  if kind == "auto":
    kind = "lvis" if any("frequency" in c for c in categories.values()) else "coco"
  if kind not in ("coco", "lvis"):
    raise ValueError(f"dataset kind must be 'coco', 'lvis' or 'auto', got {kind!r}")
  return CocoData(path, images, annotations, categories, kind)


def image_path(folder: str, image: dict) -> str:
  """The file of an image entry: ``file_name``, or for LVIS the last part of ``coco_url`` (COCO's file names)."""
  name = image.get("file_name")
  if not name and image.get("coco_url"):
    name = image["coco_url"].rstrip("/").split("/")[-1]
  if not name:
    raise ValueError(f"image {image.get('id')} has neither 'file_name' nor 'coco_url'")
  # LVIS file names look like "val2017/000000397133.jpg"; try the full name, then the base name.
  path = os.path.join(folder, name)
  if not os.path.exists(path) and os.path.exists(os.path.join(folder, os.path.basename(name))):
    path = os.path.join(folder, os.path.basename(name))
  return path


def check_image_files(folder: str, data: CocoData, image_ids: Iterable[int]) -> None:
  """Raises a FileNotFoundError listing missing image files before a long run starts."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder!r} does not exist")
  missing = [image_path(folder, data.images[i]) for i in image_ids if not os.path.isfile(image_path(folder,
                                                                                                    data.images[i]))]
  if missing:
    raise FileNotFoundError(f"{len(missing)} image file(s) listed in {data.path} are missing from {folder}, "
                            f"e.g. {missing[:3]}")


def segmentation_is_usable(segmentation: Any) -> bool:
  """A structural check (no decoding): polygons with >= 3 points, or an RLE with size and counts.

  pycocotools' COCOeval crashes on GT annotations that fail it (e.g. an empty polygon list).
  """
  if isinstance(segmentation, list):
    return any(isinstance(p, list) and len(p) >= 6 for p in segmentation)
  return isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation


def decode_segmentation(segmentation: Any, height: int, width: int) -> Optional[np.ndarray]:
  """Polygons, uncompressed or compressed RLE → bool [H, W]; None if empty or unreadable."""
  if segmentation is None or (isinstance(segmentation, (list, dict)) and len(segmentation) == 0):
    return None
  try:
    if isinstance(segmentation, list):  # polygons
      polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
      if not polygons:
        return None
      rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
      rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
    else:
      counts = segmentation["counts"]
      rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    mask = mask_utils.decode(rle).astype(bool)
  except (KeyError, TypeError, ValueError, AttributeError):
    return None
  if mask.shape != (height, width):
    return None
  return mask


def gt_box_xyxy(annotation: dict, height: int, width: int) -> tuple[Optional[np.ndarray], str]:
  """The annotation's bbox as (x0, y0, x1, y1) clipped to the image, and a status.

  Status "ok"; "missing" (no usable bbox: absent, malformed or empty); "outside" (beyond the
  image by more than ``BOX_TOLERANCE`` pixels, a corrupt annotation).
  """
  box = annotation.get("bbox")
  if not isinstance(box, (list, tuple)) or len(box) != 4:
    return None, "missing"
  try:
    x, y, w, h = (float(v) for v in box)
  except (TypeError, ValueError):
    return None, "missing"
  if not np.isfinite([x, y, w, h]).all() or w <= 0 or h <= 0:
    return None, "missing"
  if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
    return None, "outside"
  return np.array([max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)], np.float64), "ok"


def mask_box_xyxy(mask: np.ndarray) -> np.ndarray:
  """The tight box (x0, y0, x1, y1) of a non-empty mask, in pixel edges (x1 = last column + 1)."""
  ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float64)


@dataclasses.dataclass
class GtObject:
  """One evaluable annotation of an image."""

  annotation_id: int
  category_id: int
  area: float  # the annotation's "area" (decides the size bucket)
  mask: np.ndarray  # bool [H, W]
  box: np.ndarray  # (x0, y0, x1, y1)


def image_objects(data: CocoData, image_id: int, height: int, width: int, issues: dict[str, int]) -> list[GtObject]:
  """The image's evaluable annotations.

  ``issues`` counts, by reason, the annotations skipped ("crowd", "empty_segmentation",
  "tiny_mask", "box_outside_image") and those evaluated with their mask's box because
  their own is unusable ("box_from_mask").
  """
  objects = []
  for annotation in data.annotations[image_id]:
    if annotation.get("iscrowd", 0):
      _count(issues, "crowd")
      continue
    mask = decode_segmentation(annotation.get("segmentation"), height, width)
    if mask is None:
      _count(issues, "empty_segmentation")
      continue
    if mask.sum() < 1:
      _count(issues, "tiny_mask")
      continue
    box, status = gt_box_xyxy(annotation, height, width)
    if status == "outside":
      _count(issues, "box_outside_image")
      continue
    if box is None:  # Evaluable from the mask alone; counted so that the report shows it.
      _count(issues, "box_from_mask")
      box = mask_box_xyxy(mask)
    area = float(annotation.get("area", mask.sum()))
    objects.append(GtObject(int(annotation["id"]), int(annotation.get("category_id", 0)), area, mask, box))
  return objects


def _count(counter: dict[str, int], key: str, amount: int = 1) -> None:
  counter[key] = counter.get(key, 0) + amount


# -- prompts -----------------------------------------------------------------------


def random_point_in_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A pixel drawn uniformly from the mask, as its centre (x + 0.5, y + 0.5)."""
  ys, xs = np.nonzero(mask)
  index = rng.integers(len(xs))
  return np.array([xs[index] + 0.5, ys[index] + 0.5], np.float64)


def object_rng(seed: int, image_id: int, annotation_id: int) -> np.random.Generator:
  """The same clicks for an object whichever process, order or restart evaluates it."""
  return np.random.default_rng([int(seed), int(image_id) & 0xFFFFFFFF, int(annotation_id) & 0xFFFFFFFF])


def next_click(prediction: np.ndarray, gt: np.ndarray) -> Optional[tuple[np.ndarray, int]]:
  """The centre of the largest error region and its label (1 missed foreground, 0 false positive).

  Error regions are the 8-connected components of false negatives and of false
  positives; the click goes where the distance to the region's border (the image
  border counts) is largest. None when the prediction is exact.
  """
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  best = None
  for label, error in ((1, gt & ~prediction), (0, prediction & ~gt)):
    if not error.any():
      continue
    regions, count = ndimage.label(error, structure=np.ones((3, 3), bool))
    sizes = np.bincount(regions.reshape(-1), minlength=count + 1)[1:]
    largest = int(np.argmax(sizes))
    if best is None or sizes[largest] > best[0]:
      best = (int(sizes[largest]), label, regions == largest + 1)
  if best is None:
    return None
  _, label, region = best
  distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
  y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
  return np.array([x + 0.5, y + 0.5], np.float64), label


# -- scores ------------------------------------------------------------------------


def mask_iou(prediction: np.ndarray, gt: np.ndarray) -> float:
  """|P ∩ G| / |P ∪ G| of two bool masks (1.0 if both are empty)."""
  union = np.logical_or(prediction, gt).sum()
  if union == 0:
    return 1.0
  return float(np.logical_and(prediction, gt).sum() / union)


def summarize_miou(objects: Iterable[dict], prompts: Iterable[str]) -> dict:
  """mIoU per prompt, overall and per size bucket, from per-object records {"area", "iou": {prompt: IoU}}.

  Returns {"miou": {prompt: {"all", "small", "medium", "large"}}, "counts": {"all", "small", ...}};
  a bucket without objects has mIoU None.
  """
  objects, prompts = list(objects), list(prompts)
  buckets = {"all": [o for o in objects]}
  for bucket in SIZE_BUCKETS:
    buckets[bucket] = [o for o in objects if size_bucket(o["area"]) == bucket]
  miou = {}
  for prompt in prompts:
    miou[prompt] = {}
    for bucket, members in buckets.items():
      values = [o["iou"][prompt] for o in members if prompt in o["iou"]]
      miou[prompt][bucket] = float(np.mean(values)) if values else None
  return {"miou": miou, "counts": {bucket: len(members) for bucket, members in buckets.items()}}
