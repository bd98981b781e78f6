"""Quantization while loading: weight memory, peak memory, speed and fidelity of each scheme, on random weights.

    python benchmarks/bench_quantization.py --config small --device cuda --dtype bf16 --schemes int8wo,fp8wo,fp8,nf4,int8
    python benchmarks/bench_quantization.py --config tiny --schemes int8wo          # CPU

Saves a random pipeline of the named config, loads it unquantized and then once per scheme with
`pipeline_quantization_config(scheme)` (language model and diffusion head quantized by diffusers' and transformers'
loaders), generates the same prompt and seed with each, and prints one row per load: the bytes of the language model's
and head's weights as stored, the peak GPU memory of a generation, seconds per image, and the fidelity to the unquantized
run (fraction of identical tokens; PSNR of the images the unquantized decoder makes from each run's tokens). On CPU
diffusers' loader accepts the torchao schemes only (bitsandbytes needs CUDA there).
"""

import argparse
import tempfile
import time

import torch
from bench_utils import (
    DTYPES,
    T2I_CONFIGS,
    add_output_argument,
    add_t2i_run_arguments,
    append_rows,
    peak_memory_gb,
    print_table,
    rows_path,
    synchronize,
)

from bitdance_diffusers import BitDancePipeline, pipeline_quantization_config
from bitdance_diffusers.quantization import QUANTIZATION_SCHEMES
from bitdance_diffusers.random_pipeline import build_random_pipeline
from bitdance_diffusers.training import psnr


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) weight occupies: the inner tensors of a torchao tensor subclass, the packed data
    and block scales of a bitsandbytes parameter."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    size = tensor.numel() * tensor.element_size()
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax (itself quantized when nested)
    if quant_state is not None:
        size += stored_bytes(quant_state.absmax)
        if quant_state.state2 is not None:
            size += stored_bytes(quant_state.state2.absmax)
    scales = getattr(tensor, "SCB", None)  # bitsandbytes int8: one scale per row
    if scales is not None:
        size += stored_bytes(scales)
    return size


def weight_gib(pipe) -> float:
    modules = (pipe.language_model, pipe.diffusion_head)
    return sum(stored_bytes(p) for module in modules for p in module.parameters()) / 2**30


def generate(pipe, args, device):
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    codes = pipe(
        ["a red fox in the snow"] * args.batch,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device).manual_seed(0),
        output_type="latent",
    ).images
    synchronize(device)
    return codes, (time.perf_counter() - start) / args.batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--schemes", default="int8wo", help=f"comma-separated, of {', '.join(QUANTIZATION_SCHEMES)}")
    add_t2i_run_arguments(parser)
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "bench_quantization")
    schemes = args.schemes.split(",")
    unknown = sorted(set(schemes) - set(QUANTIZATION_SCHEMES))
    if unknown:
        parser.error(f"unknown schemes {unknown}; choose from {', '.join(QUANTIZATION_SCHEMES)}")

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model, block_size = T2I_CONFIGS[args.config]
    rows, table = [], []
    with tempfile.TemporaryDirectory() as folder:
        build_random_pipeline(model, block_size=block_size, image_sizes=[[args.height, args.width]]).save_pretrained(folder)
        reference_codes = reference_images = None
        for scheme in ["none", *schemes]:
            config = None if scheme == "none" else pipeline_quantization_config(scheme, compute_dtype=dtype)
            pipe = BitDancePipeline.from_pretrained(folder, dtype=dtype, quantization_config=config).to(device)
            pipe.set_progress_bar_config(disable=True)
            generate(pipe, args, device)  # warm-up
            codes, seconds = generate(pipe, args, device)
            peak = peak_memory_gb(device) if device.type == "cuda" else None  # CPU: only the process's lifetime RSS
            if reference_codes is None:
                decoder = pipe.vae
                reference_codes = codes
            with torch.no_grad():
                images = decoder.decode(codes.to(decoder.dtype)).sample.float().clamp(-1, 1)
            if reference_images is None:
                reference_images = images
            agreement = (codes == reference_codes).float().mean().item()
            fidelity = psnr(images, reference_images).min().item() if scheme != "none" else float("inf")
            row = dict(scheme=scheme, config=args.config, dtype=args.dtype, height=args.height, width=args.width,
                       steps=args.steps, batch=args.batch, weights_gib=weight_gib(pipe), peak_gib=peak,
                       seconds_per_image=seconds, token_agreement=agreement, psnr_db=fidelity)  # fmt: skip
            rows.append(row)
            table.append([scheme, f"{row['weights_gib']:.3f}", "-" if peak is None else f"{peak:.2f}", f"{seconds:.3f}", f"{agreement:.4f}",
                          "-" if scheme == "none" else f"{fidelity:.1f}"])  # fmt: skip
            del pipe

    print_table(
        f"{args.config} P={block_size} {args.height}x{args.width} steps={args.steps} cfg={args.guidance} "
        f"batch={args.batch} {args.dtype} on {device.type}: quantized while loading (language model + head)",
        ["scheme", "weights GiB", "peak GiB", "s/image", "tokens equal", "PSNR dB (worst image)"],
        table,
    )
    append_rows(results_path, rows, device)


if __name__ == "__main__":
    main()
