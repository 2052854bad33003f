"""EfficientSAM's point prompt encoder (points only; boxes are two points).

Differs from SAM's: padding points (label -1) keep their positional encoding
and get ``invalid_points`` added, negative points (label 0) get nothing added,
and there is no mask input or dense prompt embedding.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Label semantics of the official model.
LABEL_PADDING = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3
VALID_LABELS = (LABEL_PADDING, LABEL_NEGATIVE, LABEL_POSITIVE, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT)


class PositionEmbeddingRandom(nn.Module):
  """Random-Fourier positional encoding with a fixed Gaussian [2, C/2] matrix.

  The matrix is a buffer in the official model (never trained); here it is a
  parameter that training code keeps frozen.
  """

  num_pos_feats: int

  def setup(self):
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix", nn.initializers.normal(1.0), (2, self.num_pos_feats))

  def encode_unit(self, coords: jax.Array) -> jax.Array:
    """Encodes coordinates in [0, 1]² (last axis (x, y)) → [..., 2·num_pos_feats]."""
    coords = 2 * coords - 1
    coords = coords @ self.positional_encoding_gaussian_matrix.astype(coords.dtype)
    coords = 2 * math.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def dense(self, grid_hw: tuple[int, int]) -> jax.Array:
    """Encoding of the cell centres of an H×W grid → [H, W, C]."""
    h, w = grid_hw
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    return self.encode_unit(grid)

  def __call__(self, coords: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """Encodes pixel coordinates of an image of size ``image_hw``."""
    scale = jnp.array([image_hw[1], image_hw[0]], dtype=jnp.float32)
    return self.encode_unit(coords.astype(jnp.float32) / scale)


class PromptEncoder(nn.Module):
  """Points [..., P, 2] (model-input pixels, padded) + labels [..., P] → [..., P, C]."""

  embed_dim: int
  input_image_size: int

  def setup(self):
    self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
    embed = lambda name: nn.Embed(1, self.embed_dim, name=name)
    self.invalid_points = embed("invalid_points")
    self.point_embeddings = embed("point_embeddings")
    self.bbox_top_left_embeddings = embed("bbox_top_left_embeddings")
    self.bbox_bottom_right_embeddings = embed("bbox_bottom_right_embeddings")

  def dense_pe(self, grid_hw: tuple[int, int]) -> jax.Array:
    return self.pe_layer.dense(grid_hw)

  def __call__(self, points: jax.Array, labels: jax.Array) -> jax.Array:
    size = self.input_image_size
    x = self.pe_layer(points + 0.5, (size, size))
    labels = labels[..., None]
    for label, table in ((LABEL_PADDING, self.invalid_points),
                         (LABEL_POSITIVE, self.point_embeddings),
                         (LABEL_BOX_TOP_LEFT, self.bbox_top_left_embeddings),
                         (LABEL_BOX_BOTTOM_RIGHT, self.bbox_bottom_right_embeddings)):
      x = x + jnp.where(labels == label, table.embedding[0], 0.0)
    return x
