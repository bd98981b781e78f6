"""Original BitDance-14B-{16x,64x} release -> `BitDancePipeline` diffusers folder.

Accepted sources (a local folder or a Hub repo id, resolved through the local cache when ``HF_HUB_OFFLINE=1``):

* the original release (SPEC §3.12): Qwen3 LLM + text tokenizer at the root, ``ae_config.json``/``ae.safetensors``,
  ``vision_head_config.json``/``vision_head.safetensors``, ``projector.safetensors``;
* the community diffusers layout with the original key names: sub-folders ``text_encoder``, ``tokenizer``,
  ``autoencoder``, ``diffusion_head``, ``projector``, each with a json config and safetensors weights.

The language model is streamed shard by shard (peak memory about one shard): keys lose their ``model.`` prefix and
``lm_head.weight`` is dropped (image generation never computes text logits).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3Model

from ..models.binary_autoencoder import BitDanceTokenizer
from ..models.diffusion_head import BitDanceDiffusionHead
from ..models.projector import BitDanceProjector
from ..pipelines.pipeline_bitdance import DEFAULT_IMAGE_SIZES, IMAGE_START_TOKEN, BitDancePipeline
from ..schedulers.scheduling_binary_flow import BinaryFlowScheduler
from ..utils.token_layout import patch_size_for_block
from .common import (
    DTYPES,
    ConversionError,
    ConversionReport,
    base_parser,
    build_on_meta,
    check_finite,
    config_value,
    exit_on_conversion_error,
    load_safetensors,
    load_state_dict_strict,
    logger,
    raise_if_non_finite,
    read_json,
    read_safetensors,
    require_file,
)
from .model_card import ORIGINAL_T2I_REPOS, source_name, t2i_model_card
from .output_folder import atomic_output_dir, check_dump_path
from .tokenizer import build_tokenizer, tokenizer_config_from_original


LANGUAGE_MODEL_DROPPED = {"lm_head.weight": "text logits are never computed by image generation"}


@dataclass
class ReleaseLayout:
    """Where each original component lives inside a source folder."""

    language_model: Path
    tokenizer: Path
    ae_config: Path
    ae_weights: Path
    head_config: Path
    head_weights: Path
    projector_weights: Path


def _single(folder: Path, pattern: str, what: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        raise ConversionError(f"Expected exactly one {pattern} in {folder} for the {what}, found {len(matches)}.")
    return matches[0]


def locate_release(source: Path) -> ReleaseLayout:
    """Recognise the original or the community diffusers layout."""
    if (source / "vision_head_config.json").is_file() or (source / "ae_config.json").is_file():
        return ReleaseLayout(
            language_model=source,
            tokenizer=source,
            ae_config=require_file(source / "ae_config.json", "autoencoder config"),
            ae_weights=require_file(source / "ae.safetensors", "autoencoder weights"),
            head_config=require_file(source / "vision_head_config.json", "diffusion head config"),
            head_weights=require_file(source / "vision_head.safetensors", "diffusion head weights"),
            projector_weights=require_file(source / "projector.safetensors", "projector weights"),
        )
    community = ["text_encoder", "tokenizer", "autoencoder", "diffusion_head", "projector"]
    if all((source / name).is_dir() for name in community):
        return ReleaseLayout(
            language_model=source / "text_encoder",
            tokenizer=source / "tokenizer",
            ae_config=_single(source / "autoencoder", "*.json", "autoencoder config"),
            ae_weights=_single(source / "autoencoder", "*.safetensors", "autoencoder weights"),
            head_config=_single(source / "diffusion_head", "*.json", "diffusion head config"),
            head_weights=_single(source / "diffusion_head", "*.safetensors", "diffusion head weights"),
            projector_weights=_single(source / "projector", "*.safetensors", "projector weights"),
        )
    raise ConversionError(
        f"{source} is neither an original BitDance release (vision_head_config.json, ae_config.json, projector.safetensors "
        f"and the Qwen3 LLM at the root) nor the community diffusers layout ({', '.join(community)} sub-folders)."
    )


def resolve_source(checkpoint_path: str) -> Path:
    """A local folder, or a Hub repo id downloaded (or, with ``HF_HUB_OFFLINE=1``, found) in the local HF cache."""
    path = Path(checkpoint_path)
    if path.is_dir():
        return path
    if not checkpoint_path:
        raise ConversionError("--checkpoint_path is empty; pass the folder of the original release or its Hub id.")
    if path.exists() or checkpoint_path.count("/") != 1 or checkpoint_path.startswith(("/", ".", "~")):
        problem = "is a file" if path.exists() else "does not exist"
        raise ConversionError(
            f"--checkpoint_path {checkpoint_path!r} {problem}: it is neither a folder nor a Hub repo id (owner/name). "
            "Pass the folder of the original release or its Hub id."
        )
    try:
        return Path(snapshot_download(checkpoint_path))
    except Exception as error:
        raise ConversionError(
            f"Could not resolve the Hub repo {checkpoint_path!r}: {error}. Download it first or check the HF cache."
        ) from error


def head_config_from_original(config: dict, source: str = "vision_head_config.json") -> tuple[dict, int]:
    """``DiffHead(**vision_head_config)`` arguments -> (`BitDanceDiffusionHead` config, block size ``P``)."""
    if not config_value(config, "use_swiglu", bool, source, default=False):
        raise ConversionError("Only SwiGLU diffusion heads (use_swiglu=true, every released model) are supported.")
    keys = ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln", "parallel_num")
    target, condition, width, depth, ada_ln, block_size = (config_value(config, key, int, source) for key in keys)
    try:
        patch_size_for_block(block_size)
    except ValueError as error:
        raise ConversionError(
            f"{source}: parallel_num {block_size} is not a square number of tokens (16, 64, ...)."
        ) from error
    head_config = {
        "in_channels": target,
        "condition_channels": condition,
        "hidden_size": width,
        "num_layers": depth,
        "num_ada_ln_layers": ada_ln,
        "attention_head_dim": 128,
        "bounded_output": True,
        "time_logit_mean": config_value(config, "P_mean", float, source, default=0.0),
        "time_logit_std": config_value(config, "P_std", float, source, default=1.0),
    }
    return head_config, block_size


def language_model_config(folder: Path) -> Qwen3Config:
    """The Qwen3 config of the release's language model (``config.json``), checked to build a model."""
    path = folder / "config.json"
    read_json(path, "language model config")
    try:
        config = AutoConfig.from_pretrained(folder)
        if isinstance(config, Qwen3Config):
            with torch.device("meta"):
                Qwen3Model(config)
    except Exception as error:  # transformers raises value, key, type and OS errors for bad configs
        raise ConversionError(f"{path} does not describe a usable language model: {error}") from error
    if not isinstance(config, Qwen3Config):
        raise ConversionError(f"{path} describes a {type(config).__name__}, expected a Qwen3 language model.")
    return config


def _language_model_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "language model weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ConversionError(f"{index} has no weight_map {{tensor: shard file}}; the index is damaged.")
        shards = sorted({folder / name for name in weight_map.values()})
    else:
        shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise ConversionError(f"No language model weights (model*.safetensors) in {folder}.")
    for shard in shards:
        require_file(shard, "language model shard")
    return shards


def convert_language_model(
    source: Path, target: Path, config: Qwen3Config, report: ConversionReport, dtype: torch.dtype | None
):
    """Stream the Qwen3ForCausalLM shards into a ``Qwen3Model`` folder, one shard in memory at a time."""
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in Qwen3Model(config).state_dict().items()}
    target.mkdir(parents=True)
    shards = _language_model_shards(source)
    weight_map, seen = {}, set()
    for number, shard in enumerate(tqdm(shards, desc="language model shards"), start=1):
        tensors, non_finite = {}, []
        for key, tensor in read_safetensors(shard, "language model shard"):
            if key in LANGUAGE_MODEL_DROPPED:
                report.drop(f"{shard.name}:{key}", LANGUAGE_MODEL_DROPPED[key])
                continue
            name = key.removeprefix("model.")
            if name not in expected or name in seen:
                raise ConversionError(f"{shard.name}: unexpected or duplicate language model tensor {key!r}.")
            if tuple(tensor.shape) != tuple(expected[name]):
                raise ConversionError(
                    f"{shard.name}: {key!r} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name])}."
                )
            if not tensor.is_floating_point():
                raise ConversionError(f"{shard.name}: {key!r} has dtype {tensor.dtype}, expected floating point.")
            tensors[name] = tensor.to(dtype) if dtype is not None else tensor
            check_finite(key, tensors[name], tensor.dtype, non_finite)
            report.mapped[f"{shard.name}:{key}"] = f"language_model/{name}"
            seen.add(name)
        raise_if_non_finite(shard.name, non_finite)
        shard_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(target / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard_name))
        del tensors
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConversionError(
            f"Language model tensors missing from {source}: {missing[:8]}{' ...' if len(missing) > 8 else ''}; the "
            "release is incomplete (a shard is missing from its index?): download it again."
        )
    if dtype is not None:
        config.dtype = dtype
    config.architectures = ["Qwen3Model"]
    config.save_pretrained(target)
    total = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return config


def parse_image_sizes(sizes: str | list | None, block_pixels: int) -> list[list[int]]:
    """``"1024x1024,512x512"`` (height x width) or ``[[1024, 1024], ...]`` -> ``[[1024, 1024], ...]``, every side a
    positive multiple of ``block_pixels`` (the pixels of one block); ``None``: the original's list."""
    if sizes is None:
        return [list(size) for size in DEFAULT_IMAGE_SIZES]
    if isinstance(sizes, str):
        items = [item.strip() for item in sizes.split(",")]
        matches = [re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)", item) for item in items]
        if not items or not all(matches):
            bad = [item for item, match in zip(items, matches) if not match]
            raise ConversionError(
                f"--image_sizes must look like 1024x1024,512x512 (height x width, positive integers); {bad} is not."
            )
        sizes = [[int(match[1]), int(match[2])] for match in matches]
    parsed = []
    for size in sizes:
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
            raise ConversionError(f"Image size {size!r} is not a [height, width] pair of positive integers.")
        if size[0] % block_pixels or size[1] % block_pixels:
            raise ConversionError(
                f"Image size {size[0]}x{size[1]} does not split into the model's {block_pixels}x{block_pixels}-pixel "
                f"blocks; use multiples of {block_pixels} for both sides (e.g. {block_pixels * 8}x{block_pixels * 8})."
            )
        if list(size) not in parsed:
            parsed.append(list(size))
    return parsed


def load_text_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # tokenizers and transformers raise many error types for missing or damaged files
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(
            f"Cannot load the text tokenizer in {folder}: {problem}. Its tokenizer files are missing or damaged; copy "
            "them again from the original release."
        ) from error


def check_text_tokenizer(tokenizer, folder: Path, block_size: int, image_sizes: list, vocab_size: int):
    """The tokenizer must carry BitDance's special tokens for this block size and these sizes, within the language
    model's embeddings."""
    vocab = tokenizer.get_vocab()
    names = [IMAGE_START_TOKEN, *(f"<|query_{k}|>" for k in range(1, block_size))]
    names += sorted({f"<|res_{side // 16}|>" for size in image_sizes for side in size}, key=len)
    missing = [name for name in names if name not in vocab]
    if missing:
        raise ConversionError(
            f"The text tokenizer in {folder} lacks BitDance's special tokens {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}: a block size of {block_size} needs {IMAGE_START_TOKEN}, "
            f"<|query_1|>..<|query_{block_size - 1}|> and <|res_k|> for every image side / 16. Convert a BitDance "
            "release (its tokenizer carries them), not a plain Qwen3 tokenizer."
        )
    largest = max(vocab.values())
    if largest >= vocab_size:
        raise ConversionError(
            f"The text tokenizer in {folder} has token id {largest}, but the language model embeds only {vocab_size} "
            "tokens; the tokenizer and the language model come from different releases."
        )


def check_matching_widths(lm_config: Qwen3Config, head_config: dict, projector_shape: tuple, z_channels: int):
    """The components must fit together: the projector maps tokens to the language model's width, the head reads it."""
    hidden_size, in_channels = projector_shape
    widths = {
        "language model hidden_size": lm_config.hidden_size,
        "projector output (fc1.weight rows)": hidden_size,
        "diffusion head ch_cond": head_config["condition_channels"],
    }
    channels = {
        "tokenizer z_channels": z_channels,
        "projector input (fc1.weight columns)": in_channels,
        "diffusion head ch_target": head_config["in_channels"],
    }
    for what, values in (("widths", widths), ("token channels", channels)):
        if len(set(values.values())) > 1:
            raise ConversionError(
                f"The release's components disagree on the {what}: {values}; they come from different models."
            )


def convert_t2i(checkpoint_path: str, dump_path: str, dtype: str = "keep", overwrite: bool = False, image_sizes=None):
    """Convert an original text-to-image release; every input is checked before anything is written."""
    source = resolve_source(checkpoint_path)
    check_dump_path(dump_path, overwrite, sources=[source])
    layout = locate_release(source)
    weights_dtype = DTYPES[dtype]
    report = ConversionReport()
    head_config, block_size = head_config_from_original(read_json(layout.head_config, "diffusion head config"))
    ae_config = read_json(layout.ae_config, "autoencoder config")
    vae_config = tokenizer_config_from_original(ae_config, layout.ae_config.name)
    lm_config = language_model_config(layout.language_model)
    sizes = parse_image_sizes(image_sizes, patch_size_for_block(block_size) * 2 ** (len(vae_config["ch_mult"]) - 1))
    text_tokenizer = load_text_tokenizer(layout.tokenizer)
    check_text_tokenizer(text_tokenizer, layout.tokenizer, block_size, sizes, lm_config.vocab_size)
    projector_weights = load_safetensors(layout.projector_weights, "projector weights")
    projector_shape = tuple(getattr(projector_weights.get("fc1.weight"), "shape", ()))
    if len(projector_shape) != 2:
        raise ConversionError(
            f"{layout.projector_weights} has no 2-D fc1.weight (keys: {sorted(projector_weights)}); is it the projector?"
        )
    check_matching_widths(lm_config, head_config, projector_shape, vae_config["z_channels"])

    with atomic_output_dir(dump_path, overwrite, sources=[source]) as staging:
        # The small components first, so that their problems show before the language model's long streaming.
        ae_weights = load_safetensors(layout.ae_weights, "autoencoder weights")
        vae = build_tokenizer(ae_config, ae_weights, report, "ae", weights_dtype)
        vae.save_pretrained(staging / "vae")
        del vae, ae_weights

        head = build_on_meta(BitDanceDiffusionHead, head_config, layout.head_config.name)
        head_weights = load_safetensors(layout.head_weights, "diffusion head weights")
        load_state_dict_strict(head, head_weights, report, "vision_head", lambda k: k.removeprefix("net."), weights_dtype)
        head.save_pretrained(staging / "diffusion_head")
        del head, head_weights

        projector = build_on_meta(
            BitDanceProjector, {"in_channels": projector_shape[1], "hidden_size": projector_shape[0]}, "projector"
        )
        load_state_dict_strict(projector, projector_weights, report, "projector", dtype=weights_dtype)
        projector.save_pretrained(staging / "projector")
        stored = dtype if dtype != "keep" else str(next(iter(projector.parameters())).dtype).removeprefix("torch.")
        del projector, projector_weights

        convert_language_model(layout.language_model, staging / "language_model", lm_config, report, weights_dtype)

        text_tokenizer.save_pretrained(staging / "tokenizer")
        scheduler = BinaryFlowScheduler()
        scheduler.save_pretrained(staging / "scheduler")

        # model_index.json only needs each component's class: meta-device stand-ins cost no memory.
        with torch.device("meta"):
            pipeline = BitDancePipeline(
                tokenizer=text_tokenizer,
                language_model=Qwen3Model(lm_config),
                projector=BitDanceProjector(in_channels=projector_shape[1], hidden_size=projector_shape[0]),
                diffusion_head=BitDanceDiffusionHead(**head_config),
                vae=BitDanceTokenizer(**vae_config),
                scheduler=scheduler,
                block_size=block_size,
                image_sizes=sizes,
            )
        pipeline.save_config(staging)
        is_hub_id = not Path(checkpoint_path).exists()
        base_model = checkpoint_path if is_hub_id else ORIGINAL_T2I_REPOS.get(block_size)
        card = t2i_model_card(Path(dump_path).name, source_name(checkpoint_path), base_model, block_size, sizes, stored)
        card.save(staging / "README.md")
    report.log("BitDance text-to-image")
    logger.info("Saved BitDancePipeline (P=%d) to %s", block_size, dump_path)
    return report


def main(argv=None):
    parser = base_parser("Convert an original BitDance-14B text-to-image release into a diffusers folder.")
    parser.add_argument(
        "--image_sizes",
        help="Supported sizes as HxW,HxW,... (default: the original's 18 sizes from 256x1024 to 2048x512).",
    )
    args = parser.parse_args(argv)
    with exit_on_conversion_error(parser):
        convert_t2i(args.checkpoint_path, args.dump_path, args.dtype, args.overwrite, args.image_sizes)


if __name__ == "__main__":
    main()
