"""SAMI model: MAE masking, restore order, decoders, losses, and export of the student."""

import types

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from efficientsam_jax.models import EfficientSam, EfficientSamConfig, init_params
from efficientsam_jax.models import layers, vit
from efficientsam_jax.models.layers import Kernels
from efficientsam_jax.models.sami import (SamiConfig, SamiModel, random_masking, sami_loss,
                                          student_encoder_params, take_permuted)
from efficientsam_jax.train.benchmark import saved_residual_bytes
from efficientsam_jax.train.sami import make_loss_fn
from efficientsam_jax.train.sami_config import get_sami_config

TINY = dict(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=3, img_size=64,
            decoder_dim=32, decoder_depth=2, decoder_num_heads=4, target_dim=8)


def test_random_masking_ratio_and_inverse():
  shuffle, restore, mask = random_masking(jax.random.PRNGKey(0), 4, 196, 49)
  assert np.all(np.asarray(mask).sum(1) == 196 - 49)
  x = jnp.arange(4 * 196).reshape(4, 196)
  shuffled = jnp.take_along_axis(x, shuffle, axis=1)
  np.testing.assert_array_equal(jnp.take_along_axis(shuffled, restore, axis=1), x)
  # The visible tokens are exactly the unmasked positions, and masks differ per example.
  visible = np.zeros((4, 196), bool)
  np.put_along_axis(visible, np.asarray(shuffle[:, :49]), True, axis=1)
  np.testing.assert_array_equal(visible, np.asarray(mask) == 0)
  assert len({tuple(np.flatnonzero(m)) for m in np.asarray(mask)}) == 4
  # An example's mask follows its id, not its batch: a part of the batch draws the whole batch's rows.
  part = random_masking(jax.random.PRNGKey(0), 2, 196, 49, jnp.array([3, 1]))
  for whole, some in zip((shuffle, restore, mask), part):
    np.testing.assert_array_equal(some, np.asarray(whole)[[3, 1]])


@pytest.mark.parametrize("start,stop", [(0, 3), (3, 10), (0, 10), (2, 7)])
def test_take_permuted_equals_take_along_axis_and_its_gradient_is_a_gather(start, stop):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(3, stop - start, 4)), jnp.float32)
  shuffle, restore, _ = random_masking(jax.random.PRNGKey(0), 3, 10, 3)
  reference = lambda t: jnp.take_along_axis(t, shuffle[:, start:stop, None], axis=1)
  ours = lambda t: take_permuted(t, shuffle, restore, start, stop)
  np.testing.assert_array_equal(ours(x), reference(x))
  grad_of = lambda take: jax.grad(lambda t: jnp.sum(take(t) * weights))
  np.testing.assert_array_equal(grad_of(ours)(x), grad_of(reference)(x))
  assert "scatter" in str(jax.make_jaxpr(grad_of(reference))(x))
  assert "scatter" not in str(jax.make_jaxpr(grad_of(ours))(x))


class _ConvPatchEmbed(nn.Module):
  """The patch embedding as PyTorch computes it: a stride-p convolution named ``proj``."""
  features: int
  patch_size: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    return nn.Conv(self.features, (p, p), strides=p, padding="VALID", dtype=self.dtype, name="proj")(images)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_patch_embedding_is_the_convolution_and_embeds_selected_tokens(dtype):
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 56, 3))  # VALID: the last 8 rows are dropped
  conv = _ConvPatchEmbed(24, 16, dtype)
  ours = vit.PatchEmbed(24, 16, dtype=dtype)
  conv_params = conv.init(jax.random.PRNGKey(1), images)["params"]
  params = ours.init(jax.random.PRNGKey(1), images)["params"]
  assert set(params["proj"]) == set(conv_params["proj"]) == {"kernel", "bias"}  # same names, same initial values
  for name in conv_params["proj"]:
    np.testing.assert_array_equal(params["proj"][name], conv_params["proj"][name])
  got, want = ours.apply({"params": params}, images), conv.apply({"params": conv_params}, images)
  assert got.shape == want.shape == (2, 2, 3, 24) and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=(1e-5 if dtype == jnp.float32 else 5e-2) * np.abs(np.asarray(want, np.float32)).max())
  with pytest.raises(ValueError, match="no whole 16×16 patch"):
    ours.apply({"params": params}, images[:, :8])

  # The encoder's embed with a token selection (SAMI's visible tokens) embeds just those tokens.
  encoder = vit.ImageEncoderViT(img_size=64, embed_dim=24, depth=1, num_heads=2, pretrain_img_size=64)
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 64, 3))
  variables = encoder.init(jax.random.PRNGKey(3), images)
  order = jnp.array([[5, 0, 15, 9], [1, 2, 3, 4]])
  select = lambda t: t[0][order] if t.shape[0] == 1 else jnp.take_along_axis(t, order[..., None], axis=1)
  whole = encoder.apply(variables, images, method="embed").reshape(2, 16, 24)
  some = encoder.apply(variables, images, select, method="embed")
  np.testing.assert_allclose(some, select(whole), atol=1e-5)


def test_kernels_change_the_computation_not_the_parameters():
  config = SamiConfig(**TINY)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  mask_rng = jax.random.PRNGKey(1)
  exact = SamiModel(config)
  params = exact.init(jax.random.PRNGKey(2), images, mask_rng)
  reference, _ = exact.apply(params, images, mask_rng)
  for kernels in (Kernels(layer_norm="one_pass"), Kernels(gelu="tanh"), Kernels(layer_norm="one_pass", gelu="tanh")):
    model = SamiModel(config, kernels=kernels)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(2), images, mask_rng)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    predictions, _ = model.apply(params, images, mask_rng)
    scale = float(jnp.abs(reference).max())
    np.testing.assert_allclose(predictions, reference, atol=(1e-5 if kernels.gelu == "exact" else 2e-3) * scale)
    if kernels.gelu == "tanh":
      assert float(jnp.abs(predictions - reference).max()) > 1e-6 * scale  # the decoder's GELU did change
  # The student encoder keeps the exact GELU whatever the decoder's.
  tokens = jax.random.normal(jax.random.PRNGKey(3), (2, 5, TINY["encoder_embed_dim"]))
  encode = lambda model: model.apply(params, tokens, method=lambda m, t: m.encoder.transform(t))
  np.testing.assert_array_equal(encode(SamiModel(config, kernels=Kernels(gelu="tanh"))), encode(exact))
  with pytest.raises(ValueError, match="attention must be one of"):
    Kernels(attention="flash")


@pytest.mark.parametrize("size", [64, 48])  # 16 tokens (4 visible), and 9 (2 visible, 7 queries): odd counts
def test_cudnn_attention_call_matches_ours(monkeypatch, size):
  """``attention="cudnn"`` hands [B, T, N, H] to ``jax.nn.dot_product_attention``, with even token counts (what
  its backward pass needs); with its XLA kernel swapped in for cuDNN's (none here) the SAMI model's outputs and
  gradients are ours."""
  config = SamiConfig(**{**TINY, "img_size": size})
  images, mask_rng = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3)), jax.random.PRNGKey(1)
  params = SamiModel(config).init(jax.random.PRNGKey(2), images, mask_rng)
  real, kernels, lengths = jax.nn.dot_product_attention, [], set()

  def xla_kernel(q, k, v, *args, implementation=None, **kwargs):
    kernels.append(implementation)
    lengths.update((q.shape[1], k.shape[1]))
    return real(q, k, v, *args, implementation="xla", **kwargs)

  def outputs(kernels):
    model = SamiModel(config, kernels=kernels)
    loss = lambda p: jnp.sum(jnp.sin(model.apply(p, images, mask_rng)[0]))
    return jax.jit(model.apply)(params, images, mask_rng)[0], jax.jit(jax.grad(loss))(params)

  reference, reference_grads = outputs(Kernels())
  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_kernel)
  predictions, grads = outputs(Kernels(attention="cudnn"))
  np.testing.assert_allclose(predictions, reference, atol=1e-5 * float(jnp.abs(reference).max()))
  flat, flat_reference = (jax.flatten_util.ravel_pytree(g)[0] for g in (grads, reference_grads))
  np.testing.assert_allclose(flat, flat_reference, atol=1e-5 * float(jnp.abs(flat_reference).max()))
  assert kernels == ["cudnn"] * 2 * (TINY["encoder_depth"] + TINY["decoder_depth"])  # the outputs, the gradients
  assert all(n % 2 == 0 for n in lengths), lengths
  assert (size == 48) == (lengths != {4, 12, 16})  # 48: the odd counts 2+1, 7+1 and 9+1 were padded


def test_auto_attention_is_pallas_or_cudnn_on_nvidia_gpus_in_half_precision(monkeypatch):
  """The SAMI configs' "auto" on an NVIDIA GPU in bf16/fp16: the Pallas kernels where they hold the keys (at most
  512, head dim a power of 2 from 16), cuDNN's otherwise; XLA's elsewhere."""
  assert get_sami_config("s").kernels.attention == "auto"
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    assert layers.resolve_attention("auto", dtype, keys=196, head_dim=32) == "xla"  # this CPU
  assert layers.resolve_attention("cudnn", jnp.float32) == "cudnn"
  with pytest.raises(ValueError, match="must be one of"):
    layers.resolve_attention("flash", jnp.bfloat16)
  h100 = types.SimpleNamespace(platform="gpu", compute_capability="9.0")  # what a described GPU has
  with layers.attention_device(h100):  # resolves for that device rather than this CPU
    assert [layers.resolve_attention("auto", d, keys=196, head_dim=32)
            for d in (jnp.bfloat16, jnp.float16, jnp.float32)] == ["pallas", "pallas", "xla"]
    assert [layers.resolve_attention("auto", jnp.bfloat16, keys=keys, head_dim=head)
            for keys, head in ((512, 64), (513, 64), (196, 24), (196, 8), (None, None))] == [
                "pallas", "cudnn", "cudnn", "cudnn", "cudnn"]
    assert Kernels(attention="auto").token_padding(49, 64, jnp.bfloat16) == 0  # Pallas: no padding
    assert Kernels(attention="auto").token_padding(147, 32, jnp.bfloat16, keys=4097) == 1  # cuDNN: odd → even
  assert layers.resolve_attention("auto", jnp.bfloat16, keys=196, head_dim=32) == "xla"  # the context is left
  monkeypatch.setattr(layers, "_on_cuda", lambda device=None: True)
  called = []
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation=None, **k: called.append(
      implementation) or jnp.zeros_like(a[0]))
  monkeypatch.setattr(layers, "short_attention", lambda q, *a, **k: called.append("pallas") or jnp.zeros(
      (*q.shape[:2], *q.shape[-2:]), q.dtype))  # q may hold q, k and v packed [B, T, 3, N, H]
  config = SamiConfig(**TINY)
  model = SamiModel(config, dtype=jnp.bfloat16, kernels=Kernels(attention="auto"))
  model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jax.random.PRNGKey(1))
  # the encoder's heads have 16 channels, the decoder's 8: too few for a Pallas tile
  assert called == ["pallas"] * TINY["encoder_depth"] + ["cudnn"] * TINY["decoder_depth"]
  called.clear()
  long = jnp.zeros((1, 600, 2, 16), jnp.bfloat16)
  layers.attention(long, long, long, "auto")
  assert called == ["cudnn"]


@pytest.mark.parametrize("decoder_type", ["cross", "self"])
def test_remat_policies_keep_values_and_gradients_and_save_less(decoder_type):
  config = SamiConfig(**TINY, decoder_type=decoder_type)
  batch = {"images": jax.random.randint(jax.random.PRNGKey(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8),
           "targets": jax.random.normal(jax.random.PRNGKey(4), (2, config.num_tokens, TINY["target_dim"]))}
  mask_rng = jax.random.PRNGKey(1)
  params = SamiModel(config).init(jax.random.PRNGKey(2), jnp.zeros((1, 64, 64, 3)), mask_rng)["params"]

  def loss_of(remat):
    model = SamiModel(config, remat=remat, kernels=Kernels(layer_norm="one_pass"))
    return lambda p: make_loss_fn(model)(p, batch, mask_rng)

  reference = jax.value_and_grad(loss_of("none"))(params)
  saved = {}
  for policy in ("none", "dots", "projections", "full", True):
    value, grads = jax.value_and_grad(loss_of(policy))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    np.testing.assert_allclose(value, reference[0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
    saved[policy] = saved_residual_bytes(loss_of(policy), params)
  # Each policy keeps less for the backward pass than the one before (LayerNorm/GELU/softmax intermediates,
  # then the attention logits and probabilities, then everything but the blocks' inputs).
  assert saved["none"] > saved["dots"] > saved["projections"] > saved["full"] == saved[True]
  with pytest.raises(ValueError, match="remat must be"):
    SamiModel(config, remat="selective").init(jax.random.PRNGKey(2), jnp.zeros((1, 64, 64, 3)), mask_rng)


def test_config_mask_ratio():
  assert SamiConfig().num_visible == 49  # 25% of 196 tokens at 224
  assert SamiConfig(mask_ratio=0.5).num_visible == 98
  with pytest.raises(ValueError, match="decoder_type"):
    SamiConfig(decoder_type="mlp")


def _patch_slice(index, grid, patch):
  row, col = divmod(int(index), grid)
  return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


@pytest.mark.parametrize("decoder_type", ["cross", "self"])
def test_masked_patches_are_unseen_and_outputs_in_image_order(decoder_type):
  config = SamiConfig(decoder_type=decoder_type, **TINY)
  model = SamiModel(config)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  mask_rng = jax.random.PRNGKey(1)
  params = model.init(jax.random.PRNGKey(2), images, mask_rng)
  apply = jax.jit(model.apply)
  predictions, mask = apply(params, images, mask_rng)
  assert predictions.shape == (2, 16, 8) and mask.shape == (2, 16)
  mask = np.asarray(mask)
  masked_token, visible_token = np.flatnonzero(mask[0])[0], np.flatnonzero(mask[0] == 0)[0]

  # Changing a masked patch changes nothing: the encoder never sees it.
  rows, cols = _patch_slice(masked_token, 4, 16)
  changed, _ = apply(params, images.at[0, rows, cols].add(5.0), mask_rng)
  np.testing.assert_allclose(changed, predictions, atol=1e-6)

  # Changing a visible patch changes that token's prediction, at its own position.
  rows, cols = _patch_slice(visible_token, 4, 16)
  changed, _ = apply(params, images.at[0, rows, cols].add(5.0), mask_rng)
  delta = np.abs(np.asarray(changed - predictions)).max(-1)
  assert delta[0, visible_token] > 1e-3
  np.testing.assert_allclose(delta[1], 0, atol=1e-6)  # the other example is independent
  if decoder_type == "cross":
    # Visible tokens do not attend to each other through the decoder, only in the encoder,
    # so the biggest change is at the changed token.
    assert delta[0].argmax() == visible_token


def test_losses():
  rng = np.random.default_rng(0)
  predictions = rng.normal(size=(2, 5, 4)).astype(np.float32)
  targets = rng.normal(size=(2, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], np.float32)
  np.testing.assert_allclose(sami_loss(predictions, targets, mask), ((predictions - targets) ** 2).mean((1, 2)),
                             rtol=1e-6)
  per_token = ((predictions - targets) ** 2).mean(-1)
  np.testing.assert_allclose(sami_loss(predictions, targets, mask, tokens="masked"),
                             [per_token[0, :2].mean(), per_token[1, 4]], rtol=1e-6)
  np.testing.assert_allclose(sami_loss(targets * 3.0, targets, mask, kind="cosine"), 0.0, atol=1e-6)
  np.testing.assert_allclose(sami_loss(-targets, targets, mask, kind="cosine"), 2.0, atol=1e-6)
  with pytest.raises(ValueError, match="loss kind"):
    sami_loss(predictions, targets, mask, kind="l1")


def test_tiny_model_fits_fixed_targets():
  config = SamiConfig(**TINY)
  model = SamiModel(config)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 64, 3))
  targets = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 8))
  params = model.init(jax.random.PRNGKey(2), images, jax.random.PRNGKey(3))["params"]
  optimizer = optax.adamw(3e-3)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, rng):
    def loss_fn(p):
      predictions, mask = model.apply({"params": p}, images, rng)
      return sami_loss(predictions, targets, mask).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(60):
    params, state, loss = step(params, state, jax.random.PRNGKey(100 + i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_student_loads_into_efficientsam_encoder():
  sami = SamiModel(SamiConfig.from_variant("ti", img_size=224, decoder_depth=1))
  sami_params = jax.eval_shape(lambda: sami.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                                 jax.random.PRNGKey(1)))["params"]
  student = traverse_util.flatten_dict(student_encoder_params(sami_params))
  esam = jax.eval_shape(lambda: init_params(EfficientSam(EfficientSamConfig.from_variant("ti")),
                                            jax.random.PRNGKey(0)))
  encoder = traverse_util.flatten_dict(esam["image_encoder"])
  assert set(student) == {k for k in encoder if not k[0].startswith("neck_")}
  for key, value in student.items():
    assert value.shape == encoder[key].shape, key
