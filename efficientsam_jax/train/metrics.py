"""Training logs: a console line with throughput and ETA, and TensorBoard scalars.

Only process 0 writes (multi-host runs would otherwise write N copies).
Metrics stay on the device between logging steps; ``write`` pulls them to the
host, so call it only on logging steps.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Mapping, Optional

import jax
import numpy as np


def format_eta(seconds: float) -> str:
  if not np.isfinite(seconds) or seconds < 0:
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


class MetricWriter:
  """Console + TensorBoard writer for a job of ``total_steps`` steps of ``examples_per_step`` examples."""

  def __init__(self, workdir: str, total_steps: int, examples_per_step: int, unit: str = "img",
               tensorboard: bool = True, print_fn=print):
    self.total_steps = int(total_steps)
    self.examples_per_step = int(examples_per_step)
    self.unit = unit
    self._print = print_fn
    self._is_writer = jax.process_index() == 0
    self._summary = None
    if tensorboard and self._is_writer:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._summary = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._last_step: Optional[int] = None
    self._last_time: Optional[float] = None

  def start(self, step: int) -> None:
    """Marks the step the timing starts from (the first step, or the one resumed from)."""
    self._last_step, self._last_time = int(step), time.perf_counter()

  def write(self, step: int, metrics: Mapping[str, object]) -> dict:
    """Logs ``metrics`` (device or host scalars) at ``step``; returns the host values with throughput."""
    values = {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}
    now = time.perf_counter()
    if self._last_step is not None and step > self._last_step:
      seconds_per_step = (now - self._last_time) / (step - self._last_step)
      values[f"{self.unit}_per_s"] = self.examples_per_step / seconds_per_step
      values["eta_s"] = seconds_per_step * (self.total_steps - step)
    self._last_step, self._last_time = int(step), now
    if self._is_writer:
      self._print(self.format_line(step, values))
      if self._summary is not None:
        for name, value in values.items():
          if name != "eta_s":
            self._summary.add_scalar(name, value, step)
        self._summary.flush()
    return values

  def format_line(self, step: int, values: Mapping[str, float]) -> str:
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
    for name, value in values.items():
      if name in ("eta_s", f"{self.unit}_per_s"):
        continue
      parts.append(f"{name} {value:.4g}")
    if f"{self.unit}_per_s" in values:
      parts.append(f"{values[f'{self.unit}_per_s']:.1f} {self.unit}/s")
      parts.append(f"ETA {format_eta(values['eta_s'])}")
    return " | ".join(parts)

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()
      self._summary = None
