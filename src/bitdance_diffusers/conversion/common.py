"""What every converter shares: the CLI convention, its error type, checked reads and strict state-dict accounting."""

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..loaders.pretrained import all_finite, read_json_file


logger = logging.getLogger("bitdance_diffusers.conversion")

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConversionError(ValueError):
    """A source checkpoint cannot be converted as asked (missing or unreadable file, unknown key, shape or dtype
    mismatch, non-finite values, unusable argument, unwritable output)."""


def base_parser(description: str) -> argparse.ArgumentParser:
    """The CLI every converter shares: ``--checkpoint_path SRC --dump_path DST [--dtype] [--overwrite]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint_path", required=True, help="Original checkpoint (file, folder or Hub repo id).")
    parser.add_argument("--dump_path", required=True, help="Output folder in diffusers format.")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="keep", help="Store weights in this dtype (default: as in the source)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing --dump_path that an earlier conversion wrote."
    )
    return parser


@contextlib.contextmanager
def exit_on_conversion_error(parser: argparse.ArgumentParser):
    """Inside a converter's ``main``: end a failed conversion with its message and exit status 2, not a traceback
    (the message names the problem and the fix; nothing was written to ``--dump_path``)."""
    try:
        yield
    # OSError: a file-system problem no read or write site expected (a file vanishing while it is read).
    except (ConversionError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"The {what} must be a file, but {path} is a folder.")
    if not path.is_file():
        raise ConversionError(f"Missing {what}: {path} does not exist. Point --checkpoint_path at the original release.")
    return path


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in the file ``path`` (the ``what`` of the release); any problem is a `ConversionError`."""
    path = require_file(path, what)
    try:
        return read_json_file(path, what)
    except OSError as error:
        raise ConversionError(f"{error} Copy it again from the original release.") from error


def config_value(config: dict, key: str, kind: type, source: str, default=None, positive: bool = True):
    """``config[key]`` checked to be a ``kind`` (``int``, ``float``, ``bool`` or ``list`` of positive ints)."""
    if key not in config:
        if default is None:
            raise ConversionError(f"{source} lacks {key!r} (keys: {sorted(config)}).")
        return default
    value = config[key]
    if kind is list:
        valid = isinstance(value, list) and value and all(type(v) is int and v > 0 for v in value)
        expected = "a non-empty list of positive integers"
    elif kind is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    elif kind is bool:
        valid, expected = isinstance(value, bool), "true or false"
    else:
        valid = type(value) is int and (value > 0 or not positive)
        expected = "a positive integer" if positive else "an integer"
    if not valid:
        raise ConversionError(f"{source}: {key!r} must be {expected}, got {value!r}.")
    return value


def read_safetensors(path: Path, what: str):
    """Yield ``(key, tensor)`` of a safetensors file, one tensor at a time; a damaged file is a `ConversionError`."""
    path = require_file(path, what)
    problem = (
        f"Cannot read the {what} {path}: {{}}. The file is truncated, corrupt or not a safetensors file: copy it again."
    )
    try:
        handle = safe_open(str(path), framework="pt")
        keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own, OS and value errors for damaged files
        raise ConversionError(problem.format(error)) from error
    for key in keys:
        try:
            tensor = handle.get_tensor(key)
        except Exception as error:
            raise ConversionError(problem.format(f"tensor {key!r}: {error}")) from error
        yield key, tensor


def load_safetensors(path: Path, what: str = "weights") -> dict:
    return dict(read_safetensors(path, what))


def build_on_meta(model_class: type, config: dict, source: str) -> torch.nn.Module:
    """``model_class(**config)`` on the meta device (no memory); a config that builds no model is a
    `ConversionError`."""
    try:
        with torch.device("meta"):
            return model_class(**config)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as error:
        raise ConversionError(
            f"{source}: the config {config} does not build a {model_class.__name__}: {error}"
        ) from error


def check_finite(name: str, tensor: torch.Tensor, source_dtype: torch.dtype, non_finite: list):
    """Append ``name`` to ``non_finite`` (with a note if a cast made it so) when ``tensor`` holds NaN or inf."""
    if not all_finite(tensor):
        non_finite.append(name if tensor.dtype == source_dtype else f"{name} (after the cast to {tensor.dtype})")


def raise_if_non_finite(source: str, non_finite: list):
    if non_finite:
        cast = any("after the cast" in name for name in non_finite)
        raise ConversionError(
            f"{source}: {len(non_finite)} tensor(s) hold NaN or inf values: {non_finite[:8]}"
            f"{' ...' if len(non_finite) > 8 else ''}. "
            + (
                "Their values do not fit the --dtype chosen: use --dtype bf16, fp32 or keep."
                if cast
                else "A model with them draws blank images; the checkpoint is damaged: download it again."
            )
        )


@dataclass
class ConversionReport:
    """Every source tensor ends up in ``mapped`` (source -> target) or ``dropped`` (source -> reason)."""

    mapped: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)

    def drop(self, key: str, reason: str):
        self.dropped[key] = reason

    def log(self, name: str):
        logger.info("%s: %d tensors mapped, %d dropped", name, len(self.mapped), len(self.dropped))
        for key, reason in self.dropped.items():
            logger.info("  dropped %s: %s", key, reason)


def load_state_dict_strict(
    model: torch.nn.Module,
    state_dict: dict,
    report: ConversionReport,
    source: str,
    key_map=lambda key: key,
    dtype: torch.dtype | None = None,
):
    """Copy ``state_dict`` into ``model`` after mapping each key; any unknown, missing, mis-shaped or non-finite tensor
    is an error.

    ``key_map(source_key)`` returns the target parameter name. Float tensors are cast to ``dtype`` when given, otherwise
    the model takes the source dtype (``assign``), as the original loader does.
    """
    targets = dict(model.state_dict())
    converted, non_finite = {}, []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(
                f"{source}: {key!r} is a {type(tensor).__name__}, not a tensor; is this a checkpoint?"
            )
        target = key_map(key)
        if target not in targets:
            raise ConversionError(f"{source}: unexpected tensor {key!r} (no target {target!r} in {type(model).__name__}).")
        if tuple(tensor.shape) != tuple(targets[target].shape):
            raise ConversionError(
                f"{source}: {key!r} has shape {tuple(tensor.shape)} but {type(model).__name__}.{target} expects "
                f"{tuple(targets[target].shape)}; the checkpoint does not match its config."
            )
        if not tensor.is_floating_point():
            raise ConversionError(f"{source}: {key!r} has dtype {tensor.dtype}, expected a floating point tensor.")
        converted[target] = tensor.to(dtype) if dtype is not None else tensor
        check_finite(key, converted[target], tensor.dtype, non_finite)
        report.mapped[f"{source}:{key}"] = target
    raise_if_non_finite(source, non_finite)
    missing = sorted(set(targets) - set(converted))
    if missing:
        raise ConversionError(f"{source}: missing tensors for {type(model).__name__}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(converted, strict=True, assign=True)
    return model
