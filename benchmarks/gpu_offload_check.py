"""Offload modes on a GPU: each must give the codes of the resident run; prints latency and peak memory per mode.

    python benchmarks/gpu_offload_check.py [--config small] [--height 256 --width 256] [--modes model_cpu_offload,...]

The resident run always comes first (its codes are the reference); ``--modes`` picks the offload modes after it. Each
mode runs twice and keeps the second run. The rows are appended to ``OUTPUT_DIR/gpu_offload_check.jsonl``; the script
exits with an error if a mode's codes differ from the resident run's.
"""

import argparse
import time

import torch
from bench_utils import add_output_argument, append_rows, rows_path
from diffusers.hooks import apply_group_offloading

from bitdance_diffusers.random_pipeline import build_random_pipeline


MODES = ("model_cpu_offload", "sequential_cpu_offload", "group_offload_language_model")


def run(pipe, args):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    codes = pipe("a red fox in the snow", height=args.height, width=args.width, num_inference_steps=args.steps,
                 guidance_scale=7.5, generator=torch.Generator("cuda").manual_seed(0), output_type="latent").images  # fmt: skip
    torch.cuda.synchronize()
    return codes.cpu(), time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="small")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    add_output_argument(parser)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
    if not torch.cuda.is_available():
        parser.error("this check needs a CUDA GPU (torch.cuda.is_available() is False)")
    results_path = rows_path(parser, args, "gpu_offload_check")

    def fresh():
        pipe = build_random_pipeline(args.config, block_size=64, image_sizes=[[args.height, args.width]],
                                     dtype=torch.bfloat16, device="cpu")  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    rows = []
    pipe = fresh().to("cuda")
    run(pipe, args)
    reference, seconds, peak = run(pipe, args)
    rows.append(("resident", True, seconds, peak))
    del pipe
    torch.cuda.empty_cache()

    for mode in modes:
        pipe = fresh()
        if mode == "model_cpu_offload":
            pipe.enable_model_cpu_offload()
        elif mode == "sequential_cpu_offload":
            pipe.enable_sequential_cpu_offload()
        else:
            apply_group_offloading(pipe.language_model, onload_device=torch.device("cuda"), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=True)  # fmt: skip
            for name in ("projector", "diffusion_head", "vae"):
                getattr(pipe, name).to("cuda")
        run(pipe, args)
        codes, seconds, peak = run(pipe, args)
        rows.append((mode, torch.equal(codes, reference), seconds, peak))
        del pipe
        torch.cuda.empty_cache()

    print(f"\noffload modes, {args.config} bf16 {args.height}x{args.width} {args.steps} steps, {torch.cuda.get_device_name()}")
    print(f"{'mode':32s} {'same codes':10s} {'seconds':>8s} {'peak GiB':>9s}")
    for mode, same, seconds, peak in rows:
        print(f"{mode:32s} {str(same):10s} {seconds:8.3f} {peak:9.3f}")
    setting = dict(config=args.config, dtype="bf16", height=args.height, width=args.width, steps=args.steps)
    append_rows(results_path, [dict(mode=mode, same_codes=same, seconds=seconds, peak_gib=peak, **setting)
                               for mode, same, seconds, peak in rows], torch.device("cuda"))  # fmt: skip
    raise SystemExit(0 if all(same for _, same, _, _ in rows) else 1)


if __name__ == "__main__":
    main()
