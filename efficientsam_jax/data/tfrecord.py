"""TFRecord files without TensorFlow, with the CRC checks grain's reader skips.

A TFRecord file is a sequence of records, each framed as::

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little endian; CRC-32C with TensorFlow's mask). ``TFRecordWriter`` writes
files that ``tf.data.TFRecordDataset`` and grain read; ``read_records`` reads
them and, by default, verifies both CRCs, so a truncated or corrupted shard is
reported with its path, record number and byte offset instead of yielding
garbage.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

import google_crc32c

_MASK_DELTA = 0xA282EAD8
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class CorruptRecordError(ValueError):
  """A TFRecord file is truncated or fails a CRC check."""


def masked_crc32c(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class TFRecordWriter:
  """Appends records to an open binary file (use ``common.files.atomic_file`` for atomic shards)."""

  def __init__(self, path: str):
    self.path = path
    self._file: BinaryIO = open(path, "wb")
    self.count = 0

  def write(self, record: bytes) -> None:
    header = _LENGTH.pack(len(record))
    self._file.write(header + _CRC.pack(masked_crc32c(header)) + record + _CRC.pack(masked_crc32c(record)))
    self.count += 1

  def close(self) -> None:
    if not self._file.closed:
      self._file.flush()
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_records(path: str, verify: bool = True) -> Iterator[bytes]:
  """Yields the records of ``path``; raises ``CorruptRecordError`` naming the file on damage."""
  with open(path, "rb") as f:
    index, offset = 0, 0
    while True:
      header = f.read(_LENGTH.size + _CRC.size)
      if not header:
        return
      where = f"{path}: record {index} at byte {offset}"
      if len(header) < _LENGTH.size + _CRC.size:
        raise CorruptRecordError(f"{where}: truncated header ({len(header)} of 12 bytes)")
      (length,) = _LENGTH.unpack_from(header)
      (length_crc,) = _CRC.unpack_from(header, _LENGTH.size)
      if verify and masked_crc32c(header[:_LENGTH.size]) != length_crc:
        raise CorruptRecordError(f"{where}: length CRC mismatch (corrupt or not a TFRecord file)")
      data = f.read(length)
      footer = f.read(_CRC.size)
      if len(data) < length or len(footer) < _CRC.size:
        raise CorruptRecordError(f"{where}: truncated record ({len(data)} of {length} data bytes)")
      if verify and masked_crc32c(data) != _CRC.unpack(footer)[0]:
        raise CorruptRecordError(f"{where}: data CRC mismatch")
      yield data
      index += 1
      offset += _LENGTH.size + 2 * _CRC.size + length


def count_records(path: str) -> int:
  """Reads the whole file, verifying every CRC; returns the number of records."""
  return sum(1 for _ in read_records(path, verify=True))
