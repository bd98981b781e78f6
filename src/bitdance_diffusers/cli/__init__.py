"""The ``bitdance`` command: generate images, convert original checkpoints, run the web demo.

    bitdance generate --prompt "a red fox in the snow" --output fox.png [--model FOLDER] [--cuda_graphs]
        [--offload {model,sequential}] [--quantize SCHEME] [--sampler flow-unipc --steps 10] [--lora DIR]
    bitdance generate --model BitDance-B-4x-diffusers --class_labels "golden retriever" 980 --output dogs.png
    bitdance convert t2i --checkpoint_path BitDance-14B-64x --dump_path BitDance-14B-64x-diffusers
    bitdance convert imagenet --checkpoint_path BitDance_B_4x.pt --dump_path BitDance-B-4x-diffusers \\
        --vae_checkpoint_path ae_d16c32.pt
    bitdance demo

Building the parser imports neither torch nor diffusers, so ``--help`` and mistakes in the arguments answer at once.
"""

import logging
import sys
import traceback

from ..quantization import QUANTIZATION_SCHEMES
from .arguments import (
    CommandLineParser,
    LaidOutTextFormatter,
    UsageError,
    class_label,
    finite_float,
    positive_int,
    prompt_text,
    seed,
)
from .generate import DTYPES, load_pipeline, run_generate
from .library_output import hide_unused_quantization_libraries, library_logs, library_output, quiet_library_imports


__all__ = ["build_parser", "class_label", "load_pipeline", "main"]

# The names of `bitdance_diffusers.schedulers.SAMPLERS`, spelled out so that the parser needs no diffusers import
# (tests/test_cli.py keeps the two equal).
SAMPLER_NAMES = ("binary-flow", "binary-flow-ode", "flow-euler", "flow-heun", "flow-unipc", "flow-dpmsolver")
CONVERTERS = ("t2i", "tokenizer", "imagenet")

GENERATE_EPILOG = """\
output files:
  --output names the image file; its extension picks the format (any type Pillow writes RGB images in: .png, .jpg,
  .webp, .bmp, .tiff, ...). Several images (--num_images, or several --class_labels) are numbered before the
  extension: fox.jpg becomes fox_0.jpg, fox_1.jpg, ... (zero-padded from 10 images on). All of it is checked before
  the model loads: the folder must exist and take new files, no path may be a folder, and an existing file is
  refused unless --overwrite is given (as `cp -n` and `ffmpeg -n` do: the file may be an earlier run's work).
  Each image goes to a hidden temporary file beside it, renamed when complete: a killed run never leaves a partial
  image, and the next run into that folder removes the temporary file a killed run left.

terminal output:
  stdout: one "wrote PATH (WxH)" line per image. stderr: our notes, one progress bar over the token blocks (a batch
  samples its images together) and errors; other libraries' warnings, logs and loading bars are held back.
  --quiet: only errors, and the bare written paths on stdout. --verbose: the libraries' info logs and loading bars,
  and the traceback of an unexpected error.

exit status:
  0 done; 2 a problem with the input, named in one line with its fix; 1 an unexpected error; 130 interrupted.

offline use:
  HF_HUB_OFFLINE=1 reads a Hub id from the Hugging Face cache only; without --model the shapes model shipped with
  the package needs no network.
"""


def build_parser(command: str | None = None) -> CommandLineParser:
    """The ``bitdance`` parser. ``command`` is the sub-command about to run: ``"demo"`` adds the demo's options (its
    module is imported only then)."""
    parser = CommandLineParser(prog="bitdance", description="BitDance binary-token image generation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,convert,demo}")

    gen = commands.add_parser(
        "generate",
        help="Generate images from a text prompt or ImageNet class labels.",
        description="Generate images from a text prompt (text-to-image models) or ImageNet class labels\n"
                    "(class-conditional models).",
        epilog=GENERATE_EPILOG,
        formatter_class=LaidOutTextFormatter,
    )  # fmt: skip
    gen.add_argument("--prompt", type=prompt_text, help="What to draw (text-to-image models).")
    gen.add_argument("--class_labels", nargs="+", type=class_label,
                     help='ImageNet class ids and/or label names, e.g. 980 "golden retriever" (class-conditional '
                          "models).")  # fmt: skip
    gen.add_argument("--negative_prompt", default=None, help="Text of the unguided branch (default: the original's).")
    gen.add_argument("--model", default=None,
                     help="Converted pipeline folder or Hub id (default: the shapes model shipped with the package).")
    gen.add_argument("--height", type=positive_int, default=None,
                     help="One of the model's sizes (default: 1024x1024 if it has it, else its first size).")
    gen.add_argument("--width", type=positive_int, default=None, help="See --height (one alone gives a square).")
    gen.add_argument("--steps", type=positive_int, default=None,
                     help="Head flow steps per block (default: the pipeline's: 50 text-to-image, 100 ImageNet).")
    gen.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                     help="Head sampler (default: the model's, the original's binary-flow SDE); flow-unipc and "
                          "flow-dpmsolver work with far fewer --steps (see README).")  # fmt: skip
    gen.add_argument("--guidance", type=finite_float, default=None,
                     help="Classifier-free guidance scale (default: the pipeline's: 7.5 text-to-image, 4.0 ImageNet).")
    gen.add_argument("--num_images", type=positive_int, default=1, help="Images per prompt (or per class label).")
    gen.add_argument("--seed", type=seed, default=42,
                     help="Seed of the generator on --device (the original's examples use 42).")
    gen.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                     help="Weights and compute dtype (default auto: bf16 on a GPU, fp32 on a CPU).")
    gen.add_argument("--device", default="auto",
                     help="cpu, cuda or cuda:N (default auto: the GPU when CUDA has one, else the CPU).")
    gen.add_argument("--quantize", choices=QUANTIZATION_SCHEMES, default=None,
                     help="Quantize the backbone and the head while loading (int8wo runs on CPU; see README).")
    gen.add_argument("--lora", nargs="+", default=[], metavar="PATH",
                     help="LoRA adapters to apply: folders holding pytorch_lora_weights.safetensors, such files, or "
                          "Hub ids.")  # fmt: skip
    gen.add_argument("--lora_scale", nargs="+", type=finite_float, default=None, metavar="SCALE",
                     help="Strength of each --lora (default: 1 each).")
    gen.add_argument("--offload", choices=["model", "sequential"], default=None,
                     help="CUDA: keep weights in host memory and move them to the GPU when used (model: per component, "
                          "the language model leaves only for the decode; sequential: per layer, least GPU memory).")
    gen.add_argument("--cuda_graphs", action="store_true",
                     help="CUDA: replay the diffusion head and the language model's block step from CUDA graphs.")
    gen.add_argument("--output", default="bitdance.png",
                     help="Image file (default bitdance.png); see 'output files' below.")
    gen.add_argument("--overwrite", action="store_true", help="Replace existing files at the output paths.")
    verbosity = gen.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="Print only errors and the written paths.")
    verbosity.add_argument("--verbose", action="store_true",
                           help="Show the libraries' logs and loading bars, and tracebacks of unexpected errors.")

    conv = commands.add_parser(
        "convert",
        help="Convert an original checkpoint: bitdance convert {t2i,tokenizer,imagenet} --help for each converter.",
        add_help=False,  # --help after the kind reaches that converter's own parser
    )
    conv.add_argument("kind", choices=CONVERTERS)

    demo = commands.add_parser("demo", help="Start the web demo (Gradio) on the shipped model or --model.")
    if command == "demo":
        from ..demo import add_demo_arguments

        add_demo_arguments(demo)
    parser.subcommands.update(generate=gen, convert=conv, demo=demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the ``bitdance`` command on ``argv`` (default: the process's arguments).

    Run as the program (``argv`` left out), the command also keeps the quantization libraries its run does not use
    from being imported in its process (see `hide_unused_quantization_libraries`); called with an ``argv`` from Python,
    it leaves the caller's imports alone.
    """
    program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command=argv[0] if argv else None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "convert":
        if program:
            hide_unused_quantization_libraries(None)
            quiet_library_imports()
        convert(args.kind, rest)
        return
    if rest:
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from ..demo import run_demo

        if program:
            hide_unused_quantization_libraries(getattr(args, "quantize", None))
        run_reporting_errors("bitdance demo", "normal", lambda: run_demo(args))
        return
    verbosity = "quiet" if args.quiet else "verbose" if args.verbose else "normal"
    if program:
        hide_unused_quantization_libraries(args.quantize)
        quiet_library_imports(verbosity)
    run_reporting_errors("bitdance generate", verbosity, lambda: run_generate(args, verbosity))


def run_reporting_errors(prog: str, verbosity: str, command) -> None:
    """Run ``command()``; end a failure with one line on stderr: exit 2 for the user's mistakes (`UsageError`), 130 on
    Ctrl-C, 1 for anything unexpected (whose traceback ``"verbose"`` shows)."""
    try:
        with library_logs(verbosity):
            command()
    except UsageError as error:
        if verbosity == "verbose" and error.__cause__ is not None:
            traceback.print_exception(error.__cause__)
        _exit(2, f"{prog}: error: {_one_line(error)}")
    except KeyboardInterrupt:
        _exit(130, f"{prog}: interrupted; no partial image was written.")
    except Exception as error:
        if verbosity == "verbose":
            raise
        _exit(1, f"{prog}: unexpected error: {type(error).__name__}: {_one_line(error)} (run again with --verbose "
                 "for the traceback, and please report it)")  # fmt: skip


def convert(kind: str, argv: list[str]) -> None:
    if kind == "t2i":
        from ..conversion.t2i import main as convert_main
    elif kind == "tokenizer":
        from ..conversion.tokenizer import main as convert_main
    else:
        from ..conversion.imagenet import main as convert_main
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with library_output("normal"):
        convert_main(argv)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _exit(status: int, message: str) -> None:
    sys.stderr.flush()
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)
