"""Original binary-tokenizer release (``<name>_config.json`` + ``<name>.safetensors``) -> `BitDanceTokenizer` folder."""

from pathlib import Path

import torch

from ..models.binary_autoencoder import BitDanceTokenizer
from .common import (
    DTYPES,
    ConversionError,
    ConversionReport,
    base_parser,
    build_on_meta,
    config_value,
    exit_on_conversion_error,
    load_safetensors,
    load_state_dict_strict,
    logger,
    read_json,
    require_file,
)
from .model_card import tokenizer_model_card
from .output_folder import atomic_output_dir, check_dump_path


def tokenizer_config_from_original(ae_config: dict, source: str = "tokenizer config") -> dict:
    """``VQModel(**ae_config)`` arguments (``ddconfig`` + ``gan_decoder``, or the same keys flattened) -> config."""
    # Original releases nest the architecture under "ddconfig"; flattened copies put its keys at the top level.
    dd = ae_config.get("ddconfig", ae_config)
    if not isinstance(dd, dict):
        raise ConversionError(f"{source}: 'ddconfig' must be an object {{ch, ch_mult, ...}}, got {dd!r}.")
    missing = [key for key in ("ch", "ch_mult", "num_res_blocks", "z_channels") if key not in dd]
    if missing:
        raise ConversionError(f"Tokenizer config lacks {missing} (keys: {sorted(ae_config)}); is this an ae_config.json?")
    if config_value(dd, "double_z", bool, source, default=False):
        raise ConversionError("ddconfig.double_z=True is not a binary tokenizer (BitDance always uses double_z=false).")
    return {
        "in_channels": config_value(dd, "in_channels", int, source, default=3),
        "out_channels": config_value(dd, "out_ch", int, source, default=3),
        "ch": config_value(dd, "ch", int, source),
        "ch_mult": tuple(config_value(dd, "ch_mult", list, source)),
        "num_res_blocks": config_value(dd, "num_res_blocks", int, source),
        "z_channels": config_value(dd, "z_channels", int, source),
        "gan_decoder": config_value(ae_config, "gan_decoder", bool, source, default=False),
    }


def tokenizer_config_from_state_dict(state_dict: dict, source: str) -> dict:
    """`BitDanceTokenizer` config read off the tensor shapes of an ``encoder.*``/``decoder.*`` state dict.

    For files that carry no config, such as the ImageNet release's ``ae_d16c32.pt`` (the original hard-codes its
    architecture).
    """
    try:
        ch, in_channels = state_dict["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down.")})
        num_res_blocks = len({key.split(".")[4] for key in state_dict if key.startswith("encoder.down.0.block.")})
        ch_mult = [state_dict[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] // ch for level in levels]
        z_channels = state_dict["encoder.conv_out.weight"].shape[0]
        decoder_in = state_dict["decoder.conv_in.weight"].shape[1]
        out_channels = state_dict["decoder.conv_out.weight"].shape[0]
    except (KeyError, IndexError, ValueError) as error:
        raise ConversionError(
            f"{source} does not look like a BitDance binary tokenizer (missing or odd {error}); expected encoder.* and "
            "decoder.* tensors of the original VQModel."
        ) from error
    if levels != list(range(len(levels))) or not num_res_blocks:
        raise ConversionError(f"{source}: encoder levels {levels} with {num_res_blocks} blocks are not a BitDance encoder.")
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "ch": ch,
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": num_res_blocks,
        "z_channels": z_channels,
        "gan_decoder": decoder_in == 2 * z_channels,
    }


def default_config_path(weights_path: Path) -> Path:
    """The json beside the weights: ``<stem>_config.json``, else ``ae_config.json``."""
    for candidate in (weights_path.with_name(f"{weights_path.stem}_config.json"), weights_path.with_name("ae_config.json")):
        if candidate.exists():
            return candidate
    raise ConversionError(
        f"No tokenizer config beside {weights_path} (looked for {weights_path.stem}_config.json and ae_config.json); "
        "pass --config_path."
    )


def build_tokenizer(
    ae_config: dict, state_dict: dict, report: ConversionReport, source: str, dtype: torch.dtype | None = None
) -> BitDanceTokenizer:
    """Instantiate `BitDanceTokenizer` from an original config and load its (prefix-free) state dict strictly."""
    model = build_on_meta(BitDanceTokenizer, tokenizer_config_from_original(ae_config, source), source)
    return load_state_dict_strict(model, state_dict, report, source, dtype=dtype).eval()


def convert_tokenizer(checkpoint_path, dump_path, config_path=None, dtype: str = "keep", overwrite: bool = False):
    weights_path = require_file(checkpoint_path, "tokenizer weights")
    config_path = Path(config_path) if config_path else default_config_path(weights_path)
    sources = [weights_path, config_path]
    check_dump_path(dump_path, overwrite, sources)
    ae_config = read_json(config_path, "tokenizer config")
    report = ConversionReport()
    weights = load_safetensors(weights_path, "tokenizer weights")
    model = build_tokenizer(ae_config, weights, report, weights_path.name, DTYPES[dtype])
    report.log(weights_path.name)
    stored = dtype if dtype != "keep" else str(model.dtype).removeprefix("torch.")
    with atomic_output_dir(dump_path, overwrite, sources) as staging:
        model.save_pretrained(staging)
        card = tokenizer_model_card(Path(dump_path).name, weights_path.name, dict(model.config), stored)
        card.save(staging / "README.md")
    logger.info("Saved BitDanceTokenizer to %s", dump_path)
    return model


def main(argv=None):
    parser = base_parser("Convert an original BitDance binary tokenizer (config json + safetensors).")
    parser.add_argument("--config_path", help="Original config json (default: <stem>_config.json or ae_config.json beside the weights).")
    args = parser.parse_args(argv)
    with exit_on_conversion_error(parser):
        convert_tokenizer(args.checkpoint_path, args.dump_path, args.config_path, args.dtype, args.overwrite)


if __name__ == "__main__":
    main()
