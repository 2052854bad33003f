"""SAMI: masked image pretraining that reconstructs SAM image-encoder features.

The student is EfficientSAM's ViT (``ImageEncoderViT.embed``/``transform``,
same parameter names, so its weights load straight into EfficientSAM). It sees
a random ``1 - mask_ratio`` of its patches (MAE masking: per-sample noise,
argsort, keep the first tokens). A decoder predicts the features of the masked
tokens; decoder outputs (masked) and projected encoder outputs (visible) are put
back in the original order and a linear head maps every token to the teacher's
width. The loss compares them with the teacher's features of the whole image.

Decoders (paper §3.2 and its ablation):
* ``cross``: queries are the masked tokens (mask token + decoder position
  embedding); keys/values are the visible encoder outputs and the masked tokens.
* ``self``: MAE's decoder, self-attention over the full re-ordered sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientsam_jax.common.config import JsonConfig
from efficientsam_jax.models.layers import attention, layer_norm
from efficientsam_jax.models.vit import VIT_SIZES, Block, ImageEncoderViT, Mlp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SamiConfig(JsonConfig):
  _KIND = "SAMI"

  encoder_embed_dim: int = 384
  encoder_depth: int = 12
  encoder_num_heads: int = 6
  img_size: int = 224
  patch_size: int = 16
  decoder_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  decoder_type: str = "cross"  # "cross" (SAMI) or "self" (MAE)
  target_dim: int = 256  # SAM's image-encoder output width
  mask_ratio: float = 0.75

  def __post_init__(self):
    if self.decoder_type not in ("cross", "self"):
      raise ValueError(f"decoder_type must be 'cross' or 'self', got {self.decoder_type!r}")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

  @classmethod
  def from_variant(cls, name: str, **overrides) -> "SamiConfig":
    if name not in VIT_SIZES:
      raise ValueError(f"unknown ViT variant {name!r}; known: {sorted(VIT_SIZES)}")
    size = VIT_SIZES[name]
    return cls(encoder_embed_dim=size.width, encoder_depth=size.depth, encoder_num_heads=size.num_heads,
               **overrides)

  @property
  def num_tokens(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  @property
  def num_visible(self) -> int:
    return max(1, int(round(self.num_tokens * (1.0 - self.mask_ratio))))


def random_masking(rng: jax.Array, batch: int, num_tokens: int, num_visible: int):
  """MAE masking as index arrays.

  Returns:
    shuffle [B, N]: token order, visible ones first (``shuffle[:, :num_visible]``);
    restore [B, N]: its inverse, ``take_along_axis(x_shuffled, restore)`` undoes it;
    mask [B, N]: 1.0 where the token is hidden from the encoder.
  """
  noise = jax.random.uniform(rng, (batch, num_tokens))
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  mask = (restore >= num_visible).astype(jnp.float32)
  return shuffle, restore, mask


def _gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, index[..., None], axis=1)


class CrossAttentionBlock(nn.Module):
  """Pre-norm block: queries attend to [context; queries], then an MLP."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, context: jax.Array) -> jax.Array:
    width = queries.shape[-1]
    head = width // self.num_heads
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head)
    q_in = layer_norm(1e-6, "norm_q", self.dtype)(queries)
    kv_in = jnp.concatenate([layer_norm(1e-6, "norm_kv", self.dtype)(context), q_in], axis=1)
    q = nn.Dense(width, dtype=self.dtype, name="q")(q_in)
    k = nn.Dense(width, dtype=self.dtype, name="k")(kv_in)
    v = nn.Dense(width, dtype=self.dtype, name="v")(kv_in)
    out = attention(split(q), split(k), split(v)).reshape(queries.shape)
    queries = queries + nn.Dense(width, dtype=self.dtype, name="proj")(out)
    return queries + Mlp(4 * width, dtype=self.dtype, name="mlp")(layer_norm(1e-6, "norm2", self.dtype)(queries))


class SamiModel(nn.Module):
  """Student encoder + decoder + linear head. ``__call__`` → (predictions [B, N, target], mask [B, N])."""

  config: SamiConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    self.encoder = ImageEncoderViT(img_size=c.img_size, embed_dim=c.encoder_embed_dim, depth=c.encoder_depth,
                                   num_heads=c.encoder_num_heads, patch_size=c.patch_size,
                                   pretrain_img_size=c.img_size, dtype=self.dtype, remat=self.remat)
    self.encoder_norm = layer_norm(1e-6, None, self.dtype)
    self.decoder_embed = nn.Dense(c.decoder_dim, dtype=self.dtype)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, c.decoder_dim))
    self.decoder_pos_embed = self.param("decoder_pos_embed", nn.initializers.normal(0.02),
                                        (1, c.num_tokens, c.decoder_dim))
    if c.decoder_type == "cross":
      self.decoder_blocks = [CrossAttentionBlock(c.decoder_num_heads, dtype=self.dtype)
                             for _ in range(c.decoder_depth)]
    else:
      self.decoder_blocks = [Block(c.decoder_num_heads, dtype=self.dtype) for _ in range(c.decoder_depth)]
    self.decoder_norm = layer_norm(1e-6, None, self.dtype)
    self.head = nn.Dense(c.target_dim, dtype=self.dtype)

  def __call__(self, images: jax.Array, rng: jax.Array):
    """images [B, S, S, 3] normalized; rng draws the mask."""
    c = self.config
    x = self.encoder.embed(images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, c.num_tokens, c.encoder_embed_dim)
    shuffle, restore, mask = random_masking(rng, batch, c.num_tokens, c.num_visible)
    visible_index, masked_index = shuffle[:, :c.num_visible], shuffle[:, c.num_visible:]

    visible = self.encoder.transform(_gather_tokens(x, visible_index))
    visible = self.decoder_embed(self.encoder_norm(visible))
    pos = jnp.broadcast_to(self.decoder_pos_embed.astype(visible.dtype), (batch, c.num_tokens, c.decoder_dim))
    masked = jnp.broadcast_to(self.mask_token.astype(visible.dtype), (batch, masked_index.shape[1], c.decoder_dim))
    masked = masked + _gather_tokens(pos, masked_index)

    if c.decoder_type == "cross":
      context = visible + _gather_tokens(pos, visible_index)
      for block in self.decoder_blocks:
        masked = block(masked, context)
      tokens = jnp.concatenate([visible, self.decoder_norm(masked)], axis=1)
    else:
      tokens = jnp.concatenate([visible + _gather_tokens(pos, visible_index), masked], axis=1)
      for block in self.decoder_blocks:
        tokens = block(tokens)
      tokens = self.decoder_norm(tokens)
    tokens = _gather_tokens(tokens, restore)  # back to the image's token order
    return self.head(tokens).astype(jnp.float32), mask


def sami_loss(predictions: jax.Array, targets: jax.Array, mask: jax.Array, kind: str = "mse",
              tokens: str = "all") -> jax.Array:
  """Per-example loss [B]. ``kind`` "mse" (paper eq. 1) or "cosine" (1 - cos); ``tokens`` "all" or "masked"."""
  targets = targets.astype(jnp.float32)
  if kind == "mse":
    per_token = jnp.mean(jnp.square(predictions - targets), axis=-1)
  elif kind == "cosine":
    eps = 1e-6
    cos = jnp.sum(predictions * targets, -1) / (
        jnp.linalg.norm(predictions, axis=-1) * jnp.linalg.norm(targets, axis=-1) + eps)
    per_token = 1.0 - cos
  else:
    raise ValueError(f"loss kind must be 'mse' or 'cosine', got {kind!r}")
  if tokens == "all":
    return jnp.mean(per_token, axis=-1)
  if tokens == "masked":
    return jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
  raise ValueError(f"loss tokens must be 'all' or 'masked', got {tokens!r}")


def student_encoder_params(sami_params) -> dict:
  """The student's ViT parameters, named as EfficientSAM's ``image_encoder`` (without the neck)."""
  return dict(sami_params["encoder"])
