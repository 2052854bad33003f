"""The SAMI input pipeline: grain over the teacher-record shards.

Per process: its own shards (``paths[process_index::process_count]``), in a
seeded order, read ``cycle_length`` at a time (interleaved), records mixed in a
seeded window shuffle, batched and decoded by a thread pool (JPEG → uint8
pixels, fp16 features → fp16 tokens), a few batches ahead in a background
thread. Pixels and features stay compact until the jitted train step
converts them (a quarter and a half of the bytes to the device). The iterator's state is a small JSON-able dict
(``get_state``/``set_state``) that the training checkpoint stores, so a resumed
run sees the same batches. grain's TFRecord reader skips CRC checks: run
``teacher_records.verify_shards`` on the directory first (the training job does).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Optional, Sequence

import grain
import numpy as np

from efficientsam_jax.data import teacher_records as tr


_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  global _POOL  # one pool per process, shared by every iterator
  if _POOL is None or _POOL._max_workers != threads:  # pylint: disable=protected-access
    _POOL = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sami-decode")
  return _POOL


def decode_batch(serialized: Sequence[bytes], threads: int = 0) -> dict:
  """Records → {"images": uint8 [B, S, S, 3], "targets": float16 [B, g·g, C]}, decoded by a thread pool.

  PIL's JPEG decoder releases the GIL, so ``threads`` (0: one per CPU) decode in
  parallel into preallocated arrays. Targets stay float16 and pixels uint8 until
  the jitted step (half and a quarter of the bytes to copy and send).
  """
  first = tr.decode_record(serialized[0])
  image, features = first["image"], first["features"].reshape(-1, first["features"].shape[-1])
  images = np.empty((len(serialized), *image.shape), np.uint8)
  targets = np.empty((len(serialized), *features.shape), np.float16)
  images[0], targets[0] = image, features

  def fill(i):
    record = tr.decode_record(serialized[i])
    images[i] = record["image"]
    targets[i] = record["features"].reshape(features.shape)

  list(_pool(threads or len(os.sched_getaffinity(0))).map(fill, range(1, len(serialized))))
  return {"images": images, "targets": targets}


def sami_dataset(paths: Sequence[str], *, local_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle_window: int = 1024, cycle_length: int = 4,
                 num_epochs: Optional[int] = None, decode_threads: int = 0,
                 prefetch_batches: int = 2) -> grain.IterDataset:
  """Batches of this process's share of the shards; ``num_epochs`` None repeats forever.

  Batches are assembled ``prefetch_batches`` ahead in a background thread, so
  decoding overlaps the training step.
  """
  mine = sorted(paths)[process_index::process_count]
  if not mine:
    raise ValueError(f"process {process_index} of {process_count} has no shard: {len(paths)} shard(s) "
                     "for more processes than shards; write more shards")
  shards = grain.MapDataset.source(mine).shuffle(seed=seed).repeat(num_epochs)
  records = grain.experimental.InterleaveIterDataset(
      shards.map(grain.experimental.TFRecordIterDataset), cycle_length=min(cycle_length, len(mine)))
  records = grain.experimental.WindowShuffleIterDataset(records, window_size=shuffle_window, seed=seed)
  batches = records.batch(local_batch_size, drop_remainder=True,
                          batch_fn=lambda batch: decode_batch(batch, decode_threads))
  if prefetch_batches:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch_batches)
  return batches
