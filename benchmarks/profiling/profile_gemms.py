"""The matrix products of one head call and one language-model block step, timed one by one against their floor.

    python benchmarks/profiling/profile_gemms.py --device cuda --config 14b-64x --height 1024 --width 1024 [--autotune]

At batch 1 every head call and every block step streams its weights once, so each product should run at the copy
bandwidth. This script says which ones do. The shapes come from the pipeline itself: a generation on fake tensors
(`fake_generation.py`: no memory, no compute) with a hook on every ``nn.Linear`` records the products of the first
head call and of the first block step. Each distinct shape is then run on random weights in the run's dtype, in
variants:

* ``cublas``: ``F.linear``, what the pipeline runs;
* ``split-K s``: the K axis cut into ``s`` chunks, one batched product into float32 partial sums, then their sum
  (more SMs stream the weight when few output tiles would keep the rest idle; s = 2 and 4);
* ``int8 weights`` / ``fp8 weights``: weight-only quantization with one scale per output row, computed as torchao's
  weight-only linears compute it, ``F.linear(x, weight.to(x.dtype)) * scale``: eager, the conversion is a kernel of
  its own that writes the whole bf16 weight;
* with ``--autotune``, ``torch.compile(mode="max-autotune-no-cudagraphs")`` of ``cublas`` and of the two weight-only
  products (Triton tilings searched per shape, a few seconds each; the weight conversion can then fuse into the
  matmul as its prologue, so a quantized weight is read in its own width).

On CUDA a variant is timed as the pipeline runs it: ``--calls`` products captured in one CUDA graph, cycling over
copies of the weight that together exceed the L2 cache, median of the replays. On CPU it is timed with the host clock
(the test suite runs a tiny config so). Per shape the table gives microseconds per product, the floor (the bytes of
weight, input and output over the copy bandwidth measured in the same run, or ``--bandwidth``), the best variant's
ratio to it (over the unquantized variants; a weight-only variant below 1 beats the bf16 floor) and errors against a
float64 product; per part, the sums over a call. The rows are appended to ``OUTPUT_DIR/profile_gemms.jsonl``.
"""

import argparse
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_utils and fake_generation, one folder up
from bench_utils import (  # noqa: E402
    DTYPES,
    add_output_argument,
    append_rows,
    measure_gpu_ceilings,
    print_table,
    rows_path,
)
from fake_generation import add_fake_generation_arguments, build_fake_pipeline, generate, watch_calls  # noqa: E402


L2_BYTES = 50 * 2**20  # H100 / H200


class _ShapesRecorded(Exception):
    """Ends the fake generation once the first block step has run: every later call repeats its shapes."""


def record_linear_shapes(args) -> dict[str, Counter]:
    """``{part: Counter((rows, in_features, out_features, bias) -> products per call)}`` of the first head call and
    the first language-model block step of a generation with the options of ``args``."""
    shapes = {"head call": Counter(), "language-model block step": Counter()}
    calls = Counter()
    recording = None

    def enter(part):
        nonlocal recording
        calls[part] += 1
        recording = part if calls[part] == 1 else None

    def leave(part):
        nonlocal recording
        if part == "language-model block step":
            raise _ShapesRecorded
        recording = None

    def record(module, inputs, _output):
        if recording is not None:
            rows = inputs[0].numel() // module.in_features
            shapes[recording][(rows, module.in_features, module.out_features, module.bias is not None)] += 1

    with FakeTensorMode():
        pipe, _ = build_fake_pipeline(args)
        watch_calls(pipe, enter, leave)
        for linear in (*pipe.language_model.modules(), *pipe.diffusion_head.modules()):
            if isinstance(linear, torch.nn.Linear):
                linear.register_forward_hook(record)
        try:
            generate(pipe, args, num_inference_steps=1, output_type="latent")
        except _ShapesRecorded:
            pass
    return shapes


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``[M, K]`` as ``splits`` products over slices of K, summed in float32."""
    rows, features = x.shape
    x_slices = x.view(rows, splits, features // splits).transpose(0, 1)  # [s, M, K/s]
    w_slices = weight.view(weight.shape[0], splits, features // splits).permute(1, 2, 0)  # [s, K/s, N]
    if x.is_cuda and x.dtype != torch.float32:
        partials = torch.bmm(x_slices, w_slices, out_dtype=torch.float32)  # float32 accumulators written out
    else:  # out_dtype is CUDA-only
        partials = torch.bmm(x_slices.float(), w_slices.float())
    out = partials.sum(0)
    if bias is not None:
        out += bias
    return out.to(x.dtype)


def seconds_per_product(product, inputs: list[tuple], calls: int, device: torch.device) -> float:
    """Median seconds of one ``product(*inputs[i])``, cycling over ``inputs``: on CUDA replayed from a graph of
    ``calls`` products, elsewhere timed with the host clock."""
    if device.type != "cuda":
        product(*inputs[0])
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for index in range(calls):
                product(*inputs[index % len(inputs)])
            samples.append((time.perf_counter() - start) / calls)
        return statistics.median(samples)
    side_stream = torch.cuda.Stream(device)
    side_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side_stream):  # warm-up outside the graph: cuBLAS handles, compilation, autotuning
        for operands in inputs[:2]:
            product(*operands)
    torch.cuda.current_stream(device).wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in range(calls):
            product(*inputs[index % len(inputs)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(10):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantized [N, K], scale [N])`` with one scale per output row (int8: symmetric, rounded; fp8: e4m3)."""
    largest = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    scale = weight.float().abs().amax(dim=1).clamp_min(1e-12) / largest
    scaled = weight.float() / scale[:, None]
    quantized = (scaled.round().clamp(-128, 127) if dtype == torch.int8 else scaled).to(dtype)
    return quantized, scale.to(weight.dtype)


def weight_only_linear(x: torch.Tensor, quantized: tuple, bias: torch.Tensor | None) -> torch.Tensor:
    """The product of torchao's weight-only linears: the weight converted to the input's dtype, scaled per row."""
    weight, scale = quantized
    out = F.linear(x, weight.to(x.dtype)) * scale
    return out if bias is None else out + bias


@dataclass
class Variant:
    """One way to compute ``F.linear(x, weight, bias)``: ``prepare`` turns each weight into the operand ``product``
    takes (once, outside the timing); ``compiled`` products are compiled afresh for every shape (Dynamo's
    recompilation limit would otherwise send later shapes to eager)."""

    product: Callable
    prepare: Callable = lambda weight: weight
    quantized: bool = False
    compiled: bool = False

    def build(self) -> Callable:
        if not self.compiled:
            return self.product
        torch._dynamo.reset()
        return torch.compile(self.product, mode="max-autotune-no-cudagraphs", dynamic=False)


def variants_for(device: torch.device, autotune: bool) -> dict[str, Variant]:
    int8, fp8 = (partial(quantize_rows, dtype=dtype) for dtype in (torch.int8, torch.float8_e4m3fn))
    variants = {
        "cublas" if device.type == "cuda" else "linear": Variant(F.linear),
        "split-K 2": Variant(partial(split_k_linear, splits=2)),
        "split-K 4": Variant(partial(split_k_linear, splits=4)),
        "int8 weights": Variant(weight_only_linear, int8, quantized=True),
        "fp8 weights": Variant(weight_only_linear, fp8, quantized=True),
    }
    if autotune:
        variants["autotuned"] = Variant(F.linear, compiled=True)
        variants["int8 weights autotuned"] = Variant(weight_only_linear, int8, quantized=True, compiled=True)
        variants["fp8 weights autotuned"] = Variant(weight_only_linear, fp8, quantized=True, compiled=True)
    return variants


def time_shape(shape, variants: dict[str, Variant], dtype, device, calls: int, bandwidth: float) -> dict:
    """Times every variant on one ``(rows, in, out, bias)`` product; returns microseconds, floor and errors."""
    rows, features, outputs, has_bias = shape
    weight_bytes = outputs * features * torch.finfo(dtype).bits // 8
    copies = min(calls, max(2, -(-4 * L2_BYTES // weight_bytes))) if device.type == "cuda" else 2
    inputs = []
    for _ in range(copies):
        weight = torch.randn(outputs, features, device=device, dtype=dtype) / features**0.5
        bias = torch.randn(outputs, device=device, dtype=dtype) if has_bias else None
        inputs.append((torch.randn(rows, features, device=device, dtype=dtype), weight, bias))
    x, weight, bias = inputs[0]
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    moved = weight_bytes + (rows * features + rows * outputs + (outputs if has_bias else 0)) * x.element_size()
    result = {"floor_us": moved / bandwidth * 1e6, "weight_mb": weight_bytes / 1e6}
    for name, variant in variants.items():
        if name.startswith("split-K") and features % int(name.split()[-1]):
            continue
        try:  # one variant failing on this device (a compile, a capture) leaves the others' figures
            product = variant.build()
            operands = [(x_i, variant.prepare(w_i), b_i) for x_i, w_i, b_i in inputs]
            out = product(*operands[0])
            result[f"{name} error"] = float((out.double() - reference).norm() / reference.norm())
            result[f"{name} us"] = seconds_per_product(product, operands, calls, device) * 1e6
        except (RuntimeError, TypeError) as error:
            print(f"{name} failed on {rows}x{features}->{outputs}: {str(error).splitlines()[0]}")
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fake_generation_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autotune", action="store_true", help="add the max-autotune compiled variants")
    parser.add_argument("--only", choices=["head", "language-model"], default=None, help="profile one part only")
    parser.add_argument("--calls", type=int, default=32, help="products per timed graph (CUDA) or loop (CPU)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="TB/s for the floor (default: the copy bandwidth measured on CUDA; required on CPU)")
    add_output_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.bandwidth is None and device.type != "cuda":
        parser.error("--bandwidth is needed off CUDA (there is no copy bandwidth to measure it against)")
    results_path = rows_path(parser, args, "profile_gemms")

    shapes = record_linear_shapes(args)
    if args.only:
        shapes = {part: counts for part, counts in shapes.items() if part.startswith(args.only)}
    bandwidth = args.bandwidth * 1e12 if args.bandwidth else measure_gpu_ceilings(device)[0]
    variants = variants_for(device, args.autotune)
    dtype = DTYPES[args.dtype]

    rows, summary, records = [], [], []
    for part, counts in shapes.items():
        totals = Counter()
        for shape, count in sorted(counts.items(), key=lambda item: -item[0][1] * item[0][2] * item[1]):
            timing = time_shape(shape, variants, dtype, device, args.calls, bandwidth)
            times = {name: timing[f"{name} us"] for name in variants if f"{name} us" in timing}
            best = min((name for name in times if not variants[name].quantized), key=times.get)
            rows.append([part, f"{shape[0]}x{shape[1]}->{shape[2]}", count, f"{timing['weight_mb']:.1f}",
                         *[f"{times[name]:.1f}" if name in times else "-" for name in variants],
                         f"{timing['floor_us']:.1f}", best, f"{times[best] / timing['floor_us']:.2f}",
                         f"{timing[f'{best} error']:.1e}"])  # fmt: skip
            totals["floor"] += count * timing["floor_us"]
            totals["best"] += count * times[best]
            for name in variants:  # a variant missing on any shape gets no per-call total
                totals[name] += count * times[name] if name in times else float("nan")
            records.append({"part": part, "rows": shape[0], "in_features": shape[1], "out_features": shape[2],
                            "bias": shape[3], "per_call": count, **timing})  # fmt: skip
        summary.append([part, sum(counts.values()), *[f"{totals[name] / 1e3:.3f}" for name in variants],
                        f"{totals['best'] / 1e3:.3f}", f"{totals['floor'] / 1e3:.3f}",
                        f"{totals['best'] / totals['floor']:.2f}"])  # fmt: skip

    title = (f"{args.config} {args.height}x{args.width} batch={args.batch} cfg={args.guidance} {args.dtype} on "
             f"{device.type}: one product per shape, microseconds (floor at {bandwidth / 1e12:.2f} TB/s)")  # fmt: skip
    print_table(title, ["part", "rows x in -> out", "per call", "weight MB", *[f"{n} us" for n in variants],
                        "floor us", "best", "best / floor", "error"], rows)  # fmt: skip
    print_table("per call: products in milliseconds", ["part", "products", *[f"{n} ms" for n in variants],
                                                         "best ms", "floor ms", "best / floor"], summary)  # fmt: skip
    append_rows(results_path, [{"run": title, "gemms": records}], device)


if __name__ == "__main__":
    main()
