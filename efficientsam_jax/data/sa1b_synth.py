"""Synthetic data in SA-1B's format, for tests, smoke runs and held-out mask evaluation.

Each image is a textured background with shapes (rotated ellipses and
rectangles, random polygons; flat, striped, checkered or noisy fills) painted
one after another, so later shapes occlude earlier ones. A shape's mask is
exactly its visible pixels (a label map records who painted each pixel last);
fully or almost fully hidden shapes get no annotation, and the visible
background can be annotated too (it is sometimes > 90% of the image, which the
reader must skip). Written as SA-1B is released: ``sa_<id>.jpg`` (JPEG quality
95) + ``sa_<id>.json`` per image, ids from 1, in a folder or in uncompressed
``sa_<shard:06d>.tar`` shards. The JSON has SA-1B's fields; ``predicted_iou``
and ``stability_score`` are 1.0 placeholders (the masks are exact by
construction, not predicted), ``point_coords`` is one random pixel of the mask
as [[x, y]] pixel indices, ``crop_box`` is the whole image. Image ``i`` depends
only on (seed, i, size, shape range), not on how the images are sharded.

    python -m efficientsam_jax.data.sa1b_synth --output DIR --num-images N [--tar --images-per-tar K]
        [--size 512 | --size WIDTHxHEIGHT] [--shapes MIN,MAX] [--seed 0] [--overwrite]

(``--size 2250x1500 --shapes 80,120`` is close to SA-1B: ~1500 px short side, ~55-90 masks per image.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from efficientsam_jax.common.files import atomic_directory
from efficientsam_jax.common.images import encode_jpeg

Size = Union[int, tuple[int, int]]
MIN_VISIBLE_AREA = 32  # pixels; smaller visible remnants of occluded shapes get no annotation


def _height_width(size: Size) -> tuple[int, int]:
  """An int (square) or (height, width)."""
  height, width = (size, size) if isinstance(size, int) else size
  if height < 8 or width < 8:
    raise ValueError(f"synthetic images must be at least 8×8 pixels, got {height}×{width}")
  return int(height), int(width)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
  """Low-frequency noise in [-1, 1]: a random ``cells``-wide grid, bicubically enlarged."""
  grid = rng.uniform(0, 255, size=(cells, cells, channels)).astype(np.uint8)
  big = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid).resize((width, height), Image.BICUBIC)
  return np.asarray(big, np.float32).reshape(height, width, channels) / 127.5 - 1.0


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Float [H, W, 3] in 0..255: a colour gradient plus blotchy low-frequency colour noise."""
  y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
  x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
  c0, cx, cy = (rng.uniform(40, 215, 3).astype(np.float32) for _ in range(3))
  base = c0 + (cx - c0) * 0.5 * x + (cy - c0) * 0.5 * y
  return base + 40.0 * _smooth_noise(rng, height, width, int(rng.integers(3, 7)), 3)


def _fill(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """A shape's paint over a pixel grid (``ys``/``xs`` broadcast): float [h, w, 3]."""
  colour = rng.uniform(0, 255, 3).astype(np.float32)
  kind = rng.integers(4)
  shape = np.broadcast_shapes(ys.shape, xs.shape)
  if kind == 0:  # flat
    pattern = np.zeros(shape, np.float32)
  elif kind == 1:  # stripes at a random angle and period
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
    pattern = np.sin((xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))) * np.float32(2 * np.pi / period))
  elif kind == 2:  # checkerboard
    cell = int(rng.integers(3, 16))
    pattern = (((ys // cell) + (xs // cell)) % 2 * 2 - 1).astype(np.float32)
  else:  # per-pixel noise
    pattern = rng.random(shape, np.float32) * 2 - 1
  contrast = rng.uniform(10, 60, 3).astype(np.float32)
  return colour + pattern[..., None] * contrast


def _shape_mask(rng: np.random.Generator, height: int, width: int, min_side: int):
  """One random shape: (y0, x0, bool mask of its box clipped to the image) or None if it misses the image."""
  radius = float(np.exp(rng.uniform(np.log(0.03 * min_side), np.log(0.3 * min_side)))) + 2.0
  cy, cx = rng.uniform(-0.1 * height, 1.1 * height), rng.uniform(-0.1 * width, 1.1 * width)
  y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, height)
  x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, width)
  if y1 - y0 < 2 or x1 - x0 < 2:
    return None
  kind = rng.integers(3)
  if kind == 2:  # polygon: vertices at sorted angles around the centre, rasterized by PIL
    n = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.4, 1.0, n)
    points = [(float(cx - x0 + r * np.cos(a)), float(cy - y0 + r * np.sin(a))) for a, r in zip(angles, radii)]
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return y0, x0, np.asarray(canvas, bool)
  ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # pixel centres relative to the shape's centre
  xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
  angle = rng.uniform(0, np.pi)
  u = xs * np.cos(angle) + ys * np.sin(angle)
  v = -xs * np.sin(angle) + ys * np.cos(angle)
  a, b = radius, radius * rng.uniform(0.3, 1.0)
  if kind == 0:  # ellipse
    return y0, x0, (u / a) ** 2 + (v / b) ** 2 <= 1.0
  return y0, x0, (np.abs(u) <= a * 0.8) & (np.abs(v) <= b * 0.8)  # rectangle


def _paint(seed: Union[int, Sequence[int]], size: Size, num_shapes: tuple[int, int],
           include_background: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(uint8 image [H, W, 3], int32 label map [H, W] (−1 = background), label ids that get a mask)."""
  height, width = _height_width(size)
  rng = np.random.default_rng(seed)
  image = _background(rng, height, width)
  image += rng.normal(0.0, 3.0, image.shape).astype(np.float32)
  labels = np.full((height, width), -1, np.int32)
  count = int(rng.integers(num_shapes[0], num_shapes[1] + 1))
  for k in range(count):
    drawn = _shape_mask(rng, height, width, min(height, width))
    if drawn is None:
      continue
    y0, x0, inside = drawn
    h, w = inside.shape
    ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    region = image[y0:y0 + h, x0:x0 + w]
    region[inside] = _fill(rng, ys, xs)[inside]
    labels[y0:y0 + h, x0:x0 + w][inside] = k
  ids = np.arange(-1 if include_background else 0, count)
  areas = np.bincount(labels.ravel() + 1, minlength=count + 1)[ids + 1]
  ids = ids[areas >= MIN_VISIBLE_AREA]
  if not len(ids):  # every shape missed the image: annotate the background after all
    ids = np.array([-1])
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels, ids


def synth_image(seed: Union[int, Sequence[int]], size: Size = 256, *, num_shapes: tuple[int, int] = (4, 12),
                include_background: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A synthetic image and its exact masks: (uint8 [H, W, 3], bool [K, H, W]), K ≥ 1.

  ``seed`` may be a sequence (the writer uses (seed, image id)). ``num_shapes`` is the
  inclusive range of shapes painted; hidden ones get no mask, so K can be smaller.
  The image is pristine (no JPEG round trip): use it for held-out evaluation.
  """
  image, labels, ids = _paint(seed, size, num_shapes, include_background)
  return image, labels[None] == ids[:, None, None]


def _annotation(annotation_id: int, rle: dict, point: tuple[int, int]) -> dict:
  height, width = rle["size"]
  area = int(mask_utils.area(rle))
  return {
      "id": annotation_id,
      "segmentation": {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")},
      "area": area,
      "bbox": [float(v) for v in mask_utils.toBbox(rle)],
      "predicted_iou": 1.0,  # synthetic placeholder: the mask is exact
      "point_coords": [[float(point[0]), float(point[1])]],
      "stability_score": 1.0,  # synthetic placeholder
      "crop_box": [0.0, 0.0, float(width), float(height)],
  }


def annotations(masks: np.ndarray, rng: np.random.Generator, first_id: int = 0) -> list[dict]:
  """SA-1B annotation dicts for non-empty bool masks [K, H, W] (compressed RLE counts as str)."""
  rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  out = []
  for k, rle in enumerate(rles):
    x0, y0, w, h = (int(v) for v in mask_utils.toBbox(rle))
    ys, xs = np.nonzero(masks[k, y0:y0 + h, x0:x0 + w])  # a point inside: search the box only
    pick = int(rng.integers(len(ys)))
    out.append(_annotation(first_id + k, rle, (x0 + xs[pick], y0 + ys[pick])))
  return out


def _label_annotations(labels: np.ndarray, ids: np.ndarray, rng: np.random.Generator, first_id: int) -> list[dict]:
  """``annotations`` of the masks ``labels == id``, in one pass over the label map.

  The label map in column-major order splits into constant segments; a label's
  segments are its mask's runs of ones, which is its RLE (``frPyObjects``
  compresses it exactly as ``encode`` would).
  """
  height, width = labels.shape
  flat = np.ascontiguousarray(labels.T).ravel()  # COCO's RLE runs down the columns
  cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [flat.size]])
  segment_label = flat[starts]
  out = []
  for k, label in enumerate(ids):
    mine = segment_label == label
    first, last = starts[mine], ends[mine]
    counts = np.diff(np.concatenate([[0], np.stack([first, last], axis=1).ravel(), [flat.size]]))
    if counts[-1] == 0:
      counts = counts[:-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    lengths = last - first
    segment = int(rng.choice(len(lengths), p=lengths / lengths.sum()))
    position = int(first[segment] + rng.integers(lengths[segment]))
    out.append(_annotation(first_id + k, rle, (position // height, position % height)))
  return out


def synth_record(image_id: int, seed: int = 0, size: Size = 256, *, num_shapes: tuple[int, int] = (4, 12),
                 quality: int = 95) -> tuple[bytes, bytes]:
  """Image ``image_id`` of the data set ``seed`` as SA-1B files: (sa_<id>.jpg bytes, sa_<id>.json bytes).

  Its masks are ``synth_image((seed, image_id), size, num_shapes=num_shapes)[1]``, in that order.
  """
  image, labels, ids = _paint((seed, image_id), size, num_shapes, True)
  height, width = labels.shape
  record = {
      "image": {"image_id": image_id, "width": int(width), "height": int(height), "file_name": f"sa_{image_id}.jpg"},
      "annotations": _label_annotations(labels, ids, np.random.default_rng((seed, image_id, 1)), image_id * 1000),
  }
  return encode_jpeg(image, quality), json.dumps(record).encode()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same seed gives the same bytes
  tar.addfile(info, io.BytesIO(data))


def write_sa1b(output: str, num_images: int, *, seed: int = 0, size: Size = 256, tar: bool = False,
               images_per_tar: int = 100, num_shapes: tuple[int, int] = (4, 12), quality: int = 95,
               overwrite: bool = False) -> list[str]:
  """Writes images 1..num_images as a folder of sa_<id>.jpg/.json, or as sa_<k:06d>.tar shards.

  The folder appears whole or not at all (``atomic_directory``). Returns the written
  files' paths (the tar shards, or the .jpg/.json files), sorted.
  """
  if num_images < 1 or images_per_tar < 1:
    raise ValueError(f"need num_images ≥ 1 and images_per_tar ≥ 1, got {num_images}, {images_per_tar}")
  names = []
  with atomic_directory(output, overwrite=overwrite) as tmp:
    if tar:
      for shard, start in enumerate(range(1, num_images + 1, images_per_tar)):
        name = f"sa_{shard:06d}.tar"
        with tarfile.open(os.path.join(tmp, name), "w", format=tarfile.GNU_FORMAT) as archive:
          for image_id in range(start, min(start + images_per_tar, num_images + 1)):
            jpg, js = synth_record(image_id, seed, size, num_shapes=num_shapes, quality=quality)
            _add_member(archive, f"sa_{image_id}.jpg", jpg)
            _add_member(archive, f"sa_{image_id}.json", js)
        names.append(name)
    else:
      for image_id in range(1, num_images + 1):
        jpg, js = synth_record(image_id, seed, size, num_shapes=num_shapes, quality=quality)
        for suffix, data in ((".jpg", jpg), (".json", js)):
          with open(os.path.join(tmp, f"sa_{image_id}{suffix}"), "wb") as f:
            f.write(data)
          names.append(f"sa_{image_id}{suffix}")
  return sorted(os.path.join(output, name) for name in names)


def _parse_size(text: str) -> tuple[int, int]:
  """N → (N, N); WIDTHxHEIGHT (e.g. 1500x1000) → (HEIGHT, WIDTH)."""
  parts = text.lower().replace("×", "x").split("x")
  if len(parts) == 1:
    return int(parts[0]), int(parts[0])
  if len(parts) == 2:
    return int(parts[1]), int(parts[0])
  raise argparse.ArgumentTypeError(f"--size takes N or WIDTHxHEIGHT, got {text!r}")


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True, help="folder to create")
  parser.add_argument("--num-images", type=int, required=True)
  parser.add_argument("--tar", action="store_true", help="write sa_<k:06d>.tar shards instead of loose files")
  parser.add_argument("--images-per-tar", type=int, default=100)
  parser.add_argument("--size", type=_parse_size, default=(512, 512), help="N (square) or WIDTHxHEIGHT")
  parser.add_argument("--shapes", default="4,12", help="MIN,MAX shapes painted per image (default 4,12)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  low, high = (int(v) for v in args.shapes.split(","))
  start = time.perf_counter()
  written = write_sa1b(args.output, args.num_images, seed=args.seed, size=args.size, tar=args.tar,
                       images_per_tar=args.images_per_tar, num_shapes=(low, high), quality=args.quality,
                       overwrite=args.overwrite)
  print(f"wrote {args.num_images} images ({args.size[1]}x{args.size[0]}) as {len(written)} files under "
        f"{args.output} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  main()
