"""Randomly initialised BitDance pipelines of the sizes in `model_presets`, built in memory with no download.

Used by the tests, the benchmarks and the examples. The text tokenizer is a byte-level BPE without merges (every byte
is a token) carrying BitDance's special tokens by name.
"""

import torch
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .conversion.imagenet import imagenet_id2label
from .model_presets import IMAGENET_PRESETS, T2I_PRESETS
from .models import (
    BitDanceDiffusionHead,
    BitDanceImageNetTransformer,
    BitDanceMLPHead,
    BitDanceProjector,
    BitDanceTokenizer,
)
from .pipelines import BitDanceImageNetPipeline, BitDancePipeline
from .schedulers import BinaryFlowScheduler
from .special_tokens import SPECIAL_TOKENS


def build_byte_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 tokenizer whose vocabulary is the 256 bytes plus BitDance's special tokens."""
    vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


def build_random_pipeline(
    config: str = "tiny",
    block_size: int = 16,
    image_sizes: list | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BitDancePipeline:
    """A complete `BitDancePipeline` with random weights of the named size (see ``model_presets.T2I_PRESETS``).

    The modules are created directly on ``device`` in ``dtype`` (no float32 or CPU copy), so the 14B shapes fit a GPU.
    """
    if config not in T2I_PRESETS:
        raise ValueError(f"Unknown random config {config!r}; choose one of {sorted(T2I_PRESETS)}.")
    sizes = T2I_PRESETS[config]
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return _build_pipeline(sizes, tokenizer, block_size, image_sizes)
    finally:
        torch.set_default_dtype(default_dtype)


def _build_pipeline(sizes: dict, tokenizer, block_size: int, image_sizes: list | None) -> BitDancePipeline:
    lm_config = Qwen3Config(max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                            **{"vocab_size": len(tokenizer), **sizes["language_model"]})  # fmt: skip
    lm_config._attn_implementation = "sdpa"
    hidden_size = lm_config.hidden_size
    if image_sizes is None:
        image_sizes = [[128, 128], [128, 256], [256, 128], [256, 256], [512, 512], [64, 64]]
    return BitDancePipeline(
        tokenizer=tokenizer,
        language_model=Qwen3Model(lm_config).eval(),
        projector=BitDanceProjector(in_channels=32, hidden_size=hidden_size).eval(),
        diffusion_head=BitDanceDiffusionHead(in_channels=32, condition_channels=hidden_size, **sizes["head"]).eval(),
        vae=BitDanceTokenizer(z_channels=32, **sizes["vae"]).eval(),
        scheduler=BinaryFlowScheduler(),
        block_size=block_size,
        image_sizes=image_sizes,
    )


def build_imagenet_models(size: str = "B", block_size: int = 1, num_classes: int = 1000, sample_size: int = 16):
    """Backbone and diffusion head of a named ImageNet size (random weights; use ``torch.device("meta")`` for shapes).

    ``P = 1`` gets the per-token MLP head, ``P > 1`` the transformer head with 64-wide attention heads and raw output.
    """
    if size not in IMAGENET_PRESETS:
        raise ValueError(f"Unknown ImageNet size {size!r}; choose one of {sorted(IMAGENET_PRESETS)}.")
    sizes = IMAGENET_PRESETS[size]
    hidden_size = sizes["hidden_size"]
    transformer = BitDanceImageNetTransformer(
        num_classes=num_classes,
        sample_size=sample_size,
        hidden_size=hidden_size,
        num_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        block_size=block_size,
    )
    head_config = dict(
        in_channels=32,
        condition_channels=hidden_size,
        hidden_size=hidden_size,
        num_layers=sizes["head_layers"],
        num_ada_ln_layers=sizes["head_ada_ln_layers"],
    )
    if block_size == 1:
        head = BitDanceMLPHead(**head_config)
    else:
        head = BitDanceDiffusionHead(**head_config, attention_head_dim=64, bounded_output=False)
    return transformer, head


def build_random_imagenet_pipeline(
    size: str = "tiny",
    block_size: int = 4,
    num_classes: int = 1000,
    sample_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BitDanceImageNetPipeline:
    """A complete `BitDanceImageNetPipeline` with random weights; ``sample_size`` 4 gives 64x64 images. With 1000
    classes it knows the ImageNet-1k label names, as a converted release does."""
    torch.manual_seed(seed)
    with torch.device(device):
        transformer, head = build_imagenet_models(size, block_size, num_classes, sample_size)
        vae = BitDanceTokenizer(z_channels=32, **T2I_PRESETS["tiny"]["vae"])
    id2label = imagenet_id2label() if num_classes == 1000 else None
    pipe = BitDanceImageNetPipeline(transformer=transformer.eval(), diffusion_head=head.eval(), vae=vae.eval(),
                                    scheduler=BinaryFlowScheduler(), id2label=id2label)  # fmt: skip
    return pipe if dtype == torch.float32 else pipe.to(dtype)
