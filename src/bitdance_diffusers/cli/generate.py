"""`bitdance generate`: check what the user asked for, load the pipeline, draw, and write one file per image.

Every check that needs no model runs first (output paths, ``--model``, ``--lora``, sizes, the device), so a mistake is
reported in seconds, never after a long load or generation.
"""

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..quantization import BITSANDBYTES_SCHEMES, CUDA_ONLY_SCHEMES
from .arguments import UsageError
from .files import plan_outputs, remove_stale_partials, save_image
from .library_output import library_output
from .model_source import TEXT_TO_IMAGE, ModelSource, is_hub_id, model_folder, resolve_model


if TYPE_CHECKING:
    import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(name: str) -> str:
    """``--device``: ``"auto"`` is the GPU when CUDA has one, else the CPU; a named device must exist here."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise UsageError(f"--device {name}: torch has one CPU device; use --device cpu.")
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {name}: {reason}; use --device cpu (or leave --device out).")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
        return name
    backend = {"mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}.get(device.type)
    if backend is None:
        raise UsageError(f"--device {name}: BitDance runs on cpu or cuda (or mps, xpu where torch has them).")
    if not backend.is_available():
        raise UsageError(f"--device {name}: torch reports no {device.type} device here; use --device cpu.")
    return name


def resolve_dtype(name: str, device: str) -> "torch.dtype":
    """``--dtype``: ``"auto"`` is bf16 on a GPU and fp32 elsewhere (the original's choices)."""
    import torch

    if name == "auto":
        name = "bf16" if device.startswith("cuda") else "fp32"
    return getattr(torch, DTYPES[name])


def check_quantization_library(scheme: str | None) -> None:
    if scheme is None:
        return
    library = "bitsandbytes" if scheme in BITSANDBYTES_SCHEMES else "torchao"
    if importlib.util.find_spec(library) is None:
        raise UsageError(
            f"--quantize {scheme} needs {library}: pip install -e '.[quantization]' (or pip install {library})."
        )


def check_loras(paths: list[str], scales: list[float] | None) -> None:
    """Each ``--lora`` must be a LoRA folder or ``.safetensors`` file here, or a Hub id (in the cache when offline)."""
    if scales is not None and len(scales) != len(paths):
        raise UsageError(f"Got {len(scales)} --lora_scale values for {len(paths)} --lora files; give one per file.")
    if paths and importlib.util.find_spec("peft") is None:
        raise UsageError("--lora needs the peft library: pip install -e '.[lora]' (or pip install peft).")
    for path in paths:
        if os.path.isdir(path):
            if not any(Path(path).glob("*.safetensors")):
                raise UsageError(
                    f"--lora {path} holds no .safetensors file; pass the folder that save_lora_weights wrote "
                    "(it holds pytorch_lora_weights.safetensors)."
                )
        elif os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise UsageError(f"--lora {path} is not a .safetensors file; pass the LoRA weights or their folder.")
        elif not is_hub_id(path):
            raise UsageError(f"--lora {path}: no such file or folder.")
        else:
            from huggingface_hub import constants, snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError

            if constants.HF_HUB_OFFLINE:
                try:
                    snapshot_download(path, local_files_only=True)
                except LocalEntryNotFoundError:
                    raise UsageError(
                        f"--lora {path} is neither a file nor a folder here, nor a Hub repository in the Hugging Face "
                        "cache (HF_HUB_OFFLINE=1); pass the LoRA folder, or download it first."
                    ) from None


def check_request(args, source: ModelSource) -> tuple[int | None, int | None]:
    """Refuse inputs that do not fit the model (prompt vs class labels, sizes it does not list); returns the size."""
    if source.class_conditional:
        if args.prompt is not None:
            raise UsageError(f"{args.model} is a class-conditional ImageNet model: pass --class_labels, not --prompt.")
        extra = [option for option, value in (("--negative_prompt", args.negative_prompt), ("--height", args.height),
                                              ("--width", args.width)) if value is not None]  # fmt: skip
        if extra:
            raise UsageError(
                f"{' and '.join(extra)} do not apply to a class-conditional ImageNet model (it draws at its own size "
                "from labels); drop them."
            )
        return None, None
    if args.class_labels is not None:
        if args.model is None:
            raise UsageError("--class_labels needs --model with a converted ImageNet checkpoint (see README).")
        raise UsageError(f"{args.model} is a text-to-image model: pass --prompt, not --class_labels.")
    if args.height is None and args.width is None:
        return None, None
    height, width = args.height or args.width, args.width or args.height
    if source.image_sizes is not None and [height, width] not in source.image_sizes:
        sizes = ", ".join(f"{h}x{w}" for h, w in source.image_sizes)
        raise UsageError(
            f"Size {height}x{width} (height x width) is not supported by this model; choose one of: {sizes} "
            "(--height H --width W)."
        )
    return height, width


def check_switches(device: str, quantize: str | None = None, offload: str | None = None, cuda_graphs: bool = False):
    """Refuse switches that do not fit the device or each other."""
    on_cuda = str(device).startswith("cuda")
    if quantize in CUDA_ONLY_SCHEMES and not on_cuda:
        raise UsageError(
            f"--quantize {quantize} needs a CUDA GPU (--device {device} given); on a CPU use int8wo or fp8wo."
        )
    if offload is not None and not on_cuda:
        raise UsageError(
            f"--offload {offload} moves weights between host memory and a CUDA GPU (--device {device} given); on a "
            "CPU every weight already lives in host memory, so drop --offload."
        )
    if cuda_graphs and not on_cuda:
        raise UsageError(f"--cuda_graphs needs a CUDA GPU (--device {device} given); drop it on a CPU.")
    if cuda_graphs and offload == "sequential":
        raise UsageError(
            "--cuda_graphs cannot replay a language model whose layers are moved to the GPU inside every forward "
            "(--offload sequential); use --offload model with --cuda_graphs, or drop one of them."
        )


def load_pipeline(
    model: str | None,
    dtype: "torch.dtype",
    device: str,
    quantize: str | None = None,
    offload: str | None = None,
    cuda_graphs: bool = False,
    loras: list[str] = (),
    lora_scales: list[float] | None = None,
):
    """The pipeline at ``model`` (folder or Hub id), its heavy components quantized with the ``quantize`` scheme if
    one is given, with the LoRA adapters ``loras`` active at ``lora_scales`` (default 1 each), placed on ``device``
    (or offloaded to it with ``offload`` = ``"model"`` or ``"sequential"``), with CUDA graph replay if
    ``cuda_graphs``. Without a model: the shapes model shipped with the package when it is there, else a tiny randomly
    initialised pipeline built in memory.

    Raises:
        UsageError: switches that do not fit the device or each other, and files that do not load (the message names
            the file and the fix).
    """
    check_switches(device, quantize, offload, cuda_graphs)
    check_loras(loras, lora_scales)
    source = resolve_model(model)
    folder = model_folder(source)
    if folder is None:
        if quantize is not None:
            raise UsageError("--quantize applies to a saved pipeline; pass --model with a converted checkpoint folder.")
        from ..random_pipeline import build_random_pipeline

        pipe = build_random_pipeline("tiny", block_size=16, image_sizes=source.image_sizes, dtype=dtype)
    else:
        from diffusers import DiffusionPipeline
        from safetensors import SafetensorError

        from ..quantization import pipeline_quantization_config

        quantization_config = None
        if quantize is not None:
            # The heavy components: the backbone (language model, or the ImageNet transformer) and the head.
            backbone = "language_model" if source.class_name == TEXT_TO_IMAGE else "transformer"
            quantization_config = pipeline_quantization_config(
                quantize, components=(backbone, "diffusion_head"), compute_dtype=dtype
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, quantization_config=quantization_config)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError, SafetensorError) as error:
            raise UsageError(f"Cannot load the pipeline in {folder}: {error} Re-convert or re-download it.") from error
    if loras:
        adapter_names = [f"lora_{index}" for index in range(len(loras))]
        for path, adapter_name in zip(loras, adapter_names, strict=True):
            try:
                pipe.load_lora_weights(path, adapter_name=adapter_name)
            except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as error:
                raise UsageError(f"Cannot apply --lora {path}: {error}") from error
        pipe.set_adapters(adapter_names, lora_scales or [1.0] * len(loras))
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if cuda_graphs:
        pipe.enable_cuda_graphs()
    return pipe


def run_generate(args, verbosity: str = "normal") -> list[Path]:
    """Run `bitdance generate` with the parsed ``args``; returns the paths written (one per image).

    ``verbosity``: ``"quiet"`` (no notes, no progress bar, bare paths on stdout), ``"normal"`` or ``"verbose"`` (see
    `library_output`).
    """
    if (args.prompt is None) == (args.class_labels is None):
        raise UsageError(
            "Pass --prompt for a text-to-image model or --class_labels for a class-conditional ImageNet model."
        )
    num_images = args.num_images * (len(args.class_labels) if args.class_labels is not None else 1)
    paths, format_name = plan_outputs(Path(args.output), num_images, args.overwrite)
    check_loras(args.lora, args.lora_scale)
    check_quantization_library(args.quantize)
    source = resolve_model(args.model)
    height, width = check_request(args, source)
    with library_output(verbosity):
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        check_switches(device, args.quantize, args.offload, args.cuda_graphs)
        if verbosity != "quiet":
            announce_default_model(source)
        folder = model_folder(source)
        model = None if folder is None or source.shipped else str(folder)
        pipe = load_pipeline(model, dtype, device, args.quantize, args.offload, args.cuda_graphs, args.lora,
                             args.lora_scale)  # fmt: skip
        images = draw(pipe, args, source, height, width, verbosity)
    for output_folder in {path.parent for path in paths}:
        remove_stale_partials(output_folder)
    for image, path in zip(images, paths, strict=True):
        try:
            save_image(image, path, format_name, overwrite=args.overwrite)
        except FileExistsError:
            raise UsageError(f"{path} was created by something else while generating; it was left alone.") from None
        except OSError as error:  # e.g. the disk filled up during the run; nothing partial is left behind
            raise UsageError(
                f"Cannot write {path} ({error.strerror or error}); free space or choose another --output."
            ) from error
        print(path if verbosity == "quiet" else f"wrote {path} ({image.width}x{image.height})", flush=True)
    return paths


def draw(pipe, args, source: ModelSource, height: int | None, width: int | None, verbosity: str) -> list:
    """The PIL images of the request, with one progress bar over the token blocks of the whole batch."""
    import torch

    from ..schedulers import scheduler_for_sampler

    if args.sampler is not None:
        pipe.scheduler = scheduler_for_sampler(args.sampler, pipe.scheduler.config)
    num_images = args.num_images * (len(args.class_labels) if source.class_conditional else 1)
    label = "token blocks" if num_images == 1 else f"token blocks of {num_images} images"
    pipe.set_progress_bar_config(desc=label, unit="block", disable=verbosity == "quiet")
    # Drawn on the device that samples, as the original draws from the CUDA generator: the same seed then gives the
    # original's noise on a GPU, and no per-step noise crosses from host to device.
    generator = torch.Generator(pipe._execution_device).manual_seed(args.seed)
    # Options left unset keep the pipeline's own defaults (text-to-image: 50 steps, CFG 7.5; ImageNet: 100 steps).
    options = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    if source.class_conditional:
        inputs = args.class_labels
        options.update(num_images_per_label=args.num_images)
    else:
        inputs = args.prompt
        options.update(negative_prompt=args.negative_prompt, height=height, width=width,
                       num_images_per_prompt=args.num_images)  # fmt: skip
    options = {name: value for name, value in options.items() if value is not None}
    try:
        return pipe(inputs, generator=generator, **options).images
    except torch.OutOfMemoryError:
        raise UsageError(
            f"Out of memory on {pipe._execution_device} for {num_images} image(s); generate fewer at a time "
            "(--num_images), or lower the memory with --offload model or --quantize (see README)."
        ) from None
    except (ValueError, TypeError) as error:  # inputs the pipeline refuses (unknown label names, ...)
        raise UsageError(str(error)) from error


def announce_default_model(source: ModelSource) -> None:
    """Say which model runs when the user named none."""
    if source.shipped:
        notice(
            "No --model given: using the small shapes model shipped with the package (trained on synthetic coloured "
            'shapes; try prompts like "a large red circle at the top left on a blue background").'
        )
    elif source.folder is None and source.repo_id is None:
        notice(
            "No --model given: running the complete text-to-image path on a tiny randomly initialised BitDance built "
            "in memory (the picture will be noise-like). Pass --model with a converted checkpoint for real images."
        )


def notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
