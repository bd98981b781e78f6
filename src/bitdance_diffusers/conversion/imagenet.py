"""Original BitDance ImageNet checkpoint (``BitDance_{B_1x,B_4x,B_16x,L_1x,H_1x}.pt``) -> `BitDanceImageNetPipeline`.

The source is the original training checkpoint, a torch pickle ``{"model": state_dict, "ema": state_dict, ...}``
(possibly with ``optimizer``/``epochs``/``args``). Keys: the backbone (``cls_embedding``, ``query_token``,
``proj_in``, ``emb_norm``, ``layers.*``, ``norm``, ``pos_for_diff``) maps 1:1 to `BitDanceImageNetTransformer`,
``head.net.*`` to the diffusion head (`BitDanceMLPHead` for ``P = 1``, `BitDanceDiffusionHead` otherwise) and
``vae.*`` to `BitDanceTokenizer`. The architecture is read off the tensor shapes (the checkpoint has no config).

The original sampler always overwrites the checkpoint's ``vae.*`` with the separate ``ae_d16c32.pt``
(``load_vae_weight``), so ``--vae_checkpoint_path ae_d16c32.pt`` is what reproduces it; without it the checkpoint's
own ``vae.*`` copy is used, with a warning.
"""

import argparse
import json
import math
import pickle
from pathlib import Path

import torch

from ..models.binary_autoencoder import BitDanceTokenizer
from ..models.diffusion_head import BitDanceDiffusionHead
from ..models.imagenet_transformer import BitDanceImageNetTransformer
from ..models.mlp_head import BitDanceMLPHead
from ..pipelines.pipeline_bitdance_imagenet import BitDanceImageNetPipeline
from ..schedulers.scheduling_binary_flow import BinaryFlowScheduler
from .common import (
    DTYPES,
    ConversionError,
    ConversionReport,
    base_parser,
    build_on_meta,
    exit_on_conversion_error,
    load_state_dict_strict,
    logger,
    require_file,
)
from .model_card import imagenet_model_card
from .output_folder import atomic_output_dir, check_dump_path
from .tokenizer import tokenizer_config_from_state_dict


# The ImageNet-1k class names by id (comma-separated synonyms, the customary ILSVRC-2012 order), written into the
# pipeline's model_index.json as `id2label`, as diffusers' DiT pipelines carry them.
IMAGENET_ID2LABEL_FILE = Path(__file__).with_name("imagenet_id2label.json")
WEIGHTS = ("ema", "model")
HEAD_PREFIX = "head.net."
VAE_PREFIX = "vae."
# Attention head width of every released ImageNet backbone (dim / heads = 64).
DEFAULT_ATTENTION_HEAD_DIM = 64
# Top-level entries of a training checkpoint besides the weights.
EXTRA_ENTRY_REASONS = {
    "optimizer": "optimizer state (training only)",
    "epochs": "training progress counter",
    "epoch": "training progress counter",
    "steps": "training progress counter",
    "args": "training arguments (the architecture is read from the tensor shapes)",
}


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names by class id, e.g. ``{0: "tench, Tinca tinca", 1: "goldfish, ...", ...}``."""
    return {int(key): value for key, value in json.loads(IMAGENET_ID2LABEL_FILE.read_text()).items()}


def load_torch_checkpoint(path: str | Path, what: str, allow_unsafe_pickle: bool = False):
    """``torch.load(weights_only=True)`` (argparse namespaces allowed); arbitrary pickles only when explicitly asked."""
    path = require_file(path, what)
    corrupt = "Cannot read {} as a torch checkpoint ({}: {}); the file is corrupt, truncated or not a .pt file."
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise ConversionError(corrupt.format(path, type(error).__name__, str(error).splitlines()[0])) from error
        if not allow_unsafe_pickle:
            raise ConversionError(
                f"{path} cannot be loaded with torch.load(weights_only=True): {str(error).splitlines()[0]} "
                "If you trust this file, pass --allow_unsafe_pickle (unpickling can run arbitrary code)."
            ) from error
    except Exception as error:  # torch.load raises key, EOF, runtime and zip errors for damaged files
        raise ConversionError(corrupt.format(path, type(error).__name__, error)) from error
    logger.warning("Loading %s with torch.load(weights_only=False): this executes code stored in the pickle.", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConversionError(corrupt.format(path, type(error).__name__, error)) from error


def check_state_dict(state_dict: dict, source: str):
    """Every entry of a weights dict must be a tensor under a string name."""
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a named tensor; the checkpoint is damaged "
                "or is not a BitDance state dict."
            )


def select_weights(checkpoint, weights: str, source: str, report: ConversionReport) -> dict:
    """The ``weights`` (``"ema"`` or ``"model"``) state dict of a training checkpoint; other entries are dropped."""
    if not isinstance(checkpoint, dict) or not set(WEIGHTS) & set(checkpoint):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(
            f"{source} is not an original BitDance ImageNet checkpoint: expected a dict with 'ema' and/or 'model' state "
            f"dicts, found {found}. (Text-to-image releases are folders: use convert_bitdance_t2i.py; the tokenizer "
            "file ae_d16c32.pt belongs to --vae_checkpoint_path.)"
        )
    if weights not in checkpoint:
        other = next(name for name in WEIGHTS if name != weights)
        raise ConversionError(
            f"{source} has no {weights!r} weights (entries: {sorted(checkpoint)}); pass --weights {other}."
        )
    for key in checkpoint:
        if key != weights:
            if key in WEIGHTS:
                report.drop(f"{source}:{key}", f"--weights {weights} selected")
            else:
                report.drop(f"{source}:{key}", EXTRA_ENTRY_REASONS.get(key, "not model weights"))
    state_dict = checkpoint[weights]
    if not isinstance(state_dict, dict) or "cls_embedding.weight" not in state_dict:
        raise ConversionError(
            f"{source}[{weights!r}] is not a BitDance ImageNet state dict (no cls_embedding.weight); is this a "
            "class-conditional BitDance checkpoint?"
        )
    check_state_dict(state_dict, f"{source}[{weights!r}]")
    return state_dict


def _count(state_dict: dict, prefix: str, suffix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix) and key.endswith(suffix)})


def transformer_config_from_state_dict(state_dict: dict, num_attention_heads: int | None = None) -> dict:
    """`BitDanceImageNetTransformer` config read off the backbone's tensor shapes."""
    hidden_size = state_dict["emb_norm.weight"].shape[0]
    num_rows, class_width = state_dict["cls_embedding.weight"].shape
    num_positions = state_dict["pos_for_diff.weight"].shape[0]
    sample_size = math.isqrt(num_positions)
    if sample_size * sample_size != num_positions:
        raise ConversionError(f"pos_for_diff has {num_positions} rows, not a square latent grid.")
    if num_attention_heads is None:
        if hidden_size % DEFAULT_ATTENTION_HEAD_DIM:
            raise ConversionError(
                f"Width {hidden_size} is not a multiple of the released models' head dim {DEFAULT_ATTENTION_HEAD_DIM}; "
                "pass --num_attention_heads (the head count is not stored in the checkpoint)."
            )
        num_attention_heads = hidden_size // DEFAULT_ATTENTION_HEAD_DIM
    check_attention_heads(num_attention_heads, hidden_size)
    return {
        "num_classes": num_rows - 1,
        "sample_size": sample_size,
        "in_channels": state_dict["proj_in.w1.weight"].shape[1],
        "hidden_size": hidden_size,
        "num_layers": _count(state_dict, "layers.", ".attention_norm.weight"),
        "num_attention_heads": num_attention_heads,
        "num_class_tokens": class_width // hidden_size,
        "block_size": state_dict["query_token"].shape[1] + 1 if "query_token" in state_dict else 1,
    }


def check_attention_heads(num_attention_heads: int, hidden_size: int):
    """A head count must split the width into heads of a width divisible by 4 (the 2-D rotary embedding's pairs)."""
    if type(num_attention_heads) is not int or num_attention_heads < 1 or hidden_size % num_attention_heads:
        raise ConversionError(
            f"--num_attention_heads {num_attention_heads} does not divide the backbone's width {hidden_size}; pass a "
            f"positive divisor of {hidden_size} (the released models use width / {DEFAULT_ATTENTION_HEAD_DIM})."
        )
    if (hidden_size // num_attention_heads) % 4:
        raise ConversionError(
            f"--num_attention_heads {num_attention_heads} gives heads {hidden_size // num_attention_heads} wide, but "
            "the 2-D rotary embedding needs a head width divisible by 4; pass fewer heads."
        )


def build_head(state_dict: dict, source: str, report: ConversionReport, dtype: torch.dtype | None):
    """The diffusion head from the ``head.net.*`` tensors (prefix removed): transformer head if it has attention."""
    try:
        config = {
            "in_channels": state_dict["input_proj.weight"].shape[1],
            "condition_channels": state_dict["cond_embed.weight"].shape[1],
            "hidden_size": state_dict["input_proj.weight"].shape[0],
            "num_layers": _count(state_dict, "res_blocks.", ".w2.weight"),
            "num_ada_ln_layers": _count(state_dict, "ada_ln_blocks.", ".weight"),
        }
    except (KeyError, IndexError) as error:
        raise ConversionError(f"{source}: the diffusion head lacks {error} (or it has the wrong shape).") from error
    if "res_blocks.0.attn.wqkv.weight" in state_dict:
        # The ImageNet transformer head: 64-wide attention heads and a raw (unbounded) x-prediction.
        config.update(attention_head_dim=64, bounded_output=False)
        head = build_on_meta(BitDanceDiffusionHead, config, source)
    else:
        head = build_on_meta(BitDanceMLPHead, config, source)
    return load_state_dict_strict(head, state_dict, report, source, dtype=dtype).eval()


def build_vae(state_dict: dict, source: str, report: ConversionReport, dtype: torch.dtype | None) -> BitDanceTokenizer:
    """`BitDanceTokenizer` from ``encoder.*``/``decoder.*`` tensors; the architecture is read off their shapes."""
    config = tokenizer_config_from_state_dict(state_dict, source)
    logger.info("%s: tokenizer %s", source, config)
    vae = build_on_meta(BitDanceTokenizer, config, source)
    return load_state_dict_strict(vae, state_dict, report, source, dtype=dtype).eval()


def check_matching_channels(transformer_config: dict, head: torch.nn.Module, vae: BitDanceTokenizer, source: str):
    """The backbone, head and tokenizer must agree on the token channels; the head must read the backbone's width."""
    channels = {
        "backbone in_channels": transformer_config["in_channels"],
        "head in_channels": head.config.in_channels,
        "tokenizer z_channels": vae.config.z_channels,
    }
    if len(set(channels.values())) > 1 or head.config.condition_channels != transformer_config["hidden_size"]:
        raise ConversionError(
            f"{source}: the components do not fit together ({channels}; head condition width "
            f"{head.config.condition_channels}, backbone width {transformer_config['hidden_size']}); the tokenizer or "
            "head comes from a different model."
        )


def load_separate_vae(path: str, report: ConversionReport, dtype: torch.dtype | None, allow_unsafe_pickle: bool):
    """``ae_d16c32.pt`` = ``{"state_dict": {encoder.*, decoder.*, ...}}``; other keys are dropped (strict=False there)."""
    source = Path(path).name
    checkpoint = load_torch_checkpoint(path, "tokenizer checkpoint (--vae_checkpoint_path)", allow_unsafe_pickle)
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or "encoder.conv_in.weight" not in state_dict:
        raise ConversionError(
            f"{path} is not a BitDance tokenizer checkpoint: expected {{'state_dict': {{encoder.*, decoder.*}}}} as "
            "ae_d16c32.pt of the ImageNet release."
        )
    check_state_dict(state_dict, f"{path}['state_dict']")
    for key in checkpoint:
        if key != "state_dict":
            report.drop(f"{source}:{key}", "not tokenizer weights")
    tokenizer_weights = {}
    for key, tensor in state_dict.items():
        if key.startswith(("encoder.", "decoder.")):
            tokenizer_weights[key] = tensor
        else:
            reason = "not part of the encoder/decoder (the original loads this file with strict=False)"
            report.drop(f"{source}:state_dict.{key}", reason)
    return build_vae(tokenizer_weights, f"{source}:state_dict", report, dtype)


def convert_imagenet(
    checkpoint_path: str,
    dump_path: str,
    vae_checkpoint_path: str | None = None,
    weights: str = "ema",
    dtype: str = "keep",
    overwrite: bool = False,
    num_attention_heads: int | None = None,
    allow_unsafe_pickle: bool = False,
) -> ConversionReport:
    if weights not in WEIGHTS:
        raise ConversionError(f"--weights must be one of {WEIGHTS}, got {weights!r}.")
    sources = [path for path in (checkpoint_path, vae_checkpoint_path) if path is not None]
    check_dump_path(dump_path, overwrite, sources)
    weights_dtype = DTYPES[dtype]
    report = ConversionReport()
    source = Path(checkpoint_path).name
    checkpoint = load_torch_checkpoint(checkpoint_path, "ImageNet checkpoint", allow_unsafe_pickle)
    state_dict = select_weights(checkpoint, weights, source, report)
    source = f"{source}:{weights}"

    backbone, head_weights, vae_weights = {}, {}, {}
    for key, tensor in state_dict.items():
        if key.startswith(HEAD_PREFIX):
            head_weights[key.removeprefix(HEAD_PREFIX)] = tensor
        elif key.startswith(VAE_PREFIX):
            vae_weights[key.removeprefix(VAE_PREFIX)] = tensor
        else:
            backbone[key] = tensor

    try:
        transformer_config = transformer_config_from_state_dict(backbone, num_attention_heads)
    except (KeyError, IndexError) as error:
        raise ConversionError(
            f"{source}: the backbone lacks {error} (or it has the wrong shape); is this a BitDance ImageNet checkpoint?"
        ) from error
    transformer = build_on_meta(BitDanceImageNetTransformer, transformer_config, source)
    load_state_dict_strict(transformer, backbone, report, source, dtype=weights_dtype)
    if not head_weights:
        raise ConversionError(f"{source} has no head.net.* tensors (diffusion head).")
    head = build_head(head_weights, f"{source}:head.net", report, weights_dtype)

    if vae_checkpoint_path is not None:
        vae = load_separate_vae(vae_checkpoint_path, report, weights_dtype, allow_unsafe_pickle)
        for key in vae_weights:
            report.drop(f"{source}:vae.{key}", "replaced by --vae_checkpoint_path, as the original sampler does")
    elif vae_weights:
        logger.warning(
            "No --vae_checkpoint_path: using the checkpoint's own vae.* tensors. The original sampler always replaces "
            "them with ae_d16c32.pt (load_vae_weight), so images can differ from the original's; pass "
            "--vae_checkpoint_path ae_d16c32.pt to reproduce it."
        )
        vae = build_vae(vae_weights, f"{source}:vae", report, weights_dtype)
    else:
        raise ConversionError(f"{source} holds no vae.* tensors; pass --vae_checkpoint_path ae_d16c32.pt.")
    check_matching_channels(transformer_config, head, vae, source)

    id2label = imagenet_id2label()
    if transformer_config["num_classes"] != len(id2label):
        logger.info("%d classes, not ImageNet-1k's %d: no label names written", transformer_config["num_classes"],
                    len(id2label))  # fmt: skip
        id2label = None
    pipeline = BitDanceImageNetPipeline(
        transformer=transformer.eval(), diffusion_head=head, vae=vae, scheduler=BinaryFlowScheduler(), id2label=id2label
    )
    with atomic_output_dir(dump_path, overwrite, sources) as staging:
        pipeline.save_pretrained(staging)
        stored = dtype if dtype != "keep" else str(transformer.dtype).removeprefix("torch.")
        card = imagenet_model_card(
            Path(dump_path).name, checkpoint_path, transformer_config, type(head).__name__, weights, stored
        )
        card.save(staging / "README.md")
    report.log("BitDance ImageNet")
    logger.info(
        "Saved BitDanceImageNetPipeline (%d classes, P=%d, width %d, %d layers, %s) to %s",
        transformer_config["num_classes"],
        transformer_config["block_size"],
        transformer_config["hidden_size"],
        transformer_config["num_layers"],
        type(head).__name__,
        dump_path,
    )
    return report


def main(argv=None):
    parser = base_parser("Convert an original BitDance ImageNet checkpoint (BitDance_*.pt) into a diffusers folder.")
    parser.add_argument(
        "--vae_checkpoint_path",
        help="ae_d16c32.pt of the ImageNet release. The original sampler always uses it instead of the checkpoint's "
        "vae.* copy; without it that copy is converted (with a warning).",
    )
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="Which weights of the checkpoint (default: ema).")
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        help="Attention heads of the backbone (default: width / 64, as every released model).",
    )
    parser.add_argument(
        "--allow_unsafe_pickle",
        action="store_true",
        help="If torch.load(weights_only=True) refuses a file, load it with weights_only=False (runs pickled code; "
        "only for trusted files).",
    )
    args = parser.parse_args(argv)
    with exit_on_conversion_error(parser):
        convert_imagenet(
            args.checkpoint_path,
            args.dump_path,
            vae_checkpoint_path=args.vae_checkpoint_path,
            weights=args.weights,
            dtype=args.dtype,
            overwrite=args.overwrite,
            num_attention_heads=args.num_attention_heads,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
        )


if __name__ == "__main__":
    main()
