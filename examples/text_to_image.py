"""Text-to-image with a converted BitDance checkpoint.

    python examples/text_to_image.py --model BitDance-14B-64x-diffusers --prompt "a red fox in the snow" \
        --height 1024 --width 1024 --steps 50 --guidance 7.5 --seed 42 --output fox.png

Without --model the example builds a tiny randomly initialised pipeline (noise-like output) so that it runs offline.
"""

import argparse

import torch
from diffusers import DiffusionPipeline

import bitdance_diffusers  # noqa: F401  (registers BitDancePipeline with diffusers)
from bitdance_diffusers.random_pipeline import build_random_pipeline


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="Folder written by conversion/convert_bitdance_t2i.py (or a Hub id).")
parser.add_argument("--prompt", default="a red fox in the snow")
parser.add_argument("--height", type=int, default=None)
parser.add_argument("--width", type=int, default=None)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--guidance", type=float, default=7.5)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output", default="text_to_image.png")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
if args.model:
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(device)
else:
    pipe = build_random_pipeline("tiny").to(device)
    args.height, args.width = args.height or 256, args.width or 256

image = pipe(
    args.prompt,
    height=args.height,
    width=args.width,
    num_inference_steps=args.steps,
    guidance_scale=args.guidance,
    generator=torch.Generator(device).manual_seed(args.seed),  # the original draws on the GPU too
).images[0]
image.save(args.output)
print(f"saved {args.output}")
