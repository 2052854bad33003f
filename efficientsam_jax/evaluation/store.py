"""A resumable per-image results store, shared by the processes of one evaluation.

Each finished image is one JSON file ``DIR/<image_id>.json`` written atomically,
so an interrupted job loses at most the image in flight and a restarted job
skips what is there. ``DIR/run.json`` holds the run's fingerprint (the settings
that decide the results); a store made by a different run is refused instead of
mixing results. Several processes (multi-host) may write into one store on a
shared filesystem: each handles its own images, process 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from efficientsam_jax.common.files import atomic_file

RUN_FILE = "run.json"


def fingerprint(settings: dict) -> str:
  """A short hash of the JSON form of ``settings``."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
  """Per-image JSON results in ``directory`` for the run described by ``settings``."""

  def __init__(self, directory: str, settings: dict):
    self.directory = directory
    self.settings = settings
    self.fingerprint = fingerprint(settings)
    os.makedirs(directory, exist_ok=True)
    run_path = os.path.join(directory, RUN_FILE)
    if os.path.exists(run_path):
      with open(run_path) as f:
        try:
          found = json.load(f)
        except json.JSONDecodeError as error:
          raise ValueError(f"{run_path} is corrupt ({error}); delete {directory} to start over") from error
      if found.get("fingerprint") != self.fingerprint:
        changed = sorted(k for k in set(found.get("settings", {})) | set(settings)
                         if json.dumps(found.get("settings", {}).get(k), default=str)
                         != json.dumps(settings.get(k), default=str))
        raise ValueError(f"{directory} holds results of a different run (settings that differ: {changed}); "
                         "use a new --workdir or delete that folder")
    else:
      with atomic_file(run_path) as tmp, open(tmp, "w") as f:
        json.dump({"fingerprint": self.fingerprint, "settings": settings}, f, indent=1, default=str)

  def _path(self, image_id: int) -> str:
    return os.path.join(self.directory, f"{int(image_id)}.json")

  def has(self, image_id: int) -> bool:
    return os.path.exists(self._path(image_id))

  def done(self, image_ids: Iterable[int]) -> set[int]:
    names = set(os.listdir(self.directory))
    return {int(i) for i in image_ids if f"{int(i)}.json" in names}

  def write(self, image_id: int, payload: Any) -> None:
    with atomic_file(self._path(image_id)) as tmp, open(tmp, "w") as f:
      json.dump(payload, f)

  def read(self, image_id: int) -> Any:
    with open(self._path(image_id)) as f:
      return json.load(f)

  def read_all(self, image_ids: Iterable[int]) -> dict[int, Any]:
    """Results of ``image_ids``; a FileNotFoundError lists the images that no process finished."""
    image_ids = [int(i) for i in image_ids]
    missing = sorted(set(image_ids) - self.done(image_ids))
    if missing:
      raise FileNotFoundError(f"{len(missing)} image(s) have no results in {self.directory}, e.g. {missing[:5]}; "
                              "did every process finish? Rerun the job to complete them")
    return {i: self.read(i) for i in image_ids}
