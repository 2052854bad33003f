"""The Pallas MLP with the GELU inside its matmuls (models/gelu_mlp.py), run in Pallas's interpret mode on CPU:
values and gradients against the XLA MLP, the erf it computes, the split over a mesh, the ViT blocks that use it,
and the shapes it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficientsam_jax.models import gelu_mlp as gelu_mlp_module
from efficientsam_jax.models.gelu_mlp import MatmulTiling, fits, gelu_mlp, xla_mlp
from efficientsam_jax.models.layers import Kernels, gelu, gelu_derivative
from efficientsam_jax.models.vit import Block
from efficientsam_jax.train.sharding import make_mesh

SMALL = MatmulTiling(block_m=16, block_n=32, block_k=16, warps=4, stages=1)


def _inputs(rows=(2, 37), width=32, hidden=64, dtype=jnp.float32, seed=0):
  """x, W1, b1, W2, b2 and a cotangent for the output."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)
  return (draw(*rows, width), draw(width, hidden, scale=width ** -0.5), draw(hidden), draw(hidden, width,
          scale=hidden ** -0.5), draw(width), draw(*rows, width))


def _values_and_grads(fn, *args):
  """fn(x, W1, b1, W2, b2), and the gradients of Σ fn(...)·cotangent in all five (fp32 sums)."""
  *inputs, cotangent = args
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent.astype(jnp.float32))
  return fn(*inputs), jax.grad(loss, tuple(range(5)))(*inputs)


def _assert_close(got, want, value_tol, grad_tol):
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=value_tol * float(jnp.abs(want[0]).max()))
  for name, a, b in zip(("x", "W1", "b1", "W2", "b2"), got[1], want[1]):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=0, atol=grad_tol * float(jnp.abs(b).max()), err_msg=f"d{name}")


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("rows, tiling", [
    ((2, 37), SMALL),  # 74 rows: 5 row blocks, the last one partial; 2 column blocks, 2 steps of the inner loop
    ((3, 16), MatmulTiling(block_m=16, block_n=64, block_k=32, warps=4, stages=2)),  # whole blocks
    ((1, 5), MatmulTiling(block_m=32, block_n=32, block_k=32, warps=4, stages=1)),  # fewer rows than a block
])
def test_values_and_gradients_are_the_xla_mlps(approximate, rows, tiling):
  """Forward (fc1, GELU, fc2) and the gradients of x and the four parameters, fc1's bias gradient summed from the
  kernel's per-block shares: those of the XLA MLP, exact or tanh GELU (fp32)."""
  args = _inputs(rows)
  ours = _values_and_grads(lambda *a: gelu_mlp(*a, approximate=approximate, tiling=tiling), *args)
  want = _values_and_grads(lambda *a: xla_mlp(*a, approximate=approximate), *args)
  _assert_close(ours, want, 2e-6, 5e-6)


def test_erf_and_the_gelu_derivative_in_the_kernels():
  """The kernels' erf (Pallas's Triton lowering has none) is within 5e-7 of XLA's; GELU and its derivative,
  exact and tanh, those of ``layers``."""
  h = jnp.linspace(-9.0, 9.0, 20001, dtype=jnp.float32)
  gaussian = jnp.exp(-h * h)
  assert float(jnp.abs(gelu_mlp_module._erf(h, gaussian) - jax.lax.erf(h)).max()) < 5e-7
  for approximate in (False, True):
    np.testing.assert_allclose(gelu_mlp_module._gelu(h, approximate), gelu(h, approximate), rtol=0, atol=1e-6)
    np.testing.assert_allclose(gelu_mlp_module._gelu_derivative(h, approximate), gelu_derivative(h, approximate),
                               rtol=0, atol=1e-6)


def test_bf16_rounds_once_from_fp32():
  """bf16 inputs: outputs and gradients in bf16, close to the fp32 MLP of the same (rounded) inputs at bf16's
  resolution, and fp32 parameters are cast to x's dtype as a bf16 ``Dense`` does (their gradients fp32)."""
  args = _inputs((2, 37), dtype=jnp.bfloat16, seed=1)
  ours = _values_and_grads(lambda *a: gelu_mlp(*a, tiling=SMALL), *args)
  assert ours[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in ours[1])
  want = _values_and_grads(xla_mlp, *[a.astype(jnp.float32) for a in args])
  ours = (ours[0].astype(jnp.float32), [g.astype(jnp.float32) for g in ours[1]])
  _assert_close(ours, want, 2e-2, 3e-2)
  x, *params, cotangent = args
  wide = [p.astype(jnp.float32) for p in params]
  mixed = _values_and_grads(lambda x, *p: gelu_mlp(x, *p, tiling=SMALL), x, *wide, cotangent)
  np.testing.assert_array_equal(mixed[0], gelu_mlp(*args[:5], tiling=SMALL))
  assert all(g.dtype == jnp.float32 for g in mixed[1][1:])


def test_any_leading_axes():
  """x [rows, C] and [B, H, W, C]: the MLP of the same rows as [B, T, C]."""
  x, *params, _ = _inputs((2, 12))
  flat = gelu_mlp(x, *params, tiling=SMALL)
  np.testing.assert_array_equal(gelu_mlp(x.reshape(24, 32), *params, tiling=SMALL), flat.reshape(24, 32))
  np.testing.assert_array_equal(gelu_mlp(x.reshape(2, 3, 4, 32), *params, tiling=SMALL), flat.reshape(2, 3, 4, 32))


def test_split_over_examples_without_collectives():
  """Under a mesh (8 devices on the data axis) each device runs both kernels on its own examples: the values and
  the gradients of x of the unsplit call, sharded as x, and the only collectives the sums of the parameters'
  gradients over the devices (all-reduce); x and the hidden tensor are never gathered."""
  mesh = make_mesh({"data": 8})
  rows = NamedSharding(mesh, P("data", None, None))
  args = _inputs((8, 37))
  fn = lambda *a: _values_and_grads(lambda *b: gelu_mlp(*b, tiling=SMALL), *a)
  step = jax.jit(fn, in_shardings=(rows, None, None, None, None, rows))
  got, want = step(*args), fn(*args)
  _assert_close(got, want, 1e-6, 1e-6)
  assert got[0].sharding.is_equivalent_to(rows, 3) and got[1][0].sharding.is_equivalent_to(rows, 3)
  program = step.lower(*args).compile().as_text()
  assert "all-reduce" in program
  assert not any(op in program for op in ("all-gather", "all-to-all", "collective-permute"))


def test_vit_block_with_the_pallas_mlp_is_the_xla_block():
  """A ViT block (the SAMI student's and EfficientSAM's encoder's), same parameters, with ``Kernels(mlp="pallas")``:
  the XLA block's parameters (names and initial values), output and gradients (the kernels reached: their names in the
  program)."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 64)), jnp.float32)
  blocks = {mlp: Block(num_heads=4, kernels=Kernels(mlp=mlp)) for mlp in ("xla", "pallas")}
  params = blocks["xla"].init(jax.random.PRNGKey(0), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, blocks["pallas"].init(jax.random.PRNGKey(0), x), params)
  results = {}
  for name, block in blocks.items():
    loss = lambda p: jnp.sum(jnp.sin(block.apply(p, x)))  # pylint: disable=cell-var-from-loop
    results[name] = (block.apply(params, x), jax.grad(loss)(params))
  assert "gelu_mlp_backward" in str(jax.make_jaxpr(jax.grad(loss))(params))
  np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=0, atol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(results["pallas"][1]),
                               jax.tree_util.tree_leaves(results["xla"][1])):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()),
                               err_msg=jax.tree_util.keystr(path))


def test_shapes_it_cannot_hold_are_refused():
  x, w1, b1, w2, b2, _ = _inputs()
  assert fits(512, 2048) and fits(384, 1536) and not fits(200, 2048) and not fits(512, 2000)
  with pytest.raises(ValueError, match="steps of 64"):
    gelu_mlp(x[..., :24], w1[:24], b1, w2[:, :24], b2[:24], tiling=MatmulTiling(block_k=64))
  with pytest.raises(ValueError, match=r"W1 \[C, F\]"):
    gelu_mlp(x, w1.T, b1, w2, b2)
  with pytest.raises(ValueError, match="power of 2"):
    MatmulTiling(block_n=96)
  with pytest.raises(ValueError, match="mlp must be one of"):
    Kernels(mlp="triton")
