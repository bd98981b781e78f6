"""Speed and memory of `BitDancePipeline` against the floor of the same work, on random weights.

    python benchmarks/bench_t2i.py --config small --height 256 --width 256 --block_size 64 --steps 25
    python benchmarks/bench_t2i.py --config 14b-64x --device cuda --dtype bf16 --height 1024 --width 1024 \
        --cuda_graphs --scaling

One run prints one table: time per image and images/s, where the time goes (prompt prefill, language-model block
steps, head sampling, decode, and the rest: orchestration, masks, caches, Python), peak memory, and the floor:

* CPU: the pure forward times of the language model (prefill and every block step), the head (at the pipeline's
  batch shape, timed over two blocks' worth of calls and scaled to the run's call count) and the decoder, each timed
  in isolation in the same process. With ``--repeats n`` the run, each isolated part and each scaling row keep their
  best of n.
* GPU: per forward, the larger of (weight bytes / measured copy bandwidth) and (matmul FLOPs / measured bf16 matmul
  rate), summed over the language-model forwards (embedding table excluded: it is gathered, not read) and the head
  calls, plus the decoder's isolated time.

``--scaling`` adds tables of time against head steps, batch size and guidance (none, all blocks, and guidance ended
by a callback after 40 % of the blocks, diffusers' dynamic-guidance pattern: the unconditional rows then leave the
batch), and the per-block times of the run. ``--guidance_cutoff F`` ends guidance that way in every run.
Every row is appended as one JSON line (machine, library versions and date included) to
``OUTPUT_DIR/bench_t2i.jsonl`` (``--output_dir``, default ``bench-out/``), for RESULTS.md.
"""

import argparse
import time
from contextlib import ExitStack, contextmanager

import torch
from bench_utils import (
    DTYPES,
    T2I_CONFIGS,
    add_output_argument,
    add_t2i_run_arguments,
    append_rows,
    measure_gpu_ceilings,
    module_bytes,
    module_matmul_params,
    peak_memory_gb,
    print_table,
    rows_path,
    synchronize,
)

from bitdance_diffusers.pipelines.engines import cache_argument_name
from bitdance_diffusers.quantization import QUANTIZATION_SCHEMES, quantize_model_
from bitdance_diffusers.random_pipeline import build_random_pipeline


PROMPT = "a photo of a red fox sitting in fresh snow at sunrise, highly detailed"


class Recorder:
    """Times every language-model forward, head call and decode of a run (synchronising on GPU) and keeps their
    shapes; it watches the engines' calls, so it sees CUDA-graph replays too."""

    def __init__(self, pipe, device):
        self.pipe, self.device = pipe, device
        self.times = {"prefill": [], "llm_step": [], "head": [], "decode": []}
        self.llm_calls = []  # (kind, (rows, new positions), mask shape)
        self.head_shapes = None
        self.block_ends = []

    def _timed(self, function, bucket):
        def wrapper(*args, **kwargs):
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return function(*args, **kwargs)  # a captured call: its replay is timed
            synchronize(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(self.device)
            self.times[bucket(args) if callable(bucket) else bucket].append(time.perf_counter() - start)
            return result

        return wrapper

    def _observe(self, kind, forward):
        if kind == "head":
            return self._timed(forward, self._head_bucket)
        bucket = "prefill" if kind == "prefill" else "llm_step"

        def llm_bucket(args):  # (position_ids, attention_mask, inputs_embeds)
            self.llm_calls.append((bucket, tuple(args[2].shape[:2]), tuple(args[1].shape)))
            return bucket

        return self._timed(forward, llm_bucket)

    def _head_bucket(self, args):
        self.head_shapes = (tuple(args[0].shape), tuple(args[2].shape))
        return "head"

    @contextmanager
    def attached(self):
        pipe = self.pipe
        pipe.vae.decode = self._timed(pipe.vae.decode, "decode")
        try:
            with ExitStack() as stack:
                stack.enter_context(pipe.block_engine.observe_calls(self._observe))
                stack.enter_context(pipe.head_sampler.observe_calls(self._observe))
                yield self
        finally:
            del pipe.vae.decode

    def block_callback(self, pipe, block, timestep, callback_kwargs):
        synchronize(self.device)
        self.block_ends.append(time.perf_counter())
        return callback_kwargs


def guidance_cutoff(fraction: float, then=None):
    """A callback that ends guidance after ``fraction`` of the blocks, as diffusers' ``SDCFGCutoffCallback`` does
    (``pipe._guidance_scale = 0``), then calls ``then`` (another callback) if given."""

    def callback(pipe, block, timestep, callback_kwargs):
        if block == int(pipe.num_timesteps * fraction):
            pipe._guidance_scale = 0.0
        return then(pipe, block, timestep, callback_kwargs) if then else callback_kwargs

    return callback


def generate(pipe, args, batch=None, steps=None, guidance=None, cutoff=None, **kwargs):
    """One generation of ``args``' prompt; ``cutoff`` (default ``--guidance_cutoff``) ends guidance after that fraction
    of the blocks."""
    cutoff = args.guidance_cutoff if cutoff is None else cutoff
    if cutoff is not None:
        kwargs["callback_on_step_end"] = guidance_cutoff(cutoff, then=kwargs.get("callback_on_step_end"))
    generator = torch.Generator(args.device).manual_seed(0)
    return pipe([PROMPT] * (batch or args.batch), height=args.height, width=args.width,
                num_inference_steps=steps or args.steps, guidance_scale=args.guidance if guidance is None else guidance,
                generator=generator, output_type="pt", **kwargs).images  # fmt: skip


def timed_generate(pipe, args, device, **kwargs) -> float:
    """The best wall-clock time of ``--repeats`` generations."""
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        generate(pipe, args, **kwargs)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


# Floors ------------------------------------------------------------------------------------------------------------


def weight_sizes(pipe) -> dict:
    """Bytes read and matmul parameters per forward of the language model (embedding table excluded) and head."""
    return {
        "lm_bytes": module_bytes(pipe.language_model, "embed_tokens"),
        "lm_params": module_matmul_params(pipe.language_model, "embed_tokens"),
        "head_bytes": module_bytes(pipe.diffusion_head),
        "head_params": module_matmul_params(pipe.diffusion_head),
    }


def gpu_floor(pipe, sizes, recorder, bandwidth, flops_rate, decode_time) -> dict:
    """The bandwidth/compute floor of the recorded work, for weights of ``sizes`` (taken before any quantization)."""
    lm_bytes, lm_params, head_bytes, head_params = (sizes[k] for k in ("lm_bytes", "lm_params", "head_bytes",
                                                                       "head_params"))  # fmt: skip
    config = pipe.language_model.config
    floors = {"prefill": 0.0, "llm_step": 0.0, "head": 0.0, "decode": decode_time}
    for kind, shape, mask_shape in recorder.llm_calls:
        rows, new = shape[0], shape[1]
        attention = 4 * rows * config.num_attention_heads * new * mask_shape[-1] * config.head_dim * config.num_hidden_layers
        work = (2 * lm_params * rows * new + attention) / flops_rate
        floors[kind] += max(lm_bytes / bandwidth, work)
    (rows, tokens, _), _ = recorder.head_shapes
    head_call = max(head_bytes / bandwidth, 2 * head_params * rows * tokens / flops_rate)
    floors["head"] = head_call * len(recorder.times["head"])
    return floors


@torch.no_grad()
def cpu_floor(pipe, recorder, device) -> dict:
    """Pure forward times, each component alone, at the shapes the recorded run used."""
    from transformers import DynamicCache

    lm, head = pipe.language_model, pipe.diffusion_head
    dtype = lm.dtype
    floors = {"prefill": 0.0, "llm_step": 0.0, "head": 0.0, "decode": 0.0}
    cache = DynamicCache(config=lm.config)
    cache_argument = cache_argument_name(lm)
    for kind, shape, mask_shape in recorder.llm_calls:
        rows, new = shape[0], shape[1]
        mask = torch.zeros(mask_shape, dtype=dtype, device=device)
        positions = torch.arange(mask_shape[-1] - new, mask_shape[-1], device=device).expand(rows, -1)
        embeds = torch.randn(*shape, lm.config.hidden_size, dtype=dtype, device=device)
        synchronize(device)
        start = time.perf_counter()
        lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_argument: cache})
        synchronize(device)
        floors[kind] += time.perf_counter() - start

    (rows, tokens, channels), condition_shape = recorder.head_shapes
    sample = torch.randn(rows, tokens, channels, device=device)
    condition = torch.randn(condition_shape, device=device)
    t = torch.rand(rows, device=device)
    calls = len(recorder.times["head"])
    timed_calls = min(calls, 2 * (calls // max(1, len(recorder.times["llm_step"]) + 1)))
    start = time.perf_counter()
    for _ in range(timed_calls):
        head(sample, t, condition, return_dict=False)
    floors["head"] = (time.perf_counter() - start) * calls / max(1, timed_calls)

    codes = torch.ones(recorder.decode_shape, dtype=pipe.vae.dtype, device=device)
    start = time.perf_counter()
    pipe.vae.decode(codes)
    floors["decode"] = time.perf_counter() - start
    return floors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(T2I_CONFIGS), default="small")
    parser.add_argument("--block_size", type=int, default=None, help="tokens per block (default: the config's)")
    add_t2i_run_arguments(parser)
    parser.add_argument("--cuda_graphs", action="store_true",
                        help="replay the head and the language-model block step from CUDA graphs (static KV cache)")
    parser.add_argument("--head_graphs_only", action="store_true", help="with --cuda_graphs: the eager language model")
    parser.add_argument("--compile", choices=["none", "default", "max-autotune-no-cudagraphs"], default="none",
                        help="GPU: torch.compile the head and the language model first (CUDA graphs then capture the "
                             "compiled kernels); max-autotune searches GEMM tilings for the skinny block-step matmuls")
    parser.add_argument("--quantize", choices=["none", *QUANTIZATION_SCHEMES], default="none",
                        help="quantize the language model and head in place (see bitdance_diffusers.quantization)")
    parser.add_argument("--scaling", action="store_true", help="also time head steps, batch sizes and guidance")
    parser.add_argument("--guidance_cutoff", type=float, default=None,
                        help="end guidance after this fraction of the blocks (a callback sets pipe._guidance_scale = 0)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time the run (and on CPU each isolated forward) this many times and keep the best")
    add_output_argument(parser)
    parser.add_argument("--save_images", default=None, help="save the generated images (a .pt tensor) here")
    parser.add_argument("--compare_to", default=None, help="report PSNR against images saved by --save_images")
    parser.add_argument("--min_psnr", type=float, default=None,
                        help="with --compare_to: exit with an error (after writing the rows) below this PSNR in dB")
    args = parser.parse_args()
    results_path = rows_path(parser, args, "bench_t2i")

    device = torch.device(args.device)
    if args.compile != "none" and device.type != "cuda":
        parser.error("--compile needs --device cuda: the CPU floor times eager forwards over a growing cache")
    model, default_block_size = T2I_CONFIGS[args.config]
    block_size = args.block_size or default_block_size
    pipe = build_random_pipeline(model, block_size=block_size, image_sizes=[[args.height, args.width]],
                                 dtype=DTYPES[args.dtype], device=device)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # decode images one at a time: batches up to 8 at 1024x1024 stay within memory
    sizes = weight_sizes(pipe)
    if args.quantize != "none":
        quantize_model_(pipe.language_model, args.quantize)
        quantize_model_(pipe.diffusion_head, args.quantize)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.compile != "none":
        pipe.diffusion_head.compile(mode=args.compile, dynamic=False)
        pipe.language_model.compile(mode=args.compile, dynamic=False)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs(backbone=not args.head_graphs_only)

    label = (f"{args.config} P={block_size} {args.height}x{args.width} steps={args.steps} cfg={args.guidance} "
             f"batch={args.batch} {args.dtype}{' cuda-graphs' if args.cuda_graphs else ''}"
             f"{' (head only)' if args.cuda_graphs and args.head_graphs_only else ''}"
             f"{' ' + args.quantize if args.quantize != 'none' else ''}"
             f"{' compiled (' + args.compile + ')' if args.compile != 'none' else ''}"
             f"{f' guidance cut at {args.guidance_cutoff:.0%}' if args.guidance_cutoff is not None else ''} "
             f"on {device.type}")  # fmt: skip
    generate(pipe, args, steps=2)  # warm-up: kernels, cuBLAS handles, CUDA graph capture
    resident = None  # GPU memory held before a run: weights, CUDA-graph buffers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device) / 2**30
    total = timed_generate(pipe, args, device)
    peak = peak_memory_gb(device)

    recorder = Recorder(pipe, device)
    with recorder.attached():
        images = generate(pipe, args, callback_on_step_end=recorder.block_callback)
    recorder.decode_shape = (args.batch, pipe.vae.config.z_channels, args.height // pipe.vae_scale_factor,
                             args.width // pipe.vae_scale_factor)  # fmt: skip
    parts = {bucket: sum(times) for bucket, times in recorder.times.items()}
    if device.type == "cuda":
        bandwidth, flops_rate = measure_gpu_ceilings(device)
        floors = gpu_floor(pipe, sizes, recorder, bandwidth, flops_rate, parts["decode"])
        ceilings = f"copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s"
    else:
        repeated = [cpu_floor(pipe, recorder, device) for _ in range(args.repeats)]
        floors = {part: min(floor[part] for floor in repeated) for part in repeated[0]}
        ceilings = f"{torch.get_num_threads()} threads, best of {args.repeats}"
    floor = sum(floors.values())
    overhead = total - sum(parts.values())

    rows = [
        ["total", f"{total:.3f}", f"{floor:.3f}", f"{total / floor:.2f}"],
        *[[name, f"{parts[name]:.3f}", f"{floors[name]:.3f}", f"{parts[name] / max(floors[name], 1e-9):.2f}"]
          for name in ("prefill", "llm_step", "head", "decode")],
        ["overhead (rest)", f"{overhead:.3f}", "0", "-"],
    ]  # fmt: skip
    print_table(f"{label}  |  {len(recorder.times['head'])} head calls, {len(recorder.times['llm_step'])} LM block "
                f"steps, {ceilings}", ["part", "seconds", "floor s", "ratio"], rows)  # fmt: skip
    print(f"time per image {total / args.batch:.3f} s, {args.batch / total:.3f} images/s, peak memory {peak:.2f} GiB, "
          f"image {tuple(images.shape)}")  # fmt: skip
    if resident is not None:
        print(f"GPU memory: {resident:.2f} GiB resident before the run (weights, graph buffers) + "
              f"{peak - resident:.2f} GiB at the run's peak")  # fmt: skip

    if args.save_images:
        torch.save(images.cpu(), args.save_images)
    psnr = None
    if args.compare_to:
        reference = torch.load(args.compare_to)
        mse = (images.cpu().float() - reference.float()).pow(2).mean()
        psnr = float(10 * torch.log10(1 / mse.clamp_min(1e-12)))
        print(f"PSNR against {args.compare_to}: {psnr:.2f} dB")

    block_times = [b - a for a, b in zip(recorder.block_ends, recorder.block_ends[1:])]
    results = [{"run": label, "total_s": total, "floor_s": floor, "ratio": total / floor, "parts_s": parts,
                "floors_s": floors, "peak_memory_gib": peak, "resident_memory_gib": resident,
                "images_per_s": args.batch / total, "psnr_db": psnr,
                "first_block_s": block_times[0] if block_times else None,
                "last_block_s": block_times[-1] if block_times else None}]  # fmt: skip
    if block_times:
        print(f"per-block time: first {block_times[0] * 1e3:.1f} ms, last {block_times[-1] * 1e3:.1f} ms, "
              f"last/first {block_times[-1] / block_times[0]:.2f} (LM step growth from attention over the cache: "
              f"{recorder.times['llm_step'][-1] / recorder.times['llm_step'][0]:.2f}x)")  # fmt: skip

    if args.scaling:
        scaling = []
        for steps in sorted({max(1, args.steps // 2), args.steps}):
            scaling.append(["head steps", steps, timed_generate(pipe, args, device, steps=steps), args.batch])
        for batch in [int(b) for b in args.batches.split(",")]:
            try:
                scaling.append(["batch", batch, timed_generate(pipe, args, device, batch=batch), batch])
            except torch.OutOfMemoryError:
                print(f"batch {batch}: out of memory")
                torch.cuda.empty_cache()
        guidance_runs = [("guidance", 1.0, None), ("guidance", args.guidance, None),
                         ("guidance ended by a callback after 40 % of the blocks", args.guidance, 0.4)]  # fmt: skip
        for name, guidance, cutoff in guidance_runs:
            recorder_cfg = Recorder(pipe, device)
            with recorder_cfg.attached():
                seconds = timed_generate(pipe, args, device, guidance=guidance, cutoff=cutoff)
            llm = (sum(recorder_cfg.times["prefill"]) + sum(recorder_cfg.times["llm_step"])) / args.repeats
            head = sum(recorder_cfg.times["head"]) / args.repeats
            scaling.append([f"{name} (LM part {llm:.3f} s, head {head:.3f} s)", guidance, seconds, args.batch])
        print_table("scaling", ["vary", "value", "seconds", "images/s"],
                    [[name, value, f"{s:.3f}", f"{n / s:.3f}"] for name, value, s, n in scaling])  # fmt: skip
        results[0]["scaling"] = [{"vary": name, "value": value, "seconds": s, "images_per_s": n / s}
                                 for name, value, s, n in scaling]  # fmt: skip

    append_rows(results_path, results, device)
    if args.min_psnr is not None and psnr is not None and psnr < args.min_psnr:
        raise SystemExit(f"PSNR {psnr:.2f} dB against {args.compare_to} is below --min_psnr {args.min_psnr} dB")


if __name__ == "__main__":
    main()
