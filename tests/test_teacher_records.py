"""Teacher precompute → TFRecord shards → read back: features bit-exact, provenance, restarts, damage."""

import os

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from efficientsam_jax.data import teacher_records as tr
from efficientsam_jax.data.precompute import make_teacher_fn, precompute
from efficientsam_jax.data.tfrecord import CorruptRecordError
from efficientsam_jax.data.views import sample_view, view_rng
from efficientsam_jax.models.sam_vit import SamEncoderConfig, SamImageEncoder

TEACHER = SamEncoderConfig(img_size=128, embed_dim=32, depth=2, num_heads=2, out_chans=16, window_size=4,
                           global_attn_indexes=(1,))
JOB = dict(views_per_image=2, size=64, seed=3, batch_size=8)


@pytest.fixture(scope="module")
def teacher_fn():
  model = SamImageEncoder(TEACHER)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 128, 128, 3), np.float32))["params"]
  return make_teacher_fn(model, params, "upsample", batch_size=8)


@pytest.fixture()
def sources(tmp_path):
  folder = tmp_path / "images"
  (folder / "cats").mkdir(parents=True)
  Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
  Image.fromarray(skimage.data.coffee()).save(folder / "coffee.jpg")
  Image.fromarray(skimage.data.chelsea()).save(folder / "cats" / "chelsea.png")
  return tr.list_image_folder(str(folder))


def test_round_trip_is_bit_exact_with_provenance(tmp_path, sources, teacher_fn):
  assert [s for s, _ in sources] == ["astronaut", "cats/chelsea", "coffee"]
  out = str(tmp_path / "records")
  summary = precompute(sources, out, teacher_fn, num_shards=2, job_hash="h1", log=lambda _: None, **JOB)
  assert summary["written"] == [tr.shard_name(0, 2), tr.shard_name(1, 2)] and summary["views"] == 6
  assert tr.verify_shards(out, "h1") == {tr.shard_name(0, 2): 4, tr.shard_name(1, 2): 2}
  # The manifest counts source images beside views: the SAMI job's epochs are passes over the images.
  assert {n: e["images"] for n, e in tr.Manifest(out).entries().items()} == {tr.shard_name(0, 2): 2,
                                                                             tr.shard_name(1, 2): 1}
  records = list(tr.iterate_records([os.path.join(out, n) for n in summary["written"]]))
  assert [(r["source_id"], r["view_index"]) for r in records] == [
      ("astronaut", 0), ("astronaut", 1), ("cats/chelsea", 0), ("cats/chelsea", 1), ("coffee", 0), ("coffee", 1)]
  images = np.stack([r["image"] for r in records])
  assert images.shape == (6, 64, 64, 3)
  features = np.stack([r["features"] for r in records])
  assert features.dtype == np.float16 and features.shape == (6, 4, 4, 16)
  # The stored features are the teacher's on the stored (decoded) view, to the bit.
  np.testing.assert_array_equal(features, teacher_fn(images))
  astronaut = skimage.data.astronaut()
  view = sample_view(view_rng(3, "astronaut", 1), astronaut.shape[:2])
  assert records[1]["crop_box"].tolist() == [view.top, view.left, view.height, view.width]
  assert records[1]["flip"] == view.flip


def test_restart_skips_finished_shards_and_leaves_no_partial_file(tmp_path, sources, teacher_fn):
  out = str(tmp_path / "records")
  calls = []

  def dies_on_second_shard(views):
    calls.append(len(views))
    if len(calls) == 2:
      raise KeyboardInterrupt("preempted")
    return teacher_fn(views)

  with pytest.raises(KeyboardInterrupt):
    precompute(sources, out, dies_on_second_shard, num_shards=2, job_hash="h1", log=lambda _: None, **JOB)
  assert sorted(os.listdir(out)) == ["manifest-00000.json", tr.shard_name(0, 2)]  # no half-written shard
  logs = []
  summary = precompute(sources, out, teacher_fn, num_shards=2, job_hash="h1", log=logs.append, **JOB)
  assert summary["skipped"] == [tr.shard_name(0, 2)] and summary["written"] == [tr.shard_name(1, 2)]
  assert any("ETA" in line and "views/s" in line for line in logs)
  with pytest.raises(ValueError, match="written with another configuration"):
    precompute(sources, out, teacher_fn, num_shards=2, job_hash="h2", log=lambda _: None, **JOB)


def test_multi_process_shard_assignment(tmp_path, sources, teacher_fn):
  out = str(tmp_path / "records")
  for process in range(2):
    precompute(sources, out, teacher_fn, num_shards=3, job_hash="h", process_index=process, process_count=2,
               log=lambda _: None, **JOB)
  assert sorted(os.listdir(out)) == ["manifest-00000.json", "manifest-00001.json"] + [
      tr.shard_name(k, 3) for k in range(3)]
  assert sum(tr.verify_shards(out).values()) == 6


def test_damaged_shard_is_named(tmp_path, sources, teacher_fn):
  out = str(tmp_path / "records")
  precompute(sources, out, teacher_fn, num_shards=1, job_hash="h", log=lambda _: None, **JOB)
  path = os.path.join(out, tr.shard_name(0, 1))
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-100])
  with pytest.raises(CorruptRecordError, match=r"teacher-00000-of-00001\.tfrecord: record 5 .* truncated"):
    list(tr.iterate_records([path]))
  with pytest.raises(CorruptRecordError, match="teacher-00000-of-00001"):
    tr.verify_shards(out)


def test_bad_inputs(tmp_path, sources, teacher_fn):
  with pytest.raises(FileNotFoundError, match="image folder not found"):
    tr.list_image_folder(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images"):
    tr.list_image_folder(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="num_shards must be in 1..3"):
    precompute(sources, str(tmp_path / "o"), teacher_fn, num_shards=4, job_hash="h", **JOB)


def test_smoke_job_through_main_and_restart(tmp_path, capsys):
  from efficientsam_jax import main
  from conftest import load_config
  config = load_config("teacher_precompute", "smoke")
  main.run(config, str(tmp_path))
  out = str(tmp_path / "teacher_records")
  counts = tr.verify_shards(out)
  assert sum(counts.values()) == 7 * 2  # bundled photographs × views
  assert "RANDOM, UNTRAINED" in capsys.readouterr().out
  main.run(config, str(tmp_path))
  assert "wrote 0 shard(s), skipped 2 finished" in capsys.readouterr().out
  record = next(tr.iterate_records([os.path.join(out, tr.shard_name(0, 2))]))
  assert record["image"].shape == (224, 224, 3) and record["features"].shape == (14, 14, 256)


def test_bfloat16_teacher_computes_in_bfloat16():
  """The dtype option must reach the model's matmuls, not only cast the input (fp32 params would promote it back)."""
  import re
  import jax.numpy as jnp
  model = SamImageEncoder(TEACHER)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 128, 128, 3), np.float32))["params"]
  views = np.zeros((8, 64, 64, 3), np.uint8)
  for dtype, expected in ((jnp.bfloat16, "bf16"), (jnp.float32, "f32")):
    text = make_teacher_fn(model, params, "upsample", batch_size=8, dtype=dtype).lower(views).as_text()
    operands = re.findall(r"dot_general.*: \(tensor<[0-9x]*x(\w+)>, tensor<[0-9x]*x(\w+)>\)", text)
    assert len(operands) >= 2 * TEACHER.depth  # every attention and MLP matmul is there
    resize_matmuls = [o for o in operands if o != (expected, expected)]
    assert len(resize_matmuls) <= 4, sorted(set(operands))  # only the fp32 resizes of views / position tables
