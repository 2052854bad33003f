"""hlo_kernels: the kernels of an optimized HLO module, their bytes and FLOPs, and the roofline."""

import jax
import jax.numpy as jnp
import pytest

from efficientsam_jax.train import hlo_kernels

# A GPU module in the form XLA's GPU compiler prints (a cuBLASLt GEMM with its workspace, a fusion, cuDNN's
# attention, a loop of 3 trips): every figure below is counted by hand.
GPU_MODULE = """HloModule jit_step, entry_computation_layout={(bf16[64,32]{1,0})->bf16[64,16]{1,0}}

%fused_gelu (param_0.1: bf16[64,16]) -> bf16[64,16] {
  %param_0.1 = bf16[64,16]{1,0} parameter(0)
  ROOT %tanh.1 = bf16[64,16]{1,0} tanh(%param_0.1)
}

%fused_matmul (p.0: f32[8,4], p.1: f32[4,2]) -> f32[8,2] {
  %p.0 = f32[8,4]{1,0} parameter(0)
  %p.1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.3 = f32[8,2]{1,0} dot(%p.0, %p.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (loop.1: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %loop.1 = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%loop.1), index=0
  %x = f32[8,4]{1,0} get-tuple-element(%loop.1), index=1
  %w = f32[4,2]{1,0} constant({...})
  %mm = f32[8,2]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_matmul
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %x)
}

%cond (loop.2: (s32[], f32[8,4])) -> pred[] {
  %loop.2 = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main.1 (a.1: bf16[64,32], w.1: bf16[32,16], q.1: bf16[2,6,4,8], k.1: bf16[2,10,4,8], v.1: bf16[2,10,4,8], init: (s32[], f32[8,4])) -> bf16[64,16] {
  %a.1 = bf16[64,32]{1,0} parameter(0), metadata={op_name="a"}
  %w.1 = bf16[32,16]{1,0} parameter(1)
  %q.1 = bf16[2,6,4,8]{3,2,1,0} parameter(2)
  %k.1 = bf16[2,10,4,8]{3,2,1,0} parameter(3)
  %v.1 = bf16[2,10,4,8]{3,2,1,0} parameter(4)
  %init = (s32[], f32[8,4]{1,0}) parameter(5)
  %gemm = (bf16[64,16]{1,0}, s8[4194304]{0}) custom-call(%a.1, %w.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/blocks_3/fc1/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %out.0 = bf16[64,16]{1,0} get-tuple-element(%gemm), index=0
  %view = bf16[64,16]{1,0} bitcast(%out.0)
  %fmha = (bf16[2,4,6,8]{3,1,2,0}, f32[2,4,6]{2,1,0}, u8[0]{0}) custom-call(%q.1, %k.1, %v.1), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/blocks_7/dot_product_attention_fwd"}
  %loop = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %gelu = bf16[64,16]{1,0} fusion(%view), kind=kLoop, calls=%fused_gelu, metadata={op_name="jit(step)/blocks_3/mlp/tanh"}
}
"""


def test_kernels_of_a_gpu_module_counted_by_hand():
  program = hlo_kernels.kernels(GPU_MODULE)
  assert [(k.name, k.kind) for k in program] == [
      ("gemm", "gemm"), ("fmha", "attention"), ("mm", "gemm"), ("mm", "gemm"), ("mm", "gemm"),
      ("gelu", "fusion:kLoop")]  # a fusion with a dot (e.g. Triton's GEMM fusions) is a GEMM
  gemm, fmha, loop_matmul, _, _, gelu = program
  # GEMM: reads a and w, writes its result (the 4 MiB workspace is scratch, not traffic); 2·64·16·32 FLOPs.
  assert (gemm.read, gemm.written, gemm.flops) == (64 * 32 * 2 + 32 * 16 * 2, 64 * 16 * 2, 2 * 64 * 16 * 32)
  assert gemm.source == "jit(step)/blocks_3/fc1/dot_general"
  # Attention B=2, T=6, S=10, N=4, H=8: 4·B·N·T·S·H; reads q, k, v; writes the output and the fp32 statistics.
  assert fmha.flops == 4 * 2 * 4 * 6 * 10 * 8
  assert (fmha.read, fmha.written) == (2 * 6 * 4 * 8 * 2 + 2 * (2 * 10 * 4 * 8 * 2), 2 * 4 * 6 * 8 * 2 + 2 * 4 * 6 * 4)
  # The loop body's fusion, once per trip: a dot inside a fusion is counted (2·8·2·4).
  assert (loop_matmul.read, loop_matmul.written, loop_matmul.flops) == (8 * 4 * 4 + 4 * 2 * 4, 8 * 2 * 4, 2 * 8 * 2 * 4)
  # The fusion reads through the bitcast (a view): the GEMM's result.
  assert (gelu.read, gelu.written, gelu.flops) == (64 * 16 * 2, 64 * 16 * 2, 0)
  assert gelu.bytes == gelu.read + gelu.written

  peak, bandwidth = 1e12, 1e9  # 1 TFLOP/s, 1 GB/s: every kernel here is memory-bound
  assert hlo_kernels.roofline_seconds(program, peak, bandwidth) == pytest.approx(
      sum(k.bytes for k in program) / bandwidth)
  assert hlo_kernels.roofline_seconds(program, 1.0, 1e18) == pytest.approx(sum(k.flops for k in program))
  summary = hlo_kernels.summary(program, peak_tflops=1.0, bandwidth_tbps=1e-3)
  assert summary["kernel_count"] == 6 and summary["kernel_tflop"] == round(sum(k.flops for k in program) / 1e12, 3)
  assert summary["tiny_kernels"] == 3  # at 1 GB/s: the loop's three trips of 224 bytes, under 2 µs each
  assert list(summary["gb_by_kind"]) == ["gemm", "attention", "fusion:kLoop"]  # most bytes first
  groups = hlo_kernels.by_operation(program)
  # block numbers folded, the jit prefix dropped; three loop trips of the same fusion in one group
  assert {(g["operation"], g["count"]) for g in groups} == {
      ("blocks_N/fc1/dot_general", 1), ("blocks_N/dot_product_attention_fwd", 1), ("", 3), ("blocks_N/mlp/tanh", 1)}


def test_pallas_kernels_short_attention_counted_as_attention():
  """Pallas calls (Triton custom calls) named by their kernel: the short_attention backward is attention with
  2.5 × 4·B·N·T·S·H FLOPs (q [2, 6, 4, 8], k [2, 10, 4, 8]), its forward 4·B·N·T·S·H also with k and v packed in
  one array [2, 10, 2, 4, 8] (passed twice, read once); another Pallas kernel is "pallas" without FLOPs."""
  module = """HloModule jit_grad

ENTRY %main (q: bf16[2,6,4,8], k: bf16[2,10,4,8], v: bf16[2,10,4,8], o: bf16[2,6,4,8], d: bf16[2,6,4,8], lse: f32[2,4,16], kv: bf16[2,10,2,4,8]) -> bf16[2,6,4,8] {
  %q = bf16[2,6,4,8]{3,2,1,0} parameter(0)
  %k = bf16[2,10,4,8]{3,2,1,0} parameter(1)
  %v = bf16[2,10,4,8]{3,2,1,0} parameter(2)
  %o = bf16[2,6,4,8]{3,2,1,0} parameter(3)
  %d = bf16[2,6,4,8]{3,2,1,0} parameter(4)
  %lse = f32[2,4,16]{2,1,0} parameter(5)
  %kv = bf16[2,10,2,4,8]{4,3,2,1,0} parameter(6)
  %pallas_call.1 = (bf16[2,6,4,8]{3,2,1,0}, bf16[2,10,4,8]{3,2,1,0}, bf16[2,10,4,8]{3,2,1,0}) custom-call(%q, %k, %v, %o, %d, %lse), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, grid_x = 4 : i32, grid_y = 2 : i32, grid_z = 1 : i32, ir = "ML\\EFR", name = "short_attention_backward", num_stages = 2 : i32, num_warps = 8 : i32}
  %pallas_call.3 = (bf16[2,6,4,8]{3,2,1,0}, f32[2,4,16]{2,1,0}) custom-call(%q, %kv, %kv), custom_call_target="__gpu$xla.gpu.triton", backend_config={ir = "ML", name = "short_attention_forward", num_warps = 4 : i32}
  ROOT %pallas_call.2 = bf16[2,6,4,8]{3,2,1,0} custom-call(%q), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, ir = "ML", name = "scale_rows", num_warps = 4 : i32}
}
"""
  backward, forward, other = hlo_kernels.kernels(module)
  q_bytes, k_bytes = 2 * 6 * 4 * 8 * 2, 2 * 10 * 4 * 8 * 2
  assert (backward.kind, backward.flops) == ("attention", 2.5 * 4 * 2 * 4 * 6 * 10 * 8)
  assert backward.read == 3 * q_bytes + 2 * k_bytes + 2 * 4 * 16 * 4
  assert backward.written == q_bytes + 2 * k_bytes
  assert (forward.kind, forward.flops) == ("attention", 4 * 2 * 4 * 6 * 10 * 8)
  assert forward.read == q_bytes + 2 * k_bytes and forward.written == q_bytes + 2 * 4 * 16 * 4
  assert (other.kind, other.flops) == ("pallas", 0.0)


def test_pallas_gelu_mlp_kernels_counted_as_gemms():
  """The ``gelu_mlp`` kernels are GEMMs of 2·M·K·N FLOPs: the forward's x [2, 6, 16] times W1 [16, 64] (writing h
  and GELU(h)), the backward's dy [2, 6, 16] times W2 [64, 16] transposed (writing dh and the bias shares)."""
  module = """HloModule jit_grad

ENTRY %main (x: bf16[2,6,16], w1: bf16[16,64], b1: bf16[64], w2: bf16[64,16], h: bf16[2,6,64]) -> bf16[2,6,64] {
  %x = bf16[2,6,16]{2,1,0} parameter(0)
  %w1 = bf16[16,64]{1,0} parameter(1)
  %b1 = bf16[64]{0} parameter(2)
  %w2 = bf16[64,16]{1,0} parameter(3)
  %h = bf16[2,6,64]{2,1,0} parameter(4)
  %fwd = (bf16[12,64]{1,0}, bf16[12,64]{1,0}) custom-call(%x, %w1, %b1), custom_call_target="__gpu$xla.gpu.triton", backend_config={ir = "ML", name = "gelu_mlp_forward", num_stages = 3 : i32, num_warps = 8 : i32}
  ROOT %bwd = (bf16[12,64]{1,0}, f32[1,64]{1,0}) custom-call(%x, %w2, %h), custom_call_target="__gpu$xla.gpu.triton", backend_config={ir = "ML", name = "gelu_mlp_backward", num_stages = 3 : i32, num_warps = 8 : i32}
}
"""
  forward, backward = hlo_kernels.kernels(module)
  assert (forward.kind, forward.flops) == ("gemm", 2 * 12 * 16 * 64)
  assert (backward.kind, backward.flops) == ("gemm", 2 * 12 * 16 * 64)
  assert forward.written == 2 * 12 * 64 * 2 and backward.written == 12 * 64 * 2 + 64 * 4


def test_kernels_of_a_cpu_compile_count_the_matmul():
  """A real compiled module (this CPU's): the matmul's FLOPs exactly, and results written at least once."""
  f = jax.jit(lambda x, w: jnp.tanh(x @ w) * 2.0)
  x, w = jnp.ones((64, 128)), jnp.ones((128, 32))
  program = hlo_kernels.kernels(f.lower(x, w).compile().as_text())
  assert sum(k.flops for k in program) == 2 * 64 * 32 * 128
  assert sum(k.written for k in program) >= 64 * 32 * 4
  assert max(k.read for k in program) >= (64 * 128 + 128 * 32) * 4  # the kernel with the dot reads both inputs


def test_unknown_gpu_target_and_bad_text_are_refused():
  with pytest.raises(ValueError, match="must be one of"):
    hlo_kernels.gpu_devices("a100")
  with pytest.raises(ValueError, match="no ENTRY"):
    hlo_kernels.kernels("HloModule empty\n")


def test_deviceless_compile_keeps_triton_gemms_unless_their_tiling_fails():
  x = jnp.ones((4, 4))
  compiled, options = hlo_kernels.compile_deviceless(jax.jit(lambda x: x @ x).lower(x))  # real (CPU) lowering
  assert options == {"xla_gpu_autotune_level": 0} and float(compiled(x)[0, 0]) == 4.0

  class Lowered:  # a step with a GEMM that Triton cannot tile without the autotuner, as XLA reports it
    def __init__(self, message):
      self.message, self.tried = message, []

    def compile(self, compiler_options):
      self.tried.append(compiler_options)
      if compiler_options.get("xla_gpu_enable_triton_gemm", True):
        raise jax.errors.JaxRuntimeError(self.message)
      return "compiled"

  lowered = Lowered("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.2008 = bf16[5632,256]")
  assert hlo_kernels.compile_deviceless(lowered) == ("compiled", hlo_kernels.DEVICELESS_FALLBACK_OPTIONS)
  assert lowered.tried == [hlo_kernels.DEVICELESS_COMPILER_OPTIONS, hlo_kernels.DEVICELESS_FALLBACK_OPTIONS]
  with pytest.raises(jax.errors.JaxRuntimeError, match="out of memory"):  # any other failure is the caller's
    hlo_kernels.compile_deviceless(Lowered("RESOURCE_EXHAUSTED: out of memory"))


def test_ptxas_report_per_entry_function():
  """``ptxas -v``'s report (as ptxas 12 prints it for two Pallas kernels): registers and spills per kernel."""
  text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'short_attention_forward' for 'sm_90a'
ptxas info    : Function properties for short_attention_forward
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 176 registers, used 1 barriers
ptxas info    : Compiling entry function 'short_attention_backward' for 'sm_90a'
ptxas info    : Function properties for short_attention_backward
    48 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size
ptxas info    : Compile time = 111.568 ms
"""
  assert hlo_kernels.ptxas_report(text) == {
      "short_attention_forward": {"registers": 176, "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0},
      "short_attention_backward": {"registers": 255, "stack_bytes": 48, "spill_store_bytes": 44,
                                   "spill_load_bytes": 40}}
