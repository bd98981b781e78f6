#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in one call on a lent device machine (see the `device` tool):
# a tiny smoke run, then BitDance-14B-64x shapes at 1024x1024: bf16 with CUDA-graphed head (+ scaling tables),
# torchao fp8 against the bf16 image, and the eager head for comparison. Rows go to $OUT/results.jsonl.
# Needs the wheels of diffusers, torchao and importlib_metadata in .whl/ (the device image lacks them).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
BENCH="python3 benchmarks/bench_t2i.py --device cuda --json $OUT/results.jsonl"
BIG="--config 14b-64x --dtype bf16 --height 1024 --width 1024 --steps 50 --guidance 7.5"
$BENCH --config tiny --height 128 --width 128 --steps 4 --cuda_graphs 2>&1 | grep -v -i warn | tail -12 || exit 1
$BENCH $BIG --cuda_graphs --scaling --batches 1,4,8 --save_images $OUT/bf16.pt 2>&1 | grep -v -i warn
$BENCH $BIG --cuda_graphs --quantize fp8 --compare_to $OUT/bf16.pt 2>&1 | grep -v -i warn | tail -16
$BENCH $BIG 2>&1 | grep -v -i warn | tail -14
