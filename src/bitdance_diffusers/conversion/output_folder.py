"""The folder a converter writes: checked before any work, written beside it and renamed into place when complete.

A conversion writes into the hidden staging folder ``.<name>.partial-<id>`` next to ``--dump_path`` and renames it to
``--dump_path`` only once everything is written. ``--overwrite`` first renames the previous output to
``.<name>.replaced-<id>`` and deletes it after the swap. The hidden file ``.<name>.owner-<id>`` records the owner (pid,
host, start time) and stays locked (``flock``) while the conversion runs; the kernel drops the lock when the process
dies, however it dies. The next conversion to the same ``--dump_path`` therefore knows which leftovers are stale: it
puts back a previous output that a killed run had moved aside, deletes stale staging folders, and leaves the folders of
a conversion that is still running alone.

``--overwrite`` replaces only what a conversion wrote (`converted_folder_problem`), never the source checkpoint, a
folder holding it or lying inside it, the working folder, the home folder or the root, and never a file.
"""

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from safetensors import SafetensorError

from .common import ConversionError


logger = logging.getLogger("bitdance_diffusers.conversion")

PIPELINE_CLASSES = ("BitDancePipeline", "BitDanceImageNetPipeline")
MODEL_CLASSES = (
    "BitDanceTokenizer", "BitDanceDiffusionHead", "BitDanceMLPHead", "BitDanceProjector", "BitDanceImageNetTransformer"
)  # fmt: skip
# What diffusers, transformers and the tokenizers write into a component folder.
COMPONENT_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model")
MODEL_CARD = "README.md"


def converted_folder_problem(folder: Path) -> str | None:
    """``None`` if ``folder`` is empty or holds exactly what a BitDance conversion writes, else what is foreign in it.

    A pipeline folder: ``model_index.json`` of a BitDance pipeline, the component sub-folders it lists (model, config
    and tokenizer files only) and the model card. A single-model folder (the tokenizer converter's output):
    ``config.json`` of a BitDance model, its weights and the model card. Folders converted before the model cards
    existed are recognised by the same layout.
    """
    entries = {entry.name: entry for entry in folder.iterdir()}
    if not entries:
        return None
    if "model_index.json" in entries:
        index = _read_json_object(entries["model_index.json"])
        if index is None or index.get("_class_name") not in PIPELINE_CLASSES:
            return "its model_index.json is not that of a BitDance pipeline"
        components = {name for name, value in index.items() if isinstance(value, list) and len(value) == 2}
        allowed = components | {"model_index.json", MODEL_CARD}
        foreign = [name for name in sorted(entries) if name not in allowed]
        foreign += [
            f"{name}/{entry.name}"
            for name in sorted(components & set(entries)) for entry in _component_entries(entries[name])
            if entry.is_dir() or entry.is_symlink() or not entry.name.endswith(COMPONENT_FILE_SUFFIXES)
        ]  # fmt: skip
    elif "config.json" in entries:
        config = _read_json_object(entries["config.json"])
        if config is None or config.get("_class_name") not in MODEL_CLASSES:
            return "its config.json is not that of a BitDance model"
        foreign = [
            name for name, entry in sorted(entries.items())
            if entry.is_dir() or entry.is_symlink()
            or not (name in ("config.json", MODEL_CARD) or name.startswith("diffusion_pytorch_model"))
        ]  # fmt: skip
    else:
        return "it has neither the model_index.json of a pipeline nor the config.json of a model"
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"it holds files no conversion writes: {shown}"
    return None


def _component_entries(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else [folder]


def _read_json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _protected_folders() -> list[Path]:
    """Folders no conversion may replace: the working folder, the home folder, and everything above them."""
    protected = []
    for folder in (Path.cwd(), Path.home()):
        folder = folder.resolve()
        protected += [folder, *folder.parents]
    return protected


def check_dump_path(dump_path: str | os.PathLike, overwrite: bool = False, sources=()) -> Path:
    """Refuse an output path that a conversion must not write to; returns it absolute.

    ``sources`` are the files and folders the conversion reads (``--checkpoint_path``, a separate tokenizer or config
    file): the output may not equal, hold or lie inside any of them.
    """
    dump_path = Path(dump_path).absolute()
    resolved = dump_path.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise ConversionError(
                f"--dump_path {dump_path} {'is' if resolved == source else 'holds'} the source {source}; writing there "
                "would destroy the checkpoint being converted. Choose a --dump_path outside it."
            )
        if source.is_dir() and source in resolved.parents:
            raise ConversionError(
                f"--dump_path {dump_path} lies inside the source folder {source}; write the converted model outside "
                "the original release (e.g. beside it)."
            )
    if dump_path.is_symlink():
        raise ConversionError(
            f"--dump_path {dump_path} is a symbolic link; pass the folder it points to, or a new path."
        )
    if not dump_path.exists():
        ancestor = next(folder for folder in dump_path.parents if folder.exists())
        if not ancestor.is_dir():
            raise ConversionError(f"Cannot create --dump_path {dump_path}: {ancestor} is a file, not a folder.")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConversionError(
                f"Cannot create --dump_path {dump_path}: no permission to write in {ancestor}; choose a writable one."
            )
        return dump_path
    if not dump_path.is_dir():
        raise ConversionError(
            f"--dump_path {dump_path} is a file, not a folder; a conversion writes a folder. Choose a new path (it is "
            "never replaced, even with --overwrite)."
        )
    if resolved in _protected_folders():
        raise ConversionError(
            f"--dump_path {dump_path} is the working folder, the home folder or one above them; a conversion never "
            "replaces it. Pass a new sub-folder, e.g. --dump_path ./BitDance-diffusers."
        )
    problem = converted_folder_problem(dump_path)
    if problem is not None:
        raise ConversionError(
            f"--dump_path {dump_path} exists and was not written by a BitDance conversion ({problem}); --overwrite "
            "only replaces converted folders. Choose a new --dump_path, or move that folder away yourself."
        )
    if any(dump_path.iterdir()) and not overwrite:
        raise ConversionError(f"{dump_path} already holds a converted model; pass --overwrite to replace it.")
    return dump_path


def _lock(handle) -> bool:
    """Take the exclusive lock of an owner file; ``False`` if a running conversion holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def recover_interrupted_conversions(dump_path: Path):
    """Undo what killed conversions to ``dump_path`` left behind; refuse while another one is writing it.

    A previous output that a killed ``--overwrite`` had moved aside is put back if nothing replaced it; staging folders
    and the moved-aside copies of replaced outputs are deleted.
    """
    parent, name = dump_path.parent, dump_path.name
    if not parent.is_dir():
        return
    for owner in _hidden_entries(parent, name, "owner"):
        transaction = owner.name.removeprefix(f".{name}.owner-")
        try:
            handle = open(owner, "r+")
        except FileNotFoundError:  # its conversion just finished
            continue
        with handle:
            if not _lock(handle):
                raise ConversionError(
                    f"Another conversion is writing {dump_path} right now ({handle.read().strip()}); wait for it to "
                    "finish or choose another --dump_path."
                )
            staging, replaced = parent / f".{name}.partial-{transaction}", parent / f".{name}.replaced-{transaction}"
            if replaced.exists():
                if os.path.lexists(dump_path):
                    shutil.rmtree(replaced)
                else:
                    replaced.rename(dump_path)
                    logger.warning("Restored %s, which an interrupted conversion was replacing.", dump_path)
            if staging.exists():
                shutil.rmtree(staging)
                logger.warning("Removed %s, left by an interrupted conversion.", staging)
            owner.unlink()
    # Working folders without an owner file come from converters that did not record one (or from a deletion that
    # failed); nothing tells whether their conversion still runs, so they are only named.
    for kind in ("partial", "replaced", "old"):
        for leftover in _hidden_entries(parent, name, kind):
            transaction = leftover.name.removeprefix(f".{name}.{kind}-")
            if leftover.exists() and not (parent / f".{name}.owner-{transaction}").exists():
                logger.warning(
                    "%s was left by an earlier conversion that recorded no owner (about %d MB); delete it once no "
                    "conversion to %s is running.", leftover, _size(leftover) // 2**20, dump_path
                )  # fmt: skip


def _hidden_entries(parent: Path, name: str, kind: str) -> list[Path]:
    """The hidden ``.<name>.<kind>-<id>`` working entries of conversions to ``parent / name``."""
    return sorted(entry for entry in parent.iterdir() if entry.name.startswith(f".{name}.{kind}-"))


def _size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file()) if path.is_dir() else 0


@contextlib.contextmanager
def _owner_file(dump_path: Path):
    """Create and lock ``.<name>.owner-<id>`` beside ``dump_path`` for the duration; yields ``<id>``."""
    transaction = f"{os.getpid()}-{secrets.token_hex(4)}"
    owner = dump_path.with_name(f".{dump_path.name}.owner-{transaction}")
    handle = open(owner, "x")
    try:
        _lock(handle)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield transaction
    finally:
        owner.unlink(missing_ok=True)
        handle.close()


@contextlib.contextmanager
def atomic_output_dir(dump_path: str | os.PathLike, overwrite: bool = False, sources=()):
    """Yield an empty staging folder beside ``dump_path``; rename it to ``dump_path`` only if the block completes.

    On any error, a kill included, ``dump_path`` keeps what it held before; the next conversion cleans up what a kill
    left (see the module docstring). Folders get the permissions of the user's umask. A failed write (no space left, no
    permission) ends as a `ConversionError` naming the path.
    """
    dump_path = check_dump_path(dump_path, overwrite, sources)
    try:
        dump_path.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_conversions(dump_path)
        dump_path = check_dump_path(dump_path, overwrite, sources)  # a recovery may have put the previous output back
        with _owner_file(dump_path) as transaction:
            staging = dump_path.with_name(f".{dump_path.name}.partial-{transaction}")
            staging.mkdir()
            try:
                yield staging
                dump_path = check_dump_path(dump_path, overwrite, sources)  # it may have appeared meanwhile
                if dump_path.exists():
                    replaced = dump_path.with_name(f".{dump_path.name}.replaced-{transaction}")
                    dump_path.rename(replaced)
                    staging.rename(dump_path)
                    shutil.rmtree(replaced, ignore_errors=True)  # the conversion is complete: a leftover is only named
                else:
                    staging.rename(dump_path)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
    except (OSError, SafetensorError) as error:
        filename = getattr(error, "filename", None)
        if filename is not None and not _is_output(Path(filename).absolute(), dump_path):
            raise ConversionError(f"Cannot read {filename}: {error.strerror or error}.") from error
        raise ConversionError(
            f"Cannot write {dump_path} ({error}); nothing was written there. Choose a --dump_path in a writable folder "
            "with enough free space."
        ) from error


def _is_output(path: Path, dump_path: Path) -> bool:
    """Whether ``path`` is ``dump_path``, its parent, or lies in it or in one of its hidden working folders."""
    prefix = f".{dump_path.name}."
    return any(
        folder == dump_path
        or folder == dump_path.parent
        or (folder.parent == dump_path.parent and folder.name.startswith(prefix))
        for folder in (path, *path.parents)
    )
