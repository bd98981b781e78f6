#!/usr/bin/env bash
# The GPU figures of the memory modes (benchmarks/RESULTS.md), on any CUDA machine, in parts:
#   loaders  every quantization scheme through the loaders (PipelineQuantizationConfig), config small, against bf16
#            (about 1 minute);
#   24gb     the 24 GB mode: BitDance-14B-64x shapes at 1024x1024, 50 steps, CFG 7.5, int8 weight-only and nf4 against
#            the bf16 image of the same seed: peak memory, latency, PSNR (several minutes; the bf16 reference run
#            needs about 36 GiB of GPU memory);
#   24gb-compiled  int8 weight-only again with the head and language model compiled in max-autotune mode: torchao's
#            weight-only linear converts the whole int8 weight to bf16 on every call (more traffic than bf16); inductor
#            fuses that conversion into a matmul only as the prologue of a Triton matmul template, and those are
#            chosen only under max-autotune (in the default mode the matmul stays cuBLAS and the conversion a kernel of
#            its own); long compile;
#   offload  model offload and group offloading at 14B shapes (256x256, 10 steps) against the resident codes.
# Random weights with the real shapes (nothing is downloaded). Rows are appended to OUTPUT_DIR/<benchmark>.jsonl and
# everything printed to OUTPUT_DIR/gpu_memory_modes.log.
# Needs: pip install -e ".[quantization]" (torchao and bitsandbytes).
set -euo pipefail

PARTS_KNOWN="loaders 24gb 24gb-compiled offload"
usage() {
    echo "Usage: benchmarks/gpu_memory_modes.sh [--output_dir DIR] [PART ...]"
    echo "  PART: $PARTS_KNOWN (default: loaders 24gb offload); DIR: default bench-out/"
}
# shellcheck source=benchmarks/common.sh
source "$(dirname "$0")/common.sh"
parse_arguments "$PARTS_KNOWN" "loaders 24gb offload" "$@"
require_modules bitdance_diffusers torchao bitsandbytes
require_cuda
open_output_dir

BIG=(python "$BENCHMARKS/bench_t2i.py" --device cuda --output_dir "$RESULTS_DIR" --config 14b-64x --dtype bf16
     --height 1024 --width 1024 --steps 50 --guidance 7.5)

if wants loaders; then
    python "$BENCHMARKS/bench_quantization.py" --config small --device cuda --dtype bf16 \
        --schemes int8wo,fp8wo,fp8,nf4,int8 --output_dir "$RESULTS_DIR"
    finished loaders
fi
if wants 24gb; then
    "${BIG[@]}" --cuda_graphs --save_images "$REFERENCES/bf16.pt"
    for scheme in int8wo nf4; do
        if ! "${BIG[@]}" --quantize "$scheme" --cuda_graphs --compare_to "$REFERENCES/bf16.pt"; then
            echo "$scheme with CUDA graphs failed: measured again without them"
            "${BIG[@]}" --quantize "$scheme" --compare_to "$REFERENCES/bf16.pt"
        fi
    done
    finished 24gb
fi
if wants 24gb-compiled; then
    "${BIG[@]}" --quantize int8wo --compile max-autotune-no-cudagraphs --cuda_graphs
    finished 24gb-compiled
fi
if wants offload; then
    python "$BENCHMARKS/gpu_offload_check.py" --config 14b --height 256 --width 256 --steps 10 \
        --modes model_cpu_offload,group_offload_language_model --output_dir "$RESULTS_DIR"
    finished offload
fi
