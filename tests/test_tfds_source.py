"""The teacher precompute on a tensorflow-datasets split: a real tiny ArrayRecord dataset, written and read sans TF."""

import io
import os
import sys

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from efficientsam_jax.data import teacher_records as tr
from efficientsam_jax.data.precompute import (build_teacher, get_precompute_config, make_teacher_fn, precompute,
                                               run_precompute)
from efficientsam_jax.data.tfds_source import TfdsImageSource
from efficientsam_jax.data.views import sample_view, view_rng
from efficientsam_jax.models.sam_vit import SamEncoderConfig

# The tiny teacher's shape of tests/test_teacher_records.py.
TEACHER = SamEncoderConfig(img_size=128, embed_dim=32, depth=2, num_heads=2, out_chans=16, window_size=4,
                           global_attn_indexes=(1,))
JOB = dict(views_per_image=2, size=64, seed=3, batch_size=8)
# (file name, crop of the astronaut photograph, format): different sizes, JPEG like ImageNet's, and PNG.
PICTURES = (("n01_1.JPEG", (0, 0, 90, 120), "JPEG"), ("n01_2.JPEG", (100, 50, 64, 64), "JPEG"),
            ("n02_7.png", (200, 200, 150, 100), "PNG"), ("n03_4.JPEG", (300, 10, 70, 200), "JPEG"))


def encoded(crop, image_format: str) -> bytes:
  top, left, height, width = crop
  buffer = io.BytesIO()
  Image.fromarray(skimage.data.astronaut()[top:top + height, left:left + width]).save(buffer, format=image_format)
  return buffer.getvalue()


class EsamTinyImages(tfds.core.GeneratorBasedBuilder):
  """Four photographs with ImageNet's features (image, label, file_name)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=3),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(PICTURES), "validation": self._generate_examples(PICTURES[:1])}

  def _generate_examples(self, pictures):
    for i, (name, crop, image_format) in enumerate(pictures):
      # Encoded bytes: encoding arrays would need TensorFlow.
      yield name, {"image": encoded(crop, image_format), "label": i % 3, "file_name": name}


class EsamTinyUnnamed(tfds.core.GeneratorBasedBuilder):
  """Three photographs under another feature name, without file names."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "photo": tfds.features.Image(encoding_format="png")}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, (_, crop, _) in enumerate(PICTURES[:3]):
      yield i, {"photo": encoded(crop, "PNG")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  root = str(tmp_path_factory.mktemp("tfds"))
  for builder in (EsamTinyImages, EsamTinyUnnamed):
    builder(data_dir=root, file_format="array_record").download_and_prepare()
  assert "tensorflow" not in sys.modules
  return root


def teacher_config():
  """The job's random teacher at TEACHER's size (drawn like run_precompute's, so the draw compiles once)."""
  config = get_precompute_config().teacher
  config.update(dtype="float32", random_config=TEACHER.to_dict())
  return config


@pytest.fixture(scope="module")
def teacher_fn():
  model, params, _ = build_teacher(teacher_config())
  return make_teacher_fn(model, params, "upsample", batch_size=8)


def expected_images() -> dict:
  return {os.path.splitext(name)[0]: np.asarray(Image.open(io.BytesIO(encoded(crop, image_format))).convert("RGB"))
          for name, crop, image_format in PICTURES}


def test_precompute_on_a_tfds_split(tmp_path, data_dir, teacher_fn):
  source = TfdsImageSource("esam_tiny_images", "train", data_dir)
  assert len(source) == 4 and "tensorflow" not in sys.modules
  examples = dict(source[i] for i in range(len(source)))
  pictures = expected_images()
  assert sorted(examples) == ["n01_1", "n01_2", "n02_7", "n03_4"]
  for source_id, image in examples.items():
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, pictures[source_id])
  out = str(tmp_path / "records")
  summary = precompute(source, out, teacher_fn, num_shards=2, job_hash="h", log=lambda _: None, **JOB)
  assert summary["views"] == 8 and tr.verify_shards(out, "h") == {tr.shard_name(0, 2): 4, tr.shard_name(1, 2): 4}
  records = list(tr.iterate_records([os.path.join(out, n) for n in summary["written"]]))
  order = [source[i][0] for i in range(len(source))]  # tfds's (shuffled, stable) order
  assert [(r["source_id"], r["view_index"]) for r in records] == [(s, v) for s in order for v in range(2)]
  for record in records:
    view = sample_view(view_rng(3, record["source_id"], record["view_index"]), pictures[record["source_id"]].shape[:2])
    assert record["crop_box"].tolist() == [view.top, view.left, view.height, view.width]
  # The stored features are the teacher's on the stored (decoded) views, to the bit.
  images = np.stack([r["image"] for r in records])
  np.testing.assert_array_equal(np.stack([r["features"] for r in records]), teacher_fn(images))
  assert TfdsImageSource("esam_tiny_images", "validation", data_dir)[0][0] == "n01_1"
  assert [s for s, _ in TfdsImageSource("esam_tiny_images", "train[1:3]", data_dir)] == order[1:3]


def test_tfds_job_through_config_ids_without_file_names_and_restart(tmp_path, data_dir, capsys):
  config = get_precompute_config()
  config.source.kind = "tfds"
  config.source.tfds.update(name="esam_tiny_unnamed", split="train", data_dir=data_dir, image_feature="photo")
  config.update(output_dir=str(tmp_path / "records"), num_shards=8, **JOB)
  config.teacher = teacher_config()
  summary = run_precompute(config, str(tmp_path))
  assert summary["written"] == [tr.shard_name(k, 3) for k in range(3)]  # num_shards capped at the 3 images
  records = list(tr.iterate_records([os.path.join(summary["output_dir"], n) for n in summary["written"]]))
  assert sorted((r["source_id"], r["view_index"]) for r in records) == [
      (f"train/{i}", v) for i in range(3) for v in range(2)]
  assert run_precompute(config, str(tmp_path))["skipped"] == summary["written"]
  assert "wrote 0 shard(s), skipped 3 finished" in capsys.readouterr().out


def test_errors(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match=r"imagenet2012.*not prepared.*downloads/manual.*"
                     r"tfds build imagenet2012 --data_dir=.* --file_format=array_record"):
    TfdsImageSource("imagenet2012", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"'esam_nothing' is neither a known tfds dataset nor prepared"):
    TfdsImageSource("esam_nothing", "train", str(tmp_path))
  with pytest.raises(ValueError, match=r"no image feature 'image' \(its features: \['photo'\]; image features"):
    TfdsImageSource("esam_tiny_unnamed", "train", data_dir)
  with pytest.raises(ValueError, match=r"Unknown split 'test'"):
    TfdsImageSource("esam_tiny_images", "test", data_dir)
  with pytest.raises(ValueError, match=r"split 'train\[:0\]' is empty"):
    TfdsImageSource("esam_tiny_images", "train[:0]", data_dir)
  with pytest.raises(IndexError):
    TfdsImageSource("esam_tiny_images", "train", data_dir)[4]
  config = get_precompute_config()
  config.source.kind = "hub"
  with pytest.raises(ValueError, match="use 'folder', 'tfds' or 'skimage_samples'"):
    run_precompute(config, str(tmp_path))
