"""SA-1B input: synthetic data round trip (folder and tar), mask resizing, sampling, resume, bad data, damaged tars."""

import json
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from efficientsam_jax.data import sa1b
from efficientsam_jax.data import sa1b_synth as synth
from efficientsam_jax.models.resize import resize_matrix

SEED, HEIGHT, WIDTH, COUNT = 7, 48, 64, 10
SMALL = dict(image_size=32, mask_size=8, max_masks=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sa1b")
  folder, tars = str(root / "folder"), str(root / "tars")
  synth.write_sa1b(folder, COUNT, seed=SEED, size=(HEIGHT, WIDTH))
  synth.write_sa1b(tars, COUNT, seed=SEED, size=(HEIGHT, WIDTH), tar=True, images_per_tar=4)
  return folder, tars


def _by_stem(index):
  return {index.name(i).replace(":", "/").rsplit("/", 1)[1]: index.read(i) for i in range(len(index))}


def _rle(mask: np.ndarray) -> dict:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode()}


def _record(masks, height, width) -> bytes:
  return json.dumps({"image": {"image_id": 1, "width": width, "height": height, "file_name": "sa_1.jpg"},
                     "annotations": [{"id": k, "segmentation": _rle(m)} for k, m in enumerate(masks)]}).encode()


def _area_reference(mask: np.ndarray, size: int) -> np.ndarray:
  """Coverage of each of size² equal cells, by brute-force overlap lengths."""
  def matrix(length):
    out = np.zeros((size, length))
    for j in range(size):
      lo, hi = j * length / size, (j + 1) * length / size
      for i in range(length):
        out[j, i] = max(0.0, min(hi, i + 1) - max(lo, i))
    return out
  height, width = mask.shape
  return matrix(height) @ mask @ matrix(width).T * (size * size / (height * width))


def test_rle_counts_matches_pycocotools_and_rejects_bad_strings():
  rng = np.random.default_rng(0)
  for trial in range(200):
    h, w = (int(v) for v in rng.integers(1, 40, 2))
    mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
    mask[:] = {0: 0, 1: 1}.get(trial % 9, mask)  # some all-empty and all-full masks
    runs = sa1b.rle_counts(mask_utils.encode(np.asfortranarray(mask))["counts"])
    assert runs.sum() == h * w
    np.testing.assert_array_equal(np.repeat(np.arange(len(runs)) % 2, runs).reshape(w, h).T, mask)
  for bad in ("0 1", "~~", "00" + chr(48 + 0x20)):  # outside '0'..'o', ends inside a value
    with pytest.raises(ValueError):
      sa1b.rle_counts(bad)
  good = _rle(np.eye(5))
  with pytest.raises(sa1b.BadSample, match="sum"):
    sa1b._check_rle({"size": [5, 5], "counts": good["counts"] + "5"}, 5, 5)
  with pytest.raises(sa1b.BadSample) as error:
    sa1b._check_rle(good, 5, 6)
  assert error.value.reason == "size_mismatch"


def test_folder_and_tar_give_the_same_samples_and_exact_masks(data):
  folder, tars = data
  assert len(sa1b.find_sources([tars])) == 3 and sa1b.find_sources([folder]) == [os.path.abspath(folder)]
  from_folder, from_tars = (_by_stem(sa1b.SA1BIndex(sa1b.find_sources([p]))) for p in data)
  assert sorted(from_folder) == sorted(from_tars) == sorted(f"sa_{i}" for i in range(1, COUNT + 1))
  for stem, (jpg, js) in from_folder.items():
    assert from_tars[stem] == (jpg, js)
    image_id = int(stem[3:])
    _, expected = synth.synth_image((SEED, image_id), (HEIGHT, WIDTH))
    np.testing.assert_array_equal(sa1b.decode_masks(js), expected)  # exact at native size
    assert sa1b.decode_jpeg(jpg, HEIGHT, WIDTH).shape == (HEIGHT, WIDTH, 3)
    a, b = (sa1b.load_sample(*raw, sa1b.sample_rng(0, image_id, 0), **SMALL) for raw in (from_tars[stem], (jpg, js)))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_image_and_mask_resize_pad_and_valid():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  reference = np.einsum("ah,hwc,bw->abc", resize_matrix(40, 32, "bilinear"), image.astype(np.float64),
                        resize_matrix(60, 32, "bilinear"))
  assert np.abs(sa1b.resize_image(image, 32).astype(float) - reference).max() <= 0.5 + 1e-3
  # Run-length area average == brute force on decoded masks: down- and upsampling, odd and thin sizes.
  for (h, w, size) in ((37, 53, 16), (10, 7, 12), (5, 90, 8), (90, 5, 8), (1, 1, 3), (64, 64, 16)):
    masks = [np.zeros((h, w)) for _ in range(4)]
    masks[0][:] = 1
    masks[1][-1, -1] = masks[2][0, 0] = 1
    masks[3][h // 5:h // 2 + 1, w // 3:] = 1
    masks[3][rng.random((h, w)) < 0.1] = 1
    runs = [sa1b.rle_counts(_rle(m)["counts"]) for m in masks]
    expected = [_area_reference(mask_utils.decode(_rle(m)).astype(float), size) for m in masks]
    np.testing.assert_allclose(sa1b.mask_coverage(runs, h, w, size), expected, atol=1e-9)
  # 40×60 → 8×8 cells of 5×7.5 pixels.
  quarter = np.zeros((40, 60))
  quarter[:20, :30] = 1  # exactly cells [0:4, 0:4]
  line = np.zeros((40, 60))
  line[7, :] = 1  # 1/5 of cell row 1: would vanish, keeps its best cells
  huge = np.ones((40, 60))
  huge[:2, :2] = 0  # > 90% of the image: skipped
  empty = np.zeros((40, 60))
  sample = sa1b.load_sample(synth.encode_jpeg(image), _record([quarter, line, huge, empty], 40, 60),
                            sa1b.sample_rng(0, 0, 0), **SMALL)
  assert sample["image"].shape == (32, 32, 3) and sample["image"].dtype == np.uint8
  assert sample["masks"].shape == (4, 8, 8) and sample["masks"].dtype == np.uint8
  np.testing.assert_array_equal(sample["valid"], [True, True, False, False])
  assert sample["num_masks"] == 2 and not sample["masks"][2:].any() and not sample["boxes"][2:].any()
  expected_quarter, expected_line = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
  expected_quarter[:4, :4] = 1
  expected_line[1] = 1
  first = int(sample["masks"][0, 0, 0] == 0)  # the draw order is random: which one is the quarter?
  np.testing.assert_array_equal(sample["masks"][first], expected_quarter)
  np.testing.assert_array_equal(sample["masks"][1 - first], expected_line)
  np.testing.assert_allclose(sample["boxes"][first], [0, 0, 16, 16])
  np.testing.assert_allclose(sample["boxes"][1 - first], [0, 7 * 0.8, 32, 8 * 0.8], rtol=1e-6)  # x·32/60, y·32/40
  assert sa1b.load_sample(synth.encode_jpeg(image), _record([huge, empty], 40, 60), sa1b.sample_rng(0, 0, 0),
                          **SMALL) is None


def test_batches_are_deterministic_and_resume_from_iterator_state(data):
  _, tars = data

  def dataset(**kw):
    return sa1b.sa1b_dataset([tars], local_batch_size=3, seed=3, read_threads=2, **SMALL, **kw)

  first = iter(dataset())
  batches = [next(first) for _ in range(2)]
  assert batches[0]["image"].shape == (3, 32, 32, 3) and batches[0]["masks"].shape == (3, 4, 8, 8)
  assert batches[0]["valid"].dtype == bool and batches[0]["num_masks"].dtype == np.int32
  np.testing.assert_array_equal(batches[0]["valid"].sum(1), batches[0]["num_masks"])
  state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
  expected = [next(first) for _ in range(4)]  # crosses the epoch boundary (10 samples)
  resumed = iter(dataset())
  resumed.set_state(state)
  again = iter(dataset())
  for want, got, fresh in zip(expected, [next(resumed) for _ in range(4)], [next(again) for _ in range(6)][2:]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
      np.testing.assert_array_equal(want[key], fresh[key])
  # Two epochs in order: the same images, masks drawn anew each epoch.
  samples = list(sa1b.sa1b_dataset([tars], local_batch_size=1, seed=3, shuffle=False, num_epochs=2, read_threads=1,
                                   **SMALL))
  assert len(samples) == 2 * COUNT
  assert all(np.array_equal(samples[i]["image"], samples[i + COUNT]["image"]) for i in range(COUNT))
  assert any(not np.array_equal(samples[i]["masks"], samples[i + COUNT]["masks"]) for i in range(COUNT))


def test_bad_files_are_skipped_counted_named_and_resumed(data, tmp_path, caplog):
  folder = str(tmp_path / "bad")
  shutil.copytree(data[0], folder)

  def edit_json(stem, change):
    path = os.path.join(folder, stem + ".json")
    with open(path) as f:
      record = json.load(f)
    change(record)
    with open(path, "w") as f:
      json.dump(record, f)

  with open(os.path.join(folder, "sa_2.jpg"), "r+b") as f:
    f.truncate(os.path.getsize(f.name) // 3)  # truncated JPEG
  with open(os.path.join(folder, "sa_3.json"), "w") as f:
    f.write('{"image": {"width": 64, "height"')  # malformed JSON
  edit_json("sa_4", lambda r: r["annotations"][0]["segmentation"].update(counts="?!\x7f"))  # bad RLE
  edit_json("sa_5", lambda r: r["annotations"][0]["segmentation"].update(size=[HEIGHT + 1, WIDTH]))
  edit_json("sa_6", lambda r: r.update(annotations=[]))  # nothing to train on
  with open(os.path.join(folder, "sa_7.jpg"), "wb") as f:
    f.write(b"not a jpeg")
  os.remove(os.path.join(folder, "sa_8.json"))  # an image without its JSON
  stats = sa1b.SkipStats()
  with caplog.at_level(logging.WARNING):
    batches = list(sa1b.sa1b_dataset([folder], local_batch_size=1, seed=0, num_epochs=1, read_threads=2,
                                     stats=stats, **SMALL))
  assert len(batches) == 3 and stats.kept == 3  # sa_1, sa_9, sa_10
  assert stats.skipped == {"bad_jpeg": 2, "bad_json": 1, "bad_rle": 1, "size_mismatch": 1, "no_valid_mask": 1,
                           "unpaired_member": 1}
  for name in ("sa_2.jpg", "sa_3.json", "sa_4.json", "sa_5.json", "sa_6", "sa_7.jpg", "sa_8.jpg"):
    assert os.path.join(folder, name) in caplog.text
  assert "bad_jpeg 2" in stats.summary()
  # Counted as consumed, with the counts in the iterator state: stopped after two batches and resumed with fresh
  # stats, the totals are the uninterrupted run's (the read-ahead threads have loaded more by then).
  def dataset(stats):
    return sa1b.sa1b_dataset([folder], local_batch_size=1, seed=0, num_epochs=1, read_threads=2, stats=stats,
                             **SMALL)
  first, again = sa1b.SkipStats(), sa1b.SkipStats()
  iterator = iter(dataset(first))
  next(iterator), next(iterator)
  state = iterator.get_state()
  # The index's one loss + the samples consumed up to the second kept one, whatever the threads read ahead.
  assert first.kept == 2 and 0 < sum(state["skipped"].values()) < 6
  assert sum(first.skipped.values()) == 1 + sum(state["skipped"].values())
  resumed = iter(dataset(again))
  resumed.set_state(state)
  assert again.as_dict() == first.as_dict()
  assert len(list(resumed)) == 1 and again.as_dict() == stats.as_dict()
  old = iter(dataset(sa1b.SkipStats()))  # an earlier version's state: the position alone
  old.set_state(state["parent"])
  assert len(list(old)) == 1


def _tar_members(path):
  with tarfile.open(path) as tar:
    return [(m.name, m.offset, m.offset_data, m.size) for m in tar]


def test_damaged_tars_keep_the_readable_members_and_report_the_loss(data, tmp_path, caplog):
  source = os.path.join(data[1], "sa_000000.tar")  # sa_1..sa_4
  members = _tar_members(source)
  with open(source, "rb") as f:
    payload = f.read()
  good = _by_stem(sa1b.SA1BIndex([source]))

  truncated = str(tmp_path / "truncated.tar")  # cut inside sa_4.json's data
  name, _, data_start, size = members[7]
  assert name == "sa_4.json"
  with open(truncated, "wb") as f:
    f.write(payload[:data_start + size // 2])
  damaged = str(tmp_path / "damaged.tar")  # sa_2.jpg's header overwritten
  _, header, _, _ = members[2]
  with open(damaged, "wb") as f:
    f.write(payload[:header] + b"\xff" * 512 + payload[header + 512:])
  empty = str(tmp_path / "empty.tar")
  open(empty, "wb").close()

  stats = sa1b.SkipStats()
  with caplog.at_level(logging.WARNING):
    index = sa1b.SA1BIndex([truncated, damaged, empty], stats)
  assert len(index) == 3 + 3
  for i in range(len(index)):
    stem = index.name(i).rsplit(":", 1)[1]
    assert index.read(i) == good[stem]
  assert {index.name(i) for i in range(3)} == {f"{truncated}:sa_{k}" for k in (1, 2, 3)}
  assert {index.name(i) for i in range(3, 6)} == {f"{damaged}:sa_{k}" for k in (1, 3, 4)}
  assert stats.skipped == {"truncated_member": 1, "unpaired_member": 2, "damaged_tar": 1, "unreadable_source": 1}
  assert f"{truncated}:sa_4.jpg" in caplog.text and f"{damaged}:sa_2.json" in caplog.text
  assert "indexed the 3 readable samples" in caplog.text


def test_tar_index_cache_skips_the_scan_and_reports_the_same_losses(data, tmp_path, monkeypatch):
  source = os.path.join(data[1], "sa_000000.tar")
  with open(source, "rb") as f:
    payload = f.read()
  _, header, _, _ = _tar_members(source)[2]
  good, damaged = str(tmp_path / "good.tar"), str(tmp_path / "damaged.tar")
  with open(good, "wb") as f:
    f.write(payload)
  with open(damaged, "wb") as f:  # sa_2.jpg's header overwritten
    f.write(payload[:header] + b"\xff" * 512 + payload[header + 512:])
  cache = str(tmp_path / "index_cache")
  scans = []
  real_scan = sa1b._index_tar
  monkeypatch.setattr(sa1b, "_index_tar", lambda path, stats: scans.append(path) or real_scan(path, stats))

  first_stats, again_stats = sa1b.SkipStats(), sa1b.SkipStats()
  first = sa1b.SA1BIndex([good, damaged], first_stats, cache_dir=cache)
  assert scans == [good, damaged] and len(os.listdir(cache)) == 2
  again = sa1b.SA1BIndex([good, damaged], again_stats, cache_dir=cache)
  assert scans == [good, damaged]  # read from the cache, not scanned
  assert len(again) == len(first) == 4 + 3
  assert [again.name(i) for i in range(len(again))] == [first.name(i) for i in range(len(first))]
  assert [again.read(i) for i in range(len(again))] == [first.read(i) for i in range(len(first))]
  assert again_stats.skipped == first_stats.skipped == {"damaged_tar": 1, "unpaired_member": 1}

  # A tar that changed (new modification time) is scanned again, under a new key.
  info = os.stat(good)
  os.utime(good, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
  sa1b.SA1BIndex([good, damaged], cache_dir=cache)
  assert scans == [good, damaged, good] and len(os.listdir(cache)) == 3


def test_multi_host_split_is_disjoint_and_covering(data):
  _, tars = data
  sources = sa1b.find_sources([tars])
  indexes = [sa1b.SA1BIndex(sa1b.process_sources(sources, p, 2)) for p in range(2)]
  assert [len(i.sources) for i in indexes] == [2, 1]
  names = [{index.name(i) for i in range(len(index))} for index in indexes]
  assert not names[0] & names[1] and len(names[0] | names[1]) == COUNT
  with pytest.raises(ValueError, match="has no SA-1B source"):
    sa1b.sa1b_dataset([tars], local_batch_size=1, seed=0, process_index=3, process_count=4)
  # A share selected from the index of every source equals a fresh index of that share.
  everything = sa1b.SA1BIndex(sources)
  for process, index in enumerate(indexes):
    share = everything.select(sa1b.process_sources(sources, process, 2))
    assert [share.read(i) for i in range(len(share))] == [index.read(i) for i in range(len(index))]
  with pytest.raises(ValueError, match="not in this index"):
    indexes[0].select(indexes[1].sources)
  first = next(iter(sa1b.sa1b_dataset([tars], local_batch_size=2, seed=0, image_size=32, mask_size=8,
                                      max_masks=4, index=everything)))
  again = next(iter(sa1b.sa1b_dataset([tars], local_batch_size=2, seed=0, image_size=32, mask_size=8,
                                      max_masks=4)))
  np.testing.assert_array_equal(first["masks"], again["masks"])


def test_clis(data, tmp_path, capsys):
  synth.main(["--output", str(tmp_path / "cli"), "--num-images", "3", "--tar", "--images-per-tar", "2",
              "--size", "40x30", "--seed", "1"])
  assert sorted(os.listdir(tmp_path / "cli")) == ["sa_000000.tar", "sa_000001.tar"]
  sa1b.main(["--benchmark", data[1], "--image-size", "32", "--mask-size", "8", "--max-masks", "4", "--batch", "2",
             "--steps", "2", "--threads", "2"])
  assert "samples/s" in capsys.readouterr().out
