"""The teacher precompute job: views of every source image → teacher features → TFRecord shards.

Each process writes only its own shards (shard k belongs to process
k mod process_count); a shard appears whole (temporary file + rename) and is
then recorded in the process's manifest; a restarted job skips recorded
shards. The teacher runs jitted and data-parallel over all local devices on
fixed-size batches (the last one padded), so it compiles once.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Iterator, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from efficientsam_jax.common.images import decode_image, encode_jpeg, load_rgb
from efficientsam_jax.common.multihost import barrier
from efficientsam_jax.data import teacher_records as tr
from efficientsam_jax.data.views import render_view, sample_view, view_rng
from efficientsam_jax.models.efficient_sam import normalize_uint8
from efficientsam_jax.models.sam_vit import teacher_features
from efficientsam_jax.train import sharding
from efficientsam_jax.train.metrics import format_eta


def make_teacher_fn(model, params, mode: str, batch_size: int, dtype=jnp.float32,
                    attention: str = "xla") -> Callable:
  """uint8 views [n ≤ batch_size, S, S, 3] → float16 features [n, g, g, C], data-parallel over devices.

  ``dtype`` is the teacher's compute dtype (parameters stay as given, cast per
  matmul): bfloat16 runs the GEMMs on the tensor cores' bf16 path. ``attention``:
  "xla" or "cudnn" (``sam_vit.SamAttention``: fused, the logits never materialized).
  """
  model = model.clone(dtype=dtype, attention=attention)
  mesh = sharding.make_mesh({"data": -1}, jax.local_devices())
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} must be a multiple of the {mesh.size} local devices")

  @jax.jit
  def run(params, views):
    # SAM normalizes 0–255 pixels with mean/std ×255 of ImageNet's: the same numbers on [0, 1] pixels.
    x = normalize_uint8(views).astype(dtype)
    return teacher_features(model, params, x, mode).astype(jnp.float16)

  params = jax.device_put(params, sharding.replicated(mesh))

  def apply(views: np.ndarray) -> np.ndarray:
    n = len(views)
    padded = np.zeros((batch_size, *views.shape[1:]), np.uint8)
    padded[:n] = views
    batch = jax.device_put(padded, sharding.batch_sharding(mesh))
    return np.asarray(jax.device_get(run(params, batch)))[:n]

  apply.lower = lambda views: run.lower(params, views)  # for inspecting the compiled computation
  return apply


# A source image: (source id, path of an image file or the decoded uint8 RGB image).
SourceImage = tuple[str, Union[str, np.ndarray]]


def shard_records(sources: Iterable[SourceImage], teacher_fn: Callable, *, views_per_image: int,
                  size: int, seed: int, batch_size: int, on_batch: Callable[[int], None] = lambda n: None
                  ) -> Iterator[bytes]:
  """Serialized records of every view of ``sources``, in (source, view) order; files are read when reached."""
  pending = []  # (jpeg, decoded, source_id, view, view_index)

  def flush():
    features = teacher_fn(np.stack([p[1] for p in pending]))
    for (jpeg, _, source_id, view, index), feats in zip(pending, features):
      yield tr.encode_record(jpeg, feats, source_id, view, index)
    on_batch(len(pending))
    pending.clear()

  for source_id, image in sources:
    if isinstance(image, str):
      image = load_rgb(image)
    for index in range(views_per_image):
      view = sample_view(view_rng(seed, source_id, index), image.shape[:2])
      jpeg = encode_jpeg(render_view(image, view, size))
      # The teacher sees the decoded JPEG: exactly the student's input.
      pending.append((jpeg, decode_image(jpeg), source_id, view, index))
      if len(pending) == batch_size:
        yield from flush()
  if pending:
    yield from flush()


def precompute(sources: Sequence[SourceImage], output_dir: str, teacher_fn: Callable, *,
               num_shards: int, views_per_image: int, size: int, seed: int, batch_size: int,
               job_hash: str, process_index: int = 0, process_count: int = 1, log=print) -> dict:
  """Writes this process's missing shards; returns {"written": [...], "skipped": [...], "views": n}.

  ``sources`` may be lazy (``tfds_source.TfdsImageSource``): only this process's shards are indexed.
  """
  if num_shards < 1 or num_shards > len(sources):
    raise ValueError(f"num_shards must be in 1..{len(sources)} (the number of images), got {num_shards}")
  os.makedirs(output_dir, exist_ok=True)
  manifest = tr.Manifest(output_dir, process_index)
  chunks = np.array_split(np.arange(len(sources)), num_shards)
  mine = [k for k in range(num_shards) if k % process_count == process_index]
  todo = [k for k in mine if not manifest.finished(tr.shard_name(k, num_shards), job_hash)]
  skipped = [tr.shard_name(k, num_shards) for k in mine if k not in todo]
  total = sum(len(chunks[k]) for k in todo) * views_per_image
  if skipped:
    log(f"skipping {len(skipped)} finished shard(s) recorded in the manifest")
  done, start = 0, time.perf_counter()

  def progress(n):
    nonlocal done
    done += n
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else float("nan")
    log(f"teacher precompute: {done}/{total} views ({100.0 * done / max(total, 1):.1f}%) | "
        f"{rate:.1f} views/s | ETA {format_eta((total - done) / rate if rate > 0 else float('nan'))}")

  written = []
  for k in todo:
    name = tr.shard_name(k, num_shards)
    records = shard_records((sources[i] for i in chunks[k]), teacher_fn, views_per_image=views_per_image,
                            size=size, seed=seed, batch_size=batch_size, on_batch=progress)
    count, digest = tr.write_shard(os.path.join(output_dir, name), records)
    manifest.record(name, count, digest, job_hash, images=len(chunks[k]))
    written.append(name)
  return {"written": written, "skipped": skipped, "views": done}


# Colour photographs that scikit-image ships inside its wheel (no download).
SKIMAGE_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                   "retina")


def bundled_images(directory: str) -> str:
  """Writes scikit-image's bundled sample photographs to ``directory`` (no download); returns it."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  for name in SKIMAGE_SAMPLES:
    path = os.path.join(directory, f"{name}.png")
    if not os.path.exists(path):
      Image.fromarray(getattr(skimage.data, name)()).save(path)
  return directory


def build_teacher(teacher_config):
  """(model, params, description) from ``config.teacher``: a converted checkpoint, or a random teacher."""
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.models.pretrained import load_sam_encoder
  from efficientsam_jax.models.sam_vit import SamEncoderConfig, SamImageEncoder, abstract_params
  if teacher_config.checkpoint:
    model, params = load_sam_encoder(teacher_config.checkpoint)
    return model, params, f"SAM image encoder from {teacher_config.checkpoint}"
  config = SamEncoderConfig.from_dict(dict(teacher_config.random_config))
  model = SamImageEncoder(config)
  # Drawn from the shapes rather than with model.init, whose jitted initializers take ~10 s to
  # compile on a CPU: a stand-in teacher needs plausible scales (norms 1, the rest small), nothing more.
  shapes, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(model))
  keys = jax.random.split(jax.random.PRNGKey(teacher_config.random_seed), len(shapes))
  leaves = [0.02 * jax.random.normal(k, s.shape, s.dtype) + (1.0 if path[-1].key == "scale" else 0.0)
            for k, (path, s) in zip(keys, shapes)]
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  return model, params, (f"RANDOM, UNTRAINED SAM-style teacher ({config.embed_dim} wide, {config.depth} blocks): "
                         "the features it writes are meaningless; convert sam_vit_h_4b8939.pth for real ones")


def run_precompute(config, workdir: str) -> dict:
  """The ``teacher_precompute`` task (``configs/teacher_precompute.py``)."""
  if config.source.kind == "tfds":
    from efficientsam_jax.data.tfds_source import TfdsImageSource  # pylint: disable=import-outside-toplevel
    sources = TfdsImageSource(**config.source.tfds)
    source_key = sources.fingerprint()  # listing 1.28M ids would read the whole dataset
  else:
    if config.source.kind == "skimage_samples":
      folder = os.path.join(workdir, "source_images")
      if jax.process_index() == 0:
        bundled_images(folder)
      barrier("bundled_images")  # the other processes read what process 0 wrote
    elif config.source.kind == "folder":
      folder = config.source.folder
    else:
      raise ValueError(f"unknown source kind {config.source.kind!r}; use 'folder', 'tfds' or 'skimage_samples'")
    sources = tr.list_image_folder(folder)
    source_key = sorted(s for s, _ in sources)
  model, params, description = build_teacher(config.teacher)
  print(f"teacher: {description}; alignment: {config.teacher.mode}")
  dtype = jnp.dtype(config.teacher.dtype)
  teacher_fn = make_teacher_fn(model, params, config.teacher.mode, config.batch_size, dtype,
                               config.teacher.attention)
  hashed = {k: config[k] for k in ("views_per_image", "size", "seed", "num_shards")}
  hashed.update(source=source_key, teacher=description, mode=config.teacher.mode, dtype=str(dtype),
                attention=config.teacher.attention, teacher_config=model.config.to_dict())
  output_dir = config.output_dir or os.path.join(workdir, "teacher_records")
  summary = precompute(sources, output_dir, teacher_fn, num_shards=min(config.num_shards, len(sources)),
                       views_per_image=config.views_per_image, size=config.size, seed=config.seed,
                       batch_size=config.batch_size, job_hash=tr.config_hash(hashed),
                       process_index=jax.process_index(), process_count=jax.process_count())
  print(f"teacher records in {output_dir}: wrote {len(summary['written'])} shard(s), "
        f"skipped {len(summary['skipped'])} finished")
  return {**summary, "output_dir": output_dir}


def get_precompute_config(arg=None) -> ml_collections.ConfigDict:
  """The ``teacher_precompute`` job's config (see ``configs/teacher_precompute.py``)."""
  config = ml_collections.ConfigDict()
  config.task = "teacher_precompute"
  config.source = ml_collections.ConfigDict({
      "kind": "folder",  # "folder", "tfds" or "skimage_samples"
      "folder": "",  # kind "folder": every image under it
      # kind "tfds": a dataset prepared in the ArrayRecord format (see data/tfds_source.py); data_dir "":
      # $TFDS_DATA_DIR or ~/tensorflow_datasets.
      "tfds": {"name": "imagenet2012", "split": "train", "data_dir": "", "image_feature": "image"},
  })
  config.output_dir = ""  # default: WORKDIR/teacher_records
  config.views_per_image = 8  # augmented views stored per image (TinyViT-style replay)
  config.size = 224  # student resolution
  config.seed = 0
  config.num_shards = 1024
  config.batch_size = 64  # per process; a multiple of the local device count
  config.teacher = ml_collections.ConfigDict({
      "checkpoint": "",  # weights directory from `convert sam-to-jax`; empty: random teacher below
      "mode": "upsample",
      "dtype": "bfloat16",
      "attention": "xla",  # "cudnn": fused attention on NVIDIA GPUs (bf16); see models/sam_vit.py SamAttention
      "random_seed": 0,
      "random_config": {"img_size": 1024, "embed_dim": 1280, "depth": 32, "num_heads": 16,
                        "global_attn_indexes": (7, 15, 23, 31)},
  })
  if arg == "smoke":
    config.source.kind = "skimage_samples"
    config.views_per_image = 2
    config.num_shards = 2
    config.batch_size = 8
    config.teacher.dtype = "float32"
    config.teacher.random_config = {"img_size": 448, "embed_dim": 64, "depth": 2, "num_heads": 4,
                                    "window_size": 7, "global_attn_indexes": (1,)}
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of teacher_precompute; known: smoke")
  return config
