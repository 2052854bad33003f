"""SAM's ViT image encoder (the SAMI teacher), computing what segment-anything computes.

Windowed attention (zero-padded to a multiple of the window), decomposed
relative position tables, a few global blocks, and the neck to 256 channels.
Presets ``vit_b``/``vit_l``/``vit_h``; custom sizes use SAM's own argument
names (``SamEncoderConfig`` fields). NHWC in and out.

It also runs at input sizes other than the checkpoint's: the absolute position
table is resized (PyTorch bicubic) to the token grid, and relative tables are
linearly resized to the attention span, as SAM itself does for relative tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientsam_jax.common.config import JsonConfig
from efficientsam_jax.models.layers import even_length_attention, exact_gelu, layer_norm, remat, resolve_attention
from efficientsam_jax.models.resize import resize
from efficientsam_jax.models.vit import PatchEmbed

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SamEncoderConfig(JsonConfig):
  """``segment_anything.modeling.ImageEncoderViT`` arguments (same names)."""

  _KIND = "SAM encoder"

  img_size: int = 1024
  patch_size: int = 16
  embed_dim: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_ratio: float = 4.0
  out_chans: int = 256
  qkv_bias: bool = True
  use_rel_pos: bool = True
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "global_attn_indexes", tuple(self.global_attn_indexes))
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"global_attn_indexes {bad} outside 0..{self.depth - 1}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @classmethod
  def preset(cls, name: str) -> "SamEncoderConfig":
    if name not in SAM_PRESETS:
      raise ValueError(f"unknown SAM encoder preset {name!r}; known: {sorted(SAM_PRESETS)}")
    return SAM_PRESETS[name]


SAM_PRESETS = {
    "vit_b": SamEncoderConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamEncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamEncoderConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def relative_position_bias_table(rel_pos: jax.Array, size: int) -> jax.Array:
  """[L, D] table → [size, size, D] with entry (i, j) for offset i - j (SAM's ``get_rel_pos``, q = k)."""
  span = 2 * size - 1
  if rel_pos.shape[0] != span:
    rel_pos = resize(rel_pos[:, None, :], (span, 1), "bilinear")[:, 0, :]
  index = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + (size - 1)
  return rel_pos[index]


def fold_relative_positions(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array],
                            rel_w: Optional[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SAM's attention as plain softmax(q'·k') v' with no bias, for a fused (flash) attention kernel.

  q, k, v [b, h, w, n, d]; rel_h [h, h, d], rel_w [w, w, d] (``relative_position_bias_table``) or None.
  SAM's logit for query (i, j) and key (x, y) is scale·q·k + q·rel_h[i, x] + q·rel_w[j, y]; with
  q' = [scale·q, q·rel_h[i, :], q·rel_w[j, :]] and k' = [k, onehot(x), onehot(y)], q'·k' is exactly
  that. v' is v zero-padded to the width of q' (the kernels want one head dim), which also is padded
  to a multiple of 8. Returns q', k', v' as [b, h·w, n, d'].
  """
  b, h, w, n, d = q.shape
  parts_q, parts_k = [q * d ** -0.5], [k]
  if rel_h is not None:
    parts_q += [jnp.einsum("bhwnd,hxd->bhwnx", q, rel_h.astype(q.dtype)),
                jnp.einsum("bhwnd,wyd->bhwny", q, rel_w.astype(q.dtype))]
    onehot_x = jnp.broadcast_to(jnp.eye(h, dtype=k.dtype)[:, None, None, :], (b, h, w, n, h))
    onehot_y = jnp.broadcast_to(jnp.eye(w, dtype=k.dtype)[None, :, None, :], (b, h, w, n, w))
    parts_k += [onehot_x, onehot_y]
  width = sum(t.shape[-1] for t in parts_q)
  pad = [jnp.zeros((b, h, w, n, -width % 8), q.dtype)]
  q, k = jnp.concatenate(parts_q + pad, -1), jnp.concatenate(parts_k + pad, -1)
  v = jnp.pad(v, ((0, 0),) * 4 + ((0, q.shape[-1] - d),))
  return tuple(t.reshape(b, h * w, n, t.shape[-1]) for t in (q, k, v))


LOGITS_BUDGET = 1 << 28  # logits elements materialized at once by ``sam_attention`` (1 GiB in fp32)


def sam_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: Optional[jax.Array], rel_w: Optional[jax.Array],
                  max_logits: int = LOGITS_BUDGET) -> jax.Array:
  """SAM's attention (q, k, v [b, h, w, n, d]; tables as in ``fold_relative_positions``) → [b, h·w, n, d].

  The logits [b, n, queries, h·w] are materialized for as many rows of queries at a time as fit in
  ``max_logits`` elements, the blocks one after the other (``lax.map``): ViT-H's global blocks at 1024
  have 4096 × 4096 logits per head, 17 GB in bf16 for a batch of 16 at once.
  """
  b, h, w, n, d = q.shape
  per_row = b * n * w * h * w
  rows = max((r for r in range(1, h + 1) if h % r == 0 and r * per_row <= max_logits), default=1)

  def attend(q_rows: jax.Array, rel_h_rows: jax.Array) -> jax.Array:  # [b, r, w, n, d], [r, h, d]
    logits = jnp.einsum("brwnd,bxynd->bnrwxy", q_rows * d ** -0.5, k)
    if rel_h is not None:  # SAM adds q·R with the unscaled query.
      bias_h = jnp.einsum("brwnd,rxd->bnrwx", q_rows, rel_h_rows.astype(q.dtype))
      bias_w = jnp.einsum("brwnd,wyd->bnrwy", q_rows, rel_w.astype(q.dtype))
      logits = logits + bias_h[..., :, None] + bias_w[..., None, :]
    logits = logits.reshape(b, n, -1, h * w).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, v.reshape(b, h * w, n, d))

  tables = rel_h if rel_h is not None else jnp.zeros((h, 0, d), q.dtype)
  if rows == h:
    return attend(q, tables)
  blocks = h // rows
  out = jax.lax.map(lambda xs: attend(*xs), (jnp.moveaxis(q.reshape(b, blocks, rows, w, n, d), 1, 0),
                                              tables.reshape(blocks, rows, *tables.shape[1:])))
  return jnp.moveaxis(out, 0, 1).reshape(b, h * w, n, d)


class SamAttention(nn.Module):
  """SAM's attention with decomposed relative positions.

  ``attention`` "xla": the official computation (``sam_attention``, logits materialized a block of
  queries at a time); "cudnn": the same function through ``fold_relative_positions`` and cuDNN's
  fused attention (NVIDIA GPUs, bf16/fp16), which never materializes the logits (the 4096 × 4096 of
  the global blocks at 1024); "auto": "cudnn" on NVIDIA GPUs in bf16/fp16, else "xla"
  (``layers.resolve_attention``).
  """

  num_heads: int
  qkv_bias: bool = True
  use_rel_pos: bool = True
  rel_pos_size: Optional[int] = None  # side of the (window or global) attention span at the native size
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, h, w, 3, self.num_heads, head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [b, h, w, heads, d]
    rel_h = rel_w = None
    if self.use_rel_pos:
      span = 2 * self.rel_pos_size - 1
      init = nn.initializers.zeros
      rel_h = relative_position_bias_table(self.param("rel_pos_h", init, (span, head_dim)), h)
      rel_w = relative_position_bias_table(self.param("rel_pos_w", init, (span, head_dim)), w)
    implementation = resolve_attention(self.attention, q.dtype)
    if implementation == "pallas":
      raise ValueError("SAM's attention adds relative positions to its logits, which the 'pallas' kernels do not: "
                       "use 'xla', 'cudnn' or 'auto'")
    if implementation == "cudnn":
      folded = fold_relative_positions(q, k, v, rel_h, rel_w)
      out = even_length_attention(*folded, implementation="cudnn", scale=1.0)[..., :head_dim]
    else:
      out = sam_attention(q, k, v, rel_h, rel_w)
    return nn.Dense(dim, dtype=self.dtype, name="proj")(out.reshape(b, h, w, dim))


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """[B, H, W, C] → [B·nh·nw, window, window, C], zero-padding H and W up to multiples of ``window``."""
  b, h, w, c = x.shape
  pad_h, pad_w = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
  hp, wp = padded_hw
  c = windows.shape[-1]
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, c)[:, :hw[0], :hw[1]]


class SamMlp(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = exact_gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="lin1")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="lin2")(y)


class SamBlock(nn.Module):
  num_heads: int
  mlp_ratio: float
  qkv_bias: bool
  use_rel_pos: bool
  window_size: int  # 0: global attention
  rel_pos_size: int
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    shortcut = x
    x = layer_norm(self.layer_norm_eps, "norm1", self.dtype)(x)
    hw = x.shape[1:3]
    if self.window_size > 0:
      x, padded_hw = window_partition(x, self.window_size)
    x = SamAttention(self.num_heads, self.qkv_bias, self.use_rel_pos, self.rel_pos_size,
                     dtype=self.dtype, attention=self.attention, name="attn")(x)
    if self.window_size > 0:
      x = window_unpartition(x, self.window_size, padded_hw, hw)
    x = shortcut + x
    y = layer_norm(self.layer_norm_eps, "norm2", self.dtype)(x)
    return x + SamMlp(int(dim * self.mlp_ratio), dtype=self.dtype, name="mlp")(y)


def abstract_params(model: "SamImageEncoder"):
  """The parameter tree as ShapeDtypeStructs (no initialization, no compilation)."""
  side = model.config.img_size
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]


class SamImageEncoder(nn.Module):
  """[B, S, S, 3] normalized images (S any multiple of the patch size) → [B, S/16, S/16, out_chans]."""

  config: SamEncoderConfig
  dtype: Dtype = jnp.float32
  remat: str | bool = "none"  # layers.remat: "none", "full", "dots", "projections"
  attention: str = "xla"  # "xla", "cudnn" or "auto" (SamAttention)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    x = PatchEmbed(c.embed_dim, c.patch_size, dtype=self.dtype, name="patch_embed")(images)
    pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, c.grid_size, c.grid_size, c.embed_dim))
    x = x + resize(pos_embed, x.shape[1:3], "bicubic").astype(x.dtype)
    block_cls = remat(SamBlock, self.remat)
    for i in range(c.depth):
      window = 0 if i in c.global_attn_indexes else c.window_size
      x = block_cls(c.num_heads, c.mlp_ratio, c.qkv_bias, c.use_rel_pos, window,
                    rel_pos_size=window or c.grid_size, layer_norm_eps=c.layer_norm_eps,
                    dtype=self.dtype, attention=self.attention, name=f"blocks_{i}")(x)
    x = nn.Conv(c.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(x)
    x = layer_norm(1e-6, "neck_1", self.dtype)(x)
    x = nn.Conv(c.out_chans, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="neck_2")(x)
    return layer_norm(1e-6, "neck_3", self.dtype)(x)


TEACHER_MODES = ("upsample", "native")


def teacher_features(model: SamImageEncoder, params, views: jax.Array, mode: str = "upsample") -> jax.Array:
  """SAM features of student views, aligned to the student's token grid.

  Args:
    views: [B, S, S, 3] normalized views at the student's resolution (S = 224 for SAMI).
    mode: "upsample": bilinearly upsample each view to the teacher's native input
      (1024), run it there (windows and tables as trained), and average-pool the
      64×64 features to the S/16 grid; "native": run the teacher on the view
      itself with its position tables resized (about 20× cheaper, but ViT-H then
      sees a 14×14 grid: every window block becomes global attention).

  Returns:
    [B, S/16, S/16, out_chans] features.
  """
  side = views.shape[1]
  grid = (side // model.config.patch_size,) * 2
  if mode == "upsample":
    native = (model.config.img_size,) * 2
    features = model.apply({"params": params}, resize(views, native, "bilinear"))
    return resize(features, grid, "area")
  if mode == "native":
    return model.apply({"params": params}, views)
  raise ValueError(f"unknown teacher mode {mode!r}; use one of {TEACHER_MODES}")
