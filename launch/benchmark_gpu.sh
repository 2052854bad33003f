#!/usr/bin/env bash
# The benchmarks that need an accelerator, in one prepared run (BENCHMARKS.md records their figures).
#
#   bash launch/benchmark_gpu.sh OUTDIR [WHEELS_DIR] [PARTS]
#
# PARTS (default: all, in this order): mlp sami_pallas sami_512 attention attention_ncu sami_profile sami_kernels
# sami_flags sami sami_options teacher finetune sami_input sami_smoke inference everything. Each part runs under its own
# time limit so one slow part cannot starve the rest: the SAMI decoder's MLP alone (XLA's, and the Pallas gelu_mlp
# kernels with the GELU inside the matmuls under several tilings, models/gelu_mlp.py MatmulTiling); the ViT-S step with
# the Pallas attention, with its backward split, and with the Pallas MLP, and at batch 512 per device; the SAMI
# decoder's attention alone (cuDNN, XLA, and the Pallas short_attention kernels under several tilings,
# models/short_attention.py Tiling: ms, TFLOP/s, error against fp32; and the ViT-S encoder's); the attention kernels
# under Nsight Compute (what bounds each: throughput against the chip's peaks, occupancy, warp stalls); the top device
# ops (HLO instructions) of the ViT-S step with the SAMI configs' kernels (attention "auto" = the Pallas kernels on the
# GPU) (--profile); ViT-S with other attention/LayerNorm/GELU choices side by side (models/layers.py Kernels); ViT-S
# under XLA compiler options (XLA_FLAGS: cuBLASLt epilogues, Triton and cuDNN GEMM fusions; one process each, the first
# without any as the baseline); the SAMI train step per student size (img/s, MFU; bf16, batch 256/device); ViT-S at
# batch 512 in one pass and in 2 microbatches, and with remat (models/layers.py remat); the teacher precompute (ViT-H
# views/s, XLA and cuDNN attention); the finetuning step (EfficientSAM-Ti/S, 8 images × 64 masks per device, XLA and
# cuDNN attention); the SAMI input pipeline; the README's SAMI smoke job end to end; the inference benchmark (XLA and
# cuDNN attention); segment-everything against the notebook's approach.
# All parts together take ~55 min, more than one session's device time (15 min, machine start ~30 s included). One
# process per part costs ~90 s before its first row on an H200 (start, init, a ~40 s compile), each further row ~60 s;
# the limits below are sized on that. Most informative first, one call per line (the fourteenth session split the
# attention's backward in two kernels, the fifteenth put the GELU inside the MLP's matmuls, both untimed): "mlp
# sami_pallas sami_512" (≤ 9.2 min: the MLP alone; the step with each change, and where it loses time; batch 512),
# "attention attention_ncu" (≤ 6 min), "sami_profile sami" (≤ 6.7 min), "sami_kernels teacher" (≤ 7.8 min),
# "sami_flags" (≤ 9.2 min), "sami_options" (≤ 6 min), "finetune" (≤ 5 min), then the rest.
# sami_profile leaves the step's top ops (top_ops_sami_s.json) and its whole trace (trace_sami_s.json.gz: every
# kernel with its duration and grid) in OUTDIR.
# WHEELS_DIR: wheels of packages the machine lacks, installed to /tmp/site first (for machines
# without a package index; `bash launch/gpu_wheels.sh` downloads them into .whl/, to carry).
set -uo pipefail
out=${1:?output directory}; wheels=${2:-}
parts=${3:-mlp sami_pallas sami_512 attention attention_ncu sami_profile sami_kernels sami_flags sami sami_options \
teacher finetune sami_input sami_smoke inference everything}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$wheels" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi -L 2>/dev/null
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name"; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "^WARNING: All log messages\|^I0000\|^W0000" | tee -a "$out/$name.log"
  echo "=== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
}
bench="python3 -m efficientsam_jax.train.benchmark"
for part in $parts; do
  case $part in
    mlp)  # the default tiling (128/128/64/8/3) first
      run mlp 110 $bench mlp --implementations xla,pallas --steps 20 --repeats 3 \
        --tilings "128/128/64/8/3;128/128/64/8/4;64/256/64/8/3;64/128/64/4/3;128/64/64/4/4" --json "$out/mlp.json" ;;
    sami_pallas)  # the Pallas attention (the default tiling: the fourteenth session's 30.93 ms on an H200), with its
      # backward split in two kernels, and with the Pallas MLP too; each row profiled: its kernels' time against their
      # floors by JAX operation (printed, and against_floor_*.json)
      run sami_pallas 300 $bench sami --variants s --batch-per-device 256 --steps 10 --repeats 2 \
        --kernels "attention=pallas,layer_norm=one_pass;attention=pallas,layer_norm=one_pass,tiling=64/4/16/4/4/32;\
attention=pallas,layer_norm=one_pass,mlp=pallas" --profile /tmp/trace_sami_pallas --json "$out/sami_pallas.json"
      for table in /tmp/trace_sami_pallas/*/against_floor.json; do
        [[ -f $table ]] && cp "$table" "$out/against_floor_$(basename "$(dirname "$table")").json"
      done ;;
    sami_512)  # batch 512 per device (the recipe's 4096 on 8 GPUs), never timed: the per-step kernels that do not
      # grow with the batch (optimizer, gradient norm) and each kernel's start and tail weigh half as much
      run sami_512 140 $bench sami --variants s --batch-per-device 512 --steps 10 --repeats 2 \
        --kernels "attention=pallas,layer_norm=one_pass,mlp=pallas" --json "$out/sami_512.json" ;;
    attention)  # the default tiling (64,4,32,8,4) first, then the backward split in two kernels (block_k_backward)
      run attention 120 $bench attention --implementations cudnn,xla,pallas --steps 20 --repeats 3 \
        --tilings "64,4,32,8,4;64,4,16,4,4,32;64,4,16,2,4,16;64,4,16,4,1,32;64,4,16,4,4,64;64,4,32,4,4,64;\
64,4,16,8,4,64;64,4,32,8,1" \
        --json "$out/attention.json"
      run attention 60 $bench attention --implementations cudnn,pallas --queries 50 --keys 50 --heads 6 \
        --head-dim 64 --steps 20 --repeats 3 --tilings "64,4,32,8,4;32,4,32,8,4" --json "$out/attention_encoder.json" ;;
    attention_ncu)  # what bounds each attention kernel: Nsight Compute's throughputs against the chip's peaks,
      # occupancy, and where the warps stall (each kernel replayed per section; the fp32 reference is not profiled).
      # Without preallocation: ncu saves and restores the device memory a replayed kernel could write, and XLA's
      # default pool is 75% of the GPU's (the fourteenth session's run, with it, profiled nothing in 210 s). ncu
      # writes its tables when the program ends, to a file of their own.
      XLA_PYTHON_CLIENT_PREALLOCATE=false run attention_ncu 180 ncu --target-processes all \
        --kernel-name "regex:short_attention|sdpa|flash" --launch-count 14 --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
        --log-file "$out/attention_ncu.csv" $bench attention --implementations pallas,cudnn \
        --tilings "64,4,32,8,4;64,4,16,4,4,32" --steps 1 --repeats 1 --warmup 0 ;;
    sami_profile)  # the trace stays in /tmp (its folders are too deep to fetch); its summary and events come back
      run sami_profile 130 $bench sami --variants s --batch-per-device 256 --steps 5 --repeats 1 \
        --profile /tmp/trace_sami_s --json "$out/sami_profile.json"
      cp /tmp/trace_sami_s/*/top_ops.json "$out/top_ops_sami_s.json"
      cp /tmp/trace_sami_s/*/plugins/profile/*/*.trace.json.gz "$out/trace_sami_s.json.gz" ;;
    sami_kernels) run sami_kernels 270 $bench sami --variants s --batch-per-device 256 --steps 10 --repeats 2 \
      --kernels "attention=cudnn,layer_norm=one_pass;attention=cudnn,layer_norm=one_pass,gelu=tanh;\
attention=cudnn,layer_norm=two_pass;attention=xla,layer_norm=one_pass" --json "$out/sami_kernels.json" ;;
    sami_flags)  # XLA reads XLA_FLAGS when it starts: one process per set; an unknown flag fails only its row
      i=0
      for flags in "" --xla_gpu_enable_cublaslt=true --xla_gpu_triton_gemm_any=true \
          --xla_gpu_cudnn_gemm_fusion_level=2 --xla_gpu_experimental_enable_fusion_block_level_rewriter=true; do
        i=$((i + 1))
        XLA_FLAGS="${XLA_FLAGS:-} $flags" run sami_flags 90 $bench sami --variants s --batch-per-device 256 \
          --steps 10 --repeats 2 --json "$out/sami_flags_$i.json"
      done  # cuBLASLt can fuse the tanh GELU into the GEMM (its epilogue)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_cublaslt=true" run sami_flags 90 $bench sami --variants s \
        --batch-per-device 256 --steps 10 --repeats 2 --kernels "attention=auto,layer_norm=one_pass,gelu=tanh" \
        --json "$out/sami_flags_tanh_cublaslt.json" ;;
    sami) run sami 270 $bench sami --variants ti,s,b --batch-per-device 256 --json "$out/sami_bf16.json" ;;
    sami_options)
      run sami_options 180 $bench sami --variants s --batch-per-device 512 --microbatches 1,2 \
        --json "$out/sami_s512.json"
      run sami_options 180 $bench sami --variants s --batch-per-device 256 --steps 10 --repeats 2 \
        --remat projections,full --json "$out/sami_s_remat.json" ;;
    teacher) run teacher 200 $bench teacher --modes upsample,native --attention xla,cudnn --batch-per-device 32 \
      --steps 3 --repeats 2 --json "$out/teacher.json" ;;
    finetune) run finetune 300 $bench finetune --variants ti,s --batch-per-device 8 --masks 64 \
      --kernels "default;attention=cudnn" --json "$out/finetune.json" ;;
    sami_input) run sami_input 40 $bench sami-input --records 4096 --batch 256 --steps 8 --json "$out/sami_input.json" ;;
    sami_smoke) run sami_smoke 60 python3 -m efficientsam_jax.main --config=configs/sami_vits.py:smoke \
      --workdir=/tmp/sami_smoke ;;
    inference) run inference 150 python3 -m efficientsam_jax.benchmark --variants ti,s --batch-sizes 1,8 \
      --dtypes float32,bfloat16 --attention xla,cudnn --queries 64 --repeats 5 --json "$out/inference.json" ;;
    everything) run everything 120 python3 -m efficientsam_jax.inference.everything_benchmark --grids 16,32 \
      --repeats 2 ;;
    *) echo "unknown part $part" ;;
  esac
done
