"""The training benchmark's FLOP count (the MFU basis), its profile reader and its kernel sets."""

import argparse
import json
import types

import jax
import jax.numpy as jnp
import pytest

from efficientsam_jax.models.layers import Kernels
from efficientsam_jax.models.sami import SamiConfig, SamiModel
from efficientsam_jax.models.gelu_mlp import MatmulTiling
from efficientsam_jax.models.short_attention import Tiling
from efficientsam_jax.train import benchmark, hlo_kernels
from efficientsam_jax.train.benchmark import (compiled_cost, parse_kernels, parse_remat, peak_tflops,
                                              op_kind, profile_top_ops, sami_forward_flops_per_image,
                                              sami_train_flops_per_image)


@pytest.mark.parametrize("decoder_type", ["cross", "self"])
def test_model_flops_match_xla_count_of_the_forward(decoder_type):
  config = SamiConfig(encoder_embed_dim=192, encoder_depth=2, encoder_num_heads=3, decoder_dim=256,
                      decoder_depth=2, decoder_num_heads=8, decoder_type=decoder_type)
  model, rng, images = SamiModel(config), jax.random.PRNGKey(0), jnp.zeros((4, 224, 224, 3))
  params = jax.eval_shape(lambda: model.init(rng, images[:1], rng))["params"]
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x, rng)[0]).lower(params, images).compile()
  xla_forward = compiled_cost(compiled) / 4
  ours_forward = sum(sami_forward_flops_per_image(config))
  assert sami_train_flops_per_image(config) == 3 * ours_forward - sami_forward_flops_per_image(config)[0]
  # XLA also counts the elementwise work (norms, GELU, softmax): a few percent more than the matmuls.
  assert 0.9 * xla_forward < ours_forward < xla_forward


def test_peak_table_and_profile_reader(tmp_path):
  assert peak_tflops(jax.devices()[0]) is None  # no MFU on CPU
  assert peak_tflops(jax.devices()[0], 100.0) == 100.0
  x = jnp.ones((256, 256))
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  rows, by_instruction = profile_top_ops(lambda: f(x), str(tmp_path), calls=2)
  assert rows and all(r["ms_per_call"] >= 0 for r in rows)
  assert abs(sum(r["share"] for r in rows) - 1.0) < 0.05 or len(rows) == 25
  saved = json.load(open(tmp_path / "top_ops.json"))
  assert saved["top"] == rows and all(r["kind"] == op_kind(r["op"]) for r in rows)
  assert abs(sum(saved["kinds_ms_per_call"].values()) - saved["op_ms_per_call"]) < 1e-6 * saved["op_ms_per_call"]
  assert 1e3 * sum(by_instruction.values()) == pytest.approx(saved["op_ms_per_call"], rel=1e-6)  # the same events


def test_profile_times_set_against_the_kernels_floors(tmp_path, capsys):
  """``profile_top_ops``'s seconds by HLO instruction join the compiled program's kernels (``hlo_kernels``): each
  kernel gets its time, grouped by JAX operation beside its floor, the most time over the floor first."""
  def f(x, w):
    with jax.named_scope("matmul"):
      y = x @ w
    with jax.named_scope("sort"):
      return jnp.sort(y, axis=-1)

  x = jax.random.normal(jax.random.PRNGKey(0), (256, 256))
  compiled = jax.jit(f).lower(x, x.T).compile()
  program = hlo_kernels.kernels(compiled.as_text())
  measured = profile_top_ops(lambda: compiled(x, x.T), str(tmp_path), calls=2)[1]
  peak, bandwidth = 1e12, 1e11
  table = benchmark.print_against_floor(compiled, measured, peak / 1e12, bandwidth / 1e12, str(tmp_path))
  assert json.loads((tmp_path / "against_floor.json").read_text()) == table
  assert "sort/jit(sort)/sort" in capsys.readouterr().out
  assert table["kernels_without_time"] == 0 and len(program) >= 2
  assert {row["operation"] for row in table["rows"]} == {"matmul/dot_general", "sort/jit(sort)/sort"}
  assert table["floor_ms"] == pytest.approx(1e3 * hlo_kernels.roofline_seconds(program, peak, bandwidth), rel=1e-3)
  names = {k.name for k in program}
  assert table["measured_ms"] == pytest.approx(1e3 * sum(s for n, s in measured.items() if n in names), abs=1e-3)
  assert table["unmatched_ms"] == pytest.approx(1e3 * sum(s for n, s in measured.items() if n not in names), abs=1e-3)
  over = [row["over_floor_ms"] for row in table["rows"]]
  assert over == sorted(over, reverse=True) and table["measured_ms"] > 0
  for row in table["rows"]:
    assert row["over_floor_ms"] == pytest.approx(row["measured_ms"] - row["floor_ms"], abs=1e-3)
    assert row["times_floor"] == pytest.approx(row["measured_ms"] / row["floor_ms"], rel=0.01)

  # As a GPU trace names kernels: "fusion.6" as "fusion_6"; a kernel with no time is counted, and time that matches
  # no kernel is unmatched. Under a chip 1000× faster every kernel is tiny.
  made_up = {program[0].name.replace(".", "_") + "_x": 0.5, "nvjet_sm90_gemm": 0.25}
  made_up.update({k.name.replace(".", "_"): 1e-3 for k in program[1:]})
  table = hlo_kernels.against_floor(program, made_up, 1e3 * peak, 1e3 * bandwidth)
  assert table["kernels_without_time"] == 1 and table["unmatched_ms"] == pytest.approx(750.0)
  assert table["measured_ms"] == table["tiny_measured_ms"] == pytest.approx(len(program[1:]))


def test_kernel_sets_parse_and_bad_ones_are_refused():
  assert parse_kernels("default; layer_norm=one_pass,gelu=tanh;attention=cudnn") == [
      Kernels(), Kernels(layer_norm="one_pass", gelu="tanh"), Kernels(attention="cudnn")]
  for bad in ("gelu", "softmax=fast", "gelu=erf"):
    with pytest.raises(argparse.ArgumentTypeError, match=bad.split("=")[0]):
      parse_kernels(bad)


def test_remat_policies_parse_and_each_is_a_row(tmp_path):
  assert parse_remat("none, dots,projections,full") == ["none", "dots", "projections", "full"]
  with pytest.raises(argparse.ArgumentTypeError, match="selective"):
    parse_remat("none,selective")
  out = tmp_path / "rows.json"
  assert benchmark.main(["sami", "--variants", "ti", "--batch-per-device", "1", "--dtype", "float32",
                         "--compile-only", "--remat", "none,full", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(row["variant"], row["remat"]) for row in rows] == [("ti", "none"), ("ti", "full")]
  assert all("error" not in row and row["model_gflop_per_step"] > 0 for row in rows)
  assert rows[0]["kept_mb_per_example"] > 10 * rows[1]["kept_mb_per_example"] > 0
  # Full remat recomputes each block's forward in the backward pass: XLA counts more FLOPs for the same model.
  assert rows[1]["xla_gflop_per_step"] > rows[0]["xla_gflop_per_step"]
  assert rows[0]["model_gflop_per_step"] == rows[1]["model_gflop_per_step"]


def test_op_kinds_of_gpu_op_names():
  """Names as an H200 trace of the SAMI step gave them (jax 0.11), cuDNN's attention kernels, a Pallas kernel
  and the HLO op of a Pallas call."""
  names = {"nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT": "matmul", "gemm_fusion_dot_578": "matmul",
           "sm80_xmma_fprop_implicit_gemm_indexed_bf": "matmul", "cudnn_generated_sdpa_sm90_flash_fprop": "attention",
           "__cudnn$fmhaSoftmaxBackward": "attention", "loop_convert_multiply_fusion_7": "elementwise fusion",
           "loop_multiply_fusion_7": "elementwise fusion", "input_reduce_fusion_182": "reduction fusion",
           "input_add_reduce_fusion_14": "reduction fusion", "input_transpose_fusion": "copy/transpose",
           "wrapped_transpose": "copy/transpose", "fusion_2274": "other fusion", "all-reduce-start": "collective",
           "cuStreamSynchronize": "other", "short_attention_backward": "attention", "pallas_call.7": "pallas",
           "gelu_mlp_forward": "matmul"}
  assert {name: op_kind(name) for name in names} == names


def test_attention_benchmark_rows_check_each_implementation_against_fp32(tmp_path):
  """``attention``: one row per implementation (the Pallas kernels per tiling, in interpret mode here), each with
  its error against fp32 XLA attention: small for the kernels, and each part timed."""
  assert benchmark.parse_tilings("64,4,16,8;32,2,16,4,2,32") == [Tiling(64, 4, 16, 8), Tiling(32, 2, 16, 4, 2, 32)]
  for bad in ("64,4,16", "48,4,16,8", "64,4,16,8,1,8"):
    with pytest.raises(argparse.ArgumentTypeError, match="tiling"):
      benchmark.parse_tilings(bad)
  out = tmp_path / "rows.json"
  assert benchmark.main(["attention", "--batch", "2", "--queries", "20", "--keys", "9", "--heads", "2",
                         "--head-dim", "16", "--implementations", "xla,pallas", "--tilings", "16,4,16,4;32,4,16,4",
                         "--dtype", "float32", "--steps", "1", "--repeats", "1", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(row["implementation"], row["tiling"] and row["tiling"]["block_q"]) for row in rows] == [
      ("xla", None), ("pallas", 16), ("pallas", 32)]
  for row in rows:
    assert row["forward_relative_error"] < 1e-5 and row["train_relative_error"] < 1e-5, row
    assert row["forward_ms"] > 0 and row["train_ms"] > 0


def test_mlp_benchmark_rows_check_each_implementation_against_fp32(tmp_path):
  """``mlp``: one row for the XLA MLP and one per tiling of the Pallas kernels (interpret mode here), each with its
  error against the fp32 XLA MLP: small, and each part timed."""
  assert benchmark.parse_matmul_tilings("128/128/64/8/3;16,32,16,4,1") == [MatmulTiling(),
                                                                          MatmulTiling(16, 32, 16, 4, 1)]
  for bad in ("128/128", "96/128/64/8/3"):
    with pytest.raises(argparse.ArgumentTypeError, match="tilings"):
      benchmark.parse_matmul_tilings(bad)
  with pytest.raises(argparse.ArgumentTypeError, match="xla and pallas"):
    benchmark.parse_mlp_implementations("xla,cudnn")
  out = tmp_path / "rows.json"
  assert benchmark.main(["mlp", "--batch", "2", "--tokens", "19", "--width", "32", "--hidden", "64", "--tilings",
                         "16/32/16/4/1;32/64/32/4/2", "--gelu", "tanh", "--dtype", "float32", "--steps", "1",
                         "--repeats", "1", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(row["implementation"], row["tiling"] and row["tiling"]["block_m"]) for row in rows] == [
      ("xla", None), ("pallas", 16), ("pallas", 32)]
  for row in rows:
    assert row["forward_relative_error"] < 1e-5 and row["train_relative_error"] < 1e-5, row
    assert row["forward_ms"] > 0 and row["train_ms"] > 0


def test_gpu_rows_name_the_attention_kernels_that_ran(capsys):
  """A GPU step's row counts its attention kernels by implementation ("auto" is resolved per call, so the row
  says what ran): the Pallas kernels by their JAX operation, cuDNN's by the rest."""
  module = """HloModule jit_step

ENTRY %main (q: bf16[2,6,4,16], k: bf16[2,10,4,16], lse: f32[2,4,16]) -> bf16[2,6,4,16] {
  %q = bf16[2,6,4,16]{3,2,1,0} parameter(0)
  %k = bf16[2,10,4,16]{3,2,1,0} parameter(1)
  %lse = f32[2,4,16]{2,1,0} parameter(2)
  %fmha = (bf16[2,4,6,16]{3,1,2,0}, f32[2,4,6]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/encoder/blocks_0/dot_product_attention_fwd"}
  %fwd = (bf16[2,6,4,16]{3,2,1,0}, f32[2,4,16]{2,1,0}) custom-call(%q, %k, %k), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/decoder_blocks_0/short_attention_forward/pallas_call"}, backend_config={ir = "ML", name = "short_attention_forward", num_warps = 4 : i32}
  ROOT %bwd = bf16[2,6,4,16]{3,2,1,0} custom-call(%q, %k, %k, %q, %q, %lse), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/transpose(decoder_blocks_0)/short_attention_backward/pallas_call"}, backend_config={ir = "ML", name = "short_attention_backward", num_warps = 8 : i32}
}
"""
  compiled = types.SimpleNamespace(as_text=lambda: module)
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  figures = benchmark._kernel_figures(compiled, gpu, model_flops=None, peak=989.0)
  assert figures["attention_kernels"] == {"pallas": 2, "cudnn": 1}
  assert figures["kernel_count"] == 3 and "short_attention_backward" in capsys.readouterr().out
  assert benchmark._kernel_figures(compiled, types.SimpleNamespace(platform="cpu", device_kind="cpu"), None, 1.0) == {}
