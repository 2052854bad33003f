"""Training checkpoints: train state and input-pipeline state saved together (orbax).

``Checkpointer`` wraps ``ocp.CheckpointManager`` with one composite item per
step: ``state`` (the sharded ``TrainState``) and ``data`` (the JSON state of the
input iterator, e.g. grain's ``iterator.get_state()``), so a resumed run sees
the same batches it would have seen. Saves are asynchronous; ``keep`` bounds
how many are kept; ``save_interval_steps`` spaces them; ``force=True`` saves
now (end of training, SIGTERM). A save is only visible once complete, so a
crash during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, save_interval_steps: int = 1000,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    # orbax requires absolute paths; a relative --workdir is the common case.
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Optional[dict] = None, force: bool = False) -> bool:
    """Starts saving (asynchronously); returns whether a save was started at this step."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state: Any, shardings: Any, step: Optional[int] = None):
    """Restores (state, data_state) at ``step`` (default: latest) into ``shardings``; None if there is none."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    target = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class PreemptionFlag:
  """Set by SIGTERM (what schedulers send before preempting); the loop then saves and exits."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, lambda *_: self._event.set())

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
