"""A tensorflow-datasets split as a source of the teacher precompute job, read without TensorFlow.

``TfdsImageSource(name, split, data_dir)`` is a random-access sequence of
``(source_id, uint8 RGB image [H, W, 3])`` over a dataset prepared in the
ArrayRecord file format (``tfds.data_source`` reads those with NumPy and
``array_record``; TFRecord-format datasets need TensorFlow to read). Examples are
decoded only when indexed, so each process of the precompute job reads just the
index ranges of its own shards. The image bytes are decoded with PIL and
converted to RGB, like the image-folder source. ``source_id`` is the stem of
the ``file_name`` feature when the dataset has one (ImageNet:
``n01440764_10026``), else ``<split>/<index>``.

Preparing ImageNet-1K (once, on a machine with TensorFlow: the imagenet2012
builder and the ``tfds`` command need it) — put ``ILSVRC2012_img_train.tar`` and
``ILSVRC2012_img_val.tar`` (from https://image-net.org/download-images) into
``<data_dir>/downloads/manual/``, then
``tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record``.
Reading the result needs only tensorflow-datasets, array_record and PIL.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGENET_HELP = (
    "To prepare ImageNet-1K (needs TensorFlow once, on any machine): put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar (https://image-net.org/download-images) into {data_dir}/downloads/manual/, then run "
    "`pip install tensorflow && tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record`.")
GENERIC_HELP = ("Prepare it in the ArrayRecord format (tfds needs TensorFlow to build most datasets): "
                "`tfds build {name} --data_dir={data_dir} --file_format=array_record`.")


def _help(name: str, data_dir: str) -> str:
  template = IMAGENET_HELP if name.split("/")[0].split(":")[0] == "imagenet2012" else GENERIC_HELP
  return template.format(name=name, data_dir=data_dir)


def open_builder(name: str, data_dir: str = ""):
  """The prepared ``tfds`` builder of ``name`` in ``data_dir`` ("": tfds's default); clear errors otherwise."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise FileNotFoundError(f"tfds dataset {name!r} is neither a known tfds dataset nor prepared in {where}. "
                            + _help(name, where)) from error
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {where} "
                            f"(no {builder.data_dir}/dataset_info.json). " + _help(name, where))
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(f"tfds dataset {name!r} in {builder.data_dir} is in the {builder.info.file_format.value} "
                     "format; reading it without TensorFlow needs array_record. " + _help(name, where))
  return builder


class TfdsImageSource(Sequence):
  """(source_id, uint8 RGB image) of a tfds split, random access, decoded when indexed."""

  def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir: str = "",
               image_feature: str = "image", id_feature: str = "file_name"):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = open_builder(name, data_dir)
    features = builder.info.features
    if image_feature not in features or not isinstance(features[image_feature], tfds.features.Image):
      images = [k for k, v in features.items() if isinstance(v, tfds.features.Image)]
      raise ValueError(f"tfds dataset {builder.info.full_name} has no image feature {image_feature!r} "
                       f"(its features: {sorted(features)}; image features: {images})")
    try:
      count = builder.info.splits[split].num_examples
    except ValueError as error:  # unknown split, or a slice the split cannot give
      raise ValueError(f"tfds dataset {builder.info.full_name} in {builder.data_dir}: {error}") from error
    if count == 0:
      raise ValueError(f"tfds dataset {builder.info.full_name}: split {split!r} is empty")
    self.name, self.split, self.full_name = name, split, builder.info.full_name
    self.image_feature = image_feature
    self.id_feature = id_feature if id_feature in features else None
    self._examples = builder.as_data_source(split=split, decoders={image_feature: tfds.decode.SkipDecoding()})
    if len(self._examples) != count:
      raise ValueError(f"tfds dataset {self.full_name}: split {split!r} has {len(self._examples)} examples, "
                       f"its dataset_info.json says {count}")

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f"TfdsImageSource indices are integers, got {index!r}")
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    index = int(index) % len(self)
    example = self._examples[index]
    if self.id_feature is None:
      source_id = f"{self.split}/{index}"
    else:
      value = example[self.id_feature]
      source_id = os.path.splitext(value.decode() if isinstance(value, bytes) else str(value))[0]
    try:
      with Image.open(io.BytesIO(example[self.image_feature])) as picture:
        image = np.asarray(picture.convert("RGB"))
    except OSError as error:
      raise ValueError(f"cannot decode image {index} ({source_id}) of {self.full_name} {self.split}: "
                       f"{error}") from error
    return source_id, image

  def fingerprint(self) -> dict:
    """What identifies the examples (for the job's config hash): dataset, version, split, size."""
    return {"tfds": self.full_name, "split": self.split, "num_examples": len(self),
            "image_feature": self.image_feature, "id_feature": self.id_feature}
