"""Inference speed and memory of EfficientSAM, optionally side by side with PyTorch.

    python -m efficientsam_jax.benchmark --variants ti,s --batch-sizes 1,4 \\
        --dtypes float32,bfloat16 --queries 16 --repeats 3 --torch [--json out.json]

Per variant × dtype × batch it prints: image-encoder latency (median ms per
batch) and throughput, the encoder's lower+compile time (measured apart from
the steady-state timing), mask-decoder latency for ``--queries`` point prompts
per image and its throughput, and the peak memory. Weights are random
(``init_params``): speed does not depend on their values.

With ``--torch`` our plain PyTorch encoder (``convert/torch_encoder.py``, the
official model's computation) runs on the same weights and inputs, in fp32,
after all JAX rows (so the JAX memory figures do not include PyTorch's). Its
median latency, the ratio torch/jax (> 1: JAX is faster) and the max relative
difference of the embeddings, max|torch − jax| / max|jax|, are added to each row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficientsam_jax.models import efficient_sam as esam

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_POINTS_PER_PROMPT = 1  # one positive click; the decoder pads to max_num_points anyway


@dataclasses.dataclass
class Row:
  variant: str
  dtype: str
  batch: int
  encoder_ms: float
  encoder_img_per_s: float
  encoder_compile_s: float
  decoder_ms: float
  decoder_prompts_per_s: float
  decoder_compile_s: float
  peak_mem_mib: float
  torch_ms: Optional[float] = None
  torch_over_jax: Optional[float] = None
  max_rel_diff: Optional[float] = None


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _peak_memory_mib() -> float:
  """Peak device memory on accelerators, else the process's peak RSS (both cumulative)."""
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_label() -> str:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return "device peak_bytes_in_use"
  return "process peak RSS (host)"


def _configs(args) -> list[tuple[str, esam.EfficientSamConfig]]:
  if args.config:
    stem = os.path.splitext(os.path.basename(args.config))[0]
    name = os.path.basename(os.path.dirname(os.path.abspath(args.config))) if stem == "config" else stem
    configs = [(name, esam.EfficientSamConfig.from_json(args.config))]
  else:
    configs = [(v, esam.EfficientSamConfig.from_variant(v)) for v in args.variants]
  if args.img_size:
    configs = [(n, dataclasses.replace(c, img_size=args.img_size)) for n, c in configs]
  return configs


def _prompts(config: esam.EfficientSamConfig, batch: int, queries: int, rng: jax.Array):
  points = jax.random.uniform(rng, (batch, queries, _POINTS_PER_PROMPT, 2),
                              maxval=float(config.img_size))
  labels = jnp.ones((batch, queries, _POINTS_PER_PROMPT), jnp.float32)
  return points, labels


def _bench_jax(name, config, dtype_name, batch, params, args, log) -> tuple[Row, np.ndarray]:
  """One JAX row; also returns the embeddings (NHWC, fp32) for the PyTorch comparison."""
  model = esam.EfficientSam(config, dtype=_DTYPES[dtype_name])
  rng_image, rng_points = jax.random.split(jax.random.PRNGKey(batch))
  images = jax.random.normal(rng_image, (batch, config.img_size, config.img_size, 3), jnp.float32)

  log(f"[{name} {dtype_name} b{batch}] compiling encoder")
  start = time.perf_counter()
  encode = esam._encode.lower(model, params, images).compile()  # pylint: disable=protected-access
  encoder_compile_s = time.perf_counter() - start
  log(f"[{name} {dtype_name} b{batch}] timing encoder ({encoder_compile_s:.1f} s compile)")
  encoder_s = _median_seconds(lambda: jax.block_until_ready(encode(params, images)),
                              args.repeats, args.warmup)
  embeddings = jax.block_until_ready(encode(params, images))

  points, labels = _prompts(config, batch, args.queries, rng_points)
  hw = (config.img_size, config.img_size)
  start = time.perf_counter()
  decode = esam._decode.lower(  # pylint: disable=protected-access
      model, params, embeddings, points, labels, input_hw=hw, multimask_output=True).compile()
  decoder_compile_s = time.perf_counter() - start
  log(f"[{name} {dtype_name} b{batch}] timing decoder ({decoder_compile_s:.1f} s compile)")
  decoder_s = _median_seconds(lambda: jax.block_until_ready(decode(params, embeddings, points, labels)),
                              args.repeats, args.warmup)

  row = Row(variant=name, dtype=dtype_name, batch=batch,
            encoder_ms=1e3 * encoder_s, encoder_img_per_s=batch / encoder_s,
            encoder_compile_s=encoder_compile_s,
            decoder_ms=1e3 * decoder_s, decoder_prompts_per_s=batch * args.queries / decoder_s,
            decoder_compile_s=decoder_compile_s, peak_mem_mib=_peak_memory_mib())
  return row, np.asarray(embeddings, np.float32)


def _torch_setup():
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(_cpu_count())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return torch, device


def _bench_torch(config, params, batches, args, log) -> dict[int, tuple[float, np.ndarray]]:
  """Median seconds and NHWC embeddings of our PyTorch encoder per batch size (fp32)."""
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.convert.efficient_sam import state_dict_from_params
  from efficientsam_jax.convert.torch_encoder import encoder_from_state_dict
  torch, device = _torch_setup()
  encoder = encoder_from_state_dict(state_dict_from_params(params), config).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  results = {}
  for batch in batches:
    # The same input the JAX row saw (same key), in NCHW.
    images = jax.random.normal(jax.random.split(jax.random.PRNGKey(batch))[0],
                               (batch, config.img_size, config.img_size, 3), jnp.float32)
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()).to(device)

    def run():
      out = encoder(x)
      sync()
      return out

    log(f"[torch b{batch}] timing encoder")
    with torch.inference_mode():
      seconds = _median_seconds(run, args.repeats, args.warmup)
      out = run().permute(0, 2, 3, 1).cpu().numpy()
    results[batch] = (seconds, out)
  return results


_COLUMNS = [
    ("variant", "variant", "{}"),
    ("dtype", "dtype", "{}"),
    ("batch", "batch", "{}"),
    ("encoder_ms", "enc ms", "{:.1f}"),
    ("encoder_img_per_s", "enc img/s", "{:.3g}"),
    ("encoder_compile_s", "enc compile s", "{:.1f}"),
    ("decoder_ms", "dec ms", "{:.1f}"),
    ("decoder_prompts_per_s", "dec prompts/s", "{:.4g}"),
    ("decoder_compile_s", "dec compile s", "{:.1f}"),
    ("peak_mem_mib", "peak MiB", "{:.0f}"),
]
_TORCH_COLUMNS = [
    ("torch_ms", "torch enc ms", "{:.1f}"),
    ("torch_over_jax", "torch/jax", "{:.2f}"),
    ("max_rel_diff", "max rel diff", "{:.1e}"),
]


def format_table(rows: Sequence[Row], with_torch: bool) -> str:
  columns = _COLUMNS + (_TORCH_COLUMNS if with_torch else [])
  cells = [[title for _, title, _ in columns]]
  for row in rows:
    values = dataclasses.asdict(row)
    cells.append(["-" if values[key] is None else fmt.format(values[key]) for key, _, fmt in columns])
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  lines = [" | ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def _header(args, configs) -> dict:
  device = jax.devices()[0]
  meta = {
      "weights": "random weights (init_params)",
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "num_devices_used": 1,
      "jax": jax.__version__,
      "host_cpu": _cpu_model(),
      "host_cores": _cpu_count(),
      "python": platform.python_version(),
      "memory": _memory_label() + ", cumulative over the run",
      "queries_per_image": args.queries,
      "points_per_prompt": _POINTS_PER_PROMPT,
      "repeats": args.repeats,
      "warmup": args.warmup,
      "configs": {name: c.to_dict() for name, c in configs},
  }
  if args.torch:
    torch, torch_device = _torch_setup()
    meta["torch"] = f"{torch.__version__} on {torch_device}, {torch.get_num_threads()} threads, fp32"
  return meta


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m efficientsam_jax.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  split = lambda s: [v.strip() for v in s.split(",") if v.strip()]
  parser.add_argument("--variants", type=split, default=["ti", "s"], help="comma list of ti,s,b")
  parser.add_argument("--config", help="model config JSON (fixture keys); replaces --variants")
  parser.add_argument("--img-size", type=int, default=None, help="override the encoder input size")
  parser.add_argument("--batch-sizes", type=lambda s: [int(v) for v in split(s)], default=[1])
  parser.add_argument("--dtypes", type=split, default=["float32"], help="float32,bfloat16,float16")
  parser.add_argument("--queries", type=int, default=16, help="point prompts per image for the decoder")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
  parser.add_argument("--torch", action="store_true", help="time our PyTorch encoder side by side")
  parser.add_argument("--json", help="write the header and rows to this file")
  parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.dtypes) - set(_DTYPES))
  if unknown:
    parser.error(f"unknown dtypes {unknown}; choose from {sorted(_DTYPES)}")
  if args.repeats < 1 or args.queries < 1 or args.warmup < 0 or min(args.batch_sizes, default=0) < 1:
    parser.error("--repeats, --queries and --batch-sizes must be positive, --warmup >= 0")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parse_args(argv)
  log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
  try:
    configs = _configs(args)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  meta = _header(args, configs)

  rows, embeddings, all_params = [], {}, {}
  for name, config in configs:
    params = esam.init_params(esam.EfficientSam(config), jax.random.PRNGKey(0))
    all_params[name] = params
    log(f"[{name}] {esam.count_params(params):,} parameters, img_size {config.img_size}")
    for dtype_name in args.dtypes:
      for batch in args.batch_sizes:
        row, emb = _bench_jax(name, config, dtype_name, batch, params, args, log)
        rows.append(row)
        embeddings[(name, dtype_name, batch)] = emb

  if args.torch:
    for name, config in configs:
      results = _bench_torch(config, all_params[name], args.batch_sizes, args, log)
      for row in rows:
        if row.variant != name:
          continue
        torch_s, torch_emb = results[row.batch]
        ref = embeddings[(name, row.dtype, row.batch)]
        row.torch_ms = 1e3 * torch_s
        row.torch_over_jax = row.torch_ms / row.encoder_ms
        row.max_rel_diff = float(np.abs(torch_emb - ref).max() / np.abs(ref).max())

  print(f"EfficientSAM inference benchmark, {meta['weights']}")
  print(f"device: {meta['backend']} / {meta['device_kind']}; host: {meta['host_cpu']}, "
        f"{meta['host_cores']} cores; jax {meta['jax']}")
  if args.torch:
    print(f"torch: {meta['torch']}")
  sizes = ", ".join(f"{n}: img {c.img_size}, ViT {c.encoder_embed_dim}x{c.encoder_depth}"
                    for n, c in configs)
  print(f"models: {sizes}")
  print(f"encoder: median of {args.repeats} after {args.warmup} warm-up, ms per batch; "
        f"decoder: {args.queries} prompts/image x {_POINTS_PER_PROMPT} point, multimask; "
        f"peak MiB: {meta['memory']}")
  print(format_table(rows, args.torch))
  if args.torch:
    print("torch/jax > 1 means JAX is faster; max rel diff = max|torch - jax| / max|jax| of the "
          "embeddings (torch is fp32)")

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
