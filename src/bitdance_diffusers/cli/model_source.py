"""Which pipeline `bitdance generate` loads, checked before torch or diffusers is imported.

``--model`` is a local folder or a Hugging Face Hub id. Either must hold a ``model_index.json`` whose ``_class_name``
is a BitDance pipeline. For a Hub id, `resolve_model` fetches that file alone (from the Hugging Face cache, offline
with ``HF_HUB_OFFLINE=1``), and `model_folder` downloads the components' folders once every other check has passed.
Without ``--model``: the shapes model shipped with the package, else a tiny randomly initialised pipeline built in
memory.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .arguments import UsageError


TEXT_TO_IMAGE = "BitDancePipeline"
CLASS_CONDITIONAL = "BitDanceImageNetPipeline"


@dataclass(frozen=True)
class ModelSource:
    """A pipeline to load: its local ``folder`` (``None`` for the tiny random pipeline, and for a Hub repository
    ``repo_id`` not downloaded yet), its pipeline class name, the image sizes its ``model_index.json`` lists (``None``
    when it lists none) and the names of its components."""

    folder: Path | None
    class_name: str
    image_sizes: list[list[int]] | None = None
    shipped: bool = False
    repo_id: str | None = None
    components: tuple[str, ...] = ()

    @property
    def class_conditional(self) -> bool:
        return self.class_name == CLASS_CONDITIONAL


def resolve_model(model: str | None) -> ModelSource:
    """The `ModelSource` of ``--model`` (a folder or Hub id), or of the package's default without one.

    Raises:
        UsageError: no such folder or cached Hub repository, no ``model_index.json``, not a BitDance pipeline.
    """
    if model is None:
        from .. import pretrained

        folder = pretrained.DEMO_MODEL_PATH
        if (folder / "model_index.json").is_file():
            return _source(read_model_index(folder / "model_index.json", "the shipped shapes model"), folder,
                           "the shipped shapes model", shipped=True)  # fmt: skip
        return ModelSource(folder=None, class_name=TEXT_TO_IMAGE, image_sizes=[[256, 256]])
    label = f"--model {model}"
    if os.path.exists(model):
        if not os.path.isdir(model):
            raise UsageError(f"{label} is a file; pass the pipeline folder that holds model_index.json.")
        return _source(read_model_index(Path(model) / "model_index.json", label), Path(model), label)
    if not is_hub_id(model):
        raise UsageError(f"{label}: no such folder; pass a folder written by `bitdance convert` or a Hub id.")
    index_path = Path(_from_hub(model, "hf_hub_download", filename="model_index.json"))
    return _source(read_model_index(index_path, label), None, label, repo_id=model)


def model_folder(source: ModelSource) -> Path | None:
    """The local folder of ``source``: for a Hub repository, its cached snapshot after downloading the files of its
    model_index.json and components (only those: a repository may hold other files, e.g. the original checkpoints)."""
    if source.repo_id is None:
        return source.folder
    patterns = ["model_index.json", *(f"{name}/*" for name in source.components)]
    return Path(_from_hub(source.repo_id, "snapshot_download", allow_patterns=patterns))


def _source(index: dict, folder: Path | None, label: str, shipped: bool = False, repo_id: str | None = None):
    class_name = index.get("_class_name")
    if class_name not in (TEXT_TO_IMAGE, CLASS_CONDITIONAL):
        raise UsageError(
            f"{label} holds a {class_name or 'unnamed'} pipeline, not a BitDance one (model_index.json's _class_name "
            f"must be {TEXT_TO_IMAGE} or {CLASS_CONDITIONAL}); pass a folder written by `bitdance convert`."
        )
    components = tuple(
        name for name, entry in index.items() if isinstance(entry, list) and len(entry) == 2 and entry[0]
    )
    return ModelSource(folder=folder, class_name=class_name, image_sizes=index.get("image_sizes"), shipped=shipped,
                       repo_id=repo_id, components=components)  # fmt: skip


def read_model_index(path: Path, label: str) -> dict:
    """The parsed ``model_index.json`` at ``path``; `UsageError` naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise UsageError(
            f"{label} has no model_index.json, so it is not a diffusers pipeline folder; pass a folder written by "
            "`bitdance convert` (or by a BitDance pipeline's save_pretrained)."
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"Cannot read {path} ({error}); re-convert or re-download the pipeline.") from None
    if not isinstance(index, dict):
        raise UsageError(f"{path} is not a diffusers model index (a JSON object); re-convert the pipeline.")
    return index


def is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.endswith((".json", ".safetensors", ".bin", ".pt", ".ckpt")):
        return False  # a missing file, not a repository
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _from_hub(repo_id: str, function_name: str, **kwargs) -> str:
    """``huggingface_hub.<function_name>(repo_id, **kwargs)``, its failures turned into `UsageError`s with the fix."""
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return getattr(huggingface_hub, function_name)(repo_id, **kwargs)
    except LocalEntryNotFoundError:
        raise UsageError(
            f"--model {repo_id} is neither a folder here nor a Hub repository in the Hugging Face cache, and the Hub "
            f"cannot be reached (offline, or HF_HUB_OFFLINE=1); download it where the Hub is reachable (hf download "
            f"{repo_id}), or pass a local pipeline folder."
        ) from None
    except EntryNotFoundError:  # the one file asked for by name
        raise UsageError(
            f"--model {repo_id} has no model_index.json, so it is not a diffusers pipeline; pass a BitDance pipeline "
            "repository or folder."
        ) from None
    except GatedRepoError:
        raise UsageError(
            f"--model {repo_id} is a gated Hub repository; accept its terms on huggingface.co and log in "
            "(hf auth login)."
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"--model {repo_id} is neither a folder here nor a Hub repository you can access; check the name (or log "
            "in with hf auth login for a private one)."
        ) from None
    except RevisionNotFoundError as error:
        raise UsageError(f"--model {repo_id}: {error}") from None
    except (HfHubHTTPError, OSError) as error:
        raise UsageError(f"Cannot download --model {repo_id} ({error}); check the network or the name.") from None
