"""Crash-consistent training checkpoints and results in ``output_dir``.

A checkpoint is written to a hidden staging folder (``.checkpoint-<step>.partial``) and renamed to
``checkpoint-<step>`` only once complete, its ``training_state.json`` written last: a run killed while saving leaves
no ``checkpoint-*`` folder behind, only a staging folder that the next run removes. Resuming takes the newest
complete checkpoint; folders that are not ours (``checkpoint-best``, a ``checkpoint-<n>`` without
``training_state.json``) are left alone and never picked. Results (the saved pipeline, model or LoRA file) are
written the same way, so a folder such as ``output_dir/final`` is either the previous result or the new one.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "training_state.json"
STAGING_PATTERN = re.compile(r"\.(.+)\.(partial|replaced)")


def is_complete_checkpoint(folder: Path) -> bool:
    return CHECKPOINT_PATTERN.fullmatch(folder.name) is not None and (folder / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [folder for folder in output_dir.iterdir() if folder.is_dir() and is_complete_checkpoint(folder)]
    return sorted(folders, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(CHECKPOINT_PATTERN.fullmatch(folder.name).group(1))


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: the newest complete one for ``"latest"`` (``None`` when there is none yet),
    a given checkpoint folder, or ``None`` for a fresh run, which is refused if ``output_dir`` already holds
    checkpoints (it would mix two runs)."""
    existing = list_checkpoints(output_dir)
    if resume_from_checkpoint is None:
        if existing:
            raise FileExistsError(
                f"{output_dir} already holds checkpoints of a run (the newest: {existing[-1].name}); pass "
                "resume_from_checkpoint='latest' (--resume_from_checkpoint latest) to continue it, or choose another "
                "output folder."
            )
        return None
    if resume_from_checkpoint == "latest":
        return existing[-1] if existing else None
    folder = Path(resume_from_checkpoint)
    if not folder.is_dir():
        folder = Path(output_dir) / resume_from_checkpoint
    if not is_complete_checkpoint(folder):
        raise FileNotFoundError(
            f"{resume_from_checkpoint} is not a complete checkpoint (a checkpoint-<step> folder with {STATE_FILE}); "
            f"complete checkpoints in {output_dir}: {[folder.name for folder in existing] or 'none'}."
        )
    return folder


def read_training_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def remove_stale_staging(output_dir: str | Path):
    """Delete the staging folders that killed runs left in ``output_dir`` (only names this module writes)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for folder in output_dir.iterdir():
        if folder.is_dir() and STAGING_PATTERN.fullmatch(folder.name):
            shutil.rmtree(folder)


def staging_folder(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def commit_folder(staging: Path, target: Path):
    """Replace ``target`` by the complete ``staging`` folder: a kill at any point leaves ``target`` whole (the old or
    the new one) or, between the two renames, only in ``.<name>.replaced`` with the new one still staged."""
    _fsync_tree(staging)
    replaced = target.parent / f".{target.name}.replaced"
    if target.exists():
        os.replace(target, replaced)
    os.replace(staging, target)
    _fsync(target.parent)
    if replaced.exists():
        shutil.rmtree(replaced)


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path):
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def write_result(target: Path, write, is_main_process: bool = True):
    """Call ``write(staging_folder)`` on the main process and move the result to ``target`` once complete."""
    if not is_main_process:
        return
    staging = staging_folder(target)
    if staging.exists():
        shutil.rmtree(staging)
    write(staging)
    commit_folder(staging, target)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None):
    """Keep the ``total_limit`` newest complete checkpoints (all of them for ``None``)."""
    if total_limit is None:
        return
    for folder in list_checkpoints(output_dir)[: -total_limit or None]:
        shutil.rmtree(folder)


def save_ema(shadow: dict[str, torch.Tensor], folder: Path):
    """Write EMA weights (plain or FSDP-sharded tensors, by parameter name) with torch.distributed.checkpoint: each
    process writes its shards, and a later run may load them over another number of processes."""
    import torch.distributed.checkpoint as dcp

    dcp.save(shadow, checkpoint_id=str(folder), no_dist=not dist.is_initialized())


def load_ema(shadow: dict[str, torch.Tensor], folder: Path):
    """Read the EMA weights saved by `save_ema` into the tensors of ``shadow``, in place."""
    import torch.distributed.checkpoint as dcp

    dcp.load(shadow, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
