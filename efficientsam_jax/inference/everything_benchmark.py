"""Segment-everything benchmark: our generator side by side with the official notebook's approach.

    python -m efficientsam_jax.inference.everything_benchmark --grids 16,32 [--checkpoint DIR | --variant ti]

``naive_segment_everything`` is a straightforward implementation of what the
official EfficientSAM notebook does, with the same model: decode the grid's
points in batches with three masks each, upsample EVERY mask to full resolution
(the official bicubic upsampling), copy the logits to the host, then filter mask
by mask in NumPy (predicted IoU, stability), take boxes from the full-resolution
masks and run a NumPy box NMS. ``EfficientSamAutomaticMaskGenerator`` filters and
suppresses on the low-res logits and upsamples only the survivors.

Both run with the same thresholds on the same image, after a warm-up that
compiles everything, and the script prints each one's time, the ratio, the
masks left after each stage and how well the two outputs agree. Without
``--checkpoint`` the weights are random: such a model's predicted IoU and
stability sit far below SAM's thresholds, so by default the thresholds are then
calibrated on the image so that ``--keep-fraction`` of the candidates pass each
filter (otherwise the fast path would have nothing to upsample, flattering it).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficientsam_jax.inference import everything as ev
from efficientsam_jax.inference.predictor import to_rgb_uint8
from efficientsam_jax.models.efficient_sam import EfficientSam, upsample_masks
from efficientsam_jax.models.prompt_encoder import LABEL_PADDING, LABEL_POSITIVE


def naive_segment_everything(model, params, image: np.ndarray, points_per_side: int = 32,
                             points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
                             stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
                             box_nms_thresh: float = 0.7, mask_threshold: float = 0.0) -> list[dict]:
  """The notebook's approach: full-resolution logits for every candidate, NumPy filters and NMS.

  Returns records like the generator's (``segmentation`` as a bool mask) for the full image.
  """
  image = to_rgb_uint8(image)
  height, width = image.shape[:2]
  embedding = ev.embed_image(model, params, image)
  points = ev.build_point_grid(points_per_side) * np.array([width, height])
  image_hw = jnp.array([height, width], jnp.int32)
  kept = []
  for start in range(0, len(points), points_per_batch):
    chunk = points[start:start + points_per_batch]
    padded = np.zeros((points_per_batch, 1, 2), np.float32)
    padded[:len(chunk), 0] = chunk
    labels = np.where(np.arange(points_per_batch) < len(chunk), LABEL_POSITIVE, LABEL_PADDING)
    low_res, iou = ev._decode_any(model, params, embedding, padded, labels[:, None].astype(np.float32),  # pylint: disable=protected-access
                                  image_hw, True)
    logits = np.asarray(upsample_masks(low_res, (height, width)))  # [B, 3, H, W] on the host
    iou = np.asarray(iou)
    for i in range(len(chunk)):
      for k in range(logits.shape[1]):
        if not iou[i, k] > pred_iou_thresh:
          continue
        mask_logits = logits[i, k]
        union = (mask_logits > mask_threshold - stability_score_offset).sum()
        inter = (mask_logits > mask_threshold + stability_score_offset).sum()
        stability = inter / union if union else 0.0
        if stability < stability_score_thresh:
          continue
        mask = mask_logits > mask_threshold
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
          continue
        kept.append({"segmentation": mask, "area": int(mask.sum()), "predicted_iou": float(iou[i, k]),
                     "stability_score": float(stability), "point_coords": [[float(chunk[i][0]), float(chunk[i][1])]],
                     "_box": np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)})
  if not kept:
    return []
  keep = ev.box_nms(np.stack([r["_box"] for r in kept]), np.array([r["predicted_iou"] for r in kept]), box_nms_thresh)
  records = []
  for index in keep:
    record = kept[index]
    record["bbox"] = ev.xyxy_to_xywh(record.pop("_box"))
    record["crop_box"] = [0.0, 0.0, float(width), float(height)]
    records.append(record)
  return records


def match_records(ours: list[dict], reference: list[dict], iou_thresh: float = 0.9) -> dict:
  """How many reference masks have a mask of ours with mask IoU ≥ ``iou_thresh``, and the mean best IoU."""
  def mask_of(record):
    segmentation = record["segmentation"]
    return segmentation if isinstance(segmentation, np.ndarray) else ev.decode_rle(segmentation)
  if not reference:
    return {"matched": 0, "reference": 0, "mean_best_iou": None}
  ours_masks = np.stack([mask_of(r).reshape(-1) for r in ours]) if ours else np.zeros((0, 1), bool)
  best = []
  for record in reference:
    target = mask_of(record).reshape(-1)
    if len(ours_masks) == 0:
      best.append(0.0)
      continue
    inter = (ours_masks & target).sum(axis=1)
    union = (ours_masks | target).sum(axis=1)
    best.append(float(np.max(inter / np.maximum(union, 1))))
  best = np.array(best)
  return {"matched": int((best >= iou_thresh).sum()), "reference": len(reference), "mean_best_iou": float(best.mean())}


def calibrate_thresholds(model, params, image: np.ndarray, points_per_side: int, points_per_batch: int,
                         keep_fraction: float, stability_score_offset: float) -> tuple[float, float]:
  """Thresholds at which about ``keep_fraction`` of the candidates pass both filters (random weights only)."""
  height, width = image.shape[:2]
  embedding = ev.embed_image(model, params, image)
  points = ev.build_point_grid(points_per_side) * np.array([width, height])
  ious, stabilities = [], []
  for start in range(0, len(points), points_per_batch):
    chunk = np.zeros((points_per_batch, 1, 2), np.float32)
    part = points[start:start + points_per_batch]
    chunk[:len(part), 0] = part
    low_res, iou = ev._decode_any(model, params, embedding, chunk, np.ones((points_per_batch, 1), np.float32),  # pylint: disable=protected-access
                                  jnp.array([height, width]), True)
    ious.append(np.asarray(iou)[:len(part)].reshape(-1))
    stabilities.append(np.asarray(ev.stability_score(low_res, 0.0, stability_score_offset))[:len(part)].reshape(-1))
  ious, stabilities = np.concatenate(ious), np.concatenate(stabilities)
  # Twice the fraction pass the IoU filter, half of those the stability filter.
  iou_thresh = float(np.quantile(ious, 1.0 - min(1.0, 2 * keep_fraction)))
  passing = stabilities[ious > iou_thresh]
  return iou_thresh, float(np.quantile(passing, 0.5)) if len(passing) else 0.0


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def run_benchmark(model, params, image: np.ndarray, grids: Sequence[int], points_per_batch: int = 64,
                  pred_iou_thresh: Optional[float] = None, stability_score_thresh: Optional[float] = None,
                  stability_score_offset: float = 1.0, keep_fraction: float = 0.1, repeats: int = 1,
                  skip_naive_above: int = 0, log=print) -> list[dict]:
  """Times both implementations per grid; thresholds default to SAM's, or calibrated when given as None."""
  image = to_rgb_uint8(image)
  rows = []
  for grid in grids:
    iou_thresh, stab_thresh = pred_iou_thresh, stability_score_thresh
    if iou_thresh is None or stab_thresh is None:
      calibrated = calibrate_thresholds(model, params, image, grid, points_per_batch, keep_fraction,
                                        stability_score_offset)
      iou_thresh = calibrated[0] if iou_thresh is None else iou_thresh
      stab_thresh = calibrated[1] if stab_thresh is None else stab_thresh
    settings = dict(points_per_batch=points_per_batch, pred_iou_thresh=iou_thresh,
                    stability_score_thresh=stab_thresh, stability_score_offset=stability_score_offset)
    generator = ev.EfficientSamAutomaticMaskGenerator(model, params, points_per_side=grid, **settings)
    generator.warm_up(image.shape[:2])  # compiles the batch stage and the upsampling
    ours, ours_seconds = min((_timed(lambda: generator.generate(image)) for _ in range(repeats)), key=lambda r: r[1])
    row = {"grid": grid, "pred_iou_thresh": iou_thresh, "stability_score_thresh": stab_thresh,
           "ours_seconds": ours_seconds, "ours_masks": len(ours), "ours_stages": dict(generator.last_stats)}
    if skip_naive_above and grid > skip_naive_above:
      log(f"grid {grid}: ours {ours_seconds:.2f} s, {len(ours)} masks; naive skipped (--skip-naive-above)")
      rows.append(row)
      continue
    naive_settings = dict(settings, points_per_side=1)
    naive_segment_everything(model, params, image, **naive_settings)  # compiles full-res upsampling
    naive, naive_seconds = min((_timed(lambda: naive_segment_everything(model, params, image, points_per_side=grid,
                                                                         **settings)) for _ in range(repeats)),
                               key=lambda r: r[1])
    agreement = match_records(ours, naive)
    row.update(naive_seconds=naive_seconds, naive_masks=len(naive), ratio=naive_seconds / ours_seconds,
               agreement=agreement)
    log(f"grid {grid}×{grid} ({3 * grid * grid} candidates), thresholds IoU > {iou_thresh:.4g}, "
        f"stability ≥ {stab_thresh:.4g}: naive {naive_seconds:.2f} s ({len(naive)} masks), "
        f"ours {ours_seconds:.2f} s ({len(ours)} masks), ratio {naive_seconds / ours_seconds:.1f}×; "
        f"ours' stages {generator.last_stats}; {agreement['matched']}/{agreement['reference']} naive masks "
        f"matched at IoU ≥ 0.9 (mean best IoU {agreement['mean_best_iou']})")
    rows.append(row)
  return rows


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m efficientsam_jax.inference.everything_benchmark",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", help="EfficientSAM weights directory (default: random weights)")
  parser.add_argument("--variant", default="ti", help="random-weight model size when no --checkpoint (ti, s, b)")
  parser.add_argument("--image", help="image file (default: scikit-image's astronaut resized to 640×480)")
  parser.add_argument("--grids", default="16,32", help="points per side, comma-separated")
  parser.add_argument("--points-per-batch", type=int, default=64)
  parser.add_argument("--pred-iou-thresh", type=float, default=None,
                      help="default: SAM's 0.88 with a checkpoint, calibrated with random weights")
  parser.add_argument("--stability-score-thresh", type=float, default=None,
                      help="default: SAM's 0.95 with a checkpoint, calibrated with random weights")
  parser.add_argument("--keep-fraction", type=float, default=0.1,
                      help="random weights: fraction of candidates that pass each calibrated filter")
  parser.add_argument("--repeats", type=int, default=1, help="timed runs per implementation (best is kept)")
  parser.add_argument("--skip-naive-above", type=int, default=0, help="do not run the naive path above this grid")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parse_args(argv)

  from efficientsam_jax.common.images import load_rgb  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.models.efficient_sam import EfficientSamConfig, init_params  # pylint: disable=import-outside-toplevel
  if args.checkpoint:
    from efficientsam_jax.models.pretrained import load_pretrained  # pylint: disable=import-outside-toplevel
    model, params = load_pretrained(args.checkpoint)
    name = args.checkpoint
    iou_thresh = 0.88 if args.pred_iou_thresh is None else args.pred_iou_thresh
    stab_thresh = 0.95 if args.stability_score_thresh is None else args.stability_score_thresh
  else:
    model = EfficientSam(EfficientSamConfig.from_variant(args.variant))
    params = init_params(model, jax.random.PRNGKey(0))
    name = f"EfficientSAM-{args.variant} with RANDOM weights"
    iou_thresh, stab_thresh = args.pred_iou_thresh, args.stability_score_thresh
  if args.image:
    image = load_rgb(args.image)
  else:
    import skimage.data  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    image = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((640, 480), Image.BILINEAR))
  grids = [int(g) for g in args.grids.split(",") if g.strip()]
  print(f"model: {name}; image {image.shape[0]}×{image.shape[1]}; device: {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); points per batch {args.points_per_batch}")
  rows = run_benchmark(model, params, image, grids, args.points_per_batch, iou_thresh, stab_thresh,
                       keep_fraction=args.keep_fraction, repeats=args.repeats,
                       skip_naive_above=args.skip_naive_above)
  print(f"{'grid':>6} {'naive s':>9} {'ours s':>9} {'ratio':>7} {'naive masks':>12} {'our masks':>10}")
  for row in rows:
    naive = f"{row['naive_seconds']:9.2f}" if "naive_seconds" in row else f"{'-':>9}"
    ratio = f"{row['ratio']:6.1f}×" if "ratio" in row else f"{'-':>7}"
    print(f"{row['grid']:>6} {naive} {row['ours_seconds']:9.2f} {ratio} {row.get('naive_masks', '-'):>12} "
          f"{row['ours_masks']:>10}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
