"""EfficientSAM: image encoder + point prompt encoder + mask decoder.

``EfficientSam`` is a Flax module; the functions below it are the official
model's entry points as pure functions of ``params``:

* ``preprocess``            float NHWC in [0, 1] → square, normalized encoder input
* ``get_image_embeddings``  images → [B, h, w, C] embeddings (NHWC)
* ``predict_masks``         cached embeddings + prompts → (logits, iou)
* ``forward``               images + prompts → full-resolution logits and iou

They are jitted per shape; the image encoder is compiled once per
(batch, dtype) whatever the input image size, because resizing to the square
encoder input happens in a separate, cheap computation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficientsam_jax.common.config import JsonConfig
from efficientsam_jax.models.layers import Kernels
from efficientsam_jax.models.mask_decoder import MaskDecoder
from efficientsam_jax.models.prompt_encoder import PromptEncoder
from efficientsam_jax.models.resize import resize
from efficientsam_jax.models.vit import VIT_SIZES, ImageEncoderViT

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EfficientSamConfig(JsonConfig):
  """Sizes of an EfficientSAM model; field names are the fixture's ``config.json`` keys.

  Fixed as in the release: patch 16, MLP ratio 4, a 14×14 (+cls) pre-training
  position grid, 2 two-way blocks, 3 multimask outputs, at most 6 points.
  """

  _KIND = "EfficientSAM"

  img_size: int = 1024
  encoder_embed_dim: int = 192
  encoder_depth: int = 12
  encoder_num_heads: int = 3
  decoder_dim: int = 256
  decoder_num_heads: int = 8
  decoder_mlp_dim: int = 2048
  patch_size: int = 16
  max_num_points: int = 6

  def __post_init__(self):
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
    if self.encoder_embed_dim % self.encoder_num_heads:
      raise ValueError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                       f"encoder_num_heads {self.encoder_num_heads}")
    if self.decoder_dim % 8:
      raise ValueError(f"decoder_dim {self.decoder_dim} must be a multiple of 8")

  @property
  def embedding_hw(self) -> tuple[int, int]:
    side = self.img_size // self.patch_size
    return side, side

  @property
  def low_res_size(self) -> int:
    return 4 * self.embedding_hw[0]

  @classmethod
  def from_variant(cls, name: str) -> "EfficientSamConfig":
    if name not in VIT_SIZES:
      raise ValueError(f"unknown EfficientSAM variant {name!r}; known: {sorted(VIT_SIZES)}")
    size = VIT_SIZES[name]
    return cls(encoder_embed_dim=size.width, encoder_depth=size.depth, encoder_num_heads=size.num_heads)


class EfficientSam(nn.Module):
  """The composite model. ``dtype`` is the compute dtype; parameters stay fp32."""

  config: EfficientSamConfig
  dtype: Any = jnp.float32
  remat: str | bool = "none"  # the image encoder's blocks (layers.remat): "none", "full", "dots", "projections"
  drop_path_rate: float = 0.0  # encoder stochastic depth; active only with a "drop_path" RNG (training)
  encoder_kernels: Kernels = Kernels()  # how the image encoder's blocks compute (layers.Kernels; same parameters)

  def setup(self):
    c = self.config
    self.image_encoder = ImageEncoderViT(
        img_size=c.img_size, embed_dim=c.encoder_embed_dim, depth=c.encoder_depth,
        num_heads=c.encoder_num_heads, neck_dim=c.decoder_dim, patch_size=c.patch_size,
        dtype=self.dtype, remat=self.remat, drop_path_rate=self.drop_path_rate, kernels=self.encoder_kernels)
    self.prompt_encoder = PromptEncoder(embed_dim=c.decoder_dim, input_image_size=c.img_size)
    self.mask_decoder = MaskDecoder(
        transformer_dim=c.decoder_dim, num_heads=c.decoder_num_heads, mlp_dim=c.decoder_mlp_dim,
        iou_head_hidden_dim=c.decoder_dim, dtype=self.dtype)

  def __call__(self, images, points, labels, multimask_output: bool = True):
    """Normalized square images [B, S, S, 3], model-grid points [B, Q, P, 2] → low-res logits, iou."""
    return self.decode(self.encode(images), points, labels, multimask_output)

  def encode(self, images: jax.Array) -> jax.Array:
    return self.image_encoder(images)

  def decode(self, image_embeddings, points, labels, multimask_output: Optional[bool] = True):
    """Embeddings [B, h, w, C], points [B, Q, P, 2] in the model's input grid → [B, Q, K, 4h, 4w], [B, Q, K].

    P ≤ max_num_points; shorter prompts are padded as the official model pads them (label -1 at (-1, -1)).
    K = 3 (multimask), 1 (single-mask output) or, with ``multimask_output=None``, all 4.
    """
    b, q = points.shape[:2]
    src, hyper_in, iou = self.decode_tokens(image_embeddings, points, labels, multimask_output)
    masks = self.decode_masks(src, hyper_in)
    return masks.reshape(b, q, *masks.shape[1:]), iou

  def decode_tokens(self, image_embeddings, points, labels, multimask_output: Optional[bool] = True):
    """The decoder's first stage (see ``decode``) → (image tokens [B·Q, h, w, C], hypernetwork outputs
    [B·Q, K, C/8], IoU [B, Q, K]); ``decode_masks`` turns any subset of the B·Q rows into masks."""
    b, q, p, _ = points.shape
    limit = self.config.max_num_points
    if p > limit:
      raise ValueError(f"prompts have {p} points; EfficientSAM takes at most {limit} (the official model "
                       "truncates: see predict_masks)")
    weights = None
    if p < limit:
      # The official model pads to max_num_points with identical (-1, -1, label -1) points; one such
      # token weighted by their number gives the same result with fewer tokens (TwoWayTransformer).
      points = jnp.concatenate([points, jnp.full((b, q, 1, 2), -1.0, points.dtype)], axis=2)
      labels = jnp.concatenate([labels, jnp.full((b, q, 1), -1.0, labels.dtype)], axis=2)
      weights = jnp.log(jnp.array([1.0] * p + [limit - p], jnp.float32))
      p += 1
    sparse = self.prompt_encoder(points.reshape(b * q, p, 2), labels.reshape(b * q, p))
    dense_pe = self.prompt_encoder.dense_pe(image_embeddings.shape[1:3])
    # One embedding per image: the decoder shares its prompt-independent work among the Q queries.
    src, hyper_in, iou = self.mask_decoder.predict_tokens(image_embeddings, dense_pe, sparse, multimask_output,
                                                          weights)
    return src, hyper_in, iou.reshape(b, q, -1)

  def decode_masks(self, src, hyper_in):
    """Image tokens [N, h, w, C] and hypernetwork outputs [N, K, C/8] → low-res mask logits [N, K, 4h, 4w]."""
    return self.mask_decoder.predict_masks(src, hyper_in)


@functools.partial(jax.jit, static_argnames=("model",))
def init_params(model: EfficientSam, rng: jax.Array) -> dict:
  """Random parameters (fp32), initialized in one jitted call (compiled once per model)."""
  c = model.config
  images = jnp.zeros((1, c.img_size, c.img_size, 3), jnp.float32)
  points = jnp.zeros((1, 1, c.max_num_points, 2), jnp.float32)
  labels = jnp.full((1, 1, c.max_num_points), -1.0, jnp.float32)
  return model.init(rng, images, points, labels)["params"]


def abstract_params(model: EfficientSam):
  """The parameter tree as ShapeDtypeStructs (no initialization, no compilation)."""
  return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


# ----------------------------------------------------------------------------
# The official entry points, as pure functions.
# ----------------------------------------------------------------------------


def normalize(images: jax.Array) -> jax.Array:
  """ImageNet normalization of float pixels in [0, 1] (float32 out)."""
  return (images.astype(jnp.float32) - jnp.array(PIXEL_MEAN)) / jnp.array(PIXEL_STD)


def normalize_uint8(pixels: jax.Array) -> jax.Array:
  """uint8 pixels (0–255) → normalized float32, inside a jitted step (4× fewer bytes host → device)."""
  return normalize(pixels.astype(jnp.float32) / 255.0)


@functools.partial(jax.jit, static_argnames=("img_size",))
def preprocess(images: jax.Array, img_size: int) -> jax.Array:
  """Float NHWC in [0, 1] → bilinear (no antialias, no aspect) resize to a square, ImageNet-normalized."""
  return normalize(resize(images.astype(jnp.float32), (img_size, img_size), "bilinear"))


@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model: EfficientSam, params, normalized: jax.Array) -> jax.Array:
  return model.apply({"params": params}, normalized.astype(model.dtype), method=EfficientSam.encode)


def get_image_embeddings(model: EfficientSam, params, images: jax.Array) -> jax.Array:
  """Images float NHWC in [0, 1] (any size) → embeddings [B, h, w, C] (NHWC)."""
  _check_images(images)
  return _encode(model, params, preprocess(images, model.config.img_size))


def rescale_points(points: jax.Array, input_hw: tuple[int, int], img_size: int) -> jax.Array:
  """Input-pixel (x, y) → encoder-grid coordinates; negative coordinates become -1."""
  h, w = input_hw
  x, y = points[..., 0], points[..., 1]
  return jnp.stack([jnp.where(x >= 0, x * img_size / w, -1.0),
                    jnp.where(y >= 0, y * img_size / h, -1.0)], axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "input_hw", "multimask_output"))
def _decode(model: EfficientSam, params, embeddings, points, labels, input_hw, multimask_output):
  c = model.config
  points = rescale_points(points.astype(jnp.float32), input_hw, c.img_size)
  # The official model keeps the first max_num_points points; the model pads shorter prompts.
  points, labels = points[..., :c.max_num_points, :], labels[..., :c.max_num_points].astype(jnp.float32)
  masks, iou = model.apply({"params": params}, embeddings.astype(model.dtype), points, labels,
                           multimask_output, method=EfficientSam.decode)
  return masks.astype(jnp.float32), iou.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("output_hw",))
def upsample_masks(masks: jax.Array, output_hw: tuple[int, int]) -> jax.Array:
  """[..., h, w] logits → [..., H, W] with PyTorch bicubic (align_corners=False)."""
  return resize(masks, output_hw, "bicubic", spatial_axes=(-2, -1))


def predict_masks(model: EfficientSam, params, image_embeddings, points, labels, *,
                  input_hw: tuple[int, int], multimask_output: bool = True,
                  output_hw: Optional[tuple[int, int]] = None):
  """Mask logits and IoU from cached embeddings, with the official semantics.

  Args:
    image_embeddings: [B, h, w, C] from ``get_image_embeddings``.
    points: [B, Q, P, 2] (x, y) in pixels of the original input of size ``input_hw``.
    labels: [B, Q, P] in {-1, 0, 1, 2, 3}.
    multimask_output: three masks (True) or the single-mask output (False).
    output_hw: bicubic-upsample the logits to this size; None keeps the low-res logits.

  Returns:
    (logits [B, Q, K, H, W], iou [B, Q, K]), K = 3 or 1.
  """
  points, labels = jnp.asarray(points), jnp.asarray(labels)
  if points.ndim != 4 or points.shape[-1] != 2 or labels.shape != points.shape[:-1]:
    raise ValueError(f"points must be [B, Q, P, 2] and labels [B, Q, P]; got {tuple(points.shape)} "
                     f"and {tuple(labels.shape)}")
  masks, iou = _decode(model, params, image_embeddings, points, labels,
                       tuple(int(v) for v in input_hw), bool(multimask_output))
  if output_hw is not None:
    masks = upsample_masks(masks, tuple(int(v) for v in output_hw))
  return masks, iou


def forward(model: EfficientSam, params, images, points, labels, scale_to_original_image_size: bool = True):
  """The official ``EfficientSam.forward``: multimask logits at the input size (or low-res) and iou."""
  images = jnp.asarray(images)
  embeddings = get_image_embeddings(model, params, images)
  input_hw = tuple(images.shape[1:3])
  return predict_masks(model, params, embeddings, points, labels, input_hw=input_hw,
                       multimask_output=True, output_hw=input_hw if scale_to_original_image_size else None)


def _check_images(images) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be float [B, H, W, 3] in [0, 1], got shape {tuple(images.shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
  if images.shape[1] == 0 or images.shape[2] == 0:
    raise ValueError(f"images are empty: shape {tuple(images.shape)} has no pixels")


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
