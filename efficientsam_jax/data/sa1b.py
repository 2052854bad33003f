"""SA-1B input for EfficientSAM finetuning: read the release in place, decode, sample masks, batch with grain.

Sources are what the release gives: ``.tar`` shards (uncompressed; their headers
are scanned once and members are then read by seek + read, so no extraction and
true random access) or folders of ``sa_<id>.jpg`` + ``sa_<id>.json``. With a
``cache_dir`` a tar's index (member offsets, and what damage it found) is kept in
a small file keyed by the tar's path, size and modification time, so a restarted
job does not read the tars' headers again.
``find_sources`` expands a folder of shards or of extracted shard folders; in a
multi-host job process ``i`` of ``n`` reads ``sources[i::n]`` (sorted).

Per sample (a pure function of the files' bytes and ``(seed, sample, epoch)``):

- the JPEG is decoded to RGB and resized to ``image_size²`` with PyTorch's
  bilinear (``align_corners=False``, no antialias, no aspect preservation), as
  EfficientSAM's own preprocessing does, then rounded to uint8;
- every compressed RLE string is parsed to its runs (``rle_counts``, COCO's
  format, vectorized) and checked: runs summing to H·W, the size matching the
  image. pycocotools' C decoder has no bounds checks, so an unchecked bad string
  could corrupt memory. Masks that are empty or cover more than
  ``max_area_fraction`` of the image are dropped, and up to ``max_masks`` are
  drawn without replacement;
- each drawn mask is reduced to ``mask_size²`` (the decoder's low-res grid,
  ``image_size / 4``) by exact area averaging (output cell = the image region of
  the corresponding 4×4 pixels of the resized image), thresholded at coverage
  > 0.5. The area average is computed from the runs (``runs_to_masks``), equal
  to pycocotools' decode followed by the area average but without writing H·W
  bytes per mask (~40× faster at SA-1B's size). A mask thinner than a cell would
  vanish; it keeps instead its cell(s) of highest coverage, so every valid mask
  has at least one pixel to put a point prompt in. ``decode_masks`` gives the
  full-resolution masks (pycocotools) for evaluation;
- masks are padded to ``max_masks`` with ``valid`` False.

Bad data never stops the job: an undecodable JPEG, malformed JSON, a bad RLE, an
RLE or JPEG whose size disagrees with the JSON, or an image without a usable
mask is logged with its file name and skipped before batching; a damaged or
truncated tar keeps every readable member and reports what it lost. All of it
is counted in a ``SkipStats`` for the training loop to report: the losses of
the index when it is built, the samples as the batches are consumed (not as the
read-ahead threads load them), with the sample counts in the iterator's state,
so a resumed job reports the totals an uninterrupted one would.

Batches (``sa1b_dataset``): "image" uint8 [B, S, S, 3], "masks" uint8 {0, 1}
[B, N, M, M], "valid" bool [B, N], "num_masks" int32 [B], "boxes" float32
[B, N, 4] (the exact full-resolution box, x0 y0 x1 y1 in resized-image pixels;
zeros where not valid). The iterator's ``get_state()``/``set_state()`` is a
small JSON-able dict.

Benchmark: ``python -m efficientsam_jax.data.sa1b --benchmark DIR [--batch 8 --steps 10 ...]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import tarfile
import threading
import time
from typing import Any, NamedTuple, Optional, Sequence

import grain
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from efficientsam_jax.common.files import atomic_file
from efficientsam_jax.common.images import ImageSizeError, decode_image
from efficientsam_jax.models.resize import bilinear_taps

logger = logging.getLogger(__name__)

_BLOCK = 512  # tar block size


# ----------------------------------------------------------------------------------------------------------------
# Skip accounting


class SkipStats:
  """Thread-safe counts of what the reader kept and skipped (by reason), and seconds per stage.

  Each skip is logged as a warning naming the file (the first ``log_limit`` per
  reason; after that one summary per 1000 skips of a reason, so a job whose data
  are all bad does not spin silently). ``sa1b_dataset`` counts its samples as they are consumed and keeps
  those counts in its iterator state (restored with ``add``), so they survive a resume.
  """

  def __init__(self, log_limit: int = 20):
    self._lock = threading.Lock()
    self._skipped: collections.Counter = collections.Counter()
    self._seconds: collections.Counter = collections.Counter()
    self._kept = 0
    self._log_limit = log_limit

  def __getstate__(self) -> dict:  # picklable, for a transform sent to grain worker processes
    state = self.__dict__.copy()
    del state["_lock"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def skip(self, reason: str, name: str, detail: str = "") -> None:
    with self._lock:
      self._skipped[reason] += 1
      count = self._skipped[reason]
    if count <= self._log_limit:
      logger.warning("SA-1B: skipping %s (%s)%s", name, reason, f": {detail}" if detail else "")
      if count == self._log_limit:
        logger.warning("SA-1B: further '%s' skips are counted, and summarized every 1000", reason)
    elif count % 1000 == 0:
      logger.warning("SA-1B: %d '%s' skips so far; %s", count, reason, self.summary())

  def keep(self) -> None:
    with self._lock:
      self._kept += 1

  def add(self, kept: int, skipped: dict[str, int]) -> None:
    """Adds counts (negative ones take counts back) without logging: what a resumed iterator restores."""
    with self._lock:
      self._kept += kept
      self._skipped.update(skipped)
      self._skipped = +self._skipped  # drops zero counts

  def add_time(self, stage: str, seconds: float) -> None:
    with self._lock:
      self._seconds[stage] += seconds

  @property
  def kept(self) -> int:
    return self._kept

  @property
  def skipped(self) -> dict[str, int]:
    with self._lock:
      return dict(self._skipped)

  @property
  def seconds(self) -> dict[str, float]:
    with self._lock:
      return dict(self._seconds)

  def as_dict(self) -> dict[str, Any]:
    """JSON-able: {"kept": n, "skipped": {reason: n}}."""
    return {"kept": self.kept, "skipped": self.skipped}

  def summary(self) -> str:
    skipped = self.skipped
    detail = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none"
    return f"SA-1B reader: kept {self.kept} images; skipped {sum(skipped.values())} ({detail})"


class BadSample(ValueError):
  """A sample whose files cannot be used; ``reason`` is the SkipStats key, ``suffix`` the guilty file's."""

  def __init__(self, reason: str, detail: str, suffix: str = ".json"):
    super().__init__(detail)
    self.reason, self.suffix = reason, suffix


# ----------------------------------------------------------------------------------------------------------------
# Sources and the index


def _has_jpg(directory: str) -> bool:
  with os.scandir(directory) as entries:
    return any(e.name.lower().endswith(".jpg") and e.is_file() for e in entries)


def find_sources(paths: Sequence[str]) -> list[str]:
  """Expands paths into sorted sources: ``.tar`` files and folders that directly hold ``.jpg`` files.

  A folder given contributes itself (if it holds images), its ``.tar`` files and
  its subfolders that hold images (one level: a folder of extracted shards).
  """
  found = set()
  for path in paths:
    if os.path.isfile(path) and path.endswith(".tar"):
      found.add(os.path.abspath(path))
    elif os.path.isdir(path):
      if _has_jpg(path):
        found.add(os.path.abspath(path))
      with os.scandir(path) as entries:
        for entry in entries:
          if entry.is_file() and entry.name.endswith(".tar"):
            found.add(os.path.abspath(entry.path))
          elif entry.is_dir() and _has_jpg(entry.path):
            found.add(os.path.abspath(entry.path))
    else:
      raise FileNotFoundError(f"SA-1B source not found or not a .tar/folder: {path}")
  if not found:
    raise ValueError(f"no SA-1B data (.tar shards or folders of sa_*.jpg + sa_*.json) under {list(paths)}")
  return sorted(found)


def process_sources(sources: Sequence[str], process_index: int, process_count: int) -> list[str]:
  """This process's share: ``sorted(sources)[process_index::process_count]``; raises if it is empty."""
  mine = sorted(sources)[process_index::process_count]
  if not mine:
    raise ValueError(f"process {process_index} of {process_count} has no SA-1B source: {len(sources)} source(s) "
                     "for more processes than sources; split the data into more shards")
  return mine


@dataclasses.dataclass
class _Part:
  """The samples of one source: stems sorted; (offset, size) of each member for a tar."""
  path: str
  is_tar: bool
  stems: np.ndarray  # bytes, [n]
  jpg: Optional[np.ndarray] = None  # int64 [n, 2] for tars
  json: Optional[np.ndarray] = None


def _pair(path: str, is_tar: bool, members: dict, stats: SkipStats) -> _Part:
  """Keeps stems that have both a .jpg and a .json; counts the rest."""
  stems = sorted(stem for stem, found in members.items() if len(found) == 2)
  for stem, found in sorted(members.items()):
    if len(found) != 2:
      have, = found
      missing = ".json" if have == ".jpg" else ".jpg"
      stats.skip("unpaired_member", _member_name(path, is_tar, stem + have), f"no readable {missing} beside it")
  part = _Part(path, is_tar, np.array([s.encode() for s in stems], dtype=bytes))
  if is_tar:
    part.jpg = np.array([members[s][".jpg"] for s in stems], np.int64).reshape(-1, 2)
    part.json = np.array([members[s][".json"] for s in stems], np.int64).reshape(-1, 2)
  return part


def _member_name(path: str, is_tar: bool, member: str) -> str:
  return f"{path}:{member}" if is_tar else os.path.join(path, member)


def _index_folder(path: str, stats: SkipStats) -> _Part:
  members: dict[str, dict] = {}
  with os.scandir(path) as entries:
    for entry in entries:
      stem, ext = os.path.splitext(entry.name)
      if ext in (".jpg", ".json") and entry.is_file():
        members.setdefault(stem, {})[ext] = None
  return _pair(path, False, members, stats)


def _all_zero(f, start: int, stop: int) -> bool:
  f.seek(start)
  while start < stop:
    chunk = f.read(min(stop - start, 1 << 20))
    if not chunk:
      return True  # past the end of the file: nothing there
    if chunk.strip(b"\0"):
      return False
    start += len(chunk)
  return True


def _index_tar(path: str, stats: SkipStats) -> _Part:
  """Scans a tar's headers once; keeps every readable member.

  A damaged region is skipped (tarfile resyncs on the next valid header) and a
  truncated member dropped; both are counted, and the pairs they break too.
  """
  file_size = os.path.getsize(path)
  members: dict[str, dict] = {}
  losses = []
  try:
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:", ignore_zeros=True) as tar:
      expected = 0  # where the next header should start if nothing is damaged
      last_truncated = False
      while True:
        try:
          info = tar.next()
        except (tarfile.ReadError, EOFError) as error:  # "unexpected end of data": the archive is cut short
          if not last_truncated:
            losses.append(("damaged_tar", f"unreadable from byte {tar.offset}: {error}"))
          break
        if info is None:
          break
        if info.offset > expected and not _all_zero(raw, expected, info.offset):
          losses.append(("damaged_tar", f"bytes {expected}..{info.offset} unreadable (members lost there)"))
        expected = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
        last_truncated = info.offset_data + info.size > file_size
        if last_truncated:
          losses.append(("truncated_member", f"{info.name}: {info.size} bytes declared, the file ends first"))
          continue
        if not info.isfile():
          continue
        name = info.name[2:] if info.name.startswith("./") else info.name
        stem, ext = os.path.splitext(name)
        if ext in (".jpg", ".json"):
          members.setdefault(stem, {})[ext] = (info.offset_data, info.size)
      if expected < file_size and not last_truncated and not _all_zero(raw, expected, file_size):
        losses.append(("damaged_tar", f"bytes {expected}..{file_size} after the last readable member are not "
                                      "the end-of-archive padding"))
  except (tarfile.ReadError, OSError) as error:  # the first header is bad, or the file cannot be read at all
    stats.skip("unreadable_source", path, str(error))
    return _pair(path, True, {}, stats)
  for reason, detail in losses:
    stats.skip(reason, path, detail)
  part = _pair(path, True, members, stats)
  if losses:
    logger.warning("SA-1B: %s is damaged: indexed the %d readable samples; %d problem(s) reported above",
                   path, len(part.stems), len(losses))
  return part


class RawSample(NamedTuple):
  index: int
  name: str  # source path + member, for messages
  jpg: Optional[bytes]
  json: Optional[bytes]
  error: Optional[str]  # set when the bytes could not be read


def _read_range(path: str, offset: int, size: int) -> bytes:
  with open(path, "rb") as f:
    f.seek(offset)
    data = f.read(size)
  if len(data) != size:
    raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
  return data


class _SkipRecorder:
  """Collects ``skip`` calls (a ``SkipStats`` stand-in) to store them with a cached tar index."""

  def __init__(self):
    self.events: list[tuple[str, str, str]] = []

  def skip(self, reason: str, name: str, detail: str = "") -> None:
    self.events.append((reason, name, detail))


_INDEX_CACHE_VERSION = 1


def _index_tar_cached(path: str, stats: SkipStats, cache_dir: str) -> _Part:
  """``_index_tar`` through a cache file in ``cache_dir`` keyed by the tar's absolute path, size and mtime.

  The file holds the member offsets and the problems the scan found; those are reported again (to
  ``stats``) on every load, as a fresh scan would. A tar that changed gets a new key, so a new scan; one
  that could not be opened at all is not cached (the cause may be passing).
  """
  info = os.stat(path)
  key = hashlib.sha256(f"{_INDEX_CACHE_VERSION}\0{os.path.abspath(path)}\0{info.st_size}\0{info.st_mtime_ns}"
                       .encode()).hexdigest()[:20]
  cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{key}.npz")
  if os.path.exists(cache):
    with np.load(cache) as data:
      part = _Part(path, True, data["stems"].astype(bytes), data["jpg"], data["json"])
      events = json.loads(str(data["events"]))
  else:
    recorder = _SkipRecorder()
    part = _index_tar(path, recorder)
    events = recorder.events
    if not any(reason == "unreadable_source" for reason, _, _ in events):
      with atomic_file(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, stems=part.stems, jpg=part.jpg, json=part.json, events=np.array(json.dumps(events)))
  for event in events:
    stats.skip(*event)
  return part


class SA1BIndex:
  """Random access to the (jpg, json) pairs of a list of sources; a grain ``RandomAccessDataSource``.

  Sample order: sources in the given order, each source's samples sorted by name.
  """

  def __init__(self, sources: Sequence[str], stats: Optional[SkipStats] = None,
               parts: Optional[Sequence[_Part]] = None, cache_dir: str = ""):
    """``parts``: the sources' indexes when already built (``select``); otherwise each source is scanned,
    a tar only if ``cache_dir`` has no index of it (``_index_tar_cached``)."""
    self.sources = list(sources)
    stats = stats if stats is not None else SkipStats()  # losses are logged either way

    def index(source: str) -> _Part:
      if not source.endswith(".tar"):
        return _index_folder(source, stats)
      return _index_tar_cached(source, stats, cache_dir) if cache_dir else _index_tar(source, stats)

    if parts is None:
      parts = [index(s) for s in self.sources]
    self._parts = list(parts)
    self._starts = np.cumsum([0] + [len(p.stems) for p in self._parts])

  def select(self, sources: Sequence[str]) -> "SA1BIndex":
    """The index of some of this index's sources (e.g. one process's share), without scanning them again."""
    by_path = dict(zip(self.sources, self._parts))
    missing = [s for s in sources if s not in by_path]
    if missing:
      raise ValueError(f"{len(missing)} source(s) are not in this index, e.g. {missing[0]}")
    return SA1BIndex(sources, parts=[by_path[s] for s in sources])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f"SA1BIndex({len(self.sources)} sources, {len(self)} samples)"

  def _locate(self, index: int) -> tuple[_Part, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"sample {index} out of range for {self!r}")
    source = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._parts[source], index - int(self._starts[source])

  def name(self, index: int) -> str:
    """``<tar>:sa_<id>`` or ``<folder>/sa_<id>``."""
    part, local = self._locate(index)
    return _member_name(part.path, part.is_tar, part.stems[local].decode())

  def read(self, index: int) -> tuple[bytes, bytes]:
    """(jpg bytes, json bytes) of a sample; OSError if they cannot be read."""
    part, local = self._locate(index)
    stem = part.stems[local].decode()
    if part.is_tar:
      return _read_range(part.path, *part.jpg[local]), _read_range(part.path, *part.json[local])
    with open(os.path.join(part.path, stem + ".jpg"), "rb") as f:
      jpg = f.read()
    with open(os.path.join(part.path, stem + ".json"), "rb") as f:
      return jpg, f.read()

  def __getitem__(self, index: int) -> RawSample:
    name = self.name(index)
    try:
      jpg, js = self.read(index)
    except OSError as error:
      return RawSample(index, name, None, None, str(error))
    return RawSample(index, name, jpg, js, None)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def rle_counts(counts: str | bytes) -> np.ndarray:
  """COCO's compressed RLE string → run lengths (int64), vectorized; ValueError if malformed.

  Each value is a little-endian run of 5-bit groups (chars '0' + group, 0x20 =
  more follow, 0x10 of the last = negative); from the fourth value on, each is
  stored as the difference to the value two before.
  """
  data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
  chars = np.frombuffer(data, np.uint8).astype(np.int64) - 48
  if not len(chars):
    return np.zeros(0, np.int64)
  if chars.min() < 0 or chars.max() > 63:
    raise ValueError("RLE counts contain characters outside '0'..'o'")
  more = (chars & 0x20) != 0
  if more[-1]:
    raise ValueError("RLE counts end inside a value")
  ends = np.flatnonzero(~more)
  starts = np.concatenate([[0], ends[:-1] + 1])
  lengths = ends - starts + 1
  if lengths.max() > 7:
    raise ValueError("RLE counts hold a value wider than 35 bits")
  position = np.arange(len(chars)) - np.repeat(starts, lengths)
  values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
  negative = (chars[ends] & 0x10) != 0
  values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
  out = values.copy()
  out[1::2] = np.cumsum(values[1::2])  # value i > 2 is a difference to value i - 2
  out[2::2] = np.cumsum(values[2::2])
  return out


def _check_rle(segmentation: Any, height: int, width: int) -> tuple[bytes, np.ndarray]:
  """A segmentation checked against the image size → (compressed counts, runs); BadSample if unusable."""
  try:
    size, counts = segmentation["size"], segmentation["counts"]
    size = [int(size[0]), int(size[1])]
  except (KeyError, TypeError, ValueError, IndexError) as error:
    raise BadSample("bad_rle", f"segmentation is not an RLE dict: {error!r}") from None
  if size != [height, width]:
    raise BadSample("size_mismatch", f"RLE size {size} but the image is {height}×{width}")
  if isinstance(counts, list):  # uncompressed RLE
    try:
      runs = np.asarray(counts, np.int64)
    except (TypeError, ValueError, OverflowError) as error:
      raise BadSample("bad_rle", f"uncompressed RLE counts are not integers: {error}") from None
    if runs.ndim != 1:
      raise BadSample("bad_rle", "uncompressed RLE counts are not a flat list")
  else:
    try:
      runs = rle_counts(counts)
    except (ValueError, UnicodeEncodeError, TypeError) as error:
      raise BadSample("bad_rle", str(error)) from None
  if (runs < 0).any() or runs.sum() != height * width:
    raise BadSample("bad_rle", f"RLE runs sum to {runs.sum()} (negative: {(runs < 0).any()}), "
                               f"not {height}×{width} = {height * width}")
  if isinstance(counts, list):
    counts = mask_utils.frPyObjects({"size": size, "counts": [int(v) for v in runs]}, height, width)["counts"]
  elif isinstance(counts, str):
    counts = counts.encode("ascii")
  return counts, runs


def parse_record(json_bytes: bytes) -> tuple[int, int, list]:
  """An SA-1B JSON → (height, width, annotations); BadSample("bad_json") if malformed."""
  try:
    record = json.loads(json_bytes)
    height, width = int(record["image"]["height"]), int(record["image"]["width"])
    annotations = record["annotations"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
    raise BadSample("bad_json", f"{type(error).__name__}: {error}") from None
  if not isinstance(annotations, list) or height <= 0 or width <= 0:
    raise BadSample("bad_json", "no annotation list or no positive image size")
  return height, width, annotations


def decode_masks(json_bytes: bytes) -> np.ndarray:
  """All masks of an SA-1B JSON at full resolution, in file order: uint8 {0, 1} [K, H, W] (checked RLE)."""
  height, width, annotations = parse_record(json_bytes)
  counts = [_check_rle(a.get("segmentation") if isinstance(a, dict) else None, height, width)[0]
            for a in annotations]
  if not counts:
    return np.zeros((0, height, width), np.uint8)
  decoded = mask_utils.decode([{"size": [height, width], "counts": c} for c in counts])
  return np.ascontiguousarray(decoded.transpose(2, 0, 1))


def decode_jpeg(data: bytes, height: int, width: int) -> np.ndarray:
  """JPEG bytes → uint8 [H, W, 3] RGB; BadSample if undecodable or not ``height``×``width``."""
  try:
    return decode_image(data, (height, width))
  except ImageSizeError as error:
    raise BadSample("size_mismatch", f"JPEG: {error} (from the JSON)", ".jpg") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise BadSample("bad_jpeg", f"{type(error).__name__}: {error}", ".jpg") from None


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] → uint8 [size, size, C]: PyTorch's bilinear, no antialias (EfficientSAM's resize), rounded."""
  y0, y1, wy = bilinear_taps(image.shape[0], size)
  x0, x1, wx = bilinear_taps(image.shape[1], size)
  top, bottom = image[y0].astype(np.float32), image[y1].astype(np.float32)  # in place from here: half the time
  bottom -= top
  bottom *= wy[:, None, None]
  top += bottom
  left, right = np.take(top, x0, axis=1), np.take(top, x1, axis=1)
  right -= left
  right *= wx[None, :, None]
  left += right
  return np.rint(left, out=left).astype(np.uint8)  # a blend of uint8 values stays in 0..255


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(owner, position within the owner) of a ragged expansion with ``counts[i]`` items for owner i."""
  owner = np.repeat(np.arange(len(counts)), counts)
  return owner, np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)


def mask_coverage(runs: Sequence[np.ndarray], height: int, width: int, size: int) -> np.ndarray:
  """Exact area fractions of K masks over a ``size``² grid of equal cells, from their RLE runs: float [K, size, size].

  COCO's runs go down the columns; runs of ones are cut at column boundaries into
  one-column pieces [r0, r1). In cell units (u = r·size/H, v = x·size/W) a piece
  covers row cell j by |[j, j+1) ∩ [u0, u1)| (1 inside, fractions at both ends)
  and column cell i by |[i, i+1) ∩ [v0, v1)|; the product is its share of the
  cell's area. Along j that is a sum of four steps per piece (first
  differences), so one ``bincount`` and one ``cumsum`` give every cell. Work is
  O(pieces + K·size²): masks are never decoded to full resolution (pycocotools
  would write H·W bytes per mask; this is ~40× faster at SA-1B's size).
  """
  lengths = np.array([len(r) for r in runs])
  flat = np.concatenate(runs).astype(np.int64)
  mask_of_run, local = _ragged(lengths)
  ends = np.cumsum(flat) - mask_of_run * (height * width)  # each mask's runs sum to H·W
  ones = (local % 2 == 1) & (flat > 0)  # runs alternate zeros, ones, zeros, ...
  mask, starts, ends = mask_of_run[ones], (ends - flat)[ones], ends[ones]
  first_column = starts // height
  run, offset = _ragged((ends - 1) // height - first_column + 1)  # cut at column boundaries
  column = first_column[run] + offset
  top = column * height
  u0 = np.maximum(starts[run] - top, 0) * (size / height)
  u1 = np.minimum(ends[run] - top, height) * (size / height)
  v0, v1 = column * (size / width), (column + 1) * (size / width)
  i0 = np.floor(v0).astype(np.intp)
  piece, offset = _ragged(np.minimum(np.ceil(v1).astype(np.intp), size) - i0)  # the column cells it overlaps
  i = i0[piece] + offset
  weight = np.minimum(v1[piece], i + 1) - np.maximum(v0[piece], i)
  u0, u1, mask = u0[piece], u1[piece], mask[run][piece]
  j0, j1 = np.floor(u0).astype(np.intp), np.floor(u1).astype(np.intp)
  f0, f1 = u0 - j0, u1 - j1
  base = (mask * size + i) * (size + 2)  # row cells j0..j1-1 full, minus f0 at j0, plus f1 at j1: as differences
  index = np.concatenate([base + j0, base + j0 + 1, base + j1, base + j1 + 1])
  values = np.concatenate([1 - f0, f0, f1 - 1, -f1]) * np.tile(weight, 4)
  delta = np.bincount(index, values, minlength=len(runs) * size * (size + 2))
  covered = np.cumsum(delta.reshape(len(runs), size, size + 2), axis=2)[:, :, :size]  # [K, column cell, row cell]
  return covered.transpose(0, 2, 1)


def runs_to_masks(runs: Sequence[np.ndarray], height: int, width: int, size: int) -> np.ndarray:
  """RLE runs of K non-empty H×W masks → uint8 {0, 1} [K, size, size]: area average > 0.5 (module docstring).

  A mask that would vanish keeps its cell(s) of highest coverage instead.
  """
  coverage = mask_coverage(runs, height, width, size)
  masks = coverage > 0.5
  for k in np.flatnonzero(~masks.any(axis=(1, 2))):
    peak = coverage[k].max()
    masks[k] = (coverage[k] >= peak - 1e-9) & (peak > 0)
  return masks.view(np.uint8)


def sample_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
  """The mask-sampling RNG of one sample in one epoch (a resumed run draws the same masks)."""
  return np.random.default_rng([seed, index, epoch])


def load_sample(jpg: bytes, json_bytes: bytes, rng: np.random.Generator, *, image_size: int = 1024,
                mask_size: int = 256, max_masks: int = 64, max_area_fraction: float = 0.9,
                stats: Optional[SkipStats] = None) -> Optional[dict]:
  """One image's files → a training sample (module docstring), None if no mask is usable; BadSample if bad."""
  start = time.perf_counter()
  height, width, annotations = parse_record(json_bytes)
  checked = [_check_rle(a.get("segmentation") if isinstance(a, dict) else None, height, width)
             for a in annotations]
  limit = max_area_fraction * height * width
  usable = [(counts, runs) for counts, runs in checked if 0 < runs[1::2].sum() <= limit]
  if not usable:
    return None
  chosen = [usable[i] for i in rng.choice(len(usable), size=min(max_masks, len(usable)), replace=False)]
  rles = [{"size": [height, width], "counts": counts} for counts, _ in chosen]
  parsed = time.perf_counter()
  image = resize_image(decode_jpeg(jpg, height, width), image_size)
  decoded = time.perf_counter()
  masks = np.zeros((max_masks, mask_size, mask_size), np.uint8)
  masks[:len(chosen)] = runs_to_masks([runs for _, runs in chosen], height, width, mask_size)
  boxes = np.zeros((max_masks, 4), np.float32)
  xywh = mask_utils.toBbox(rles).astype(np.float32)
  scale = np.array([image_size / width, image_size / height] * 2, np.float32)
  boxes[:len(rles)] = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * scale
  if stats is not None:
    end = time.perf_counter()
    stats.add_time("json+rle", parsed - start)
    stats.add_time("jpeg", decoded - parsed)
    stats.add_time("masks", end - decoded)
  return {"image": image, "masks": masks, "valid": np.arange(max_masks) < len(rles),
          "num_masks": np.int32(len(rles)), "boxes": boxes}


class Skip(NamedTuple):
  """What the transform gives instead of a sample that cannot be used (``SkipStats.skip``'s arguments)."""
  reason: str
  name: str
  detail: str


class _Transform:
  """grain ``map_with_index`` function: RawSample at position ``epoch·len + sample`` → sample dict or Skip."""

  def __init__(self, length: int, seed: int, stats: SkipStats, **options):
    self.length, self.seed, self.stats, self.options = length, seed, stats, options
    self.unexpected = 0  # a limit on tracebacks in the log (threads may race on it; harmless)

  def __call__(self, position: int, raw: RawSample) -> dict | Skip:
    epoch = position // self.length
    if raw.error is not None:
      return Skip("read_error", raw.name, raw.error)
    try:
      sample = load_sample(raw.jpg, raw.json, sample_rng(self.seed, raw.index, epoch), stats=self.stats,
                           **self.options)
    except BadSample as error:
      return Skip(error.reason, raw.name + error.suffix, str(error))
    except Exception as error:  # noqa: BLE001 -- a sample must never kill the job; it is counted and logged
      self.unexpected += 1
      if self.unexpected <= 3:
        logger.exception("SA-1B: unexpected error on %s", raw.name)
      return Skip("unexpected_error", raw.name, repr(error))
    if sample is None:
      return Skip("no_valid_mask", raw.name, "no non-empty mask within the area limit")
    return sample


class _Counted(grain.IterDataset):
  """Drops the ``Skip`` items and counts them, and the samples, into ``stats`` as they are consumed."""

  def __init__(self, parent: grain.IterDataset, stats: SkipStats):
    super().__init__(parent)
    self._skip_stats = stats  # not ``_stats``: grain's own attribute

  def __iter__(self) -> grain.DatasetIterator:
    return _CountedIterator(self._parent.__iter__(), self._skip_stats)


class _CountedIterator(grain.DatasetIterator):
  """``_Counted``'s iterator; its state adds this iterator's counts to the parent's state."""

  def __init__(self, parent: grain.DatasetIterator, stats: SkipStats):
    super().__init__(parent)
    self._skip_stats = stats
    self._kept = 0
    self._skips: collections.Counter = collections.Counter()

  def __next__(self) -> dict:
    while True:
      item = next(self._parent)
      if not isinstance(item, Skip):
        self._kept += 1
        self._skip_stats.keep()
        return item
      self._skips[item.reason] += 1
      self._skip_stats.skip(*item)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "kept": self._kept, "skipped": dict(self._skips)}

  def set_state(self, state: dict[str, Any]) -> None:
    if "parent" not in state:  # a checkpoint from before the counts were kept: they restart at zero
      state = {"parent": state, "kept": 0, "skipped": {}}
    self._parent.set_state(state["parent"])
    skips = collections.Counter(state["skipped"])
    change = skips.copy()
    change.subtract(self._skips)  # these counts replace the ones this iterator has added so far
    self._skip_stats.add(state["kept"] - self._kept, change)
    self._kept, self._skips = state["kept"], skips


def sa1b_dataset(sources: Sequence[str], *, local_batch_size: int, seed: int, image_size: int = 1024,
                 mask_size: int = 256, max_masks: int = 64, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, num_epochs: Optional[int] = None, max_area_fraction: float = 0.9,
                 read_threads: int = 4, prefetch_buffer_size: Optional[int] = None,
                 stats: Optional[SkipStats] = None, index: Optional[SA1BIndex] = None) -> grain.IterDataset:
  """Batches of this process's share of SA-1B (module docstring); ``num_epochs`` None repeats forever.

  ``sources``: tar shards and/or folders (expanded by ``find_sources``). Samples are
  shuffled globally over this process's index, reshuffled each epoch. Pass a
  ``SkipStats`` to read the skip counts; the prefetch buffer defaults to two batches. ``index``: an
  ``SA1BIndex`` of all of ``find_sources(sources)`` already built (e.g. to count the samples); this
  process's share is then taken from it instead of scanning its sources again.
  """
  mine = process_sources(find_sources(sources), process_index, process_count)
  stats = stats if stats is not None else SkipStats()
  index = index.select(mine) if index is not None else SA1BIndex(mine, stats)
  if not len(index):
    raise ValueError(f"process {process_index}: no readable sample in {len(mine)} source(s): {stats.summary()}")
  transform = _Transform(len(index), seed, stats, image_size=image_size, mask_size=mask_size, max_masks=max_masks,
                         max_area_fraction=max_area_fraction)
  ds = grain.MapDataset.source(index).map_with_index(transform)  # sees epoch·len + sample (shuffle passes it)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  buffer = prefetch_buffer_size if prefetch_buffer_size is not None else max(2 * local_batch_size, read_threads)
  ds = ds.repeat(num_epochs).to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer))
  return _Counted(ds, stats).batch(local_batch_size, drop_remainder=True)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark


def benchmark(paths: Sequence[str], *, image_size: int = 1024, mask_size: int = 256, max_masks: int = 64,
              batch: int = 8, steps: int = 10, read_threads: int = 4) -> dict:
  """Samples/s of ``sa1b_dataset`` (first batch excluded), plus single-thread milliseconds per stage."""
  start = time.perf_counter()
  sources = find_sources(paths)
  index = SA1BIndex(sources)
  indexed = time.perf_counter() - start
  # One thread, no prefetch (before the pipeline's threads start): where a sample's time goes.
  single = SkipStats()
  count = min(len(index), 8)
  start = time.perf_counter()
  for i in range(count):
    jpg, js = index.read(i)
    load_sample(jpg, js, sample_rng(0, i, 0), image_size=image_size, mask_size=mask_size, max_masks=max_masks,
                stats=single)
  per_sample = (time.perf_counter() - start) / count
  stats = SkipStats()
  ds = sa1b_dataset(paths, local_batch_size=batch, seed=0, image_size=image_size, mask_size=mask_size,
                    max_masks=max_masks, read_threads=read_threads, stats=stats)
  iterator = iter(ds)
  next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  seconds = time.perf_counter() - start
  return {"sources": len(sources), "samples": len(index), "index_seconds": indexed,
          "samples_per_second": steps * batch / seconds, "read_threads": read_threads,
          "single_thread_ms": {"total": 1e3 * per_sample,
                               **{k: 1e3 * v / count for k, v in sorted(single.seconds.items())}},
          "skips": stats.as_dict()}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description="SA-1B reader benchmark")
  parser.add_argument("--benchmark", nargs="+", required=True, metavar="DIR", help="SA-1B tars/folders")
  parser.add_argument("--image-size", type=int, default=1024)
  parser.add_argument("--mask-size", type=int, default=256)
  parser.add_argument("--max-masks", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--threads", type=int, default=4, help="grain read threads")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  result = benchmark(args.benchmark, image_size=args.image_size, mask_size=args.mask_size, max_masks=args.max_masks,
                     batch=args.batch, steps=args.steps, read_threads=args.threads)
  print(json.dumps(result, indent=1))
  print(f"SA-1B reader: {result['samples_per_second']:.2f} samples/s ({args.threads} threads, "
        f"{os.cpu_count()} CPUs, image {args.image_size}, masks {args.max_masks}×{args.mask_size}²)")


if __name__ == "__main__":
  main()
