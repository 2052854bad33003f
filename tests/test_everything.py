"""Segment everything: SAM's pieces, the records' format and filters, agreement with the naive approach."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from efficientsam_jax.inference import everything as ev
from efficientsam_jax.inference import everything_benchmark as eb
from efficientsam_jax.models import efficient_sam as es


@dataclasses.dataclass(frozen=True)
class DiscConfig:
  low_res_size: int = 64
  max_num_points: int = 6


@dataclasses.dataclass(frozen=True)
class DiscModel:
  """A stand-in promptable model with known masks: discs of three radii around the first point.

  Logits fall linearly with the distance in low-res pixels, so stability depends on the
  radius and is clipped by the image border; predicted IoU varies with the point.
  """

  config: DiscConfig = DiscConfig()
  radii: tuple = (3.0, 7.0, 12.0)
  sharpness: float = 1.5

  def embed(self, params, images):
    return jnp.zeros((1, 1), jnp.float32)

  def decode_in_pixels(self, params, embedding, points, labels, image_hw, multimask_output):
    n = self.config.low_res_size
    height, width = image_hw[0].astype(jnp.float32), image_hw[1].astype(jnp.float32)
    px, py = points[:, 0, 0] * n / width, points[:, 0, 1] * n / height
    centres = jnp.arange(n, dtype=jnp.float32) + 0.5
    distance = jnp.sqrt((centres[None, None, :] - px[:, None, None]) ** 2
                        + (centres[None, :, None] - py[:, None, None]) ** 2)
    radii = jnp.array(self.radii, jnp.float32)
    logits = (radii[None, :, None, None] - distance[:, None]) * self.sharpness
    iou = 0.9 + 0.02 * jnp.arange(3.0)[None] + 0.05 * jnp.sin(0.37 * px + 0.11 * py)[:, None]
    return logits, iou


def _image(height=90, width=120, seed=0):
  return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def _record_mask(record):
  segmentation = record["segmentation"]
  return segmentation if isinstance(segmentation, np.ndarray) else ev.decode_rle(segmentation)


def _host_box(mask):
  ys, xs = np.nonzero(mask)
  return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]


# -- SAM's pieces ------------------------------------------------------------------


def test_point_grid_and_crop_boxes_follow_sam():
  grid = ev.build_point_grid(4)
  assert grid.shape == (16, 2)
  np.testing.assert_allclose(grid[:4, 0], [0.125, 0.375, 0.625, 0.875])  # x varies fastest
  np.testing.assert_allclose(grid[:4, 1], 0.125)
  boxes, layers = ev.generate_crop_boxes((1500, 2250), 1, 512 / 1500)
  # Layer 1: overlap int(512/1500·1500·1) = 512, crop sides ceil((512 + L) / 2).
  assert boxes[0] == [0, 0, 2250, 1500] and layers == [0, 1, 1, 1, 1]
  assert boxes[1:] == [[0, 0, 1381, 1006], [0, 494, 1381, 1500], [869, 0, 2250, 1006], [869, 494, 2250, 1500]]


def test_box_nms_stability_rle_and_small_regions():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10]], float)
  assert ev.box_nms(boxes, np.array([0.5, 0.9, 0.7, 0.1]), 0.7).tolist() == [1, 2]
  logits = jnp.array([[[2.0, 0.5], [-0.5, -2.0]]])
  np.testing.assert_allclose(ev.stability_score(logits, 0.0, 1.0), [1 / 3])  # > +1: one pixel; > -1: three
  mask = np.zeros((7, 5), bool)
  mask[0, 0] = mask[2:6, 1:4] = True
  mask[3, 2] = False
  rle = ev.mask_to_uncompressed_rle(mask)
  np.testing.assert_array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, 7, 5)).astype(bool), mask)
  assert ev.decode_rle(ev.encode_rle(mask[None])[0]).tolist() == mask.tolist()
  filled, changed = ev.remove_small_regions(mask, 2, "holes")
  assert changed and filled[3, 2] and filled.sum() == mask.sum() + 1
  cleaned, changed = ev.remove_small_regions(mask, 2, "islands")
  assert changed and not cleaned[0, 0] and cleaned.sum() == mask.sum() - 1


def test_shape_stable_decode_and_upsampling_match_the_official_functions(tiny_model):
  model, params = tiny_model
  image = _image(70, 100)
  embedding = ev.embed_image(model, params, image)
  points = np.array([[[30.0, 20.0], [60.0, 50.0]], [[10.0, 10.0], [-1.0, -1.0]]], np.float32)
  labels = np.array([[1.0, 0.0], [1.0, -1.0]], np.float32)
  low_res, iou = ev.decode_in_pixels(model, params, embedding, points, labels, jnp.array([70, 100]), True)
  ref_low, ref_iou = es.predict_masks(model, params, embedding, points[None], labels[None], input_hw=(70, 100))
  np.testing.assert_allclose(low_res, ref_low[0], atol=1e-5)
  np.testing.assert_allclose(iou, ref_iou[0], atol=1e-5)
  rows, cols = ev.canvas_matrices((70, 100), low_res.shape[-1], 256)
  masks, best = ev.upsample_best(low_res, iou, rows, cols)
  ref_full = es.upsample_masks(ref_low[0], (70, 100))
  k = np.argmax(np.asarray(ref_iou[0]), axis=-1)
  np.testing.assert_array_equal(np.asarray(masks)[:, :70, :100], np.asarray(ref_full)[np.arange(2), k] > 0)
  assert not np.asarray(masks)[:, 70:].any() and not np.asarray(masks)[:, :, 100:].any()


def test_two_decoding_stages_equal_the_whole_decoder(tiny_model):
  """Prompt stage + mask stage on any subset of the prompts = those prompts' rows of the whole decoder."""
  model, params = tiny_model
  image = _image(70, 100)
  embedding = ev.embed_image(model, params, image)
  rng = np.random.default_rng(4)
  points = (rng.uniform(size=(8, 2)) * np.array([100, 70])).astype(np.float32)
  valid = np.arange(8) < 7  # the last slot is padding
  size = jnp.array([70, 100], jnp.int32)
  labels = np.where(valid, 1.0, -1.0).astype(np.float32)[:, None]
  low_res, iou = ev.decode_in_pixels(model, params, embedding, points[:, None], labels, size, True)
  state, stage_iou, needed = ev._prompt_stage(model, params, embedding, points, valid, size, 0.0)  # pylint: disable=protected-access
  np.testing.assert_allclose(stage_iou, iou, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(needed, valid & (np.asarray(iou) > 0.0).any(-1))
  index = np.array([5, 0, 2], np.int32)
  stage_low_res, *_ = ev._mask_stage(model, params, state, stage_iou, index, size, 0.0, 0.0, 1.0, 0.0)  # pylint: disable=protected-access
  np.testing.assert_allclose(stage_low_res, np.asarray(low_res)[index].reshape(9, *low_res.shape[-2:]),
                             rtol=1e-5, atol=1e-5)


def test_only_prompts_passing_the_iou_filter_are_upscaled(tiny_model):
  """With the IoU threshold at the median of the prompts' best IoU, half the prompts reach the mask stage,
  and the records are those of the naive approach that upscales everything."""
  model, params = tiny_model
  image = _image(64, 80, seed=5)
  grid = ev.build_point_grid(4) * np.array([80, 64])
  embedding = ev.embed_image(model, params, image)
  _, iou = ev.decode_in_pixels(model, params, embedding, grid[:, None].astype(np.float32), np.ones((16, 1)),
                               jnp.array([64, 80]), True)
  best = np.sort(np.asarray(iou).max(-1))
  threshold = float(best[7] + best[8]) / 2
  settings = dict(pred_iou_thresh=threshold, stability_score_thresh=0.0, stability_score_offset=0.01,
                  box_nms_thresh=0.9)
  generator = ev.EfficientSamAutomaticMaskGenerator(model, params, points_per_side=4, **settings)
  ours = generator.generate(image)
  assert generator.last_stats["candidates"] == 48 and generator.last_stats["mask_stage_prompts"] == 8
  naive = eb.naive_segment_everything(model, params, image, points_per_side=4, **settings)
  assert ours and len(ours) == len(naive)
  assert eb.match_records(ours, naive, iou_thresh=0.99)["matched"] == len(naive)


# -- the generator -------------------------------------------------------------------


def test_records_decode_and_satisfy_sams_filters():
  image = _image()
  height, width = image.shape[:2]
  thresholds = dict(pred_iou_thresh=0.92, stability_score_thresh=0.8, box_nms_thresh=0.5)
  generator = ev.EfficientSamAutomaticMaskGenerator(DiscModel(), {}, points_per_side=8, output_mode="coco_rle",
                                                    **thresholds)
  records = generator.generate(image)
  assert 3 <= len(records) < 3 * 64, generator.last_stats
  assert json.loads(json.dumps(records)) == records  # JSON-ready
  boxes = []
  for record in records:
    assert set(record) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                           "crop_box"}
    mask = _record_mask(record)
    assert mask.shape == (height, width)
    assert record["area"] == mask.sum() > 0
    assert record["bbox"] == _host_box(mask)
    assert record["crop_box"] == [0.0, 0.0, float(width), float(height)]
    assert record["predicted_iou"] > thresholds["pred_iou_thresh"]
    assert record["stability_score"] >= thresholds["stability_score_thresh"]
    # The stability is SAM's, on the official full-resolution logits of that prompt.
    point = np.array(record["point_coords"], np.float32)[None]
    low_res, iou = DiscModel().decode_in_pixels({}, None, point, np.ones((1, 1)), jnp.array([height, width]), True)
    k = int(np.argmin(np.abs(np.asarray(iou[0]) - record["predicted_iou"])))
    full = es.upsample_masks(low_res[:, k], (height, width))
    np.testing.assert_allclose(record["stability_score"], float(ev.stability_score(full, 0.0, 1.0)[0]), atol=1e-6)
    np.testing.assert_array_equal(mask, np.asarray(full[0]) > 0)
    x, y, w, h = record["bbox"]
    boxes.append([x, y, x + w, y + h])
  overlaps = ev.box_iou_matrix(np.array(boxes), np.array(boxes))
  np.fill_diagonal(overlaps, 0)
  assert overlaps.max() <= thresholds["box_nms_thresh"]


def test_fast_generator_agrees_with_the_naive_notebook_approach():
  image = _image(100, 140, seed=1)
  settings = dict(pred_iou_thresh=0.92, stability_score_thresh=0.75, box_nms_thresh=0.5, points_per_batch=32)
  ours = ev.EfficientSamAutomaticMaskGenerator(DiscModel(), {}, points_per_side=12, **settings).generate(image)
  naive = eb.naive_segment_everything(DiscModel(), {}, image, points_per_side=12, **settings)
  agreement = eb.match_records(ours, naive, iou_thresh=0.99)
  assert len(naive) > 5
  assert abs(len(ours) - len(naive)) <= max(1, len(naive) // 10), (len(ours), len(naive))
  assert agreement["matched"] >= 0.9 * len(naive), agreement


def test_crop_layers_and_small_region_cleanup():
  image = _image(96, 128, seed=2)
  generator = ev.EfficientSamAutomaticMaskGenerator(
      DiscModel(), {}, points_per_side=6, crop_n_layers=1, pred_iou_thresh=0.9, stability_score_thresh=0.7,
      min_mask_region_area=30, output_mode="uncompressed_rle")
  records = generator.generate(image)
  crops, _ = ev.generate_crop_boxes((96, 128), 1, 512 / 1500)
  allowed = [ev.xyxy_to_xywh(box) for box in crops]
  assert records and any(r["crop_box"] != allowed[0] for r in records)
  from scipy import ndimage
  for record in records:
    assert record["crop_box"] in allowed
    mask = _record_mask(record)
    assert mask.shape == (96, 128) and record["area"] == mask.sum()
    regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
    assert count == 1 or np.bincount(regions.reshape(-1))[1:].min() >= 30


def test_real_model_runs_without_recompiling_for_a_new_image_size(tiny_model):
  model, params = tiny_model
  generator = ev.EfficientSamAutomaticMaskGenerator(model, params, points_per_side=4, pred_iou_thresh=-1.0,
                                                    stability_score_thresh=0.0, stability_score_offset=0.01)
  first = generator.generate(_image(100, 130))
  before = ev.compile_cache_sizes()
  second = generator.generate(_image(120, 90, seed=3))  # same 256×256 canvas bucket
  assert ev.compile_cache_sizes() == before
  for records, shape in ((first, (100, 130)), (second, (120, 90))):
    assert records
    for record in records:
      assert record["segmentation"].shape == shape and record["segmentation"].sum() == record["area"]


def test_predict_cli_everything_writes_records_and_overlay(tmp_path, tiny_model):
  from PIL import Image

  from efficientsam_jax import predict
  from efficientsam_jax.models.pretrained import save_pretrained
  model, params = tiny_model
  weights = save_pretrained(str(tmp_path / "weights"), params, model.config)
  Image.fromarray(_image(80, 100)).save(tmp_path / "in.png")
  out = tmp_path / "out" / "everything.png"
  assert predict.main(["--checkpoint", weights, "--image", str(tmp_path / "in.png"), "--everything",
                       "--output", str(out), "--points-per-side", "4", "--pred-iou-thresh", "-1",
                       "--stability-score-thresh", "0"]) == 0
  records = json.loads((tmp_path / "out" / "everything.json").read_text())
  assert records and all(ev.decode_rle(r["segmentation"]).shape == (80, 100) for r in records)
  assert Image.open(out).size == (100, 80)
  with pytest.raises(SystemExit):
    predict.main(["--checkpoint", weights, "--image", str(tmp_path / "in.png"), "--everything",
                  "--output", str(out), "--point", "3,3"])


def test_benchmark_reports_both_implementations():
  rows = eb.run_benchmark(DiscModel(), {}, _image(64, 80), [6], points_per_batch=16, pred_iou_thresh=0.92,
                          stability_score_thresh=0.8, log=lambda line: None)
  assert rows[0]["ratio"] > 0 and rows[0]["agreement"]["reference"] == rows[0]["naive_masks"]


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="exactly one of points_per_side and point_grids"):
    ev.EfficientSamAutomaticMaskGenerator(DiscModel(), {}, points_per_side=None)
  with pytest.raises(ValueError, match="output_mode"):
    ev.EfficientSamAutomaticMaskGenerator(DiscModel(), {}, output_mode="png")
