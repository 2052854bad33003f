"""LVIS mask AP: the federated evaluation of the LVIS dataset (Gupta et al., 2019), on pycocotools' masks.

What makes LVIS differ from COCOeval (and what ``lvis_segm_scores`` does):

* **Federated labels.** An image is judged only on the categories known to be in it (its GT
  annotations) or verified absent (``neg_category_ids``); detections of any other category are
  dropped. For a category listed in the image's ``not_exhaustive_category_ids``, a detection that
  matches no GT is ignored rather than counted as a false positive.
* **300 detections per image** over all categories (the best scores), not 100 per category.
* AP is also reported per category frequency: rare, common, frequent (``APr``, ``APc``, ``APf``).

Everything else is COCO's: IoU thresholds 0.50:0.05:0.95, 101 recall points, greedy matching by
score, area ranges small/medium/large at 32² and 96² (GT by its ``area`` field, detections by their
mask area), precision made monotone before it is read at the recall points, AP averaged over the
(category, IoU) cells that have GT. The ``lvis`` package (the dataset's reference code) computes the
same; it is not a dependency (it needs OpenCV and matplotlib, and NumPy < 1.24).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

MAX_DETECTIONS = 300
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
               "large": (96.0 ** 2, 1e10)}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def _top_detections(results: Iterable[dict], limit: int = MAX_DETECTIONS) -> dict[int, list[dict]]:
  """{image id: its ``limit`` best-scoring detections, best first (stable on ties)}."""
  per_image: dict[int, list[dict]] = {}
  for detection in results:
    per_image.setdefault(int(detection["image_id"]), []).append(detection)
  return {image_id: sorted(entries, key=lambda d: -float(d["score"]))[:limit]
          for image_id, entries in per_image.items()}


def _match(ious: np.ndarray, gt_ignored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Greedy matching at every IoU threshold: detections (best score first) × GT (non-ignored first).

  Returns ``matched`` [T, D] (the detection took a GT) and ``took_ignored`` [T, D] (the GT it took
  is outside the area range).
  """
  num_dt, num_gt = ious.shape
  matched = np.zeros((len(IOU_THRESHOLDS), num_dt), bool)
  took_ignored = np.zeros((len(IOU_THRESHOLDS), num_dt), bool)
  for t, threshold in enumerate(IOU_THRESHOLDS):
    gt_taken = np.zeros(num_gt, bool)
    for d in range(num_dt):
      best, best_iou = -1, min(threshold, 1 - 1e-10)
      for g in range(num_gt):
        if gt_taken[g]:
          continue
        if best > -1 and not gt_ignored[best] and gt_ignored[g]:
          break  # a real GT is matched already; ignored ones come after the real ones
        if ious[d, g] < best_iou:
          continue
        best, best_iou = g, ious[d, g]
      if best > -1:
        gt_taken[best] = matched[t, d] = True
        took_ignored[t, d] = gt_ignored[best]
  return matched, took_ignored


def _precision_at_recalls(true_pos: np.ndarray, false_pos: np.ndarray, num_gt: int) -> np.ndarray:
  """Precision at ``RECALL_POINTS`` of one ranked list (cumulative counts), interpolated COCO-style."""
  if not len(true_pos):
    return np.zeros(len(RECALL_POINTS))
  recall = true_pos / num_gt
  precision = true_pos / (true_pos + false_pos + np.spacing(1))
  precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
  at = np.searchsorted(recall, RECALL_POINTS, side="left")
  return np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)


def lvis_segm_scores(dataset: dict, results: list[dict], image_ids: Optional[Iterable[int]] = None) -> dict:
  """LVIS ``segm`` AP of COCO-format ``results`` (RLE masks) against an LVIS annotation ``dataset`` (a dict).

  ``image_ids``: the images to evaluate (default: every image of the dataset). Returns fractions
  {AP, AP50, AP75, APs, APm, APl, APr, APc, APf}; -1 where no category has GT (e.g. no rare ones).
  """
  gt = COCO()
  gt.dataset = dataset
  gt.createIndex()
  image_ids = sorted(int(i) for i in (gt.getImgIds() if image_ids is None else image_ids))
  categories = sorted(gt.getCatIds())
  category_index = {c: i for i, c in enumerate(categories)}
  images = {i: gt.imgs[i] for i in image_ids}
  # precision[t, r, category, area]; -1 where the cell has no GT
  precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS), len(categories), len(AREA_RANGES)))
  per_cell: dict[tuple[int, int], list] = {}  # (category, area) → per image (scores, matched, ignored, #GT)
  detections = _top_detections(d for d in results if int(d["image_id"]) in images)
  for image_id, image in images.items():
    gts: dict[int, list] = {}
    for annotation in gt.imgToAnns.get(image_id, []):
      gts.setdefault(annotation["category_id"], []).append(annotation)
    judged = set(gts) | set(image.get("neg_category_ids", []))  # the federated label set of this image
    not_exhaustive = set(image.get("not_exhaustive_category_ids", []))
    dts: dict[int, list] = {}
    for detection in detections.get(image_id, []):
      if detection["category_id"] in judged:
        dts.setdefault(detection["category_id"], []).append(detection)
    for category in set(gts) | set(dts):
      if category not in category_index:
        continue
      cat_gts, cat_dts = gts.get(category, []), dts.get(category, [])
      gt_rles = [gt.annToRLE(a) for a in cat_gts]
      dt_rles = [d["segmentation"] for d in cat_dts]
      ious = (np.asarray(mask_utils.iou(dt_rles, gt_rles, [0] * len(gt_rles))).reshape(len(dt_rles), len(gt_rles))
              if dt_rles and gt_rles else np.zeros((len(dt_rles), len(gt_rles))))
      # One mask at a time: pycocotools 2.0.11's area() of a list overflows beyond 255 masks (NumPy 2).
      dt_areas = np.asarray([float(mask_utils.area(rle)) for rle in dt_rles])
      gt_areas = np.asarray([float(a["area"]) for a in cat_gts])
      scores = np.asarray([float(d["score"]) for d in cat_dts])
      for area_index, (low, high) in enumerate(AREA_RANGES.values()):
        gt_ignored = (gt_areas < low) | (gt_areas > high)
        gt_order = np.argsort(gt_ignored, kind="mergesort")  # the GT in range first
        matched, took_ignored = _match(ious[:, gt_order], gt_ignored[gt_order])
        out_of_scope = (dt_areas < low) | (dt_areas > high) | (category in not_exhaustive)
        ignored = took_ignored | (~matched & out_of_scope[None, :])
        per_cell.setdefault((category_index[category], area_index), []).append(
            (scores, matched, ignored, int(np.count_nonzero(~gt_ignored))))
  for (c, a), entries in per_cell.items():
    num_gt = sum(e[3] for e in entries)
    if num_gt == 0:
      continue
    scores = np.concatenate([e[0] for e in entries])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e[1] for e in entries], axis=1)[:, order]
    ignored = np.concatenate([e[2] for e in entries], axis=1)[:, order]
    true_pos = np.cumsum(matched & ~ignored, axis=1)
    false_pos = np.cumsum(~matched & ~ignored, axis=1)
    for t in range(len(IOU_THRESHOLDS)):
      precision[t, :, c, a] = _precision_at_recalls(true_pos[t], false_pos[t], num_gt)

  def mean(cells: np.ndarray) -> float:
    valid = cells[cells > -1]
    return float(valid.mean()) if valid.size else -1.0

  frequency = np.asarray([gt.cats[c].get("frequency", "") for c in categories])
  areas = {name: i for i, name in enumerate(AREA_RANGES)}
  everything = precision[..., areas["all"]]
  return {"AP": mean(everything), "AP50": mean(everything[0]), "AP75": mean(everything[5]),
          "APs": mean(precision[..., areas["small"]]), "APm": mean(precision[..., areas["medium"]]),
          "APl": mean(precision[..., areas["large"]]),
          **{f"AP{group}": mean(everything[:, :, frequency == group]) for group in "rcf"}}
