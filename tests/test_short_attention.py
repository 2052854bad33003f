"""The Pallas short-sequence attention (models/short_attention.py), run in Pallas's interpret mode on CPU: values
and gradients against the plain XLA attention, key masking, the split over a mesh, and the shapes it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficientsam_jax.models.layers import Kernels, attention
from efficientsam_jax.models.sami import CrossAttentionBlock
from efficientsam_jax.models.sam_vit import SamAttention
from efficientsam_jax.models.short_attention import Tiling, short_attention
from efficientsam_jax.train.sharding import make_mesh

SMALL_BLOCKS = Tiling(block_q=16, warps=4, block_q_backward=16, warps_backward=4)
SPLIT_BACKWARD = Tiling(block_q=16, warps=4, block_q_backward=16, warps_backward=4, block_k_backward=16)


def _inputs(queries, keys, heads=3, head=16, batch=2, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda tokens: jnp.asarray(rng.normal(size=(batch, tokens, heads, head)), dtype)
  return draw(queries), draw(keys), draw(keys), draw(queries)


def _values_and_grads(fn, q, k, v, weights):
  """fn(q, k, v), and the gradients of Σ fn(q, k, v)·weights in fp32."""
  loss = lambda *qkv: jnp.sum(fn(*qkv).astype(jnp.float32) * weights.astype(jnp.float32))
  return fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("queries, keys, num_keys, tiling, heads", [
    (37, 50, None, SMALL_BLOCKS, 3),  # three query blocks, the last one partial; keys padded to a tile of 64
    (37, 50, 41, SMALL_BLOCKS, 3),  # keys from 41 on are padding
    (37, 50, None, Tiling(16, 4, 32, 4, 1), 3),  # the backward's query blocks reach past the forward's
    (37, 50, 41, Tiling(16, 4, 16, 4, heads_per_program=4), 6),  # forward programs loop over 2 of the 6 heads
    (37, 50, 41, Tiling(16, 4, 16, 4, block_k_backward=16), 3),  # backward split: 16 keys per program, dq apart
    (37, 50, None, Tiling(16, 4, 32, 4, 2, block_k_backward=32), 6),  # split; query blocks past the forward's
    (32, 16, None, SMALL_BLOCKS, 3),  # whole blocks, no padding anywhere
    (5, 3, 2, Tiling(), 4),  # fewer tokens than one block or one tile; the default tiling, 4 heads per program
])
def test_values_and_gradients_are_xlas_attention(queries, keys, num_keys, tiling, heads):
  q, k, v, weights = _inputs(queries, keys, heads)
  ours, our_grads = _values_and_grads(lambda *a: short_attention(*a, num_keys, tiling), q, k, v, weights)
  ref, ref_grads = _values_and_grads(lambda *a: attention(*a, "xla", num_keys), q, k, v, weights)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
  for name, got, want in zip("qkv", our_grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * float(jnp.abs(want).max()), err_msg=f"d{name}")
  if num_keys is not None:  # the padding keys get no gradient, whatever their values
    for grad in our_grads[1:]:
      assert float(jnp.abs(grad[:, num_keys:]).max()) == 0.0
    moved = k.at[:, num_keys:].set(100.0), v.at[:, num_keys:].set(-100.0)
    np.testing.assert_array_equal(short_attention(q, *moved, num_keys, tiling), ours)
  # k and v packed in one array [B, Tk, 2, N, H]: the same values, and their gradients packed alike
  packed = lambda q, kv: short_attention(q, kv, None, num_keys, tiling)
  loss = lambda q, kv: jnp.sum(packed(q, kv) * weights)
  kv = jnp.stack([k, v], axis=2)
  np.testing.assert_array_equal(packed(q, kv), ours)
  dq, dkv = jax.grad(loss, (0, 1))(q, kv)
  np.testing.assert_array_equal(dq, our_grads[0])
  np.testing.assert_array_equal(dkv, jnp.stack(our_grads[1:], axis=2))


@pytest.mark.parametrize("tiling", [SMALL_BLOCKS, SPLIT_BACKWARD])
def test_biases_added_in_the_kernels_are_biases_added_before(tiling):
  """``bias``: the kernels add the q, k and v projections' biases as they load q, k and v; values and the gradients
  of q, k, v and the biases are those of XLA's attention of q + b_q, k + b_k, v + b_v (the backward in one kernel
  or split in two)."""
  q, k, v, weights = _inputs(37, 50, heads=4)
  bias = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4, 16)), jnp.float32)
  loss = lambda fn: lambda *args: jnp.sum(fn(*args) * weights)
  ours = lambda q, k, v, b: short_attention(q, k, v, 41, tiling, bias=b)
  ref = lambda q, k, v, b: attention(q + b[0], k + b[1], v + b[2], "xla", 41)
  np.testing.assert_allclose(ours(q, k, v, bias), ref(q, k, v, bias), rtol=0, atol=2e-6)
  for name, got, want in zip(("q", "k", "v", "bias"), jax.grad(loss(ours), (0, 1, 2, 3))(q, k, v, bias),
                             jax.grad(loss(ref), (0, 1, 2, 3))(q, k, v, bias)):
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * float(jnp.abs(want).max()), err_msg=f"d{name}")
  np.testing.assert_allclose(attention(q, k, v, "pallas", 41, bias), ref(q, k, v, bias), rtol=0, atol=2e-6)


@pytest.mark.parametrize("tokens, num_keys", [(37, 33), (5, None)])
def test_q_k_v_packed_in_one_array_are_the_three_apart(tokens, num_keys):
  """q, k and v packed [B, T, 3, N, H] (a fused qkv projection's output): the values of the three apart, and dq,
  dk and dv packed alike (with 5 tokens the backward's query block, 32, outgrows the key tile, 16)."""
  q, k, v, weights = _inputs(tokens, tokens, heads=4)
  bias = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4, 16)), jnp.float32)
  tiling = Tiling(16, 4, 32, 4)
  apart = lambda q, k, v, b: short_attention(q, k, v, num_keys, tiling, bias=b)
  packed = lambda qkv, b: short_attention(qkv, None, None, num_keys, tiling, bias=b)
  qkv = jnp.stack([q, k, v], axis=2)
  np.testing.assert_array_equal(packed(qkv, bias), apart(q, k, v, bias))
  *grads, dbias = jax.grad(lambda *a: jnp.sum(apart(*a) * weights), (0, 1, 2, 3))(q, k, v, bias)
  packed_grads = jax.grad(lambda *a: jnp.sum(packed(*a) * weights), (0, 1))(qkv, bias)
  np.testing.assert_array_equal(packed_grads[0], jnp.stack(grads, axis=2))
  np.testing.assert_array_equal(packed_grads[1], dbias)
  # block_k_backward leaves a packed q, k, v's backward whole: one program writes its head's dq, dk and dv
  split = lambda qkv, b: short_attention(qkv, None, None, num_keys, Tiling(16, 4, 32, 4, block_k_backward=16), bias=b)
  for got, want in zip(jax.grad(lambda *a: jnp.sum(split(*a) * weights), (0, 1))(qkv, bias), packed_grads):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("packing, tiling", [("", SMALL_BLOCKS), ("kv", SMALL_BLOCKS), ("qkv", SMALL_BLOCKS),
                                             ("kv", SPLIT_BACKWARD)])
def test_split_over_examples_and_heads_without_collectives(packing, tiling):
  """Under a mesh (data × model over 8 devices) each device runs the kernels on its own examples and heads (and
  the biases of its heads; q, k and v apart or packed; the backward in one kernel or two): the values and
  gradients of the unsplit call, the outputs split as the inputs, and no collective in the program."""
  mesh = make_mesh({"data": 4, "model": 2})
  split = NamedSharding(mesh, P("data", None, "model", None))
  q, k, v, weights = _inputs(37, 37 if packing == "qkv" else 50, heads=4, batch=8)
  bias = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4, 16)), jnp.float32)
  operands = {"": lambda q, k, v: (q, k, v), "kv": lambda q, k, v: (q, jnp.stack([k, v], axis=2), None),
              "qkv": lambda q, k, v: (jnp.stack([q, k, v], axis=2), None, None)}[packing]
  attend = lambda q, k, v, b: short_attention(*operands(q, k, v), 41 if packing != "qkv" else 33, tiling, bias=b)
  fn = lambda *args: _values_and_grads(lambda *a: attend(*a, args[4]), *args[:4])
  step = jax.jit(fn, in_shardings=(split,) * 4 + (NamedSharding(mesh, P(None, "model", None)),))
  got, want = step(q, k, v, weights, bias), fn(q, k, v, weights, bias)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert a.sharding.is_equivalent_to(split, 4)
  program = step.lower(q, k, v, weights, bias).compile().as_text()
  assert not any(op in program for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))


def test_bf16_inputs_keep_fp32_softmax():
  """bf16 q, k, v: close to the fp32 attention of the same (rounded) inputs, at bf16's resolution."""
  q, k, v, weights = _inputs(40, 29, heads=2, head=32, dtype=jnp.bfloat16, seed=1)
  ours, our_grads = _values_and_grads(lambda *a: short_attention(*a, tiling=SMALL_BLOCKS), q, k, v, weights)
  wide = [t.astype(jnp.float32) for t in (q, k, v)]
  ref, ref_grads = _values_and_grads(lambda *a: attention(*a, "xla"), *wide, weights)
  assert ours.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in our_grads)
  np.testing.assert_allclose(ours.astype(jnp.float32), ref, rtol=0, atol=2e-2 * float(jnp.abs(ref).max()))
  for got, want in zip(our_grads, ref_grads):
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0, atol=3e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("tiling", ["", "16/4/16/4/2/16"])
def test_decoder_block_with_pallas_attention_is_the_xla_block(tiling):
  """SAMI's cross-attention block, same parameters: the "pallas" kernels give the "xla" block's output and
  parameter gradients (layers.Kernels routes every ``attend`` through them, with its ``tiling``: here also the
  backward split in two kernels over the 28 keys)."""
  rng = np.random.default_rng(2)
  queries = jnp.asarray(rng.normal(size=(2, 21, 64)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(2, 7, 64)), jnp.float32)
  blocks = {"xla": CrossAttentionBlock(num_heads=4, kernels=Kernels(attention="xla")),
            "pallas": CrossAttentionBlock(num_heads=4, kernels=Kernels(attention="pallas", tiling=tiling))}
  params = blocks["xla"].init(jax.random.PRNGKey(0), queries, context)
  results = {}
  for name, block in blocks.items():
    loss = lambda p: jnp.sum(jnp.sin(block.apply(p, queries, context)))
    results[name] = (block.apply(params, queries, context), jax.grad(loss)(params))
  program = str(jax.make_jaxpr(jax.grad(loss))(params))  # the pallas block's: the tiling reached the kernels
  assert ("short_attention_backward_queries" in program) == bool(tiling)
  np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=0, atol=1e-5)
  # The key bias's gradient is zero up to rounding (it shifts a query's logits all alike): one scale for all.
  scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(results["xla"][1]))
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(results["pallas"][1]),
                               jax.tree_util.tree_leaves(results["xla"][1])):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_shapes_it_cannot_hold_are_refused():
  q, k, v, _ = _inputs(8, 8)
  with pytest.raises(ValueError, match="power of 2"):
    short_attention(q[..., :12], k[..., :12], v[..., :12])
  with pytest.raises(ValueError, match="at most 512 keys"):
    long = jnp.zeros((2, 513, 3, 16))
    short_attention(q, long, long)
  with pytest.raises(ValueError, match="num_keys"):
    short_attention(q, k, v, num_keys=0)
  with pytest.raises(ValueError, match=r"\[B, Tq, N, H\]"):
    short_attention(q, k[:, :, :2], v[:, :, :2])
  with pytest.raises(ValueError, match=r"bias must be \[3, N, H\]"):
    short_attention(q, k, v, bias=jnp.zeros((3, 16)))
  with pytest.raises(ValueError, match="power of 2"):
    Tiling(block_q=48)
  with pytest.raises(ValueError, match="heads_per_program must be a power of 2"):
    Tiling(heads_per_program=3)
  with pytest.raises(ValueError, match="block_k_backward must be 0 or a power of 2 from 16"):
    Tiling(block_k_backward=8)
  assert Tiling.parse("64/4/16/4/2/32") == Tiling.parse("64,4,16,4,2,32") == Tiling(64, 4, 16, 4, 2, 32)
  assert Tiling.parse("") == Tiling()
  with pytest.raises(ValueError, match="4 to 6 numbers"):
    Tiling.parse("64/4/16")
  with pytest.raises(ValueError, match="block_q must be a power of 2"):  # a config's kernels: refused at once
    Kernels(attention="pallas", tiling="48/4/16/4")
  with pytest.raises(ValueError, match="relative positions"):
    x = jnp.zeros((1, 4, 4, 32))
    SamAttention(num_heads=2, rel_pos_size=4, attention="pallas").init(jax.random.PRNGKey(0), x)
