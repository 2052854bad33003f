"""EfficientSamPredictor: parity with the functional API and the official outputs, batching, errors."""

import numpy as np
import pytest

from efficientsam_jax.inference import EfficientSamPredictor
from efficientsam_jax.models import efficient_sam
from efficientsam_jax.models.efficient_sam import get_image_embeddings, predict_masks


@pytest.fixture(scope="module")
def image(tiny_reference):
  return tiny_reference["image"]  # 300×200, non-square on purpose.


@pytest.fixture(scope="module")
def predictor(tiny_model, image):
  model, params = tiny_model
  predictor = EfficientSamPredictor(model, params)
  predictor.set_image(image)
  return predictor


def _sorted_functional(tiny_model, image, points, labels, multimask_output=True):
  """The functional API's full-size logits and IoU for one prompt, sorted best first."""
  model, params = tiny_model
  embeddings = get_image_embeddings(model, params, np.asarray(image, np.float32)[None] / 255.0)
  logits, iou = predict_masks(model, params, embeddings, np.asarray(points, np.float32)[None, None],
                              np.asarray(labels, np.float32)[None, None], input_hw=image.shape[:2],
                              multimask_output=multimask_output, output_hw=image.shape[:2])
  logits, iou = np.asarray(logits[0, 0]), np.asarray(iou[0, 0])
  order = np.argsort(-iou, kind="stable")
  return logits[order], iou[order]


def _assert_masks_match(masks, logits, margin=1e-4):
  """Boolean masks equal ``logits > 0`` except where a logit is within rounding of 0."""
  decided = np.abs(logits) > margin
  np.testing.assert_array_equal(masks[decided], (logits > 0)[decided])


def test_image_state(predictor, tiny_model, image):
  assert predictor.is_image_set
  assert predictor.original_size == (300, 200)
  side = tiny_model[0].config.embedding_hw
  assert predictor.get_image_embedding().shape == (1, *side, tiny_model[0].config.decoder_dim)
  fresh = EfficientSamPredictor(*tiny_model)
  assert not fresh.is_image_set and fresh.original_size is None
  with pytest.raises(ValueError, match="no image set"):
    fresh.predict(point_coords=[[10, 10]], point_labels=[1])
  with pytest.raises(ValueError, match="no image set"):
    fresh.get_image_embedding()
  fresh.set_image(image)
  fresh.reset_image()
  assert not fresh.is_image_set and fresh.original_size is None
  with pytest.raises(ValueError, match="no image set"):
    fresh.predict_batch(boxes=[[0, 0, 10, 10]])


def test_matches_official_outputs(predictor, tiny_reference):
  # Prompt (b=1, q=0) of the official fixture: one positive point, padded with (-1, -1, -1).
  logits, scores, low_res = predictor.predict([[20.0, 30.0]], [1], return_logits=True)
  order = np.argsort(-tiny_reference["iou"][1, 0], kind="stable")
  expected = tiny_reference["masks_stride7"][1, 0][order]
  assert logits.shape == tuple(tiny_reference["masks_shape"][2:])
  tol = 2e-4 * np.abs(expected).max()
  np.testing.assert_allclose(logits[:, ::7, ::7], expected, atol=tol, rtol=0)
  np.testing.assert_allclose(scores, tiny_reference["iou"][1, 0][order], atol=1e-5, rtol=0)
  np.testing.assert_allclose(low_res, tiny_reference["low_res_masks"][1, 0][order], atol=tol, rtol=0)


@pytest.mark.parametrize("multimask_output", [True, False])
def test_masks_equal_functional_api(predictor, tiny_model, image, multimask_output):
  points, labels = [[50.0, 60.0], [120.0, 200.0]], [1, 0]
  logits, iou = _sorted_functional(tiny_model, image, points, labels, multimask_output)
  masks, scores, low_res = predictor.predict(points, labels, multimask_output=multimask_output)
  k = 3 if multimask_output else 1
  assert masks.shape == (k, 300, 200) and masks.dtype == np.bool_
  assert scores.shape == (k,) and low_res.shape == (k, 64, 64)
  _assert_masks_match(masks, logits)
  np.testing.assert_allclose(scores, iou, atol=1e-6, rtol=0)
  raw, _, _ = predictor.predict(points, labels, multimask_output=multimask_output, return_logits=True)
  assert raw.dtype == np.float32
  np.testing.assert_allclose(raw, logits, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(masks, raw > 0)


def test_sorted_best_first(predictor):
  _, scores, _ = predictor.predict([[150.0, 40.0]], [1])
  assert np.all(np.diff(scores) <= 0)
  _, batch_scores, _ = predictor.predict_batch(boxes=[[0, 0, 100, 100], [50, 50, 200, 300], [10, 20, 30, 40]])
  assert np.all(np.diff(batch_scores, axis=-1) <= 0)


def test_box_is_two_corner_points(predictor):
  box = [30.0, 40.0, 150.0, 260.0]
  by_box = predictor.predict(box=box, return_logits=True)
  by_points = predictor.predict([[30.0, 40.0], [150.0, 260.0]], [2, 3], return_logits=True)
  for a, b in zip(by_box, by_points):
    np.testing.assert_array_equal(a, b)
  # With points, the corners come after them.
  mixed = predictor.predict([[90.0, 100.0]], [1], box=box, return_logits=True)
  explicit = predictor.predict([[90.0, 100.0], [30.0, 40.0], [150.0, 260.0]], [1, 2, 3], return_logits=True)
  for a, b in zip(mixed, explicit):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(mixed[0], by_box[0])


def test_batch_equals_separate_predicts(predictor):
  # Prompts of different lengths share one array; label -1 marks the unused slots (as the model pads).
  points = np.array([[[20, 30], [-1, -1]], [[100, 150], [60, 80]], [[180, 290], [-1, -1]]], np.float32)
  labels = np.array([[1, -1], [1, 0], [0, -1]], np.float32)
  boxes = np.array([[0, 0, 60, 90], [40, 50, 190, 280], [100, 200, 200, 300]], np.float32)
  masks, scores, low_res = predictor.predict_batch(points, labels, boxes, return_logits=True)
  assert masks.shape == (3, 3, 300, 200) and scores.shape == (3, 3) and low_res.shape == (3, 3, 64, 64)
  for q in range(3):
    used = labels[q] != -1
    single = predictor.predict(points[q][used], labels[q][used], box=boxes[q], return_logits=True)
    for batched, alone in zip((masks[q], scores[q], low_res[q]), single):
      np.testing.assert_allclose(batched, alone, atol=2e-5, rtol=0)


def test_batch_chunks_and_buckets(tiny_model, image, predictor):
  boxes = np.array([[0, 0, 60, 90], [40, 50, 190, 280], [100, 200, 200, 300]], np.float32)
  whole = predictor.predict_batch(boxes=boxes, return_logits=True)
  decode_cache = getattr(efficient_sam._decode, "_cache_size", None)
  if decode_cache is not None:
    before = decode_cache()
    # Q = 3 and Q = 4 share the bucket of 4, and prompt length does not matter either.
    predictor.predict_batch(boxes=np.concatenate([boxes, boxes[:1]]))
    predictor.predict_batch(np.zeros((3, 4, 2)) + 10, np.ones((3, 4)))
    assert decode_cache() == before
  chunked = EfficientSamPredictor(*tiny_model, max_queries_per_call=2)
  chunked.set_image(image)
  parts = chunked.predict_batch(boxes=boxes, return_logits=True)  # Chunks of 2 and 1.
  for a, b in zip(whole, parts):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_points_on_the_border_are_inside(predictor):
  masks, _, _ = predictor.predict([[0, 0], [200, 300]], [1, 1])
  assert masks.shape == (3, 300, 200)
  predictor.predict(box=[0, 0, 200, 300])


def test_grayscale_and_rgba_match_rgb(tiny_model):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (40, 56), dtype=np.uint8)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (40, 56, 1), dtype=np.uint8)], axis=-1)
  predictor = EfficientSamPredictor(*tiny_model)
  predictor.set_image(rgb)
  expected = np.asarray(predictor.get_image_embedding())
  expected_masks = predictor.predict([[20, 10]], [1], return_logits=True)[0]
  for variant in (gray, gray[..., None], rgba):
    predictor.set_image(variant)
    assert predictor.original_size == (40, 56)
    np.testing.assert_array_equal(np.asarray(predictor.get_image_embedding()), expected)
  np.testing.assert_array_equal(predictor.predict([[20, 10]], [1], return_logits=True)[0], expected_masks)


@pytest.mark.parametrize("bad_image, match", [
    (np.zeros((8, 8, 3), np.float32), "uint8.*float32"),
    (np.zeros((8, 8, 3), np.int64), "uint8.*int64"),
    (np.zeros((8, 8, 3), bool), "uint8.*bool"),
    (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"shape \(2, 8, 8, 3\)"),
    (np.zeros((8,), np.uint8), r"shape \(8,\)"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (np.zeros((8, 0), np.uint8), "empty"),
])
def test_bad_images(tiny_model, bad_image, match):
  predictor = EfficientSamPredictor(*tiny_model)
  with pytest.raises(ValueError, match=match):
    predictor.set_image(bad_image)
  assert not predictor.is_image_set


@pytest.mark.parametrize("kwargs, match", [
    ({}, "no prompt"),
    ({"point_coords": np.zeros((0, 2)), "point_labels": np.zeros((0,))}, "no prompt"),
    ({"point_coords": [[np.nan, 10]], "point_labels": [1]}, "NaN or inf"),
    ({"point_coords": [[10, np.inf]], "point_labels": [1]}, "NaN or inf"),
    ({"point_coords": [[250, 10]], "point_labels": [1]}, r"\[250.0, 10.0\].*outside the image.*x must be in \[0, 200\]"),
    ({"point_coords": [[10, -0.5]], "point_labels": [0]}, "outside the image"),
    ({"point_coords": [[10, 301]], "point_labels": [1]}, "outside the image"),
    ({"point_coords": [[10, 10]], "point_labels": [5]}, r"label 5 .*not one of \[-1, 0, 1, 2, 3\]"),
    ({"point_coords": [[10, 10]], "point_labels": [0.5]}, "not one of"),
    ({"point_coords": [[10, 10], [20, 20]], "point_labels": [1]}, "1 entries but point_coords has 2"),
    ({"point_coords": [[10, 10]]}, "together"),
    ({"point_labels": [1]}, "together"),
    ({"point_coords": [[10, 10, 1]], "point_labels": [1]}, r"\[N, 2\].*\(1, 3\)"),
    ({"point_coords": [[10, 10]] * 7, "point_labels": [1] * 7}, "7 points.*at most 6"),
    ({"point_coords": [[10, 10]] * 5, "point_labels": [1] * 5, "box": [0, 0, 5, 5]}, "7 points.*at most 6"),
    ({"box": [0, 0, 5]}, r"box must be \[4\].*\(3,\)"),
    ({"box": [[0, 0, 5, 5], [1, 1, 2, 2]]}, r"box must be \[4\]"),
    ({"box": [50, 10, 40, 20]}, "malformed.*x0 <= x1"),
    ({"box": [10, 50, 40, 20]}, "malformed"),
    ({"box": [10, 10, 250, 20]}, r"outside the image.*\[0, 200\]"),
    ({"box": [-3, 10, 25, 20]}, "outside the image"),
    ({"box": [10, np.nan, 25, 20]}, "NaN or inf"),
    ({"box": [0, 0, 5, 5], "mask_input": np.zeros((1, 64, 64))}, "no mask"),
    ({"point_coords": [["a", 1]], "point_labels": [1]}, "numeric"),
])
def test_predict_errors(predictor, kwargs, match):
  with pytest.raises(ValueError, match=match):
    predictor.predict(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "no prompt"),
    ({"point_coords": np.zeros((2, 2)), "point_labels": np.ones((2,))}, r"\[Q, P, 2\].*\(2, 2\)"),
    ({"point_coords": np.zeros((2, 3, 2)), "point_labels": np.ones((2, 2))}, r"\[Q, P\] = \(2, 3\).*\(2, 2\)"),
    ({"point_coords": np.zeros((2, 1, 2)), "point_labels": np.ones((2, 1)), "boxes": np.zeros((3, 4))},
     "3 rows but point_coords has 2"),
    ({"boxes": np.zeros((2, 3))}, r"boxes must be \[Q, 4\]"),
    ({"boxes": np.zeros((0, 4))}, "no prompt"),
    ({"boxes": [[0, 0, 10, 10], [0, 0, 10, 400]]}, r"box 1 .*outside the image"),
    ({"point_coords": np.full((2, 1, 2), 5.0), "point_labels": [[1], [7]]}, "prompt 1 point 0"),
    ({"point_coords": np.full((1, 5, 2), 5.0), "point_labels": np.ones((1, 5)), "boxes": [[0, 0, 9, 9]]},
     "at most 6"),
])
def test_predict_batch_errors(predictor, kwargs, match):
  with pytest.raises(ValueError, match=match):
    predictor.predict_batch(**kwargs)


def test_padding_points_may_lie_outside(predictor):
  # Label -1 slots are not prompts, so (-1, -1) (the official padding value) is accepted.
  masks, _, _ = predictor.predict([[20, 30], [-1, -1]], [1, -1])
  np.testing.assert_array_equal(masks, predictor.predict([[20, 30]], [1])[0])
