"""Where the device time of a head call and a language-model block step goes, kernel by kernel (torch.profiler).

    python benchmarks/profiling/profile_kernels.py --device cuda --config 14b-64x --dtype bf16 --height 1024 \
        --width 1024

Runs one generation eagerly and profiles its blocks 1 to ``--blocks`` (after a warm-up generation): every head call
and every block step is a profiler range, so each kernel counts for the call that launched it. Kernel durations are
those the CUDA-graph path replays; only the launch gaps between them differ. Prints, per part: calls, kernels per
call, device time per call split into matrix products, attention and the rest, and the CPU time each call's range
took (on CUDA: the time to launch its kernels, which bounds an eager step when it exceeds their device time); then the
kernels that take the most device time. The generation stops after the profiled blocks.

Off CUDA the ranges hold CPU ops instead of kernels, each counted with its own (self) CPU time; the test suite runs a
tiny config so. ``--compile`` profiles the inductor-compiled head and language model (their fused kernels). The
per-part rows are appended to ``OUTPUT_DIR/profile_kernels.jsonl``.
"""

import argparse
import re
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from bitdance_diffusers.random_pipeline import build_random_pipeline


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_utils, one folder up
from bench_utils import (  # noqa: E402
    DTYPES,
    T2I_CONFIGS,
    add_output_argument,
    add_t2i_run_arguments,
    append_rows,
    print_table,
    rows_path,
    synchronize,
)


PARTS = ("head call", "language-model block step")
# cuBLAS (xmma, nvjet and cutlass kernels, split-K reductions), inductor's Triton matmul templates; on CPU the ATen ops.
MATMUL = re.compile(r"gemm|xmma|nvjet|cutlass|cublas|splitk|triton_tem|aten::(addmm|mm|bmm|baddbmm|_scaled_mm)$", re.I)
ATTENTION = re.compile(r"fmha|flash|attention|attn|sdpa", re.IGNORECASE)


def category(name: str) -> str:
    if ATTENTION.search(name):
        return "attention"
    return "matmul" if MATMUL.search(name) else "other"


def work_items(event, on_cuda: bool):
    """``(name, microseconds)`` of the device work under a profiler range: its kernels on CUDA, else every CPU op
    below it with its self time."""
    for child in event.cpu_children:
        if on_cuda:
            yield from ((kernel.name, kernel.duration) for kernel in child.kernels)
        else:
            yield child.name, child.self_cpu_time_total
        yield from work_items(child, on_cuda)


@contextmanager
def profiled_ranges(pipe):
    """Puts every head call and language-model block step of ``pipe`` in a profiler range named after ``PARTS``."""
    names = {"head": PARTS[0], "block step": PARTS[1]}

    def ranged(kind, forward):
        if kind not in names:
            return forward

        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(names[kind]):
                return forward(*args, **kwargs)

        return wrapper

    with pipe.block_engine.observe_calls(ranged), pipe.head_sampler.observe_calls(ranged):
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(T2I_CONFIGS), default="small")
    add_t2i_run_arguments(parser)
    parser.add_argument("--blocks", type=int, default=2, help="blocks profiled (from the second one)")
    parser.add_argument("--compile", choices=["none", "default", "max-autotune-no-cudagraphs"], default="none")
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "profile_kernels")

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    model, block_size = T2I_CONFIGS[args.config]
    pipe = build_random_pipeline(model, block_size=block_size, image_sizes=[[args.height, args.width]],
                                 dtype=DTYPES[args.dtype], device=device)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    num_blocks = (args.height // 16) * (args.width // 16) // block_size
    if not 1 <= args.blocks < num_blocks:
        parser.error(f"--blocks must be between 1 and {num_blocks - 1} (the image has {num_blocks} blocks)")
    if args.compile != "none":
        pipe.diffusion_head.compile(mode=args.compile, dynamic=False)
        pipe.language_model.compile(mode=args.compile, dynamic=False)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    profiler = torch.profiler.profile(activities=activities)

    def profile_blocks(pipe, block, timestep, callback_kwargs):
        """Runs after block ``block`` is sampled and before it is fed back: profiles feeds 0..n-1, heads 1..n."""
        synchronize(device)
        if block == 0:
            profiler.start()
        elif block == args.blocks:
            profiler.stop()
            pipe._interrupt = True
        return callback_kwargs

    prompt = ["a photo of a red fox sitting in fresh snow at sunrise"] * args.batch
    options = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   output_type="latent")  # fmt: skip
    with profiled_ranges(pipe):
        pipe(prompt, **{**options, "num_inference_steps": 1})  # warm-up: kernels, handles, compilation
        pipe(prompt, **options, callback_on_step_end=profile_blocks)

    rows, records, kernels = [], [], defaultdict(lambda: [0, 0.0])
    events = profiler.events()
    for part in PARTS:
        ranges = [event for event in events if event.name == part]
        totals, count = defaultdict(float), 0
        for event in ranges:
            for name, duration in work_items(event, on_cuda):
                totals[category(name)] += duration
                kernels[(part, name)][0] += 1
                kernels[(part, name)][1] += duration
                count += 1
        calls = len(ranges)
        wall = sum(event.cpu_time_total for event in ranges)
        milliseconds = {kind: totals[kind] / calls / 1e3 for kind in ("matmul", "attention", "other")}
        records.append({"part": part, "calls": calls, "work_items_per_call": count / calls,
                        **{f"{kind}_ms_per_call": ms for kind, ms in milliseconds.items()},
                        "range_cpu_ms_per_call": wall / calls / 1e3})  # fmt: skip
        rows.append([part, calls, f"{count / calls:.0f}", f"{sum(milliseconds.values()):.3f}",
                     *[f"{ms:.3f}" for ms in milliseconds.values()], f"{wall / calls / 1e3:.3f}"])  # fmt: skip
    unit, time_unit = ("kernels", "kernel ms") if on_cuda else ("CPU ops", "self CPU ms")
    print_table(f"{args.config} {args.height}x{args.width} steps={args.steps} cfg={args.guidance} batch={args.batch} "
                f"{args.dtype} on {device.type}{'' if args.compile == 'none' else ' compiled (' + args.compile + ')'}: "
                f"per call, {unit} and their time", ["part", "calls", unit, time_unit, "matmul ms", "attention ms",
                "other ms", "range CPU ms"], rows)  # fmt: skip
    calls = {row[0]: row[1] for row in rows}
    ranked = sorted(kernels.items(), key=lambda item: -item[1][1])[: args.top]
    print_table(f"the {args.top} {unit} with the most time (per call of their part)", ["part", "name", "count",
                "ms", "category"], [[part, name[:90], f"{n / calls[part]:.1f}", f"{t / calls[part] / 1e3:.4f}",
                category(name)] for (part, name), (n, t) in ranked])  # fmt: skip
    for record in records:
        record.update(config=args.config, height=args.height, width=args.width, steps=args.steps,
                      guidance=args.guidance, batch=args.batch, dtype=args.dtype, compile=args.compile)  # fmt: skip
    append_rows(results_path, records, device)


if __name__ == "__main__":
    main()
