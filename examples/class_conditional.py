"""Class-conditional ImageNet generation with a converted BitDance-{B,L,H} checkpoint.

    python examples/class_conditional.py --model BitDance-B-4x-diffusers --class_labels "golden retriever" 980 \
        --steps 100 --guidance 3.9 --seed 0 --output samples.png

Class labels are ImageNet ids (0-999) or label names ("golden retriever", "volcano", ...). Several labels give one
image each, saved as samples_0.png, samples_1.png, ... Without --model the example builds a tiny randomly
initialised pipeline (noise-like output) so that it runs offline.
"""

import argparse

import torch
from diffusers import DiffusionPipeline

import bitdance_diffusers  # noqa: F401  (registers BitDanceImageNetPipeline with diffusers)
from bitdance_diffusers.cli import class_label
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="Folder written by conversion/convert_bitdance_imagenet.py (or a Hub id).")
parser.add_argument("--class_labels", nargs="+", type=class_label, default=[207], help="Class ids and/or label names.")
parser.add_argument("--steps", type=int, default=100, help="Head flow steps per block (the original uses 100).")
parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale (original: B-1x 3.2, B-4x 3.9, B-16x 6.1).")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default="class_conditional.png")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
if args.model:
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(device)
else:
    pipe = build_random_imagenet_pipeline(block_size=4).to(device)

images = pipe(
    args.class_labels,
    num_inference_steps=args.steps,
    guidance_scale=args.guidance,
    generator=torch.Generator(device).manual_seed(args.seed),  # the original draws on the GPU too
).images
outputs = [args.output] if len(images) == 1 else [args.output.replace(".png", f"_{i}.png") for i in range(len(images))]
for image, path in zip(images, outputs):
    image.save(path)
    print(f"saved {path}")
