"""The SAMI input pipeline: grain over the teacher-record shards.

Per process: its own shards (``paths[process_index::process_count]``), in a
seeded order, read ``cycle_length`` at a time (interleaved), records mixed in a
seeded window shuffle, decoded (JPEG → normalized float32, fp16 features →
float32 tokens) and batched. The iterator's state is a small JSON-able dict
(``get_state``/``set_state``) that the training checkpoint stores, so a resumed
run sees the same batches. grain's TFRecord reader skips CRC checks: run
``teacher_records.verify_shards`` on the directory first (the training job does).
"""

from __future__ import annotations

from typing import Optional, Sequence

import grain
import numpy as np

from efficientsam_jax.data import teacher_records as tr
from efficientsam_jax.models.efficient_sam import PIXEL_MEAN, PIXEL_STD

_MEAN = np.asarray(PIXEL_MEAN, np.float32)
_STD = np.asarray(PIXEL_STD, np.float32)


def decode_for_training(serialized: bytes) -> dict:
  """One record → {"images": float32 [S, S, 3] normalized, "targets": float32 [g·g, C]}."""
  record = tr.decode_record(serialized)
  image = (record["image"].astype(np.float32) / 255.0 - _MEAN) / _STD
  features = record["features"]
  return {"images": image, "targets": features.reshape(-1, features.shape[-1]).astype(np.float32)}


def sami_dataset(paths: Sequence[str], *, local_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle_window: int = 1024, cycle_length: int = 4,
                 num_epochs: Optional[int] = None) -> grain.IterDataset:
  """Batches of this process's share of the shards; ``num_epochs`` None repeats forever."""
  mine = sorted(paths)[process_index::process_count]
  if not mine:
    raise ValueError(f"process {process_index} of {process_count} has no shard: {len(paths)} shard(s) "
                     "for more processes than shards; write more shards")
  shards = grain.MapDataset.source(mine).shuffle(seed=seed).repeat(num_epochs)
  records = grain.experimental.InterleaveIterDataset(
      shards.map(grain.experimental.TFRecordIterDataset), cycle_length=min(cycle_length, len(mine)))
  records = grain.experimental.WindowShuffleIterDataset(records, window_size=shuffle_window, seed=seed)
  return records.map(decode_for_training).batch(local_batch_size, drop_remainder=True)
