#!/usr/bin/env bash
# The CPU figures of benchmarks/RESULTS.md: the `small` config in fp32 at the two block sizes, 25 and 50 steps, CFG 7.5.
set -euo pipefail
cd "$(dirname "$0")/.."
JSON=${1:-benchmarks/results/cpu-t2i.jsonl}
for steps in 25 50; do
  python benchmarks/bench_t2i.py --config small --height 256 --width 256 --block_size 64 --steps $steps --repeats 3 --json "$JSON"
  python benchmarks/bench_t2i.py --config small --height 512 --width 512 --block_size 16 --steps $steps --repeats 3 --json "$JSON"
done
