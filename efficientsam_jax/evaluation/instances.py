"""Zero-shot instance segmentation (the paper's Table 5): detector boxes → masks → COCO/LVIS mask AP.

Each box of a detections file in COCO results format (e.g. ViTDet-H's) prompts
EfficientSAM; the mask with the highest predicted IoU is kept with the
detector's score and category, written as COCO results JSON (compressed RLE)
and scored with pycocotools' ``COCOeval`` (``segm``), or for LVIS with its federated
evaluation (``evaluation/lvis.py``, the same numbers as the ``lvis`` package's ``LVISEval``). With
``prompts.boxes = "gt"`` the GT boxes are the prompts (the oracle-box numbers).

    python -m efficientsam_jax.main --config=configs/eval_instances.py --workdir=runs/instances \\
        --config.data.annotations=instances_val2017.json --config.data.images=val2017 \\
        --config.prompts.boxes=vitdet_h_boxes.json --config.model.checkpoint=weights/efficientsam_ti
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Iterator, Optional, Union

import numpy as np

from efficientsam_jax.common.files import atomic_file
from efficientsam_jax.common.multihost import barrier
from efficientsam_jax.evaluation import lvis, runner
from efficientsam_jax.evaluation.coco import CocoData, gt_box_xyxy, read_json, segmentation_is_usable
from efficientsam_jax.evaluation.segmenter import LazySegmenter, Segmenter
from efficientsam_jax.inference.everything import encode_rle

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = lvis.METRICS  # COCO_METRICS + APr, APc, APf
RESULTS_FILE = "segm_results.json"


# -- prompts -----------------------------------------------------------------------


def load_detections(path: str, data: CocoData, issues: dict[str, int], min_score: float = 0.0,
                    max_per_image: int = 0) -> dict[int, list[dict]]:
  """A COCO results file of boxes → {image id: [{"bbox" XYWH, "score", "category_id"}]}, best score first.

  Detections of images not in the annotations are counted ("detection_unknown_image") and dropped.
  """
  detections = read_json(path, "detections file")
  if not isinstance(detections, list):
    raise ValueError(f"detections file {path!r} must hold a JSON list in COCO results format "
                     f"([{{'image_id', 'category_id', 'bbox', 'score'}}, ...]), got {type(detections).__name__}")
  per_image: dict[int, list[dict]] = {}
  for position, detection in enumerate(detections):
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in detection]
    if missing:
      raise ValueError(f"detections file {path!r}: entry {position} lacks {missing}")
    image_id = int(detection["image_id"])
    if image_id not in data.images:
      runner.add_counts(issues, {"detection_unknown_image": 1})
      continue
    if float(detection["score"]) < min_score:
      continue
    per_image.setdefault(image_id, []).append(
        {"bbox": detection["bbox"], "score": float(detection["score"]), "category_id": int(detection["category_id"])})
  for image_id, entries in per_image.items():
    entries.sort(key=lambda d: -d["score"])
    if max_per_image and max_per_image > 0:
      del entries[max_per_image:]
  return per_image


def gt_prompts(data: CocoData) -> dict[int, list[dict]]:
  """Oracle prompts: every non-crowd GT box, score 1."""
  return {image_id: [{"bbox": a["bbox"], "score": 1.0, "category_id": int(a["category_id"])}
                     for a in annotations if not a.get("iscrowd", 0) and "bbox" in a]
          for image_id, annotations in data.annotations.items()}


def segment_boxes(segmenter: Segmenter, image: np.ndarray, image_id: int, prompts: list[dict],
                  issues: dict[str, int]) -> list[dict]:
  """COCO results (RLE segmentation, detector score and category) for the box prompts of one image."""
  height, width = image.shape[:2]
  boxes, kept = [], []
  for prompt in prompts:
    box, status = gt_box_xyxy(prompt, height, width)
    if box is None:
      runner.add_counts(issues, {"box_outside_image" if status == "outside" else "box_malformed": 1})
      continue
    boxes.append(box)
    kept.append(prompt)
  if not kept:
    return []
  segmenter.set_image(image)
  masks, _ = segmenter.best_masks(boxes=np.stack(boxes))
  return [{"image_id": int(image_id), "category_id": p["category_id"], "segmentation": rle, "score": p["score"]}
          for p, rle in zip(kept, encode_rle(masks))]


# -- scoring -----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(enabled: bool = True) -> Iterator[None]:
  """Silences pycocotools' progress prints (its summary is printed by us)."""
  if not enabled:
    yield
    return
  with contextlib.redirect_stdout(io.StringIO()):
    yield


def usable_ground_truth(annotations: str, issues: Optional[dict[str, int]] = None) -> dict:
  """The annotation file's contents without GT annotations whose segmentation pycocotools cannot read.

  Such annotations (e.g. an empty polygon list) crash COCOeval; they are counted in ``issues``
  ("gt_unusable_segmentation") and dropped. Other files pass unchanged.
  """
  data = read_json(annotations, "annotation file")
  usable = [a for a in data.get("annotations", []) if segmentation_is_usable(a.get("segmentation"))]
  dropped = len(data.get("annotations", [])) - len(usable)
  if dropped and issues is not None:
    runner.add_counts(issues, {"gt_unusable_segmentation": dropped})
  return dict(data, annotations=usable)


def evaluate_coco_segm(annotations: str, results: Union[str, list], image_ids: Optional[list[int]] = None,
                       verbose: bool = False, issues: Optional[dict[str, int]] = None) -> dict:
  """COCOeval ``segm`` of a results file or list on ``image_ids`` (default all): {AP, AP50, AP75, APs, APm, APl}.

  Values are COCOeval's ``stats`` (fractions; -1 where a size bucket has no GT). Unreadable GT
  segmentations are dropped first (see ``usable_ground_truth``).
  """
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  from pycocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel
  if isinstance(results, str):
    results = read_json(results, "results file")
  with _quiet(not verbose):
    gt = COCO()
    gt.dataset = usable_ground_truth(annotations, issues)
    gt.createIndex()
  if not results:
    return {name: 0.0 for name in COCO_METRICS}
  with _quiet(not verbose):
    detections = gt.loadRes(results)
    evaluator = COCOeval(gt, detections, "segm")
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      evaluator.summarize()
  if verbose:
    print(summary.getvalue(), end="")
  return {name: float(value) for name, value in zip(COCO_METRICS, evaluator.stats[:6])}


def evaluate_lvis_segm(annotations: str, results: Union[str, list], image_ids: Optional[list[int]] = None,
                       issues: Optional[dict[str, int]] = None) -> dict:
  """LVIS ``segm`` (federated, ``evaluation/lvis.py``): {AP, AP50, AP75, APs, APm, APl, APr, APc, APf}.

  Unreadable GT segmentations are dropped first (see ``usable_ground_truth``).
  """
  if isinstance(results, str):
    results = read_json(results, "results file")
  if not results:
    return {name: 0.0 for name in LVIS_METRICS}
  return lvis.lvis_segm_scores(usable_ground_truth(annotations, issues), results, image_ids)


def format_table(scores: dict) -> str:
  names = [n for n in LVIS_METRICS if n in scores]
  return "".join(f"{n:>8}" for n in names) + "\n" + "".join(
      f"{100 * scores[n]:>8.1f}" if scores[n] >= 0 else f"{'-':>8}" for n in names)


# -- the job -----------------------------------------------------------------------


def run_eval_instances(config, workdir: str, *, segmenter: Optional[Segmenter] = None,
                       process_index: Optional[int] = None, process_count: Optional[int] = None) -> Optional[dict]:
  """The Table 5 job; returns the metrics on process 0 (None on the others)."""
  paths = runner.resolve_data(config, workdir)
  data = runner.load_data(paths, config.data.kind)
  image_ids = runner.select_images(data, config.data.max_images)
  index, count = runner.processes(process_index, process_count)
  boxes_source = config.prompts.boxes
  if config.data.get("synthetic") and boxes_source == "synthetic":
    boxes_source = paths["detections"]
  load_issues: dict[str, int] = {}
  if boxes_source == "gt":
    prompts = gt_prompts(data)
  else:
    prompts = load_detections(boxes_source, data, load_issues, config.prompts.min_score,
                              config.prompts.max_per_image)
  settings = {"task": "eval_instances", "annotations": os.path.abspath(paths["annotations"]),
              "boxes": boxes_source if boxes_source == "gt" else os.path.abspath(boxes_source),
              "min_score": config.prompts.min_score, "max_per_image": config.prompts.max_per_image,
              "checkpoint": config.model.get("checkpoint", ""), "dtype": config.model.get("dtype", "float32"),
              "max_images": config.data.max_images}
  store = runner.ResultStore(os.path.join(workdir, "instances_results"), settings)
  lazy = LazySegmenter(config, segmenter)

  def process_image(image_id: int, image, issues: dict) -> list:
    image_prompts = prompts.get(image_id, [])
    return segment_boxes(lazy.get(), image, image_id, image_prompts, issues) if image_prompts else []

  timing = runner.run_images(store, image_ids[index::count], process_image, "results",
                             f"eval_instances [{index}/{count}]", paths["images"], data)
  barrier("eval_instances_done")
  if index != 0:
    return None
  results, issues = [], dict(load_issues)
  for payload in store.read_all(image_ids).values():
    results.extend(payload["results"])
    runner.add_counts(issues, payload["issues"])
  results_path = os.path.join(workdir, RESULTS_FILE)
  with atomic_file(results_path) as tmp, open(tmp, "w") as f:
    json.dump(results, f)
  print(f"wrote {results_path} ({len(results)} masks)")
  if data.kind == "lvis":
    scores = evaluate_lvis_segm(paths["annotations"], results, image_ids, issues=issues)
  else:
    scores = evaluate_coco_segm(paths["annotations"], results, image_ids, verbose=True, issues=issues)
  untrained = lazy.untrained
  metrics = {"task": "eval_instances", "dataset": data.kind, "annotations": paths["annotations"],
             "boxes": boxes_source, "num_images": len(image_ids), "num_masks": len(results), "segm": scores,
             "bad_annotations": issues, "results_file": results_path,
             "checkpoint": config.model.get("checkpoint", ""), "untrained": untrained, "timing": timing}
  print(f"mask AP (%), {data.kind}, prompts: {boxes_source}")
  print(format_table(scores))
  if issues:
    print("bad prompts/annotations (counted, not fatal): " + ", ".join(f"{k} {v}" for k, v in sorted(issues.items())))
  if untrained:
    print("NOTE: the model has RANDOM, UNTRAINED weights; these numbers only show that the pipeline runs.")
  runner.write_json(os.path.join(workdir, "metrics.json"), metrics)
  print(f"wrote {os.path.join(workdir, 'metrics.json')}")
  return metrics
