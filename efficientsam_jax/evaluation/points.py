"""Single-point valid-mask evaluation (the paper's Table 4): mIoU for box, 1-click and 3-click prompts.

For every non-crowd GT mask of a COCO-format set: "box" prompts with the GT box,
"1click" with a point drawn uniformly inside the mask (seeded per object),
"3click" adds two points, each at the centre of the largest error region of the
previous best mask (positive for missed foreground, negative for a false
positive). The most confident of the three output masks is scored. One encoder
pass per image; all objects of an image are decoded together per prompt round.

    python -m efficientsam_jax.main --config=configs/eval_points.py --workdir=runs/points \\
        --config.data.annotations=instances_val2017.json --config.data.images=val2017 \\
        --config.model.checkpoint=weights/efficientsam_ti

Writes per-image results (``points_results/``, resumable), ``metrics.json`` and prints a table.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from efficientsam_jax.common.multihost import barrier
from efficientsam_jax.evaluation import runner
from efficientsam_jax.evaluation.coco import (SIZE_BUCKETS, GtObject, image_objects, mask_iou,
                                              next_click, object_rng, random_point_in_mask, summarize_miou)
from efficientsam_jax.evaluation.segmenter import LazySegmenter, Segmenter

PROMPTS = ("box", "1click", "3click")
PROMPT_TITLES = {"box": "box", "1click": "1 click", "3click": "3 clicks"}


def evaluate_objects(segmenter: Segmenter, image: np.ndarray, objects: list[GtObject], prompts: tuple[str, ...],
                     seed: int, image_id: int) -> list[dict]:
  """Per-object results {"id", "area", "iou": {prompt: IoU}, "score": {prompt: predicted IoU}, "clicks"}."""
  unknown = sorted(set(prompts) - set(PROMPTS))
  if unknown:
    raise ValueError(f"unknown prompts {unknown}; known: {list(PROMPTS)}")
  results = [{"id": o.annotation_id, "area": o.area, "iou": {}, "score": {}} for o in objects]
  if not objects:
    return results
  segmenter.set_image(image)
  if "box" in prompts:
    masks, scores = segmenter.best_masks(boxes=np.stack([o.box for o in objects]))
    for result, obj, mask, score in zip(results, objects, masks, scores):
      result["iou"]["box"], result["score"]["box"] = mask_iou(mask, obj.mask), float(score)
  if "1click" not in prompts and "3click" not in prompts:
    return results
  clicks = [[(*random_point_in_mask(o.mask, object_rng(seed, image_id, o.annotation_id)), 1)] for o in objects]
  active = list(range(len(objects)))
  last_masks: list[Optional[np.ndarray]] = [None] * len(objects)
  last_scores = np.zeros(len(objects))
  rounds = 3 if "3click" in prompts else 1
  for round_index in range(1, rounds + 1):
    if active:
      points = np.array([[c[:2] for c in clicks[i]] for i in active], np.float64)
      labels = np.array([[c[2] for c in clicks[i]] for i in active], np.float64)
      masks, scores = segmenter.best_masks(points, labels)
      for i, mask, score in zip(active, masks, scores):
        last_masks[i], last_scores[i] = mask, float(score)
    if round_index == 1 and "1click" in prompts:
      for i, result in enumerate(results):
        result["iou"]["1click"] = mask_iou(last_masks[i], objects[i].mask)
        result["score"]["1click"] = float(last_scores[i])
    if round_index == rounds:
      break
    still_wrong = []
    for i in active:
      click = next_click(last_masks[i], objects[i].mask)
      if click is not None:  # An exact mask needs no more clicks; it stays as it is.
        clicks[i].append((float(click[0][0]), float(click[0][1]), int(click[1])))
        still_wrong.append(i)
    active = still_wrong
  if "3click" in prompts:
    for i, result in enumerate(results):
      result["iou"]["3click"] = mask_iou(last_masks[i], objects[i].mask)
      result["score"]["3click"] = float(last_scores[i])
  for result, object_clicks in zip(results, clicks):
    result["clicks"] = [[round(x, 2), round(y, 2), label] for x, y, label in object_clicks]
  return results


def format_table(summary: dict, prompts: tuple[str, ...]) -> str:
  """mIoU (%) per prompt: all, small, medium, large, with the object counts."""
  counts = summary["counts"]
  header = f"{'prompt':<10}" + "".join(f"{b:>10}" for b in ("all",) + SIZE_BUCKETS)
  lines = [header, f"{'objects':<10}" + "".join(f"{counts[b]:>10d}" for b in ("all",) + SIZE_BUCKETS)]
  for prompt in prompts:
    values = summary["miou"][prompt]
    cells = "".join(f"{'-' if values[b] is None else f'{100 * values[b]:.1f}':>10}" for b in ("all",) + SIZE_BUCKETS)
    lines.append(f"{PROMPT_TITLES[prompt]:<10}{cells}")
  return "\n".join(lines)


def run_eval_points(config, workdir: str, *, segmenter: Optional[Segmenter] = None,
                    process_index: Optional[int] = None, process_count: Optional[int] = None) -> Optional[dict]:
  """The Table 4 job; returns the metrics on process 0 (None on the others)."""
  prompts = tuple(p.strip() for p in config.eval.prompts.split(",") if p.strip())
  unknown = sorted(set(prompts) - set(PROMPTS))
  if unknown or not prompts:
    raise ValueError(f"config.eval.prompts {config.eval.prompts!r}: use a comma-separated subset of {list(PROMPTS)}")
  paths = runner.resolve_data(config, workdir)
  data = runner.load_data(paths, config.data.kind)
  image_ids = runner.select_images(data, config.data.max_images)
  index, count = runner.processes(process_index, process_count)
  settings = {"task": "eval_points", "annotations": os.path.abspath(paths["annotations"]), "prompts": prompts,
              "seed": config.eval.seed, "checkpoint": config.model.get("checkpoint", ""),
              "dtype": config.model.get("dtype", "float32"), "max_images": config.data.max_images}
  store = runner.ResultStore(os.path.join(workdir, "points_results"), settings)
  lazy = LazySegmenter(config, segmenter)

  def process_image(image_id: int, image, issues: dict) -> list:
    objects = image_objects(data, image_id, image.shape[0], image.shape[1], issues)
    return evaluate_objects(lazy.get(), image, objects, prompts, config.eval.seed, image_id) if objects else []

  timing = runner.run_images(store, image_ids[index::count], process_image, "objects",
                             f"eval_points [{index}/{count}]", paths["images"], data)
  barrier("eval_points_done")
  if index != 0:
    return None
  results = store.read_all(image_ids)
  objects, issues = [], {}
  for payload in results.values():
    objects.extend(payload["objects"])
    runner.add_counts(issues, payload["issues"])
  summary = summarize_miou(objects, prompts)
  metrics = {"task": "eval_points", "dataset": data.kind, "annotations": paths["annotations"],
             "num_images": len(image_ids), "num_objects": len(objects), **summary,
             "bad_annotations": issues, "prompts": list(prompts), "seed": config.eval.seed,
             "checkpoint": config.model.get("checkpoint", ""), "untrained": lazy.untrained,
             "timing": timing}
  print(format_table(summary, prompts))
  if issues:
    print("bad annotations (counted, not fatal): " + ", ".join(f"{k} {v}" for k, v in sorted(issues.items())))
  if metrics["untrained"]:
    print("NOTE: the model has RANDOM, UNTRAINED weights; these numbers only show that the pipeline runs.")
  runner.write_json(os.path.join(workdir, "metrics.json"), metrics)
  print(f"wrote {os.path.join(workdir, 'metrics.json')}")
  return metrics
