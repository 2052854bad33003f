"""A SAM-style predictor: embed one image once, then prompt it many times.

``EfficientSamPredictor`` wraps the functional API of
``efficientsam_jax.models.efficient_sam`` with the interface SAM users know
(``set_image`` / ``predict``) plus ``predict_batch``, which decodes many prompts
of the same image in one decoder call.

Prompts are validated before they reach the model: the official model silently
truncates prompts longer than ``max_num_points`` and happily encodes points far
outside the image, both of which give plausible-looking but wrong masks, so
here they are errors.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from efficientsam_jax.models.efficient_sam import (EfficientSam, get_image_embeddings, predict_masks,
                                                   upsample_masks)
from efficientsam_jax.models.prompt_encoder import (LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT,
                                                    LABEL_PADDING, VALID_LABELS)

ArrayLike = Any


def to_rgb_uint8(image: ArrayLike) -> np.ndarray:
  """Checks an image and returns it as uint8 [H, W, 3].

  Accepts uint8 [H, W, 3], grayscale [H, W] or [H, W, 1] (replicated to RGB) and
  RGBA [H, W, 4] (alpha dropped). Anything else raises a ``ValueError`` that
  names the problem.
  """
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"image must be uint8 with values 0..255, got dtype {array.dtype}; "
                     "convert floats in [0, 1] with (image * 255).round().astype(np.uint8)")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image must be [H, W, 3] (RGB), [H, W] or [H, W, 1] (grayscale) or "
                     f"[H, W, 4] (RGBA), got shape {array.shape}")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError(f"image is empty: shape {array.shape} has no pixels")
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  elif array.shape[-1] == 4:
    array = array[..., :3]
  return np.ascontiguousarray(array)


def _bucket(num_queries: int, cap: int) -> int:
  """Next power of two (at most ``cap``), so the decoder compiles once per bucket, not per Q."""
  return min(1 << max(num_queries - 1, 0).bit_length(), cap)


@functools.partial(jax.jit, static_argnames=("output_hw", "return_logits"))
def _sort_and_upsample(low_res: jax.Array, iou: jax.Array, output_hw: tuple[int, int],
                       return_logits: bool):
  """Sorts each query's masks by predicted IoU (best first) and upsamples them.

  low_res [Q, K, h, w], iou [Q, K] → (masks [Q, K, H, W] bool or logits, iou, low_res), sorted.
  """
  order = jnp.argsort(-iou, axis=-1, stable=True)
  iou = jnp.take_along_axis(iou, order, axis=-1)
  low_res = jnp.take_along_axis(low_res, order[:, :, None, None], axis=1)
  logits = upsample_masks(low_res, output_hw)
  return (logits if return_logits else logits > 0), iou, low_res


class EfficientSamPredictor:
  """Caches one image's embedding and predicts masks for point and box prompts.

  Args:
    model: an ``EfficientSam`` module.
    params: its parameters.
    max_queries_per_call: prompts decoded together in one call of ``predict_batch``;
      larger batches are split into chunks of this size to bound memory.
  """

  def __init__(self, model: EfficientSam, params, *, max_queries_per_call: int = 64):
    if max_queries_per_call < 1:
      raise ValueError(f"max_queries_per_call must be >= 1, got {max_queries_per_call}")
    self.model = model
    self.params = params
    self.max_queries_per_call = int(max_queries_per_call)
    self.reset_image()

  @property
  def config(self):
    return self.model.config

  # -- image ------------------------------------------------------------------

  def set_image(self, image: ArrayLike) -> None:
    """Computes and caches the embedding of ``image`` (uint8 [H, W, 3], gray or RGBA; see ``to_rgb_uint8``)."""
    rgb = to_rgb_uint8(image)
    # The official pipeline feeds ToTensor() output: float32 image / 255.
    pixels = jnp.asarray(rgb, jnp.float32)[None] / 255.0
    embedding = get_image_embeddings(self.model, self.params, pixels)
    self._embedding = jax.block_until_ready(embedding)
    self._original_size = (int(rgb.shape[0]), int(rgb.shape[1]))

  def reset_image(self) -> None:
    self._embedding = None
    self._original_size = None

  @property
  def is_image_set(self) -> bool:
    return self._embedding is not None

  @property
  def original_size(self) -> Optional[tuple[int, int]]:
    """(H, W) of the image passed to ``set_image``, or None."""
    return self._original_size

  def get_image_embedding(self) -> jax.Array:
    """The cached embedding, [1, h, w, C] (NHWC)."""
    self._require_image()
    return self._embedding

  def _require_image(self) -> None:
    if self._embedding is None:
      raise ValueError("no image set: call set_image(image) before predicting")

  # -- prompting ----------------------------------------------------------------

  def predict(self, point_coords: Optional[ArrayLike] = None, point_labels: Optional[ArrayLike] = None,
              box: Optional[ArrayLike] = None, multimask_output: bool = True, return_logits: bool = False,
              mask_input: Optional[ArrayLike] = None):
    """Masks for ONE prompt: points and/or a box.

    Args:
      point_coords: [N, 2] (x, y) in pixels of the original image.
      point_labels: [N], 1 positive, 0 negative (2/3 box corners and -1 padding also allowed).
      box: [4] (x0, y0, x1, y1) in pixels; becomes two points labelled 2 and 3,
        appended after ``point_coords``.
      multimask_output: three masks (True) or the single-mask output (False).
      return_logits: return the upsampled logits instead of ``logits > 0``.
      mask_input: not supported; EfficientSAM has no mask prompt.

    Returns:
      (masks [K, H, W] bool (float32 logits if ``return_logits``), scores [K],
      low_res_logits [K, h, w]), numpy, sorted by predicted IoU, best first.
    """
    if mask_input is not None:
      raise ValueError("mask_input is not supported: EfficientSAM has no mask (dense) prompt input, "
                       "only points and boxes; pass mask_input=None")
    self._require_image()
    boxes = None
    points, labels = _point_arrays(point_coords, point_labels)
    if points is not None:
      if points.ndim != 2 or points.shape[-1] != 2:
        raise ValueError(f"point_coords must be [N, 2] (x, y) for one prompt, got shape {points.shape}; "
                         "use predict_batch for several prompts")
      if labels.ndim != 1:
        raise ValueError(f"point_labels must be [N] for one prompt, got shape {labels.shape}")
      if labels.shape[0] != points.shape[0]:
        raise ValueError(f"point_labels has {labels.shape[0]} entries but point_coords has "
                         f"{points.shape[0]} points; give one label per point")
      points, labels = points[None], labels[None]
    if box is not None:
      boxes = _as_float_array(box, "box")
      if boxes.shape not in ((4,), (1, 4)):
        raise ValueError(f"box must be [4] (x0, y0, x1, y1) for one prompt, got shape {boxes.shape}; "
                         "use predict_batch(boxes=[Q, 4]) for several boxes")
      boxes = boxes.reshape(1, 4)
    masks, scores, low_res = self.predict_batch(points, labels, boxes, multimask_output, return_logits)
    return masks[0], scores[0], low_res[0]

  def predict_batch(self, point_coords: Optional[ArrayLike] = None, point_labels: Optional[ArrayLike] = None,
                    boxes: Optional[ArrayLike] = None, multimask_output: bool = True,
                    return_logits: bool = False):
    """Masks for Q prompts of the current image in one decoder call (chunked above ``max_queries_per_call``).

    Args:
      point_coords: [Q, P, 2] (x, y) pixels; label -1 marks unused slots of shorter prompts.
      point_labels: [Q, P].
      boxes: [Q, 4] (x0, y0, x1, y1); each box's corners are appended after that query's points.

    Returns:
      (masks [Q, K, H, W], scores [Q, K], low_res_logits [Q, K, h, w]), numpy,
      each query's K masks sorted by predicted IoU, best first.
    """
    self._require_image()
    points, labels = self._prompts(point_coords, point_labels, boxes)
    return self._decode(points, labels, bool(multimask_output), bool(return_logits))

  def _prompts(self, point_coords, point_labels, boxes) -> tuple[np.ndarray, np.ndarray]:
    """Validates prompts and merges them into points [Q, P, 2] and labels [Q, P]."""
    height, width = self._original_size
    parts_points, parts_labels = [], []
    num_queries = None
    points, labels = _point_arrays(point_coords, point_labels)
    if points is not None:
      if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"point_coords must be [Q, P, 2] (x, y), got shape {points.shape}")
      if labels.shape != points.shape[:2]:
        raise ValueError(f"point_labels must be [Q, P] = {points.shape[:2]} to match point_coords "
                         f"{points.shape}, got shape {labels.shape}")
      _check_points(points, labels, height, width)
      num_queries = points.shape[0]
      parts_points.append(points)
      parts_labels.append(labels)
    if boxes is not None:
      boxes = _as_float_array(boxes, "boxes")
      if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [Q, 4] (x0, y0, x1, y1), got shape {boxes.shape}")
      if num_queries is not None and boxes.shape[0] != num_queries:
        raise ValueError(f"boxes has {boxes.shape[0]} rows but point_coords has {num_queries} prompts; "
                         "give one box per prompt")
      _check_boxes(boxes, height, width)
      num_queries = boxes.shape[0]
      parts_points.append(boxes.reshape(-1, 2, 2))
      corner_labels = np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.float64)
      parts_labels.append(np.broadcast_to(corner_labels, (num_queries, 2)))
    if num_queries is None:
      raise ValueError("no prompt given: pass point_coords with point_labels and/or a box")
    points = np.concatenate(parts_points, axis=1)
    labels = np.concatenate(parts_labels, axis=1)
    if num_queries == 0 or points.shape[1] == 0:
      raise ValueError(f"no prompt given: the prompt arrays are empty (points shape {points.shape})")
    limit = self.config.max_num_points
    if points.shape[1] > limit:
      raise ValueError(f"a prompt has {points.shape[1]} points (box corners count as 2) but EfficientSAM "
                       f"takes at most {limit}; the official model would silently drop the rest")
    return points, labels

  def _decode(self, points: np.ndarray, labels: np.ndarray, multimask_output: bool, return_logits: bool):
    num_queries, num_points = labels.shape
    limit = self.config.max_num_points
    # Padding every prompt to the model's fixed length here (as the model would) keeps one
    # compiled decoder per query bucket instead of one per prompt length.
    points = np.pad(points, ((0, 0), (0, limit - num_points), (0, 0)), constant_values=-1.0)
    labels = np.pad(labels, ((0, 0), (0, limit - num_points)), constant_values=LABEL_PADDING)
    outputs = []
    for start in range(0, num_queries, self.max_queries_per_call):
      chunk = slice(start, min(start + self.max_queries_per_call, num_queries))
      size = chunk.stop - chunk.start
      bucket = _bucket(size, self.max_queries_per_call)
      # Padding queries are all-padding prompts; the decoder treats queries independently,
      # so they do not change the real ones and are dropped below.
      chunk_points = np.full((bucket, limit, 2), -1.0, np.float32)
      chunk_labels = np.full((bucket, limit), float(LABEL_PADDING), np.float32)
      chunk_points[:size] = points[chunk]
      chunk_labels[:size] = labels[chunk]
      low_res, iou = predict_masks(self.model, self.params, self._embedding, chunk_points[None],
                                   chunk_labels[None], input_hw=self._original_size,
                                   multimask_output=multimask_output)
      masks, iou, low_res = _sort_and_upsample(low_res[0], iou[0], self._original_size, return_logits)
      outputs.append(jax.device_get((masks[:size], iou[:size], low_res[:size])))
    masks, scores, low_res = (np.concatenate(parts) for parts in zip(*outputs))
    return masks, scores, low_res


def _as_float_array(value: ArrayLike, name: str) -> np.ndarray:
  try:
    return np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{name} must be numeric, got {value!r}") from error


def _point_arrays(point_coords, point_labels):
  """Both as float arrays, or (None, None) when neither is given."""
  if point_coords is None and point_labels is None:
    return None, None
  if point_coords is None or point_labels is None:
    raise ValueError("point_coords and point_labels must be given together, got only "
                     f"{'point_coords' if point_labels is None else 'point_labels'}")
  return _as_float_array(point_coords, "point_coords"), _as_float_array(point_labels, "point_labels")


def _check_points(points: np.ndarray, labels: np.ndarray, height: int, width: int) -> None:
  """points [Q, P, 2], labels [Q, P]; padding points (label -1) may lie anywhere finite."""
  if not np.isfinite(points).all():
    bad = np.argwhere(~np.isfinite(points).all(axis=-1))[0]
    raise ValueError(f"point_coords contain NaN or inf: prompt {bad[0]} point {bad[1]} is "
                     f"{points[tuple(bad)].tolist()}")
  valid = np.isin(labels, VALID_LABELS)
  if not valid.all():
    bad = tuple(np.argwhere(~valid)[0])
    raise ValueError(f"point label {float(labels[bad]):g} (prompt {bad[0]} point {bad[1]}) is not one of "
                     f"{list(VALID_LABELS)} (1 positive, 0 negative, 2/3 box corners, -1 padding)")
  x, y = points[..., 0], points[..., 1]
  outside = ((x < 0) | (x > width) | (y < 0) | (y > height)) & (labels != LABEL_PADDING)
  if outside.any():
    bad = tuple(np.argwhere(outside)[0])
    raise ValueError(f"point {points[bad].tolist()} (prompt {bad[0]} point {bad[1]}) is outside the "
                     f"image: x must be in [0, {width}] and y in [0, {height}] (image H×W = {height}×{width})")


def _check_boxes(boxes: np.ndarray, height: int, width: int) -> None:
  """boxes [Q, 4] as (x0, y0, x1, y1) with x0 <= x1, y0 <= y1, inside the image."""
  x0, y0, x1, y1 = boxes.T
  problems = [
      (~np.isfinite(boxes).all(axis=-1), "contains NaN or inf"),
      ((x1 < x0) | (y1 < y0), "is malformed: expected (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1"),
      ((x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height),
       f"is outside the image: x must be in [0, {width}] and y in [0, {height}] "
       f"(image H×W = {height}×{width})"),
  ]
  for bad, reason in problems:
    if bad.any():
      index = int(np.argmax(bad))
      raise ValueError(f"box {index} {boxes[index].tolist()} {reason}")
