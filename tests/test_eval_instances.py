"""Zero-shot instance segmentation (Table 5) on generated COCO-format data, scored with pycocotools."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import load_config
from efficientsam_jax import main
from efficientsam_jax.evaluation import coco, instances
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


def test_lvis_scoring_runs_lvis_eval_or_says_how_to_install_it(tmp_path):
  clean = write_synthetic_dataset(str(tmp_path / "clean"), bad_annotations=False)
  data = json.loads(open(clean["annotations"]).read())
  for category, frequency in zip(data["categories"], "rcf"):  # LVIS's extra fields
    category.update(frequency=frequency, image_count=4)
  for image in data["images"]:
    image.update(neg_category_ids=[], not_exhaustive_category_ids=[])
  path = tmp_path / "lvis.json"
  path.write_text(json.dumps(data))
  assert coco.load_coco(str(path)).kind == "lvis"
  perfect = []
  for annotation in data["annotations"]:
    image = next(i for i in data["images"] if i["id"] == annotation["image_id"])
    mask = coco.decode_segmentation(annotation["segmentation"], image["height"], image["width"])
    perfect.append({"image_id": image["id"], "category_id": annotation["category_id"], "score": 1.0,
                    "segmentation": instances.encode_rle(mask[None])[0]})
  try:
    import lvis  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="pip install lvis"):
      instances.evaluate_lvis_segm(str(path), perfect)
    return
  scores = instances.evaluate_lvis_segm(str(path), perfect)
  assert scores == pytest.approx({name: 1.0 for name in instances.LVIS_METRICS}, abs=1e-12)


def test_smoke_config_runs_the_real_model_and_resumes(tmp_path, capsys):
  config = load_config("eval_instances", "smoke")
  main.run(config, str(tmp_path))
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["untrained"] and metrics["num_images"] == 4 and metrics["num_masks"] == 16
  assert set(metrics["segm"]) == set(instances.COCO_METRICS)
  assert "UNTRAINED" in capsys.readouterr().out
  main.run(config, str(tmp_path))  # resumes: nothing left to run
  assert "0 to go" in capsys.readouterr().out
