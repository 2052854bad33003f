"""EfficientSAM's mask decoder: two-way transformer, upscaling, hypernetworks.

Differences from SAM that the official checkpoints depend on (REFERENCE.md §1):
blocks after the first add the query PE to the queries themselves before
self-attention; the first block keeps its residual; the upscaling norm is
GroupNorm(1); every MLP uses GELU.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientsam_jax.models.layers import ConvTranspose2x2, MLPBlock, attention, exact_gelu, layer_norm

Dtype = Any


def repeat_per_query(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] → [n, ...], each row repeated n // B times in a row (b-major, as ``decode`` orders queries)."""
  b = x.shape[0]
  if b == n:
    return x
  if n % b:
    raise ValueError(f"{n} queries do not split evenly over {b} images")
  return jnp.broadcast_to(x[:, None], (b, n // b, *x.shape[1:])).reshape(n, *x.shape[1:])


class TwoWayAttention(nn.Module):
  """Attention whose q/k/v projections may shrink the width by ``downsample_rate``.

  q and k/v may have different batch sizes when one side is per image [B, ...] and the
  other per query [B·G, ...] (G queries per image, b-major): the per-image side is then
  projected once per image, not once per query. The output is per query.
  """

  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    internal = self.embedding_dim // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"num_heads {self.num_heads} must divide the attention width {internal}")
    if k.shape[0] != v.shape[0]:
      raise ValueError(f"k and v batch sizes differ: {k.shape[0]} vs {v.shape[0]}")
    nq, nk = q.shape[0], k.shape[0]
    if max(nq, nk) % min(nq, nk):
      raise ValueError(f"q batch {nq} and k/v batch {nk} must divide one another")
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name)
    heads = lambda x: x.reshape(*x.shape[:-1], self.num_heads, internal // self.num_heads)
    lq = q.shape[1]
    if nq > nk:  # per-query q, per-image k/v: stack each image's query tokens (softmax is per row)
      q = q.reshape(nk, (nq // nk) * lq, q.shape[-1])
    q, k, v = (heads(dense(internal, f"{name}_proj")(x)) for name, x in (("q", q), ("k", k), ("v", v)))
    # Per-image q (image→token): project once per image, then repeat the projection per query.
    out = attention(repeat_per_query(q, nk), k, v)
    out = out.reshape(max(nq, nk), lq, internal)
    return dense(self.embedding_dim, "out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
  embedding_dim: int
  num_heads: int
  mlp_dim: int
  downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    """queries/query_pe [N, T, C]; keys [B, HW, C] with B dividing N (per image or per query); key_pe
    broadcastable to keys ([1, HW, C]). Returns per-query queries [N, T, C] and keys [N, HW, C]."""
    attn = lambda rate, name: TwoWayAttention(self.embedding_dim, self.num_heads, rate,
                                              dtype=self.dtype, name=name)
    norm = lambda name: layer_norm(1e-5, name, self.dtype)
    if not self.skip_first_layer_pe:
      queries = queries + query_pe
    queries = norm("norm1")(queries + attn(1, "self_attn")(queries, queries, queries))
    q, k = queries + query_pe, keys + key_pe
    queries = norm("norm2")(queries + attn(self.downsample_rate, "cross_attn_token_to_image")(q, k, keys))
    mlp = MLPBlock(self.mlp_dim, self.embedding_dim, num_layers=1, dtype=self.dtype, name="mlp")
    queries = norm("norm3")(queries + mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    update = attn(self.downsample_rate, "cross_attn_image_to_token")(k, q, queries)
    keys = norm("norm4")(repeat_per_query(keys, queries.shape[0]) + update)
    return queries, keys


class TwoWayTransformer(nn.Module):
  depth: int
  embedding_dim: int
  num_heads: int
  mlp_dim: int
  downsample_rate: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embedding, image_pe, point_embedding):
    """image_embedding [B, HW, C] (B dividing N), image_pe [1 or B, HW, C], point_embedding [N, T, C].

    With B < N the first block's prompt-independent projections of the image tokens are
    computed once per image; the returned keys are per query [N, HW, C].
    """
    queries, keys = point_embedding, image_embedding
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.embedding_dim, self.num_heads, self.mlp_dim, self.downsample_rate,
          skip_first_layer_pe=(i == 0), dtype=self.dtype, name=f"layers_{i}")(
              queries, keys, point_embedding, image_pe)
    final_attn = TwoWayAttention(self.embedding_dim, self.num_heads, self.downsample_rate,
                                 dtype=self.dtype, name="final_attn_token_to_image")
    queries = queries + final_attn(queries + point_embedding, keys + image_pe, keys)
    keys = repeat_per_query(keys, queries.shape[0])  # only if depth == 0
    return layer_norm(1e-5, "norm_final_attn", self.dtype)(queries), keys


class MaskDecoder(nn.Module):
  """Predicts [N, K, 4h, 4w] mask logits and [N, K] IoU from [N, h, w, C] embeddings."""

  transformer_dim: int
  num_heads: int
  mlp_dim: int
  depth: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 2
  iou_head_hidden_dim: int = 256
  dtype: Dtype = jnp.float32

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1 if self.num_multimask_outputs > 1 else 1

  @nn.compact
  def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings, multimask_output: Optional[bool]):
    """image_embeddings [B, h, w, C], image_pe [h, w, C], prompts [N, P, C] with N = B·Q (b-major).

    B = N (one embedding per query) also works; B < N shares each image's prompt-independent
    work among its Q queries. ``multimask_output`` True: the 3 multimask outputs; False: the
    single-mask output; None: all 4 (index 0 the single-mask one), for training.
    """
    b, h, w, c = image_embeddings.shape
    n = sparse_prompt_embeddings.shape[0]
    if n % b:
      raise ValueError(f"{n} prompts do not split evenly over {b} image embeddings")
    dim = self.transformer_dim
    iou_token = nn.Embed(1, dim, name="iou_token").embedding
    mask_tokens = nn.Embed(self.num_mask_tokens, dim, name="mask_tokens").embedding
    output_tokens = jnp.broadcast_to(jnp.concatenate([iou_token, mask_tokens])[None],
                                     (n, 1 + self.num_mask_tokens, dim))
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)
    transformer = TwoWayTransformer(self.depth, dim, self.num_heads, self.mlp_dim,
                                    dtype=self.dtype, name="transformer")
    hs, src = transformer(image_embeddings.reshape(b, h * w, c), image_pe.reshape(1, h * w, c), tokens)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]

    x = src.reshape(n, h, w, c)
    x = ConvTranspose2x2(dim // 4, dtype=self.dtype, name="final_output_upscaling_layers_0_0")(x)
    x = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                     name="final_output_upscaling_layers_0_1")(x)
    x = exact_gelu(x)
    x = ConvTranspose2x2(dim // 8, dtype=self.dtype, name="final_output_upscaling_layers_1_0")(x)
    upscaled = exact_gelu(x)

    hyper_in = jnp.stack([
        MLPBlock(dim, dim // 8, num_layers=2, dtype=self.dtype, name=f"output_hypernetworks_mlps_{i}")(
            mask_tokens_out[:, i]) for i in range(self.num_mask_tokens)], axis=1)
    masks = jnp.einsum("nkc,nhwc->nkhw", hyper_in, upscaled)
    iou_pred = MLPBlock(self.iou_head_hidden_dim, self.num_mask_tokens, num_layers=self.iou_head_depth,
                        dtype=self.dtype, name="iou_prediction_head")(iou_token_out)
    if multimask_output is None:  # training: every output (single-mask first, then the multimask ones)
      return masks, iou_pred
    if multimask_output and self.num_multimask_outputs > 1:
      return masks[:, 1:], iou_pred[:, 1:]
    return masks[:, :1], iou_pred[:, :1]
