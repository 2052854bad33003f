"""Small building blocks shared by the EfficientSAM and SAM modules.

Module and parameter names follow the official PyTorch attribute names
(``blocks_3`` for ``blocks.3``), so the checkpoint converter is a mechanical
renaming; see ``efficientsam_jax/convert/torch_keys.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientsam_jax.models.short_attention import Tiling, fits, short_attention

Dtype = Any


def exact_gelu(x: jax.Array) -> jax.Array:
  """PyTorch's default ``nn.GELU`` (erf form, not the tanh approximation); lean backward (``lean_gelu``)."""
  return lean_gelu(x, False)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")


_ATTENTION_DEVICE = contextvars.ContextVar("attention_device", default=None)


@contextlib.contextmanager
def attention_device(device: jax.Device):
  """Within, "auto" attention resolves for ``device`` instead of the first attached device: for a GPU that a
  program is compiled for without being attached (``train.benchmark --gpu-spec``)."""
  token = _ATTENTION_DEVICE.set(device)
  try:
    yield
  finally:
    _ATTENTION_DEVICE.reset(token)


def _on_cuda(device: "jax.Device | None" = None) -> bool:
  """``device`` (default: ``attention_device``'s, else the first attached one) is an NVIDIA GPU whose cuDNN has
  flash attention: compute capability 8.0 (Ampere) or later."""
  device = device or _ATTENTION_DEVICE.get() or jax.devices()[0]
  capability = str(getattr(device, "compute_capability", ""))  # "9.0" on an H100/H200; absent on CPU and TPU
  return device.platform == "gpu" and capability.replace(".", "", 1).isdigit() and float(capability) >= 8.0


def resolve_attention(implementation: str, dtype: Dtype, device: "jax.Device | None" = None,
                      keys: "int | None" = None, head_dim: "int | None" = None) -> str:
  """"auto" → on NVIDIA GPUs in bf16/fp16, "pallas" where its kernels hold the keys (``keys`` and ``head_dim``
  given and ``short_attention.fits``: SAMI's attention; the ViT-S step 2.2% faster than with "cudnn" on an H200)
  and "cudnn" otherwise (the ViT-S step 1.3× faster than with "xla"; BENCHMARKS.md); "xla" elsewhere. The others
  as they are. ``device``: the one that will run it (default: ``attention_device``'s, else the first attached)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  if not _on_cuda(device) or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  return "pallas" if keys is not None and head_dim is not None and fits(keys, head_dim) else "cudnn"


def attention(q: jax.Array, k: "jax.Array | None", v: "jax.Array | None", implementation: str = "xla",
              num_keys: "int | None" = None, bias: "jax.Array | None" = None,
              tiling: "Tiling | None" = None) -> jax.Array:
  """Softmax attention on [..., T, N, H] (tokens, heads, head dim) → [..., T, N, H]. Packed operands (one
  projection's output, which the Pallas kernels read as it is): v None, k holds k and v [..., S, 2, N, H]; k and v
  None, q holds q, k and v [..., T, 3, N, H].

  "xla": heads-first matmuls with the scale folded into q: on CPU this avoids
  the extra copy of the T×T probabilities that ``jax.nn.dot_product_attention``
  makes in this layout (Ti encoder 3.2 s → 2.1 s at 1024, BENCHMARKS.md).
  Logits and softmax are fp32 whatever the compute dtype.
  "cudnn": cuDNN's fused (flash) attention through ``jax.nn.dot_product_attention``,
  which reads this layout as it is (no head transposes); NVIDIA GPUs, bf16/fp16, [B, T, N, H].
  Its backward pass needs even token counts (jax 0.11 refuses e.g. SAMI's 49 visible tokens), so an
  odd count is padded by one: a query row whose output is dropped, a key masked out by its length
  (``Kernels.token_padding`` pads before the projections instead, where the pad costs nothing).
  "pallas": ``short_attention.short_attention``, Pallas kernels that hold all the keys of an (example, head)
  in one tile (up to 512 keys, head dim a power of 2 from 16; Triton on NVIDIA GPUs, interpret mode elsewhere).
  "auto": "pallas", "cudnn" or "xla" by the backend, q's dtype and the shapes (``resolve_attention``).
  ``num_keys``: only the first ``num_keys`` keys count (the rest are padding). ``bias`` [3, N, H]: the q, k and v
  projections' biases, not yet added (the Pallas kernels apply them themselves, which saves a kernel per
  projection; the others add them first). ``tiling``: the Pallas kernels' blocks and warps (default ``Tiling()``).
  """
  shape = q.shape if k is not None else (*q.shape[:-3], *q.shape[-2:])  # the output's
  keys = q.shape[-4] if k is None else k.shape[-4] if v is None else k.shape[-3]
  implementation = resolve_attention(implementation, q.dtype, keys=keys, head_dim=q.shape[-1])
  if implementation == "pallas":
    examples = lambda t: None if t is None else t.reshape(-1, *t.shape[len(shape) - 3:])
    return short_attention(examples(q), examples(k), examples(v), num_keys, tiling or Tiling(),
                           bias=bias).reshape(shape)
  if k is None:
    q, k, v = (q[..., s, :, :] for s in range(3))
  elif v is None:
    k, v = k[..., 0, :, :], k[..., 1, :, :]
  if bias is not None:
    q, k, v = (t + b.astype(t.dtype) for t, b in zip((q, k, v), bias))
  if implementation == "cudnn":
    return even_length_attention(q, k, v, implementation="cudnn", num_keys=num_keys)
  if num_keys is not None:
    k, v = k[..., :num_keys, :, :], v[..., :num_keys, :, :]
  q, k, v = (jnp.swapaxes(t, -3, -2) for t in (q, k, v))
  logits = jnp.matmul(q * (q.shape[-1] ** -0.5), jnp.swapaxes(k, -1, -2),
                      preferred_element_type=jnp.float32)
  out = jax.nn.softmax(logits, axis=-1).astype(v.dtype) @ v
  return jnp.swapaxes(out, -3, -2)


def even_length_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
                          num_keys: "int | None" = None, **kwargs) -> jax.Array:
  """``jax.nn.dot_product_attention`` (``kwargs`` passed on) on [B, T, N, H] with T and the key count padded to
  even numbers (what cuDNN's backward pass needs; see ``attention``); keys from ``num_keys`` on are masked."""
  queries, keys = q.shape[-3], k.shape[-3]
  valid = keys if num_keys is None else num_keys
  pad = lambda x, extra: jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, extra), (0, 0), (0, 0)]) if extra else x
  lengths = jnp.full(q.shape[:-3], valid, jnp.int32) if keys % 2 or valid < keys else None
  out = jax.nn.dot_product_attention(pad(q, queries % 2), pad(k, keys % 2), pad(v, keys % 2),
                                     key_value_seq_lengths=lengths, implementation=implementation, **kwargs)
  return out[..., :queries, :, :]


def pad_tokens(x: jax.Array, extra: int) -> jax.Array:
  """x [..., T, C] with ``extra`` zero rows after its T tokens."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)]) if extra else x


# What a rematerialized block keeps for the backward pass (``remat``); the rest is recomputed there.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "dots": jax.checkpoint_policies.dots_saveable,  # every matmul output: LayerNorm, GELU, softmax recomputed
    # the projections' outputs only: also the attention logits and probabilities (q·kᵀ again)
    "projections": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(policy: "str | bool") -> Callable | None:
  """The ``jax.checkpoint`` policy named by ``policy`` ("full", "dots", "projections"; ``True`` = "full"), None
  for "none"/False (no rematerialization)."""
  if policy is False or policy == "none":
    return None
  name = "full" if policy is True else policy
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat must be 'none' or one of {sorted(REMAT_POLICIES)}, got {policy!r}")
  return REMAT_POLICIES[name]


def remat(cls: type, policy: "str | bool") -> type:
  """``cls`` (a block) as is for "none"/False, else ``nn.remat(cls)`` keeping what the policy saves.

  Same parameters and values; only what the backward pass reads from memory and what it recomputes
  changes (``remat_policy``).
  """
  saved = remat_policy(policy)
  return cls if saved is None else nn.remat(cls, policy=saved)


def _layer_norm(x, scale, bias, eps: float, one_pass: bool, dtype):
  """flax ``nn.LayerNorm``'s values over the last axis, bit for bit (its fp32 statistics and order of
  operations) → (y, mean, 1/σ). ``one_pass``: variance E[x²] − E[x]² clipped at 0, else E[(x − mean)²]."""
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = wide.mean(-1, keepdims=True)
  if one_pass:
    var = jnp.maximum(0.0, jnp.square(wide).mean(-1, keepdims=True) - jnp.square(mean))
  else:
    var = jnp.square(wide - mean).mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + eps)
  return (((x - mean) * (rstd * scale)) + bias).astype(dtype), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def lean_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, one_pass: bool,
                    dtype: Dtype) -> jax.Array:
  """LayerNorm over the last axis whose backward pass keeps only x and the per-row mean and 1/σ.

  The values of ``nn.LayerNorm``. jax's autodiff of it keeps three fp32 tensors of x's size (x², x − mean,
  the normalized x) for the backward pass; this recomputes the normalized x there from x instead.
  """
  return _layer_norm(x, scale, bias, eps, one_pass, dtype)[0]


def _lean_layer_norm_fwd(x, scale, bias, eps, one_pass, dtype):
  y, mean, rstd = _layer_norm(x, scale, bias, eps, one_pass, dtype)
  return y, (x, mean, rstd, scale, bias)


def _lean_layer_norm_bwd(eps, one_pass, dtype, residuals, grad):
  x, mean, rstd, scale, bias = residuals
  normalized = (x.astype(mean.dtype) - mean) * rstd
  grad = grad.astype(mean.dtype)
  batch_axes = tuple(range(x.ndim - 1))
  # both column sums in one (variadic) reduction: one kernel that reads grad once (XLA does not merge two sums)
  zero = jnp.zeros((), grad.dtype)
  grad_scale, grad_bias = jax.lax.reduce((grad * normalized, grad), (zero, zero),
                                         lambda a, b: (a[0] + b[0], a[1] + b[1]), batch_axes)
  grad_scale, grad_bias = grad_scale.astype(scale.dtype), grad_bias.astype(bias.dtype)
  grad_normalized = grad * scale
  # d/dx of (x − mean)·rstd: the row's mean gradient and its projection on the normalized x removed
  grad_x = rstd * (grad_normalized - grad_normalized.mean(-1, keepdims=True)
                   - normalized * (grad_normalized * normalized).mean(-1, keepdims=True))
  return grad_x.astype(x.dtype), grad_scale, grad_bias


lean_layer_norm.defvjp(_lean_layer_norm_fwd, _lean_layer_norm_bwd)


class LayerNorm(nn.Module):
  """``nn.LayerNorm`` over the last axis (same parameters "scale"/"bias", same values) with a choice of what
  its backward pass keeps: ``lean`` (``lean_layer_norm``) or jax's autodiff of the forward."""

  epsilon: float = 1e-6
  one_pass: bool = False
  dtype: Dtype = jnp.float32
  lean: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
    if self.lean:
      return lean_layer_norm(x, scale, bias, self.epsilon, self.one_pass, self.dtype)
    return _layer_norm(x, scale, bias, self.epsilon, self.one_pass, self.dtype)[0]


def layer_norm(eps: float, name: str, dtype: Dtype = jnp.float32, one_pass: bool = False,
               lean: bool = True) -> LayerNorm:
  """LayerNorm; by default with PyTorch's two-pass variance (exact parity in fp32).

  ``one_pass``: E[x²] − E[x]² from one reduction over x (flax's fast variance; statistics in fp32).
  ``lean``: the backward pass keeps x and the row statistics only (``lean_layer_norm``).
  """
  return LayerNorm(epsilon=eps, one_pass=one_pass, dtype=dtype, lean=lean, name=name)


def gelu_derivative(x: jax.Array, approximate: bool) -> jax.Array:
  if approximate:  # d/dx of x·(1 + tanh(u))/2, u = √(2/π)·(x + 0.044715·x³)
    c = math.sqrt(2.0 / math.pi)
    t = jnp.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
  return 0.5 * (1.0 + jax.lax.erf(x * (0.5 ** 0.5))) + x * jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU. Exact: PyTorch's ``nn.GELU()`` formula, x·(1 + erf(x/√2))/2, computed in fp32 and rounded once to
  x's dtype (as PyTorch does for bf16). ``jax.nn.gelu`` computes x·erfc(−x/√2)/2 instead, whose erfc (two
  rational approximations and an exp, per element) made the SAMI decoder's GELU compute-bound on an H200, in
  two kernels: 0.33 ms per block for 0.77 GB, against 0.12 ms for 0.31 GB in one this way (BENCHMARKS.md).
  Tanh: ``jax.nn.gelu``'s, in x's dtype, the pattern that cuBLASLt fuses into the GEMM before it."""
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (0.5 * wide * (1.0 + jax.lax.erf(wide * (0.5 ** 0.5)))).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def lean_gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """``gelu`` whose backward pass keeps only x (autodiff keeps intermediates of x's size in fp32) and computes
  the derivative from it in fp32."""
  return gelu(x, approximate)


def _lean_gelu_bwd(approximate, x, grad):
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return ((grad.astype(wide.dtype) * gelu_derivative(wide, approximate)).astype(x.dtype),)


lean_gelu.defvjp(lambda x, approximate: (lean_gelu(x, approximate), x), _lean_gelu_bwd)


@dataclasses.dataclass(frozen=True)
class Kernels:
  """How a transformer block computes attention, LayerNorm and GELU: speed choices over the same parameters.

  attention: "xla", "cudnn", "pallas" or "auto" (see ``attention``).
  layer_norm: "two_pass" (PyTorch's variance) or "one_pass" (see ``layer_norm``).
  gelu: "exact" (erf, PyTorch's ``nn.GELU()``) or "tanh" (the tanh approximation, max. error ~5e-4).
  backward: what LayerNorm and GELU keep for the backward pass: "lean" (their input and LayerNorm's row
  statistics: ``lean_layer_norm``, ``lean_gelu``) or "autodiff" (jax's autodiff of the forward, which keeps
  fp32 intermediates). Same values either way; the gradients differ by rounding.
  tiling: the Pallas attention's blocks and warps, "" for the default or its numbers joined by "/"
  (``short_attention.Tiling.parse``, e.g. "64/4/16/4/4/32"): the fastest blocks differ between GPUs and shapes
  (``launch/benchmark_gpu.sh``'s attention part times some). Same values; the gradients differ by rounding.
  mlp: the transformer MLP (``vit.Mlp``) as "xla" (two Dense layers and the GELU between them) or "pallas" (the
  GELU inside the matmuls' kernels: ``gelu_mlp``; its own backward, whatever ``backward`` says). Same parameters;
  the values differ by rounding.
  The defaults compute exactly what the official PyTorch modules do.
  """

  attention: str = "xla"
  layer_norm: str = "two_pass"
  gelu: str = "exact"
  backward: str = "lean"
  tiling: str = ""
  mlp: str = "xla"

  def __post_init__(self):
    for field, allowed in (("attention", ATTENTION_IMPLEMENTATIONS), ("layer_norm", ("two_pass", "one_pass")),
                           ("gelu", ("exact", "tanh")), ("backward", ("lean", "autodiff")), ("mlp", ("xla", "pallas"))):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
    Tiling.parse(self.tiling)  # refused here, not at the first attention

  def attend(self, q: jax.Array, k: "jax.Array | None", v: "jax.Array | None", num_keys: "int | None" = None,
             bias: "jax.Array | None" = None) -> jax.Array:
    return attention(q, k, v, self.attention, num_keys, bias, Tiling.parse(self.tiling))

  def implementation(self, keys: int, head_dim: int, dtype: Dtype) -> str:
    """The attention that ``attend`` runs over ``keys`` keys of ``head_dim`` channels (``resolve_attention``)."""
    return resolve_attention(self.attention, dtype, keys=keys, head_dim=head_dim)

  def token_padding(self, tokens: int, head_dim: int, dtype: Dtype, keys: "int | None" = None) -> int:
    """Rows a block adds to its ``tokens`` before the projections that feed an attention over ``keys`` keys
    (default: ``tokens``) of ``head_dim`` channels: 1 for an odd count with cuDNN's attention (which needs even
    counts), else 0. Padded there, the pad fuses into the LayerNorm
    before the projections and the slice back into the residual add after them; inside ``attention`` each is
    a copy of q, k, v or the output (H100 compile of the SAMI ViT-S step: 3.6 GB of 62 per step, BENCHMARKS.md).
    The padded rows are keys that ``attend(..., num_keys=tokens)`` masks out and queries whose outputs the
    block drops."""
    return tokens % 2 if self.implementation(tokens if keys is None else keys, head_dim, dtype) == "cudnn" else 0

  def norm(self, eps: float, name: str, dtype: Dtype) -> LayerNorm:
    return layer_norm(eps, name, dtype, one_pass=self.layer_norm == "one_pass", lean=self.backward == "lean")

  def act(self, x: jax.Array) -> jax.Array:
    approximate = self.gelu == "tanh"
    return lean_gelu(x, approximate) if self.backward == "lean" else gelu(x, approximate)


class DenseParams(nn.Module):
  """An ``nn.Dense(features)``'s parameters, unapplied: (kernel, bias), with Dense's names, shapes and initializers
  (so the same values from the same key), for a projection whose bias is added elsewhere (``attention``'s
  ``bias``)."""

  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features)),
            self.param("bias", nn.initializers.zeros_init(), (self.features,)))


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


def per_example(fn: Callable, rng: jax.Array, example_ids: jax.Array, *args):
  """``fn(key, *row)`` for each row of ``args`` (none: one call per id), with the key ``fold_in(rng, example
  id)``: random draws that do not depend on which other examples share the batch (gradient accumulation)."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, example_ids)
  return jax.vmap(fn)(keys, *args)


def pixel_shuffle(x: jax.Array, levels: int) -> jax.Array:
  """[N, h, w, (2, 2) × levels, ...] from ``levels`` stacked ``ConvTranspose2x2`` → [N, 2^L·h, 2^L·w, ...].

  Level 1's (a, b) are the coarsest sub-pixel offsets: output row = 2^L·i + 2^(L-1)·a1 + … + a_L.
  """
  n, h, w = x.shape[:3]
  rest = x.shape[3 + 2 * levels:]
  rows = [3 + 2 * i for i in range(levels)]
  order = [0, 1, *rows, 2, *(r + 1 for r in rows), *range(3 + 2 * levels, x.ndim)]
  return x.transpose(order).reshape(n, h * 2 ** levels, w * 2 ** levels, *rest)
