"""The ``bitdance`` command: generate images and convert original checkpoints.

    bitdance generate --prompt "a red fox in the snow" --output fox.png [--model FOLDER] [--cuda_graphs]
        [--offload {model,sequential}] [--quantize SCHEME] [--sampler flow-unipc --steps 10] [--lora DIR]
    bitdance generate --model BitDance-B-4x-diffusers --class_labels "golden retriever" 980 --output dogs.png
    bitdance convert t2i --checkpoint_path BitDance-14B-64x --dump_path BitDance-14B-64x-diffusers
    bitdance convert imagenet --checkpoint_path BitDance_B_4x.pt --dump_path BitDance-B-4x-diffusers \
        --vae_checkpoint_path ae_d16c32.pt
"""

import argparse
import logging
import sys

import torch

from .demo import add_demo_arguments, run_demo
from .pipelines import BitDanceImageNetPipeline
from .quantization import CUDA_ONLY_SCHEMES, QUANTIZATION_SCHEMES, pipeline_quantization_config
from .schedulers import SAMPLERS, scheduler_for_sampler


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pipeline(
    model: str | None,
    dtype: torch.dtype,
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
    initialised pipeline built in memory."""
    from diffusers import DiffusionPipeline

    from .pretrained import DEMO_MODEL_PATH

    on_cuda = str(device).startswith("cuda")
    if quantize in CUDA_ONLY_SCHEMES and not on_cuda:
        raise ValueError(
            f"--quantize {quantize} needs a CUDA GPU (--device {device} given); on a CPU use int8wo or fp8wo."
        )
    if offload is not None and not on_cuda:
        raise ValueError(
            f"--offload {offload} moves weights between host memory and a CUDA GPU (--device {device} given); on a "
            "CPU every weight already lives in host memory, so drop --offload."
        )
    if cuda_graphs and not on_cuda:
        raise ValueError(f"--cuda_graphs needs a CUDA GPU (--device {device} given); drop it on a CPU.")
    if lora_scales is not None and len(lora_scales) != len(loras):
        raise ValueError(
            f"Got {len(lora_scales)} --lora_scale values for {len(loras)} --lora files; give one per file."
        )
    if cuda_graphs and offload == "sequential":
        raise ValueError(
            "--cuda_graphs cannot replay a language model whose layers are moved to the GPU inside every forward "
            "(--offload sequential); use --offload model with --cuda_graphs, or drop one of them."
        )
    if model is None and (DEMO_MODEL_PATH / "model_index.json").is_file():
        print(
            "No --model given: using the small shapes model shipped with the package (trained on synthetic coloured "
            'shapes; try prompts like "a large red circle at the top left on a blue background").',
            file=sys.stderr,
        )
        model = str(DEMO_MODEL_PATH)
    if model is None:
        if quantize is not None:
            raise ValueError("--quantize applies to a saved pipeline; pass --model with a converted checkpoint folder.")
        from .random_pipeline import build_random_pipeline

        print(
            "No --model given: running the complete text-to-image path on a tiny randomly initialised BitDance built "
            "in memory (the picture will be noise-like). Pass --model with a converted checkpoint for real images.",
            file=sys.stderr,
        )
        pipe = build_random_pipeline("tiny", block_size=16, image_sizes=[[256, 256]], dtype=dtype)
    else:
        quantization_config = None
        if quantize is not None:
            # The heavy components: the backbone (language model, or the ImageNet transformer) and the head.
            class_name = DiffusionPipeline.load_config(model)["_class_name"]
            backbone = "transformer" if class_name == BitDanceImageNetPipeline.__name__ else "language_model"
            quantization_config = pipeline_quantization_config(
                quantize, components=(backbone, "diffusion_head"), compute_dtype=dtype
            )
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, quantization_config=quantization_config)
    if loras:
        adapter_names = [f"lora_{index}" for index in range(len(loras))]
        for path, adapter_name in zip(loras, adapter_names):
            pipe.load_lora_weights(path, adapter_name=adapter_name)
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


def class_label(text: str) -> int | str:
    """An ImageNet class id ("980") or label name ("golden retriever")."""
    return int(text) if text.lstrip("-").isdigit() else text


def generate(args):
    if (args.prompt is None) == (args.class_labels is None):
        raise ValueError(
            "Pass --prompt for a text-to-image model or --class_labels for a class-conditional ImageNet model."
        )
    if args.class_labels is not None and args.model is None:
        raise ValueError("--class_labels needs --model with a converted ImageNet checkpoint (see README).")
    pipe = load_pipeline(args.model, DTYPES[args.dtype], args.device, args.quantize, args.offload, args.cuda_graphs,
                         args.lora, args.lora_scale)  # fmt: skip
    class_conditional = isinstance(pipe, BitDanceImageNetPipeline)
    if class_conditional and args.class_labels is None:
        raise ValueError(f"{args.model} is a class-conditional ImageNet model: pass --class_labels, not --prompt.")
    if not class_conditional and args.class_labels is not None:
        raise ValueError(f"{args.model} is a text-to-image model: pass --prompt, not --class_labels.")
    if args.sampler is not None:
        pipe.scheduler = scheduler_for_sampler(args.sampler, pipe.scheduler.config)
    # Drawn on the device that samples, as the original draws from the CUDA generator: the same seed then gives the
    # original's noise on a GPU, and no per-step noise crosses from host to device.
    generator = torch.Generator(pipe._execution_device).manual_seed(args.seed)
    # Options left unset keep the pipeline's own defaults (text-to-image: 50 steps, CFG 7.5; ImageNet: 100 steps).
    options = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    if class_conditional:
        inputs = args.class_labels
        options.update(num_images_per_label=args.num_images)
    else:
        inputs = args.prompt
        options.update(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                       num_images_per_prompt=args.num_images)  # fmt: skip
    options = {name: value for name, value in options.items() if value is not None}
    images = pipe(inputs, generator=generator, **options).images
    outputs = [args.output] if len(images) == 1 else [args.output.replace(".png", f"_{i}.png") for i in range(len(images))]
    for image, path in zip(images, outputs):
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")


def convert(args, rest):
    if args.kind == "t2i":
        from .conversion.t2i import main
    elif args.kind == "tokenizer":
        from .conversion.tokenizer import main
    else:
        from .conversion.imagenet import main
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitdance", description="BitDance binary-token image generation.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="Generate images from a text prompt or ImageNet class labels.")
    gen.add_argument("--prompt", help="What to draw (text-to-image models).")
    gen.add_argument("--class_labels", nargs="+", type=class_label,
                     help='ImageNet class ids and/or label names, e.g. 980 "golden retriever" (class-conditional '
                          "models).")
    gen.add_argument("--negative_prompt", default=None, help="Text of the unguided branch (default: the original's).")
    gen.add_argument("--model", default=None,
                     help="Converted pipeline folder or Hub id (default: the shapes model shipped with the package).")
    gen.add_argument("--height", type=int, default=None, help="One of the model's sizes (default: 1024x1024 if it has it).")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None,
                     help="Head flow steps per block (default: the pipeline's: 50 text-to-image, 100 ImageNet).")
    gen.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                     help="Head sampler (default: the model's, the original's binary-flow SDE); flow-unipc and "
                          "flow-dpmsolver work with far fewer --steps (see README).")
    gen.add_argument("--guidance", type=float, default=None,
                     help="Classifier-free guidance scale (default: the pipeline's: 7.5 text-to-image, 4.0 ImageNet).")
    gen.add_argument("--num_images", type=int, default=1, help="Images per prompt (or per class label).")
    gen.add_argument("--seed", type=int, default=42, help="Seed of the generator on --device (the original's examples use 42).")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32" if not torch.cuda.is_available() else "bf16")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--quantize", choices=QUANTIZATION_SCHEMES, default=None,
                     help="Quantize the backbone and the head while loading (int8wo runs on CPU; see README).")
    gen.add_argument("--lora", nargs="+", default=[], metavar="PATH",
                     help="LoRA adapters to apply: folders or Hub ids holding pytorch_lora_weights.safetensors.")
    gen.add_argument("--lora_scale", nargs="+", type=float, default=None, metavar="SCALE",
                     help="Strength of each --lora (default: 1 each).")
    gen.add_argument("--offload", choices=["model", "sequential"], default=None,
                     help="CUDA: keep weights in host memory and move them to the GPU when used (model: per component, "
                          "the language model leaves only for the decode; sequential: per layer, least GPU memory).")
    gen.add_argument("--cuda_graphs", action="store_true",
                     help="CUDA: replay the diffusion head and the language model's block step from CUDA graphs.")
    gen.add_argument("--output", default="bitdance.png", help="PNG path; several images get _0, _1, ... suffixes.")

    conv = commands.add_parser(
        "convert",
        help="Convert an original checkpoint: bitdance convert {t2i,tokenizer,imagenet} --help for each converter.",
        add_help=False,  # --help after the kind reaches that converter's own parser
    )
    conv.add_argument("kind", choices=["t2i", "tokenizer", "imagenet"])
    add_demo_arguments(commands.add_parser("demo", help="Start the web demo (a Gradio app) for a BitDance model."))
    return parser


def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "convert":
        convert(args, rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        try:
            if args.command == "demo":
                run_demo(args)
            else:
                generate(args)
        except ValueError as error:  # bad input (size, switches, quantization): its message names the fix
            parser.exit(2, f"bitdance {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
