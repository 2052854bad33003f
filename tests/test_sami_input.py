"""grain input over teacher records: shapes, per-process shards, and exact resume from iterator state."""

import json
import os

import jax
import numpy as np
import pytest

from efficientsam_jax.data import teacher_records as tr
from efficientsam_jax.data.precompute import make_teacher_fn, precompute
from efficientsam_jax.data.sami_input import sami_dataset
from efficientsam_jax.models.sam_vit import SamEncoderConfig, SamImageEncoder

TEACHER = SamEncoderConfig(img_size=128, embed_dim=32, depth=1, num_heads=2, out_chans=8, window_size=4,
                           global_attn_indexes=(0,))


@pytest.fixture(scope="module")
def shard_paths(tmp_path_factory):
  import skimage.data
  from PIL import Image
  root = tmp_path_factory.mktemp("input")
  for name in ("astronaut", "coffee", "chelsea", "rocket"):
    Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}.png")
  model = SamImageEncoder(TEACHER)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 128, 128, 3), np.float32))["params"]
  teacher_fn = make_teacher_fn(model, params, "upsample", batch_size=8)
  out = str(root / "records")
  summary = precompute(tr.list_image_folder(str(root)), out, teacher_fn, num_shards=4, views_per_image=3,
                       size=64, seed=0, batch_size=8, job_hash="h", log=lambda _: None)
  return [os.path.join(out, name) for name in summary["written"]]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_and_per_process_shards(shard_paths):
  batch = next(iter(sami_dataset(shard_paths, local_batch_size=4, seed=0, shuffle_window=8)))
  assert batch["images"].shape == (4, 64, 64, 3) and batch["images"].dtype == np.uint8  # normalized on device
  assert batch["targets"].shape == (4, 16, 8) and batch["targets"].dtype == np.float16  # as stored
  assert batch["images"].std() > 10  # real pixels, not a constant
  seen = []
  for process in range(2):
    ds = sami_dataset(shard_paths, local_batch_size=1, seed=0, process_index=process, process_count=2,
                      num_epochs=1, shuffle_window=1)
    seen.append({b["targets"].tobytes() for b in ds})
  assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]  # 2 shards × 3 views each, disjoint
  with pytest.raises(ValueError, match="has no shard"):
    sami_dataset(shard_paths[:1], local_batch_size=1, seed=0, process_index=1, process_count=2)


def test_resume_from_iterator_state_gives_the_same_batches(shard_paths):
  ds = sami_dataset(shard_paths, local_batch_size=3, seed=5, shuffle_window=6)
  iterator = iter(ds)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # what the checkpoint stores
  expected = _take(iterator, 4)  # crosses an epoch boundary (12 views = 4 batches)
  resumed = iter(sami_dataset(shard_paths, local_batch_size=3, seed=5, shuffle_window=6))
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 4)):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
