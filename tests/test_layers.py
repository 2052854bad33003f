"""LayerNorm and GELU with lean backward passes (flax's / PyTorch's values, autodiff's gradients, less kept); attention
with padded tokens."""

import math

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from efficientsam_jax.models import layers
from efficientsam_jax.models.layers import Kernels
from efficientsam_jax.models.sami import SamiConfig, SamiModel
from efficientsam_jax.train.benchmark import saved_residual_bytes
from efficientsam_jax.train.sami import make_loss_fn

SHAPE = (3, 5, 64)


def _inputs(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), SHAPE) * 3.0 + 1.0
  weights = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  return x.astype(dtype), weights


def _max_abs(tree):
  return float(jnp.abs(jax.flatten_util.ravel_pytree(jax.tree.map(lambda a: a.astype(jnp.float32), tree))[0]).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("one_pass", [False, True])
def test_layer_norm_is_flax_layer_norm_with_autodiffs_gradients(dtype, one_pass):
  x, weights = _inputs(dtype)
  flax_norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=one_pass, dtype=dtype)
  params = flax_norm.init(jax.random.PRNGKey(2), x)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
  loss = lambda norm: lambda p, x: jnp.sum(jnp.sin(norm.apply(p, x).astype(jnp.float32)) * weights)
  # The gradient of the same loss in fp32 throughout (for bf16: of the rounded input).
  reference = jax.grad(loss(nn.LayerNorm(epsilon=1e-6, use_fast_variance=one_pass)), (0, 1))(
      params, x.astype(jnp.float32))
  for lean in (True, False):
    ours = layers.layer_norm(1e-6, None, dtype, one_pass=one_pass, lean=lean)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(ours.apply(params, x), flax_norm.apply(params, x))  # bit for bit
    grads = jax.grad(loss(ours), (0, 1))(params, x)
    error = _max_abs(jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, grads, reference))
    assert error <= (2e-6 if dtype == jnp.float32 else 1e-2) * _max_abs(reference), (lean, error)
  # What the backward pass keeps besides its arguments: the row mean and 1/σ (fp32), not x-sized fp32 copies.
  rows = int(np.prod(SHAPE[:-1]))
  kept = lambda lean: saved_residual_bytes(layers.layer_norm(1e-6, None, dtype, one_pass, lean).apply, params, x)
  assert kept(True) == 2 * rows * 4
  assert kept(False) >= 3 * x.size * 4


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lean_gelu_is_pytorchs_gelu_with_autodiffs_gradient(approximate, dtype):
  x, weights = _inputs(dtype)
  gelu = lambda x: layers.lean_gelu(x, approximate)
  if approximate:
    np.testing.assert_array_equal(gelu(x), jax.nn.gelu(x, approximate=True))
  else:  # PyTorch's formula in fp32 (erf's error, a few fp32 eps, times |x|), rounded once to x's dtype
    wide = np.asarray(x, np.float64)
    exact = wide * 0.5 * (1 + np.vectorize(math.erf)(wide / math.sqrt(2)))
    tolerance = 2.0 ** (-22 if dtype == jnp.float32 else -8) * np.abs(exact) + 2.0 ** -21 * np.abs(wide)
    assert np.all(np.abs(np.asarray(gelu(x), np.float64) - exact) <= tolerance)
    # erf, not jax.nn.gelu's erfc (two rational approximations and an exp per element: compute-bound on a GPU)
    primitives = {e.primitive.name for e in jax.make_jaxpr(layers.gelu)(x).eqns}
    assert "erf" in primitives and "erfc" not in primitives
  loss = lambda f: lambda x: jnp.sum(f(x).astype(jnp.float32) * weights)
  reference = jax.grad(loss(lambda x: jax.nn.gelu(x, approximate=approximate)))(x.astype(jnp.float32))
  got = jax.grad(loss(gelu))(x).astype(jnp.float32)
  np.testing.assert_allclose(got, reference, atol=(1e-6 if dtype == jnp.float32 else 1e-2) * _max_abs(reference))
  # Kept for the backward pass: x only (here input + 1, not an argument); autodiff keeps more of its size.
  shifted = lambda f: lambda x: f(x + 1.0)
  assert saved_residual_bytes(shifted(gelu), x) == x.nbytes
  assert saved_residual_bytes(shifted(lambda x: jax.nn.gelu(x, approximate=approximate)), x) >= 2 * x.nbytes


def test_sami_model_with_lean_backward_keeps_less_for_the_same_values():
  config = SamiConfig(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=3, img_size=64, decoder_dim=32,
                      decoder_depth=2, decoder_num_heads=4, target_dim=8)
  batch = {"images": jax.random.randint(jax.random.PRNGKey(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8),
           "targets": jax.random.normal(jax.random.PRNGKey(1), (2, config.num_tokens, 8))}
  mask_rng = jax.random.PRNGKey(2)
  params = SamiModel(config).init(jax.random.PRNGKey(3), jnp.zeros((1, 64, 64, 3)), mask_rng)["params"]
  loss = {backward: (lambda p, m=SamiModel(config, dtype=jnp.bfloat16, kernels=Kernels(
      layer_norm="one_pass", backward=backward)): make_loss_fn(m)(p, batch, mask_rng))
          for backward in ("lean", "autodiff")}
  value, grads = jax.jit(jax.value_and_grad(loss["lean"]))(params)
  reference, reference_grads = jax.jit(jax.value_and_grad(loss["autodiff"]))(params)
  assert value == reference  # the forward pass is the same computation
  flat, flat_reference = (jax.flatten_util.ravel_pytree(g)[0] for g in (grads, reference_grads))
  np.testing.assert_allclose(flat, flat_reference, atol=2e-2 * float(jnp.abs(flat_reference).max()))
  # (ViT-S at 224: 87 → 54 MB per example, `train.benchmark sami --kernels ...,backward=autodiff;...`)
  assert saved_residual_bytes(loss["lean"], params) < 0.8 * saved_residual_bytes(loss["autodiff"], params)
  assert Kernels().backward == "lean"
  with pytest.raises(ValueError, match="backward must be one of"):
    Kernels(backward="remat")


@pytest.mark.parametrize("tokens", [7, 8])
def test_attention_ignores_padded_keys(monkeypatch, tokens):
  """Rows padded before the projections (``Kernels.token_padding``): keys from ``num_keys`` on change nothing, on
  the XLA path and on the cuDNN path (jax's XLA kernel standing in for cuDNN's, none here), and the cuDNN path
  sees even counts only."""
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, tokens, 4, 8)) for i in range(3))
  reference = layers.attention(q, k, v, "xla")
  garbage = lambda x: jnp.concatenate([x, 100.0 + x[:, :1]], axis=1)  # one padded key: anything but zeros
  np.testing.assert_array_equal(layers.attention(q, garbage(k), garbage(v), "xla", num_keys=tokens), reference)
  real, lengths = jax.nn.dot_product_attention, []

  def xla_kernel(q, k, v, *args, implementation=None, **kwargs):
    lengths.append((q.shape[1], k.shape[1]))
    return real(q, k, v, *args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_kernel)
  padded = layers.attention(garbage(q), garbage(k), garbage(v), "cudnn", num_keys=tokens)
  np.testing.assert_allclose(padded[:, :tokens], reference, atol=1e-5)
  assert all(t % 2 == 0 and s % 2 == 0 for t, s in lengths), lengths
  assert Kernels(attention="cudnn").token_padding(tokens, 8, jnp.bfloat16) == tokens % 2
  for implementation in ("xla", "pallas"):
    assert Kernels(attention=implementation).token_padding(tokens, 8, jnp.bfloat16) == 0
