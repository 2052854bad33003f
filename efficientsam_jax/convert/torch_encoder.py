"""A plain PyTorch EfficientSAM image encoder, for speed comparison and export checks.

The module and attribute names are the official ones, so the ``image_encoder.``
part of an official state dict (or of ``state_dict_from_params``) loads with
``strict=True`` once the prefix is stripped. The forward pass computes the way
the official model does: NCHW conv patch embedding, the cls slot of the
position table dropped and its 14×14 grid resized with ``F.interpolate``
bicubic, explicit softmax attention, and the conv/LayerNorm2d neck.

Needs the optional ``torch`` extra; nothing else in the package imports this.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from efficientsam_jax.models.efficient_sam import EfficientSamConfig

_PREFIX = "image_encoder."
_PRETRAIN_IMG_SIZE = 224
_MLP_RATIO = 4.0
_LN_EPS = 1e-6


class LayerNorm2d(nn.Module):
  """LayerNorm over the channel axis of an NCHW tensor (two-pass variance)."""

  def __init__(self, channels: int, eps: float = _LN_EPS):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
  def __init__(self, patch_size: int, embed_dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x)


class Attention(nn.Module):
  """Global multi-head self-attention, written out as the official model does."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden_dim: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden_dim)
    self.act = nn.GELU()  # exact erf form, PyTorch's default
    self.fc2 = nn.Linear(hidden_dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """Pre-norm transformer block."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
    self.mlp = Mlp(dim, int(dim * _MLP_RATIO))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def resized_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
  """(1, 1 + S·S, C) table → (1, H, W, C): cls slot dropped, grid resized bicubically."""
  grid = pos_embed[:, 1:]
  size = math.isqrt(grid.shape[1])
  if size * size != grid.shape[1]:
    raise ValueError(f"position table of {grid.shape[1]} slots is not a square grid")
  grid = grid.reshape(1, size, size, -1)
  if (size, size) == tuple(grid_hw):
    return grid
  grid = F.interpolate(grid.permute(0, 3, 1, 2), size=tuple(grid_hw), mode="bicubic",
                       align_corners=False)
  return grid.permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
  """EfficientSAM's encoder: NCHW normalized [B, 3, S, S] → [B, neck_dim, S/16, S/16]."""

  def __init__(self, img_size: int, embed_dim: int, depth: int, num_heads: int, neck_dim: int,
               patch_size: int = 16):
    super().__init__()
    self.img_size = img_size
    pretrain_grid = _PRETRAIN_IMG_SIZE // patch_size
    self.patch_embed = PatchEmbed(patch_size, embed_dim)
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid * pretrain_grid, embed_dim))
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
    self.neck = nn.Sequential(
        nn.Conv2d(embed_dim, neck_dim, kernel_size=1, bias=False),
        LayerNorm2d(neck_dim),
        nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(neck_dim),
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if tuple(x.shape[1:]) != (3, self.img_size, self.img_size):
      raise ValueError(f"encoder expects [B, 3, {self.img_size}, {self.img_size}] normalized input, "
                       f"got {tuple(x.shape)}")
    x = self.patch_embed(x).permute(0, 2, 3, 1)  # NCHW → NHWC token grid
    b, h, w, c = x.shape
    x = (x + resized_pos_embed(self.pos_embed, (h, w))).reshape(b, h * w, c)
    for block in self.blocks:
      x = block(x)
    return self.neck(x.reshape(b, h, w, c).permute(0, 3, 1, 2))


def encoder_from_config(config: EfficientSamConfig) -> ImageEncoderViT:
  return ImageEncoderViT(img_size=config.img_size, embed_dim=config.encoder_embed_dim,
                         depth=config.encoder_depth, num_heads=config.encoder_num_heads,
                         neck_dim=config.decoder_dim, patch_size=config.patch_size)


def encoder_from_state_dict(state_dict: Mapping[str, np.ndarray],
                            config: EfficientSamConfig) -> ImageEncoderViT:
  """The ``image_encoder.*`` keys of an official-format state dict → an eval-mode encoder.

  Other keys (prompt encoder, mask decoder) are ignored; a missing or extra
  encoder key, or a wrong shape, raises (``strict=True``).
  """
  tensors = {k[len(_PREFIX):]: torch.from_numpy(np.array(v, dtype=np.float32))
             for k, v in state_dict.items() if k.startswith(_PREFIX)}
  if not tensors:
    raise ValueError(f"state dict has no {_PREFIX!r} keys")
  encoder = encoder_from_config(config)
  encoder.load_state_dict(tensors, strict=True)
  return encoder.eval()
