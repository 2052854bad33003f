"""Softmax attention over short key sequences as Pallas kernels (Triton on NVIDIA GPUs): all the keys of one
(example, head) in one tile.

SAMI's decoder attends 147 masked-token queries to 196 keys in 16 heads of 32 channels. cuDNN's flash attention
runs that as 64-query tiles over two key steps each, with a running rescale of the softmax between them: 6.2 ms of
the 33.6 ms ViT-S step on an H200, at 68 TFLOP/s (BENCHMARKS.md, eleventh session). Here a program holds every key
of its (example, head) at once:

* forward, one program per (example, head or group of heads, block of queries): q·kᵀ for the whole row, the
  softmax in one pass, p·v, and the row's log-sum-exp for the backward pass;
* backward, one program per (example, head) by default: k and v stay loaded, dk and dv accumulate in registers
  while the program walks the query blocks (keys on the rows of every product), and each block's dq is complete
  when written (no atomics, no second kernel); or (``Tiling.block_k_backward``) split in two kernels, dq by query
  blocks as the forward, dk and dv by small blocks of keys, several programs to an SM.

The q, k and v projections' biases can be left to the kernels (``bias``): q's is added as q is loaded, v's to the
output, and k's drops out of the softmax. Added before, each would be a kernel of its own, since a projection's
bias add cannot fuse into a custom call. k and v, or q, k and v, may come packed in one array (one projection's
output), which the kernels read as it is; the backward then writes their gradients packed alike, and sums the
biases' gradients as it computes them. SAMI's decoder and the ViT encoder do all this: the ViT-S step moves 54.7
GB instead of 62.0 (H100 compile, BENCHMARKS.md).

Measured on an H200 at batch 256 (BENCHMARKS.md, thirteenth and fourteenth sessions): the decoder's attention
forward 0.18 ms against cuDNN's 0.30, forward and backward 0.84 ms against 0.89; the ViT-S encoder's (49 tokens, 6
heads of 64) 2× faster; the ViT-S step 30.9 ms against cuDNN's 32.5. ``layers.attention``'s "auto" picks these
kernels where they fit.

Layout [B, T, N, H] (tokens, heads, head dim) as ``layers.attention``; H a power of 2 from 16 on, at most
``MAX_KEYS`` keys. Logits, softmax and accumulators are fp32; p and the gradients of the logits are rounded to
the inputs' dtype for their matmuls, as flash attention does. Under a mesh the kernels split over examples and
heads as their inputs are (``custom_partitioning``), so data-parallel and FSDP steps run them on each device's
share with no collectives. On platforms other than CUDA the same kernels run in Pallas's interpret mode (slow;
it is what the tests check on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plt
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# One tile of keys per program: the logits of a query block are block_q × (keys rounded up to a power of 2), fp32
# in registers. Past this, use cuDNN's or XLA's attention.
MAX_KEYS = 512


def check_block_sizes(tiling, *fields: str) -> None:
  """Refuses a tiling whose ``fields`` are not powers of 2 from 16 on, as a Triton block's sides must be."""
  for field in fields:
    size = getattr(tiling, field)
    if size < 16 or size & (size - 1):
      raise ValueError(f"{field} must be a power of 2 from 16 on, got {size}")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Query block sizes and warps per program of the kernels (``launch/benchmark_gpu.sh``'s attention part times
  alternatives). The backward program also holds dk and dv for all its keys, hence its smaller blocks.
  ``heads_per_program``: a forward program takes up to this many heads one after the other (a loop whose next loads
  Triton can issue while the current head computes) instead of one: the largest power of 2 that divides the head
  count, up to this (SAMI ViT-S: 4 of the decoder's 16 heads, 2 of the encoder's 6).

  ``block_k_backward``: 0 (default), one backward kernel whose program holds every key of its (example, head) and
  writes each query block's dq whole. n: the backward splits in two kernels, the standard flash-attention split:
  dk and dv by a program per block of n keys walking the query blocks (``block_q_backward``, ``warps_backward``),
  which holds 1/⌈keys/n⌉ of the state, so that several programs fit on an SM; and dq by a program per query block
  (``block_q_backward``) that holds every key of its heads (``warps``, ``heads_per_program``), as the forward does,
  and also writes each query's Σ_j p_ij dp_ij for the dk/dv kernel. Self-attention with q, k and v packed in one
  array keeps the one kernel (one program writes dq, dk and dv into their packed array), as does n ≥ the key
  tile."""

  # The fastest measured on an H200 for SAMI's decoder (BENCHMARKS.md, thirteenth session).
  block_q: int = 64
  warps: int = 4
  block_q_backward: int = 32  # 254-255 registers per thread on an H100 (by jax version), none spilled; 16: 182
  warps_backward: int = 8
  heads_per_program: int = 4
  block_k_backward: int = 0

  def __post_init__(self):
    check_block_sizes(self, "block_q", "block_q_backward")
    if self.heads_per_program < 1 or self.heads_per_program & (self.heads_per_program - 1):
      raise ValueError(f"heads_per_program must be a power of 2, got {self.heads_per_program}")
    if self.block_k_backward and (self.block_k_backward < 16 or self.block_k_backward & (self.block_k_backward - 1)):
      raise ValueError(f"block_k_backward must be 0 or a power of 2 from 16 on, got {self.block_k_backward}")

  @classmethod
  def parse(cls, text: str) -> "Tiling":
    """``"64/4/16/4/4/32"`` (or with commas) → Tiling(block_q, warps, block_q_backward, warps_backward[,
    heads_per_program[, block_k_backward]]); "" → the default."""
    if not text.strip():
      return cls()
    values = [int(v) for v in re.split(r"[/,]", text)]
    if not 4 <= len(values) <= 6:
      raise ValueError(f"a tiling is 4 to 6 numbers (block_q, warps, block_q_backward, warps_backward[, "
                       f"heads_per_program[, block_k_backward]]), got {text!r}")
    return cls(*values)


def fits(keys: int, head_dim: int) -> bool:
  """Whether ``short_attention`` takes ``keys`` keys per (example, head) of ``head_dim`` channels."""
  return keys <= MAX_KEYS and head_dim >= 16 and not head_dim & (head_dim - 1)


def key_tile(keys: int) -> int:
  """The keys of one program, padded to what a Triton tile can hold."""
  return max(16, pl.next_power_of_2(keys))


def _rows(ref, valid: jax.Array, bias: "jax.Array | None" = None) -> jax.Array:
  """ref's rows, zero where ``valid`` [rows] is False (past the end of the array); plus ``bias`` [channels] if given,
  added in fp32 and rounded once to ref's dtype (what XLA does for a bias added in bf16)."""
  rows = plt.load(ref, mask=valid[:, None], other=0)
  return rows if bias is None else (rows.astype(jnp.float32) + bias.astype(jnp.float32)[None, :]).astype(rows.dtype)


def dot_f32(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """a·b contracting a's axis ``contract[0]`` with b's ``contract[1]``, accumulated in fp32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _logits(q_ref, k_ref, q_bias: jax.Array, query_valid: jax.Array, key_valid: jax.Array,
            num_keys: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One head's q (its bias added), k, and logits q·kᵀ·H^-½ [queries, key tile], −inf where a key does not count."""
  q, k = _rows(q_ref, query_valid, q_bias), _rows(k_ref, key_valid)
  logits = dot_f32(q, k, (1, 1)) * (q.shape[-1] ** -0.5)
  return q, k, jnp.where((jnp.arange(k.shape[0]) < num_keys)[None, :], logits, -jnp.inf)


def _delta(out_ref, dout: jax.Array, valid: jax.Array, v_bias: jax.Array) -> jax.Array:
  """Σ_j p_ij dp_ij of each query row: dout·(out − b_v), in fp32 (v's bias adds itself to every output row)."""
  out = _rows(out_ref, valid).astype(jnp.float32)
  return jnp.sum(dout.astype(jnp.float32) * (out - v_bias.astype(jnp.float32)[None, :]), axis=1)


def _query_block_rows(q_ref, k_ref, queries: int, keys: int) -> tuple[int, jax.Array, jax.Array]:
  """A query-block program's (``_query_block_specs``) head count, and which of its query rows and key rows are
  real (not past the end of their arrays)."""
  block_q, heads, tile = q_ref.shape[0], q_ref.shape[1], k_ref.shape[0]
  return heads, pl.program_id(0) * block_q + jnp.arange(block_q) < queries, jnp.arange(tile) < keys


def _each_head(heads: int, one_head):
  """one_head(n) for each of a program's heads: a loop when there are several."""
  if heads == 1:
    one_head(jnp.int32(0), None)
  else:
    jax.lax.fori_loop(0, heads, one_head, None)


def _forward_kernel(q_ref, k_ref, v_ref, q_bias_ref, v_bias_ref, out_ref, lse_ref, *, queries: int, keys: int,
                    num_keys: int):
  heads, query_valid, key_valid = _query_block_rows(q_ref, k_ref, queries, keys)

  def one_head(n, carry):
    v = _rows(v_ref.at[:, n, :], key_valid)
    _, _, logits = _logits(q_ref.at[:, n, :], k_ref.at[:, n, :], q_bias_ref[n, :], query_valid, key_valid, num_keys)
    peak = jnp.max(logits, axis=1)
    p = jnp.exp(logits - peak[:, None])
    total = jnp.sum(p, axis=1)
    out = dot_f32(p.astype(v.dtype), v, (1, 0)) / total[:, None] + v_bias_ref[n, :].astype(jnp.float32)[None, :]
    plt.store(out_ref.at[:, n, :], out.astype(out_ref.dtype), mask=query_valid[:, None])
    lse_ref[n, :] = peak + jnp.log(total)
    return carry

  _each_head(heads, one_head)


def _query_kernel(q_ref, k_ref, v_ref, q_bias_ref, v_bias_ref, out_ref, dout_ref, lse_ref, dq_ref, delta_ref,
                  dq_sum_ref, *, queries: int, keys: int, num_keys: int):
  """The split backward's dq (``Tiling.block_k_backward``), laid out as the forward: a program per (query block,
  head group, example) with every key of its heads. Also each query's Σ_j p_ij dp_ij (for the key blocks' kernel)
  and the program's share of q's bias gradient (its dq summed over rows)."""
  heads, query_valid, key_valid = _query_block_rows(q_ref, k_ref, queries, keys)

  def one_head(n, carry):
    v, dout = _rows(v_ref.at[:, n, :], key_valid), _rows(dout_ref.at[:, n, :], query_valid)
    q, k, logits = _logits(q_ref.at[:, n, :], k_ref.at[:, n, :], q_bias_ref[n, :], query_valid, key_valid, num_keys)
    lse = plt.load(lse_ref.at[n, :], mask=query_valid, other=jnp.inf)  # p = 0 on rows past the end
    p = jnp.exp(logits - lse[:, None])
    delta = _delta(out_ref.at[:, n, :], dout, query_valid, v_bias_ref[n, :])
    dlogits = (p * (dot_f32(dout, v, (1, 1)) - delta[:, None])).astype(q.dtype)
    dq = dot_f32(dlogits, k, (1, 0)) * (q.shape[-1] ** -0.5)
    plt.store(dq_ref.at[:, n, :], dq.astype(dq_ref.dtype), mask=query_valid[:, None])
    delta_ref[n, :] = delta
    dq_sum_ref[n, :] = jnp.sum(dq, axis=0)  # rows past the end are zeros
    return carry

  _each_head(heads, one_head)


def _store(target, value: jax.Array, valid: jax.Array, rows=slice(None)):
  """``value`` [rows, H] into ``target``'s ``rows`` where ``valid`` [rows]: a ref [R, H], or (ref [R, S, H], slot)
  for a slot of a packed output (one indexing: Pallas's interpret mode does not compose views)."""
  ref, index = (target[0], (rows, jnp.int32(target[1]), slice(None))) if isinstance(target, tuple) else (
      target, (rows, slice(None)))
  plt.store(ref.at[index], value.astype(ref.dtype), mask=valid[:, None])


def _backward_kernel(q_ref, k_ref, v_ref, q_bias_ref, dout_ref, lse_ref, delta, dq_ref, dk_ref, dv_ref, dbias_ref, *,
                     queries: int, keys: int, num_keys: int, block_q: int):
  """dk and dv of this program's keys (block program_id(0) of its head's), walking the query blocks; and each
  block's dq (``dq_ref``), unless that is the query kernel's (None: the split backward). ``delta(rows, valid,
  dout)``: those queries' Σ_j p_ij dp_ij. ``dbias_ref``: the biases' gradients, this program's share (its dq, dk and
  dv summed over rows; dk and dv only without dq)."""
  tile, head = k_ref.shape
  scale = head ** -0.5
  key_index = pl.program_id(0) * tile + jnp.arange(tile)
  key_valid = key_index < keys
  counted = (key_index < num_keys)[:, None]
  k, v = _rows(k_ref, key_valid), _rows(v_ref, key_valid)
  q_bias = q_bias_ref[...]

  def query_block(j, grads):  # keys on the rows of every product: the large dimension, what the MMA tiles want
    dk, dv, dq_sum = grads
    start = pl.multiple_of(j * block_q, block_q)
    rows = pl.ds(start, block_q)
    valid = start + jnp.arange(block_q) < queries
    q, dout = _rows(q_ref.at[rows, :], valid, q_bias), _rows(dout_ref.at[rows, :], valid)
    lse = plt.load(lse_ref.at[rows], mask=valid, other=jnp.inf)  # p = 0 on rows past the end
    p_t = jnp.where(counted, jnp.exp(dot_f32(k, q, (1, 1)) * scale - lse[None, :]), 0.0)  # pᵀ [keys, queries]
    dv = dv + dot_f32(p_t.astype(dout.dtype), dout, (1, 0))
    dlogits_t = (p_t * (dot_f32(v, dout, (1, 1)) - delta(rows, valid, dout)[None, :])).astype(q.dtype)
    dk = dk + dot_f32(dlogits_t, q, (1, 0))
    if dq_ref is None:
      return dk, dv, dq_sum
    dq = dot_f32(dlogits_t, k, (0, 0)) * scale
    _store(dq_ref, dq, valid, rows)
    return dk, dv, dq_sum + jnp.sum(dq, axis=0)  # rows past the end are zeros

  zeros = jnp.zeros((tile, head), jnp.float32)
  dk, dv, dq_sum = jax.lax.fori_loop(0, pl.cdiv(queries, block_q), query_block,
                                     (zeros, zeros, jnp.zeros((head,), jnp.float32)))
  _store(dk_ref, dk * scale, key_valid)
  _store(dv_ref, dv, key_valid)
  shares = (jnp.sum(dk, axis=0) * scale, jnp.sum(dv, axis=0))  # uncounted keys' rows are zeros
  for slot, total in enumerate(shares if dq_ref is None else (dq_sum, *shares)):
    dbias_ref[jnp.int32(slot), :] = total


def per_platform(fn):
  """``fn(*args, interpret=False)`` where the program is lowered for CUDA, ``interpret=True`` elsewhere."""
  return lambda *args: jax.lax.platform_dependent(*args, cuda=functools.partial(fn, interpret=False),
                                                  default=functools.partial(fn, interpret=True))


def _spec(array, position: int, rows: int, heads: "int | None", head: int, index) -> pl.BlockSpec:
  """The BlockSpec of q, k or v (``position`` 0, 1, 2) given as ``array``: [B, T, N, H], or [B, T, S, N, H] holding
  the last S of q, k and v packed. Blocks of ``rows`` × ``heads`` (None: one, squeezed) × ``head`` at
  ``index(*grid indices)`` → (example, row block, head block)."""
  if array.ndim == 4:
    return pl.BlockSpec((None, rows, heads, head), lambda *grid: (*index(*grid), 0))
  slot = position - 3 + array.shape[2]
  return pl.BlockSpec((None, rows, None, heads, head), lambda *grid: (*index(*grid)[:2], slot, index(*grid)[2], 0))


def _query_block_specs(q, k, v, block_q: int, tiling: Tiling):
  """The forward's layout, also the split backward's dq kernel's: grid (query block, head group, example), each
  program with its query block and every key of its group of heads (``tiling.heads_per_program``, looped). Returns
  the grid, the group's size, the BlockSpecs of q, k, v and two biases [N, H], of a [B, Tq, N, H] array's block and
  of a per-query array [B, N, rows]'s, and the compiler parameters (``tiling.warps``; the loads of a group's next
  head pipelined)."""
  heads, head = q.shape[-2:]
  group = math.gcd(heads, tiling.heads_per_program)
  grid = (pl.cdiv(q.shape[1], block_q), heads // group, q.shape[0])
  specs = [_spec(q, 0, block_q, group, head, lambda i, n, b: (b, i, n))] + [
      _spec(t, position, key_tile(k.shape[1]), group, head, lambda i, n, b: (b, 0, n))
      for position, t in ((1, k), (2, v))] + [pl.BlockSpec((group, head), lambda i, n, b: (n, 0))] * 2
  return (grid, group, specs, pl.BlockSpec((None, block_q, group, head), lambda i, n, b: (b, i, n, 0)),
          pl.BlockSpec((None, group, block_q), lambda i, n, b: (b, n, i)),
          plt.CompilerParams(num_warps=tiling.warps, num_stages=1 if group == 1 else 2))


def _forward(q, k, v, q_bias, v_bias, num_keys: int, tiling: Tiling, interpret: bool):
  batch, queries, heads, head = q.shape[0], q.shape[1], *q.shape[-2:]
  grid, _, in_specs, rows_spec, lse_spec, params = _query_block_specs(q, k, v, tiling.block_q, tiling)
  return pl.pallas_call(
      functools.partial(_forward_kernel, queries=queries, keys=k.shape[1], num_keys=num_keys), grid=grid,
      in_specs=in_specs, out_specs=[rows_spec, lse_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, queries, heads, head), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, grid[0] * tiling.block_q), jnp.float32)],
      compiler_params=params, interpret=interpret, name="short_attention_forward")(q, k, v, q_bias, v_bias)


def _query_gradients(q, k, v, q_bias, v_bias, out, lse, dout, num_keys: int, tiling: Tiling, interpret: bool):
  """The split backward's first kernel (_query_kernel): dq, each query's Σ_j p_ij dp_ij [B, N, rows] and q's bias
  gradient [B, N, H]."""
  block_q = tiling.block_q_backward
  grid, group, in_specs, rows_spec, per_query_spec, params = _query_block_specs(q, k, v, block_q, tiling)
  sums_spec = pl.BlockSpec((None, None, group, q.shape[3]), lambda i, n, b: (b, i, n, 0))  # one per program
  dq, delta, dq_sums = pl.pallas_call(
      functools.partial(_query_kernel, queries=q.shape[1], keys=k.shape[1], num_keys=num_keys), grid=grid,
      in_specs=in_specs + [rows_spec, rows_spec, per_query_spec], out_specs=[rows_spec, per_query_spec, sums_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((q.shape[0], q.shape[2], grid[0] * block_q), jnp.float32),
                 jax.ShapeDtypeStruct((q.shape[0], grid[0], *q.shape[2:]), jnp.float32)],
      compiler_params=params, interpret=interpret, name="short_attention_backward_queries")(
          q, k, v, q_bias, v_bias, out, dout, lse)
  return dq, delta, dq_sums.sum(1)


def _backward(q, k, v, q_bias, v_bias, out, lse, dout, num_keys: int, tiling: Tiling, interpret: bool):
  """(dq, dk, dv), (dq, dkv) or (dqkv,) as q, k and v come, and the biases' gradients [B, 3, N, H] (Tiling: one
  kernel, or split in two)."""
  batch, queries, heads, head = out.shape
  keys = k.shape[1]
  block_q = tiling.block_q_backward
  rows = pl.cdiv(queries, block_q) * block_q
  split = q.ndim == 4 and 0 < tiling.block_k_backward < key_tile(keys)
  key_block = tiling.block_k_backward if split else key_tile(keys)
  if q.ndim == 5:  # q, k and v packed: one block of rows holds a head's queries and keys (each a power of 2 ≥ 16)
    key_block = max(key_block, rows)
  key_blocks = pl.cdiv(keys, key_block)
  # grid (key block, head, example): the program's keys, every query of its head
  rows_spec = pl.BlockSpec((None, rows, None, head), lambda j, n, b: (b, 0, n, 0))
  per_query_spec = pl.BlockSpec((None, None, rows), lambda j, n, b: (b, n, 0))
  bias_spec = pl.BlockSpec((None, head), lambda j, n, b: (n, 0))
  in_specs = [_spec(q, 0, rows, None, head, lambda j, n, b: (b, 0, n))] + [
      _spec(t, position, key_block, None, head, lambda j, n, b: (b, j, n)) for position, t in ((1, k), (2, v))] + [
          bias_spec, rows_spec, per_query_spec]
  operands = [q, k, v, q_bias, dout, lse]
  out_specs, out_shapes = [], []
  if split:  # dq from its own kernel, with each query's Σ_j p_ij dp_ij for this one
    dq, delta, dq_bias = _query_gradients(q, k, v, q_bias, v_bias, out, lse, dout, num_keys, tiling, interpret)
    in_specs.append(per_query_spec)
    operands.append(delta)
  else:  # dq here, whole: alone, or all three packed (one program writes its head's dq, dk and dv)
    in_specs += [bias_spec, rows_spec]
    operands += [v_bias, out]
    out_specs.append(rows_spec if q.ndim == 4 else
                     pl.BlockSpec((None, key_block, 3, None, head), lambda j, n, b: (b, 0, 0, n, 0)))
    out_shapes.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
  if q.ndim == 4 and k.ndim == 5:  # dk and dv in one array
    out_specs.append(pl.BlockSpec((None, key_block, 2, None, head), lambda j, n, b: (b, j, 0, n, 0)))
    out_shapes.append(jax.ShapeDtypeStruct(k.shape, k.dtype))
  elif q.ndim == 4:
    out_specs += in_specs[1:3]
    out_shapes += [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2
  # and the biases' gradients, one share per program: [B, key blocks, 3 (2 without dq), N, H] in fp32
  slots = 2 if split else 3
  out_specs.append(pl.BlockSpec((None, None, slots, None, head), lambda j, n, b: (b, j, 0, n, 0)))
  out_shapes.append(jax.ShapeDtypeStruct((batch, key_blocks, slots, heads, head), jnp.float32))

  def kernel(q_ref, k_ref, v_ref, q_bias_ref, dout_ref, lse_ref, *refs):
    if split:
      delta_ref, *refs = refs
      delta = lambda rows, valid, dout: plt.load(delta_ref.at[rows], mask=valid, other=0.0)
    else:
      v_bias_ref, out_ref, *refs = refs
      v_bias = v_bias_ref[...]
      delta = lambda rows, valid, dout: _delta(out_ref.at[rows, :], dout, valid, v_bias)
    # dq, dk and dv's targets (_store): each output, or the slots of a packed one; dq None when split
    targets = [None] * split + [t for ref in refs[:-1]
                                for t in ([ref] if len(ref.shape) == 2 else [(ref, s) for s in range(ref.shape[1])])]
    _backward_kernel(q_ref, k_ref, v_ref, q_bias_ref, dout_ref, lse_ref, delta, *targets, refs[-1], queries=queries,
                     keys=keys, num_keys=num_keys, block_q=block_q)

  *grads, dbias = pl.pallas_call(
      kernel, grid=(key_blocks, heads, batch), in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
      compiler_params=plt.CompilerParams(num_warps=tiling.warps_backward, num_stages=2), interpret=interpret,
      name="short_attention_backward")(*operands)
  dbias = dbias.sum(1)
  if split:
    return dq, *grads, jnp.concatenate([dq_bias[:, None], dbias], axis=1)
  return *grads, dbias


# Each kernel's arrays, einsum-like: b examples, n heads (both may be split over devices), q and k tokens, h channels,
# l the log-sum-exp's query rows and s the slots of packed arrays (each kernel needs those whole). By packing
# ("": q, k and v apart; "kv": k and v in one array, passed twice; "qkv": all three in one, passed thrice): the
# operands q, k, v, and the backward's outputs.
_OPERANDS = {"": "b q n h, b k n h, b k n h", "kv": "b q n h, b k s n h, b k s n h",
             "qkv": "b q s n h, b q s n h, b q s n h"}
_GRADIENTS = {"": "b q n h, b k n h, b k n h", "kv": "b q n h, b k s n h", "qkv": "b q s n h"}
_BIAS_GRADIENTS = "b t n h"  # t: q, k, v


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, num_keys: int, tiling: Tiling, packing: str):
  """The "forward" or "backward" kernel, partitioned over examples and heads: under a mesh each device runs it on
  its own examples and heads, with no collectives (a Pallas call alone would be given every example: XLA
  cannot see into it, so it gathers its operands). ``packing``: how q, k and v come (``_OPERANDS``)."""
  run = per_platform(functools.partial(_forward if kind == "forward" else _backward, num_keys=num_keys,
                                       tiling=tiling))
  if kind == "forward":
    inputs, outputs = _OPERANDS[packing] + ", n h, n h", "b q n h, b n l"
  else:
    inputs = _OPERANDS[packing] + ", n h, n h, b q n h, b n l, b q n h"
    outputs = f"{_GRADIENTS[packing]}, {_BIAS_GRADIENTS}"

  def shardings(mesh, layouts: str, q) -> tuple:  # q: the first operand, whose sharding the others follow
    spec = (*q.sharding.spec, *[None] * (len(q.shape) - len(q.sharding.spec)))
    examples, heads = spec[0], spec[-2]
    specs = {5: P(examples, None, None, heads, None), 4: P(examples, None, heads, None), 3: P(examples, heads, None),
             2: P(heads, None)}
    return tuple(NamedSharding(mesh, specs[len(layout.split())]) for layout in layouts.split(", "))

  return partitioned_like_first(run, inputs, outputs, shardings, split=("b", "n"))


def partitioned_like_first(run, inputs: str, outputs: str, shardings, split: tuple[str, ...]):
  """``run`` under ``custom_partitioning``, its operands and results laid out as ``inputs`` and ``outputs`` say
  (einsum-like factors, e.g. "b q n h, n h"): ``shardings(mesh, layouts, first operand)`` gives the NamedShardings
  of those layouts, following the first operand's sharding of the factors in ``split``; every other factor is
  replicated, so each device runs ``run`` on its own share with no collectives."""

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    return mesh, run, shardings(mesh, outputs, arg_shapes[0]), shardings(mesh, inputs, arg_shapes[0])

  replicated = [f for f in dict.fromkeys(f"{inputs} {outputs}".replace(",", " ").split()) if f not in split]
  partitioned = custom_partitioning(run)
  partitioned.def_partition(
      partition, infer_sharding_from_operands=lambda mesh, args, _: shardings(mesh, outputs, args[0]),
      sharding_rule=f"{inputs} -> {outputs}", need_replication_factors=tuple(replicated))
  return partitioned


# The biases, from the softmax's algebra: k's shifts all logits of a query alike, so it changes nothing (and gets
# the sum of dk, zero up to rounding); v's adds itself to every output row (the probabilities sum to 1), so the
# backward's Σ_j p_ij dp_ij is dout·(out − b_v); q's is added to q.
# arrays: (q, k, v), (q, kv) with kv [B, Tk, 2, N, H], or (qkv,) with qkv [B, T, 3, N, H]; bias [3, N, H].
_PACKINGS = {3: "", 2: "kv", 1: "qkv"}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _attention(arrays: tuple, bias, num_keys: int, tiling: Tiling):
  return _attention_fwd(arrays, bias, num_keys, tiling)[0]


def _operands(arrays: tuple) -> tuple:  # the kernels' q, k and v operands
  return arrays if len(arrays) == 3 else (arrays[0], arrays[1], arrays[1]) if len(arrays) == 2 else arrays * 3


def _attention_fwd(arrays, bias, num_keys, tiling):
  out, lse = _kernel("forward", num_keys, tiling, _PACKINGS[len(arrays)])(*_operands(arrays), bias[0], bias[2])
  return out, (arrays, bias, out, lse)


def _attention_bwd(num_keys, tiling, residuals, dout):
  arrays, bias, out, lse = residuals
  *grads, dbias = _kernel("backward", num_keys, tiling, _PACKINGS[len(arrays)])(
      *_operands(arrays), bias[0], bias[2], out, lse, dout)
  # a bias's gradient: its tensor's, summed over examples and tokens (the kernels' shares, summed)
  return tuple(grads), jnp.sum(dbias, 0).astype(bias.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def short_attention(q: jax.Array, k: "jax.Array | None", v: "jax.Array | None", num_keys: "int | None" = None,
                    tiling: Tiling = Tiling(), bias: "jax.Array | None" = None) -> jax.Array:
  """Softmax attention of q [B, Tq, N, H] over k, v [B, Tk, N, H] → [B, Tq, N, H], scale H^-½; only the first
  ``num_keys`` keys count (default: all). Packed operands, one projection's output read as it is: with v None, k
  holds k and v [B, Tk, 2, N, H]; with k and v None, q holds q, k and v [B, T, 3, N, H] (self-attention). The
  backward then writes the gradients packed alike, so one matmul takes them back. ``bias`` [3, N, H]: the q, k and
  v projections' biases, not yet added: the kernels apply them (a projection whose consumer is a custom call cannot
  fuse its bias add, which would be a kernel of its own; see ``_attention``). Differentiable in q, k, v and bias."""
  if k is None and v is None and q.ndim == 5 and q.shape[2] == 3:
    arrays, q_shape, k_shape = (q,), (*q.shape[:2], *q.shape[3:]), (*q.shape[:2], *q.shape[3:])
  elif k is not None and v is None and q.ndim == 4 and k.ndim == 5 and k.shape[2] == 2:
    arrays, q_shape, k_shape = (q, k), q.shape, (*k.shape[:2], *k.shape[3:])
  elif k is not None and v is not None and q.ndim == 4 and k.ndim == 4 and k.shape == v.shape:
    arrays, q_shape, k_shape = (q, k, v), q.shape, k.shape
  else:
    arrays = ()
  if not arrays or q_shape[0] != k_shape[0] or q_shape[2:] != k_shape[2:]:
    shapes = [None if t is None else t.shape for t in (q, k, v)]
    raise ValueError(f"short_attention takes q [B, Tq, N, H] and k, v [B, Tk, N, H] (or k [B, Tk, 2, N, H] and v "
                     f"None, or q [B, T, 3, N, H] and k, v None); got {shapes}")
  head, keys = q_shape[3], k_shape[1]
  if not fits(keys, head):  # the rule "auto" picks these kernels by
    raise ValueError(f"short_attention holds at most {MAX_KEYS} keys in a tile, of a head dim that is a power of 2 "
                     f"from 16 on; got {keys} keys of {head}: use 'cudnn' or 'xla'")
  num_keys = keys if num_keys is None else num_keys
  if not 1 <= num_keys <= keys:
    raise ValueError(f"num_keys must be in [1, {keys}], got {num_keys}")
  if bias is None:
    bias = jnp.zeros((3, *q_shape[2:]), q.dtype)
  if bias.shape != (3, *q_shape[2:]):
    raise ValueError(f"bias must be [3, N, H] = {(3, *q_shape[2:])}, got {bias.shape}")
  return _attention(arrays, bias.astype(q.dtype), num_keys, tiling)
