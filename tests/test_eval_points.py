"""Single-point valid-mask evaluation (Table 4) on generated COCO-format data."""

import json
import os

import numpy as np
import pytest

from conftest import load_config
from efficientsam_jax import main
from efficientsam_jax.evaluation import coco, points
from efficientsam_jax.evaluation.synthetic import write_synthetic_dataset


class OracleSegmenter:
  """Returns the GT mask of the object whose box (or first click) the prompt names: perfect predictions."""

  def __init__(self, data, folder):
    self.data, self.folder, self.calls = data, folder, []

  def set_image(self, image):
    self.image = image
    for image_id, entry in self.data.images.items():
      if (entry["height"], entry["width"]) == image.shape[:2]:
        self.objects = coco.image_objects(self.data, image_id, *image.shape[:2], {})

  def best_masks(self, points=None, labels=None, boxes=None):
    self.calls.append(len(boxes) if boxes is not None else len(points))
    masks = []
    for q in range(len(boxes) if boxes is not None else len(points)):
      if boxes is not None:
        match = [o for o in self.objects if np.allclose(o.box, boxes[q])]
      else:
        x, y = points[q][0]
        match = [o for o in self.objects if o.mask[int(y), int(x)]]
      masks.append(match[0].mask)
    return np.stack(masks), np.ones(len(masks), np.float32)


class HalfSegmenter(OracleSegmenter):
  """A known imperfect prediction: the left half (by columns of the box) of the GT mask."""

  def best_masks(self, points=None, labels=None, boxes=None):
    masks, scores = super().best_masks(points, labels, boxes)
    halves = []
    for mask in masks:
      xs = np.nonzero(mask.any(axis=0))[0]
      half = mask.copy()
      half[:, xs[0] + (xs[-1] - xs[0] + 1) // 2:] = False
      halves.append(half)
    return np.stack(halves), scores


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return write_synthetic_dataset(str(tmp_path_factory.mktemp("coco")))


def _config(dataset, **eval_overrides):
  config = load_config("eval_points")
  config.data.annotations, config.data.images = dataset["annotations"], dataset["images"]
  for key, value in eval_overrides.items():
    setattr(config.eval, key, value)
  return config


def test_miou_of_a_known_prediction_equals_the_hand_computed_value(dataset, tmp_path):
  data = coco.load_coco(dataset["annotations"])
  config = _config(dataset, prompts="box,1click")
  metrics = points.run_eval_points(config, str(tmp_path), segmenter=HalfSegmenter(data, dataset["images"]))
  expected = {"all": [], "small": [], "medium": [], "large": []}
  for image_id in data.image_ids:
    entry = data.images[image_id]
    for obj in coco.image_objects(data, image_id, entry["height"], entry["width"], {}):
      xs = np.nonzero(obj.mask.any(axis=0))[0]
      split = xs[0] + (xs[-1] - xs[0] + 1) // 2
      iou = obj.mask[:, :split].sum() / obj.mask.sum()  # the half is inside the mask: IoU = |half| / |mask|
      expected["all"].append(iou)
      expected[coco.size_bucket(obj.area)].append(iou)
  for bucket, values in expected.items():
    assert values, bucket  # the generated set has objects of every size
    assert metrics["miou"]["box"][bucket] == pytest.approx(np.mean(values), abs=1e-9)
  # Clicks land in the left or right half, but the half-mask segmenter gives the same masks.
  assert metrics["miou"]["1click"]["all"] == pytest.approx(np.mean(expected["all"]), abs=1e-9)
  assert metrics["counts"]["all"] == 12 and 0.3 < metrics["miou"]["box"]["all"] < 0.7


def test_perfect_predictions_give_miou_one_and_bad_annotations_are_counted(dataset, tmp_path):
  data = coco.load_coco(dataset["annotations"])
  segmenter = OracleSegmenter(data, dataset["images"])
  metrics = points.run_eval_points(_config(dataset), str(tmp_path), segmenter=segmenter)
  for prompt in ("box", "1click", "3click"):
    assert metrics["miou"][prompt] == {"all": 1.0, "small": 1.0, "medium": 1.0, "large": 1.0}
  assert metrics["bad_annotations"] == {"crowd": 4, "empty_segmentation": 4, "box_outside_image": 4}
  # One batched call per image and prompt round; exact masks need no further clicks.
  assert segmenter.calls == [3, 3] * 4
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["miou"] == metrics["miou"] and saved["num_images"] == 4


def test_clicks_are_seeded_and_go_to_the_largest_error_region():
  gt = np.zeros((20, 30), bool)
  gt[2:18, 2:20] = True
  prediction = gt.copy()
  prediction[2:18, 12:20] = False  # the right part is missed: a positive click at its centre
  prediction[0:3, 25:28] = True  # a small false positive
  click, label = coco.next_click(prediction, gt)
  assert label == 1 and click[0] in (15.5, 16.5) and 2 < click[1] < 18  # the middle columns of the miss
  prediction = gt.copy()
  prediction[5:15, 22:29] = True  # a larger false positive than any miss: a negative click
  click, label = coco.next_click(prediction, gt)
  assert label == 0 and 22 <= click[0] <= 29 and 5 <= click[1] <= 15
  assert coco.next_click(gt, gt) is None
  first = coco.random_point_in_mask(gt, coco.object_rng(0, 7, 9))
  assert first.tolist() == coco.random_point_in_mask(gt, coco.object_rng(0, 7, 9)).tolist()
  assert gt[int(first[1]), int(first[0])]


def test_resume_and_multi_process_split(dataset, tmp_path):
  data = coco.load_coco(dataset["annotations"])
  config = _config(dataset, prompts="box")
  segmenter = OracleSegmenter(data, dataset["images"])
  # Process 1 of 2 takes images 1 and 3 and does not merge.
  assert points.run_eval_points(config, str(tmp_path), segmenter=segmenter, process_index=1, process_count=2) is None
  finished = sorted(os.listdir(tmp_path / "points_results"))
  assert finished == ["1001.json", "1003.json", "run.json"]
  # Process 0 does its share, then merges everything.
  metrics = points.run_eval_points(config, str(tmp_path), segmenter=segmenter, process_index=0, process_count=2)
  assert metrics["num_images"] == 4 and metrics["miou"]["box"]["all"] == 1.0
  # A restart skips finished images entirely.
  segmenter.calls.clear()
  points.run_eval_points(config, str(tmp_path), segmenter=segmenter)
  assert segmenter.calls == []
  # Results of a different run are not mixed in.
  with pytest.raises(ValueError, match="different run.*prompts"):
    points.run_eval_points(_config(dataset, prompts="1click"), str(tmp_path), segmenter=segmenter)


def test_bad_inputs_are_clear_errors(dataset, tmp_path):
  config = _config(dataset)
  config.data.annotations = str(tmp_path / "missing.json")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    points.run_eval_points(config, str(tmp_path / "a"))
  (tmp_path / "broken.json").write_text("{not json")
  config.data.annotations = str(tmp_path / "broken.json")
  with pytest.raises(ValueError, match="not valid JSON"):
    points.run_eval_points(config, str(tmp_path / "b"))
  (tmp_path / "noimages.json").write_text(json.dumps({"annotations": []}))
  config.data.annotations = str(tmp_path / "noimages.json")
  with pytest.raises(ValueError, match="no list 'images'"):
    points.run_eval_points(config, str(tmp_path / "c"))
  config = _config(dataset)
  config.data.images = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="image folder"):
    points.run_eval_points(config, str(tmp_path / "d"))
  with pytest.raises(ValueError, match="config.eval.prompts"):
    points.run_eval_points(_config(dataset, prompts="box,5click"), str(tmp_path / "e"))


def test_smoke_config_runs_the_real_model_end_to_end(tmp_path):
  config = load_config("eval_points", "smoke")
  config.data.max_images = 2
  main.run(config, str(tmp_path))
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["untrained"] and metrics["num_images"] == 2 and metrics["num_objects"] == 6
  for prompt in ("box", "1click", "3click"):
    assert 0.0 <= metrics["miou"][prompt]["all"] <= 1.0
