#!/usr/bin/env bash
# The CPU figures of benchmarks/RESULTS.md: the `small` config in fp32 at the two block sizes, 25 and 50 steps, CFG 7.5,
# each run and each isolated forward the best of 3 (about half an hour on 2 cores; run nothing else meanwhile).
# Rows are appended to OUTPUT_DIR/bench_t2i.jsonl and everything printed to OUTPUT_DIR/cpu_t2i.log.
# Needs: pip install -e .
set -euo pipefail

usage() {
    echo "Usage: benchmarks/cpu_t2i.sh [--output_dir DIR]   (DIR: default bench-out/)"
}
# shellcheck source=benchmarks/common.sh
source "$(dirname "$0")/common.sh"
parse_arguments "" "" "$@"
require_modules bitdance_diffusers
open_output_dir

for steps in 25 50; do
    python "$BENCHMARKS/bench_t2i.py" --config small --height 256 --width 256 --block_size 64 --steps "$steps" \
        --repeats 3 --output_dir "$RESULTS_DIR"
    python "$BENCHMARKS/bench_t2i.py" --config small --height 512 --width 512 --block_size 16 --steps "$steps" \
        --repeats 3 --output_dir "$RESULTS_DIR"
done
