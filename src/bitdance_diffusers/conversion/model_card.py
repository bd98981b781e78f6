"""The model card (``README.md``) every converter writes into its output: Hugging Face metadata (library, task, base
model, the original weights' licence, tags), what the folder holds, how to use it and where the weights came from."""

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


# The original release (SPEC: shallowdream204/BitDance, Apache-2.0 code and weights).
ORIGINAL_LICENSE = "apache-2.0"
ORIGINAL_CODE = "https://github.com/shallowdream204/BitDance"
PAPER = "https://arxiv.org/abs/2602.14041"
ORIGINAL_T2I_REPOS = {16: "shallowdream204/BitDance-14B-16x", 64: "shallowdream204/BitDance-14B-64x"}
ORIGINAL_IMAGENET_REPO = "shallowdream204/BitDance-ImageNet"
ORIGINAL_TOKENIZER_REPO = "shallowdream204/BitDance-Tokenizer"
# The original's tuned ImageNet guidance per released model (README / SPEC §4).
IMAGENET_GUIDANCE = {"B_1x": 3.2, "B_4x": 3.9, "B_16x": 6.1, "L_1x": 4.0, "H_1x": 4.55}


def _card(
    *, title: str, summary: str, pipeline_tag: str, base_model: str | None, tags: list, usage: str, details: list,
    source: str, converter: str, datasets: list | None = None,
) -> ModelCard:  # fmt: skip
    data = ModelCardData(
        license=ORIGINAL_LICENSE,
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        datasets=datasets,
        tags=["bitdance", "autoregressive", "binary-tokens", *tags],
    )
    origin = (
        f"the original release [{base_model}](https://huggingface.co/{base_model})" if base_model else "a checkpoint"
    )
    body = "\n\n".join(
        [
            f"# {title}",
            summary,
            "## Usage",
            "With the `bitdance-diffusers` package installed (it registers the BitDance classes with diffusers):",
            f"```python\n{usage.strip()}\n```",
            "## Details",
            "\n".join(f"- {line}" for line in details),
            "## Source and licence",
            (
                f"Converted from `{source}`, {origin} of BitDance ([paper]({PAPER}), [code]({ORIGINAL_CODE})), with "
                f"`{converter}` of bitdance-diffusers; every source tensor was mapped or dropped for a stated reason. "
                f"The weights keep the licence of the original release ({ORIGINAL_LICENSE})."
            ),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def source_name(checkpoint_path: str) -> str:
    """How a card names the source: a Hub repo id as given, a local path by its last component only."""
    path = Path(checkpoint_path)
    return checkpoint_path if not path.exists() else path.name


def t2i_model_card(
    folder_name: str, source: str, base_model: str | None, block_size: int, image_sizes: list, dtype: str
) -> ModelCard:
    height, width = [1024, 1024] if [1024, 1024] in image_sizes else image_sizes[0]
    patch = round(block_size**0.5) * 16
    usage = f"""
import torch
from bitdance_diffusers import BitDancePipeline

pipe = BitDancePipeline.from_pretrained("{folder_name}", dtype=torch.bfloat16).to("cuda")
image = pipe(
    "a red fox in the snow", height={height}, width={width}, num_inference_steps=50, guidance_scale=7.5,
    generator=torch.Generator("cuda").manual_seed(0),
).images[0]
image.save("fox.png")
"""
    sizes = ", ".join(f"{h}x{w}" for h, w in image_sizes)
    return _card(
        title=f"BitDance text-to-image, {block_size} tokens per step (diffusers)",
        summary=(
            "BitDance generates an image autoregressively over binary visual tokens: a Qwen3 language model reads the "
            f"prompt and then the image block by block ({block_size} tokens, a {patch}x{patch}-pixel patch, per step); "
            "a diffusion head samples each block's binary tokens and a binary autoencoder decodes them."
        ),
        pipeline_tag="text-to-image",
        base_model=base_model,
        tags=["text-to-image"],
        usage=usage,
        details=[
            (
                "Pipeline class: `BitDancePipeline` (components: language_model, tokenizer, projector, "
                f"diffusion_head, vae, scheduler); {block_size} tokens per autoregressive step."
            ),
            f"Sizes (height x width): {sizes}.",
            (
                "Recommended: 50 head steps per block (`num_inference_steps`) and guidance 7.5, the original's "
                f"settings; a {height}x{width} image takes {(height // patch) * (width // patch)} autoregressive steps."
            ),
            f"Weights stored as {dtype}.",
        ],
        source=source,
        converter="conversion/convert_bitdance_t2i.py",
    )


def imagenet_model_card(
    folder_name: str, checkpoint_path: str, transformer_config: dict, head_class: str, weights: str, dtype: str
) -> ModelCard:
    num_classes, block_size = transformer_config["num_classes"], transformer_config["block_size"]
    side = transformer_config["sample_size"] * 16
    variant = re.search(r"BitDance_([BLH]_\d+x)", Path(checkpoint_path).name)
    guidance = IMAGENET_GUIDANCE.get(variant.group(1) if variant else None, 4.0)
    labels = [207, 980] if num_classes == 1000 else list(range(min(2, num_classes)))
    usage = f"""
import torch
from bitdance_diffusers import BitDanceImageNetPipeline

pipe = BitDanceImageNetPipeline.from_pretrained("{folder_name}").to("cuda")
images = pipe(
    {labels}, guidance_scale={guidance}, num_inference_steps=100, generator=torch.Generator("cuda").manual_seed(0)
).images
"""
    return _card(
        title=f"BitDance ImageNet {side}x{side}, {block_size} token(s) per step (diffusers)",
        summary=(
            "Class-conditional BitDance: a transformer reads the class tokens and then the image's binary tokens block "
            f"by block ({block_size} per step); a diffusion head samples each block and a binary autoencoder decodes "
            "the token grid."
        ),
        pipeline_tag="unconditional-image-generation",
        base_model=ORIGINAL_IMAGENET_REPO,
        tags=["class-conditional", "imagenet"],
        datasets=["imagenet-1k"] if num_classes == 1000 else None,
        usage=usage,
        details=[
            (
                f"Pipeline class: `BitDanceImageNetPipeline` (components: transformer, diffusion_head "
                f"({head_class}), vae, scheduler)."
            ),
            (
                f"{num_classes} classes; {side}x{side} images; width {transformer_config['hidden_size']}, "
                f"{transformer_config['num_layers']} layers."
            ),
            (
                f"Recommended: 100 head steps per block and guidance {guidance} (the original's value for this "
                f"model); an image takes {transformer_config['sample_size'] ** 2 // block_size} autoregressive steps."
            ),
            f"Weights: the checkpoint's `{weights}` set, stored as {dtype}.",
        ],
        source=source_name(checkpoint_path),
        converter="conversion/convert_bitdance_imagenet.py",
    )


def tokenizer_model_card(folder_name: str, source: str, config: dict, dtype: str) -> ModelCard:
    factor = 2 ** (len(config["ch_mult"]) - 1)
    z_channels = config["z_channels"]
    usage = f"""
import torch
from bitdance_diffusers import BitDanceTokenizer

tokenizer = BitDanceTokenizer.from_pretrained("{folder_name}")
images = torch.rand(1, 3, 256, 256) * 2 - 1  # [B, 3, H, W] in [-1, 1]
codes = tokenizer.encode(images).codes  # ±1, [1, {z_channels}, {256 // factor}, {256 // factor}]
reconstruction = tokenizer.decode(codes).sample
"""
    return _card(
        title=f"BitDance binary tokenizer, {factor}x down-sampling, {z_channels} bits per token (diffusers)",
        summary=(
            f"The binary autoencoder of BitDance: it encodes an image into a grid of {z_channels}-bit tokens (±1 "
            f"codes, one per {factor}x{factor} pixels) and decodes such a grid back into an image."
        ),
        pipeline_tag="image-to-image",
        base_model=ORIGINAL_TOKENIZER_REPO,
        tags=["tokenizer", "autoencoder"],
        usage=usage,
        details=[
            "Model class: `BitDanceTokenizer` (a diffusers `ModelMixin`).",
            f"Vocabulary 2^{z_channels}; {'GAN' if config['gan_decoder'] else 'deterministic'} decoder.",
            f"Weights stored as {dtype}.",
        ],
        source=source,
        converter="conversion/convert_bitdance_tokenizer.py",
    )
