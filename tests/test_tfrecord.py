"""TFRecord framing and CRC verification, checked against files another TFRecord writer made."""

import glob
import os

import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from efficientsam_jax.data.tfrecord import CorruptRecordError, TFRecordWriter, count_records, read_records


def test_round_trip(tmp_path):
  path = str(tmp_path / "a.tfrecord")
  records = [b"", b"x", os.urandom(1000), b"abc" * 5000]
  with TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  assert writer.count == 4
  assert list(read_records(path)) == records
  assert count_records(path) == 4


def test_reads_and_verifies_files_written_by_tensorboardx(tmp_path):
  """tensorboardX writes TensorFlow's TFRecord framing with masked CRC-32C: our checks accept it."""
  with SummaryWriter(str(tmp_path)) as writer:
    for step in range(3):
      writer.add_scalar("loss", 1.0 / (step + 1), step)
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  events = [event_pb2.Event.FromString(r) for r in read_records(path, verify=True)]
  assert [e.step for e in events if e.summary.value] == [0, 1, 2]


def test_our_files_match_tensorboardx_framing(tmp_path):
  """The same payload framed by tensorboardX's writer and ours gives the same bytes."""
  from tensorboardX.record_writer import RecordWriter
  theirs, ours = str(tmp_path / "theirs"), str(tmp_path / "ours")
  payload = os.urandom(333)
  writer = RecordWriter(theirs)
  writer.write(payload)
  writer.close()
  with TFRecordWriter(ours) as mine:
    mine.write(payload)
  with open(theirs, "rb") as a, open(ours, "rb") as b:
    assert a.read() == b.read()


def test_corruption_and_truncation_name_the_file(tmp_path):
  path = str(tmp_path / "shard-00003.tfrecord")
  with TFRecordWriter(path) as writer:
    for i in range(3):
      writer.write(bytes([i]) * 100)
  data = bytearray(open(path, "rb").read())
  flipped = bytearray(data)
  flipped[116 + 12 + 50] ^= 0xFF  # a data byte of record 1
  open(path, "wb").write(flipped)
  with pytest.raises(CorruptRecordError, match=r"shard-00003\.tfrecord: record 1 at byte 116: data CRC mismatch"):
    count_records(path)
  assert len(list(read_records(path, verify=False))) == 3  # grain-like reading would not notice
  open(path, "wb").write(data[:-30])
  with pytest.raises(CorruptRecordError, match=r"record 2 at byte 232: truncated record"):
    count_records(path)
  open(path, "wb").write(data[:5])
  with pytest.raises(CorruptRecordError, match="truncated header"):
    count_records(path)
