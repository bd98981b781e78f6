"""Generate images for a prompt file across processes (data-parallel), resumable: for evaluation sets.

    accelerate launch --num_processes 8 examples/generate_dataset.py --model BitDance-14B-64x-diffusers \
        --prompts geneval_metadata.jsonl --output_dir out/geneval --images_per_prompt 4 --height 1024 --width 1024

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N CPU processes.

Prompt files: ``.txt`` (one prompt per line), ``.json`` (a list of strings or of objects with a ``prompt`` field, or
an object mapping ids to prompts) or ``.jsonl`` (one string or object with ``prompt`` per line, as GenEval's
``evaluation_metadata.jsonl``; the other fields are kept). Prompt ``i`` goes to ``output_dir/{i:05d}/``: its images
``{k:04d}.png`` and ``metadata.jsonl`` (its record). Prompts are dealt round-robin to the processes; a prompt whose
images all exist is skipped, so an interrupted run resumes where it stopped. Image ``k`` of prompt ``i`` uses seed
``seed + i * images_per_prompt + k`` whatever the number of processes.
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import PartialState

import bitdance_diffusers  # noqa: F401  (registers the BitDance pipelines with diffusers)
from diffusers import DiffusionPipeline


def read_prompts(path: str) -> list[dict]:
    """Records with at least a ``prompt`` field, in file order."""
    text = Path(path).read_text(encoding="utf-8")
    suffix = Path(path).suffix
    if suffix == ".txt":
        items = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(text)
        items = [{"id": key, "prompt": value} for key, value in data.items()] if isinstance(data, dict) else data
    else:
        raise ValueError(f"Unknown prompt file type {suffix!r}: use .txt, .json or .jsonl.")
    records = [item if isinstance(item, dict) else {"prompt": item} for item in items]
    for index, record in enumerate(records):
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"Entry {index} of {path} has no 'prompt' text: {record!r}")
    return records


def generate(records: list[dict], todo: list[int], output_dir: Path, args, state: PartialState):
    """Generate and write the images of the prompts ``todo`` (indices into ``records``) on this process's device."""
    dtype = torch.bfloat16 if args.dtype == "bf16" and state.device.type == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    for i in todo:
        seeds = [args.seed + i * args.images_per_prompt + k for k in range(args.images_per_prompt)]
        images = pipe(records[i]["prompt"], height=args.height, width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, num_images_per_prompt=args.images_per_prompt,
                      generator=[torch.Generator(state.device).manual_seed(s) for s in seeds]).images  # fmt: skip
        folder = output_dir / f"{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps({**records[i], "seeds": seeds}) + "\n")
        for k, image in enumerate(images):
            temporary = folder / f"{k:04d}.png.tmp"
            image.save(temporary, format="PNG")
            temporary.replace(folder / f"{k:04d}.png")  # a finished file only: resuming never sees half an image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    args = parser.parse_args()

    state = PartialState(cpu=not torch.cuda.is_available())  # without GPUs: one CPU process per rank (gloo)
    records = read_prompts(args.prompts)
    output_dir = Path(args.output_dir)
    mine = [i for i in range(state.process_index, len(records), state.num_processes)]
    todo = [i for i in mine if not all((output_dir / f"{i:05d}" / f"{k:04d}.png").exists()
                                       for k in range(args.images_per_prompt))]  # fmt: skip
    print(f"process {state.process_index}/{state.num_processes}: {len(todo)} of {len(mine)} prompts to generate")
    if todo:
        generate(records, todo, output_dir, args, state)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
