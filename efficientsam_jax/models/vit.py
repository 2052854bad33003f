"""The EfficientSAM image encoder: a plain ViT with global attention and a neck.

Same computation as the official ``ImageEncoderViT``: the patch-16 conv (its
parameters, computed as a matmul over flattened patches: ``PatchProjection``), a
(1 + 14·14)-slot position table from 224-pixel pre-training whose grid part is
resized to the token grid with PyTorch bicubic on every call, pre-norm blocks
(LayerNorm eps 1e-6, qkv with bias, exact GELU), no final norm, then the neck
conv1×1 → LayerNorm2d → conv3×3 → LayerNorm2d. Input and output are NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientsam_jax.models.gelu_mlp import gelu_mlp
from efficientsam_jax.models.layers import DenseParams, Kernels, layer_norm, pad_tokens, remat
from efficientsam_jax.models.resize import resize

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ViTSize:
  width: int
  depth: int
  num_heads: int


# Student / encoder sizes. EfficientSAM-Ti and -S are the released models.
VIT_SIZES = {
    "ti": ViTSize(width=192, depth=12, num_heads=3),
    "s": ViTSize(width=384, depth=12, num_heads=6),
    "b": ViTSize(width=768, depth=12, num_heads=12),
}


class Attention(nn.Module):
  """Global multi-head self-attention with a fused qkv projection."""

  num_heads: int
  dtype: Dtype = jnp.float32
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    *batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head = width // self.num_heads
    padded = tokens + self.kernels.token_padding(tokens, head, self.dtype)
    # nn.Dense("qkv") without its bias add: the attention takes q, k and v packed, with their biases (the Pallas
    # kernels read them so and add the biases themselves: no bias add or split before the custom call)
    kernel, bias = DenseParams(3 * width, name="qkv")(width)
    qkv = jnp.dot(pad_tokens(x, padded - tokens).astype(self.dtype), kernel.astype(self.dtype))
    qkv = qkv.reshape(*batch, padded, 3, self.num_heads, head)
    out = self.kernels.attend(qkv, None, None, tokens, bias.reshape(3, self.num_heads, head))
    out = out.reshape(*batch, padded, width)
    return nn.Dense(width, dtype=self.dtype, name="proj")(out)[..., :tokens, :]


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if self.kernels.mlp == "pallas":  # the same parameters, the GELU inside the matmuls' kernels
      (w1, b1), (w2, b2) = DenseParams(self.hidden_dim, name="fc1")(width), DenseParams(width, name="fc2")(
          self.hidden_dim)
      return gelu_mlp(x.astype(self.dtype), w1, b1, w2, b2, self.kernels.gelu == "tanh")
    x = self.kernels.act(nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


DROP_PATH_RNG = "drop_path"


def drop_path(module: nn.Module, branch: jax.Array, rate: float) -> jax.Array:
  """Stochastic depth: zeroes a residual branch per example with probability ``rate`` (scaled by 1/(1-rate)).

  Active only while training: when ``rate`` > 0 and the caller passes a
  ``"drop_path"`` RNG to ``apply``; inference and the parity paths pass none.
  """
  if rate <= 0.0 or not module.has_rng(DROP_PATH_RNG):
    return branch
  keep = jax.random.bernoulli(module.make_rng(DROP_PATH_RNG), 1.0 - rate, (branch.shape[0],) + (1,) * (branch.ndim - 1))
  return branch * keep.astype(branch.dtype) / (1.0 - rate)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), x + mlp(norm2(x)) (each branch with drop-path)."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  drop_path_rate: float = 0.0
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width, k = x.shape[-1], self.kernels
    x = x + drop_path(self, Attention(self.num_heads, dtype=self.dtype, kernels=k, name="attn")(
        k.norm(1e-6, "norm1", self.dtype)(x)), self.drop_path_rate)
    x = x + drop_path(self, Mlp(int(width * self.mlp_ratio), dtype=self.dtype, kernels=k, name="mlp")(
        k.norm(1e-6, "norm2", self.dtype)(x)), self.drop_path_rate)
    return x


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] → [B, H/p, W/p, p·p·C]: each non-overlapping p×p patch flattened in (row, column, channel)
  order (the order of a [p, p, C, D] convolution kernel); like a VALID convolution, rows and columns past the
  last whole patch are dropped."""
  batch, height, width, channels = images.shape
  rows, cols = height // patch_size, width // patch_size
  if not rows or not cols:
    raise ValueError(f"images of {height}×{width} pixels hold no whole {patch_size}×{patch_size} patch")
  x = images[:, :rows * patch_size, :cols * patch_size]
  x = x.reshape(batch, rows, patch_size, cols, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, rows, cols, patch_size * patch_size * channels)


class PatchProjection(nn.Module):
  """PyTorch's ``Conv2d(C, D, p, stride=p)`` on ``patchify``'s patches: the parameters of ``nn.Conv(D, (p, p),
  strides=p)`` (names, shapes and initializers: kernel [p, p, C, D], bias [D]) applied as one matmul over the
  flattened patches. Same values as the convolution; on an H200 cuDNN ran that convolution with its 3 input
  channels at ~37 TFLOP/s (1.2 ms of the SAMI ViT-S step, its weight gradient included; BENCHMARKS.md), and as a
  matmul it is a GEMM like the blocks' (SAMI embeds only the visible patches: ``ImageEncoderViT.embed``)."""

  features: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    p = self.patch_size
    channels, remainder = divmod(patches.shape[-1], p * p)
    if remainder:
      raise ValueError(f"patches of {patches.shape[-1]} values are not {p}×{p}×channels")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    patches, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
    return jnp.dot(patches, kernel.reshape(-1, self.features)) + bias


class PatchEmbed(nn.Module):
  """[B, H, W, C] images → [B, H/p, W/p, D] patch embeddings (``patchify``, then ``proj``)."""

  embed_dim: int
  patch_size: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.proj = PatchProjection(self.embed_dim, self.patch_size, dtype=self.dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.proj(patchify(images, self.patch_size))


def resize_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int], has_cls_token: bool = True) -> jax.Array:
  """[1, (1+)S·S, C] table → [1, H, W, C], dropping the cls slot (PyTorch bicubic)."""
  table = pos_embed[:, 1:] if has_cls_token else pos_embed
  size = int(round(table.shape[1] ** 0.5))
  if size * size != table.shape[1]:
    raise ValueError(f"position table of {table.shape[1]} slots is not a square grid")
  table = table.reshape(1, size, size, table.shape[-1])
  return resize(table, grid_hw, "bicubic")


class ImageEncoderViT(nn.Module):
  """EfficientSAM's image encoder. [B, S, S, 3] normalized → [B, S/16, S/16, neck_dim].

  ``embed`` and ``transform`` are the ViT without the neck: the SAMI student
  calls them on a subset of tokens, with the same parameter names, so its
  weights load straight into EfficientSAM.
  """

  img_size: int
  embed_dim: int
  depth: int
  num_heads: int
  neck_dim: int = 256
  patch_size: int = 16
  mlp_ratio: float = 4.0
  pretrain_img_size: int = 224
  dtype: Dtype = jnp.float32
  remat: str | bool = "none"  # layers.remat: "none", "full", "dots" or "projections"
  drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this rate over the blocks
  kernels: Kernels = Kernels()  # the blocks' (the neck keeps PyTorch's LayerNorm)

  def setup(self):
    pretrain_grid = self.pretrain_img_size // self.patch_size
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (1, 1 + pretrain_grid * pretrain_grid, self.embed_dim))
    self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, dtype=self.dtype)
    block_cls = remat(Block, self.remat)
    rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
    self.blocks = [block_cls(self.num_heads, self.mlp_ratio, dtype=self.dtype, drop_path_rate=rate,
                             kernels=self.kernels) for rate in rates]
    self.neck_0 = nn.Conv(self.neck_dim, (1, 1), use_bias=False, dtype=self.dtype)
    self.neck_1 = layer_norm(1e-6, None, self.dtype)
    self.neck_2 = nn.Conv(self.neck_dim, (3, 3), padding=1, use_bias=False, dtype=self.dtype)
    self.neck_3 = layer_norm(1e-6, None, self.dtype)

  def embed(self, images: jax.Array, select: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Patch embedding plus the (resized) position table → [B, h, w, embed_dim].

    ``select`` embeds only some tokens (SAMI: the visible ones): a function from rows [B or 1, h·w, ·] in
    raster order to [B, T, ·], applied to the patches and the position table; → [B, T, embed_dim].
    """
    patches = patchify(images, self.patch_size)
    positions = resize_pos_embed(self.pos_embed, patches.shape[1:3])
    if select is not None:
      rows = lambda t: t.reshape(t.shape[0], -1, t.shape[-1])
      patches, positions = select(rows(patches)), select(rows(positions))
    x = self.patch_embed.proj(patches)
    return x + positions.astype(x.dtype)

  def transform(self, tokens: jax.Array) -> jax.Array:
    """The transformer blocks on [B, T, embed_dim] tokens (any subset, any order)."""
    for block in self.blocks:
      tokens = block(tokens)
    return tokens

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.shape[-3:] != (self.img_size, self.img_size, 3):
      raise ValueError(f"image encoder expects [B, {self.img_size}, {self.img_size}, 3] "
                       f"normalized input, got shape {tuple(images.shape)}")
    x = self.embed(images)
    batch, grid_h, grid_w, width = x.shape
    x = self.transform(x.reshape(batch, grid_h * grid_w, width)).reshape(batch, grid_h, grid_w, width)
    x = self.neck_1(self.neck_0(x))
    return self.neck_3(self.neck_2(x))
