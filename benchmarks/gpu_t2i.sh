#!/usr/bin/env bash
# The GPU speed figures of benchmarks/RESULTS.md, on any CUDA machine, in parts:
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
#   imagenet class-conditional BitDance-B with 1x / 4x / 16x heads (P = 1, 4, 16), 256x256, bf16, images/s at batch
#            64 and 256.
# Random weights with the real shapes (nothing is downloaded); the 14B-64x runs peak at about 36 GiB of GPU memory at
# batch 1 (more for the scaling part's batch 8).
# Rows are appended to OUTPUT_DIR/<benchmark>.jsonl and everything printed to OUTPUT_DIR/gpu_t2i.log.
# Needs: pip install -e ".[quantization,lora]" (torchao for fp8, peft for the LoRA check).
# Kernel-level profiles of the same shapes: benchmarks/profiling/README.md.
set -euo pipefail

PARTS_KNOWN="check bf16 scaling fp8 fp8-compile fp8wo-autotune compile autotune imagenet"
usage() {
    echo "Usage: benchmarks/gpu_t2i.sh [--output_dir DIR] [PART ...]"
    echo "  PART: $PARTS_KNOWN (default: check bf16 scaling fp8); DIR: default bench-out/"
}
# shellcheck source=benchmarks/common.sh
source "$(dirname "$0")/common.sh"
parse_arguments "$PARTS_KNOWN" "check bf16 scaling fp8" "$@"
require_modules bitdance_diffusers torchao peft
require_cuda
open_output_dir

BENCH=(python "$BENCHMARKS/bench_t2i.py" --device cuda --output_dir "$RESULTS_DIR")
TINY=(--config tiny --height 256 --width 256 --steps 4)
BIG=(--config 14b-64x --dtype bf16 --height 1024 --width 1024 --steps 50 --guidance 7.5)
GRAPHS=(--cuda_graphs)

if wants check; then
    "${BENCH[@]}" "${TINY[@]}" --save_images "$REFERENCES/tiny_eager.pt"
    if ! "${BENCH[@]}" "${TINY[@]}" --cuda_graphs --compare_to "$REFERENCES/tiny_eager.pt" --min_psnr 60; then
        echo "CUDA graphs of the language model differ from eager: the later parts graph the head only"
        GRAPHS=(--cuda_graphs --head_graphs_only)
    fi
    "${BENCH[@]}" "${TINY[@]}" --guidance_cutoff 0.4 --save_images "$REFERENCES/tiny_cut.pt"
    "${BENCH[@]}" "${TINY[@]}" --guidance_cutoff 0.4 --cuda_graphs --compare_to "$REFERENCES/tiny_cut.pt" --min_psnr 60
    python "$BENCHMARKS/gpu_lora_check.py" --output_dir "$RESULTS_DIR"
    finished check
fi
if wants bf16 || wants scaling || wants fp8 || wants fp8-compile || wants fp8wo-autotune; then  # the fp8 reference
    SCALING=()
    if wants scaling; then
        SCALING=(--scaling --batches "1,4,8")
    fi
    "${BENCH[@]}" "${BIG[@]}" "${GRAPHS[@]}" "${SCALING[@]}" --save_images "$REFERENCES/bf16.pt"
    finished bf16
fi
if wants fp8; then
    "${BENCH[@]}" "${BIG[@]}" "${GRAPHS[@]}" --quantize fp8 --compare_to "$REFERENCES/bf16.pt"
    finished fp8
fi
if wants fp8-compile; then
    "${BENCH[@]}" "${BIG[@]}" "${GRAPHS[@]}" --quantize fp8 --compile default --compare_to "$REFERENCES/bf16.pt"
    finished fp8-compile
fi
if wants fp8wo-autotune; then
    "${BENCH[@]}" "${BIG[@]}" "${GRAPHS[@]}" --quantize fp8wo --compile max-autotune-no-cudagraphs \
        --compare_to "$REFERENCES/bf16.pt"
    finished fp8wo-autotune
fi
if wants compile; then
    "${BENCH[@]}" "${BIG[@]}" "${GRAPHS[@]}" --compile default
    finished compile
fi
if wants autotune; then
    "${BENCH[@]}" "${BIG[@]}" "${GRAPHS[@]}" --compile max-autotune-no-cudagraphs
    finished autotune
fi
if wants imagenet; then
    for block_size in 1 4 16; do
        python "$BENCHMARKS/bench_imagenet.py" --device cuda --dtype bf16 --cuda_graphs --size B \
            --block_size "$block_size" --batch 64 --batches 64,256 --output_dir "$RESULTS_DIR"
    done
    finished imagenet
fi
