"""Write the synthetic shapes set as an imagefolder (PNG images and a metadata.jsonl), for the training examples.

    python examples/make_shapes_dataset.py --output_dir data/shapes --num_images 12000

Sample ``i`` of ``--seed`` is the same picture and caption as ``ShapesDataset(...)[i]``; the defaults are the training
set of the shapes model shipped in the package (one object per scene, 128x128, seed 0). The folder is written under a
temporary name and renamed when complete.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from bitdance_diffusers.training.shapes import ShapesDataset, render_scene


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=int, default=12_000)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--max_objects", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists():
        parser.exit(2, f"{parser.prog}: error: {output_dir} already exists; choose another --output_dir.\n")
    if args.num_images < 1:
        parser.exit(2, f"{parser.prog}: error: --num_images must be positive, got {args.num_images}.\n")

    staging = output_dir.parent / f".{output_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dataset = ShapesDataset(args.num_images, resolution=args.resolution, seed=args.seed, max_objects=args.max_objects)
    lines = []
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        render_scene(scene, args.resolution).save(staging / f"{index:06d}.png")
        lines.append(json.dumps({"file_name": f"{index:06d}.png", "text": scene.caption()}))
    (staging / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    staging.rename(output_dir)
    print(f"{len(dataset)} images in {output_dir}")


if __name__ == "__main__":
    sys.exit(main())
