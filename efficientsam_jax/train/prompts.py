"""Prompt simulation for finetuning, inside the jitted step (SAM's recipe, REFERENCE.md §3).

Every function works on fixed shapes over a batch of masks [..., M, M] (the
loss grid) and returns points in the model's input grid (``img_size`` pixels),
so nothing is ragged and nothing leaves the device:

* ``first_prompts``: per mask, with probability ``point_prob`` one point
  uniform inside the mask, else the mask's box with uniform noise of up to 10%
  of its side on each coordinate (at most 20 px at 1024, scaled with the image).
* ``add_correction_point``: one more point drawn uniformly from the error region
  of the current prediction, positive in a false negative, negative in a false
  positive; written into the next free slot of the (at most 6-point) prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POSITIVE, NEGATIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PAD = 1.0, 0.0, 2.0, 3.0, -1.0


def sample_in_region(rng: jax.Array, region: jax.Array, img_size: int):
  """A point uniform in each boolean region [..., M, M] → (xy [..., 2] in ``img_size`` pixels, found [...]).

  A cell is drawn uniformly among the region's cells (Gumbel-max), then a
  position uniformly inside that cell. Empty regions give ``found`` False.
  """
  m = region.shape[-1]
  flat = region.reshape(*region.shape[:-2], m * m)
  cell_rng, offset_rng = jax.random.split(rng)
  scores = jnp.where(flat, jax.random.gumbel(cell_rng, flat.shape), -jnp.inf)
  cell = jnp.argmax(scores, axis=-1)
  offset = jax.random.uniform(offset_rng, (*cell.shape, 2))
  xy = (jnp.stack([cell % m, cell // m], axis=-1) + offset) * (img_size / m)
  return xy, flat.any(axis=-1)


def cell_of(xy: jax.Array, m: int, img_size: int) -> jax.Array:
  """Flat index of the loss-grid cell holding each point (clipped to the grid)."""
  ij = jnp.clip(jnp.floor(xy * (m / img_size)).astype(jnp.int32), 0, m - 1)
  return ij[..., 1] * m + ij[..., 0]


def noisy_boxes(rng: jax.Array, boxes: jax.Array, img_size: int, max_noise_px: float) -> jax.Array:
  """Boxes [..., 4] (x0, y0, x1, y1) with each coordinate moved uniformly by ≤ min(10% of the side, max px)."""
  side = jnp.concatenate([boxes[..., 2:] - boxes[..., :2]] * 2, axis=-1)
  bound = jnp.minimum(0.1 * side, max_noise_px)
  noisy = boxes + bound * jax.random.uniform(rng, boxes.shape, minval=-1.0, maxval=1.0)
  x0y0 = jnp.clip(jnp.minimum(noisy[..., :2], noisy[..., 2:]), 0.0, img_size)
  x1y1 = jnp.clip(jnp.maximum(noisy[..., :2], noisy[..., 2:]), 0.0, img_size)
  return jnp.concatenate([x0y0, x1y1], axis=-1)


def first_prompts(rng: jax.Array, masks: jax.Array, boxes: jax.Array, *, img_size: int, num_points: int,
                  point_prob: float = 0.5, max_noise_px: float = 20.0):
  """The first prompt of every mask.

  Args:
    masks: bool [..., M, M] (e.g. [B, N, M, M]); boxes: [..., 4] exact boxes in ``img_size`` pixels.
    max_noise_px: the box-noise cap at a 1024 input (scaled by ``img_size / 1024``).

  Returns:
    points [..., P, 2], labels [..., P] (padding -1), is_point bool [...]
    and next_slot int [...] (1 after a point, 2 after a box).
  """
  point_rng, box_rng, choice_rng = jax.random.split(rng, 3)
  point, _ = sample_in_region(point_rng, masks, img_size)
  box = noisy_boxes(box_rng, boxes.astype(jnp.float32), img_size, max_noise_px * img_size / 1024)
  is_point = jax.random.bernoulli(choice_rng, point_prob, masks.shape[:-2])
  pad_xy = jnp.full((*masks.shape[:-2], num_points - 2, 2), PAD)
  points = jnp.where(is_point[..., None, None],
                     jnp.concatenate([point[..., None, :], jnp.full_like(point[..., None, :], PAD), pad_xy], -2),
                     jnp.concatenate([box[..., None, :2], box[..., None, 2:], pad_xy], -2))
  pad_labels = jnp.full((*masks.shape[:-2], num_points - 2), PAD)
  point_labels = jnp.concatenate([jnp.full((*masks.shape[:-2], 2), jnp.array([POSITIVE, PAD])), pad_labels], -1)
  box_labels = jnp.concatenate([jnp.full((*masks.shape[:-2], 2), jnp.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT])),
                                pad_labels], -1)
  labels = jnp.where(is_point[..., None], point_labels, box_labels)
  next_slot = jnp.where(is_point, 1, 2)
  return points, labels, is_point, next_slot


def add_correction_point(rng: jax.Array, points, labels, next_slot, prediction: jax.Array, masks: jax.Array,
                         img_size: int):
  """Adds one point from the error region of ``prediction`` (bool [..., M, M], as ``masks``) at ``next_slot``.

  Where the prediction is already exact nothing is added (the slot stays padding).
  Returns (points, labels, next_slot).
  """
  false_negative = masks & ~prediction
  error = false_negative | (prediction & ~masks)
  xy, found = sample_in_region(rng, error, img_size)
  m = masks.shape[-1]
  positive = jnp.take_along_axis(false_negative.reshape(*masks.shape[:-2], m * m),
                                 cell_of(xy, m, img_size)[..., None], axis=-1)[..., 0]
  label = jnp.where(found, jnp.where(positive, POSITIVE, NEGATIVE), PAD)
  slot = jax.nn.one_hot(next_slot, points.shape[-2], dtype=bool) & found[..., None]
  points = jnp.where(slot[..., None], xy[..., None, :], points)
  labels = jnp.where(slot, label[..., None], labels)
  return points, labels, next_slot + found.astype(next_slot.dtype)
