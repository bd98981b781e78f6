"""Generate images for a prompt file across processes (data-parallel), resumable: for evaluation sets.

    accelerate launch --num_processes 8 examples/generate_dataset.py --model BitDance-14B-64x-diffusers \\
        --prompts geneval_metadata.jsonl --output_dir out/geneval --images_per_prompt 4 --height 1024 --width 1024

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N CPU processes.

Prompt files: ``.txt`` (one prompt per line), ``.json`` (a list of strings or of objects with a ``prompt`` field, or
an object mapping ids to prompts) or ``.jsonl`` (one string or object with ``prompt`` per line, as GenEval's
``evaluation_metadata.jsonl``; the other fields are kept). Prompt ``i`` goes to ``output_dir/{i:05d}/``: its images
``{k:04d}.png``, ``metadata.jsonl`` (its record and seeds, GenEval's layout) and ``manifest.json``. Image ``k`` of
prompt ``i`` uses seed ``seed + i * images_per_prompt + k`` whatever the number of processes; prompts are dealt
round-robin to the processes.

Resuming. ``manifest.json`` records what a folder's images are: the prompt record, the generation settings (model,
size, steps, guidance, dtype, device type) and each image's file and seed. It is written atomically (as every image),
first without images, then complete, so it never lists an image that is not the one it describes. A run skips the
prompts whose manifest matches the request, and generates those without a folder or whose folder an interrupted run
left incomplete (same request). Folders that do not match (the prompt file or a setting changed, a folder without a
manifest, prompt folders beyond the prompt file) are refused before anything is generated: a dataset may be days of
work, and a changed setting is as likely a slip as a decision. ``--overwrite`` makes it one: those folders are then
regenerated (or, beyond the prompt file, removed); files this script does not write are never touched.
"""

import argparse
import json
import re
from pathlib import Path

from bitdance_diffusers.cli.arguments import CommandLineParser, UsageError, finite_float, positive_int, seed
from bitdance_diffusers.cli.files import atomic_write, remove_stale_partials
from bitdance_diffusers.cli.model_source import model_folder, resolve_model


MANIFEST = "manifest.json"
METADATA = "metadata.jsonl"
IMAGE_NAME = re.compile(r"\d{4}\.png")
PROMPT_FOLDER = re.compile(r"\d{5}")


def read_prompts(path: str) -> list[dict]:
    """Records with at least a ``prompt`` field, in file order."""
    suffix = Path(path).suffix
    if suffix not in (".txt", ".json", ".jsonl"):
        raise UsageError(f"Unknown prompt file type {suffix!r}: use .txt, .json or .jsonl.")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"Cannot read the prompt file {path} ({error}).") from None
    try:
        if suffix == ".txt":
            items = [line.strip() for line in text.splitlines() if line.strip()]
        elif suffix == ".jsonl":
            items = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise UsageError(f"Line {number} of {path} is not JSON ({error}).") from None
        else:
            data = json.loads(text)
            items = [{"id": key, "prompt": value} for key, value in data.items()] if isinstance(data, dict) else data
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not JSON ({error}).") from None
    if not isinstance(items, list):
        raise UsageError(f"{path} holds neither a list of prompts nor an object mapping ids to prompts.")
    records = [item if isinstance(item, dict) else {"prompt": item} for item in items]
    for index, record in enumerate(records):
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UsageError(f"Entry {index} of {path} has no 'prompt' text: {record!r}")
    if not records:
        raise UsageError(f"{path} holds no prompts.")
    return records


def expected_manifest(index: int, record: dict, settings: dict, args) -> dict:
    """The manifest of prompt ``index`` once its images are written."""
    seeds = [args.seed + index * args.images_per_prompt + k for k in range(args.images_per_prompt)]
    images = [{"file": f"{k:04d}.png", "seed": s} for k, s in enumerate(seeds)]
    return {"record": record, "settings": settings, "images": images}


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_ours(name: str) -> bool:
    """Whether a file name is one this script writes in a prompt folder."""
    return name in (MANIFEST, METADATA) or IMAGE_NAME.fullmatch(name) is not None


def folder_state(folder: Path, expected: dict | None) -> tuple[str, str]:
    """``("done" | "todo" | "mismatch", reason)`` of a prompt folder for the ``expected`` manifest (``None``: the
    prompt file has no such prompt). Files this script does not write are ignored."""
    if not (folder.is_dir() and any(is_ours(path.name) for path in folder.iterdir())):
        return ("todo", "") if expected is not None else ("done", "")
    manifest = read_manifest(folder)
    if manifest is None:
        return "mismatch", "no readable manifest.json (written by something else, or by an older version)"
    listed = manifest.get("images")
    if not listed:  # an interrupted run's folder: no finished image, nothing to keep
        return ("todo", "") if expected is not None else ("mismatch", "the prompt file has no such prompt")
    if expected is None:
        return "mismatch", "the prompt file has no such prompt"
    record, old_settings = manifest.get("record"), manifest.get("settings")
    if record != expected["record"]:
        return "mismatch", f"prompt changed (was {record.get('prompt') if isinstance(record, dict) else record!r})"
    if not isinstance(old_settings, dict):
        old_settings = {}
    changed = sorted(key for key in expected["settings"] if old_settings.get(key) != expected["settings"][key])
    if changed:
        details = ", ".join(f"{key} {old_settings.get(key)!r} -> {expected['settings'][key]!r}" for key in changed)
        return "mismatch", f"settings changed ({details})"
    if listed != expected["images"]:
        return "mismatch", "images or seeds changed (--seed or --images_per_prompt)"
    if all((folder / image["file"]).is_file() for image in listed):
        return "done", ""
    return "todo", "left incomplete by an interrupted run"


def plan(records: list[dict], settings: dict, output_dir: Path, args) -> tuple[list[int], dict[str, str]]:
    """The prompts to generate, and the folders that do not match the request (name -> reason)."""
    todo, mismatched = [], {}
    for index, record in enumerate(records):
        state, reason = folder_state(output_dir / f"{index:05d}", expected_manifest(index, record, settings, args))
        if state == "todo":
            todo.append(index)
        elif state == "mismatch":
            todo.append(index)
            mismatched[f"{index:05d}"] = reason
    if output_dir.is_dir():
        for folder in sorted(output_dir.iterdir()):
            if PROMPT_FOLDER.fullmatch(folder.name) and int(folder.name) >= len(records):
                state, reason = folder_state(folder, None)
                if state == "mismatch":
                    mismatched[folder.name] = reason
    return todo, mismatched


def clear_folder(folder: Path, keep: set[str] = frozenset()) -> None:
    """Remove the files this script wrote in ``folder`` (and temporary files of killed runs), except ``keep``."""
    remove_stale_partials(folder)
    for path in folder.iterdir():
        if is_ours(path.name) and path.name not in keep:
            path.unlink()


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")))


def generate(records: list[dict], todo: list[int], output_dir: Path, model: Path, settings: dict, args, state):
    """Generate and write the images of the prompts ``todo`` (indices into ``records``) with the pipeline in the
    folder ``model``, on this process's device."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, dtype=getattr(torch, settings["dtype"])).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    for index in todo:
        manifest = expected_manifest(index, records[index], settings, args)
        seeds = [image["seed"] for image in manifest["images"]]
        images = pipe(records[index]["prompt"], height=settings["height"], width=settings["width"],
                      num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                      num_images_per_prompt=args.images_per_prompt,
                      generator=[torch.Generator(state.device).manual_seed(s) for s in seeds]).images  # fmt: skip
        folder = output_dir / f"{index:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        # Invalidate first: until the final manifest below, the folder claims no image.
        write_json(folder / MANIFEST, {**manifest, "images": []})
        clear_folder(folder, keep={MANIFEST})
        for image, entry in zip(images, manifest["images"], strict=True):
            atomic_write(folder / entry["file"], lambda file, image=image: image.save(file, format="PNG"))
        write_json(folder / METADATA, {**records[index], "seeds": seeds})
        write_json(folder / MANIFEST, manifest)


def image_size(args, source) -> tuple[int, int]:
    """``--height`` x ``--width``, the pipeline's default size for what is left out; one the model supports."""
    sizes = source.image_sizes or []
    height, width = args.height, args.width
    if height is None and width is None:
        height, width = [1024, 1024] if [1024, 1024] in sizes or not sizes else sizes[0]
    height, width = height or width, width or height
    if sizes and [height, width] not in sizes:
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise UsageError(f"Size {height}x{width} (height x width) is not supported by this model; choose one of: "
                         f"{listed}.")  # fmt: skip
    return height, width


def generation_settings(args, size: tuple[int, int], device_type: str) -> dict:
    """What an image depends on besides its prompt and seed; recorded in every manifest."""
    dtype = "bfloat16" if args.dtype == "bf16" and device_type == "cuda" else "float32"
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    return {"model": model, "height": size[0], "width": size[1], "steps": args.steps, "guidance": args.guidance,
            "dtype": dtype, "device_type": device_type}  # fmt: skip


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="BitDance text-to-image pipeline folder or Hub id.")
    parser.add_argument("--prompts", required=True, help="Prompt file (.txt, .json or .jsonl).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--images_per_prompt", type=positive_int, default=4)
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--steps", type=positive_int, default=50)
    parser.add_argument("--guidance", type=finite_float, default=7.5)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="bf16 applies on GPUs only.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Regenerate the folders that do not match this run, and remove prompt folders beyond the "
                             "prompt file (see 'Resuming' above).")  # fmt: skip
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    try:
        records = read_prompts(args.prompts)
        output_dir = Path(args.output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise UsageError(f"--output_dir {output_dir} is a file; choose a folder.")
        source = resolve_model(args.model)
        if source.class_conditional:
            raise UsageError(f"--model {args.model} is a class-conditional ImageNet pipeline; this script draws "
                             "prompts.")  # fmt: skip
        size = image_size(args, source)
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # without GPUs: one CPU process per rank (gloo)
        settings = generation_settings(args, size, state.device.type)
        todo, mismatched = plan(records, settings, output_dir, args)
        if mismatched and not args.overwrite:
            shown = "; ".join(f"{name}: {reason}" for name, reason in list(mismatched.items())[:5])
            more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
            raise UsageError(
                f"{len(mismatched)} folders of {output_dir} do not match this run and were left alone: {shown}{more}. "
                "Pass --overwrite to regenerate them (and remove prompt folders beyond the prompt file), or choose "
                "another --output_dir."
            )
        with state.main_process_first():  # the main process downloads a Hub model; the others then read the cache
            model = model_folder(source)
        state.wait_for_everyone()  # every process has planned before any writes
        output_dir.mkdir(parents=True, exist_ok=True)
        if state.is_main_process:
            for name in mismatched:
                if int(name) >= len(records):
                    clear_folder(output_dir / name)
                    if not any((output_dir / name).iterdir()):
                        (output_dir / name).rmdir()
    except (UsageError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    mine = range(state.process_index, len(records), state.num_processes)
    mine_todo = [index for index in todo if index % state.num_processes == state.process_index]
    print(f"process {state.process_index}/{state.num_processes}: {len(mine_todo)} of {len(mine)} prompts to generate",
          flush=True)  # fmt: skip
    for index in mine:
        if (output_dir / f"{index:05d}").is_dir():
            remove_stale_partials(output_dir / f"{index:05d}")
    if mine_todo:
        generate(records, mine_todo, output_dir, model, settings, args, state)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
