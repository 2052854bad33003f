"""Checkpoint conversion CLI.

  python -m efficientsam_jax.convert torch-to-jax --input efficient_sam_vitt.pt --output weights/ti
  python -m efficientsam_jax.convert jax-to-torch --input weights/ti --output exported.pt
  python -m efficientsam_jax.convert sam-to-jax --input sam_vit_h_4b8939.pth --output weights/sam_vit_h

``torch-to-jax`` reads an official ``{"model": state_dict}`` checkpoint, infers
the variant from tensor shapes (or takes ``--config config.json`` with the
fixture's keys for custom sizes) and writes an orbax weights directory that
``efficientsam_jax.models.pretrained.load_pretrained`` loads. ``jax-to-torch``
writes a checkpoint the official ``EfficientSam`` loads with ``strict=True``.

``sam-to-jax`` takes the image encoder (``image_encoder.*`` keys) out of a
segment-anything checkpoint, the SAMI teacher, and writes a weights directory
that ``efficientsam_jax.models.pretrained.load_sam_encoder`` loads. The sizes
come from ``--preset`` (vit_b, vit_l, vit_h; default vit_h) or ``--config``
(SAM's ``ImageEncoderViT`` argument names); they are never inferred, so a
checkpoint of another size is an error naming every key that does not fit.

Nothing is written when the input does not fit the model; errors exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from efficientsam_jax.convert import torch_io
from efficientsam_jax.convert.efficient_sam import (infer_config, params_from_state_dict,
                                                    state_dict_from_params)
from efficientsam_jax.convert.sam import encoder_params_from_state_dict
from efficientsam_jax.convert.torch_keys import StateDictMismatch
from efficientsam_jax.models.efficient_sam import EfficientSamConfig
from efficientsam_jax.models.pretrained import config_from_json, load_pretrained, save_pretrained
from efficientsam_jax.models.sam_vit import SAM_PRESETS, SamEncoderConfig


def torch_to_jax(input_path: str, output_dir: str, config_path: str | None = None,
                 img_size: int | None = None, overwrite: bool = False) -> EfficientSamConfig:
  if os.path.exists(output_dir) and not overwrite:
    raise FileExistsError(f"{output_dir} exists; pass --overwrite to replace it")
  state_dict = torch_io.load_state_dict(input_path)
  if config_path:
    # Also accepts a weights directory's config.json, which carries a "model" field.
    config = config_from_json(config_path, "efficientsam")
  else:
    config = infer_config(state_dict, img_size=img_size or 1024)
  if img_size is not None and img_size != config.img_size:
    config = EfficientSamConfig.from_dict({**config.to_dict(), "img_size": img_size})
  config, params = params_from_state_dict(state_dict, config)
  save_pretrained(output_dir, params, config, overwrite=overwrite)
  return config


def sam_to_jax(input_path: str, output_dir: str, preset: str = "vit_h", config_path: str | None = None,
               overwrite: bool = False) -> SamEncoderConfig:
  """segment-anything checkpoint → SAM image encoder weights directory; returns the config used."""
  if os.path.exists(output_dir) and not overwrite:
    raise FileExistsError(f"{output_dir} exists; pass --overwrite to replace it")
  if config_path:
    config, source = config_from_json(config_path, "sam_encoder"), config_path
  else:
    config, source = SamEncoderConfig.preset(preset), f"preset {preset}"
  state_dict = torch_io.load_state_dict(input_path)
  try:
    params = encoder_params_from_state_dict(state_dict, config)
  except StateDictMismatch as e:
    # Sizes are never guessed from shapes: say which sizes were tried and how to give others.
    raise StateDictMismatch(f"{input_path} does not fit the SAM image encoder of {source} "
                            f"(choose --preset {'/'.join(SAM_PRESETS)} or --config): {e}") from e
  save_pretrained(output_dir, params, config, overwrite=overwrite)
  return config


def jax_to_torch(input_dir: str, output_path: str, overwrite: bool = False) -> int:
  if os.path.exists(output_path) and not overwrite:
    raise FileExistsError(f"{output_path} exists; pass --overwrite to replace it")
  _, params = load_pretrained(input_dir)
  state_dict = state_dict_from_params(params)
  torch_io.save_state_dict(state_dict, output_path)
  return len(state_dict)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m efficientsam_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  t2j = sub.add_parser("torch-to-jax", help="official PyTorch checkpoint → orbax weights directory")
  t2j.add_argument("--input", required=True, help="official checkpoint, e.g. efficient_sam_vitt.pt")
  t2j.add_argument("--output", required=True, help="weights directory to write")
  t2j.add_argument("--config", help="config.json for custom sizes (keys of EfficientSamConfig)")
  t2j.add_argument("--img-size", type=int, help="encoder input size (default: 1024, or the config's)")
  t2j.add_argument("--overwrite", action="store_true")
  j2t = sub.add_parser("jax-to-torch", help="orbax weights directory → official PyTorch checkpoint")
  j2t.add_argument("--input", required=True, help="weights directory")
  j2t.add_argument("--output", required=True, help="checkpoint file to write (.pt)")
  j2t.add_argument("--overwrite", action="store_true")
  s2j = sub.add_parser("sam-to-jax", help="segment-anything checkpoint → SAM image encoder weights directory")
  s2j.add_argument("--input", required=True, help="SAM checkpoint, e.g. sam_vit_h_4b8939.pth")
  s2j.add_argument("--output", required=True, help="weights directory to write")
  sizes = s2j.add_mutually_exclusive_group()
  # None rather than "vit_h" as the default, so that argparse sees --preset and --config given together.
  sizes.add_argument("--preset", choices=sorted(SAM_PRESETS), help="encoder size (default: vit_h)")
  sizes.add_argument("--config", help="config.json with SAM's ImageEncoderViT argument names")
  s2j.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    if args.command == "torch-to-jax":
      config = torch_to_jax(args.input, args.output, args.config, args.img_size, args.overwrite)
      print(f"wrote {args.output}: {config} in {time.perf_counter() - start:.1f}s")
    elif args.command == "sam-to-jax":
      config = sam_to_jax(args.input, args.output, args.preset or "vit_h", args.config, args.overwrite)
      print(f"wrote {args.output}: {config} in {time.perf_counter() - start:.1f}s")
    else:
      count = jax_to_torch(args.input, args.output, args.overwrite)
      print(f"wrote {args.output}: {count} tensors in {time.perf_counter() - start:.1f}s")
  except (StateDictMismatch, ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
