"""What every converter shares: atomic output folders, strict state-dict accounting and the CLI convention."""

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch


logger = logging.getLogger("bitdance_diffusers.conversion")

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConversionError(ValueError):
    """A source checkpoint cannot be converted as asked (missing file, unknown key, shape or dtype mismatch)."""


def base_parser(description: str) -> argparse.ArgumentParser:
    """The CLI every converter shares: ``--checkpoint_path SRC --dump_path DST [--dtype] [--overwrite]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint_path", required=True, help="Original checkpoint (file, folder or Hub repo id).")
    parser.add_argument("--dump_path", required=True, help="Output folder in diffusers format.")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="keep", help="Store weights in this dtype (default: as in the source)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --dump_path.")
    return parser


@contextlib.contextmanager
def exit_on_conversion_error(parser: argparse.ArgumentParser):
    """Inside a converter's ``main``: end a failed conversion with its message and exit status 2, not a traceback
    (the message names the problem and the fix; nothing was written to ``--dump_path``)."""
    try:
        yield
    except ConversionError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Missing {what}: {path} does not exist. Point --checkpoint_path at the original release.")
    return path


@contextlib.contextmanager
def atomic_output_dir(dump_path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``dump_path``; move it into place only if the block finishes without error."""
    dump_path = Path(dump_path).absolute()
    if dump_path.exists() and not overwrite:
        raise ConversionError(f"{dump_path} already exists; pass --overwrite to replace it.")
    dump_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dump_path.name}.partial-", dir=dump_path.parent))
    try:
        yield staging
        if dump_path.exists():
            backup = dump_path.with_name(f".{dump_path.name}.old-{os.getpid()}")
            dump_path.rename(backup)
            staging.rename(dump_path)
            shutil.rmtree(backup)
        else:
            staging.rename(dump_path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


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
    """Copy ``state_dict`` into ``model`` after mapping each key; any unknown, missing or mis-shaped key is an error.

    ``key_map(source_key)`` returns the target parameter name. Float tensors are cast to ``dtype`` when given, otherwise
    the model takes the source dtype (``assign``), as the original loader does.
    """
    targets = dict(model.state_dict())
    converted = {}
    for key, tensor in state_dict.items():
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
        report.mapped[f"{source}:{key}"] = target
    missing = sorted(set(targets) - set(converted))
    if missing:
        raise ConversionError(f"{source}: missing tensors for {type(model).__name__}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(converted, strict=True, assign=True)
    return model
