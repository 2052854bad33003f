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

from efficientsam_jax.models.layers import ConvTranspose2x2, MLPBlock, exact_gelu, layer_norm, pixel_shuffle

Dtype = Any


def repeat_per_query(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] → [n, ...], each row repeated n // B times in a row (b-major, as ``decode`` orders queries)."""
  b = x.shape[0]
  if b == n:
    return x
  if n % b:
    raise ValueError(f"{n} queries do not split evenly over {b} images")
  return jnp.broadcast_to(x[:, None], (b, n // b, *x.shape[1:])).reshape(n, *x.shape[1:])


class _Projection(nn.Module):
  """``nn.Dense``'s parameters (kernel [in, out] lecun-normal, bias [out] zeros), returned rather than applied,
  so the attention can choose in which order to multiply them."""

  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))
    return kernel, self.param("bias", nn.initializers.zeros, (self.features,))


def attention_plan(n: int, nq: int, nk: int, lq: int, lk: int, dim: int, internal: int,
                   heads: int) -> tuple[str, str]:
  """The cheapest association (multiply-adds) of the attention's logits and of its output.

  Shapes: n queries; the q side has nq batch rows (nq = n, or one per image) of lq tokens of width
  ``dim``, the k/v side nk rows of lk tokens; projections to ``internal`` = heads · d.

  logits ``q Wq (k Wk)ᵀ``: "project" both sides; "fold_k" multiplies q's projection by Wkᵀ and then by
  the raw keys (cheap when few queries meet many per-query keys); "fold_q" multiplies Wq by the
  projected keys and then the raw queries (many per-query queries, few keys).
  output ``P (v Wv) Wo``: "project"; "fold_v" ``(P v) Wv Wo`` (few queries, many per-query values);
  "fold_o" ``P (v Wv Wo)`` (many queries, few values).
  """
  logits = {
      "project": nq * lq * dim * internal + nk * lk * dim * internal + n * lq * lk * internal,
      "fold_k": 2 * nq * lq * dim * internal + n * heads * lq * lk * dim,
      "fold_q": 2 * nk * lk * dim * internal + n * heads * lq * lk * dim,
  }
  output = {
      "project": nk * lk * dim * internal + n * lq * lk * internal + n * lq * internal * dim,
      "fold_v": n * heads * lq * lk * dim + 2 * n * lq * dim * internal,
      "fold_o": 2 * nk * lk * dim * internal + n * heads * lq * lk * dim,
  }
  return min(logits, key=logits.get), min(output, key=output.get)


class TwoWayAttention(nn.Module):
  """Attention whose q/k/v projections may shrink the width by ``downsample_rate``.

  q and k/v may have different batch sizes when one side is per image [B, ...] and the
  other per query [B·G, ...] (G queries per image, b-major): the per-image side is then
  projected once per image, not once per query. The output is per query.

  The decoder's attentions pair a few prompt tokens with thousands of per-query image tokens;
  there, multiplying the raw image tokens by products of the small side with the projection
  matrices is cheaper than projecting every image token (``attention_plan`` picks the order by
  its multiply-add count; the result is the same up to rounding). Parameters are ``nn.Dense``'s.
  """

  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_log_weights: Optional[jax.Array] = None
               ) -> jax.Array:
    """q [nq, Lq, C], k/v [nk, Lk, C] → [max(nq, nk), Lq, C]. ``key_log_weights`` [Lk]: log multiplicities of
    the keys (a key of weight log m counts as m identical keys)."""
    internal = self.embedding_dim // self.downsample_rate
    heads = self.num_heads
    if internal % heads:
      raise ValueError(f"num_heads {heads} must divide the attention width {internal}")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
      raise ValueError(f"k and v shapes differ: {k.shape[:2]} vs {v.shape[:2]}")
    nq, nk = q.shape[0], k.shape[0]
    if max(nq, nk) % min(nq, nk):
      raise ValueError(f"q batch {nq} and k/v batch {nk} must divide one another")
    n, lq = max(nq, nk), q.shape[1]
    if nq > nk:  # per-query q, per-image k/v: stack each image's query tokens (softmax is per row)
      q = q.reshape(nk, (nq // nk) * lq, q.shape[-1])
    d = internal // heads
    wq, bq = _Projection(internal, name="q_proj")(q.shape[-1])
    wk, bk = _Projection(internal, name="k_proj")(k.shape[-1])
    wv, bv = _Projection(internal, name="v_proj")(v.shape[-1])
    wo, bo = _Projection(self.embedding_dim, name="out_proj")(internal)
    q, k, v, wq, bq, wk, bk, wv, bv, wo, bo = nn.dtypes.promote_dtype(
        q, k, v, wq, bq, wk, bk, wv, bv, wo, bo, dtype=self.dtype)
    scale = d ** -0.5
    per_head = lambda x: x.reshape(*x.shape[:-1], heads, d)
    wq, wk, wv = (w.reshape(w.shape[0], heads, d) for w in (wq, wk, wv))
    bq, bk, bv = (per_head(b) for b in (bq, bk, bv))
    wo = wo.reshape(heads, d, self.embedding_dim)
    project = lambda x, w, b: jnp.einsum("nlc,chd->nlhd", x, w) + b  # [nb, L, heads, d]
    f32 = dict(preferred_element_type=jnp.float32)
    n_rows = max(q.shape[0], nk)
    rows = lambda x: repeat_per_query(x, n_rows)  # a per-image side, broadcast to the queries
    logits_plan, output_plan = attention_plan(n_rows, q.shape[0], nk, q.shape[1], k.shape[1], q.shape[-1],
                                              internal, heads)

    if logits_plan == "fold_q":  # q Wq kpᵀ: the q-bias term varies over keys, so it stays
      kp = project(k, wk, bk) * scale
      logits = jnp.einsum("nsc,nhct->nhst", rows(q), rows(jnp.einsum("chd,nthd->nhct", wq, kp)), **f32)
      logits = logits + rows(jnp.einsum("hd,nthd->nht", bq, kp, **f32))[:, :, None]
    else:
      qp = project(q, wq, bq) * scale
      if logits_plan == "fold_k":  # (qp Wkᵀ) kᵀ; qp·bk is the same for every key of a row: softmax drops it
        logits = jnp.einsum("nhlc,nsc->nhls", rows(jnp.einsum("nlhd,chd->nhlc", qp, wk)), rows(k), **f32)
      else:
        logits = jnp.einsum("nlhd,nshd->nhls", rows(qp), rows(project(k, wk, bk)), **f32)
    if key_log_weights is not None:
      logits = logits + key_log_weights.astype(logits.dtype)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)  # [n_rows, heads, lq, lk]

    if output_plan == "fold_v":  # (P v) Wv + bv (rows of P sum to 1), then out_proj
      mixed = jnp.einsum("nhls,nsc->nhlc", probs, rows(v))
      out = jnp.einsum("nhlc,chd->nlhd", mixed, wv) + bv
      out = jnp.einsum("nlhd,hde->nle", out, wo) + bo
    elif output_plan == "fold_o":  # P (vp Wo): out_proj applied to the few values
      vo = jnp.einsum("nshd,hde->nhse", project(v, wv, bv), wo)
      out = jnp.einsum("nhls,nhse->nle", probs, rows(vo)) + bo
    else:
      out = jnp.einsum("nhls,nshd->nlhd", probs, rows(project(v, wv, bv)))
      out = jnp.einsum("nlhd,hde->nle", out, wo) + bo
    return out.reshape(n, lq, self.embedding_dim)


class TwoWayAttentionBlock(nn.Module):
  embedding_dim: int
  num_heads: int
  mlp_dim: int
  downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, token_log_weights=None):
    """queries/query_pe [N, T, C]; keys [B, HW, C] with B dividing N (per image or per query); key_pe
    broadcastable to keys ([1, HW, C]); ``token_log_weights`` [T] (see ``TwoWayTransformer``).
    Returns per-query queries [N, T, C] and keys [N, HW, C]."""
    attn = lambda rate, name: TwoWayAttention(self.embedding_dim, self.num_heads, rate,
                                              dtype=self.dtype, name=name)
    norm = lambda name: layer_norm(1e-5, name, self.dtype)
    if not self.skip_first_layer_pe:
      queries = queries + query_pe
    queries = norm("norm1")(queries + attn(1, "self_attn")(queries, queries, queries, token_log_weights))
    q, k = queries + query_pe, keys + key_pe
    queries = norm("norm2")(queries + attn(self.downsample_rate, "cross_attn_token_to_image")(q, k, keys))
    mlp = MLPBlock(self.mlp_dim, self.embedding_dim, num_layers=1, dtype=self.dtype, name="mlp")
    queries = norm("norm3")(queries + mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    update = attn(self.downsample_rate, "cross_attn_image_to_token")(k, q, queries, token_log_weights)
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
  def __call__(self, image_embedding, image_pe, point_embedding, num_outputs: Optional[int] = None,
               token_log_weights: Optional[jax.Array] = None):
    """image_embedding [B, HW, C] (B dividing N), image_pe [1 or B, HW, C], point_embedding [N, T, C].

    With B < N the first block's prompt-independent projections of the image tokens are
    computed once per image; the returned keys are per query [N, HW, C]. ``num_outputs``: only
    the first tokens are returned (the final attention skips the others' rows).
    ``token_log_weights`` [T]: a token of weight log m stands for m identical tokens. Identical
    tokens stay identical through every block (each token's path depends only on itself and on
    attention over all tokens), so m copies and one copy weighted m give the same outputs.
    """
    queries, keys = point_embedding, image_embedding
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.embedding_dim, self.num_heads, self.mlp_dim, self.downsample_rate,
          skip_first_layer_pe=(i == 0), dtype=self.dtype, name=f"layers_{i}")(
              queries, keys, point_embedding, image_pe, token_log_weights)
    queries, query_pe = queries[:, :num_outputs], point_embedding[:, :num_outputs]
    final_attn = TwoWayAttention(self.embedding_dim, self.num_heads, self.downsample_rate,
                                 dtype=self.dtype, name="final_attn_token_to_image")
    queries = queries + final_attn(queries + query_pe, keys + image_pe, keys)
    keys = repeat_per_query(keys, queries.shape[0])  # only if depth == 0
    return layer_norm(1e-5, "norm_final_attn", self.dtype)(queries), keys


class MaskDecoder(nn.Module):
  """Predicts [N, K, 4h, 4w] mask logits and [N, K] IoU from [N, h, w, C] embeddings.

  Two stages, also callable on their own (segment-everything upscales only the prompts whose
  predicted IoU passes its filter): ``predict_tokens`` (two-way transformer, IoU head,
  hypernetworks) and ``predict_masks`` (upscaling of the image tokens, dot with the hypernetworks).
  """

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

  def setup(self):
    dim = self.transformer_dim
    self.iou_token = nn.Embed(1, dim)
    self.mask_tokens = nn.Embed(self.num_mask_tokens, dim)
    self.transformer = TwoWayTransformer(self.depth, dim, self.num_heads, self.mlp_dim, dtype=self.dtype)
    self.final_output_upscaling_layers_0_0 = ConvTranspose2x2(dim // 4, dtype=self.dtype)
    self.final_output_upscaling_layers_0_1 = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False,
                                                          dtype=self.dtype)
    self.final_output_upscaling_layers_1_0 = ConvTranspose2x2(dim // 8, dtype=self.dtype)
    self.output_hypernetworks_mlps = [MLPBlock(dim, dim // 8, num_layers=2, dtype=self.dtype)
                                      for _ in range(self.num_mask_tokens)]
    self.iou_prediction_head = MLPBlock(self.iou_head_hidden_dim, self.num_mask_tokens,
                                        num_layers=self.iou_head_depth, dtype=self.dtype)

  def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings, multimask_output: Optional[bool]):
    """image_embeddings [B, h, w, C], image_pe [h, w, C], prompts [N, P, C] with N = B·Q (b-major).

    B = N (one embedding per query) also works; B < N shares each image's prompt-independent
    work among its Q queries. ``multimask_output`` True: the 3 multimask outputs; False: the
    single-mask output; None: all 4 (index 0 the single-mask one), for training.
    """
    src, hyper_in, iou_pred = self.predict_tokens(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                  multimask_output)
    return self.predict_masks(src, hyper_in), iou_pred

  def output_slice(self, multimask_output: Optional[bool]) -> slice:
    """Which of the mask tokens' outputs ``multimask_output`` selects (see ``__call__``)."""
    if multimask_output is None:
      return slice(None)
    return slice(1, None) if multimask_output and self.num_multimask_outputs > 1 else slice(0, 1)

  def predict_tokens(self, image_embeddings, image_pe, sparse_prompt_embeddings, multimask_output: Optional[bool],
                     prompt_log_weights: Optional[jax.Array] = None):
    """The transformer stage → (image tokens [N, h, w, C], hypernetwork outputs [N, K, C/8], IoU [N, K]).

    ``prompt_log_weights`` [P]: log multiplicities of the prompt tokens (see ``TwoWayTransformer``).
    """
    b, h, w, c = image_embeddings.shape
    n = sparse_prompt_embeddings.shape[0]
    if n % b:
      raise ValueError(f"{n} prompts do not split evenly over {b} image embeddings")
    dim = self.transformer_dim
    output_tokens = jnp.concatenate([self.iou_token.embedding, self.mask_tokens.embedding])
    output_tokens = jnp.broadcast_to(output_tokens[None], (n, *output_tokens.shape))
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)
    weights = None
    if prompt_log_weights is not None:
      weights = jnp.concatenate([jnp.zeros(output_tokens.shape[1], jnp.float32),
                                 prompt_log_weights.astype(jnp.float32)])
    hs, src = self.transformer(image_embeddings.reshape(b, h * w, c), image_pe.reshape(1, h * w, c), tokens,
                               num_outputs=1 + self.num_mask_tokens, token_log_weights=weights)
    hyper_in = jnp.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)
    chosen = self.output_slice(multimask_output)
    return src.reshape(n, h, w, dim), hyper_in[:, chosen], self.iou_prediction_head(hs[:, 0])[:, chosen]

  def predict_masks(self, src, hyper_in):
    """The upscaling stage: image tokens [N, h, w, C] and hypernetwork outputs [N, K, C/8] → [N, K, 4h, 4w]."""
    # Both transposed convolutions, the GroupNorm (over every pixel and channel) and the GELUs are per pixel:
    # they run on the sub-pixel layout [N, h, w, 2, 2, 2, 2, C/8], and only the K masks are shuffled.
    x = self.final_output_upscaling_layers_0_0(src)
    x = exact_gelu(self.final_output_upscaling_layers_0_1(x))
    upscaled = exact_gelu(self.final_output_upscaling_layers_1_0(x))
    masks = pixel_shuffle(jnp.einsum("nkc,nhwabdec->nhwabdek", hyper_in, upscaled), levels=2)
    return jnp.moveaxis(masks, -1, 1)
