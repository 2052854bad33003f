"""Segment everything: SAM's automatic mask generator for EfficientSAM, fast.

``EfficientSamAutomaticMaskGenerator(model, params).generate(image)`` returns SAM's
records (``segmentation``, ``area``, ``bbox`` XYWH, ``predicted_iou``,
``point_coords``, ``stability_score``, ``crop_box``) with SAM's algorithm and
defaults: a ``points_per_side``² grid of single positive points decoded in
batches with three masks each, predicted-IoU and stability filters, box NMS,
optional crop layers (NMS across crops prefers smaller crops) and optional
removal of small islands and holes.

What makes it fast (the official notebook upsamples every candidate to full
resolution before filtering):

* every point batch is one jitted call of fixed shape that runs the decoder's
  transformer and IoU head; the decoder's upscaling (~40% of its work) then runs
  only for the prompts with a mask above the IoU threshold, in a second call that
  also scores stability and computes boxes on the 256×256 low-res logits (compiled
  for a few batch sizes); only flags and boxes go to the host;
* NMS runs on those low-res boxes; only its survivors are upsampled (PyTorch's
  bicubic, as the official model), in fixed-size chunks, on a canvas padded to a
  multiple of ``canvas_multiple``, with the image size as a traced value: images
  of different sizes reuse the compiled code (one compilation per canvas bucket);
* full-resolution stability, area and box are computed on the device for the
  survivors, which are filtered again with SAM's thresholds, so every record
  satisfies SAM's filters at full resolution.

The helpers ``decode_in_pixels`` and ``upsample_best`` (shape-stable decoding
from pixel prompts, and upsampling of each query's most confident mask) are
also used by the COCO/LVIS evaluation.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils

from efficientsam_jax.inference.predictor import to_rgb_uint8
from efficientsam_jax.models.efficient_sam import EfficientSam, get_image_embeddings, rescale_points
from efficientsam_jax.models.prompt_encoder import LABEL_PADDING, LABEL_POSITIVE
from efficientsam_jax.models.resize import resize_matrix

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Shape-stable building blocks (also used by efficientsam_jax.evaluation).
# ----------------------------------------------------------------------------


def canvas_size(length: int, multiple: int) -> int:
  """``length`` rounded up to a multiple of ``multiple``: the padded output size one compilation serves."""
  return max(multiple, -(-int(length) // multiple) * multiple)


def canvas_matrices(image_hw: tuple[int, int], low_res: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch-bicubic matrices low-res → (H, W), zero-padded to the canvas: ([Hc, low], [Wc, low]) float32.

  Rows past H (W) are zero, so padded output pixels get logit 0; callers mask them out by size.
  """
  matrices = []
  for length in image_hw:
    padded = np.zeros((canvas_size(length, multiple), low_res), np.float32)
    padded[:length] = resize_matrix(low_res, int(length), "bicubic")
    matrices.append(padded)
  return matrices[0], matrices[1]


def _upsample(low_res: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """[N, h, w] logits → [N, Hc, Wc] with the separable matrices [Hc, h] and [Wc, w]."""
  x = jnp.einsum("nhw,Hh->nHw", low_res, rows, precision=_HIGHEST)
  return jnp.einsum("nHw,Ww->nHW", x, cols, precision=_HIGHEST)


def _model_prompts(model: EfficientSam, points: jax.Array, labels: jax.Array, image_hw: jax.Array):
  """Pixel prompts [Q, P, 2] of an image of (traced) size ``image_hw`` → the model's [1, Q, P, 2] grid and labels."""
  c = model.config
  grid = rescale_points(points.astype(jnp.float32), image_hw.astype(jnp.float32), c.img_size)  # size as an array
  if grid.shape[1] > c.max_num_points:
    raise ValueError(f"prompts have {grid.shape[1]} points; EfficientSAM takes at most {c.max_num_points}")
  return grid[None], labels.astype(jnp.float32)[None]  # the model pads to max_num_points


@functools.partial(jax.jit, static_argnames=("model", "multimask_output"))
def decode_in_pixels(model: EfficientSam, params, embedding: jax.Array, points: jax.Array, labels: jax.Array,
                     image_hw: jax.Array, multimask_output: bool = True) -> tuple[jax.Array, jax.Array]:
  """Decodes Q prompts of one image; the image size is a traced value, so no recompilation per size.

  Args:
    embedding: [1, h, w, C] from ``get_image_embeddings``.
    points: [Q, P, 2] (x, y) in pixels of the image; P <= max_num_points, label -1 pads.
    labels: [Q, P].
    image_hw: [2] (H, W) of the image the points refer to.

  Returns:
    (low-res logits [Q, K, 4h, 4w], predicted IoU [Q, K]) in float32, in the model's order.
  """
  grid, labels = _model_prompts(model, points, labels, image_hw)
  masks, iou = model.apply({"params": params}, embedding.astype(model.dtype), grid, labels,
                           multimask_output, method=EfficientSam.decode)
  return masks[0].astype(jnp.float32), iou[0].astype(jnp.float32)


def embed_image(model, params, image: np.ndarray) -> jax.Array:
  """uint8 [H, W, 3] → the model's image embedding [1, ...] (one encoder pass).

  ``model`` is an ``EfficientSam``, or a stand-in with ``embed(params, images)`` and
  ``decode_in_pixels(params, embedding, points, labels, image_hw, multimask_output)`` (tests use a
  geometric one whose masks are known).
  """
  pixels = jnp.asarray(image, jnp.float32)[None] / 255.0
  if isinstance(model, EfficientSam):
    return get_image_embeddings(model, params, pixels)
  return model.embed(params, pixels)


def _decode_any(model, params, embedding, points, labels, image_hw, multimask_output):
  if isinstance(model, EfficientSam):
    return decode_in_pixels(model, params, embedding, points, labels, image_hw, multimask_output)
  return model.decode_in_pixels(params, embedding, points, labels, image_hw, multimask_output)


@jax.jit
def upsample_best(low_res: jax.Array, iou: jax.Array, rows: jax.Array, cols: jax.Array,
                  mask_threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Each query's most confident mask at full resolution.

  low_res [Q, K, h, w], iou [Q, K], canvas matrices rows [Hc, h], cols [Wc, w] →
  (masks [Q, Hc, Wc] bool, best predicted IoU [Q]); crop the masks to [:H, :W].
  """
  best = jnp.argmax(iou, axis=-1)
  logits = jnp.take_along_axis(low_res, best[:, None, None, None], axis=1)[:, 0]
  return _upsample(logits, rows, cols) > mask_threshold, jnp.take_along_axis(iou, best[:, None], axis=1)[:, 0]


def stability_score(logits: jax.Array, mask_threshold: float, offset: float, valid=None) -> jax.Array:
  """SAM's stability: area(logits > t + offset) / area(logits > t − offset) over the last two axes (0 if empty)."""
  high, low = logits > mask_threshold + offset, logits > mask_threshold - offset
  if valid is not None:
    high, low = high & valid, low & valid
  inter = high.sum(axis=(-2, -1)).astype(jnp.float32)
  union = low.sum(axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


def _mask_boxes(masks: jax.Array) -> jax.Array:
  """[N, H, W] bool → SAM's inclusive boxes [N, 4] (x0, y0, x1, y1) in pixels; [0, 0, 0, 0] for empty masks."""
  def extent(present):  # [N, L] bool → first, last index
    length = present.shape[-1]
    first = jnp.argmax(present, axis=-1)
    last = length - 1 - jnp.argmax(present[:, ::-1], axis=-1)
    return first, last
  x0, x1 = extent(masks.any(axis=-2))
  y0, y1 = extent(masks.any(axis=-1))
  boxes = jnp.stack([x0, y0, x1, y1], axis=-1)
  return jnp.where(masks.any(axis=(-2, -1))[:, None], boxes, 0)


# ----------------------------------------------------------------------------
# The jitted stages of the generator.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model",))
def _prompt_stage(model, params, embedding, points, valid, image_hw, pred_iou_thresh):
  """B single-point prompts → (state for ``_mask_stage``, IoU [B, 3], flags [B]: a mask passes the IoU filter).

  For EfficientSAM the state is the decoder's first stage (its image tokens and hypernetwork
  outputs): the upscaling, ~40% of the decoder, then runs only for the flagged prompts. A model
  without the two stages (``decode_in_pixels`` only) passes its low-res logits as the state.
  """
  labels = jnp.where(valid, float(LABEL_POSITIVE), float(LABEL_PADDING))[:, None]
  if isinstance(model, EfficientSam):
    grid, labels = _model_prompts(model, points[:, None], labels, image_hw)
    src, hyper_in, iou = model.apply({"params": params}, embedding.astype(model.dtype), grid, labels, True,
                                     method=EfficientSam.decode_tokens)
    state, iou = (src, hyper_in), iou[0].astype(jnp.float32)
  else:
    state, iou = model.decode_in_pixels(params, embedding, points[:, None], labels, image_hw, True)
  return state, iou, valid & (iou > pred_iou_thresh).any(axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _mask_stage(model, params, state, iou, index, image_hw, pred_iou_thresh, stability_thresh, stability_offset,
                mask_threshold):
  """The prompts ``index`` [U] of a ``_prompt_stage`` batch → low-res candidates [3U] with flags, scores, boxes.

  Boxes are the low-res mask extents mapped to image pixels (x0, y0, x1, y1), used for the
  crop-edge filter and NMS; full-resolution boxes are computed later for the survivors.
  """
  state = jax.tree_util.tree_map(lambda x: x[index], state)
  if isinstance(model, EfficientSam):
    low_res = model.apply({"params": params}, *state, method=EfficientSam.decode_masks).astype(jnp.float32)
  else:
    low_res = state
  num, k, h, w = low_res.shape
  low_res, iou = low_res.reshape(num * k, h, w), iou[index].reshape(num * k)
  stability = stability_score(low_res, mask_threshold, stability_offset)
  keep = (iou > pred_iou_thresh) & (stability >= stability_thresh)
  boxes = _mask_boxes(low_res > mask_threshold).astype(jnp.float32)
  scale = jnp.stack([image_hw[1] / w, image_hw[0] / h] * 2).astype(jnp.float32)
  # Low-res pixel i covers image pixels [i·s, (i+1)·s); keep the inclusive convention.
  boxes = jnp.concatenate([boxes[:, :2] * scale[:2], (boxes[:, 2:] + 1) * scale[2:] - 1], axis=-1)
  keep = keep & (low_res > mask_threshold).any(axis=(-2, -1))
  return low_res, keep, iou, stability, boxes


def mask_stage_sizes(points_per_batch: int) -> list[int]:
  """The batch sizes the mask stage is compiled for: powers of two from 8, and ``points_per_batch``."""
  sizes = [size for size in (2 ** i for i in range(3, 16)) if size < points_per_batch]
  return sizes + [points_per_batch]


@jax.jit
def _finish_chunk(low_res, index, rows, cols, image_hw, mask_threshold, stability_offset):
  """Upsamples the candidates ``index`` [U] of ``low_res`` [N, h, w] to the canvas and scores them there.

  Returns full-res masks [U, Hc, Wc] bool (zero outside H×W), stability [U], area [U] and inclusive boxes [U, 4].
  """
  logits = _upsample(low_res[index], rows, cols)
  valid = ((jnp.arange(rows.shape[0]) < image_hw[0])[:, None] & (jnp.arange(cols.shape[0]) < image_hw[1])[None])
  masks = (logits > mask_threshold) & valid
  stability = stability_score(logits, mask_threshold, stability_offset, valid)
  return masks, stability, masks.sum(axis=(-2, -1)), _mask_boxes(masks)


# ----------------------------------------------------------------------------
# Host-side pieces: grids, crops, NMS, RLE, small regions.
# ----------------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
  """SAM's grid: [n², 2] (x, y) in [0, 1], cell centres, x varying fastest."""
  offset = 1.0 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs, ys = np.meshgrid(side, side)
  return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


def build_layer_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
  """One grid per crop layer; layer i has n_per_side / downscale**i points per side."""
  return [build_point_grid(int(n_per_side / (downscale ** i))) for i in range(n_layers + 1)]


def generate_crop_boxes(image_hw: tuple[int, int], n_layers: int, overlap_ratio: float):
  """SAM's crops: the whole image, then 2^i × 2^i overlapping crops per layer i ≥ 1.

  Returns (boxes as [x0, y0, x1, y1] ints, layer index of each).
  """
  height, width = image_hw
  boxes, layers = [[0, 0, width, height]], [0]
  short_side = min(height, width)
  for layer in range(1, n_layers + 1):
    per_side = 2 ** layer
    overlap = int(overlap_ratio * short_side * (2 / per_side))
    crop_w = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
    crop_h = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
    starts_x = [int((crop_w - overlap) * i) for i in range(per_side)]
    starts_y = [int((crop_h - overlap) * i) for i in range(per_side)]
    for x0, y0 in itertools.product(starts_x, starts_y):
      boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
      layers.append(layer)
  return boxes, layers


def box_iou_matrix(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
  """IoU of boxes [N, 4] and [M, 4] (x0, y0, x1, y1; area (x1−x0)(y1−y0), as torchvision) → [N, M]."""
  area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
  top_left = np.maximum(boxes[:, None, :2], others[None, :, :2])
  bottom_right = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
  inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
  union = area(boxes)[:, None] + area(others)[None] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
  """Greedy NMS: indices kept, best score first; a box is dropped when its IoU with a kept one is > iou_thresh."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  suppressed = np.zeros(len(order), bool)
  keep = []
  for rank, index in enumerate(order):
    if suppressed[rank]:
      continue
    keep.append(index)
    rest = order[rank + 1:]
    if len(rest):
      suppressed[rank + 1:] |= box_iou_matrix(boxes[index][None], boxes[rest])[0] > iou_thresh
  return np.asarray(keep, np.int64)


def is_box_near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], image_box: Sequence[int],
                          atol: float = 20.0) -> np.ndarray:
  """SAM's crop-edge test on uncropped boxes [N, 4]: near a crop edge that is not an image edge."""
  crop_box, image_box = np.asarray(crop_box, np.float64), np.asarray(image_box, np.float64)
  near_crop = np.abs(boxes - crop_box) <= atol
  near_image = np.abs(boxes - image_box) <= atol
  return (near_crop & ~near_image).any(axis=-1)


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
  """Bool [H, W] → {"size": [H, W], "counts": run lengths in column-major order, starting with zeros}."""
  flat = np.asarray(mask, bool).reshape(-1, order="F")
  changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], changes, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def encode_rle(masks: np.ndarray) -> list[dict]:
  """Bool masks [N, H, W] → COCO compressed RLEs with ``counts`` as str (JSON-ready)."""
  if len(masks) == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8)))
  for rle in rles:
    rle["counts"] = rle["counts"].decode("ascii")
  return rles


def decode_rle(rle: dict) -> np.ndarray:
  """A compressed (str or bytes counts) or uncompressed COCO RLE → bool [H, W]."""
  if isinstance(rle.get("counts"), list):
    rle = mask_utils.frPyObjects(rle, *rle["size"])
  elif isinstance(rle.get("counts"), str):
    rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
  return mask_utils.decode(rle).astype(bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
  """SAM's clean-up: fills holes ("holes") or removes islands ("islands") smaller than ``area_thresh``.

  8-connected components; if every island is small, the largest is kept. Returns (mask, changed).
  """
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  if mode not in ("holes", "islands"):
    raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
  fill_holes = mode == "holes"
  working = ~mask if fill_holes else mask
  regions, count = ndimage.label(working, structure=np.ones((3, 3), bool))
  sizes = np.bincount(regions.reshape(-1), minlength=count + 1)[1:]
  small = np.flatnonzero(sizes < area_thresh) + 1
  if len(small) == 0:
    return mask, False
  if fill_holes:
    return mask | np.isin(regions, small), True
  keep = np.setdiff1d(np.arange(1, count + 1), small)
  if len(keep) == 0:
    keep = np.array([int(np.argmax(sizes)) + 1])
  return np.isin(regions, keep), True


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
  """SAM's record bbox: (x0, y0, x1 − x0, y1 − y0) of its inclusive box."""
  x0, y0, x1, y1 = (float(v) for v in box)
  return [x0, y0, x1 - x0, y1 - y0]


# ----------------------------------------------------------------------------
# The generator.
# ----------------------------------------------------------------------------


class EfficientSamAutomaticMaskGenerator:
  """SAM's ``SamAutomaticMaskGenerator`` for EfficientSAM, with the same arguments and defaults.

  Extra arguments: ``upsample_batch`` (survivors upsampled per call), ``canvas_multiple``
  (full-resolution outputs are padded to a multiple of this, one compilation per padded size),
  ``low_res_stability_margin`` (the low-res pre-filter keeps stability ≥ threshold − margin, since
  the 256×256 estimate differs slightly from the full-resolution score that decides).
  ``point_grids`` (one [N, 2] array in [0, 1] per crop layer) replaces the regular grids.
  """

  def __init__(self, model: EfficientSam, params, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
               pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
               stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
               crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
               crop_n_points_downscale_factor: int = 1, point_grids: Optional[list[np.ndarray]] = None,
               min_mask_region_area: int = 0, output_mode: str = "binary_mask", mask_threshold: float = 0.0,
               upsample_batch: int = 16, canvas_multiple: int = 256, low_res_stability_margin: float = 0.02):
    if (points_per_side is None) == (point_grids is None):
      raise ValueError("give exactly one of points_per_side and point_grids")
    if output_mode not in OUTPUT_MODES:
      raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
    if points_per_batch < 1 or upsample_batch < 1 or canvas_multiple < 1:
      raise ValueError("points_per_batch, upsample_batch and canvas_multiple must be positive")
    if crop_n_layers < 0:
      raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
    if point_grids is None:
      point_grids = build_layer_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
    elif len(point_grids) != crop_n_layers + 1:
      raise ValueError(f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs "
                       f"{crop_n_layers + 1}")
    self.model, self.params = model, params
    self.point_grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
    self.points_per_batch = int(points_per_batch)
    self.pred_iou_thresh = float(pred_iou_thresh)
    self.stability_score_thresh = float(stability_score_thresh)
    self.stability_score_offset = float(stability_score_offset)
    self.box_nms_thresh = float(box_nms_thresh)
    self.crop_n_layers = int(crop_n_layers)
    self.crop_nms_thresh = float(crop_nms_thresh)
    self.crop_overlap_ratio = float(crop_overlap_ratio)
    self.min_mask_region_area = int(min_mask_region_area)
    self.output_mode = output_mode
    self.mask_threshold = float(mask_threshold)
    self.upsample_batch = int(upsample_batch)
    self.canvas_multiple = int(canvas_multiple)
    self.low_res_stability_margin = float(low_res_stability_margin)
    self.last_stats: dict[str, int] = {}

  def generate(self, image: Any) -> list[dict]:
    """Records for uint8 [H, W, 3] ``image`` (gray/RGBA converted), SAM's format, in no particular order."""
    image = to_rgb_uint8(image)
    height, width = image.shape[:2]
    crop_boxes, layers = generate_crop_boxes((height, width), self.crop_n_layers, self.crop_overlap_ratio)
    self.last_stats = {"candidates": 0, "mask_stage_prompts": 0, "after_filters": 0, "upsampled": 0, "after_nms": 0,
                       "after_full_res_filters": 0, "nms_rounds": 0}
    found = []
    for crop_box, layer in zip(crop_boxes, layers):
      found.extend(self._process_crop(image, crop_box, layer))
    if len(crop_boxes) > 1 and found:
      # Prefer masks from smaller crops (SAM scores by 1 / crop area).
      crop_area = np.array([(r["_crop"][2] - r["_crop"][0]) * (r["_crop"][3] - r["_crop"][1]) for r in found])
      keep = box_nms(np.array([r["_box"] for r in found]), 1.0 / crop_area, self.crop_nms_thresh)
      found = [found[i] for i in keep]
    if self.min_mask_region_area > 0:
      found = self._clean_small_regions(found)
    self.last_stats["records"] = len(found)
    return [self._record(r) for r in found]

  def warm_up(self, image_hw: tuple[int, int]) -> None:
    """Compiles both decoding stages and the upsampling for images of this canvas bucket (benchmarks call it)."""
    height, width = image_hw
    embedding = embed_image(self.model, self.params, np.zeros((height, width, 3), np.uint8))
    size = jnp.array([height, width], jnp.int32)
    state, iou, _ = _prompt_stage(self.model, self.params, embedding, np.zeros((self.points_per_batch, 2), np.float32),
                                  np.ones(self.points_per_batch, bool), size, self.pred_iou_thresh)
    for stage_size in mask_stage_sizes(self.points_per_batch):
      low_res = self._mask_stage(state, iou, np.zeros(stage_size, np.int32), size)[0]
    rows, cols = canvas_matrices((height, width), low_res.shape[-1], self.canvas_multiple)
    jax.block_until_ready(_finish_chunk(low_res, np.zeros(self.upsample_batch, np.int32), rows, cols, size,
                                        self.mask_threshold, self.stability_score_offset))

  def _mask_stage(self, state, iou, index, image_hw):
    return _mask_stage(self.model, self.params, state, iou, index, image_hw, self.pred_iou_thresh,
                       self.stability_score_thresh - self.low_res_stability_margin, self.stability_score_offset,
                       self.mask_threshold)

  # -- per crop -------------------------------------------------------------------

  def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int) -> list[dict]:
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1]
    crop_h, crop_w = crop.shape[:2]
    embedding = embed_image(self.model, self.params, crop)
    crop_hw = jnp.array([crop_h, crop_w], jnp.int32)
    points = self.point_grids[layer] * np.array([crop_w, crop_h], np.float64)
    image_box = [0, 0, image.shape[1], image.shape[0]]
    offset = np.array([x0, y0, x0, y0], np.float64)

    batches, candidates = [], []  # candidates: (batch, index, iou, stability, box in image pixels, point)
    size = self.points_per_batch
    for start in range(0, len(points), size):
      chunk = points[start:start + size]
      padded = np.zeros((size, 2), np.float32)
      padded[:len(chunk)] = chunk
      valid = np.arange(size) < len(chunk)
      self.last_stats["candidates"] += 3 * len(chunk)
      state, iou, needed = _prompt_stage(self.model, self.params, embedding, padded, valid, crop_hw,
                                         self.pred_iou_thresh)
      prompts = np.flatnonzero(jax.device_get(needed))
      self.last_stats["mask_stage_prompts"] += len(prompts)
      if not len(prompts):
        continue
      # Only prompts with a mask above the IoU threshold are upscaled, in the smallest compiled size.
      index = np.zeros(next(n for n in mask_stage_sizes(size) if n >= len(prompts)), np.int32)
      index[:len(prompts)] = prompts
      low_res, keep, iou, stability, boxes = self._mask_stage(state, iou, index, crop_hw)
      keep, iou, stability, boxes = jax.device_get((keep, iou, stability, boxes))
      passed = np.flatnonzero(keep[:3 * len(prompts)])
      # Masks touching a crop edge inside the image are partial: SAM drops them.
      passed = passed[~is_box_near_crop_edge(boxes[passed] + offset, crop_box, image_box)]
      if not len(passed):
        continue
      batches.append(low_res)
      for i in passed:
        candidates.append((len(batches) - 1, int(i), float(iou[i]), float(stability[i]), boxes[i] + offset,
                           chunk[index[i // 3]]))
    self.last_stats["after_filters"] += len(candidates)
    if not candidates:
      return []
    return self._suppress_and_upsample(batches, candidates, (crop_h, crop_w), crop_box, image.shape[:2])

  def _suppress_and_upsample(self, batches, candidates, crop_hw, crop_box, image_hw) -> list[dict]:
    """NMS on the low-res boxes, then full resolution for the survivors only.

    A survivor that fails the full-resolution checks is dropped and NMS runs again without
    it (with exact boxes for the masks already upsampled), so that the masks it suppressed
    get their chance, as when SAM filters before NMS. Usually one round suffices.
    """
    boxes = np.array([c[4] for c in candidates], np.float64)
    scores = np.array([c[2] for c in candidates], np.float64)
    alive = np.ones(len(candidates), bool)
    finished: dict[int, Optional[dict]] = {}
    rounds = 0
    while True:
      alive_index = np.flatnonzero(alive)
      keep = alive_index[box_nms(boxes[alive_index], scores[alive_index], self.box_nms_thresh)]
      todo = [int(i) for i in keep if int(i) not in finished]
      if not todo:
        break
      # Chunks have a fixed size: fill their free slots with the best unfinished candidates of the
      # same batch, which a later round may need, at no extra device time.
      per_batch: dict[int, int] = {}
      for i in todo:
        per_batch[candidates[i][0]] = per_batch.get(candidates[i][0], 0) + 1
      chosen = set(todo)
      for i in np.argsort(-scores, kind="stable"):
        batch = candidates[i][0]
        if batch in per_batch and per_batch[batch] % self.upsample_batch and alive[i] and int(i) not in finished \
            and int(i) not in chosen:
          todo.append(int(i))
          chosen.add(int(i))
          per_batch[batch] += 1
      rounds += 1
      for i, result in zip(todo, self._full_resolution(batches, [candidates[i] for i in todo], crop_hw, crop_box,
                                                          image_hw)):
        finished[i] = result
        if result is None:
          alive[i] = False
        else:
          boxes[i] = result["_box"]
    found = [finished[int(i)] for i in keep]
    self.last_stats["after_nms"] += len(found)
    self.last_stats["nms_rounds"] = max(self.last_stats.get("nms_rounds", 0), rounds)
    self.last_stats["upsampled"] = self.last_stats.get("upsampled", 0) + len(finished)
    self.last_stats["after_full_res_filters"] += len(found)
    return found

  def _full_resolution(self, batches, candidates, crop_hw, crop_box, image_hw) -> list[Optional[dict]]:
    """Upsamples candidates in fixed-size chunks; a found-mask dict each, or None if it fails the filters."""
    crop_h, crop_w = crop_hw
    rows, cols = canvas_matrices(crop_hw, batches[candidates[0][0]].shape[-1], self.canvas_multiple)
    size_array = jnp.array(crop_hw, jnp.int32)
    x0, y0 = crop_box[0], crop_box[1]
    results: list[Optional[dict]] = [None] * len(candidates)
    by_batch: dict[int, list[int]] = {}
    for position, candidate in enumerate(candidates):
      by_batch.setdefault(candidate[0], []).append(position)
    for batch, positions in by_batch.items():
      for start in range(0, len(positions), self.upsample_batch):
        chunk = positions[start:start + self.upsample_batch]
        index = np.zeros(self.upsample_batch, np.int32)
        index[:len(chunk)] = [candidates[p][1] for p in chunk]
        masks, stability, area, boxes = jax.device_get(_finish_chunk(
            batches[batch], index, rows, cols, size_array, self.mask_threshold, self.stability_score_offset))
        for j, position in enumerate(chunk):
          _, _, iou, _, _, point = candidates[position]
          if stability[j] < self.stability_score_thresh or area[j] == 0:
            continue
          box = boxes[j].astype(np.float64) + np.array([x0, y0, x0, y0])
          if crop_hw != tuple(image_hw) and is_box_near_crop_edge(box[None], crop_box,
                                                                   [0, 0, image_hw[1], image_hw[0]])[0]:
            continue
          results[position] = {
              "_mask": masks[j, :crop_h, :crop_w], "_box": box, "_crop": list(crop_box), "_image_hw": tuple(image_hw),
              "predicted_iou": iou, "stability_score": float(stability[j]),
              "point_coords": [[float(point[0]) + x0, float(point[1]) + y0]], "area": int(area[j])}
    return results

  # -- post-processing --------------------------------------------------------------

  def _full_mask(self, found: dict) -> np.ndarray:
    height, width = found["_image_hw"]
    x0, y0, x1, y1 = found["_crop"]
    if (x0, y0, x1, y1) == (0, 0, width, height):
      return found["_mask"]
    full = np.zeros((height, width), bool)
    full[y0:y1, x0:x1] = found["_mask"]
    return full

  def _clean_small_regions(self, found: list[dict]) -> list[dict]:
    """SAM's postprocess_small_regions: fill small holes, drop small islands, NMS preferring unchanged masks."""
    masks, scores = [], []
    for entry in found:
      mask = self._full_mask(entry)
      mask, holes_changed = remove_small_regions(mask, self.min_mask_region_area, "holes")
      mask, islands_changed = remove_small_regions(mask, self.min_mask_region_area, "islands")
      masks.append(mask)
      scores.append(0.0 if (holes_changed or islands_changed) else 1.0)
    boxes = np.stack([_host_box(m) for m in masks])
    keep = box_nms(boxes, np.array(scores), self.box_nms_thresh)
    cleaned = []
    for i in keep:
      entry = dict(found[i])
      if scores[i] == 0.0:
        height, width = entry["_image_hw"]
        entry.update(_mask=masks[i], _crop=[0, 0, width, height], _box=boxes[i], area=int(masks[i].sum()))
      cleaned.append(entry)
    return cleaned

  def _record(self, found: dict) -> dict:
    mask = self._full_mask(found)
    if self.output_mode == "coco_rle":
      segmentation = encode_rle(mask[None])[0]
    elif self.output_mode == "uncompressed_rle":
      segmentation = mask_to_uncompressed_rle(mask)
    else:
      segmentation = mask
    return {"segmentation": segmentation, "area": int(found["area"]), "bbox": xyxy_to_xywh(found["_box"]),
            "predicted_iou": float(found["predicted_iou"]), "point_coords": found["point_coords"],
            "stability_score": float(found["stability_score"]), "crop_box": xyxy_to_xywh(found["_crop"])}


def _host_box(mask: np.ndarray) -> np.ndarray:
  """Inclusive (x0, y0, x1, y1) of a bool mask; zeros when empty."""
  ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if len(xs) == 0:
    return np.zeros(4)
  return np.array([xs[0], ys[0], xs[-1], ys[-1]], np.float64)


def compile_cache_sizes() -> dict[str, int]:
  """Compiled variants of the generator's jitted stages (tests check that a new image size adds none)."""
  return {name: fn._cache_size() for name, fn in  # pylint: disable=protected-access
          (("prompt_stage", _prompt_stage), ("mask_stage", _mask_stage), ("finish_chunk", _finish_chunk),
           ("decode", decode_in_pixels))}


# ----------------------------------------------------------------------------
# Overlay.
# ----------------------------------------------------------------------------


def render_records(image: np.ndarray, records: list[dict], seed: int = 0, alpha: float = 0.5) -> np.ndarray:
  """The image with each record's mask in a random colour, largest first (small masks stay visible)."""
  canvas = to_rgb_uint8(image).astype(np.float32)
  rng = np.random.default_rng(seed)
  for record in sorted(records, key=lambda r: -r["area"]):
    segmentation = record["segmentation"]
    mask = segmentation if isinstance(segmentation, np.ndarray) else decode_rle(segmentation)
    color = rng.uniform(40, 255, size=3)
    canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
  return canvas.round().astype(np.uint8)


def records_to_json(records: list[dict]) -> list[dict]:
  """Records with binary masks turned into COCO RLE (str counts), ready for ``json.dump``."""
  out = []
  for record in records:
    record = dict(record)
    if isinstance(record["segmentation"], np.ndarray):
      record["segmentation"] = encode_rle(record["segmentation"][None])[0]
    out.append(record)
  return out


# ----------------------------------------------------------------------------
# Command line (``python -m efficientsam_jax.predict --everything``).
# ----------------------------------------------------------------------------


def add_cli_arguments(parser) -> None:
  """The ``--everything`` options of the predict CLI (SAM's defaults)."""
  group = parser.add_argument_group("segment everything (--everything)")
  group.add_argument("--everything", action="store_true",
                     help="segment everything (SAM's automatic mask generator) instead of prompting; "
                          "writes the overlay (--output) and the records as JSON with RLE (--records-out)")
  group.add_argument("--records-out", help="records JSON (default: --output with .json)")
  group.add_argument("--points-per-side", type=int, default=32)
  group.add_argument("--points-per-batch", type=int, default=64)
  group.add_argument("--pred-iou-thresh", type=float, default=0.88)
  group.add_argument("--stability-score-thresh", type=float, default=0.95)
  group.add_argument("--box-nms-thresh", type=float, default=0.7)
  group.add_argument("--crop-n-layers", type=int, default=0)
  group.add_argument("--min-mask-region-area", type=int, default=0)


def run_cli(model, params, image: np.ndarray, args) -> dict:
  """Generates the records for ``image``, writes the overlay PNG and the records JSON; returns a summary."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  from PIL import Image  # pylint: disable=import-outside-toplevel

  from efficientsam_jax.common.files import atomic_file  # pylint: disable=import-outside-toplevel
  generator = EfficientSamAutomaticMaskGenerator(
      model, params, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
      pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
      box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers,
      min_mask_region_area=args.min_mask_region_area, output_mode="coco_rle")
  start = time.perf_counter()
  records = generator.generate(image)
  seconds = time.perf_counter() - start
  records_path = args.records_out or os.path.splitext(args.output)[0] + ".json"
  for path in (args.output, records_path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_file(records_path) as tmp, open(tmp, "w") as f:
    json.dump(records, f)
  with atomic_file(args.output, suffix=os.path.splitext(args.output)[1]) as tmp:
    Image.fromarray(render_records(image, records)).save(tmp)
  print(f"segment everything: {len(records)} masks in {seconds:.2f} s (first call includes compilation); "
        f"stages {generator.last_stats}")
  print(f"wrote {args.output}")
  print(f"wrote {records_path}")
  return {"records": records, "records_path": records_path, "seconds": seconds}
