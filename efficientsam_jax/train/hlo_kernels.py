"""What a compiled XLA program's kernels read, write and compute, from its optimized HLO; and GPU compiles
without a GPU.

``kernels(compiled.as_text())`` lists the device kernels of the entry computation (fusions, cuBLAS/cuDNN
custom calls, copies, collectives; ``while`` bodies times their known trip count, the computations of
``call``s such as command buffers; a ``conditional`` counts as one kernel), each with the bytes of
its operands and results as whole arrays (an upper bound for a fusion that reads part of an operand; a
cuBLAS call's workspace result left out) and its matmul FLOPs (2·m·n·k of each dot, in a fusion too;
cuDNN attention and the Pallas ``short_attention`` kernels: their q·kᵀ and p·v products, forward
4·B·N·T·S·H, backward 2.5 times that with the recomputed logits; the Pallas ``gelu_mlp`` kernels: kind "gemm",
their matmul; other Pallas kernels: kind "pallas", no FLOPs). ``roofline_seconds`` sums each kernel's floor, the
larger of its bytes over the memory bandwidth and its FLOPs over the matmul peak: the time the program would take
if every kernel ran at the chip's limit, a floor that real kernels (launch gaps, small grids, transposes) stay
above.

``against_floor`` sets a profile's kernel times beside those floors: which operations lose the most time.

``gpu_devices("h100")`` are the devices of a GPU that is not there (jax's deviceless compile: it needs
``pip install "jax[cuda12]==<jax's version>"``, no driver or GPU), so a train step can be compiled for an
H100 on any machine and its kernels read: how XLA fuses, lays out and launches the step on the GPU
(``python -m efficientsam_jax.train.benchmark sami --gpu-spec h100``, BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterable, Optional

import jax

# Bytes per element of the HLO element types that occur in these programs.
ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                 "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
                 "u4": 0.5, "token": 0}
# Instructions that launch nothing: views, tuples, parameters and constants (a large constant is a buffer).
NOT_KERNELS = {"parameter", "get-tuple-element", "bitcast", "constant", "tuple", "opt-barrier", "after-all",
               "partition-id", "replica-id", "add-dependency", "domain"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# A GPU that is not attached, for ``gpu_devices``: the device description XLA's GPU compiler reads (its
# GpuTargetConfig text format; NVIDIA's published H100 SXM5 figures: 132 SMs, 3.35 TB/s HBM3, 50 MiB L2).
GPU_TARGETS = {
    "h100": """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}
# The deviceless compile cannot time candidate kernels, so XLA's autotuner is off. Its Triton GEMM fusions stay
# on, as on a real GPU: they change how XLA fuses the elementwise work around the matmuls (compiled here, the
# tenth session's SAMI ViT-S step moves 68.6 GB with them, 59.7 GB without; 69.6 GB on an H200: BENCHMARKS.md). Where
# their tile search fails without the autotuner (the finetuning step), ``compile_deviceless`` compiles with
# ``DEVICELESS_FALLBACK_OPTIONS`` instead: every matmul a cuBLAS call.
DEVICELESS_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}
DEVICELESS_FALLBACK_OPTIONS = {**DEVICELESS_COMPILER_OPTIONS, "xla_gpu_enable_triton_gemm": False}


def compile_deviceless(lowered, **extra) -> tuple:
  """``lowered.compile`` for a GPU that is not attached (``gpu_devices``) → (compiled, the compiler options used:
  ``DEVICELESS_COMPILER_OPTIONS``, or ``DEVICELESS_FALLBACK_OPTIONS`` where Triton's GEMM tiling failed; each
  with the ``extra`` options, e.g. ``xla_dump_to``)."""
  first, fallback = {**DEVICELESS_COMPILER_OPTIONS, **extra}, {**DEVICELESS_FALLBACK_OPTIONS, **extra}
  try:
    return lowered.compile(compiler_options=first), first
  except jax.errors.JaxRuntimeError as e:
    if "tile sizes" not in str(e):
      raise
  return lowered.compile(compiler_options=fallback), fallback


def ptxas_report(text: str) -> dict[str, dict]:
  """``ptxas -v``'s report → {entry function: {"registers", "stack_bytes", "spill_store_bytes",
  "spill_load_bytes"}}: what one thread of each kernel holds (registers over 255 spill to local memory)."""
  report, name = {}, None
  for line in text.splitlines():
    entry = re.search(r"Compiling entry function '([^']+)'", line)
    if entry:
      name = entry.group(1)
      report[name] = {}
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if frame and name:
      report[name].update(zip(("stack_bytes", "spill_store_bytes", "spill_load_bytes"), map(int, frame.groups())))
    used = re.search(r"Used (\d+) registers", line)
    if used and name:
      report[name]["registers"] = int(used.group(1))
  return report


def triton_kernel_resources(lowered, prefix: str = "", arch: str = "sm_90a") -> tuple:
  """Compiles ``lowered`` for an absent GPU (``gpu_devices``) and assembles the PTX of its kernels whose names
  start with ``prefix`` (e.g. Pallas kernels' names) with ptxas for ``arch`` → (compiled, ``ptxas_report`` of
  those kernels). Needs jax's CUDA plugin, whose nvidia-cuda-nvcc package brings ptxas."""
  try:
    import nvidia.cuda_nvcc  # pylint: disable=import-outside-toplevel
    candidates = [f"{path}/bin/ptxas" for path in nvidia.cuda_nvcc.__path__]
  except ImportError:
    candidates = []
  ptxas = next((c for c in [*candidates, shutil.which("ptxas")] if c and os.path.exists(c)), None)
  if ptxas is None:
    raise RuntimeError("no ptxas: it comes with jax's CUDA plugin (pip install \"jax[cuda12]==<jax's version>\")")
  report = {}
  with tempfile.TemporaryDirectory() as dump:
    compiled, _ = compile_deviceless(lowered, xla_dump_to=dump)
    for ptx in sorted(glob.glob(f"{dump}/*.ptx")):
      with open(ptx) as f:
        names = re.findall(r"\.entry (\w+)\(", f.read())
      if any(name.startswith(prefix) for name in names):
        done = subprocess.run([ptxas, "-v", "--gpu-name", arch, ptx, "-o", "/dev/null"], capture_output=True,
                              text=True, check=True)
        report.update((k, v) for k, v in ptxas_report(done.stderr).items() if k.startswith(prefix))
  return compiled, report


@functools.lru_cache(maxsize=None)
def gpu_devices(target: str = "h100", count: int = 1) -> tuple:
  """``count`` devices of the GPU ``target`` (a key of ``GPU_TARGETS``; made once per target and count) for
  ``compile_deviceless(jit(...).lower(...))`` without that GPU; needs jax's
  CUDA plugin installed."""
  if target not in GPU_TARGETS:
    raise ValueError(f"GPU target must be one of {sorted(GPU_TARGETS)}, got {target!r}")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    topology = topologies.get_topology_desc(target, "cuda", target_config=GPU_TARGETS[target],
                                            topology=f"1x1x{count}")
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"compiling for an absent {target} needs jax's CUDA plugin: pip install \"jax[cuda12]==<the "
                       f"installed jax's version>\" (no GPU or driver needed); jax said: {e}") from e
  return tuple(topology.devices)


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result's shape text, a tuple's included
  opcode: str
  operands: list[str]
  attributes: str


@dataclasses.dataclass
class Kernel:
  name: str
  kind: str  # "gemm" (a fusion with a dot too), "attention", "convolution", "fusion:kLoop" / kInput / ..., "copy", ...
  read: int  # bytes of the operands
  written: int  # bytes of the results
  flops: float  # matmul FLOPs
  source: str  # the JAX operation that made it (HLO metadata op_name), "" if none

  @property
  def bytes(self) -> int:
    return self.read + self.written


def _closing(text: str, start: int) -> int:
  """Index of the bracket that closes the one at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """The computations of an HLO module's text (name → instructions) and the entry computation's name."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line.startswith((" ", "\t")):
      header = COMPUTATION.match(line)
      if header and not line.startswith("HloModule"):
        current = computations.setdefault(header.group(2), [])
        entry = header.group(2) if header.group(1) else entry
      elif line.startswith("}"):
        current = None
      continue
    found = INSTRUCTION.match(line) if current is not None else None
    if not found:
      continue
    rest = found.group(2)
    if rest.startswith("("):  # a tuple shape
      end = _closing(rest, 0)
      shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
      shape, _, rest = rest.partition(" ")
    opcode = rest.split("(", 1)[0].strip()
    open_at = rest.index("(") if "(" in rest else len(rest)
    close_at = _closing(rest, open_at) if open_at < len(rest) else open_at
    operands = re.findall(r"%([\w.\-]+)", rest[open_at:close_at + 1])
    current.append(Instruction(found.group(1), shape, opcode, operands, rest[close_at + 1:]))
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")


def arrays(shape: str) -> list[tuple[str, list[int]]]:
  """(element type, dims) of each array in a shape text (a tuple's elements in order)."""
  return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in ARRAY.findall(shape)
          if dtype in ELEMENT_BYTES]


def nbytes(shape: str) -> int:
  return int(sum(ELEMENT_BYTES[dtype] * math.prod(dims) for dtype, dims in arrays(shape)))


def _dims(attributes: str, key: str) -> list[int]:
  """``lhs_contracting_dims={1,2}`` (HLO) or ``"lhs_contracting_dimensions":["1"]`` (a cuBLAS backend_config)."""
  found = (re.search(key + r"_dims=\{([\d,]*)\}", attributes)
           or re.search('"' + key + r'_dimensions":\[([\d",]*)\]', attributes))
  return [int(d) for d in re.findall(r"\d+", found.group(1))] if found else []


def _dot_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
  """2 · (result elements) · (contracted size) of a dot or cuBLAS GEMM."""
  lhs = arrays(shapes.get(instruction.operands[0], ""))
  result = arrays(instruction.shape)
  if not lhs or not result:
    return 0.0
  contracted = math.prod(lhs[0][1][d] for d in _dims(instruction.attributes, "lhs_contracting"))
  return 2.0 * math.prod(result[0][1]) * contracted


def _attention_flops(instruction: Instruction, shapes: dict[str, str], target: str) -> float:
  """cuDNN's or ``short_attention``'s attention on [B, T, N, H] q and [B, S, N, H] k: q·kᵀ and p·v
  (4·B·N·T·S·H), backward 2.5×."""
  q, k = (arrays(shapes.get(name, "")) for name in instruction.operands[:2])
  if not q or not k or len(q[0][1]) != 4:
    return 0.0
  (b, t, n, h), s = q[0][1], k[0][1][1]
  return 4.0 * b * n * t * s * h * (2.5 if "backward" in target.lower() else 1.0)


def _matmul_kernel_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
  """The ``gelu_mlp`` kernels' matmul: a [M, K] operand times a weight of K·N elements ([K, N] or [N, K])."""
  a, w = (arrays(shapes.get(name, "")) for name in instruction.operands[:2])
  if not a or not w:
    return 0.0
  return 2.0 * math.prod(a[0][1]) * math.prod(w[0][1]) / a[0][1][-1]


def _flops(instruction: Instruction, computations, shapes: dict[str, str]) -> float:
  """Matmul FLOPs of an instruction; ``shapes``: every instruction's shape, by name (unique in an HLO module)."""
  if instruction.opcode == "dot":
    return _dot_flops(instruction, shapes)
  if instruction.opcode == "custom-call":
    target = _target(instruction)
    if "gemm" in target or "matmul" in target:
      return _dot_flops(instruction, shapes)
    if "fmha" in target:
      return _attention_flops(instruction, shapes, target)
    if _pallas_name(instruction).startswith("short_attention"):
      return _attention_flops(instruction, shapes, _pallas_name(instruction))
    if _pallas_name(instruction).startswith("gelu_mlp"):
      return _matmul_kernel_flops(instruction, shapes)
    return 0.0
  called = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
  if instruction.opcode == "fusion" and called and called.group(1) in computations:
    return sum(_flops(i, computations, shapes) for i in computations[called.group(1)])
  return 0.0


def _target(instruction: Instruction) -> str:
  found = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
  return found.group(1) if found else ""


def _pallas_name(instruction: Instruction) -> str:
  """The kernel name of a Pallas (Triton) call, "" for any other instruction."""
  found = re.search(r'\bname = "([^"]+)"', instruction.attributes) if "triton" in _target(instruction) else None
  return found.group(1) if found else ""


def _kind(instruction: Instruction) -> str:
  target = _target(instruction)
  if instruction.opcode == "dot" or "gemm" in target or "matmul" in target or _pallas_name(instruction).startswith(
      "gelu_mlp"):
    return "gemm"
  if "fmha" in target or _pallas_name(instruction).startswith("short_attention"):
    return "attention"
  if "triton" in target:
    return "pallas"
  if instruction.opcode == "convolution" or "conv" in target.lower():
    return "convolution"
  if instruction.opcode == "fusion":
    found = re.search(r"kind=(k\w+)", instruction.attributes)
    return "fusion:" + (found.group(1) if found else "?")
  if instruction.opcode.startswith(COLLECTIVES):
    return "collective"
  return instruction.opcode


def _written(instruction: Instruction) -> int:
  """Bytes of the results; a cuBLAS call's scratch workspace (a 1-D s8 tuple element) left out."""
  results = arrays(instruction.shape)
  if instruction.opcode == "custom-call" and instruction.shape.startswith("("):
    results = [(dtype, dims) for dtype, dims in results if not (dtype == "s8" and len(dims) == 1)]
  return int(sum(ELEMENT_BYTES[dtype] * math.prod(dims) for dtype, dims in results))


def _trip_count(instruction: Instruction) -> int:
  found = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instruction.attributes)
  return int(found.group(1)) if found else 1


def kernels(hlo_text: str) -> list[Kernel]:
  """The kernels of an optimized HLO module (``compiled.as_text()``), in program order (see the module doc)."""
  computations, entry = parse_hlo(hlo_text)
  shapes: dict[str, str] = {}
  for instructions in computations.values():
    shapes.update((i.name, i.shape) for i in instructions)

  def walk(name: str, repeat: int) -> Iterable[Kernel]:
    for instruction in computations[name]:
      if instruction.opcode in NOT_KERNELS or instruction.opcode.endswith("-done"):
        continue
      if instruction.opcode in ("while", "call", "async-start"):
        for key in ("body", "to_apply", "calls"):
          for called in re.findall(key + r"=%?([\w.\-]+)", instruction.attributes):
            if called in computations:
              yield from walk(called, repeat * (_trip_count(instruction) if key == "body" else 1))
        continue
      source = re.search(r'op_name="([^"]*)"', instruction.attributes)
      # an array passed twice is read once (e.g. k and v packed in one array, a half through each operand)
      read = sum(nbytes(shapes.get(o, "")) for o in dict.fromkeys(instruction.operands))
      flops = _flops(instruction, computations, shapes)
      kind = "gemm" if flops and instruction.opcode == "fusion" else _kind(instruction)  # e.g. a Triton GEMM fusion
      kernel = Kernel(instruction.name, kind, read, _written(instruction), flops, source.group(1) if source else "")
      for _ in range(repeat):
        yield kernel

  return list(walk(entry, 1))


def roofline_seconds(program: Iterable[Kernel], peak_flops: float, bandwidth: float) -> float:
  """Σ over kernels of max(bytes / bandwidth, FLOPs / peak): the program's time if each kernel ran at the limit."""
  return sum(max(k.bytes / bandwidth, k.flops / peak_flops) for k in program)


def operation(kernel: Kernel) -> str:
  """The JAX operation of a kernel without the jit's name and with block numbers folded (``decoder_blocks_3`` →
  ``decoder_blocks_N``), so that the same operation in every block is one group."""
  return re.sub(r"_\d+(?=/|$)", "_N", re.sub(r"^jit\([^)]*\)/", "", kernel.source))


def by_operation(program: Iterable[Kernel], top: Optional[int] = None) -> list[dict]:
  """Kernels grouped by kind and JAX operation (``operation``): count, GB and TFLOP per group, the most bytes
  first."""
  groups: dict[tuple[str, str], list[float]] = {}
  for k in program:
    group = groups.setdefault((k.kind, operation(k)), [0, 0.0, 0.0])
    group[0] += 1
    group[1] += k.bytes
    group[2] += k.flops
  rows = [{"kind": kind, "operation": source, "count": int(n), "gb": round(b / 1e9, 3), "tflop": round(f / 1e12, 3)}
          for (kind, source), (n, b, f) in sorted(groups.items(), key=lambda kv: -kv[1][1])]
  return rows[:top] if top else rows


# A kernel whose roofline time is under this is "tiny": on a GPU it takes ~2–3 µs whatever its size (its launch and
# its ramp up and down), so a program's tiny kernels cost time that its roofline does not show.
TINY_KERNEL_SECONDS = 2e-6


def summary(program: list[Kernel], peak_tflops: float, bandwidth_tbps: float) -> dict:
  """Figures of a program for a benchmark row: kernel count, how many are tiny (``TINY_KERNEL_SECONDS``), GB moved,
  matmul TFLOP, roofline ms, GB by kind."""
  kinds: dict[str, float] = {}
  for k in program:
    kinds[k.kind] = kinds.get(k.kind, 0.0) + k.bytes
  floor = lambda k: roofline_seconds([k], peak_tflops * 1e12, bandwidth_tbps * 1e12)
  return {"kernel_count": len(program), "tiny_kernels": sum(floor(k) < TINY_KERNEL_SECONDS for k in program),
          "kernel_gb": round(sum(k.bytes for k in program) / 1e9, 2),
          "kernel_tflop": round(sum(k.flops for k in program) / 1e12, 3),
          "roofline_ms": round(1e3 * roofline_seconds(program, peak_tflops * 1e12, bandwidth_tbps * 1e12), 2),
          "gb_by_kind": {kind: round(b / 1e9, 2) for kind, b in sorted(kinds.items(), key=lambda kv: -kv[1])}}


def against_floor(program: list[Kernel], measured: dict[str, float], peak_flops: float, bandwidth: float) -> dict:
  """A profile's kernel times set against the kernels' floors (``roofline_seconds``): where a step loses its time.

  ``measured``: seconds per run of the program by HLO instruction (``benchmark.profile_top_ops``; a GPU kernel's
  name, ``gemm_fusion_dot_578`` for the instruction ``gemm_fusion_dot.578``, matches too). Returns the measured and
  floor ms of the matched kernels, the profile's ms that match no kernel of the program (``unmatched_ms``: the
  runtime's own copies, or names that failed to match), the kernels the profile has no time for, the tiny kernels'
  (``TINY_KERNEL_SECONDS``) measured ms, and rows by kind and JAX operation (``operation``): count, measured ms,
  floor ms, measured / floor and the ms over the floor, the most ms over the floor first.
  """
  canonical = lambda name: re.sub(r"[.\-]", "_", name.lstrip("%"))
  left = {}
  for name, seconds in measured.items():
    left[canonical(name)] = left.get(canonical(name), 0.0) + seconds
  floors: dict[str, list] = {}  # instruction → [kernel, floor seconds summed over its runs, runs]
  for k in program:
    entry = floors.setdefault(k.name, [k, 0.0, 0])
    entry[1] += roofline_seconds([k], peak_flops, bandwidth)
    entry[2] += 1
  groups: dict[tuple[str, str], list[float]] = {}
  unmeasured, tiny_ms = 0, 0.0
  for name, (k, floor, runs) in floors.items():
    seconds = left.pop(canonical(name), None)
    unmeasured += seconds is None
    seconds = seconds or 0.0
    if floor / runs < TINY_KERNEL_SECONDS:
      tiny_ms += 1e3 * seconds
    group = groups.setdefault((k.kind, operation(k)), [0, 0.0, 0.0])
    group[0] += runs
    group[1] += 1e3 * seconds
    group[2] += 1e3 * floor
  rows = [{"kind": kind, "operation": source, "count": int(n), "measured_ms": round(ms, 4), "floor_ms": round(fl, 4),
           "times_floor": round(ms / fl, 2) if fl else None, "over_floor_ms": round(ms - fl, 4)}
          for (kind, source), (n, ms, fl) in sorted(groups.items(), key=lambda kv: kv[1][2] - kv[1][1])]
  return {"measured_ms": round(sum(g[1] for g in groups.values()), 4),
          "floor_ms": round(sum(g[2] for g in groups.values()), 4),
          "unmatched_ms": round(1e3 * sum(left.values()), 4), "kernels_without_time": unmeasured,
          "tiny_measured_ms": round(tiny_ms, 4), "rows": rows}
