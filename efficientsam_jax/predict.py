"""Segment an image from point or box prompts, from the command line.

    python -m efficientsam_jax.predict --checkpoint DIR --image IMG \\
        (--point X,Y[,LABEL] ... | --box X0,Y0,X1,Y1 ...) --output out.png \\
        [--mask-out mask.png|mask.npy] [--single-mask]

    python -m efficientsam_jax.predict --checkpoint DIR --image IMG --everything --output out.png \\
        [--records-out records.json] [--points-per-side 32] [--crop-n-layers 1] [--min-mask-region-area 100]

    python -m efficientsam_jax.predict --demo [--output-dir DIR] [--variant ti]

Prompts: all ``--point``s (label 1 = positive, 0 = negative; default 1) and at
most one ``--box`` form ONE prompt; several ``--box``es (without points) are
decoded together, one prompt per box. The overlay shows each prompt's best mask
(highest predicted IoU); ``--mask-out`` writes the best mask(s): NPY as bool
[H, W] (one prompt) or [Q, H, W] (several boxes), PNG as 0/255 (one prompt) or
a label image whose value i+1 marks box i.

``--everything`` runs the automatic mask generator (``inference/everything.py``) and
writes its records (SAM's format, COCO RLE) as JSON beside a coloured overlay.

``--demo`` needs no download: it runs an EfficientSAM with RANDOM, UNTRAINED
weights on scikit-image's astronaut photo, so its mask is meaningless; it shows
that the pipeline runs end to end and how long each stage takes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from efficientsam_jax.common.images import load_rgb
from efficientsam_jax.inference.predictor import EfficientSamPredictor, to_rgb_uint8
from efficientsam_jax.models.prompt_encoder import LABEL_NEGATIVE, LABEL_POSITIVE

# The astronaut's face in skimage.data.astronaut() (512×512), a point a trained model segments well.
ASTRONAUT_POINT = (225.0, 125.0, LABEL_POSITIVE)
MASK_COLORS = ((30, 144, 255), (255, 160, 0), (50, 205, 50), (220, 20, 60), (186, 85, 211), (0, 206, 209))
UNTRAINED_WARNING = "UNTRAINED RANDOM WEIGHTS - the mask is meaningless"
MASK_SUFFIXES = (".npy", ".png")


# -- prompts ---------------------------------------------------------------------


def parse_point(text: str) -> tuple[float, float, int]:
  """'X,Y' or 'X,Y,LABEL' → (x, y, label); argparse turns the ValueError into a usage error."""
  parts = [p.strip() for p in text.split(",")]
  if len(parts) not in (2, 3):
    raise argparse.ArgumentTypeError(f"--point expects X,Y or X,Y,LABEL, got {text!r}")
  try:
    x, y = float(parts[0]), float(parts[1])
    label = int(parts[2]) if len(parts) == 3 else LABEL_POSITIVE
  except ValueError:
    raise argparse.ArgumentTypeError(f"--point expects numbers X,Y[,LABEL] (LABEL an integer), got {text!r}")
  if not (np.isfinite(x) and np.isfinite(y)):
    raise argparse.ArgumentTypeError(f"--point coordinates must be finite, got {text!r}")
  if label not in (LABEL_NEGATIVE, LABEL_POSITIVE):
    raise argparse.ArgumentTypeError(f"--point LABEL must be 1 (positive) or 0 (negative), got {text!r}; "
                                     "use --box for box corners")
  return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
  """'X0,Y0,X1,Y1' → a box tuple (range checks happen once the image size is known)."""
  parts = [p.strip() for p in text.split(",")]
  try:
    values = tuple(float(p) for p in parts)
  except ValueError:
    values = ()
  if len(values) != 4 or not all(np.isfinite(values)):
    raise argparse.ArgumentTypeError(f"--box expects four finite numbers X0,Y0,X1,Y1, got {text!r}")
  return values


def segment(predictor: EfficientSamPredictor, image: np.ndarray, points: Sequence[tuple[float, float, int]],
            boxes: Sequence[tuple[float, float, float, float]], multimask_output: bool = True) -> dict:
  """Embeds ``image`` and decodes the prompts; returns best masks [Q, H, W], their scores [Q] and timings.

  All points plus at most one box are one prompt (Q = 1); several boxes without
  points are Q prompts decoded in one batch. Timings: the encoder and the first
  decoder call include XLA compilation; the decoder is then timed again warm.
  """
  if len(boxes) > 1 and points:
    raise ValueError("--point cannot be combined with several --box: give one box with points, "
                     "or boxes only (one prompt per box)")
  if not points and not boxes:
    raise ValueError("no prompt given: pass at least one --point or --box")

  start = time.perf_counter()
  predictor.set_image(image)
  encoder_seconds = time.perf_counter() - start

  if len(boxes) > 1:
    run = lambda: predictor.predict_batch(boxes=np.asarray(boxes), multimask_output=multimask_output)
  else:
    coords = np.asarray([p[:2] for p in points], np.float64).reshape(-1, 2) if points else None
    labels = np.asarray([p[2] for p in points], np.float64) if points else None
    box = np.asarray(boxes[0]) if boxes else None

    def run():
      masks, scores, low_res = predictor.predict(coords, labels, box, multimask_output=multimask_output)
      return masks[None], scores[None], low_res[None]

  start = time.perf_counter()
  masks, scores, _ = run()
  decoder_seconds = time.perf_counter() - start
  start = time.perf_counter()
  run()
  decoder_warm_seconds = time.perf_counter() - start
  # Outputs are sorted by predicted IoU, so index 0 is each prompt's best mask.
  return {"masks": masks[:, 0], "scores": scores[:, 0], "all_scores": scores,
          "encoder_seconds": encoder_seconds, "decoder_seconds": decoder_seconds,
          "decoder_warm_seconds": decoder_warm_seconds}


# -- outputs ---------------------------------------------------------------------


def render_overlay(image: np.ndarray, masks: np.ndarray, points: Sequence[tuple[float, float, int]] = (),
                   boxes: Sequence[tuple[float, float, float, float]] = (), title: str = "") -> Image.Image:
  """The image with each mask [Q, H, W] tinted, the prompts drawn, and ``title`` in a strip on top."""
  canvas = image.astype(np.float32)
  for index, mask in enumerate(masks):
    color = np.array(MASK_COLORS[index % len(MASK_COLORS)], np.float32)
    canvas[mask] = 0.45 * canvas[mask] + 0.55 * color
  overlay = Image.fromarray(canvas.round().astype(np.uint8))
  draw = ImageDraw.Draw(overlay)
  height, width = image.shape[:2]
  radius = max(3, round(min(height, width) / 80))
  line = max(1, radius // 2)
  for index, box in enumerate(boxes):
    draw.rectangle(box, outline=MASK_COLORS[index % len(MASK_COLORS)], width=line)
  for x, y, label in points:
    fill = (0, 220, 0) if label == LABEL_POSITIVE else (230, 0, 0)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill, outline=(255, 255, 255))
  if not title:
    return overlay
  font = ImageFont.load_default(size=max(12, min(24, width // 40)))
  text_box = draw.textbbox((0, 0), title, font=font)
  strip = text_box[3] - text_box[1] + 12
  framed = Image.new("RGB", (width, height + strip), (0, 0, 0))
  framed.paste(overlay, (0, strip))
  ImageDraw.Draw(framed).text((6, 6 - text_box[1]), title, fill=(255, 255, 0), font=font)
  return framed


def save_masks(path: str, masks: np.ndarray, single_prompt: bool) -> None:
  """Best masks [Q, H, W] → NPY (bool, [H, W] if ``single_prompt``) or PNG (0/255, or labels i+1)."""
  if path.lower().endswith(".npy"):
    np.save(path, masks[0] if single_prompt else masks)
    return
  if single_prompt:
    Image.fromarray(masks[0].astype(np.uint8) * 255).save(path)
    return
  if len(masks) > 255:
    raise ValueError(f"a PNG label image holds at most 255 masks, got {len(masks)}; use a .npy --mask-out")
  labels = np.zeros(masks.shape[1:], np.uint8)
  for index, mask in enumerate(masks):
    labels[mask] = index + 1  # Later boxes win where masks overlap.
  Image.fromarray(labels).save(path)


def _print_timings(result: dict) -> None:
  print(f"encoder: {result['encoder_seconds']:.3f} s (first call, includes XLA compilation)")
  print(f"decoder: {result['decoder_seconds']:.3f} s first call (includes compilation), "
        f"{result['decoder_warm_seconds']:.4f} s warm")
  for index, scores in enumerate(result["all_scores"]):
    print(f"prompt {index}: predicted IoU of masks (best first) {[round(float(s), 4) for s in scores]}")


# -- demo ------------------------------------------------------------------------


def run_demo(output_dir: str, variant: str = "ti", seed: int = 0, *, config=None,
             image: Optional[np.ndarray] = None, points: Optional[Sequence[tuple[float, float, int]]] = None,
             boxes: Sequence[tuple[float, float, float, float]] = (), multimask_output: bool = True) -> dict:
  """Runs the whole predictor with RANDOM, UNTRAINED weights; no download needed.

  Args:
    output_dir: where the overlay PNG and mask NPY go (created if needed).
    variant: "ti", "s" or "b" (``EfficientSamConfig.from_variant``), ignored when ``config`` is given.
    seed: PRNG seed of ``init_params``.
    config: an ``EfficientSamConfig`` to use instead of the variant (tests use a tiny one).
    image: uint8 image; default ``skimage.data.astronaut()``.
    points, boxes: prompts; default one positive point (the astronaut's face, or the image centre).

  Returns:
    A dict with the written paths (``overlay_path``, ``mask_path``), ``untrained`` (True),
    the model and image sizes, best ``scores`` and the timings in seconds.
  """
  import jax

  from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, count_params, init_params

  if config is None:
    config = EfficientSamConfig.from_variant(variant)
    name = f"EfficientSAM-{variant.upper() if len(variant) == 1 else variant.capitalize()}"
  else:
    variant, name = "custom", f"EfficientSAM ({config.encoder_embed_dim} wide, img_size {config.img_size})"
  if image is None:
    import skimage.data
    image = skimage.data.astronaut()
    default_point = ASTRONAUT_POINT
  else:
    image = to_rgb_uint8(image)
    default_point = (image.shape[1] / 2, image.shape[0] / 2, LABEL_POSITIVE)
  if points is None:
    points = [] if boxes else [default_point]

  print("=" * 78)
  print(f"DEMO with {UNTRAINED_WARNING.upper()}.")
  print(f"{name} is initialized from seed {seed}; no checkpoint is loaded. The pipeline is real,")
  print("the segmentation is not: load trained weights with --checkpoint for meaningful masks.")
  print("=" * 78)

  start = time.perf_counter()
  model = EfficientSam(config)
  params = jax.block_until_ready(init_params(model, jax.random.PRNGKey(seed)))
  init_seconds = time.perf_counter() - start
  predictor = EfficientSamPredictor(model, params)
  result = segment(predictor, image, points, boxes, multimask_output)

  os.makedirs(output_dir, exist_ok=True)
  stem = f"demo_{variant}_UNTRAINED_random_weights"
  overlay_path = os.path.join(output_dir, f"{stem}_overlay.png")
  mask_path = os.path.join(output_dir, f"{stem}_mask.npy")
  title = f"{UNTRAINED_WARNING} ({name}, seed {seed})"
  render_overlay(image, result["masks"], points, boxes, title).save(overlay_path)
  save_masks(mask_path, result["masks"], single_prompt=len(boxes) <= 1)

  print(f"model: {name}, {count_params(params):,} parameters (random init {init_seconds:.2f} s)")
  print(f"image: {image.shape[0]}×{image.shape[1]}")
  _print_timings(result)
  print(f"wrote {overlay_path}")
  print(f"wrote {mask_path}")
  print(f"REMINDER: {UNTRAINED_WARNING}.")
  return {"overlay_path": overlay_path, "mask_path": mask_path, "untrained": True, "variant": variant,
          "seed": seed, "img_size": config.img_size, "image_hw": tuple(image.shape[:2]),
          "num_params": count_params(params), "scores": result["scores"].tolist(),
          "init_seconds": init_seconds, "encoder_seconds": result["encoder_seconds"],
          "decoder_seconds": result["decoder_seconds"],
          "decoder_warm_seconds": result["decoder_warm_seconds"]}


# -- command line ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  from efficientsam_jax.models.vit import VIT_SIZES

  parser = argparse.ArgumentParser(
      prog="python -m efficientsam_jax.predict",
      description="Segment an image with EfficientSAM from point or box prompts.",
      epilog="Example: --checkpoint weights/efficientsam_ti --image dog.jpg --point 320,240 "
             "--point 100,50,0 --output overlay.png --mask-out mask.npy")
  parser.add_argument("--checkpoint", help="weights directory (save_pretrained / the converter CLI)")
  parser.add_argument("--image", help="input image (any format PIL reads)")
  parser.add_argument("--point", action="append", default=[], type=parse_point, metavar="X,Y[,LABEL]",
                      help="a prompt point in pixels; LABEL 1 positive (default) or 0 negative; repeatable")
  parser.add_argument("--box", action="append", default=[], type=parse_box, metavar="X0,Y0,X1,Y1",
                      help="a box prompt in pixels; several boxes give one mask each")
  parser.add_argument("--output", help="overlay image to write (e.g. out.png)")
  parser.add_argument("--mask-out", help="also write the best mask(s) as .png or .npy")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype (parameters stay float32); float32 matches the official model")
  parser.add_argument("--single-mask", action="store_true",
                      help="use the single-mask output instead of choosing the best of three")
  parser.add_argument("--demo", action="store_true",
                      help="no checkpoint: random UNTRAINED weights on skimage's astronaut (meaningless mask)")
  parser.add_argument("--output-dir", default="efficientsam_demo", help="--demo: where to write (default %(default)s)")
  parser.add_argument("--variant", default="ti", choices=sorted(VIT_SIZES), help="--demo: model size")
  parser.add_argument("--seed", type=int, default=0, help="--demo: random-init seed")
  from efficientsam_jax.inference import everything
  everything.add_cli_arguments(parser)
  return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if len(args.box) > 1 and args.point:
    parser.error("--point cannot be combined with several --box: give one box with points, "
                 "or boxes only (one prompt per box)")
  if args.demo:
    if args.everything:
      parser.error("--everything needs trained weights (--checkpoint): random ones pass none of its filters")
    if args.checkpoint or args.output or args.mask_out:
      parser.error("--demo uses random weights and writes into --output-dir; "
                   "drop --checkpoint/--output/--mask-out")
    return
  missing = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--image", args.image),
                                      ("--output", args.output)) if not value]
  if missing:
    parser.error(f"missing {', '.join(missing)} (or use --demo)")
  if args.everything and (args.point or args.box or args.mask_out):
    parser.error("--everything takes no --point/--box/--mask-out: it prompts a grid of points itself")
  if not args.point and not args.box and not args.everything:
    parser.error("give at least one --point X,Y[,LABEL] or --box X0,Y0,X1,Y1 (or --everything)")
  if os.path.splitext(args.output)[1].lower() not in Image.registered_extensions():
    parser.error(f"--output {args.output!r} needs an image extension such as .png")
  if args.mask_out and not args.mask_out.lower().endswith(MASK_SUFFIXES):
    parser.error(f"--mask-out {args.mask_out!r} must end with .png or .npy")
  if not os.path.isdir(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint!r} is not a directory")
  if not os.path.isfile(args.image):
    parser.error(f"--image {args.image!r} does not exist")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  _check_args(parser, args)

  if args.demo:
    image = None
    if args.image:
      try:
        image = load_rgb(args.image)
      except ValueError as error:
        parser.error(str(error))
    try:
      run_demo(args.output_dir, args.variant, args.seed, image=image, points=args.point or None,
               boxes=args.box, multimask_output=not args.single_mask)
    except ValueError as error:
      parser.error(str(error))
    return 0

  from efficientsam_jax.models.pretrained import load_pretrained

  try:
    image = load_rgb(args.image)
    model, params = load_pretrained(args.checkpoint, dtype=args.dtype)
  except (OSError, ValueError) as error:
    parser.error(str(error))
  if args.everything:
    from efficientsam_jax.inference import everything
    everything.run_cli(model, params, image, args)
    return 0
  predictor = EfficientSamPredictor(model, params)
  try:
    result = segment(predictor, image, args.point, args.box, multimask_output=not args.single_mask)
  except ValueError as error:  # Prompts outside the image, too many points, ...
    parser.error(str(error))

  title = f"EfficientSAM, predicted IoU {', '.join(f'{s:.3f}' for s in result['scores'])}"
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  render_overlay(image, result["masks"], args.point, args.box, title).save(args.output)
  print(f"image: {args.image} ({image.shape[0]}×{image.shape[1]}), checkpoint: {args.checkpoint}, "
        f"compute dtype: {jnp.dtype(predictor.model.dtype).name}")
  _print_timings(result)
  print(f"wrote {args.output}")
  if args.mask_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.mask_out)), exist_ok=True)
    save_masks(args.mask_out, result["masks"], single_prompt=len(args.box) <= 1)
    print(f"wrote {args.mask_out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
