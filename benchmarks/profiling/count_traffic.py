"""Memory traffic of one language-model block step and one head call, counted on fake tensors: no GPU needed.

    python benchmarks/profiling/count_traffic.py --config 14b-64x --height 1024 --width 1024

At batch 1 a BitDance generation is bound by memory bandwidth: every head call and every language-model block step
streams its weights once. This script says what else each of them moves. The pipeline runs under `FakeTensorMode`
(shapes and dtypes only) with the static KV cache of the CUDA-graph path, while a dispatch mode adds up, per ATen op,
the bytes it reads from weights, the other bytes it reads (activations, KV cache, masks) and the bytes it writes.
A view moves nothing; a broadcast input counts its distinct elements once. Eager op by op, as PyTorch runs it without
fusion (so the figures bound what a fusing compiler would move), with CPU kernels standing in for CUDA ones.

The table gives the number of ops (each a kernel launch in eager PyTorch) and bytes per call (averaged over the
language-model steps of the whole image: the cache grows) and the time they take at ``--bandwidth`` (default
2.98 TB/s: the copy bandwidth measured on the H100, see RESULTS.md); the op table lists where the non-weight bytes go.
Set-up: `fake_generation.py`. The per-part rows are appended to ``OUTPUT_DIR/count_traffic.jsonl``.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_utils and fake_generation, one folder up
from bench_utils import add_output_argument, append_rows, print_table, rows_path  # noqa: E402
from fake_generation import add_fake_generation_arguments, build_fake_pipeline, generate, watch_calls  # noqa: E402


GB = 1e9


def distinct_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements ``tensor`` addresses (a broadcast dimension, stride 0, counts once)."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


class TrafficCounter(TorchDispatchMode):
    """Adds up, per phase and per op, weight bytes read, other bytes read and bytes written.

    An op whose every output aliases an input (a view) moves nothing; an in-place op writes as many bytes as it reads.
    """

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights = {tensor.untyped_storage()._cdata for tensor in weights}
        self.phase = None
        self.calls = defaultdict(int)
        self.bytes = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0]))  # phase -> op -> [weights, read, written, ops]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if self.phase is None or not outputs:
            return out
        input_storages = {t.untyped_storage()._cdata for t in inputs}
        mutated = func._schema.is_mutable
        if not mutated and all(t.untyped_storage()._cdata in input_storages for t in outputs):
            return out  # a view
        row = self.bytes[self.phase][func.overloadpacket.__name__]
        read = 0
        for tensor in inputs:
            if tensor.untyped_storage()._cdata in self.weights:
                row[0] += distinct_bytes(tensor)
            elif not (mutated and any(tensor is t for t in outputs)):
                read += distinct_bytes(tensor)
        row[1] += read
        # An in-place op (a cache update) writes what it reads into its output, not the whole output.
        row[2] += read if mutated else sum(distinct_bytes(t) for t in outputs)
        row[3] += 1
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fake_generation_arguments(parser)
    parser.add_argument("--bandwidth", type=float, default=2.98, help="TB/s for the time column")
    parser.add_argument("--top", type=int, default=8, help="ops listed per part, by non-weight bytes")
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "count_traffic")

    start = time.perf_counter()
    with FakeTensorMode():
        pipe, existing = build_fake_pipeline(args)
        pipe.block_engine.static_cache = True  # the KV cache of the CUDA-graph path, without capturing graphs
        counter = TrafficCounter(existing)

        def enter(part):
            counter.phase = part
            counter.calls[part] += 1

        watch_calls(pipe, enter, leave=lambda part: setattr(counter, "phase", None))
        with counter:
            generate(pipe, args, num_inference_steps=1, output_type="latent")

    seconds_per_byte = 1 / (args.bandwidth * 1e12)
    summary, details, records = [], [], []
    for phase, ops in counter.bytes.items():
        calls = counter.calls[phase]
        weights, read, written, num_ops = (sum(row[i] for row in ops.values()) / calls for i in range(4))
        summary.append([phase, calls, f"{num_ops:.0f}", f"{weights / GB:.3f}", f"{read / GB:.3f}", f"{written / GB:.3f}",
                        f"{weights * seconds_per_byte * 1e3:.2f}", f"{(read + written) * seconds_per_byte * 1e3:.2f}",
                        f"{(weights + read + written) / weights:.2f}"])  # fmt: skip
        records.append({"part": phase, "calls": calls, "ops_per_call": num_ops, "weights_gb": weights / GB,
                        "other_read_gb": read / GB, "written_gb": written / GB})  # fmt: skip
        ranked = sorted(ops.items(), key=lambda item: -(item[1][1] + item[1][2]))[: args.top]
        details += [[phase, op, f"{n / calls:.0f}", f"{(r + w) / calls / GB:.4f}",
                     f"{(r + w) * seconds_per_byte / calls * 1e3:.3f}"] for op, (_, r, w, n) in ranked]  # fmt: skip
    title = (f"{args.config} {args.height}x{args.width} batch={args.batch} cfg={args.guidance} {args.dtype}, static "
             f"KV cache: bytes per call, eager, at {args.bandwidth} TB/s (counted in {time.perf_counter() - start:.0f} s)")  # fmt: skip
    print_table(title, ["part", "calls", "ops", "weights GB", "other read GB", "written GB", "weights ms", "other ms",
                        "all / weights"], summary)  # fmt: skip
    print_table("where the non-weight bytes go (per call)", ["part", "op", "ops", "GB", "ms"], details)
    for record in records:
        record.update(config=args.config, height=args.height, width=args.width, batch=args.batch,
                      guidance=args.guidance, dtype=args.dtype)  # fmt: skip
    append_rows(results_path, records, torch.device("cpu"))


if __name__ == "__main__":
    main()
