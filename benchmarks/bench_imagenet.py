"""Speed and memory of `BitDanceImageNetPipeline` on random weights of the B / L / H shapes.

    python benchmarks/bench_imagenet.py --size B --block_size 4 --batch 64 --device cuda --dtype bf16 --cuda_graphs
    python benchmarks/bench_imagenet.py --size tiny --block_size 4 --batch 2 --steps 4 --sample_size 4

Prints one table per run: time per batch and images/s, a breakdown (backbone block steps, head, decode, the rest) and
peak memory; on GPU also the floor of the same work (per forward, the larger of weight bytes / measured copy bandwidth
and matmul FLOPs / measured bf16 matmul rate; the decoder at its measured time). ``--batches`` adds images/s at other
batch sizes. The decoder has the shapes of ae_d16c32 for B / L / H (the tiny one for ``tiny``).
"""

import argparse
import time
from contextlib import ExitStack

import torch
from bench_utils import (
    DTYPES,
    add_output_argument,
    append_rows,
    measure_gpu_ceilings,
    module_bytes,
    module_matmul_params,
    peak_memory_gb,
    print_table,
    rows_path,
    synchronize,
)

from bitdance_diffusers import BitDanceTokenizer
from bitdance_diffusers.model_presets import T2I_PRESETS
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline


class ComponentTimer:
    """Times every forward of the backbone, the head and the decoder (synchronising on GPU), with the head's rows; it
    watches the engines' calls, so it sees CUDA-graph replays too."""

    def __init__(self, pipe, device):
        self.pipe, self.device = pipe, device
        self.times = {"backbone": [], "head": [], "decode": []}
        self.head_tokens = 0

    def _timed(self, function, bucket):
        def wrapper(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(self.device)
            self.times[bucket].append(time.perf_counter() - start)
            if bucket == "head":
                self.head_tokens = args[0].shape[0] * (args[0].shape[1] if args[0].ndim == 3 else 1)
            return result

        return wrapper

    def _observe(self, kind, forward):
        return self._timed(forward, "head" if kind == "head" else "backbone")

    def __enter__(self):
        pipe = self.pipe
        pipe.vae.decode = self._timed(pipe.vae.decode, "decode")
        self._observers = ExitStack()
        self._observers.enter_context(pipe.block_engine.observe_calls(self._observe))
        self._observers.enter_context(pipe.head_sampler.observe_calls(self._observe))
        return self

    def __exit__(self, *exc):
        self._observers.close()
        del self.pipe.vae.decode


def generate(pipe, args, batch: int):
    labels = [(7 * i) % 1000 for i in range(batch)]
    return pipe(labels, guidance_scale=args.guidance, num_inference_steps=args.steps, output_type="pt",
                generator=torch.Generator(args.device).manual_seed(0)).images  # fmt: skip


def timed(pipe, args, device, batch: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    generate(pipe, args, batch)
    synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "B", "L", "H"], default="B")
    parser.add_argument("--block_size", type=int, default=4, help="tokens per block P (1 = the MLP head)")
    parser.add_argument("--sample_size", type=int, default=16, help="token grid side (16 = 256x256 images)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda_graphs", action="store_true", help="replay the head from CUDA graphs")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes for an images/s table")
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "bench_imagenet")

    device = torch.device(args.device)
    pipe = build_random_imagenet_pipeline(args.size, block_size=args.block_size, sample_size=args.sample_size,
                                          dtype=DTYPES[args.dtype], device=device)  # fmt: skip
    if args.size != "tiny":
        with torch.device(device):
            vae = BitDanceTokenizer(z_channels=32, **T2I_PRESETS["14b"]["vae"]).to(DTYPES[args.dtype]).eval()
        pipe.register_modules(vae=vae)
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()

    label = (f"ImageNet {args.size} P={args.block_size} {16 * args.sample_size}px steps={args.steps} "
             f"cfg={args.guidance} batch={args.batch} {args.dtype}{' cuda-graphs' if args.cuda_graphs else ''} "
             f"on {device.type}")  # fmt: skip
    generate(pipe, args, args.batch)  # warm-up (and CUDA graph capture)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = timed(pipe, args, device, args.batch)
    peak = peak_memory_gb(device)
    with ComponentTimer(pipe, device) as timer:
        generate(pipe, args, args.batch)
    parts = {bucket: sum(times) for bucket, times in timer.times.items()}

    rows = [["total", f"{total:.3f}"], *[[name, f"{seconds:.3f}"] for name, seconds in parts.items()],
            ["rest", f"{total - sum(parts.values()):.3f}"]]  # fmt: skip
    header = ["part", "seconds"]
    result = {"run": label, "total_s": total, "parts_s": parts, "peak_memory_gib": peak,
              "images_per_s": args.batch / total}  # fmt: skip
    if device.type == "cuda":
        bandwidth, flops_rate = measure_gpu_ceilings(device)
        head_floor = max(module_bytes(pipe.diffusion_head) / bandwidth,
                         2 * module_matmul_params(pipe.diffusion_head) * timer.head_tokens / flops_rate)  # fmt: skip
        backbone_floor = module_bytes(pipe.transformer, "embedding") / bandwidth
        floors = {"backbone": backbone_floor * len(timer.times["backbone"]),
                  "head": head_floor * len(timer.times["head"]), "decode": parts["decode"]}  # fmt: skip
        floor = sum(floors.values())
        header += ["floor s", "ratio"]
        rows[0] += [f"{floor:.3f}", f"{total / floor:.2f}"]
        for row in rows[1:4]:
            row += [f"{floors[row[0]]:.3f}", f"{float(row[1]) / floors[row[0]]:.2f}"]
        rows[4] += ["0", "-"]
        result.update(floor_s=floor, floors_s=floors, ratio=total / floor)
    print_table(f"{label}  |  {len(timer.times['head'])} head calls, {len(timer.times['backbone'])} backbone forwards",
                header, rows)  # fmt: skip
    print(f"{args.batch / total:.2f} images/s, peak memory {peak:.2f} GiB")

    if args.batches:
        scaling = [(batch, timed(pipe, args, device, batch)) for batch in map(int, args.batches.split(","))]
        print_table("images/s against batch size", ["batch", "seconds", "images/s"],
                    [[b, f"{s:.3f}", f"{b / s:.2f}"] for b, s in scaling])  # fmt: skip
        result["scaling"] = [{"batch": b, "seconds": s, "images_per_s": b / s} for b, s in scaling]
    append_rows(results_path, [result], device)


if __name__ == "__main__":
    main()
