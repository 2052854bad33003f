"""The transformer MLP, fc2(GELU(fc1(x))), with the GELU inside the matmuls: Pallas kernels (Triton on NVIDIA GPUs).

In the SAMI ViT-S step compiled for an H100 (BENCHMARKS.md), XLA runs each decoder block's MLP as four cuBLAS
matmuls plus two memory-bound passes over the [B·147, 2048] hidden tensor: the GELU (reads fc1's output h, writes
g = GELU(h): 0.31 GB per block) and, in the backward pass, GELU's derivative with fc1's bias gradient (reads the
gradient of g and h, writes the gradient of h, then a column sum: 0.46 GB). XLA cannot put either into a matmul:
its GEMM fusions take only operands that do not grow the bytes read, and cuBLAS's epilogues no erf. Here:

* **forward**: one kernel computes fc1 with the GELU as its epilogue, h = x·W1 + b1 and g = GELU(h) written from
  the fp32 accumulator (h is what the backward needs; g is fc2's input and its weight gradient's); fc2 stays XLA's.
* **backward**: one kernel computes dg = dy·W2ᵀ with the derivative as its epilogue, dh = dg·GELU'(h), and sums
  dh's columns for fc1's bias gradient as it goes (a share per block of rows); the three other matmuls stay XLA's.

Each saves a pass over the hidden tensor and a kernel per block (untimed: ``launch/benchmark_gpu.sh``'s ``mlp``
part times it). Same parameters as ``vit.Mlp``; the values differ from XLA's by rounding (the hidden tensor
is rounded once, from fp32, not after the matmul and again after the bias) and by the erf (a rational
approximation within 5e-7 of XLA's: Pallas's Triton lowering has no erf).

Rows (the flattened leading axes) are split over devices as x is (``custom_partitioning``), the weights
replicated. On platforms other than CUDA the kernels run in Pallas's interpret mode (slow; the tests' CPU check).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficientsam_jax.models.layers import gelu, gelu_derivative, lean_gelu
from efficientsam_jax.models.short_attention import check_block_sizes, dot_f32, partitioned_like_first, per_platform


@dataclasses.dataclass(frozen=True)
class MatmulTiling:
  """Blocks and warps of both kernels: a program computes block_m × block_n of the hidden tensor, walking the
  inner dimension in steps of block_k (Triton pipelines ``stages`` of them)."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  warps: int = 8
  stages: int = 3

  def __post_init__(self):
    check_block_sizes(self, "block_m", "block_n", "block_k")


def fits(width: int, hidden: int, tiling: MatmulTiling = MatmulTiling()) -> bool:
  """Whether the kernels take an MLP of this width (the inner dimension of both kernels' matmuls) and hidden size:
  whole steps of ``block_k`` and whole column blocks (every SAMI and EfficientSAM MLP)."""
  return width % tiling.block_k == 0 and hidden % tiling.block_n == 0


_SQRT_HALF = 0.5 ** 0.5


def _erf(x: jax.Array, gaussian: jax.Array) -> jax.Array:
  """erf(x) for x = h/√2 given ``gaussian`` = exp(−x²): Abramowitz & Stegun 7.1.26, |error| < 1.5e-7
  (5e-7 in fp32 arithmetic)."""
  t = 1.0 / (1.0 + 0.3275911 * jnp.abs(x))
  tail = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
  magnitude = 1.0 - tail * gaussian
  return jnp.where(x < 0, -magnitude, magnitude)


def _normal(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Φ(h), exp(−h²/2)) in fp32: the standard normal's distribution function, and its density times √(2π)."""
  gaussian = jnp.exp(-0.5 * h * h)
  return 0.5 * (1.0 + _erf(h * _SQRT_HALF, gaussian)), gaussian


def _gelu(h: jax.Array, approximate: bool) -> jax.Array:
  """GELU(h) in fp32: h·Φ(h), or ``layers.gelu``'s tanh approximation."""
  return gelu(h, True) if approximate else h * _normal(h)[0]


def _gelu_derivative(h: jax.Array, approximate: bool) -> jax.Array:
  """GELU'(h) in fp32: Φ(h) + h·φ(h), or ``layers.gelu_derivative``'s of the tanh approximation."""
  if approximate:
    return gelu_derivative(h, True)
  cdf, gaussian = _normal(h)
  return cdf + h * gaussian * (1.0 / math.sqrt(2.0 * math.pi))


def _row_block(a_ref, rows: int) -> jax.Array:
  """Which of the program's rows are real (not past the end of the arrays)."""
  return pl.program_id(1) * a_ref.shape[0] + jnp.arange(a_ref.shape[0]) < rows


def _matmul(a_ref, valid: jax.Array, b_columns, columns: int, block_k: int, contract: int) -> jax.Array:
  """a_ref [block_m, K] (rows not ``valid`` read as zeros) times b, in fp32: ``b_columns(slice)`` gives b's block
  of those K indices, contracted over its axis ``contract``."""

  def step(i, total):
    inner = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    a = plt.load(a_ref.at[:, inner], mask=valid[:, None], other=0)
    return total + dot_f32(a, b_columns(inner), (1, contract))

  return jax.lax.fori_loop(0, a_ref.shape[1] // block_k, step, jnp.zeros((a_ref.shape[0], columns), jnp.float32))


def _forward_kernel(x_ref, w_ref, b_ref, h_ref, g_ref, *, rows: int, block_k: int, approximate: bool):
  valid = _row_block(x_ref, rows)
  total = _matmul(x_ref, valid, lambda inner: w_ref[inner, :], w_ref.shape[1], block_k, 0)
  h = (total + b_ref[...].astype(jnp.float32)[None, :]).astype(h_ref.dtype)
  plt.store(h_ref, h, mask=valid[:, None])
  plt.store(g_ref, _gelu(h.astype(jnp.float32), approximate).astype(g_ref.dtype), mask=valid[:, None])


def _backward_kernel(dy_ref, w_ref, h_ref, dh_ref, share_ref, *, rows: int, block_k: int, approximate: bool):
  valid = _row_block(dy_ref, rows)
  dg = _matmul(dy_ref, valid, lambda inner: w_ref[:, inner], w_ref.shape[0], block_k, 1)
  h = plt.load(h_ref, mask=valid[:, None], other=0).astype(jnp.float32)
  dh = dg * _gelu_derivative(h, approximate)  # zero on rows past the end: their dy read as zeros
  plt.store(dh_ref, dh.astype(dh_ref.dtype), mask=valid[:, None])
  share_ref[...] = jnp.sum(dh, axis=0)


def _tiles(tiling: MatmulTiling) -> pl.BlockSpec:
  """The BlockSpec of an [M, N] array in the kernels' programs: block_m rows × block_n columns (grid: column block,
  row block)."""
  return pl.BlockSpec((tiling.block_m, tiling.block_n), lambda j, i: (i, j))


def _call(kernel, a, w, transposed: bool, operands, outputs, tiling: MatmulTiling, interpret: bool, name: str,
          **static):
  """A kernel over a [M, K] and the weight ``w``, [K, N] or (``transposed``) [N, K], one program per block_m rows
  × block_n of the N columns (column blocks fastest: a block of a's rows is read from L2 by the programs after the
  first). ``operands``: the other inputs' (array, BlockSpec); ``outputs``: (dtype, per_row) each, per_row meaning
  an [M, N] output in row × column blocks, else one [row blocks, N] share per program."""
  rows, block_m, block_n = a.shape[0], tiling.block_m, tiling.block_n
  out_columns = w.shape[0] if transposed else w.shape[1]
  grid = (out_columns // block_n, pl.cdiv(rows, block_m))
  weight = (pl.BlockSpec((block_n, w.shape[1]), lambda j, i: (j, 0)) if transposed else
            pl.BlockSpec((w.shape[0], block_n), lambda j, i: (0, j)))
  return pl.pallas_call(
      functools.partial(kernel, rows=rows, block_k=tiling.block_k, **static), grid=grid,
      in_specs=[pl.BlockSpec((block_m, a.shape[1]), lambda j, i: (i, 0)), weight] + [spec for _, spec in operands],
      out_specs=[_tiles(tiling) if per_row else pl.BlockSpec((None, block_n), lambda j, i: (i, j))
                 for _, per_row in outputs],
      out_shape=[jax.ShapeDtypeStruct((rows if per_row else grid[1], out_columns), dtype)
                 for dtype, per_row in outputs],
      compiler_params=plt.CompilerParams(num_warps=tiling.warps, num_stages=tiling.stages), interpret=interpret,
      name=name)(a, w, *[array for array, _ in operands])


def _forward(x, w1, b1, *, approximate: bool, tiling: MatmulTiling, interpret: bool):
  """(h, g), each x's leading axes × hidden."""
  flat, hidden = x.reshape(-1, x.shape[-1]), w1.shape[1]
  h, g = _call(_forward_kernel, flat, w1, False, [(b1, pl.BlockSpec((tiling.block_n,), lambda j, i: (j,)))],
               [(x.dtype, True)] * 2, tiling, interpret, "gelu_mlp_forward", approximate=approximate)
  return h.reshape(*x.shape[:-1], hidden), g.reshape(*x.shape[:-1], hidden)


def _backward(dy, w2, h, *, approximate: bool, tiling: MatmulTiling, interpret: bool):
  """(dh, fc1's bias gradient) — the latter [examples, hidden]: the sum over this call's rows in its first row,
  zeros elsewhere (so that, split over devices as the examples are, the devices' shares add up)."""
  flat, hidden = dy.reshape(-1, dy.shape[-1]), w2.shape[0]
  dh, shares = _call(_backward_kernel, flat, w2, True, [(h.reshape(-1, hidden), _tiles(tiling))],
                     [(dy.dtype, True), (jnp.float32, False)], tiling, interpret, "gelu_mlp_backward",
                     approximate=approximate)
  bias = jnp.zeros((dy.shape[0], hidden), jnp.float32).at[0].set(shares.sum(0))
  return dh.reshape(h.shape), bias


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, approximate: bool, tiling: MatmulTiling):
  """The "forward" or "backward" kernel, split over examples as its first operand is (the weights replicated):
  each device runs it on its own rows, with no collectives."""
  run = per_platform(functools.partial(_forward if kind == "forward" else _backward, approximate=approximate,
                                       tiling=tiling))
  inputs, outputs = {"forward": ("b t k, k n, n", "b t n, b t n"),
                     "backward": ("b t k, n k, b t n", "b t n, b n")}[kind]

  def shardings(mesh, layouts: str, x) -> tuple:
    examples = x.sharding.spec[0] if len(x.sharding.spec) else None
    return tuple(NamedSharding(mesh, P(*(examples if axis == "b" else None for axis in layout.split())))
                 for layout in layouts.split(", "))

  return partitioned_like_first(run, inputs, outputs, shardings, split=("b",))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _mlp(x, w1, b1, w2, b2, approximate: bool, tiling: MatmulTiling):
  return _mlp_fwd(x, w1, b1, w2, b2, approximate, tiling)[0]


def _mlp_fwd(x, w1, b1, w2, b2, approximate, tiling):
  h, g = _kernel("forward", approximate, tiling)(x, w1, b1)
  return jnp.dot(g, w2) + b2, (x, w1, w2, h, g)


def _mlp_bwd(approximate, tiling, residuals, dy):
  x, w1, w2, h, g = residuals
  dh, db1 = _kernel("backward", approximate, tiling)(dy, w2, h)
  outer = lambda a, b: jnp.einsum("...i,...j->ij", a, b, preferred_element_type=jnp.float32)  # Σ over rows of aᵀb
  db2 = jnp.sum(dy, axis=tuple(range(dy.ndim - 1)), dtype=jnp.float32)
  dx = jnp.dot(dh, w1.T)
  return dx, outer(x, dh).astype(w1.dtype), db1.sum(0).astype(w1.dtype), outer(g, dy).astype(w2.dtype), db2.astype(
      w2.dtype)


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def gelu_mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, approximate: bool = False,
             tiling: MatmulTiling = MatmulTiling()) -> jax.Array:
  """GELU(x·W1 + b1)·W2 + b2 for x [B, ..., C], W1 [C, F], b1 [F], W2 [F, C], b2 [C], computed in x's dtype (the
  parameters cast to it, as a flax ``Dense`` of that ``dtype`` does); exact (erf) GELU or the tanh approximation.
  Differentiable in all five."""
  width, hidden = x.shape[-1], w1.shape[-1]
  if x.ndim < 2 or w1.shape != (width, hidden) or b1.shape != (hidden,) or w2.shape != (hidden, width) or (
      b2.shape != (width,)):
    raise ValueError(f"gelu_mlp takes x [B, ..., C], W1 [C, F], b1 [F], W2 [F, C], b2 [C]; got "
                     f"{[t.shape for t in (x, w1, b1, w2, b2)]}")
  if not fits(width, hidden, tiling):
    raise ValueError(f"gelu_mlp's kernels need the width ({width}) in steps of {tiling.block_k} and the hidden size "
                     f"({hidden}) in blocks of {tiling.block_n}: use the XLA MLP")
  w1, b1, w2, b2 = (t.astype(x.dtype) for t in (w1, b1, w2, b2))
  if x.ndim == 2:
    return _mlp(x[None], w1, b1, w2, b2, approximate, tiling)[0]
  rows = (x.shape[0], math.prod(x.shape[1:-1]), width)  # the kernels' "b t k": examples, their tokens, channels
  return _mlp(x.reshape(rows), w1, b1, w2, b2, approximate, tiling).reshape(x.shape)


def xla_mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array,
            approximate: bool = False) -> jax.Array:
  """What ``gelu_mlp`` computes, with XLA's matmuls and the lean GELU between them (``vit.Mlp``'s "xla" path on
  parameters already in x's dtype): the reference it is tested and benchmarked against."""
  return jnp.dot(lean_gelu(jnp.dot(x, w1) + b1, approximate), w2) + b2
