"""Zero-shot instance segmentation (Table 5) on generated COCO-format data, scored with pycocotools."""

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import load_config
from efficientsam_jax import main
from efficientsam_jax.evaluation import coco, instances, lvis
from efficientsam_jax.evaluation.synthetic import write_synthetic_dataset


class BoxOracle:
  """Perfect masks: the GT mask whose box equals the prompt."""

  def __init__(self, data):
    self.data = data

  def set_image(self, image):
    for image_id, entry in self.data.images.items():
      if (entry["height"], entry["width"]) == image.shape[:2]:
        self.objects = coco.image_objects(self.data, image_id, *image.shape[:2], {})

  def best_masks(self, points=None, labels=None, boxes=None):
    masks = [next(o.mask for o in self.objects if np.allclose(o.box, box)) for box in boxes]
    return np.stack(masks), np.ones(len(masks), np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return write_synthetic_dataset(str(tmp_path_factory.mktemp("coco")))


def _config(dataset, boxes):
  config = load_config("eval_instances")
  config.data.annotations, config.data.images = dataset["annotations"], dataset["images"]
  config.prompts.boxes = boxes
  return config


def _pycocotools_segm(annotations, results_path):
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(annotations)
    evaluator = COCOeval(gt, gt.loadRes(results_path), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator.stats[:6]


def test_gt_boxes_with_perfect_masks_give_ap_one(tmp_path):
  clean = write_synthetic_dataset(str(tmp_path / "clean"), bad_annotations=False)
  data = coco.load_coco(clean["annotations"])
  metrics = instances.run_eval_instances(_config(clean, "gt"), str(tmp_path / "run"), segmenter=BoxOracle(data))
  assert metrics["segm"] == pytest.approx({name: 1.0 for name in instances.COCO_METRICS}, abs=1e-12)
  assert metrics["bad_annotations"] == {}
  results = json.loads((tmp_path / "run" / instances.RESULTS_FILE).read_text())
  assert len(results) == metrics["num_masks"] == 12
  assert all(isinstance(r["segmentation"]["counts"], str) and r["score"] == 1.0 for r in results)


class ErodedOracle(BoxOracle):
  """Imperfect masks: the GT mask whose box is nearest the (jittered) detection, eroded; empty for false positives."""

  def best_masks(self, points=None, labels=None, boxes=None):
    from scipy import ndimage
    outputs = []
    for box in boxes:
      obj = min(self.objects, key=lambda o: np.abs(o.box - box).sum())
      outputs.append(ndimage.binary_erosion(obj.mask, iterations=2) if np.abs(obj.box - box).sum() < 12
                     else np.zeros_like(obj.mask))
    return np.stack(outputs), np.ones(len(outputs), np.float32)


def test_project_score_equals_pycocotools_on_the_same_file(tmp_path):
  clean = write_synthetic_dataset(str(tmp_path / "clean"), bad_annotations=False)
  metrics = instances.run_eval_instances(_config(clean, clean["detections"]), str(tmp_path / "run"),
                                         segmenter=ErodedOracle(coco.load_coco(clean["annotations"])))
  results_path = str(tmp_path / "run" / instances.RESULTS_FILE)
  reference = _pycocotools_segm(clean["annotations"], results_path)
  np.testing.assert_allclose([metrics["segm"][n] for n in instances.COCO_METRICS], reference, atol=1e-12)
  assert 0.0 < metrics["segm"]["AP"] < 1.0
  # The detector's scores are kept (the false positives keep their low score).
  results = json.loads(open(results_path).read())
  assert sorted(r["score"] for r in results)[:4] == [0.05] * 4
  # Scoring a subset of images equals COCOeval restricted to those images.
  subset = instances.evaluate_coco_segm(clean["annotations"], results_path, [1000, 1002])
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(clean["annotations"])
    evaluator = COCOeval(gt, gt.loadRes(results_path), "segm")
    evaluator.params.imgIds = [1000, 1002]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  np.testing.assert_allclose([subset[n] for n in instances.COCO_METRICS], evaluator.stats[:6], atol=1e-12)


def test_bad_annotations_are_counted_not_fatal(dataset, tmp_path):
  """pycocotools crashes on an empty GT segmentation; the project drops it and says so."""
  metrics = instances.run_eval_instances(_config(dataset, dataset["detections"]), str(tmp_path),
                                         segmenter=ErodedOracle(coco.load_coco(dataset["annotations"])))
  assert metrics["bad_annotations"] == {"gt_unusable_segmentation": 4}
  assert 0.0 < metrics["segm"]["AP"] < 1.0
  oracle = instances.run_eval_instances(_config(dataset, "gt"), str(tmp_path / "gt"),
                                        segmenter=ErodedOracle(coco.load_coco(dataset["annotations"])))
  assert oracle["bad_annotations"] == {"gt_unusable_segmentation": 4, "box_outside_image": 4}


def test_detections_are_checked_and_filtered(dataset, tmp_path):
  data = coco.load_coco(dataset["annotations"])
  detections = json.loads(open(dataset["detections"]).read())
  detections.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9})
  path = tmp_path / "dets.json"
  path.write_text(json.dumps(detections))
  issues = {}
  loaded = instances.load_detections(str(path), data, issues, min_score=0.1, max_per_image=2)
  assert issues == {"detection_unknown_image": 1}
  assert all(len(v) == 2 and v[0]["score"] >= v[1]["score"] >= 0.1 for v in loaded.values())
  path.write_text(json.dumps({"not": "a list"}))
  with pytest.raises(ValueError, match="COCO results format"):
    instances.load_detections(str(path), data, {})
  path.write_text(json.dumps([{"image_id": 1000, "bbox": [0, 0, 1, 1]}]))
  with pytest.raises(ValueError, match=r"entry 0 lacks \['category_id', 'score'\]"):
    instances.load_detections(str(path), data, {})


def _lvis_variant(tmp_path, neg=None, not_exhaustive=None, unlabeled=(), one_category=False):
  """The clean synthetic dataset as an LVIS file: frequencies r/c/f for categories 1/2/3, a category 4 without
  GT (frequency f), per-image negative / not-exhaustive label lists ({image id: [categories]}), without the
  ``unlabeled`` (image, category) annotations; ``one_category``: every object is category 1, no category 4."""
  clean = write_synthetic_dataset(str(tmp_path / "clean"), bad_annotations=False)
  data = json.loads(open(clean["annotations"]).read())
  data["annotations"] = [a for a in data["annotations"] if (a["image_id"], a["category_id"]) not in unlabeled]
  data["categories"].append({"id": 4, "name": "never"})
  for category, frequency in zip(data["categories"], "rcff"):  # LVIS's extra fields
    category.update(frequency=frequency, image_count=4)
  for image in data["images"]:
    image.update(neg_category_ids=(neg or {}).get(image["id"], []),
                 not_exhaustive_category_ids=(not_exhaustive or {}).get(image["id"], []))
  masks = {}
  for annotation in data["annotations"]:
    image = next(i for i in data["images"] if i["id"] == annotation["image_id"])
    masks[annotation["image_id"], annotation["category_id"]] = coco.decode_segmentation(
        annotation["segmentation"], image["height"], image["width"])
  if one_category:
    data["categories"] = data["categories"][:3]
    for annotation in data["annotations"]:
      annotation["category_id"] = 1
  path = tmp_path / "lvis.json"
  path.write_text(json.dumps(data))
  return str(path), data, masks


def _detection(image_id, category_id, mask, score):
  return {"image_id": image_id, "category_id": category_id, "score": score,
          "segmentation": instances.encode_rle(mask[None])[0]}


def test_lvis_federated_rules(tmp_path):
  """Detections of unjudged labels are dropped, unmatched ones of not-exhaustive labels ignored, negatives
  count as false positives; exact AP values."""
  path, data, masks = _lvis_variant(tmp_path, neg={1000: [4], 1001: [4]}, not_exhaustive={1000: [1]},
                                    unlabeled=[(1002, 3)])
  assert coco.load_coco(path).kind == "lvis"
  perfect = [_detection(i, c, m, 1.0) for (i, c), m in masks.items() if (i, c) != (1002, 3)]
  assert instances.evaluate_lvis_segm(path, perfect) == pytest.approx(
      {name: 1.0 for name in instances.LVIS_METRICS}, abs=1e-12)
  harmless = [
      _detection(1002, 3, masks[1002, 1], 2.0),  # image 1002 has no label for category 3: dropped
      _detection(1000, 1, masks[1000, 3], 2.0),  # matches no box GT, but image 1000's boxes are not exhaustive
      _detection(1000, 4, masks[1000, 2], 2.0),  # a verified-absent category, but one without any GT to score
  ]
  assert instances.evaluate_lvis_segm(path, perfect + harmless) == pytest.approx(
      {name: 1.0 for name in instances.LVIS_METRICS}, abs=1e-12)
  # A false positive ranked first in category 2 (4 GT blobs, all large): its precision is 4/5 at every recall,
  # in the "all" range; the FP is small, so the "large" range ignores it.
  wrong = _detection(1003, 2, masks[1003, 3], 2.0)
  scores = instances.evaluate_lvis_segm(path, perfect + harmless + [wrong])
  expected = {name: 1.0 for name in instances.LVIS_METRICS}
  expected.update(AP=(2 + 0.8) / 3, AP50=(2 + 0.8) / 3, AP75=(2 + 0.8) / 3, APc=0.8)
  assert scores == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("one_category", [False, True])
def test_lvis_equals_cocoeval_when_every_label_is_verified(tmp_path, one_category):
  """With every category of every image judged and no more than 100 detections per image, LVIS's evaluation
  is COCO's: our numbers equal pycocotools' COCOeval, per frequency group too. ``one_category``: three objects
  of one category per image (small, medium, large: the area ranges then ignore some GT of a cell)."""
  path, data, masks = _lvis_variant(tmp_path, neg={i: [2, 3] for i in range(1000, 1004)} if one_category else None,
                                    one_category=one_category)
  if not one_category:  # category 4 would have to be verified absent in every image
    data["categories"] = data["categories"][:3]
    Path(path).write_text(json.dumps(data))
  rng = np.random.default_rng(0)
  results = []
  for (image_id, category), mask in masks.items():
    for _ in range(3):  # shifted copies, from good to poor, random scores
      shifted = np.roll(mask, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
      label = 1 if one_category else int(rng.choice([category, category, 1 + category % 3]))
      results.append(_detection(image_id, label, shifted, float(np.round(rng.random(), 2))))
  ours = instances.evaluate_lvis_segm(path, results)

  def cocoeval(category_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
      gt = COCO(path)
      evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "segm")  # loadRes writes into its input
      if category_ids:
        evaluator.params.catIds = category_ids
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    return evaluator.stats

  reference = dict(zip(instances.COCO_METRICS, cocoeval()[:6]))
  reference.update(APr=cocoeval([1])[0], APc=cocoeval([2])[0], APf=cocoeval([3])[0])
  assert 0.1 < ours["AP"] < 0.9  # a real ranking, not a trivial one
  assert ours == pytest.approx(reference, abs=1e-12)


def test_job_scores_an_lvis_file_with_the_federated_evaluation(tmp_path):
  path, _, _ = _lvis_variant(tmp_path, neg={1000: [4]})
  clean = write_synthetic_dataset(str(tmp_path / "clean"), bad_annotations=False)
  config = _config({**clean, "annotations": path}, "gt")
  metrics = instances.run_eval_instances(config, str(tmp_path / "run"), segmenter=BoxOracle(coco.load_coco(path)))
  assert metrics["dataset"] == "lvis"
  assert metrics["segm"] == pytest.approx({name: 1.0 for name in instances.LVIS_METRICS}, abs=1e-12)


def test_lvis_matches_gt_inside_the_area_range_first():
  """A small GT inside a medium one, and a detection overlapping both (IoU 0.73 and 0.77): in the "small"
  range the medium GT is ignored, and the detection must take the small GT wherever its IoU passes (5 of the
  10 thresholds), as COCOeval does, not the ignored GT it overlaps more."""
  square = lambda x0, side: [float(v) for v in (x0, x0, x0 + side, x0, x0 + side, x0 + side, x0, x0 + side)]
  data = {"images": [{"id": 1, "height": 64, "width": 64, "neg_category_ids": [],
                      "not_exhaustive_category_ids": []}],
          "categories": [{"id": 1, "name": "square", "frequency": "f"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 1600.0, "segmentation": [square(0, 40)],
                           "bbox": [0, 0, 40, 40], "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "area": 900.0, "segmentation": [square(0, 30)],
                           "bbox": [0, 0, 30, 30], "iscrowd": 0}]}
  mask = np.zeros((64, 64), np.uint8)
  mask[:35, :35] = 1
  detection = [_detection(1, 1, mask, 0.9)]
  scores = lvis.lvis_segm_scores(copy.deepcopy(data), detection)
  assert scores["APs"] == pytest.approx(0.5, abs=1e-12)
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = copy.deepcopy(data)
    gt.createIndex()
    evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(detection)), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  assert [scores[name] for name in instances.COCO_METRICS] == pytest.approx(evaluator.stats[:6], abs=1e-12)


def test_smoke_config_runs_the_real_model_and_resumes(tmp_path, capsys):
  config = load_config("eval_instances", "smoke")
  main.run(config, str(tmp_path))
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["untrained"] and metrics["num_images"] == 4 and metrics["num_masks"] == 16
  assert set(metrics["segm"]) == set(instances.COCO_METRICS)
  assert "UNTRAINED" in capsys.readouterr().out
  main.run(config, str(tmp_path))  # resumes: nothing left to run
  assert "0 to go" in capsys.readouterr().out
