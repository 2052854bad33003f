"""The training loop shared by every phase (SAMI pretraining, EfficientSAM finetuning).

A phase supplies its sharded state, its jitted step and a checkpointable input
iterator; the loop restores the latest checkpoint (model, optimizer and
iterator state together), runs the steps, logs (console line with throughput
and ETA, TensorBoard), saves on an interval, at the end and on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax

from efficientsam_jax.models.layers import REMAT_POLICIES
from efficientsam_jax.train import sharding
from efficientsam_jax.train.checkpoint import Checkpointer, PreemptionFlag
from efficientsam_jax.train.metrics import MetricWriter


def jit_train_step(step_fn, state_shardings, batch_sharding, replicated):
  """The step jitted over the mesh: state in/out in its shardings (donated), batch split over devices."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def optimizer_for(config, num_examples: int):
  """(tx, schedule, total_steps) from a job config's batch size, length and optimizer fields (checked).

  ``total_steps`` (if > 0) or ``num_epochs`` × steps per epoch; warm-up from
  ``lr.warmup_steps`` (if ≥ 0) or ``lr.warmup_epochs``; the lr scales with the
  global batch (``optim.make_optimizer``).
  """
  from efficientsam_jax.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  global_batch = config.global_batch_size
  if global_batch % jax.process_count():
    raise ValueError(f"global_batch_size {global_batch} is not divisible by {jax.process_count()} processes")
  microbatches = config.microbatches
  if microbatches < 1 or global_batch % (microbatches * jax.device_count()):
    raise ValueError(f"global_batch_size {global_batch} must be a multiple of microbatches ({microbatches}) × "
                     f"devices ({jax.device_count()}): each microbatch is split over every device")
  steps_per_epoch = max(1, num_examples // global_batch) if num_examples else 0
  total_steps = config.total_steps or config.num_epochs * steps_per_epoch
  if total_steps <= 0:
    raise ValueError("set total_steps, or num_epochs with a dataset of known size")
  warmup = config.lr.warmup_steps if config.lr.warmup_steps >= 0 else config.lr.warmup_epochs * steps_per_epoch
  tx, schedule = make_optimizer({
      "optimizer": config.optimizer.to_dict(), "global_batch_size": global_batch, "total_steps": total_steps,
      "lr": {**config.lr.to_dict(), "warmup_steps": min(warmup, total_steps)}})
  return tx, schedule, total_steps


def compiled_memory_bytes(compiled) -> Optional[int]:
  """XLA's estimate of a compiled computation's memory per device (arguments, outputs and temporaries;
  donated buffers counted once); None where the backend has no memory analysis."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None


def memory_report(estimate: Optional[int], limit: Optional[int]) -> str:
  """The line the loop prints about the compiled step's memory per device: a warning, with what to change,
  when XLA's estimate is over what the device's allocator may use."""
  if estimate is None:
    return "XLA memory estimate per device: not available on this backend"
  line = f"XLA memory estimate per device: {estimate / 2**30:.2f} GiB"
  if not limit:
    return line
  line += f" of {limit / 2**30:.2f} GiB"
  if estimate > limit:
    line = (f"WARNING: {line}: the step will run out of memory. Raise microbatches (gradient accumulation, "
            f"same update), or set remat ({' / '.join(REMAT_POLICIES)}: models/layers.py remat), or shard the "
            "state over more devices (mesh.fsdp), or lower global_batch_size")
  return line


def compile_step(step_fn: Callable, state, batch, rng) -> Callable:
  """``step_fn`` (a ``jax.jit`` function) compiled ahead of time for the first batch; prints how long that
  took and XLA's memory estimate against the device's limit (``memory_report``). Anything else is returned
  as it is."""
  if not hasattr(step_fn, "lower"):
    return step_fn
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  stats = jax.local_devices()[0].memory_stats() or {}
  print(f"compiled the training step in {time.perf_counter() - start:.1f} s; "
        f"{memory_report(compiled_memory_bytes(compiled), stats.get('bytes_limit'))}", flush=True)
  return compiled


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  total_steps: int
  first_logged_loss: Optional[float] = None
  last_logged_loss: Optional[float] = None

  @property
  def finished(self) -> bool:
    return self.step >= self.total_steps


def train_loop(*, state, shardings, step_fn: Callable, iterator, mesh, workdir: str, total_steps: int,
               examples_per_step: int, log_every_steps: int, checkpoint_every_steps: int, keep_checkpoints: int,
               rng: jax.Array, description: str = "", batch_keys: Optional[tuple[str, ...]] = None) -> LoopResult:
  """Runs ``step_fn(state, batch, rng) -> (state, metrics)`` up to ``total_steps``, resuming if possible.

  ``iterator`` yields this process's share of each batch (numpy) and has
  ``get_state``/``set_state``; ``batch_keys`` picks the entries sent to the devices.
  """
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep_checkpoints,
                              save_interval_steps=checkpoint_every_steps)
  restored = checkpointer.restore(state, shardings)
  if restored is not None:
    state, data_state = restored
    iterator.set_state(data_state["iterator"])
    print(f"resumed from step {int(state.step)} ({checkpointer.directory})")
  writer = MetricWriter(workdir, total_steps, examples_per_step)
  result = LoopResult(state=state, step=int(state.step), total_steps=total_steps)
  writer.start(result.step)
  print(f"{description}{total_steps} steps of {examples_per_step}, mesh {dict(mesh.shape)}")
  preempted = PreemptionFlag()
  compiled = None
  try:
    while result.step < total_steps:
      local = next(iterator)
      if batch_keys is not None:
        local = {k: local[k] for k in batch_keys}
      batch = sharding.global_batch(local, mesh)
      if compiled is None:
        compiled = compile_step(step_fn, result.state, batch, rng)
      result.state, metrics = compiled(result.state, batch, rng)
      result.step += 1
      if result.step % log_every_steps == 0 or result.step == total_steps:
        values = writer.write(result.step, metrics)
        if result.first_logged_loss is None:
          result.first_logged_loss = values["loss"]
        result.last_logged_loss = values["loss"]
      stop = preempted.is_set()
      checkpointer.save(result.step, result.state, {"iterator": iterator.get_state()},
                        force=stop or result.step == total_steps)
      if stop:
        print(f"SIGTERM: saved step {result.step} and stopping; run again to resume")
        break
  finally:
    preempted.restore_handlers()
    checkpointer.close()
    writer.close()
  return result
