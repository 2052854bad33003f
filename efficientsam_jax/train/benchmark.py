"""Training-side benchmarks: train-step throughput and MFU, teacher precompute, input pipelines.

    python -m efficientsam_jax.train.benchmark sami --variants ti,s,b --batch-per-device 256
    python -m efficientsam_jax.train.benchmark finetune --variants ti,s --batch-per-device 8 --masks 64
    python -m efficientsam_jax.train.benchmark teacher --modes upsample,native --batch-per-device 16
    python -m efficientsam_jax.train.benchmark sami-input --records 2048 --batch 256
    python -m efficientsam_jax.train.benchmark attention --implementations cudnn,pallas --tilings "64,4,16,8;32,4,16,8"
    python -m efficientsam_jax.train.benchmark mlp --tilings "128/128/64/8/3;128/256/64/8/3"

``sami``: the real jitted SAMI train step (student + cross-attention decoder +
AdamW) on random inputs already on the devices, per student size; prints
ms/step, img/s, the step's model FLOPs (``sami_train_flops_per_image``; XLA's
cost analysis beside it) and MFU = model FLOPs / time / peak, where peak is
the accelerator's dense bf16 rate (``PEAK_TFLOPS`` by device kind, or
``--peak-tflops``); no MFU on CPU. ``--compile-only`` stops after compiling and
prints the FLOPs and XLA's memory estimate (check a big config fits).
``--remat none,dots,...`` (``sami``, ``finetune``) compares what the blocks keep for the backward
pass (``layers.remat``). ``--kernels`` (``sami``, ``finetune``: the student / image encoder) compares implementations
side by side (``layers.Kernels``, same parameters): sets separated by ``;``, each ``default`` or
``key=value,...``, e.g.
``--kernels "default;layer_norm=one_pass,gelu=tanh;attention=cudnn,layer_norm=one_pass"``.

``sami|finetune --gpu-spec h100``: compile the step for that GPU without one (jax's deviceless compile;
needs jax's CUDA plugin) and print what its kernels move and compute (``hlo_kernels``): kernel count, GB,
matmul TFLOP, the roofline time (and for SAMI its MFU), and the JAX operations whose kernels move the most
bytes. Nothing runs, so no time is measured. On an attached GPU the rows carry the same figures.

``finetune``: the real jitted EfficientSAM finetuning step (encoder once,
``1 + correction_steps`` decoder rounds over ``--masks`` masks per image,
SAM's losses, AdamW) at 1024² on random images and box-shaped masks:
ms/step, img/s and masks/s (XLA's FLOP count beside it; no MFU yet).
``sami`` and ``finetune`` rows give the activations kept for the backward pass
per example (``kept_mb_per_example``), the figure that ``--remat`` changes.

``teacher``: the precompute job's jitted teacher (uint8 views in, fp16
features out, host transfers included) on random ViT-H weights: views/s;
``--attention xla,cudnn`` also times SAM's attention through cuDNN's fused kernel.

``--profile DIR`` traces a few steps after the timing and prints the device
ops that took the most time, with the JAX operation that made each; on a GPU, for
``sami`` and ``finetune``, also each JAX operation's kernel time against its
kernels' floor (``hlo_kernels.against_floor``): where the step loses its time.

``attention``: softmax attention alone, forward and forward + backward, at the SAMI decoder's shape (batch
256 × 16 heads of 32, 147 queries over 196 keys; ``--queries``, ``--keys``, ... for others) per
implementation: "xla", "cudnn", "pallas" (``models/short_attention.py``; ``--tilings`` compares its block
sizes and warps); ms, TFLOP/s and the largest error against fp32 XLA attention of the same inputs.

``mlp``: the transformer MLP (fc1, GELU, fc2) alone, forward and forward + backward, at the SAMI decoder's shape
(256 × 147 tokens, 512 wide, hidden 2048; ``--tokens``, ``--width``, ... for others) as "xla" (``vit.Mlp``'s two
Dense layers and the GELU) and "pallas" (``models/gelu_mlp.py``, the GELU inside the matmuls' kernels;
``--tilings`` compares block sizes, warps and pipeline stages); ms, TFLOP/s and the largest error against the XLA
MLP in fp32. With ``--gpu-spec`` (``attention`` too): compiled for that GPU, kernel count, GB, and the Pallas
kernels' registers and spills.

``sami-input``: the SAMI grain pipeline on this host (TFRecord read, JPEG
decode, batching) over shards of real photographs' views: samples/s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import re
import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from efficientsam_jax.models.gelu_mlp import MatmulTiling, gelu_mlp, xla_mlp
from efficientsam_jax.models.layers import REMAT_POLICIES, Kernels, attention, attention_device, remat_policy
from efficientsam_jax.models.short_attention import Tiling, short_attention
from efficientsam_jax.train import hlo_kernels
from efficientsam_jax.train.loop import compiled_memory_bytes
from efficientsam_jax.train.finetune_config import get_finetune_config
from efficientsam_jax.train.sami_config import get_sami_config

# Dense bf16 matrix peak per chip (vendor datasheets), TFLOP/s, by a substring of device_kind.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}
# Memory bandwidth per chip (vendor datasheets), TB/s, for the kernels' roofline (``hlo_kernels``).
PEAK_TBPS = {"H100": 3.35, "H100 PCIe": 2.0, "H200": 4.8, "A100": 2.04, "A100-SXM4-40GB": 1.56, "L4": 0.3}


def chip_figure(device: jax.Device, table: dict) -> Optional[float]:
  """The device's entry in ``table`` (``PEAK_TFLOPS``, ``PEAK_TBPS``) whose key is the longest part of its
  device_kind; None on CPU or for an unknown chip."""
  if device.platform == "cpu":
    return None
  matches = [k for k in table if k in device.device_kind]
  return table[max(matches, key=len)] if matches else None


def peak_tflops(device: jax.Device, override: float = 0.0) -> Optional[float]:
  return override or chip_figure(device, PEAK_TFLOPS)


def sami_forward_flops_per_image(config) -> tuple[float, float]:
  """Matmul FLOPs (2·m·n·k) of one SAMI example's forward pass: (patch embedding of the visible patches, the rest:
  encoder, decoder, head)."""
  d, dd, p = config.encoder_embed_dim, config.decoder_dim, config.patch_size
  n, v = config.num_tokens, config.num_visible
  m = n - v
  patch_embed = 2 * v * (p * p * 3) * d  # the masked patches are never embedded
  encoder = config.encoder_depth * (2 * v * 12 * d * d + 4 * v * v * d)  # qkv, proj, MLP (4×); QKᵀ and AV
  if config.decoder_type == "cross":  # queries: the masked tokens; keys/values: visible + masked
    block = 2 * m * dd * dd * 2 + 2 * n * dd * dd * 2 + 2 * m * 8 * dd * dd + 4 * m * n * dd
  else:
    block = 2 * n * 12 * dd * dd + 4 * n * n * dd
  decoder = 2 * v * d * dd + config.decoder_depth * block + 2 * n * dd * config.target_dim
  return float(patch_embed), float(encoder + decoder)


def sami_train_flops_per_image(config) -> float:
  """Model FLOPs of one SAMI training example: the forward pass's matmuls (``sami_forward_flops_per_image``) ×3
  for the backward, ×2 for the patch embedding (its input, the image, needs no gradient).

  The MFU basis. XLA's own count is printed beside it but is not used: on GPU
  it leaves out the GEMMs that run as cuBLAS custom calls.
  """
  patch_embed, rest = sami_forward_flops_per_image(config)
  return 2.0 * patch_embed + 3.0 * rest


def parse_kernels(text: str) -> list[Kernels]:
  """``"default;layer_norm=one_pass,gelu=tanh"`` → [Kernels(), Kernels(layer_norm="one_pass", gelu="tanh")]."""
  sets = []
  for item in text.split(";"):
    item = item.strip()
    if item in ("", "default"):
      sets.append(Kernels())
      continue
    pairs = [pair.split("=", 1) for pair in item.split(",")]
    if any(len(pair) != 2 for pair in pairs):
      raise argparse.ArgumentTypeError(f"kernel set {item!r}: expected key=value pairs separated by ','")
    try:
      sets.append(Kernels(**{key.strip(): value.strip() for key, value in pairs}))
    except (TypeError, ValueError) as e:
      raise argparse.ArgumentTypeError(f"kernel set {item!r}: {e}") from e
  return sets


REMAT_HELP = f"','-separated remat policies to compare: none, {', '.join(REMAT_POLICIES)} (models/layers.py remat)"


MICROBATCHES_HELP = "gradient accumulation: the batch in this many parts, one after the other (e.g. 1,2)"
GPU_SPEC_HELP = "compile for this GPU without one (needs jax's CUDA plugin), print its kernels' figures, run nothing"


def parse_ints(text: str) -> list[int]:
  """``"1,2"`` → [1, 2] (each ≥ 1)."""
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
  if min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected integers ≥ 1, got {text!r}")
  return values


def parse_remat(text: str) -> list[str]:
  """``"none,dots"`` → ["none", "dots"], each checked by ``layers.remat_policy``."""
  policies = [p.strip() for p in text.split(",")]
  for policy in policies:
    try:
      remat_policy(policy)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from e
  return policies


def compiled_cost(compiled, key: str = "flops") -> Optional[float]:
  """One figure of a compiled computation's cost analysis (None if unavailable): "flops" per call, or
  "bytes accessed" (XLA's count of bytes read and written by its ops: the memory-bound work)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  value = (analysis or {}).get(key)
  return float(value) if value and value > 0 else None


def saved_residual_bytes(fn: Callable, *args) -> Optional[int]:
  """Bytes of the activations that ``fn``'s backward pass keeps from its forward pass, ``fn``'s arguments not
  counted (jax's ``print_saved_residuals`` listing; no compilation, the same on every backend). None if the
  listing's format is not understood."""
  listing = io.StringIO()
  with contextlib.redirect_stdout(listing):
    print_saved_residuals(fn, *args)
  total, understood = 0, False
  for line in listing.getvalue().splitlines():
    found = re.match(r"([a-z]+)(\d*)\[([\d,]*)\]", line)  # e.g. "bf16[8,147,2048] output of ..."
    understood = understood or found is not None
    if found is None or "from the argument" in line:
      continue
    _, bits, shape = found.groups()
    size = int(np.prod([int(d) for d in shape.split(",") if d]))
    total += size * (int(bits) // 8 if bits else 1)  # "bool" has no width: one byte
  return total if understood else None


def time_steps(run_step, steps: int, repeats: int) -> float:
  """Median over ``repeats`` of the mean seconds per step over ``steps`` dispatched steps."""
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for _ in range(steps):
      out = run_step()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / steps)
  return statistics.median(samples)


# What a device op is, from its name (XLA's fusion names, cuBLAS/cuDNN kernel names), first match wins.
OP_KINDS = (("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "nccl")),
            ("attention", ("fmha", "flash", "sdpa", "short_attention")),
            ("pallas", ("pallas_call",)),  # an HLO op of a Pallas kernel (the SAMI step's: short_attention's)
            ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "convolution", "dot", "gelu_mlp")),
            ("copy/transpose", ("transpose", "copy", "memcpy", "memset")),
            ("reduction fusion", ("input_", "reduce")),
            ("elementwise fusion", ("loop_",)),
            ("other fusion", ("fusion",)))


def op_kind(name: str) -> str:
  """The first of ``OP_KINDS`` whose marks the name holds, else "other"."""
  lower = name.lower()
  return next((kind for kind, marks in OP_KINDS if any(mark in lower for mark in marks)), "other")


def _hlo_instruction(name: str, stats: dict) -> str:
  """The HLO instruction of a trace event: its ``hlo_op`` stat, else one in an annotation that holds it
  (``Thunk:#name=...,hlo_op=fusion.6#``, XLA's GPU kernel annotation), else the event's own name."""
  if stats.get("hlo_op"):
    return str(stats["hlo_op"])
  found = next((re.search(r"hlo_op=([^,#]+)", value) for value in stats.values()
                if isinstance(value, str) and "hlo_op=" in value), None)
  return found.group(1) if found else name


def profile_top_ops(run, trace_dir: str, calls: int = 3, top: int = 25) -> tuple[list[dict], dict[str, float]]:
  """Traces ``calls`` calls of ``run`` → (the device ops that took the most time, seconds per call by HLO
  instruction).

  Reads the trace back with ``jax.profiler.ProfileData``: on an accelerator the
  ops of the device planes' "XLA Ops" lines (fusions, GEMMs, ... with their HLO
  instruction), on CPU the host's XLA thread events. Each row: op name, its kind
  (``op_kind``), total ms per call, share of the op time, count, and its HLO
  instruction. Also prints the time per kind over all ops, and writes the rows
  and the kinds to ``trace_dir/top_ops.json``. The seconds by HLO instruction (an event's ``hlo_op``, as XLA
  annotates each kernel it launches; else the event's name) are for ``hlo_kernels.against_floor``.
  """
  import glob  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(run())
  jax.profiler.start_trace(trace_dir)
  for _ in range(calls):
    jax.block_until_ready(run())
  jax.profiler.stop_trace()
  path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  data = jax.profiler.ProfileData.from_file(path)
  totals, counts, sources, by_instruction = {}, {}, {}, {}
  device_planes = [p for p in data.planes if p.name.startswith("/device:")]
  for plane in device_planes or [p for p in data.planes if p.name == "/host:CPU"]:
    lines = [line for line in plane.lines if line.name != "python"]  # python: the host's own calls
    if device_planes:  # HLO ops if the trace has them, else the streams' kernels
      lines = [line for line in lines if line.name == "XLA Ops"] or [
          line for line in lines if line.name.startswith("Stream")]
    for line in lines:
      for event in line.events:
        totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
        counts[event.name] = counts.get(event.name, 0) + 1
        stats = dict(event.stats)
        instruction = _hlo_instruction(event.name, stats)
        by_instruction[instruction] = by_instruction.get(instruction, 0.0) + event.duration_ns / 1e9 / calls
        if event.name not in sources:
          # the HLO instruction (shapes, fusion kind) where the trace has it; jax 0.11's GPU "tf_op" is "XlaModule:"
          sources[event.name] = str(stats.get("long_name") or stats.get("tf_op") or "")[:140]
  grand = sum(totals.values()) or 1.0
  rows = [{"op": name, "kind": op_kind(name), "ms_per_call": round(ns / 1e6 / calls, 3),
           "share": round(ns / grand, 3), "count": counts[name] // calls, "source": sources[name]}
          for name, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
  kinds: dict = {}
  for name, ns in totals.items():
    kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + ns
  print(f"profile ({'device' if device_planes else 'host'} op time {grand / 1e6 / calls:.2f} ms per call):")
  print("  by kind: " + ", ".join(f"{kind} {ns / 1e6 / calls:.2f} ms ({100 * ns / grand:.0f}%)"
                                  for kind, ns in sorted(kinds.items(), key=lambda kv: -kv[1])))
  for row in rows:
    print(f"  {row['ms_per_call']:9.3f} ms {100 * row['share']:5.1f}% ×{row['count']:<4} {row['op'][:40]:40} "
          f"{row['source']}")
  with open(os.path.join(trace_dir, "top_ops.json"), "w") as f:
    json.dump({"op_ms_per_call": grand / 1e6 / calls, "kinds_ms_per_call": {
        kind: ns / 1e6 / calls for kind, ns in kinds.items()}, "top": rows}, f, indent=1)
  return rows, by_instruction


def print_against_floor(compiled, measured: dict[str, float], peak: float, bandwidth: float, trace_dir: str,
                        top: int = 15) -> dict:
  """A profile's kernel times (``profile_top_ops``) beside the compiled program's kernel floors at ``peak`` TFLOP/s
  and ``bandwidth`` TB/s (``hlo_kernels.against_floor``): printed, the operations losing the most time first, and
  written to ``trace_dir/against_floor.json``."""
  table = hlo_kernels.against_floor(hlo_kernels.kernels(compiled.as_text()), measured, peak * 1e12, bandwidth * 1e12)
  print(f"kernel time against the floor: {table['measured_ms']:.2f} ms measured, {table['floor_ms']:.2f} ms floor; "
        f"tiny kernels {table['tiny_measured_ms']:.2f} ms; not matched to a kernel {table['unmatched_ms']:.2f} ms; "
        f"kernels without a time {table['kernels_without_time']}")
  for row in table["rows"][:top]:
    where = row["operation"] if len(row["operation"]) <= 80 else "…" + row["operation"][-79:]
    print(f"  {row['kind']:15} {where:80} ×{row['count']:<4} {row['measured_ms']:7.3f} ms  floor "
          f"{row['floor_ms']:7.3f} ms  ×{row['times_floor'] or 0:5.1f}  {row['over_floor_ms']:+.3f} ms")
  with open(os.path.join(trace_dir, "against_floor.json"), "w") as f:
    json.dump(table, f, indent=1)
  return table


def time_train_step(compiled, state, data, rng, args, name: str, peak: Optional[float]) -> float:
  """Seconds per step of a compiled ``(state, batch, rng) -> (state, metrics)`` step (state donated and
  threaded through), after ``args.warmup`` steps; with ``args.profile`` also the top device ops and, on a GPU,
  their time against the kernels' floors (``print_against_floor``)."""
  holder = [state]

  def run_step():
    holder[0], metrics = compiled(holder[0], data, rng)
    return metrics["loss"]

  for _ in range(args.warmup):
    jax.block_until_ready(run_step())
  seconds = time_steps(run_step, args.steps, args.repeats)
  if args.profile:
    trace_dir = os.path.join(args.profile, name)
    measured = profile_top_ops(run_step, trace_dir)[1]
    bandwidth = chip_figure(jax.devices()[0], PEAK_TBPS)
    if peak and bandwidth:  # a GPU of known figures
      print_against_floor(compiled, measured, peak, bandwidth, trace_dir)
  return seconds


def _describe(args) -> str:
  """The devices (``--gpu-spec``: the GPU compiled for), jax's version and the XLA options in effect (``XLA_FLAGS``)."""
  flags = os.environ.get("XLA_FLAGS", "").strip()
  device, described = _devices(args)[0], bool(getattr(args, "gpu_spec", ""))
  devices = (f"1 × {device.device_kind} (described, not attached: compiled, not run; XLA's autotuner off)"
             if described
             else f"{jax.device_count()} × {device.device_kind} ({device.platform})")
  return f"{devices}, jax {jax.__version__}" + (f", XLA_FLAGS={flags}" if flags else "")


def each_setting(settings: Sequence[dict], measure) -> list[dict]:
  """``measure(**setting)`` for each setting, one printed JSON row each (the setting, then its figures).

  A setting that fails (e.g. cuDNN's attention refusing a shape, or no cuDNN) gives a row with its
  error and the others still run.
  """
  rows = []
  for setting in settings:
    try:
      figures = measure(**setting)
    except Exception as e:  # pylint: disable=broad-except
      figures = {"error": f"{type(e).__name__}: {e}"[:400]}
    row = {key: dataclasses.asdict(value) if isinstance(value, (Kernels, Tiling, MatmulTiling)) else value
           for key, value in setting.items()}
    rows.append({**row, **figures})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _kernels_name(kernels: Kernels) -> str:
  """A file name for a kernel set (a tiling's "/" made "-")."""
  return "_".join(str(value) for value in dataclasses.astuple(kernels)).replace("/", "-")


def _model_settings(args) -> list[dict]:
  """Every student / model size × kernel set × remat policy × microbatch count of ``sami`` and ``finetune``."""
  return [{"variant": v, "kernels": k, "remat": r, "microbatches": m}
          for v in args.variants for k in args.kernels for r in args.remat for m in args.microbatches]


def _each_model_setting(args, measure) -> list[dict]:
  """``each_setting`` over ``_model_settings``, with attention "auto" resolved for the devices measured (also a GPU
  compiled for without being attached: ``--gpu-spec``); on a GPU each row's ``attention_kernels`` says which
  kernels it ran."""
  devices = _devices(args)
  peak = peak_tflops(devices[0], getattr(args, "peak_tflops", 0.0))
  with attention_device(devices[0]):
    return each_setting(_model_settings(args), functools.partial(measure, args, devices, peak=peak))


def _devices(args) -> Sequence[jax.Device]:
  """The attached devices, or with ``--gpu-spec`` one of the described GPU (``hlo_kernels.gpu_devices``)."""
  return hlo_kernels.gpu_devices(args.gpu_spec) if getattr(args, "gpu_spec", "") else jax.devices()


def bench_sami(args) -> list[dict]:
  return _each_model_setting(args, _bench_sami_setting)


def _bench_sami_setting(args, devices: Sequence[jax.Device], variant: str, kernels: Kernels, remat: str,
                        microbatches: int, peak: Optional[float]) -> dict:
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.models.sami import SamiConfig, SamiModel
  from efficientsam_jax.train import sharding
  from efficientsam_jax.train.optim import make_optimizer
  from efficientsam_jax.train.sami import make_loss_fn, make_train_step

  mesh = sharding.make_mesh({"data": -1, "fsdp": args.fsdp}, devices)
  config = SamiConfig.from_variant(variant)
  batch = args.batch_per_device * mesh.size
  model = SamiModel(config, dtype=jnp.dtype(args.dtype), remat=remat, kernels=kernels)
  tx, schedule = make_optimizer({
      "optimizer": {"b1": 0.9, "b2": 0.95, "weight_decay": 0.05}, "global_batch_size": batch,
      "total_steps": 1000, "lr": {"base_lr": 1.5e-4, "warmup_steps": 10, "schedule": "cosine"}})
  side = config.img_size
  init = lambda rng: model.init(rng, jnp.zeros((1, side, side, 3)), rng)["params"]
  make_data = lambda: {
      "images": jax.random.randint(jax.random.PRNGKey(1), (batch, side, side, 3), 0, 256).astype(jnp.uint8),
      "targets": jax.random.normal(jax.random.PRNGKey(2), (batch, config.num_tokens, config.target_dim))}
  state, shardings, data, rng = _step_inputs(args, mesh, init, tx, make_data)
  compiled, compile_s, compile_figures = _compile(args, make_train_step(model, tx, schedule, microbatches=microbatches),
                                                  mesh, shardings, state, data, rng)
  flops = sami_train_flops_per_image(config) * batch / mesh.size  # per device
  loss = make_loss_fn(model)
  kept = saved_residual_bytes(lambda params: loss(params, *_traceable(data, rng)), state.params)  # w.r.t. params
  row = {"dtype": args.dtype, "batch": batch, "compile_s": round(compile_s, 1), **compile_figures,
         "model_gflop_per_step": round(flops / 1e9, 1), "kept_mb_per_example": kept and round(kept / batch / 1e6, 1),
         **_compiled_figures(compiled), **_kernel_figures(compiled, devices[0], flops, peak)}
  if not args.compile_only and not args.gpu_spec:
    name = f"sami_{variant}_{_kernels_name(kernels)}_{remat}_m{microbatches}"
    seconds = time_train_step(compiled, state, data, rng, args, name, peak)
    row.update(ms_per_step=round(1e3 * seconds, 2), img_per_s=round(batch / seconds, 1))
    if peak:
      row["mfu"] = round(flops / seconds / (peak * 1e12), 4)
  return row


def _step_inputs(args, mesh, init_params: Callable, tx, make_data: Callable) -> tuple:
  """(state, shardings, batch, rng) of a train step on ``mesh``: real arrays, or with ``--gpu-spec`` (devices that
  are not attached) their shapes in their shardings, nothing allocated."""
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.train import sharding
  from efficientsam_jax.train.state import abstract_train_state, create_train_state
  batch_sharding = sharding.batch_sharding(mesh)
  if args.gpu_spec:
    state, shardings = abstract_train_state(init_params, tx, mesh)
    data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                        jax.eval_shape(make_data))
    return state, shardings, data, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  state, shardings = create_train_state(init_params, tx, jax.random.PRNGKey(0), mesh)
  return state, shardings, jax.device_put(make_data(), batch_sharding), jax.random.PRNGKey(3)


def _compile(args, step_fn: Callable, mesh, shardings, state, data, rng) -> tuple:
  """The jitted step (``loop.jit_train_step``) compiled for these inputs (``--gpu-spec``: for the described GPU,
  ``hlo_kernels.compile_deviceless``) → (compiled, seconds it took, figures for the row)."""
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.train import sharding
  from efficientsam_jax.train.loop import jit_train_step
  step = jit_train_step(step_fn, shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh))
  start = time.perf_counter()
  lowered, figures = step.lower(state, data, rng), {}
  if args.gpu_spec:
    compiled, options = hlo_kernels.compile_deviceless(lowered)
    figures["triton_gemm"] = options.get("xla_gpu_enable_triton_gemm", True)
  else:
    compiled = lowered.compile()
  return compiled, time.perf_counter() - start, figures


def _traceable(*tree):
  """``tree`` with shapes-only leaves (``--gpu-spec``) as zeros on the host: values to trace a loss with."""
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, tree)


def _kernel_figures(compiled, device: jax.Device, model_flops: Optional[float], peak: Optional[float]) -> dict:
  """On a GPU (attached or described: ``--gpu-spec``), what the compiled step's kernels move and compute
  (``hlo_kernels.summary``) and, given the model FLOPs, the MFU its roofline would give (FLOPs / roofline / peak)."""
  bandwidth = chip_figure(device, PEAK_TBPS)
  if device.platform != "gpu" or not peak or not bandwidth:
    return {}
  program = hlo_kernels.kernels(compiled.as_text())
  figures = hlo_kernels.summary(program, peak, bandwidth)
  attention_kernels = [k for k in program if k.kind == "attention"]
  figures["attention_kernels"] = {"pallas": sum("short_attention" in k.source for k in attention_kernels),
                                  "cudnn": sum("short_attention" not in k.source for k in attention_kernels)}
  if model_flops:
    figures["roofline_mfu"] = round(model_flops / (figures["roofline_ms"] / 1e3) / (peak * 1e12), 4)
  print("kernels moving the most bytes (kind, JAX operation, count, GB, TFLOP):")
  for group in hlo_kernels.by_operation(program, top=12):
    operation = group["operation"] if len(group["operation"]) <= 90 else "…" + group["operation"][-89:]
    print(f"  {group['kind']:15} {operation:90} ×{group['count']:<4} {group['gb']:7.2f} GB "
          f"{group['tflop']:7.3f} TFLOP")
  return figures


def _compiled_figures(compiled) -> dict:
  """XLA's FLOPs, bytes accessed and memory estimate of a compiled step."""
  flops, bytes_accessed = compiled_cost(compiled), compiled_cost(compiled, "bytes accessed")
  memory = compiled_memory_bytes(compiled)
  return {"xla_gflop_per_step": flops and round(flops / 1e9, 1),
          "xla_gbytes_per_step": bytes_accessed and round(bytes_accessed / 1e9, 2),
          "xla_mem_gib": memory and round(memory / 2**30, 2)}


def bench_finetune(args) -> list[dict]:
  return _each_model_setting(args, _bench_finetune_setting)


def _bench_finetune_setting(args, devices: Sequence[jax.Device], variant: str, kernels: Kernels, remat: str,
                            microbatches: int, peak: Optional[float]) -> dict:
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, init_params
  from efficientsam_jax.train import sharding
  from efficientsam_jax.train.finetune import make_loss_fn, make_train_step
  from efficientsam_jax.train.finetune_config import get_finetune_config
  from efficientsam_jax.train.optim import make_optimizer

  mesh = sharding.make_mesh({"data": -1, "fsdp": args.fsdp}, devices)
  job = get_finetune_config(variant)
  job.loss.correction_steps = args.correction_steps
  config = EfficientSamConfig.from_variant(variant)
  model = EfficientSam(config, dtype=jnp.dtype(args.dtype), remat=remat, encoder_kernels=kernels)
  batch = args.batch_per_device * mesh.size
  tx, schedule = make_optimizer({"optimizer": job.optimizer.to_dict(), "global_batch_size": batch,
                                 "total_steps": 1000, "lr": {**job.lr.to_dict(), "warmup_steps": 0}})
  grid, side = config.low_res_size, config.img_size

  def make_data():
    corner = jax.random.randint(jax.random.PRNGKey(1), (batch, args.masks, 2), 0, grid // 2)
    ys, xs = jnp.arange(grid)[:, None], jnp.arange(grid)[None, :]
    y0, x0 = corner[..., 0, None, None], corner[..., 1, None, None]
    masks = ((ys >= y0) & (ys < y0 + grid // 4) & (xs >= x0) & (xs < x0 + grid // 3)).astype(jnp.uint8)
    boxes = jnp.stack([x0[..., 0, 0], y0[..., 0, 0], x0[..., 0, 0] + grid // 3, y0[..., 0, 0] + grid // 4],
                      -1).astype(jnp.float32) * (side / grid)
    return {"image": jax.random.randint(jax.random.PRNGKey(2), (batch, side, side, 3), 0, 256).astype(jnp.uint8),
            "masks": masks, "valid": jnp.ones((batch, args.masks), bool), "boxes": boxes}

  state, shardings, data, rng = _step_inputs(args, mesh, lambda rng: init_params(model, rng), tx, make_data)
  compiled, compile_s, compile_figures = _compile(args, make_train_step(model, tx, schedule, job.loss, microbatches),
                                                  mesh, shardings, state, data, rng)
  loss = make_loss_fn(model, job.loss)
  kept = saved_residual_bytes(lambda params: loss(params, *_traceable(data, rng, rng))[0], state.params)
  row = {"dtype": args.dtype, "batch": batch, "masks_per_image": args.masks, "rounds": 1 + args.correction_steps,
         "compile_s": round(compile_s, 1), **compile_figures, "kept_mb_per_example": kept and round(kept / batch / 1e6),
         **_compiled_figures(compiled), **_kernel_figures(compiled, devices[0], None, peak)}
  if not args.compile_only and not args.gpu_spec:
    name = f"finetune_{variant}_{_kernels_name(kernels)}_{remat}_m{microbatches}"
    seconds = time_train_step(compiled, state, data, rng, args, name, peak)
    row.update(ms_per_step=round(1e3 * seconds, 1), img_per_s=round(batch / seconds, 2),
               masks_per_s=round(batch * args.masks / seconds, 1))
  return row


def bench_teacher(args) -> list[dict]:
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.data.precompute import build_teacher, get_precompute_config, make_teacher_fn
  teacher_config = get_precompute_config().teacher  # random ViT-H (speed does not depend on the weights)
  model, params, description = build_teacher(teacher_config)
  print(f"teacher: {description}")
  batch = args.batch_per_device * jax.local_device_count()

  def measure(mode: str, attention: str) -> dict:
    apply = make_teacher_fn(model, params, mode, batch, jnp.dtype(args.dtype), attention)
    views = np.random.default_rng(0).integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8)
    start = time.perf_counter()
    apply(views)
    compile_s = time.perf_counter() - start
    seconds = time_steps(lambda: apply(views), args.steps, args.repeats)
    if args.profile:
      profile_top_ops(lambda: apply(views), os.path.join(args.profile, f"teacher_{mode}_{attention}"), calls=1)
    return {"dtype": args.dtype, "batch": batch, "size": args.size, "first_call_s": round(compile_s, 1),
            "ms_per_batch": round(1e3 * seconds, 1), "views_per_s": round(batch / seconds, 1)}

  return each_setting([{"mode": m, "attention": a} for m in args.modes for a in args.attention], measure)


def bench_sami_input(args) -> list[dict]:
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.data import teacher_records as tr
  from efficientsam_jax.data.precompute import bundled_images, precompute
  from efficientsam_jax.data.sami_input import sami_dataset

  grid = args.size // 16

  def fake_teacher(views):  # the records' features: shape and dtype of the real ones
    return np.random.default_rng(len(views)).normal(size=(len(views), grid, grid, 256)).astype(np.float16)

  with tempfile.TemporaryDirectory() as tmp:
    sources = tr.list_image_folder(bundled_images(os.path.join(tmp, "images")))
    views = -(-args.records // len(sources))
    out = os.path.join(tmp, "records")
    shards = min(args.shards, len(sources))  # at most one shard per source image
    precompute(sources, out, fake_teacher, num_shards=shards, views_per_image=views, size=args.size, seed=0,
               batch_size=64, job_hash="benchmark", log=lambda _: None)
    paths = [os.path.join(out, n) for n in sorted(tr.Manifest(out).entries())]
    iterator = iter(sami_dataset(paths, local_batch_size=args.batch, seed=0, shuffle_window=args.shuffle_window,
                                 cycle_length=shards))
    for _ in range(args.warmup):
      next(iterator)
    samples = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      for _ in range(args.steps):
        next(iterator)
      samples.append(args.steps * args.batch / (time.perf_counter() - start))
  row = {"records": len(sources) * views, "batch": args.batch, "size": args.size,
         "samples_per_s": round(statistics.median(samples), 1), "cpus": len(os.sched_getaffinity(0))}
  print(json.dumps(row), flush=True)
  return [row]


def parse_tilings(text: str) -> list[Tiling]:
  """``"64,4,16,8;32,4,16,8,2,32"`` → Tilings (``Tiling.parse``): block_q, warps, block_q_backward,
  warps_backward[, heads_per_program[, block_k_backward]] each."""
  try:
    return [Tiling.parse(item) for item in text.split(";")]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"tilings {text!r}: {e}") from e


def _kernel_inputs(args, shapes: Sequence[tuple]) -> list:
  """Arrays of these shapes in ``args.dtype``: random, or with ``--gpu-spec`` placeholders on the described GPU."""
  dtype = jnp.dtype(args.dtype)
  if args.gpu_spec:
    sharding = jax.sharding.SingleDeviceSharding(hlo_kernels.gpu_devices(args.gpu_spec)[0])
    return [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape in shapes]
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
  return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes)]


def _forward_and_train(fn, inputs: list, forward_flops: float, train_flops: float) -> tuple:
  """(name, jitted function, its inputs, model FLOPs) of ``fn(*inputs[:-1])`` ("forward") and of the gradients of
  Σ fn(...)·inputs[-1] in every input but the last ("train": what a training step's backward pass computes)."""
  n = len(inputs) - 1
  train = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a[:n]).astype(jnp.float32) * a[n]), tuple(range(n))))
  return ("forward", jax.jit(fn), inputs[:n], forward_flops), ("train", train, inputs, train_flops)


def _measure_parts(args, parts, reference: Optional[dict], prefix: str) -> dict:
  """Each part (``_forward_and_train``): ms, TFLOP/s and the largest difference from ``reference``'s outputs (by
  part) over their largest value; with ``--gpu-spec``, compiled for that GPU instead: kernel count and GB, and the
  registers and spills per thread of the Pallas kernels whose names start with ``prefix``
  (``hlo_kernels.triton_kernel_resources``)."""
  row = {}
  for name, run, arrays, flops in parts:
    if args.gpu_spec:
      compiled, registers = hlo_kernels.triton_kernel_resources(run.lower(*arrays), prefix=prefix)
      program = hlo_kernels.kernels(compiled.as_text())
      row.update({f"{name}_kernels": len(program), f"{name}_gb": round(sum(k.bytes for k in program) / 1e9, 3),
                  **({f"{name}_ptxas": registers} if registers else {})})
      continue
    got = run(*arrays)
    error = max(float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max())
                for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference[name])))
    seconds = time_steps(lambda: run(*arrays), args.steps, args.repeats)  # pylint: disable=cell-var-from-loop
    row.update({f"{name}_ms": round(1e3 * seconds, 3), f"{name}_tflops": round(flops / seconds / 1e12, 1),
                f"{name}_relative_error": float(f"{error:.2g}")})
  return row


def _fp32_reference(args, parts) -> Optional[dict]:
  """Each part's outputs on its inputs in fp32 (None with ``--gpu-spec``: nothing runs)."""
  if args.gpu_spec:
    return None
  return {name: run(*[a.astype(jnp.float32) for a in arrays]) for name, run, arrays, _ in parts}


def parse_mlp_implementations(text: str) -> list[str]:
  """``"xla,pallas"`` → ["xla", "pallas"] (the MLP has no other)."""
  names = text.split(",")
  if not set(names) <= {"xla", "pallas"}:
    raise argparse.ArgumentTypeError(f"MLP implementations are xla and pallas, got {text!r}")
  return names


def parse_matmul_tilings(text: str) -> list[MatmulTiling]:
  """``"128/128/64/8/3;64/128/64/4/4"`` → MatmulTilings: block_m, block_n, block_k, warps, stages each."""
  try:
    values = [[int(v) for v in re.split(r"[/,]", item)] for item in text.split(";")]
    if any(len(v) != 5 for v in values):
      raise ValueError("5 numbers each")
    return [MatmulTiling(*v) for v in values]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"tilings {text!r}: {e}") from e


def _implementations_side_by_side(args, parts, other, pallas, prefix: str, header: str) -> list[dict]:
  """A row per ``args.implementations``, "pallas" once per ``args.tilings`` (``pallas(tiling)``), any other
  ``other(implementation)``, each measured by ``_measure_parts`` against ``other("xla")`` in fp32; ``parts(fn)``:
  ``_forward_and_train``'s parts of fn. ``header`` is printed first."""
  reference = _fp32_reference(args, parts(other("xla")))

  def measure(implementation: str, tiling) -> dict:
    fn = pallas(tiling) if implementation == "pallas" else other(implementation)
    return _measure_parts(args, parts(fn), reference, prefix)

  settings = [{"implementation": i, "tiling": t if i == "pallas" else None}
              for i in args.implementations for t in (args.tilings if i == "pallas" else [None])]
  print(header, flush=True)
  return each_setting(settings, measure)


def bench_attention(args) -> list[dict]:
  """``attention`` (module docstring): each implementation (pallas: × tiling) on the same random inputs."""
  shape = lambda tokens: (args.batch, tokens, args.heads, args.head_dim)
  inputs = _kernel_inputs(args, [shape(t) for t in (args.queries, args.keys, args.keys, args.queries)])
  forward_flops = 4.0 * args.batch * args.heads * args.queries * args.keys * args.head_dim
  return _implementations_side_by_side(
      args, lambda fn: _forward_and_train(fn, inputs, forward_flops, 3.5 * forward_flops),
      lambda implementation: functools.partial(attention, implementation=implementation),
      lambda tiling: functools.partial(short_attention, tiling=tiling), "short_attention",
      f"attention: q {shape(args.queries)}, k and v {shape(args.keys)}, {args.dtype}; train = forward + the "
      f"gradients of q, k, v; TFLOP/s of 4·B·N·Tq·Tk·H forward, 3.5 times that for train")


def bench_mlp(args) -> list[dict]:
  """``mlp`` (module docstring): the XLA MLP and the Pallas one (× tiling) on the same random inputs."""
  rows, width, hidden = (args.batch, args.tokens), args.width, args.hidden
  inputs = _kernel_inputs(args, [(*rows, width), (width, hidden), (hidden,), (hidden, width), (width,),
                                 (*rows, width)])
  forward_flops = 4.0 * math.prod(rows) * width * hidden
  approximate = args.gelu == "tanh"
  return _implementations_side_by_side(
      args, lambda fn: _forward_and_train(fn, inputs, forward_flops, 3.0 * forward_flops),
      lambda implementation: functools.partial(xla_mlp, approximate=approximate),
      lambda tiling: functools.partial(gelu_mlp, approximate=approximate, tiling=tiling), "gelu_mlp",
      f"mlp: x {(*rows, width)}, hidden {hidden}, {args.gelu} GELU, {args.dtype}; train = forward + the gradients "
      f"of x and the four parameters; TFLOP/s of 4·rows·C·F forward, 3 times that for train")


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--steps", type=int, default=10, help="timed steps (batches) per repeat")
  common.add_argument("--repeats", type=int, default=3)
  common.add_argument("--warmup", type=int, default=2)
  common.add_argument("--json", default="", help="also write the rows to this file")
  common.add_argument("--profile", default="", help="trace a few steps into this directory and print the top ops")
  sami = sub.add_parser("sami", parents=[common])
  sami.add_argument("--kernels", type=parse_kernels,
                    default=[Kernels(**get_sami_config("s").kernels.to_dict())],
                    help="';'-separated implementation sets to compare (default: the SAMI configs' choice)")
  sami.add_argument("--variants", type=lambda s: s.split(","), default=["ti", "s", "b"])
  sami.add_argument("--batch-per-device", type=int, default=256)
  sami.add_argument("--dtype", default="bfloat16")
  sami.add_argument("--remat", type=parse_remat, default=[get_sami_config("s").remat],
                    help=REMAT_HELP + " (default: the SAMI configs')")
  sami.add_argument("--fsdp", type=int, default=1)
  sami.add_argument("--microbatches", type=parse_ints, default=[1], help=MICROBATCHES_HELP)
  sami.add_argument("--peak-tflops", type=float, default=0.0, help="override the per-chip bf16 peak")
  sami.add_argument("--compile-only", action="store_true")
  sami.add_argument("--gpu-spec", default="", choices=["", *hlo_kernels.GPU_TARGETS], help=GPU_SPEC_HELP)
  finetune = sub.add_parser("finetune", parents=[common])
  finetune.add_argument("--kernels", type=parse_kernels,
                        default=[Kernels(**get_finetune_config("ti").kernels.to_dict())],
                        help="';'-separated implementation sets of the image encoder to compare "
                             "(default: the finetuning configs' choice)")
  finetune.add_argument("--variants", type=lambda s: s.split(","), default=["ti", "s"])
  finetune.add_argument("--batch-per-device", type=int, default=8)
  finetune.add_argument("--masks", type=int, default=64, help="masks per image")
  finetune.add_argument("--correction-steps", type=int, default=2)
  finetune.add_argument("--dtype", default="bfloat16")
  finetune.add_argument("--remat", type=parse_remat, default=[get_finetune_config("ti").remat],
                        help=REMAT_HELP + " (default: the finetuning configs' choice)")
  finetune.add_argument("--fsdp", type=int, default=1)
  finetune.add_argument("--microbatches", type=parse_ints, default=[1], help=MICROBATCHES_HELP)
  finetune.add_argument("--compile-only", action="store_true")
  finetune.add_argument("--gpu-spec", default="", choices=["", *hlo_kernels.GPU_TARGETS], help=GPU_SPEC_HELP)
  teacher = sub.add_parser("teacher", parents=[common])
  teacher.add_argument("--modes", type=lambda s: s.split(","), default=["upsample", "native"])
  teacher.add_argument("--batch-per-device", type=int, default=16)
  teacher.add_argument("--dtype", default="bfloat16")
  teacher.add_argument("--attention", type=lambda s: s.split(","), default=["xla"], help="xla,cudnn: compare both")
  teacher.add_argument("--size", type=int, default=224)
  attend = sub.add_parser("attention", parents=[common])
  attend.add_argument("--implementations", type=lambda s: s.split(","), default=["xla", "cudnn", "pallas"])
  attend.add_argument("--tilings", type=parse_tilings, default=[Tiling()],
                      help="pallas: block_q,warps,block_q_backward,warps_backward[,heads_per_program"
                      "[,block_k_backward]] sets separated by ';'")
  attend.add_argument("--batch", type=int, default=256)
  attend.add_argument("--queries", type=int, default=147)
  attend.add_argument("--keys", type=int, default=196)
  attend.add_argument("--heads", type=int, default=16)
  attend.add_argument("--head-dim", type=int, default=32)
  attend.add_argument("--dtype", default="bfloat16")
  attend.add_argument("--gpu-spec", default="", choices=["", *hlo_kernels.GPU_TARGETS],
                      help=GPU_SPEC_HELP + "; the Pallas kernels' registers and spills (ptxas)")
  mlp = sub.add_parser("mlp", parents=[common])
  mlp.add_argument("--implementations", type=parse_mlp_implementations, default=["xla", "pallas"],
                   help="xla and/or pallas, ','-separated")
  mlp.add_argument("--tilings", type=parse_matmul_tilings, default=[MatmulTiling()],
                   help="pallas: block_m/block_n/block_k/warps/stages sets separated by ';'")
  mlp.add_argument("--batch", type=int, default=256)
  mlp.add_argument("--tokens", type=int, default=147)
  mlp.add_argument("--width", type=int, default=512)
  mlp.add_argument("--hidden", type=int, default=2048)
  mlp.add_argument("--gelu", default="exact", choices=["exact", "tanh"])
  mlp.add_argument("--dtype", default="bfloat16")
  mlp.add_argument("--gpu-spec", default="", choices=["", *hlo_kernels.GPU_TARGETS],
                   help=GPU_SPEC_HELP + "; the Pallas kernels' registers and spills (ptxas)")
  data = sub.add_parser("sami-input", parents=[common])
  data.add_argument("--records", type=int, default=2048)
  data.add_argument("--shards", type=int, default=8)
  data.add_argument("--batch", type=int, default=256)
  data.add_argument("--size", type=int, default=224)
  data.add_argument("--shuffle-window", type=int, default=1024)
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parse_args(argv)
  print(f"devices: {_describe(args)}", flush=True)
  rows = {"sami": bench_sami, "finetune": bench_finetune, "teacher": bench_teacher,
          "sami-input": bench_sami_input, "attention": bench_attention, "mlp": bench_mlp}[args.what](args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"devices": _describe(args), "what": args.what, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
