"""Prompt → best-mask segmenters for the evaluations, and the model they are built from.

A segmenter embeds one image (``set_image``) and returns, for Q prompts at once,
each prompt's most confident mask at full resolution and its predicted IoU
(``best_masks``). ``EfficientSamSegmenter`` runs one encoder pass per image and
decodes all prompts of an image in one batched call per chunk of
``max_queries`` (padded to a power of two, every prompt padded to the model's
6 points, the image size traced): a dataset of many image sizes compiles the
decoder once per query bucket and the upsampling once per canvas bucket. The
evaluations take any object with these two methods, which is how the tests run
them with exact or known predictions.
"""

from __future__ import annotations

from typing import Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from efficientsam_jax.inference.everything import canvas_matrices, decode_in_pixels, upsample_best
from efficientsam_jax.inference.predictor import to_rgb_uint8
from efficientsam_jax.models.efficient_sam import EfficientSam, get_image_embeddings
from efficientsam_jax.models.prompt_encoder import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_PADDING

UNTRAINED_WARNING = "RANDOM, UNTRAINED weights: the masks and every metric are meaningless (pipeline check only)"


class Segmenter(Protocol):
  def set_image(self, image: np.ndarray) -> None:
    ...

  def best_masks(self, points: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                 boxes: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """points [Q, P, 2] + labels [Q, P] and/or boxes [Q, 4] → (masks [Q, H, W] bool, predicted IoU [Q])."""
    ...


def merge_prompts(points: Optional[np.ndarray], labels: Optional[np.ndarray],
                  boxes: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Points and boxes (as two corner points labelled 2 and 3, after the points) → [Q, P, 2], [Q, P]."""
  parts_points, parts_labels = [], []
  if points is not None:
    parts_points.append(np.asarray(points, np.float32))
    parts_labels.append(np.asarray(labels, np.float32))
  if boxes is not None:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    parts_points.append(boxes.reshape(-1, 2, 2))
    parts_labels.append(np.broadcast_to(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.float32),
                                        (len(boxes), 2)))
  if not parts_points:
    raise ValueError("no prompt given: pass points with labels and/or boxes")
  return np.concatenate(parts_points, axis=1), np.concatenate(parts_labels, axis=1)


class EfficientSamSegmenter:
  """Best-of-three EfficientSAM masks for batches of prompts (see the module docstring)."""

  def __init__(self, model: EfficientSam, params, max_queries: int = 64, canvas_multiple: int = 256,
               multimask_output: bool = True):
    if max_queries < 1:
      raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    self.model, self.params = model, params
    self.max_queries = int(max_queries)
    self.canvas_multiple = int(canvas_multiple)
    self.multimask_output = bool(multimask_output)
    self._embedding = None
    self._hw = None

  def set_image(self, image: np.ndarray) -> None:
    rgb = to_rgb_uint8(image)
    self._embedding = get_image_embeddings(self.model, self.params, jnp.asarray(rgb, jnp.float32)[None] / 255.0)
    self._hw = (int(rgb.shape[0]), int(rgb.shape[1]))
    low_res = self.model.config.low_res_size
    self._matrices = canvas_matrices(self._hw, low_res, self.canvas_multiple)

  def best_masks(self, points=None, labels=None, boxes=None) -> tuple[np.ndarray, np.ndarray]:
    if self._embedding is None:
      raise ValueError("no image set: call set_image(image) first")
    points, labels = merge_prompts(points, labels, boxes)
    num_queries, num_points = labels.shape
    limit = self.model.config.max_num_points
    if num_points > limit:
      raise ValueError(f"prompts have {num_points} points (box corners count as 2); EfficientSAM takes {limit}")
    height, width = self._hw
    image_hw = jnp.array(self._hw, jnp.int32)
    masks = np.zeros((num_queries, height, width), bool)
    scores = np.zeros(num_queries, np.float32)
    for start in range(0, num_queries, self.max_queries):
      size = min(self.max_queries, num_queries - start)
      # Powers of two from 8 up: a few compilations for any number of objects.
      bucket = min(max(1 << max(size - 1, 0).bit_length(), 8), self.max_queries)
      # P points as given (the model pads them as the official model does, with one weighted token).
      chunk_points = np.full((bucket, num_points, 2), -1.0, np.float32)
      chunk_labels = np.full((bucket, num_points), float(LABEL_PADDING), np.float32)
      chunk_points[:size, :num_points] = points[start:start + size]
      chunk_labels[:size, :num_points] = labels[start:start + size]
      low_res, iou = decode_in_pixels(self.model, self.params, self._embedding, chunk_points, chunk_labels,
                                      image_hw, self.multimask_output)
      best, best_iou = jax.device_get(upsample_best(low_res, iou, *self._matrices))
      masks[start:start + size] = best[:size, :height, :width]
      scores[start:start + size] = best_iou[:size]
    return masks, scores


def build_model(model_config, seed: int = 0):
  """(model, params, untrained) from a config's ``model`` section.

  ``checkpoint``: a weights directory (``load_pretrained``); otherwise ``random_config``
  (EfficientSamConfig fields) gives a randomly initialized model, announced as untrained.
  """
  from efficientsam_jax.models.efficient_sam import EfficientSamConfig  # pylint: disable=import-outside-toplevel
  dtype = jnp.dtype(model_config.get("dtype", "float32"))
  if model_config.get("checkpoint"):
    from efficientsam_jax.models.pretrained import load_pretrained  # pylint: disable=import-outside-toplevel
    model, params = load_pretrained(model_config.checkpoint, dtype=dtype)
    return model, params, False
  random_config = model_config.get("random_config")
  if not random_config:
    raise ValueError("config.model.checkpoint is empty: give an EfficientSAM weights directory "
                     "(python -m efficientsam_jax.convert torch-to-jax ...), or use the :smoke config")
  values = random_config.to_dict() if hasattr(random_config, "to_dict") else dict(random_config)
  model = EfficientSam(EfficientSamConfig.from_dict(values), dtype=dtype)
  params = random_params(model, seed)
  print("=" * 78)
  print(f"WARNING: {UNTRAINED_WARNING}.")
  print("=" * 78)
  return model, params, True


def random_params(model: EfficientSam, seed: int = 0) -> dict:
  """Random parameters drawn on the host from the abstract shapes (LeCun-normal kernels, unit norms).

  For smoke runs: compiling ``init_params`` costs more than the whole smoke evaluation.
  """
  from efficientsam_jax.models.efficient_sam import abstract_params  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "scale":
      value = np.ones(shape)
    elif name == "bias":
      value = np.zeros(shape)
    elif name == "positional_encoding_gaussian_matrix":
      value = rng.normal(0.0, 1.0, shape)
    elif name == "kernel":
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    else:  # embeddings, position tables
      value = rng.normal(0.0, 0.02, shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(model))


class LazySegmenter:
  """The job's segmenter, built from ``config.model`` on first use (a share without objects loads nothing)."""

  def __init__(self, config, segmenter: Optional["Segmenter"] = None):
    self._config, self._segmenter, self._untrained = config, segmenter, False

  def get(self) -> "Segmenter":
    if self._segmenter is None:
      model, params, self._untrained = build_model(self._config.model, seed=self._config.eval.seed)
      self._segmenter = EfficientSamSegmenter(model, params, max_queries=self._config.eval.max_queries,
                                              canvas_multiple=self._config.eval.canvas_multiple)
    return self._segmenter

  @property
  def untrained(self) -> bool:
    """Whether the numbers came from random weights (known without building the model)."""
    model = self._config.model
    return self._untrained or (self._segmenter is None and not model.get("checkpoint")
                               and bool(model.get("random_config")))
