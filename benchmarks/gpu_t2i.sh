#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in one call on a lent device machine (see the `device` tool):
# tiny fp32 runs checking that the CUDA-graph path reproduces the eager images, then BitDance-14B-64x shapes at
# 1024x1024: bf16 with CUDA graphs (+ scaling tables) and torchao fp8 against the bf16 image. Rows go to
# $OUT/results.jsonl. Needs the wheels of benchmarks/fetch_device_wheels.sh in .whl/ (carry .whl).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
BENCH="python3 benchmarks/bench_t2i.py --device cuda --json $OUT/results.jsonl"
TINY="--config tiny --height 256 --width 256 --steps 4"
BIG="--config 14b-64x --dtype bf16 --height 1024 --width 1024 --steps 50 --guidance 7.5"
$BENCH $TINY --save_images $OUT/tiny_eager.pt 2>&1 | grep -v -i warn | tail -3
GRAPHS="--cuda_graphs"
$BENCH $TINY --cuda_graphs --compare_to $OUT/tiny_eager.pt 2>&1 | grep -v -i warn | tail -12 || GRAPHS="--cuda_graphs --head_graphs_only"
$BENCH $BIG $GRAPHS --scaling --batches 1,4,8 --save_images $OUT/bf16.pt 2>&1 | grep -v -i warn
$BENCH $BIG $GRAPHS --quantize fp8 --compare_to $OUT/bf16.pt 2>&1 | grep -v -i warn | tail -16
