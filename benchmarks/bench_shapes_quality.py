"""Quality of the shipped shapes model, measured with the pixel detector of the synthetic set.

    python benchmarks/bench_shapes_quality.py [--model FOLDER] [--num_prompts 100] [--steps 25] [--scheduler flow-heun]
        [--quantize int8wo] [--output_dir bench-out]

Over held-out prompts (scenes of a seed never used in training): the fraction of images whose dominant object colour,
position (3x3 grid), background colour and shape (the outline that best overlaps the object) match the prompt; and
the tokenizer's reconstruction PSNR on held-out images, and the shape read on its reconstructions. ``--quantize``
quantizes the language model and the head in place first (`quantize_model_`: any scheme that runs on the CPU).
``--scheduler`` swaps the head's sampler for one of `bitdance_diffusers.schedulers.SAMPLERS` (the original's SDE
``binary-flow``, its ODE ``binary-flow-ode``, diffusers' ``flow-euler``, ``flow-heun``, ``flow-unipc``,
``flow-dpmsolver``): fewer-step samplers against the default, on the same prompts and seeds. The row is appended to
``OUTPUT_DIR/bench_shapes_quality.jsonl``.
"""

import argparse
import time

import torch
from bench_utils import add_output_argument, append_rows, rows_path

from bitdance_diffusers import BitDancePipeline, quantize_model_
from bitdance_diffusers.quantization import QUANTIZATION_SCHEMES
from bitdance_diffusers.schedulers import SAMPLERS, scheduler_for_sampler
from bitdance_diffusers.training import ShapesDataset, psnr
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from bitdance_diffusers.training.demo import HELD_OUT_SEED, score_held_out_prompts
from bitdance_diffusers.training.shapes_detector import detect_shape


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL_PATH))
    parser.add_argument("--num_prompts", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--scheduler", choices=list(SAMPLERS), default="binary-flow")
    parser.add_argument("--quantize", choices=QUANTIZATION_SCHEMES, default=None)
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "bench_shapes_quality")

    pipe = BitDancePipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.scheduler = scheduler_for_sampler(args.scheduler, pipe.scheduler.config)
    if args.quantize:
        quantize_model_(pipe.language_model, args.quantize)
        quantize_model_(pipe.diffusion_head, args.quantize)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.config.image_sizes[0][0]
    held_out = ShapesDataset(args.num_prompts, resolution=resolution, seed=HELD_OUT_SEED, max_objects=1)

    start = time.perf_counter()
    hits = score_held_out_prompts(pipe, args.num_prompts, args.batch_size, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance)  # fmt: skip
    seconds = time.perf_counter() - start

    with torch.no_grad():
        originals = torch.stack([held_out[i]["pixel_values"] for i in range(args.num_prompts)])
        reconstructions = torch.cat([pipe.vae.decode(pipe.vae.encode(chunk).codes).sample for chunk in originals.split(20)])
    tokenizer_psnr = float(psnr(reconstructions, originals).mean())
    reconstructed_shapes = sum(detect_shape(image).shape == held_out.scene(i).objects[0].shape
                               for i, image in enumerate(reconstructions))  # fmt: skip

    row = {name: count / args.num_prompts for name, count in hits.items()}
    row.update(tokenizer_psnr_db=tokenizer_psnr, tokenizer_shape=reconstructed_shapes / args.num_prompts,
               prompts=args.num_prompts, steps=args.steps, guidance=args.guidance,
               seconds_per_image=seconds / args.num_prompts, model=args.model, quantize=args.quantize,
               scheduler=args.scheduler)  # fmt: skip
    print(f"\nshapes quality over {args.num_prompts} held-out prompts ({args.scheduler}, {args.steps} steps, CFG "
          f"{args.guidance}{', language model and head ' + args.quantize if args.quantize else ''})")
    print("metric               value    target")
    print(f"colour correct       {row['color']:.2f}     >= 0.90")
    print(f"position correct     {row['position']:.2f}     >= 0.80")
    print(f"background correct   {row['background']:.2f}")
    print(f"shape correct        {row['shape']:.2f}")
    print(f"tokenizer PSNR (dB)  {tokenizer_psnr:.2f}")
    print(f"shape correct on tokenizer reconstructions {row['tokenizer_shape']:.2f}")
    print(f"seconds per image    {row['seconds_per_image']:.3f}")
    append_rows(results_path, [row], torch.device("cpu"))


if __name__ == "__main__":
    main()
