"""The sharded SAMI step: data × FSDP over 8 fake devices equals one device, and really shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientsam_jax.models.layers import Kernels
from efficientsam_jax.models.sami import SamiConfig, SamiModel
from efficientsam_jax.train import sharding
from efficientsam_jax.train.optim import make_optimizer
from efficientsam_jax.train.finetune_config import get_finetune_config
from efficientsam_jax.train.loop import jit_train_step, optimizer_for
from efficientsam_jax.train.sami import make_train_step
from efficientsam_jax.train.sami_config import get_sami_config
from efficientsam_jax.train.state import abstract_train_state, create_train_state

TINY = SamiConfig(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, img_size=64,
                  decoder_dim=64, decoder_depth=2, decoder_num_heads=4, target_dim=16)


def _batch(step, batch_size=8):
  rng = np.random.default_rng(step)
  return {"images": rng.integers(0, 256, size=(batch_size, 64, 64, 3), dtype=np.uint8),
          "targets": rng.normal(size=(batch_size, 16, 16)).astype(np.float32)}


def _run(mesh, steps=3, batch_size=8, microbatches=1, kernels=Kernels()):
  model = SamiModel(TINY, kernels=kernels)
  tx, schedule = make_optimizer({
      "optimizer": {"b1": 0.9, "b2": 0.95, "weight_decay": 0.05, "grad_clip_norm": 1.0},
      "lr": {"base_lr": 1.5e-4, "warmup_steps": 1, "schedule": "cosine"},
      "global_batch_size": 8, "total_steps": 10})
  sample = jnp.zeros((1, 64, 64, 3))
  init = lambda rng: model.init(rng, sample, rng)["params"]
  state, shardings = create_train_state(init, tx, jax.random.PRNGKey(0), mesh)
  step = jit_train_step(make_train_step(model, tx, schedule, microbatches=microbatches), shardings,
                        sharding.batch_sharding(mesh), sharding.replicated(mesh))
  losses = []
  for i in range(steps):
    state, metrics = step(state, sharding.global_batch(_batch(i, batch_size), mesh), jax.random.PRNGKey(42))
    losses.append(float(metrics["loss"]))
    assert float(metrics["lr"]) == float(schedule(i))
  return state, losses


def test_data_fsdp_mesh_matches_one_device():
  assert jax.device_count() == 8
  _, single = _run(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  state, sharded = _run(sharding.make_mesh({"data": 2, "fsdp": 4}))
  np.testing.assert_allclose(sharded, single, rtol=2e-5)
  assert single[-1] != single[0]  # the steps did update the model
  # Large kernels are split over the 4 FSDP devices, replicated over data.
  kernel = state.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # [64, 256]
  assert "fsdp" in kernel.sharding.spec
  assert kernel.addressable_shards[0].data.shape[1] == 256 // 4
  moments = jax.tree_util.tree_leaves(state.opt_state)
  assert any("fsdp" in getattr(m.sharding, "spec", ()) for m in moments)


@pytest.mark.parametrize("kernels", [Kernels(attention="pallas"), Kernels(attention="pallas", mlp="pallas")])
def test_pallas_kernels_on_the_mesh_give_the_xla_losses(kernels):
  """The Pallas attention kernels, and the MLP's (interpret mode here), in the data × FSDP step, split over the
  mesh with the batch: the losses of the one-device step with XLA's attention and MLP."""
  _, xla = _run(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  _, pallas = _run(sharding.make_mesh({"data": 2, "fsdp": 4}), kernels=kernels)
  np.testing.assert_allclose(pallas, xla, rtol=2e-5)


def test_abstract_state_compiles_the_step_that_runs_the_real_one():
  """``abstract_train_state`` (shapes only: what a compile for absent devices gets) has the real state's shapes,
  dtypes and shardings, so a step compiled from it runs on the real state."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  model = SamiModel(TINY)
  tx, schedule = make_optimizer({"optimizer": {"b1": 0.9, "b2": 0.95, "weight_decay": 0.05},
                                 "lr": {"base_lr": 1.5e-4, "warmup_steps": 1}, "global_batch_size": 8,
                                 "total_steps": 10})
  init = lambda rng: model.init(rng, jnp.zeros((1, 64, 64, 3)), rng)["params"]
  state, shardings = create_train_state(init, tx, jax.random.PRNGKey(0), mesh)
  abstract, abstract_shardings = abstract_train_state(init, tx, mesh)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for real, shape, named in zip(*(jax.tree.leaves(t) for t in (state, abstract, abstract_shardings))):
    assert (shape.shape, shape.dtype, shape.sharding, named) == (real.shape, real.dtype, real.sharding, real.sharding)
  batch = sharding.global_batch(_batch(0), mesh)
  step = jit_train_step(make_train_step(model, tx, schedule), abstract_shardings, sharding.batch_sharding(mesh),
                        sharding.replicated(mesh))
  compiled = step.lower(abstract, batch, jax.random.PRNGKey(42)).compile()
  _, metrics = compiled(state, batch, jax.random.PRNGKey(42))
  assert np.isfinite(float(metrics["loss"]))


def test_microbatches_give_the_step_of_one_pass():
  """Gradient accumulation over 2 parts of a 16-example batch, each split over the 8 devices: the same masks,
  losses and parameters as the whole batch at once."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  whole_state, whole = _run(mesh, steps=2, batch_size=16)
  parts_state, parts = _run(mesh, steps=2, batch_size=16, microbatches=2)
  np.testing.assert_allclose(parts, whole, rtol=1e-5)
  assert whole[1] != whole[0]
  for a, b in zip(jax.tree_util.tree_leaves(parts_state.params), jax.tree_util.tree_leaves(whole_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
  with pytest.raises(ValueError, match="does not split into 3 microbatches"):
    _run(mesh, steps=1, batch_size=16, microbatches=3)


def test_job_configs_check_that_each_microbatch_splits_over_the_devices():
  config = get_sami_config("s", "smoke")  # global batch 8 on 8 devices
  assert config.microbatches == 1 and get_finetune_config("ti").microbatches == 1
  optimizer_for(config, 64)
  config.microbatches = 2
  with pytest.raises(ValueError, match=r"must be a multiple of microbatches \(2\) × devices \(8\)"):
    optimizer_for(config, 64)
  config.global_batch_size = 16
  assert optimizer_for(config, 64)[2] == 60  # the smoke config's total_steps


def test_mesh_errors():
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    sharding.make_mesh({"data": 3, "fsdp": -1})
  assert sharding.make_mesh({"data": -1, "fsdp": 2}).devices.shape == (4, 2)
