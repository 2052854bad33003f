"""tf.train.Example encoding, checked against bytes derived by hand from the protobuf wire format."""

import numpy as np
import pytest

from efficientsam_jax.data.example_proto import decode_example, encode_example


def test_wire_format_of_a_known_example():
  # Example{features{feature{key:"a" value{int64_list{value:[1]}}}}}:
  #   Int64List packed [1]       0a 01 01
  #   Feature.int64_list (3)     1a 03 + ...
  #   map entry key "a", value   0a 01 61 12 05 + ...
  #   Features.feature (1)       0a 0a + ...
  #   Example.features (1)       0a 0c + ...
  expected = bytes.fromhex("0a0c" "0a0a" "0a0161" "1205" "1a03" "0a0101")
  assert encode_example({"a": 1}) == expected
  assert decode_example(expected)["a"].tolist() == [1]


def test_float_and_bytes_wire_format():
  # FloatList packed [1.0]: 0a 04 0000803f (6 bytes); Feature.float_list (2): 12 06 + 6 = 8 bytes
  # entry: 0a 01 66 | 12 08 + 8 = 13 bytes; Features: 0a 0d + 13 = 15; Example: 0a 0f + 15.
  assert encode_example({"f": np.float32(1.0)}) == bytes.fromhex("0a0f0a0d0a0166120812060a040000803f")
  # BytesList [b"hi"]: 0a 02 6869 (4); Feature.bytes_list (1): 0a 04 + 4 = 6; entry 0a0162 1206 + 6 = 11
  assert encode_example({"b": b"hi"}) == bytes.fromhex("0a0d0a0b0a01621206" "0a040a026869")


def test_round_trip_of_a_teacher_record():
  features = np.random.default_rng(0).normal(size=(14, 14, 4)).astype(np.float16)
  record = encode_example({
      "image": b"\xff\xd8jpeg-bytes",
      "teacher_features": features.tobytes(),
      "teacher_shape": list(features.shape),
      "source_id": "n01440764_10026",
      "crop_box": np.array([10, 20, 200, 300]),
      "flip": 1,
      "scale": [0.5, 0.25],
  })
  decoded = decode_example(record)
  assert decoded["image"] == [b"\xff\xd8jpeg-bytes"]
  restored = np.frombuffer(decoded["teacher_features"][0], np.float16).reshape(decoded["teacher_shape"])
  np.testing.assert_array_equal(restored, features)
  assert decoded["source_id"] == [b"n01440764_10026"]
  np.testing.assert_array_equal(decoded["crop_box"], [10, 20, 200, 300])
  assert decoded["flip"].tolist() == [1] and decoded["scale"].tolist() == [0.5, 0.25]
  # Deterministic: map entries are written in key order whatever the dict's order.
  assert encode_example({"a": 1, "b": 2}) == encode_example({"b": 2, "a": 1})


def test_unsupported_values():
  with pytest.raises(ValueError, match="cannot encode values of dtype complex"):
    encode_example({"z": np.array([1j])})
