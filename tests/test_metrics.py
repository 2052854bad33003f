"""Training logs: console line with throughput/ETA, and TensorBoard event files that read back."""

import glob
import os
import struct

import jax.numpy as jnp
from tensorboardX.proto import event_pb2

from efficientsam_jax.train.metrics import MetricWriter, format_eta


def _read_scalars(directory):
  """{tag: [(step, value)]} from the TFRecord-framed event files under ``directory``."""
  scalars = {}
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_console_and_tensorboard(tmp_path, monkeypatch):
  lines = []
  clock = iter([100.0, 110.0, 120.0])
  monkeypatch.setattr("efficientsam_jax.train.metrics.time.perf_counter", lambda: next(clock))
  writer = MetricWriter(str(tmp_path), total_steps=100, examples_per_step=64, print_fn=lines.append)
  writer.start(0)
  first = writer.write(10, {"loss": jnp.float32(0.5), "lr": 1e-3})
  second = writer.write(20, {"loss": 0.25, "lr": 2e-3})
  writer.close()
  # 10 steps of 64 images in 10 s: 64 img/s; 80 steps left at 1 s/step.
  assert first["img_per_s"] == 64.0 and first["eta_s"] == 90.0
  assert second["eta_s"] == 80.0
  assert lines[0] == "step 10/100 (10.0%) | loss 0.5 | lr 0.001 | 64.0 img/s | ETA 0:01:30"
  scalars = _read_scalars(os.path.join(tmp_path, "tensorboard"))
  assert scalars["loss"] == [(10, 0.5), (20, 0.25)]
  assert [step for step, _ in scalars["img_per_s"]] == [10, 20]
  assert "eta_s" not in scalars


def test_format_eta():
  assert format_eta(3725) == "1:02:05"
  assert format_eta(float("nan")) == "?"
