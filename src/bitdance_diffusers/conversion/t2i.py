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
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, Qwen3Config, Qwen3Model

from ..models.diffusion_head import BitDanceDiffusionHead
from ..models.projector import BitDanceProjector
from ..pipelines.pipeline_bitdance import DEFAULT_IMAGE_SIZES, BitDancePipeline
from ..schedulers.scheduling_binary_flow import BinaryFlowScheduler
from .common import (
    DTYPES,
    ConversionError,
    ConversionReport,
    atomic_output_dir,
    base_parser,
    exit_on_conversion_error,
    load_state_dict_strict,
    logger,
    require_file,
)
from .tokenizer import build_tokenizer, load_safetensors


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


def head_config_from_original(config: dict) -> tuple[dict, int]:
    """``DiffHead(**vision_head_config)`` arguments -> (`BitDanceDiffusionHead` config, block size ``P``)."""
    if not config.get("use_swiglu", False):
        raise ConversionError("Only SwiGLU diffusion heads (use_swiglu=true, every released model) are supported.")
    for key in ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln", "parallel_num"):
        if key not in config:
            raise ConversionError(f"Diffusion head config lacks {key!r} (keys: {sorted(config)}).")
    head_config = {
        "in_channels": config["ch_target"],
        "condition_channels": config["ch_cond"],
        "hidden_size": config["ch_latent"],
        "num_layers": config["depth_latent"],
        "num_ada_ln_layers": config["depth_adanln"],
        "attention_head_dim": 128,
        "bounded_output": True,
        "time_logit_mean": config.get("P_mean", 0.0),
        "time_logit_std": config.get("P_std", 1.0),
    }
    return head_config, config["parallel_num"]


def _language_model_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({folder / name for name in weight_map.values()})
    else:
        shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise ConversionError(f"No language model weights (model*.safetensors) in {folder}.")
    for shard in shards:
        require_file(shard, "language model shard")
    return shards


def convert_language_model(source: Path, target: Path, report: ConversionReport, dtype: torch.dtype | None):
    """Stream the Qwen3ForCausalLM shards into a ``Qwen3Model`` folder, one shard in memory at a time."""
    config = AutoConfig.from_pretrained(source)
    if not isinstance(config, Qwen3Config):
        raise ConversionError(f"{source}/config.json describes a {type(config).__name__}, expected a Qwen3 language model.")
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in Qwen3Model(config).state_dict().items()}
    target.mkdir(parents=True)
    shards = _language_model_shards(source)
    weight_map, seen = {}, set()
    for number, shard in enumerate(tqdm(shards, desc="language model shards"), start=1):
        tensors = {}
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                if key in LANGUAGE_MODEL_DROPPED:
                    report.drop(f"{shard.name}:{key}", LANGUAGE_MODEL_DROPPED[key])
                    continue
                name = key.removeprefix("model.")
                if name not in expected or name in seen:
                    raise ConversionError(f"{shard.name}: unexpected or duplicate language model tensor {key!r}.")
                tensor = handle.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise ConversionError(
                        f"{shard.name}: {key!r} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name])}."
                    )
                if not tensor.is_floating_point():
                    raise ConversionError(f"{shard.name}: {key!r} has dtype {tensor.dtype}, expected floating point.")
                tensors[name] = tensor.to(dtype) if dtype is not None else tensor
                report.mapped[f"{shard.name}:{key}"] = f"language_model/{name}"
                seen.add(name)
        shard_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(target / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard_name))
        del tensors
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConversionError(f"Language model tensors missing from {source}: {missing[:8]}")
    if dtype is not None:
        config.dtype = dtype
    config.architectures = ["Qwen3Model"]
    config.save_pretrained(target)
    total = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return config


def parse_image_sizes(text: str | None) -> list[list[int]]:
    """``"1024x1024,512x512"`` (height x width) -> ``[[1024, 1024], [512, 512]]``; default: the original's list."""
    if not text:
        return [list(size) for size in DEFAULT_IMAGE_SIZES]
    try:
        return [[int(v) for v in item.lower().split("x")] for item in text.split(",")]
    except ValueError as error:
        raise ConversionError(f"--image_sizes must look like 1024x1024,512x512 (height x width), got {text!r}.") from error


def convert_t2i(checkpoint_path: str, dump_path: str, dtype: str = "keep", overwrite: bool = False, image_sizes=None):
    source = resolve_source(checkpoint_path)
    layout = locate_release(source)
    torch_dtype = DTYPES[dtype]
    report = ConversionReport()
    head_config, block_size = head_config_from_original(json.loads(layout.head_config.read_text()))
    text_tokenizer = AutoTokenizer.from_pretrained(layout.tokenizer)

    with atomic_output_dir(dump_path, overwrite) as staging:
        lm_config = convert_language_model(layout.language_model, staging / "language_model", report, torch_dtype)

        vae = build_tokenizer(
            json.loads(layout.ae_config.read_text()), load_safetensors(layout.ae_weights), report, "ae", torch_dtype
        )
        vae.save_pretrained(staging / "vae")

        with torch.device("meta"):
            head = BitDanceDiffusionHead(**head_config)
        head_weights = load_safetensors(layout.head_weights)
        load_state_dict_strict(head, head_weights, report, "vision_head", lambda k: k.removeprefix("net."), torch_dtype)
        head.save_pretrained(staging / "diffusion_head")
        del head, head_weights

        projector_weights = load_safetensors(layout.projector_weights)
        if "fc1.weight" not in projector_weights:
            raise ConversionError(f"{layout.projector_weights} has no fc1.weight; keys: {sorted(projector_weights)}")
        hidden_size, in_channels = projector_weights["fc1.weight"].shape
        with torch.device("meta"):
            projector = BitDanceProjector(in_channels=in_channels, hidden_size=hidden_size)
        load_state_dict_strict(projector, projector_weights, report, "projector", dtype=torch_dtype)
        projector.save_pretrained(staging / "projector")

        text_tokenizer.save_pretrained(staging / "tokenizer")
        scheduler = BinaryFlowScheduler()
        scheduler.save_pretrained(staging / "scheduler")

        # model_index.json only needs each component's class: meta-device stand-ins cost no memory.
        with torch.device("meta"):
            language_model = Qwen3Model(lm_config)
            head = BitDanceDiffusionHead(**head_config)
        pipeline = BitDancePipeline(
            tokenizer=text_tokenizer,
            language_model=language_model,
            projector=projector,
            diffusion_head=head,
            vae=vae,
            scheduler=scheduler,
            block_size=block_size,
            image_sizes=parse_image_sizes(image_sizes),
        )
        pipeline.special_token_ids()  # fails early if the tokenizer lacks the res/query tokens
        pipeline.save_config(staging)
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
