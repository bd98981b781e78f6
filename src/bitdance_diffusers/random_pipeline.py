"""Randomly initialised BitDance pipelines built in memory, with no download.

Used by the command line and the examples until trained demo models ship, by the tests and by the benchmarks. The
text tokenizer is a byte-level BPE without merges (every byte is a token) carrying BitDance's special tokens by name.
"""

import torch
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .models import (
    BitDanceDiffusionHead,
    BitDanceImageNetTransformer,
    BitDanceMLPHead,
    BitDanceProjector,
    BitDanceTokenizer,
)
from .pipelines import BitDanceImageNetPipeline, BitDancePipeline
from .schedulers import BinaryFlowScheduler


# Named sizes: language model, head and autoencoder widths. "small" is a few hundred million parameters for CPU runs.
RANDOM_CONFIGS = {
    "tiny": {
        "language_model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16),
        "head": dict(hidden_size=128, num_layers=2, num_ada_ln_layers=2, attention_head_dim=64),
        "vae": dict(ch=32, ch_mult=(2, 1, 1, 1, 1), num_res_blocks=1),
    },
    "small": {
        "language_model": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                               num_key_value_heads=8, head_dim=64),
        "head": dict(hidden_size=1024, num_layers=6, num_ada_ln_layers=2, attention_head_dim=128),
        "vae": dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1),
    },
    # The real shapes of BitDance-14B (Qwen3-14B, the 1.76 B head, ae_d16c32); vocabulary of the 64x release.
    "14b": {
        "language_model": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                               num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                               vocab_size=151988),
        "head": dict(hidden_size=5120, num_layers=6, num_ada_ln_layers=2, attention_head_dim=128),
        "vae": dict(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4),
    },
}  # fmt: skip

SPECIAL_TOKENS = (
    ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    + [f"<|res_{k}|>" for k in range(1, 257)]
    + [f"<|query_{k}|>" for k in range(1, 64)]
)


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
    """A complete `BitDancePipeline` with random weights of the named size (see ``RANDOM_CONFIGS``).

    The modules are created directly on ``device`` in ``dtype`` (no float32 or CPU copy), so the 14B shapes fit a GPU.
    """
    if config not in RANDOM_CONFIGS:
        raise ValueError(f"Unknown random config {config!r}; choose one of {sorted(RANDOM_CONFIGS)}.")
    sizes = RANDOM_CONFIGS[config]
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


# Class-conditional ImageNet sizes: the released BitDance-B/L/H (SPEC 4.1; the head is as wide as the backbone) and a
# tiny one for tests. BitDance-B has 242.37 M parameters with the 1x MLP head and 260.1 M with the 4x/16x head.
IMAGENET_SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=2, head_layers=2, head_ada_ln_layers=2),
    "B": dict(hidden_size=768, num_layers=24, num_attention_heads=12, head_layers=6, head_ada_ln_layers=2),
    "L": dict(hidden_size=1024, num_layers=32, num_attention_heads=16, head_layers=8, head_ada_ln_layers=2),
    "H": dict(hidden_size=1280, num_layers=40, num_attention_heads=20, head_layers=12, head_ada_ln_layers=3),
}


def build_imagenet_models(size: str = "B", block_size: int = 1, num_classes: int = 1000, sample_size: int = 16):
    """Backbone and diffusion head of a named ImageNet size (random weights; use ``torch.device("meta")`` for shapes).

    ``P = 1`` gets the per-token MLP head, ``P > 1`` the transformer head with 64-wide attention heads and raw output.
    """
    if size not in IMAGENET_SIZES:
        raise ValueError(f"Unknown ImageNet size {size!r}; choose one of {sorted(IMAGENET_SIZES)}.")
    sizes = IMAGENET_SIZES[size]
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
    """A complete `BitDanceImageNetPipeline` with random weights; ``sample_size`` 4 gives 64x64 images."""
    torch.manual_seed(seed)
    with torch.device(device):
        transformer, head = build_imagenet_models(size, block_size, num_classes, sample_size)
        vae = BitDanceTokenizer(z_channels=32, **RANDOM_CONFIGS["tiny"]["vae"])
    pipe = BitDanceImageNetPipeline(
        transformer=transformer.eval(), diffusion_head=head.eval(), vae=vae.eval(), scheduler=BinaryFlowScheduler()
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype)
