"""Checkpoints: a run killed after a checkpoint and resumed reproduces the uninterrupted losses."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from efficientsam_jax.models.sami import SamiConfig, SamiModel
from efficientsam_jax.train import sharding
from efficientsam_jax.train.checkpoint import Checkpointer, PreemptionFlag
from efficientsam_jax.train.optim import make_optimizer
from efficientsam_jax.train.loop import jit_train_step
from efficientsam_jax.train.sami import make_train_step
from efficientsam_jax.train.state import create_train_state

TINY = SamiConfig(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, img_size=32,
                  decoder_dim=32, decoder_depth=1, decoder_num_heads=2, target_dim=8)
OPTIMIZER = {"optimizer": {"b1": 0.9, "b2": 0.95, "weight_decay": 0.05},
             "lr": {"base_lr": 1e-3, "warmup_steps": 2}, "global_batch_size": 8, "total_steps": 8}


def _batch(index):
  """A deterministic stand-in for the input pipeline: batch ``index`` is always the same."""
  rng = np.random.default_rng(index)
  return {"images": rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8),
          "targets": rng.normal(size=(8, 4, 8)).astype(np.float32)}


MODEL = SamiModel(TINY)
TX, SCHEDULE = make_optimizer(OPTIMIZER)
STEP = make_train_step(MODEL, TX, SCHEDULE)


def _init(rng):
  return MODEL.init(rng, jnp.zeros((1, 32, 32, 3)), rng)["params"]


def _train(mesh, workdir, stop_after=None, total=8, interval=3):
  """Runs (or resumes) training to ``total`` steps; returns {step: loss} of the steps it ran."""
  state, shardings = create_train_state(_init, TX, jax.random.PRNGKey(0), mesh)
  next_batch = 0
  with Checkpointer(workdir, keep=2, save_interval_steps=interval) as checkpointer:
    restored = checkpointer.restore(state, shardings)
    if restored is not None:
      state, data_state = restored
      next_batch = data_state["next_batch"]
    step_fn = jit_train_step(STEP, shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh))
    losses = {}
    while int(state.step) < total:
      state, metrics = step_fn(state, sharding.global_batch(_batch(next_batch), mesh), jax.random.PRNGKey(7))
      next_batch += 1
      step = int(state.step)
      losses[step] = float(metrics["loss"])
      checkpointer.save(step, state, {"next_batch": next_batch}, force=step == total)
      if stop_after is not None and step == stop_after:
        return losses  # "killed": no final save
  return losses


def test_resume_equals_uninterrupted(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  full = _train(mesh, str(tmp_path / "full"))
  first = _train(mesh, str(tmp_path / "resumed"), stop_after=5)  # last checkpoint: step 3
  assert Checkpointer(str(tmp_path / "resumed")).latest_step() == 3
  second = _train(mesh, str(tmp_path / "resumed"))
  assert sorted(second) == [4, 5, 6, 7, 8]
  for step in range(1, 9):
    ran = second.get(step, first.get(step))
    assert ran == full[step], (step, ran, full[step])  # bit-identical: same batches, masks, state
  checkpointer = Checkpointer(str(tmp_path / "full"))
  assert checkpointer.all_steps() == [6, 8]  # keep=2, interval 3, forced final save


def test_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  mesh = sharding.make_mesh({"data": 8})
  state, shardings = create_train_state(_init, TX, jax.random.PRNGKey(0), mesh)
  with Checkpointer("runs/ckpt", save_interval_steps=1) as checkpointer:
    assert checkpointer.save(1, state, {"next_batch": 1})
  restored, data_state = Checkpointer("runs/ckpt").restore(state, shardings)
  assert data_state == {"next_batch": 1} and int(restored.step) == 0
  assert os.path.isdir(tmp_path / "runs" / "ckpt" / "1")


def test_restore_without_checkpoint_is_none(tmp_path):
  assert Checkpointer(str(tmp_path / "empty")).restore({}, {}) is None


def test_sigterm_sets_the_flag():
  flag = PreemptionFlag()
  try:
    assert not flag.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.is_set()
  finally:
    flag.restore_handlers()
