#!/usr/bin/env bash
# The GPU speed figures of benchmarks/RESULTS.md on a lent device machine (see the `device` tool), in parts:
#   check    tiny fp32 runs: the CUDA-graph path must reproduce the eager images (PSNR >= 60 dB; else the
#            later parts fall back to head-only graphs), also when a callback ends guidance mid-run (the
#            unconditional rows leave the static cache: graphs captured again) and after each change of LoRA adapters
#            (gpu_lora_check.py);
#   bf16     BitDance-14B-64x shapes at 1024x1024, 50 steps, CFG 7.5, bf16 with CUDA graphs: time, floor, peak memory;
#   scaling  the same with the scaling tables (head steps, batch 1/4/8, guidance): several minutes;
#   fp8      torchao fp8 (dynamic, per row) against the bf16 image (runs bf16 first if that part did not);
#   fp8-compile  the same fp8 run compiled (default mode: inductor fuses the activation quantisation);
#   fp8wo-autotune  float8 weight-only, compiled in max-autotune mode (the only mode in which inductor fuses the
#            weight conversion into a Triton matmul, so the weights are read at 1 byte each; long compile);
#   compile  the same bf16 run with the head and language model compiled (default mode: fused elementwise ops around
#            cuBLAS GEMMs) under the graphs;
#   autotune the same with max-autotune-no-cudagraphs (Triton GEMM tilings for the skinny block-step matmuls; long
#            compile);
#   kernels  one head call and one block step at those shapes, bf16, eager, kernel by kernel (torch.profiler):
#            matmul / attention / other device time per call against the CUDA-graph timings (~1 min);
#   gemms    every matrix product of a head call and a block step at those shapes, timed alone (cuBLAS, split-K,
#            int8 and fp8 weight-only as torchao computes them) against its weight-read floor: which products keep
#            the head and the block step off the floor (~1 min);
#   gemms-autotune  the head's products again plus max-autotune compiles of the bf16 and weight-only products: do
#            Triton tilings beat cuBLAS, and does a quantized weight, its conversion fused into the matmul, beat the
#            bf16 floor (3 compiles x 9 shapes, minutes; the block step's: profile_gemms.py --only language-model);
#   imagenet class-conditional BitDance-B with 1x / 4x / 16x heads (P = 1, 4, 16), 256x256, bf16, images/s at batch
#            64 and 256.
# Usage: benchmarks/gpu_t2i.sh [check] [bf16] [scaling] [fp8] [fp8-compile] [fp8wo-autotune] [compile] [autotune]
#            [kernels] [gemms] [gemms-autotune] [imagenet]   (none: check bf16 scaling fp8)
# Rows go to $OUT/results.jsonl. Needs the wheels of benchmarks/fetch_device_wheels.sh in .whl/ (carry .whl).
set -uo pipefail
PARTS=${*:-check bf16 scaling fp8}
source benchmarks/device_setup.sh
BENCH="python3 benchmarks/bench_t2i.py --device cuda --json $OUT/results.jsonl"
TINY="--config tiny --height 256 --width 256 --steps 4"
BIG="--config 14b-64x --dtype bf16 --height 1024 --width 1024 --steps 50 --guidance 7.5"
GRAPHS="--cuda_graphs"

if wants check; then
    $BENCH $TINY --save_images $OUT/tiny_eager.pt 2>&1 | quiet | tail -3
    $BENCH $TINY --cuda_graphs --compare_to $OUT/tiny_eager.pt --min_psnr 60 2>&1 | quiet | tail -12 ||
        GRAPHS="--cuda_graphs --head_graphs_only"
    $BENCH $TINY --guidance_cutoff 0.4 --save_images $OUT/tiny_cut.pt 2>&1 | quiet | tail -3
    $BENCH $TINY --guidance_cutoff 0.4 --cuda_graphs --compare_to $OUT/tiny_cut.pt --min_psnr 60 2>&1 | quiet | tail -3
    python3 benchmarks/gpu_lora_check.py 2>&1 | quiet | tail -10
    finished check
fi
if wants bf16 || wants scaling || wants fp8 || wants fp8-compile || wants fp8wo-autotune; then  # the fp8 reference
    SCALING=""
    wants scaling && SCALING="--scaling --batches 1,4,8"
    $BENCH $BIG $GRAPHS $SCALING --save_images $OUT/bf16.pt 2>&1 | quiet | tail -40
    finished bf16
fi
if wants fp8; then
    $BENCH $BIG $GRAPHS --quantize fp8 --compare_to $OUT/bf16.pt 2>&1 | quiet | tail -16
    finished fp8
fi
if wants fp8-compile; then
    $BENCH $BIG $GRAPHS --quantize fp8 --compile default --compare_to $OUT/bf16.pt 2>&1 | quiet | tail -16
    finished fp8-compile
fi
if wants fp8wo-autotune; then
    $BENCH $BIG $GRAPHS --quantize fp8wo --compile max-autotune-no-cudagraphs --compare_to $OUT/bf16.pt 2>&1 | quiet |
        tail -16
    finished fp8wo-autotune
fi
if wants compile; then
    $BENCH $BIG $GRAPHS --compile default 2>&1 | quiet | tail -12
    finished compile
fi
if wants autotune; then
    $BENCH $BIG $GRAPHS --compile max-autotune-no-cudagraphs 2>&1 | quiet | tail -12
    finished autotune
fi
if wants kernels; then
    python3 benchmarks/profile_kernels.py --device cuda --config 14b-64x --dtype bf16 --height 1024 --width 1024 \
        --steps 50 --guidance 7.5 --blocks 2 2>&1 | quiet | tail -24
    finished kernels
fi
if wants gemms; then
    python3 benchmarks/profile_gemms.py --device cuda --config 14b-64x --json $OUT/results.jsonl 2>&1 | quiet | tail -20
    finished gemms
fi
if wants gemms-autotune; then
    python3 benchmarks/profile_gemms.py --device cuda --config 14b-64x --autotune --only head \
        --json $OUT/results.jsonl 2>&1 | quiet | tail -16
    finished gemms-autotune
fi
if wants imagenet; then
    for block_size in 1 4 16; do
        python3 benchmarks/bench_imagenet.py --device cuda --dtype bf16 --cuda_graphs --size B --block_size $block_size \
            --batch 64 --batches 64,256 --json $OUT/results.jsonl 2>&1 | quiet | tail -14
    done
    finished imagenet
fi
rm -f $OUT/bf16.pt $OUT/tiny_eager.pt $OUT/tiny_cut.pt
