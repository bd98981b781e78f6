"""``bitdance demo``: a Gradio web app around a BitDance pipeline.

    bitdance demo                                   # the shapes model shipped with the package, offline, on a CPU
    bitdance demo --model BitDance-14B-64x-diffusers --device cuda --dtype bf16 --port 7860
    bitdance demo --model BitDance-B-4x-diffusers   # a class-conditional ImageNet model: a class picker, no prompt

A text-to-image model gets a prompt, a negative prompt and a size from its ``image_sizes``; an ImageNet model a class
picker and the guidance schedule. Both get head steps, guidance, the head's sampler (`SAMPLERS`), a seed with a
random-seed button, the number of images, a progress bar over the autoregressive blocks and a gallery of PNGs. Image
``i`` of a run uses seed ``seed + i``, so any image can be redrawn alone. Generations run one at a time (Gradio's queue
with a concurrency limit of 1): two browsers queue up instead of sharing the pipeline's scheduler and memory.

This module imports Gradio and torch only when the app is built or served, so that ``bitdance --help`` stays fast.
"""

import argparse
import html
import inspect
import random
import socket
import time
from pathlib import Path

from .cli.arguments import UsageError


MAX_SEED = 2**32 - 1
MAX_IMAGES = 4
DEFAULT_PORT = 7860
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Prompts the shipped shapes model understands (its captions' grammar; see `bitdance_diffusers.training.shapes`).
SHAPES_EXAMPLES = [
    "a large red circle in the center on a blue background",
    "a large yellow circle at the bottom right on a purple background",
    "a large white triangle at the top on a black background",
    "a large green square in the center on a white background",
]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bitdance demo``."""
    parser.add_argument("--model", default=None,
                        help="Converted pipeline folder or Hub id in the local cache, text-to-image or ImageNet "
                             "(default: the shapes model shipped with the package).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port to listen on (default {DEFAULT_PORT}).")
    parser.add_argument("--share", action="store_true",
                        help="Also open a temporary public gradio.live link (off by default).")
    parser.add_argument("--device", default=None,
                        help="Where the pipeline runs (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None,
                        help="Weights' dtype (default: bf16 on CUDA, fp32 on a CPU).")
    parser.add_argument("--max_images", type=int, default=MAX_IMAGES,
                        help=f"Most images one request may ask for (default {MAX_IMAGES}).")  # fmt: skip


def run_demo(args: argparse.Namespace) -> None:
    """Load the pipeline of ``args.model`` and serve its app until interrupted (Ctrl+C)."""
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port; pass a number from 1 to 65535.")
    if args.max_images < 1:
        raise UsageError(f"--max_images {args.max_images} must be at least 1.")
    check_port_free(args.host, args.port)  # before the model loads, not after
    try:
        import gradio as gr
    except ImportError as error:
        raise UsageError(
            'bitdance demo needs Gradio: pip install "bitdance-diffusers[demo]" (or pip install gradio).'
        ) from error
    import torch

    from .cli import load_pipeline
    from .pretrained import DEMO_MODEL_PATH

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
    pipe = load_pipeline(args.model, getattr(torch, DTYPE_NAMES[dtype_name]), device)
    pipe.set_progress_bar_config(disable=True)  # the page shows the progress
    shapes_model = (DEMO_MODEL_PATH / "model_index.json").is_file() and (
        args.model is None or Path(args.model).resolve() == DEMO_MODEL_PATH
    )
    model_name = DEMO_MODEL_PATH.name if shapes_model else args.model or "tiny random BitDance"
    demo = build_demo(pipe, model_name, SHAPES_EXAMPLES if shapes_model else None, args.max_images)
    # System fonts: the page loads nothing from outside the server (the theme's default fetches Google Fonts).
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # fmt: skip
    demo.queue(max_size=32).launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                                   theme=theme)  # fmt: skip


def check_port_free(host: str, port: int) -> None:
    """Raise a `UsageError` naming the fix if nothing can listen on ``host:port``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UsageError(
                f"Cannot listen on {host}:{port} ({error.strerror}); pass another --port, or --host with an address "
                "of this machine."
            ) from error


def _sampler_of(scheduler) -> str | None:
    """The `SAMPLERS` name of ``scheduler``'s sampler (the most specific one that matches its class and options)."""
    from .schedulers import SAMPLERS

    matches = [
        (len(options), name) for name, (scheduler_class, options) in SAMPLERS.items()
        if type(scheduler) is scheduler_class and all(scheduler.config.get(k) == v for k, v in options.items())
    ]  # fmt: skip
    return max(matches)[1] if matches else None


def _class_choices(pipe) -> list[tuple[str, int]]:
    """``("golden retriever (207)", 207)`` for every class of an ImageNet pipeline: its names from ``pipe.labels``
    (``"class 17"`` when it has none of its own)."""
    names = {}
    for name, class_id in pipe.labels.items():
        names.setdefault(class_id, []).append(name)
    return [
        (f"{', '.join(names[class_id])} ({class_id})" if class_id in names else f"class {class_id}", class_id)
        for class_id in range(pipe.transformer.config.num_classes)
    ]


def build_demo(pipe, model_name: str | None = None, examples: list[str] | None = None, max_images: int = MAX_IMAGES):
    """The Gradio app of ``pipe`` (a `BitDancePipeline` or `BitDanceImageNetPipeline`), not yet launched.

    Args:
        pipe: the pipeline; the app swaps its ``scheduler`` per request (to the sampler chosen in the page).
        model_name: shown in the title.
        examples: example prompts offered under the prompt box (text-to-image).
        max_images: most images one request may produce.

    Returns:
        `gradio.Blocks`; call ``.queue().launch()`` on it. Elements have ``elem_id``s for scripts and tests:
        ``prompt``, ``negative-prompt``, ``class-labels``, ``size``, ``steps``, ``guidance``, ``sampler``, ``seed``,
        ``random-seed``, ``num-images``, ``generate``, ``gallery``, ``info``.
    """
    import gradio as gr
    import torch

    from .pipelines import BitDanceImageNetPipeline
    from .pipelines.block_sampling import GUIDANCE_SCHEDULES
    from .schedulers import SAMPLERS, scheduler_for_sampler

    class_conditional = isinstance(pipe, BitDanceImageNetPipeline)
    call_defaults = {name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()}
    model_scheduler = pipe.scheduler
    model_sampler = _sampler_of(model_scheduler)
    schedulers = {model_sampler: model_scheduler}  # by sampler name, built when first chosen
    sampler_choices = list(SAMPLERS)
    if class_conditional:
        sample_size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        sizes_text = f"{sample_size} × {sample_size}"
    else:
        sizes = [f"{height}x{width}" for height, width in pipe.config.image_sizes]
        default_size = "1024x1024" if "1024x1024" in sizes else sizes[0]

    def run(inputs, options: dict, sampler: str, seed, num_images: int, progress) -> tuple[list, str]:
        """One generation; ``inputs`` are the prompt or the class ids, ``options`` the rest of the pipeline call."""
        if seed is None or seed != int(seed) or not 0 <= int(seed) <= MAX_SEED:
            raise gr.Error(f"The seed must be a whole number from 0 to {MAX_SEED} (got {seed}); the Random seed "
                           "button draws one.", print_exception=False)  # fmt: skip
        if sampler not in SAMPLERS:
            raise gr.Error(f"Unknown sampler {html.escape(str(sampler))}; choose one of {', '.join(SAMPLERS)}.",
                           print_exception=False)  # fmt: skip
        seed = int(seed)
        if sampler not in schedulers:
            schedulers[sampler] = scheduler_for_sampler(sampler, model_scheduler.config)
        pipe.scheduler = schedulers[sampler]
        total = (len(inputs) if class_conditional else 1) * num_images
        device = pipe._execution_device
        generators = [torch.Generator(device).manual_seed(seed + index) for index in range(total)]

        def track_blocks(pipe, block: int, timestep, callback_kwargs: dict) -> dict:
            progress((block + 1, pipe.num_timesteps), desc="Sampling blocks of tokens", unit="blocks")
            return callback_kwargs

        progress(0, desc="Reading the prompt" if not class_conditional else "Reading the classes")
        start = time.perf_counter()
        try:
            images = pipe(inputs, generator=generators, callback_on_step_end=track_blocks, **options).images
        except ValueError as error:  # bad input caught by the pipeline: its message names the fix
            raise gr.Error(html.escape(str(error)), print_exception=False) from error
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            message = "Out of GPU memory: ask for fewer images, or a smaller size."
            raise gr.Error(message, print_exception=False) from error
        seconds = time.perf_counter() - start
        captions = [f"seed {seed + index}" for index in range(len(images))]
        info = (f"{len(images)} image{'s' if len(images) > 1 else ''} of {images[0].height} × {images[0].width}, "
                f"{options['num_inference_steps']} {sampler} steps, guidance {options['guidance_scale']:g}, seeds "
                f"{seed}–{seed + len(images) - 1}: {seconds:.1f} s.")  # fmt: skip
        return list(zip(images, captions)), info

    def generate_from_prompt(prompt, negative_prompt, size, steps, guidance, sampler, seed, num_images,
                             progress=gr.Progress()):  # fmt: skip
        if not prompt or not prompt.strip():
            example = f' such as "{examples[0]}"' if examples else ""
            raise gr.Error(f"Enter a prompt: a description of the image to draw{example}.", print_exception=False)
        if size not in sizes:
            raise gr.Error(f"Choose a size from the list: {', '.join(sizes)}.", print_exception=False)
        if negative_prompt and negative_prompt.strip() and guidance <= 1:
            gr.Warning("Guidance 1 or less turns classifier-free guidance off: the negative prompt is not used.")
        height, width = (int(side) for side in size.split("x"))
        options = dict(negative_prompt=negative_prompt or None, height=height, width=width,
                       num_inference_steps=int(steps), guidance_scale=float(guidance),
                       num_images_per_prompt=int(num_images))  # fmt: skip
        return run(prompt.strip(), options, sampler, seed, int(num_images), progress)

    def generate_from_classes(class_ids, guidance_schedule, steps, guidance, sampler, seed, num_images,
                              progress=gr.Progress()):  # fmt: skip
        if not class_ids:
            raise gr.Error("Pick at least one class to draw.", print_exception=False)
        if len(class_ids) * int(num_images) > max_images:
            raise gr.Error(f"{len(class_ids)} classes × {int(num_images)} images is more than {max_images} images; "
                           "pick fewer classes or fewer images per class.", print_exception=False)  # fmt: skip
        options = dict(guidance_schedule=guidance_schedule, num_inference_steps=int(steps),
                       guidance_scale=float(guidance), num_images_per_label=int(num_images))  # fmt: skip
        return run([int(class_id) for class_id in class_ids], options, sampler, seed, int(num_images), progress)

    title = "BitDance" + (f" · {model_name}" if model_name else "")
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {html.escape(title)}\nAutoregressive image generation over binary visual tokens: a backbone samples "
            "the image block by block, a diffusion head draws each block's tokens."
        )
        with gr.Row():
            with gr.Column(scale=1):
                if class_conditional:
                    condition = gr.Dropdown(_class_choices(pipe), value=[pipe.labels.get("golden retriever", 0)],
                                            multiselect=True, max_choices=max_images, label="Classes",
                                            elem_id="class-labels")  # fmt: skip
                    extra = [gr.Dropdown(list(GUIDANCE_SCHEDULES), value=call_defaults["guidance_schedule"],
                                         label="Guidance schedule", info="linear ramps it up over the blocks, as "
                                         "the original", elem_id="guidance-schedule")]  # fmt: skip
                else:
                    condition = gr.Textbox(label="Prompt", lines=2, placeholder="What to draw", elem_id="prompt")
                    extra = [
                        gr.Textbox(label="Negative prompt", elem_id="negative-prompt",
                                   placeholder="Optional: what the image should not look like"),  # fmt: skip
                        gr.Dropdown([(size.replace("x", " × "), size) for size in sizes], value=default_size,
                                    label="Size (height × width)", elem_id="size"),  # fmt: skip
                    ]
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Settings", open=True):
                    steps = gr.Slider(1, 100, value=call_defaults["num_inference_steps"], step=1,
                                      label="Head steps per block", elem_id="steps")  # fmt: skip
                    guidance = gr.Slider(1, 15, value=call_defaults["guidance_scale"], step=0.1, label="Guidance",
                                         elem_id="guidance")  # fmt: skip
                    sampler = gr.Dropdown(sampler_choices, value=model_sampler or sampler_choices[0], label="Sampler",
                                          info="flow-unipc and flow-dpmsolver keep their quality with far fewer "
                                          "steps", elem_id="sampler")  # fmt: skip
                    with gr.Row():
                        seed = gr.Number(42, precision=0, label="Seed", elem_id="seed", scale=3)
                        random_seed = gr.Button("Random seed", elem_id="random-seed", scale=1)
                    num_images = gr.Slider(1, max_images, value=1, step=1,
                                           label="Images per class" if class_conditional else "Images",
                                           elem_id="num-images")  # fmt: skip
                if examples:
                    gr.Examples([[example] for example in examples], inputs=[condition], label="Example prompts")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", format="png", columns=2, object_fit="contain",
                                     buttons=["download", "download_all", "fullscreen"], interactive=False,
                                     elem_id="gallery")  # fmt: skip
                info = gr.Markdown(f"Images of {sizes_text}." if class_conditional else "", elem_id="info")

        random_seed.click(lambda: random.randint(0, MAX_SEED), outputs=seed, queue=False)
        handler = generate_from_classes if class_conditional else generate_from_prompt
        inputs = [condition, *extra, steps, guidance, sampler, seed, num_images]
        triggers = [generate.click] + ([] if class_conditional else [condition.submit])
        # One generation at a time: every request goes through the same queue slot (the pipeline is shared).
        gr.on(triggers, handler, inputs=inputs, outputs=[gallery, info], concurrency_limit=1,
              concurrency_id="pipeline", api_name="generate")  # fmt: skip
    return demo
