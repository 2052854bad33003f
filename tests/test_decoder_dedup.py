"""The decoder's shortcuts: prompt-independent image projections once per image, attention products in
the cheapest order; parameters and outputs unchanged."""

import jax
import numpy as np
import pytest

from efficientsam_jax.models.efficient_sam import init_params, predict_masks


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_param_tree_matches_official_checkpoint(tiny_model, tiny_state_dict):
  """Freshly initialized params have exactly the paths and shapes the official checkpoint converts to."""
  model, converted = tiny_model
  initialized = init_params(model, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(initialized) == jax.tree_util.tree_structure(converted)
  assert _shapes(initialized) == _shapes(converted)
  assert len(_shapes(converted)) == len(tiny_state_dict)  # every checkpoint tensor is used


@pytest.mark.parametrize("num_queries", [1, 5])
@pytest.mark.parametrize("multimask_output", [True, False])
def test_queries_match_one_prompt_at_a_time(tiny_model, num_queries: int, multimask_output: bool):
  """[B, Q] prompts decoded together equal each prompt decoded alone (per image, per prompt)."""
  model, params = tiny_model
  c = model.config
  h, w = c.embedding_hw
  rng = np.random.default_rng(0)
  num_images, input_hw = 2, (300, 200)
  embeddings = rng.normal(size=(num_images, h, w, c.decoder_dim)).astype(np.float32)
  points = (rng.uniform(size=(num_images, num_queries, 2, 2)) * np.array([200, 300])).astype(np.float32)
  labels = np.tile(np.array([1.0, 0.0], np.float32), (num_images, num_queries, 1))
  labels[:, ::2, 1] = -1.0  # every other query has a single point (the second one is padding)
  logits, iou = predict_masks(model, params, embeddings, points, labels, input_hw=input_hw,
                              multimask_output=multimask_output)
  assert logits.shape[:2] == iou.shape[:2] == (num_images, num_queries)
  for b in range(num_images):
    for q in range(num_queries):
      one_logits, one_iou = predict_masks(model, params, embeddings[b:b + 1], points[b:b + 1, q:q + 1],
                                          labels[b:b + 1, q:q + 1], input_hw=input_hw,
                                          multimask_output=multimask_output)
      np.testing.assert_allclose(np.asarray(logits[b, q]), np.asarray(one_logits[0, 0]), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(iou[b, q]), np.asarray(one_iou[0, 0]), rtol=1e-5, atol=1e-5)


def _plain_attention(params: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
  """SAM's Attention written out in float64: project q, k, v, per-head softmax(q kᵀ / √d) v, out_proj."""
  proj = lambda x, name: x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"])
  split = lambda x: x.reshape(*x.shape[:2], heads, -1).transpose(0, 2, 1, 3)
  qp, kp, vp = split(proj(q, "q_proj")), split(proj(k, "k_proj")), split(proj(v, "v_proj"))
  logits = qp @ kp.transpose(0, 1, 3, 2) / np.sqrt(qp.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  out = (probs / probs.sum(-1, keepdims=True)) @ vp
  return proj(out.transpose(0, 2, 1, 3).reshape(*q.shape[:2], -1), "out_proj")


@pytest.mark.parametrize("q_shape, kv_shape, plan", [
    ((4, 3), (4, 300), ("fold_k", "fold_v")),   # few tokens attend to per-query image tokens
    ((4, 300), (4, 3), ("fold_q", "fold_o")),   # per-query image tokens attend to few tokens
    ((1, 300), (4, 3), ("project", "fold_o")),  # per-image image tokens (first block) attend to tokens
    ((4, 3), (1, 300), ("project", "project")),  # tokens attend to per-image image tokens
    ((4, 3), (4, 3), ("project", "project")),   # token self-attention
])
def test_attention_association_orders_give_the_same_result(q_shape, kv_shape, plan):
  """Every multiplication order the decoder's attention may choose equals the plain formula, per query."""
  from efficientsam_jax.models.mask_decoder import TwoWayAttention, attention_plan, repeat_per_query
  dim, heads, rate = 32, 4, 2
  layer = TwoWayAttention(dim, heads, rate)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(*q_shape, dim)).astype(np.float32)
  k, v = (rng.normal(size=(*kv_shape, dim)).astype(np.float32) for _ in range(2))
  params = layer.init(jax.random.PRNGKey(1), q, k, v)["params"]
  params = jax.tree_util.tree_map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)  # biases ≠ 0
  n = max(q_shape[0], kv_shape[0])
  stacked = (kv_shape[0], q_shape[0] // kv_shape[0] * q_shape[1]) if q_shape[0] > kv_shape[0] else q_shape
  assert attention_plan(n, stacked[0], kv_shape[0], stacked[1], kv_shape[1], dim, dim // rate, heads) == plan
  out = np.asarray(layer.apply({"params": params}, q, k, v))
  expect = _plain_attention(params, *(np.asarray(repeat_per_query(x, n), np.float64) for x in (q, k, v)), heads)
  assert out.shape == (n, q_shape[1], dim)
  np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_points", [1, 2, 5])
def test_short_prompts_equal_prompts_padded_to_the_limit(tiny_model, num_points: int):
  """A prompt of P < 6 points (one weighted padding token inside the model) decodes exactly as the same
  prompt padded with the official (-1, -1, label -1) points to 6, as the official model does."""
  model, params = tiny_model
  c = model.config
  h, w = c.embedding_hw
  rng = np.random.default_rng(num_points)
  embeddings = rng.normal(size=(2, h, w, c.decoder_dim)).astype(np.float32)
  points = (rng.uniform(size=(2, 3, num_points, 2)) * c.img_size).astype(np.float32)
  labels = rng.choice([0.0, 1.0, 2.0, 3.0], size=(2, 3, num_points)).astype(np.float32)
  extra = c.max_num_points - num_points
  padded_points = np.concatenate([points, np.full((2, 3, extra, 2), -1.0, np.float32)], axis=2)
  padded_labels = np.concatenate([labels, np.full((2, 3, extra), -1.0, np.float32)], axis=2)
  decode = jax.jit(lambda p, l: model.apply({"params": params}, embeddings, p, l, None, method=model.decode))
  short, padded = decode(points, labels), decode(padded_points, padded_labels)
  for a, b in zip(short, padded):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
