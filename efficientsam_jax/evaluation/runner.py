"""What both evaluation jobs share: data paths, the processes' shares, the per-image loop, outputs."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from efficientsam_jax.common.files import atomic_file
from efficientsam_jax.common.images import load_rgb
from efficientsam_jax.evaluation.coco import CocoData, check_image_files, image_path, load_coco
from efficientsam_jax.evaluation.progress import Progress
from efficientsam_jax.evaluation.store import ResultStore


def resolve_data(config, workdir: str) -> dict:
  """Paths of the annotations, images (and detections); ``data.synthetic`` writes the generated set first."""
  data = config.data
  if data.get("synthetic"):
    from efficientsam_jax.evaluation.synthetic import write_synthetic_dataset  # pylint: disable=import-outside-toplevel
    return write_synthetic_dataset(os.path.join(workdir, "synthetic_data"))
  return {"annotations": data.annotations, "images": data.images}


def processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  """(this process, number of processes): JAX's unless given (tests simulate several processes)."""
  import jax  # pylint: disable=import-outside-toplevel
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count})")
  return index, count


def read_image(folder: str, entry: dict) -> Optional[np.ndarray]:
  """The image of an annotation file's ``images`` entry; None if its size is not the one the file states."""
  image = load_rgb(image_path(folder, entry))
  return image if image.shape[:2] == (int(entry["height"]), int(entry["width"])) else None


def select_images(data: CocoData, max_images: int) -> list[int]:
  """All image ids in sorted order, or the first ``max_images`` of them (0 = all)."""
  ids = data.image_ids
  return ids[:max_images] if max_images and max_images > 0 else ids


def run_images(store: ResultStore, image_ids: list[int], process_image: Callable[[int, Any, dict], list],
               results_key: str, description: str, folder: str, data: CocoData,
               log: Callable[[str], None] = print) -> dict:
  """Runs ``process_image(image_id, image, issues)`` on each image of this process's share not yet in
  ``store`` and stores ``{"image_id", results_key: its list, "issues"}``; an image whose file does not
  match its annotated size is stored with no results and one ``image_size_mismatch``. Returns timing info."""
  check_image_files(folder, data, image_ids)
  finished = store.done(image_ids)
  todo = [i for i in image_ids if i not in finished]
  log(f"{description}: {len(image_ids)} images in this process's share, {len(finished)} already done "
      f"(resumed), {len(todo)} to go")
  progress = Progress(len(image_ids), description, initial=len(finished))
  start = time.perf_counter()
  for image_id in todo:
    image = read_image(folder, data.images[image_id])
    issues: dict[str, int] = {}
    results = [] if image is None else process_image(image_id, image, issues)
    if image is None:
      issues["image_size_mismatch"] = 1
    store.write(image_id, {"image_id": image_id, results_key: results, "issues": issues})
    progress.update()
  progress.close()
  seconds = time.perf_counter() - start
  return {"images_run": len(todo), "images_resumed": len(finished), "seconds": seconds,
          "seconds_per_image": seconds / len(todo) if todo else None}


def write_json(path: str, payload: Any) -> None:
  with atomic_file(path) as tmp, open(tmp, "w") as f:
    json.dump(payload, f, indent=1)


def add_counts(total: dict[str, int], more: dict[str, int]) -> None:
  for key, value in more.items():
    total[key] = total.get(key, 0) + int(value)


def load_data(paths: dict, kind: str) -> CocoData:
  return load_coco(paths["annotations"], kind)
