"""Teacher-feature records: what the precompute job writes and the SAMI input pipeline reads.

One ``tf.train.Example`` per augmented view (parse with ``tf.io.parse_single_example``)::

    view_jpeg         bytes     the view, JPEG at the student resolution (what the student sees)
    teacher_features  bytes     float16 little-endian, row-major [g, g, C] (g = S/16), aligned to
                                the student's token grid
    teacher_shape     int64[3]  (g, g, C)
    source_id         bytes     the source image's id (file stem or dataset key)
    crop_box          int64[4]  (top, left, height, width) of the crop in source pixels
    flip              int64     1 if the crop was mirrored
    view_index        int64     which of the image's views this is

The teacher runs on the decoded JPEG, so teacher and student see identical pixels.
Shards are written whole (temporary file, then rename) and recorded in a
per-process manifest with their record (view) count, source-image count,
SHA-256 and the job's config hash; a restarted job skips recorded shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from efficientsam_jax.common.files import atomic_file
from efficientsam_jax.common.images import decode_image
from efficientsam_jax.data.example_proto import decode_example, encode_example
from efficientsam_jax.data.tfrecord import TFRecordWriter, read_records
from efficientsam_jax.data.views import View

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MANIFEST_PREFIX = "manifest-"


def encode_record(view_jpeg: bytes, features: np.ndarray, source_id: str, view: View, view_index: int) -> bytes:
  features = np.ascontiguousarray(features, dtype="<f2")
  return encode_example({
      "view_jpeg": view_jpeg,
      "teacher_features": features.tobytes(),
      "teacher_shape": list(features.shape),
      "source_id": source_id,
      "crop_box": [view.top, view.left, view.height, view.width],
      "flip": int(view.flip),
      "view_index": int(view_index),
  })


def decode_record(serialized: bytes) -> dict:
  """→ {image uint8 [S, S, 3], features float16 [g, g, C], source_id, crop_box, flip, view_index}."""
  raw = decode_example(serialized)
  shape = tuple(int(v) for v in raw["teacher_shape"])
  return {
      "image": decode_image(raw["view_jpeg"][0]),
      "features": np.frombuffer(raw["teacher_features"][0], "<f2").reshape(shape),
      "source_id": raw["source_id"][0].decode(),
      "crop_box": raw["crop_box"],
      "flip": bool(raw["flip"][0]),
      "view_index": int(raw["view_index"][0]),
  }


def iterate_records(paths: Iterable[str], verify: bool = True) -> Iterator[dict]:
  """Decoded records of the shards, in order, with CRC verification (a damaged shard names itself)."""
  for path in paths:
    for serialized in read_records(path, verify=verify):
      yield decode_record(serialized)


def list_image_folder(root: str) -> list[tuple[str, str]]:
  """(source id, path) of every image under ``root``, sorted by relative path (ids are unique)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder not found: {root}")
  found = []
  for directory, _, names in os.walk(root):
    for name in names:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        path = os.path.join(directory, name)
        found.append((os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/"), path))
  if not found:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
  return sorted(found)


def shard_name(index: int, num_shards: int) -> str:
  return f"teacher-{index:05d}-of-{num_shards:05d}.tfrecord"


def config_hash(values: dict) -> str:
  """A stable hash of what determines the records (a restarted job must match it)."""
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class Manifest:
  """Finished shards of one output directory; each process appends to its own file."""

  def __init__(self, directory: str, process_index: int = 0):
    self.directory = directory
    self.path = os.path.join(directory, f"{MANIFEST_PREFIX}{process_index:05d}.json")

  def entries(self) -> dict:
    """All processes' entries: {shard name: {count, images, sha256, config_hash}}."""
    merged = {}
    for name in sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else ():
      if name.startswith(MANIFEST_PREFIX) and name.endswith(".json"):
        with open(os.path.join(self.directory, name)) as f:
          merged.update(json.load(f))
    return merged

  def finished(self, shard: str, expected_hash: str) -> bool:
    entry = self.entries().get(shard)
    if entry is None:
      return False
    if entry["config_hash"] != expected_hash:
      raise ValueError(f"{os.path.join(self.directory, shard)} was written with another configuration "
                       f"(hash {entry['config_hash']}, now {expected_hash}); use a new output directory")
    return os.path.exists(os.path.join(self.directory, shard))

  def record(self, shard: str, count: int, sha256: str, hash_: str, images: int) -> None:
    """Adds a finished shard: ``count`` records (views) of ``images`` source images."""
    own = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        own = json.load(f)
    own[shard] = {"count": count, "images": images, "sha256": sha256, "config_hash": hash_}
    with atomic_file(self.path) as tmp, open(tmp, "w") as f:
      json.dump(own, f, indent=1, sort_keys=True)


def write_shard(path: str, records: Iterable[bytes]) -> tuple[int, str]:
  """Writes a whole shard atomically; returns (record count, SHA-256 of the file)."""
  with atomic_file(path) as tmp:
    with TFRecordWriter(tmp) as writer:
      for record in records:
        writer.write(record)
    count, digest = writer.count, file_sha256(tmp)
  return count, digest


def verify_shards(directory: str, check_hash: Optional[str] = None) -> dict:
  """Re-reads every recorded shard (CRCs, counts, SHA-256); returns {shard: count}. Raises naming the file."""
  counts = {}
  for shard, entry in sorted(Manifest(directory).entries().items()):
    path = os.path.join(directory, shard)
    if check_hash is not None and entry["config_hash"] != check_hash:
      raise ValueError(f"{path}: written with config hash {entry['config_hash']}, expected {check_hash}")
    count = sum(1 for _ in read_records(path, verify=True))
    if count != entry["count"] or file_sha256(path) != entry["sha256"]:
      raise ValueError(f"{path}: does not match its manifest entry ({count} records, expected {entry['count']})")
    counts[shard] = count
  return counts
