"""LoRA fine-tuning teaches the shipped shapes model a new word, measured with the pixel detector of the shapes set.

    python benchmarks/bench_lora_concept.py [--word crimson --color red] [--rank 8] [--steps 300] \
        [--output_dir bench-out]

Training set: one-object scenes of the training seed whose object has ``--color``, captioned with ``--word`` in place
of the colour's name ("a small crimson star at the top on a blue background"), and as many ordinary scenes with their
own captions (prior preservation), encoded once by the model's tokenizer.
Only LoRA adapters of the language model and the head train (`train_text_to_image(..., lora_rank=...)`). Measured
before and after, on held-out scenes (a seed never trained on): the fraction of new-word prompts drawn in ``--color``,
and the four detector scores of ordinary prompts, to see what the adapter costs elsewhere. The row is appended to
``OUTPUT_DIR/bench_lora_concept.jsonl``; the adapter trains in a temporary folder.
"""

import argparse
import tempfile
import time

import torch
from bench_utils import add_output_argument, append_rows, rows_path

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from bitdance_diffusers.training import EncodedDataset, ShapesDataset, TrainingConfig, train_text_to_image
from bitdance_diffusers.training.demo import HELD_OUT_SEED, score_held_out_prompts
from bitdance_diffusers.training.shapes import COLORS
from bitdance_diffusers.training.shapes_detector import detect_shape


def renamed_color_scenes(color: str, word: str, size: int, seed: int, resolution: int) -> tuple[list, list]:
    """``size`` one-object scenes of ``seed`` whose object has ``color``: (images, captions with ``word`` for it)."""
    scenes = ShapesDataset(100 * size, resolution=resolution, seed=seed, max_objects=1)
    indices = [i for i in range(len(scenes)) if scenes.scene(i).objects[0].color == color][:size]
    captions = [scenes.scene(i).caption().replace(f" {color} ", f" {word} ", 1) for i in indices]
    return [scenes[i]["pixel_values"] for i in indices], captions


@torch.no_grad()
def color_hits(pipe, prompts: list[str], color: str, batch_size: int, **call_kwargs) -> int:
    """How many of ``prompts`` (generator seed = index) come out with an object of ``color``."""
    hits = 0
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        generators = [torch.Generator().manual_seed(first + i) for i in range(len(batch))]
        images = pipe(batch, output_type="pt", generator=generators, **call_kwargs).images
        hits += sum(detect_shape(image * 2 - 1).color == color for image in images)
    return hits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL_PATH))
    parser.add_argument("--color", choices=list(COLORS), default="red")
    parser.add_argument("--word", default="crimson", help="the new word for --color")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_train", type=int, default=400, help="training scenes of the new word")
    parser.add_argument("--num_regular", type=int, default=400, help="ordinary training scenes beside them")
    parser.add_argument("--num_prompts", type=int, default=50, help="held-out prompts of each kind")
    parser.add_argument("--inference_steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "bench_lora_concept")

    pipe = BitDancePipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance)
    resolution = pipe.config.image_sizes[0][0]
    held_out = renamed_color_scenes(args.color, args.word, args.num_prompts, HELD_OUT_SEED, resolution)[1]

    def measure():
        word = color_hits(pipe, held_out, args.color, 10, **call) / len(held_out)
        ordinary = score_held_out_prompts(pipe, args.num_prompts, **call)
        return {"new_word_color": word, **{k: v / args.num_prompts for k, v in ordinary.items()}}

    before = measure()
    images, captions = renamed_color_scenes(args.color, args.word, args.num_train, 0, resolution)
    # Ordinary scenes beside the new word's (prior preservation) keep the adapter from drawing everything that way.
    ordinary = ShapesDataset(args.num_regular, resolution=resolution, seed=1, max_objects=1)
    images += [item["pixel_values"] for item in ordinary]
    captions += [ordinary.scene(i).caption() for i in range(len(ordinary))]
    with torch.no_grad():
        codes = torch.cat([pipe.vae.encode(batch).codes for batch in torch.stack(images).split(64)])
    dataset = EncodedDataset(codes.to(torch.int8), captions)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        batch_size = min(args.batch_size, len(dataset))  # a batch holds distinct scenes
        config = TrainingConfig(output_dir=output_dir, max_train_steps=args.steps, train_batch_size=batch_size,
                                learning_rate=args.learning_rate, lr_warmup_steps=20, adam_epsilon=1e-8,
                                checkpointing_steps=args.steps)  # fmt: skip
        losses = train_text_to_image(pipe, dataset, config, lora_rank=args.rank)
    training_seconds = time.perf_counter() - started
    after = measure()

    first, last = losses[:20], losses[-20:]
    print(f"LoRA rank {args.rank}, {args.steps} steps x {batch_size} ({args.num_train} scenes of '{args.word}' = "
          f"{args.color}, {args.num_regular} ordinary), {training_seconds:.0f} s; mean loss of the first and last "
          f"20 steps {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f}")
    print(f"{'held-out score':<32}{'before':>8}{'after':>8}")
    for key in before:
        label = f"'{args.word}' drawn {args.color}" if key == "new_word_color" else f"ordinary prompts: {key}"
        print(f"{label:<32}{before[key]:>8.2f}{after[key]:>8.2f}")
    row = {"benchmark": "lora_concept", "word": args.word, "color": args.color, "rank": args.rank,
           "num_train": args.num_train, "num_regular": args.num_regular, "steps": args.steps,
           "batch_size": batch_size, "training_seconds": training_seconds, "before": before, "after": after}
    append_rows(results_path, [row], torch.device("cpu"))


if __name__ == "__main__":
    main()
