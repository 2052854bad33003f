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

``kernels`` (``layers.Kernels``) picks the attention, LayerNorm and GELU
implementations; the student encoder always keeps the exact GELU of the
EfficientSAM encoder it is exported to. The token gathers' gradients are
gathers too (``take_permuted``), not scatters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientsam_jax.common.config import JsonConfig
from efficientsam_jax.models.layers import DenseParams, Kernels, pad_tokens, per_example, remat
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


def random_masking(rng: jax.Array, batch: int, num_tokens: int, num_visible: int,
                   example_ids: Optional[jax.Array] = None):
  """MAE masking as index arrays.

  Example ``i``'s noise is drawn from ``fold_in(rng, example_ids[i])`` (ids
  default to 0 … batch − 1), so an example's mask does not depend on which other
  examples share its batch (microbatches draw what the whole batch would).

  Returns:
    shuffle [B, N]: token order, visible ones first (``shuffle[:, :num_visible]``);
    restore [B, N]: its inverse, ``take_along_axis(x_shuffled, restore)`` undoes it;
    mask [B, N]: 1.0 where the token is hidden from the encoder.
  """
  ids = jnp.arange(batch, dtype=jnp.int32) if example_ids is None else example_ids
  noise = per_example(lambda key: jax.random.uniform(key, (num_tokens,)), rng, ids)
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  mask = (restore >= num_visible).astype(jnp.float32)
  return shuffle, restore, mask


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """``x[b, index[b, t]]`` for x [B, N, C] and index [B, T] (in range): [B, T, C].

  One gather of rows of x seen as [B·N, C], the form of an embedding lookup. ``take_along_axis`` gives the same
  values through a gather with a batch dimension, which XLA's GPU compiler lays out token-major and batch-minor
  ([T, C, B]); that layout then follows the residual stream through every block, with a transpose at each
  matmul (H100 compile of the SAMI ViT-S step: ~12 GB of transposes per step at batch 256, BENCHMARKS.md).
  """
  batch, tokens = x.shape[:2]
  rows = index + tokens * jnp.arange(batch, dtype=index.dtype)[:, None]
  return jnp.take(x.reshape(batch * tokens, *x.shape[2:]), rows, axis=0, mode="clip")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def take_permuted(x: jax.Array, order: jax.Array, inverse: jax.Array, start: int, stop: int) -> jax.Array:
  """Tokens ``order[:, start:stop]`` of x [B, N, C] (or of x [1, N, C] for every example): ``x[b, order[b,
  start:stop]]``.

  ``order`` [B, N] is a permutation of the N tokens and ``inverse`` its inverse.
  Same value as ``take_along_axis``, but the gradient is a gather as well (the
  cotangent, zero-padded to N tokens in ``order``'s order, taken by ``inverse``)
  where ``take_along_axis``'s is a scatter-add that cannot know the indices are distinct.
  """
  if x.shape[0] == 1:  # one table for all: an embedding lookup
    return jnp.take(x[0], order[:, start:stop], axis=0, mode="clip")
  return take_rows(x, order[:, start:stop])


def _take_permuted_fwd(x, order, inverse, start, stop):
  return take_permuted(x, order, inverse, start, stop), (order, inverse, x.shape[0] == 1)


def _take_permuted_bwd(start, stop, residuals, cotangent):
  order, inverse, shared = residuals
  padded = jnp.pad(cotangent, ((0, 0), (start, order.shape[1] - stop), (0, 0)))
  grad = take_rows(padded, inverse)
  return (grad.sum(0, keepdims=True) if shared else grad), None, None


take_permuted.defvjp(_take_permuted_fwd, _take_permuted_bwd)


class CrossAttentionBlock(nn.Module):
  """Pre-norm block: queries attend to [context; queries], then an MLP."""

  num_heads: int
  dtype: Dtype = jnp.float32
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, queries: jax.Array, context: jax.Array) -> jax.Array:
    width, kern = queries.shape[-1], self.kernels
    head = width // self.num_heads
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head)
    q_in = kern.norm(1e-6, "norm_q", self.dtype)(queries)
    kv_in = jnp.concatenate([kern.norm(1e-6, "norm_kv", self.dtype)(context), q_in], axis=1)
    num_queries, num_keys = q_in.shape[1], kv_in.shape[1]
    q_in = pad_tokens(q_in, kern.token_padding(num_queries, head, self.dtype, keys=num_keys))
    kv_in = pad_tokens(kv_in, kern.token_padding(num_keys, head, self.dtype))
    # q, k and v as nn.Dense("q"|"k"|"v") would give them, their biases left to the attention (a bias add before a
    # custom call would be a kernel of its own); k and v from one matmul, except for cuDNN, whose custom call would
    # need them copied apart (the backward then also takes their gradients back through one matmul, not two).
    (wq, bq), (wk, bk), (wv, bv) = (DenseParams(width, name=name)(width) for name in "qkv")
    dot = lambda x, kernel: jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    q = dot(q_in, wq)
    if kern.implementation(num_keys, head, self.dtype) == "cudnn":
      k, v = split(dot(kv_in, wk)), split(dot(kv_in, wv))
    else:  # [B, Tk, 2, N, H]
      k, v = dot(kv_in, jnp.concatenate([wk, wv], axis=1)).reshape(*kv_in.shape[:-1], 2, self.num_heads, head), None
    bias = jnp.stack([bq, bk, bv]).reshape(3, self.num_heads, head)
    out = kern.attend(split(q), k, v, num_keys, bias).reshape(q.shape)
    queries = queries + nn.Dense(width, dtype=self.dtype, name="proj")(out)[:, :num_queries]
    return queries + Mlp(4 * width, dtype=self.dtype, kernels=kern, name="mlp")(
        kern.norm(1e-6, "norm2", self.dtype)(queries))


class SamiModel(nn.Module):
  """Student encoder + decoder + linear head. ``__call__`` → (predictions [B, N, target], mask [B, N])."""

  config: SamiConfig
  dtype: Dtype = jnp.float32
  remat: str | bool = "none"  # encoder and decoder blocks (layers.remat): "none", "full", "dots", "projections"
  kernels: Kernels = Kernels()

  def setup(self):
    c, kern = self.config, self.kernels
    self.encoder = ImageEncoderViT(img_size=c.img_size, embed_dim=c.encoder_embed_dim, depth=c.encoder_depth,
                                   num_heads=c.encoder_num_heads, patch_size=c.patch_size,
                                   pretrain_img_size=c.img_size, dtype=self.dtype, remat=self.remat,
                                   kernels=dataclasses.replace(kern, gelu="exact"))
    self.encoder_norm = kern.norm(1e-6, None, self.dtype)
    self.decoder_embed = nn.Dense(c.decoder_dim, dtype=self.dtype)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, c.decoder_dim))
    self.decoder_pos_embed = self.param("decoder_pos_embed", nn.initializers.normal(0.02),
                                        (1, c.num_tokens, c.decoder_dim))
    if c.decoder_type == "cross":
      block_cls = remat(CrossAttentionBlock, self.remat)
    else:
      block_cls = remat(Block, self.remat)
    self.decoder_blocks = [block_cls(c.decoder_num_heads, dtype=self.dtype, kernels=kern)
                           for _ in range(c.decoder_depth)]
    self.decoder_norm = kern.norm(1e-6, None, self.dtype)
    self.head = nn.Dense(c.target_dim, dtype=self.dtype)

  def __call__(self, images: jax.Array, rng: jax.Array, example_ids: Optional[jax.Array] = None):
    """images [B, S, S, 3] normalized; rng draws the mask (``random_masking``: per example, by ``example_ids``)."""
    c = self.config
    batch = images.shape[0]
    shuffle, restore, mask = random_masking(rng, batch, c.num_tokens, c.num_visible, example_ids)
    v, n = c.num_visible, c.num_tokens
    take = lambda t, start, stop: take_permuted(t, shuffle, restore, start, stop)  # tokens in shuffled order

    visible = self.encoder.transform(self.encoder.embed(images.astype(self.dtype), lambda t: take(t, 0, v)))
    visible = self.decoder_embed(self.encoder_norm(visible))
    pos = take(self.decoder_pos_embed.astype(visible.dtype), 0, n)
    masked = self.mask_token.astype(visible.dtype) + pos[:, v:]

    if c.decoder_type == "cross":
      context = visible + pos[:, :v]
      for block in self.decoder_blocks:
        masked = block(masked, context)
      tokens = jnp.concatenate([visible, self.decoder_norm(masked)], axis=1)
    else:
      tokens = jnp.concatenate([visible + pos[:, :v], masked], axis=1)
      for block in self.decoder_blocks:
        tokens = block(tokens)
      tokens = self.decoder_norm(tokens)
    # The head is per token: apply it before putting the tokens back in the image's order (fewer channels to move).
    predictions = take_permuted(self.head(tokens), restore, shuffle, 0, n)
    return predictions.astype(jnp.float32), mask


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
