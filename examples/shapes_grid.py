"""Draw a grid of prompts with the shipped shapes model (the picture in the README).

    python examples/shapes_grid.py --output docs/shapes_grid.png
"""

import argparse
import textwrap

import torch
from PIL import Image, ImageDraw

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH


PROMPTS = [
    "a large red circle in the center on a blue background",
    "a small yellow star at the top left on a black background",
    "a large green square at the bottom right on a white background",
    "a small white triangle at the top on a purple background",
    "a large orange circle on the left on a green background",
    "a small blue square on the right on a yellow background",
    "a large purple star at the bottom on an orange background",
    "a small black circle at the bottom left on a red background",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL_PATH))
    parser.add_argument("--output", default="docs/shapes_grid.png")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--columns", type=int, default=4)
    args = parser.parse_args()

    pipe = BitDancePipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]).images  # fmt: skip
    side, caption_height = images[0].width, 56
    rows = (len(images) + args.columns - 1) // args.columns
    grid = Image.new("RGB", (args.columns * side, rows * (side + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (prompt, image) in enumerate(zip(PROMPTS, images)):
        x, y = (index % args.columns) * side, (index // args.columns) * (side + caption_height)
        grid.paste(image, (x, y))
        draw.multiline_text((x + 3, y + side + 2), "\n".join(textwrap.wrap(prompt, 20)), fill="black", spacing=1)
    grid.save(args.output)
    print(f"wrote {args.output} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
