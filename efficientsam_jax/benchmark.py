"""Inference speed and memory of EfficientSAM, optionally side by side with PyTorch.

    python -m efficientsam_jax.benchmark --variants ti,s --batch-sizes 1,4 \\
        --dtypes float32,bfloat16 --queries 16 --repeats 3 --torch [--json out.json]

Per variant × dtype × batch it prints: image-encoder latency (median ms per
batch) and throughput, the encoder's lower+compile time (measured apart from
the steady-state timing), mask-decoder latency for ``--queries`` point prompts
per image and its throughput, and the peak memory. Weights are random
(``init_params``): speed does not depend on their values. ``--attention xla,cudnn``
also times the encoder with cuDNN's fused attention (``layers.Kernels``; NVIDIA
GPUs in bf16/fp16: a combination it refuses is reported and skipped).

With ``--torch`` our plain PyTorch encoder (``convert/torch_encoder.py``, the
official model's computation) runs in fp32 on the same weights and inputs, its
calls interleaved with the JAX encoder's (so a load change on a shared machine
hits both alike) and after the row's memory was read. Its median latency, the
ratio torch/jax (> 1: JAX is faster) and the max relative difference of the
embeddings, max|torch − jax| / max|jax|, are added to each row.

Peak memory: on an accelerator the device's ``peak_bytes_in_use`` (cumulative,
JAX cannot reset it); on CPU the process's peak RSS during the row's JAX calls
(reset per row through ``/proc/self/clear_refs`` where Linux allows).
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
from efficientsam_jax.models.layers import ATTENTION_IMPLEMENTATIONS, Kernels

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_POINTS_PER_PROMPT = 1  # one positive click (the model pads it as the official model does)


@dataclasses.dataclass
class Row:
  variant: str
  dtype: str
  batch: int
  attention: str
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


def _interleaved_median_seconds(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
  """Median wall time of each function, called in turn (a, b, a, b, ...).

  Alternating makes load changes on a shared machine hit every function alike,
  so their ratio stays meaningful even when the absolute times drift.
  """
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, samples in zip(fns, times):
      start = time.perf_counter()
      fn()
      samples.append(time.perf_counter() - start)
  return [statistics.median(samples) for samples in times]


def _device_peak_bytes() -> Optional[int]:
  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def _reset_host_peak() -> bool:
  """Resets the process's peak RSS (Linux ``clear_refs``); False where unsupported."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_memory_mib() -> float:
  """Device peak on accelerators, else the process's peak RSS."""
  peak = _device_peak_bytes()
  if peak is not None:
    return peak / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_label() -> str:
  if _device_peak_bytes() is not None:
    return "device peak_bytes_in_use (cumulative over the run: JAX cannot reset it)"
  if _reset_host_peak():
    return "process peak RSS during the row's JAX calls (host; params and libraries included)"
  return "process peak RSS (host, cumulative over the run)"


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


def _torch_setup():
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(_cpu_count())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return torch, device


def _torch_runner(config, params) -> Callable[[np.ndarray], Callable[[], np.ndarray]]:
  """Our PyTorch encoder on ``params`` (fp32): NHWC numpy images → a call returning NHWC embeddings."""
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.convert.efficient_sam import state_dict_from_params
  from efficientsam_jax.convert.torch_encoder import encoder_from_state_dict
  torch, device = _torch_setup()
  encoder = encoder_from_state_dict(state_dict_from_params(params), config).to(device)

  def bind(images: np.ndarray) -> Callable[[], np.ndarray]:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)

    def run() -> np.ndarray:
      with torch.inference_mode():
        return encoder(x).permute(0, 2, 3, 1).cpu().numpy()  # .cpu() also waits for CUDA

    return run

  return bind


def _bench_row(name, config, dtype_name, batch, attention, params, torch_bind, args, log) -> Row:
  """One row: JAX encoder and decoder, and (with ``torch_bind``) PyTorch interleaved with JAX."""
  tag = f"[{name} {dtype_name} b{batch} {attention}]"
  model = esam.EfficientSam(config, dtype=_DTYPES[dtype_name], encoder_kernels=Kernels(attention=attention))
  rng_image, rng_points = jax.random.split(jax.random.PRNGKey(batch))
  # Normalized images are roughly standard normal.
  images = jax.random.normal(rng_image, (batch, config.img_size, config.img_size, 3), jnp.float32)
  _reset_host_peak()

  log(f"{tag} compiling encoder")
  start = time.perf_counter()
  encode = esam._encode.lower(model, params, images).compile()  # pylint: disable=protected-access
  encoder_compile_s = time.perf_counter() - start
  run_jax = lambda: jax.block_until_ready(encode(params, images))
  embeddings = run_jax()  # first warm-up call; its output feeds the decoder and the comparison
  for _ in range(args.warmup - 1):
    run_jax()

  points, labels = _prompts(config, batch, args.queries, rng_points)
  hw = (config.img_size, config.img_size)
  log(f"{tag} compiling and timing decoder ({encoder_compile_s:.1f} s encoder compile)")
  start = time.perf_counter()
  decode = esam._decode.lower(  # pylint: disable=protected-access
      model, params, embeddings, points, labels, input_hw=hw, multimask_output=True).compile()
  decoder_compile_s = time.perf_counter() - start
  run_decoder = lambda: jax.block_until_ready(decode(params, embeddings, points, labels))
  for _ in range(args.warmup):
    run_decoder()
  (decoder_s,) = _interleaved_median_seconds([run_decoder], args.repeats)
  peak_mem_mib = _peak_memory_mib()  # before any PyTorch call

  extra = {}
  if torch_bind is None:
    log(f"{tag} timing encoder")
    (encoder_s,) = _interleaved_median_seconds([run_jax], args.repeats)
  else:
    log(f"{tag} timing encoder, interleaved with PyTorch")
    run_torch = torch_bind(np.asarray(images))
    torch_embeddings = run_torch()
    for _ in range(args.warmup - 1):
      run_torch()
    encoder_s, torch_s = _interleaved_median_seconds([run_jax, run_torch], args.repeats)
    ref = np.asarray(embeddings, np.float32)
    extra = dict(torch_ms=1e3 * torch_s, torch_over_jax=torch_s / encoder_s,
                 max_rel_diff=float(np.abs(torch_embeddings - ref).max() / np.abs(ref).max()))

  return Row(variant=name, dtype=dtype_name, batch=batch, attention=attention,
             encoder_ms=1e3 * encoder_s, encoder_img_per_s=batch / encoder_s,
             encoder_compile_s=encoder_compile_s,
             decoder_ms=1e3 * decoder_s, decoder_prompts_per_s=batch * args.queries / decoder_s,
             decoder_compile_s=decoder_compile_s, peak_mem_mib=peak_mem_mib, **extra)


_COLUMNS = [
    ("variant", "variant", "{}"),
    ("dtype", "dtype", "{}"),
    ("batch", "batch", "{}"),
    ("attention", "attention", "{}"),
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
      # The allocator decides how often big temporaries are page-faulted in anew; on CPU it moves
      # both frameworks' times by up to 2x (see BENCHMARKS.md).
      "ld_preload": os.environ.get("LD_PRELOAD", ""),
      "memory": _memory_label(),
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
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed calls before timing (at least 1: its output is compared)")
  parser.add_argument("--attention", type=split, default=["xla"], help="xla,cudnn: the encoder's attention")
  parser.add_argument("--torch", action="store_true", help="time our PyTorch encoder side by side")
  parser.add_argument("--json", help="write the header and rows to this file")
  parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  args = parser.parse_args(argv)
  if set(args.attention) - set(ATTENTION_IMPLEMENTATIONS):
    parser.error(f"--attention takes {' and/or '.join(ATTENTION_IMPLEMENTATIONS)}, got {args.attention}")
  unknown = sorted(set(args.dtypes) - set(_DTYPES))
  if unknown:
    parser.error(f"unknown dtypes {unknown}; choose from {sorted(_DTYPES)}")
  if args.repeats < 1 or args.queries < 1 or args.warmup < 1 or min(args.batch_sizes, default=0) < 1:
    parser.error("--repeats, --queries, --warmup and --batch-sizes must be positive")
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

  rows = []
  for name, config in configs:
    params = esam.init_params(esam.EfficientSam(config), jax.random.PRNGKey(0))
    log(f"[{name}] {esam.count_params(params):,} parameters, img_size {config.img_size}")
    torch_bind = _torch_runner(config, params) if args.torch else None
    for dtype_name in args.dtypes:
      for batch in args.batch_sizes:
        for attention in args.attention:
          try:
            rows.append(_bench_row(name, config, dtype_name, batch, attention, params, torch_bind, args, log))
          except Exception as e:  # pylint: disable=broad-except
            if attention == "xla":
              raise
            print(f"[{name} {dtype_name} b{batch}] attention {attention}: skipped, {type(e).__name__}: {e}"[:400])
    del params, torch_bind

  print(f"EfficientSAM inference benchmark, {meta['weights']}")
  print(f"device: {meta['backend']} / {meta['device_kind']}; host: {meta['host_cpu']}, "
        f"{meta['host_cores']} cores; jax {meta['jax']}; "
        f"allocator: {('LD_PRELOAD=' + meta['ld_preload']) if meta['ld_preload'] else 'default malloc'}")
  if args.torch:
    print(f"torch: {meta['torch']}")
  sizes = ", ".join(f"{n}: img {c.img_size}, ViT {c.encoder_embed_dim}x{c.encoder_depth}"
                    for n, c in configs)
  print(f"models: {sizes}")
  print(f"timing: median of {args.repeats} calls after {args.warmup} warm-up; enc ms per batch; "
        f"dec ms per batch of {args.queries} prompts/image x {_POINTS_PER_PROMPT} point, multimask")
  print(f"peak MiB: {meta['memory']}")
  print(format_table(rows, args.torch))
  if args.torch:
    print("torch: our PyTorch encoder (official computation), fp32, same weights and input, its calls "
          "interleaved with the JAX encoder's; torch/jax > 1 means JAX is faster; "
          "max rel diff = max|torch - jax| / max|jax| of the embeddings")

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
