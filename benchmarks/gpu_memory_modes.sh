#!/usr/bin/env bash
# The GPU figures of the memory modes (benchmarks/RESULTS.md) on a lent device machine (see the `device` tool):
#   loaders  every quantization scheme through the loaders (PipelineQuantizationConfig), config small, against bf16
#            (about 1 minute);
#   24gb     the 24 GB mode: BitDance-14B-64x shapes at 1024x1024, 50 steps, CFG 7.5, int8 weight-only and nf4 against
#            the bf16 image of the same seed: peak memory, latency, PSNR (several minutes: run it in a call of its own);
#   24gb-compiled  int8 weight-only again with the head and language model compiled in max-autotune mode: torchao's
#            weight-only linear converts the whole int8 weight to bf16 on every call (more traffic than bf16); inductor
#            fuses that conversion into a matmul only as the prologue of a Triton matmul template, and those are
#            chosen only under max-autotune (in the default mode the matmul stays cuBLAS and the conversion a kernel of
#            its own); long compile;
#   offload  model offload and group offloading at 14B shapes (256x256, 10 steps) against the resident codes.
# Usage: benchmarks/gpu_memory_modes.sh [loaders] [24gb] [24gb-compiled] [offload]   (none: loaders 24gb offload)
# Rows go to $OUT/results.jsonl. Needs the wheels of benchmarks/fetch_device_wheels.sh in .whl/ (carry .whl).
set -uo pipefail
PARTS=${*:-loaders 24gb offload}
source benchmarks/device_setup.sh

if wants loaders; then
    python3 benchmarks/bench_quantization.py --config small --device cuda --dtype bf16 \
        --schemes int8wo,fp8wo,fp8,nf4,int8 --json $OUT/results.jsonl 2>&1 | quiet | tail -12
    finished loaders
fi

if wants 24gb; then
    BIG="python3 benchmarks/bench_t2i.py --device cuda --json $OUT/results.jsonl --config 14b-64x --dtype bf16 \
        --height 1024 --width 1024 --steps 50 --guidance 7.5"
    $BIG --cuda_graphs --save_images $OUT/bf16.pt 2>&1 | quiet | tail -12
    for scheme in int8wo nf4; do
        $BIG --quantize $scheme --cuda_graphs --compare_to $OUT/bf16.pt 2>&1 | quiet | tail -13 ||
            $BIG --quantize $scheme --compare_to $OUT/bf16.pt 2>&1 | quiet | tail -13
    done
    rm -f $OUT/bf16.pt
    finished 24gb
fi

if wants 24gb-compiled; then
    python3 benchmarks/bench_t2i.py --device cuda --json $OUT/results.jsonl --config 14b-64x --dtype bf16 --height 1024 \
        --width 1024 --steps 50 --guidance 7.5 --quantize int8wo --compile max-autotune-no-cudagraphs --cuda_graphs 2>&1 | quiet | tail -12
    finished 24gb-compiled
fi

if wants offload; then
    python3 benchmarks/gpu_offload_check.py --config 14b --height 256 --width 256 --steps 10 \
        --modes model_cpu_offload,group_offload_language_model 2>&1 | quiet | tail -6
    finished offload
fi
