"""The decoder computes the prompt-independent image projections once per image, with unchanged params and outputs."""

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
