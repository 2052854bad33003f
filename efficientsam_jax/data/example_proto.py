"""``tf.train.Example`` without TensorFlow.

The message classes are built at import time from a descriptor with the same
field numbers and types as TensorFlow's ``example.proto``/``feature.proto``, in
a private descriptor pool (so importing TensorFlow alongside does not clash).
Protobuf messages are identified on the wire by field numbers only, so what
``encode_example`` writes is what ``tf.io.parse_single_example`` reads, and
``decode_example`` reads what TensorFlow writes.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "efficientsam_jax.tfexample"
_F = descriptor_pb2.FieldDescriptorProto


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
  fd = descriptor_pb2.FileDescriptorProto(name="efficientsam_jax/tfexample.proto", package=_PACKAGE,
                                          syntax="proto3")

  def message(name, fields, nested=()):
    msg = fd.message_type.add(name=name)
    for nested_msg in nested:
      msg.nested_type.add().CopyFrom(nested_msg)
    for number, (field_name, field_type, label, type_name, packed) in enumerate(fields, start=1):
      field = msg.field.add(name=field_name, number=number, type=field_type, label=label)
      if type_name:
        field.type_name = type_name
      if packed:
        field.options.packed = True
    return msg

  repeated, optional = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
  message("BytesList", [("value", _F.TYPE_BYTES, repeated, None, False)])
  message("FloatList", [("value", _F.TYPE_FLOAT, repeated, None, True)])
  message("Int64List", [("value", _F.TYPE_INT64, repeated, None, True)])
  feature = message("Feature", [("bytes_list", _F.TYPE_MESSAGE, optional, f".{_PACKAGE}.BytesList", False),
                                ("float_list", _F.TYPE_MESSAGE, optional, f".{_PACKAGE}.FloatList", False),
                                ("int64_list", _F.TYPE_MESSAGE, optional, f".{_PACKAGE}.Int64List", False)])
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
  entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=optional)
  entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=optional,
                  type_name=f".{_PACKAGE}.Feature")
  entry.options.map_entry = True
  message("Features", [("feature", _F.TYPE_MESSAGE, repeated, f".{_PACKAGE}.Features.FeatureEntry", False)],
          nested=[entry])
  message("Example", [("features", _F.TYPE_MESSAGE, optional, f".{_PACKAGE}.Features", False)])
  return fd


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.Example"))

FeatureValue = Union[bytes, str, int, float, Sequence, np.ndarray]


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
  """{name: value} → serialized Example. bytes/str → bytes_list; ints → int64_list; floats → float_list."""
  example = Example()
  for name, value in features.items():
    feature = example.features.feature[name]
    if isinstance(value, (bytes, str)):
      feature.bytes_list.value.append(value.encode() if isinstance(value, str) else value)
      continue
    array = np.asarray(value)
    if array.dtype.kind in "SO" or (array.size and isinstance(array.flat[0], bytes)):
      feature.bytes_list.value.extend(bytes(v) for v in array.reshape(-1))
    elif array.dtype.kind in "biu":
      feature.int64_list.value.extend(int(v) for v in array.reshape(-1))
    elif array.dtype.kind == "f":
      feature.float_list.value.extend(array.reshape(-1).astype(np.float32).tolist())
    else:
      raise ValueError(f"feature {name!r}: cannot encode values of dtype {array.dtype}")
  return example.SerializeToString(deterministic=True)


def decode_example(serialized: bytes) -> dict:
  """Serialized Example → {name: list of bytes | np.int64 array | np.float32 array}."""
  example = Example.FromString(serialized)
  out = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    if kind == "bytes_list":
      out[name] = list(feature.bytes_list.value)
    elif kind == "int64_list":
      out[name] = np.asarray(feature.int64_list.value, np.int64)
    elif kind == "float_list":
      out[name] = np.asarray(feature.float_list.value, np.float32)
    else:
      out[name] = []
  return out
