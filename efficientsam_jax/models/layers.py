"""Small building blocks shared by the EfficientSAM and SAM modules.

Module and parameter names follow the official PyTorch attribute names
(``blocks_3`` for ``blocks.3``), so the checkpoint converter is a mechanical
renaming; see ``efficientsam_jax/convert/torch_keys.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any



def exact_gelu(x: jax.Array) -> jax.Array:
  """PyTorch's default ``nn.GELU`` (erf form, not the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention on [..., T, N, H] (tokens, heads, head dim) → [..., T, N, H].

  Heads-first matmuls with the scale folded into q: on CPU this avoids the
  extra copy of the T×T probabilities that ``jax.nn.dot_product_attention``
  makes in this layout (Ti encoder 3.2 s → 2.1 s at 1024, BENCHMARKS.md).
  Logits and softmax are fp32 whatever the compute dtype.
  """
  q, k, v = (jnp.swapaxes(t, -3, -2) for t in (q, k, v))
  logits = jnp.matmul(q * (q.shape[-1] ** -0.5), jnp.swapaxes(k, -1, -2),
                      preferred_element_type=jnp.float32)
  out = jax.nn.softmax(logits, axis=-1).astype(v.dtype) @ v
  return jnp.swapaxes(out, -3, -2)


def layer_norm(eps: float, name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm with PyTorch's two-pass variance (exact parity in fp32)."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class MLPBlock(nn.Module):
  """EfficientSAM's ``MLPBlock``: ``num_layers`` × (Linear + act), then ``fc``."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  act: Callable[[jax.Array], jax.Array] = exact_gelu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = self.act(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"layers_{i}_0")(x))
    return nn.Dense(self.output_dim, dtype=self.dtype, name="fc")(x)


class ConvTranspose2x2(nn.Module):
  """``nn.ConvTranspose2d(kernel_size=2, stride=2)`` on channels-last input, without the pixel shuffle.

  With kernel = stride = 2 the output patches do not overlap: input pixel (i, j) alone gives output
  pixels (2i + a, 2j + b), a, b ∈ {0, 1}. [..., C] → [..., 2, 2, O] (a, b before the channels);
  ``pixel_shuffle`` interleaves them. Per-pixel layers (norms over all pixels, activations, further
  such convolutions) can run before the shuffle, so a stack of them shuffles once, at the end.
  Kernel layout (kh, kw, in, out).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum("...c,abco->...abo", x, kernel) + bias


def pixel_shuffle(x: jax.Array, levels: int) -> jax.Array:
  """[N, h, w, (2, 2) × levels, ...] from ``levels`` stacked ``ConvTranspose2x2`` → [N, 2^L·h, 2^L·w, ...].

  Level 1's (a, b) are the coarsest sub-pixel offsets: output row = 2^L·i + 2^(L-1)·a1 + … + a_L.
  """
  n, h, w = x.shape[:3]
  rest = x.shape[3 + 2 * levels:]
  rows = [3 + 2 * i for i in range(levels)]
  order = [0, 1, *rows, 2, *(r + 1 for r in rows), *range(3 + 2 * levels, x.ndim)]
  return x.transpose(order).reshape(n, h * 2 ** levels, w * 2 ** levels, *rest)
