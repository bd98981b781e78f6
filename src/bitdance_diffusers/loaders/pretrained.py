"""Strict loading of BitDance pipelines, and saving that keeps their model card.

`BitDancePretrainedMixin` wraps `DiffusionPipeline.from_pretrained` and `save_pretrained`:

* before loading a local folder: ``model_index.json`` and every component's config are readable JSON, every listed
  component folder exists, and the weight files of every model hold exactly the tensors (names and shapes) of the model
  its config describes. diffusers would otherwise leave a missing head tensor on the meta device ("Tensor on device
  meta" at the first call), and transformers would randomly initialise missing language-model layers, or, without a
  ``config.json``, build a default-sized Qwen3 model;
* after loading: no weight holds NaN or inf (such a model draws blank images without a word), and the folder's model
  card (``README.md``) is kept for `save_pretrained`.

``DiffusionPipeline.from_pretrained(folder)`` never calls a subclass's ``from_pretrained``: it instantiates the class
named in ``model_index.json`` and then records the folder with ``register_to_config(_name_or_path=...)``. That call is
where the checks after loading run, and where the weight files are checked if the subclass's ``from_pretrained`` did
not do it first.
"""

import contextvars
import importlib
import json
import os
import re
import sys
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from huggingface_hub import ModelCard, create_repo
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase


MODEL_CARD = "README.md"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
BITDANCE_PIPELINES = ("BitDancePipeline", "BitDanceImageNetPipeline")
# Folders whose weight files `BitDancePretrainedMixin.from_pretrained` checked before loading (the check after loading
# then skips them).
_checked_folders: contextvars.ContextVar[frozenset] = contextvars.ContextVar("checked_folders", default=frozenset())


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point ``tensor`` holds no NaN or inf (one pass, no tensor-sized temporary)."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
        return True
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return True  # quantized tensor subclasses keep their values in their own layout
    try:
        bounds = [torch.aminmax(tensor)]  # NaN propagates to both bounds, inf to one
    except (RuntimeError, NotImplementedError):  # dtypes without a min/max kernel (float8): float32 slices
        bounds = [torch.aminmax(chunk.float()) for chunk in tensor.reshape(-1).split(2**24)]
    return all(bool(torch.isfinite(low) and torch.isfinite(high)) for low, high in bounds)


def read_json_file(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing, unreadable or malformed file is an `OSError` naming it."""
    if not path.is_file():
        raise OSError(f"{path} is missing: the {what} cannot be loaded without it.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise OSError(
            f"It looks like the config file at '{path}' is not a valid JSON file ({error}); the {what} is damaged."
        ) from error
    if not isinstance(value, dict):
        raise OSError(f"The config file at '{path}' holds a JSON {type(value).__name__}, expected an object {{...}}.")
    return value


def _component_class(library: str, class_name: str):
    """The class of a ``model_index.json`` entry, if its library is loaded (diffusers imports no other module)."""
    module = sys.modules.get(library)
    if module is None and library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
    component_class = getattr(module, class_name, None)
    return component_class if isinstance(component_class, type) else None


def _components(index: dict) -> dict:
    """``{name: (library, class_name)}`` of the components a ``model_index.json`` lists (``[null, null]`` excluded)."""
    return {
        name: tuple(entry) for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
        and all(isinstance(part, str) for part in entry)
    }  # fmt: skip


def check_component_config(folder: Path, component_class: type, name: str) -> dict | None:
    """Read the config file(s) ``component_class`` loads from ``folder``; an `OSError` names a missing or bad one."""
    if issubclass(component_class, PreTrainedTokenizerBase):
        present = [folder / file for file in TOKENIZER_FILES if (folder / file).is_file()]
        if not present:
            raise OSError(f"{folder} holds neither {' nor '.join(TOKENIZER_FILES)}: the {name} cannot be loaded.")
        for path in present:
            read_json_file(path, name)
        return None
    if issubclass(component_class, ConfigMixin):
        return read_json_file(folder / component_class.config_name, name)
    if issubclass(component_class, PreTrainedModel):
        return read_json_file(folder / "config.json", name)
    return None


def _expected_tensors(folder: Path, model_class: type, config: dict) -> tuple[dict, torch.nn.Module]:
    """``{name: shape}`` of the model ``config`` describes, built on the meta device (no memory, no init)."""
    try:
        with torch.device("meta"):
            if issubclass(model_class, ModelMixin):
                model = model_class.from_config(model_class.load_config(folder))
            else:
                model = model_class(model_class.config_class.from_pretrained(folder))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(
            f"{folder / 'config.json'} does not describe a valid {model_class.__name__}: {error}"
        ) from error
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}, model


def weight_file_sets(folder: Path) -> dict[str, dict]:
    """``{description: {tensor name: shape}}`` of every set of safetensors weights in ``folder``: each sharded index
    with its shards, and each file no index names (variants are separate sets)."""
    sets, indexed = {}, set()
    for index in sorted(folder.glob("*.safetensors.index*.json")):
        weight_map = read_json_file(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise OSError(f"{index} has no weight_map; the weights index is damaged.")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise OSError(f"{index} names the shards {missing}, which are not in {folder}; the download is incomplete.")
        sets[index.name] = {key: shape for shard in shards for key, shape in _tensor_shapes(folder / shard).items()}
        indexed.update(shards)
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in indexed:
            sets[path.name] = _tensor_shapes(path)
    return sets


def _tensor_shapes(path: Path) -> dict:
    """Names and shapes from a safetensors header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own, OS and value errors for damaged files
        raise OSError(f"Cannot read {path} ({error}); the file is truncated or not a safetensors file.") from error


def check_component_weights(folder: Path, model_class: type, config: dict, name: str):
    """The weight files of ``folder`` must hold exactly the tensors (names and shapes) of ``model_class(config)``."""
    if "quantization_config" in config:
        return  # pre-quantized weights have their quantizer's layout, which it checks itself
    weight_sets = weight_file_sets(folder)
    if not weight_sets:
        if not any(folder.glob("*.bin")):
            raise OSError(f"{folder} holds no weights (*.safetensors) for the {name}; the folder is incomplete.")
        return  # pickled weights cannot be listed without unpickling them; their loader checks them
    expected, model = _expected_tensors(folder, model_class, config)
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for file, found in weight_sets.items():
        found = _strip_base_model_prefix(found, model)
        missing = [
            key for key in expected
            if key not in found and key not in tied and not any(re.search(p, key) for p in ignore_missing)
        ]  # fmt: skip
        unexpected = [
            key for key in found if key not in expected and not any(re.search(p, key) for p in ignore_unexpected)
        ]
        mismatched = [
            f"{key}: {list(found[key])} in the file, {list(expected[key])} in the model"
            for key in expected if key in found and found[key] != expected[key]
        ]  # fmt: skip
        problems = [
            f"{label} {items[:6]}{f' and {len(items) - 6} more' if len(items) > 6 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", mismatched))
            if items
        ]  # fmt: skip
        if problems:
            raise ValueError(
                f"{folder / file} does not match the {name} ({model_class.__name__}) its config describes: "
                f"{'; '.join(problems)}. The folder is incomplete or mixes different models; convert the original "
                "checkpoint again (conversion/convert_bitdance_*.py), or copy the folder again."
            )


def _strip_base_model_prefix(found: dict, model: torch.nn.Module) -> dict:
    """transformers loads a base model from a checkpoint of its task model (keys ``<prefix>.*``) by dropping the
    prefix; the comparison does the same."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not hasattr(model, prefix) and found and all(key.startswith(f"{prefix}.") for key in found):
        return {key.removeprefix(f"{prefix}."): shape for key, shape in found.items()}
    return found


def check_pipeline_folder(folder: Path, pipeline_class: type, passed: dict) -> set:
    """Check a local pipeline folder before loading; returns the component folders whose weights were checked.

    ``passed`` are the keyword arguments of ``from_pretrained``: components given there are not read from the folder.
    """
    index = read_json_file(folder / "model_index.json", "pipeline")
    saved_class = index.get("_class_name")
    own_classes = [base.__name__ for base in pipeline_class.__mro__]
    if saved_class in BITDANCE_PIPELINES and saved_class not in own_classes:
        raise ValueError(
            f"{folder} holds a {saved_class}, not a {pipeline_class.__name__}; load it with "
            f"{saved_class}.from_pretrained or DiffusionPipeline.from_pretrained."
        )
    components = {name: entry for name, entry in _components(index).items() if name not in passed}
    missing = [name for name in components if not (folder / name).is_dir()]
    if missing:
        raise ValueError(
            f"{folder} lists the components {missing} in model_index.json but has no such sub-folders; "
            "re-run the conversion or pass the missing components to from_pretrained."
        )
    checked = set()
    for name, (library, class_name) in components.items():
        component_class = _component_class(library, class_name)
        if component_class is None:
            continue  # diffusers names the library it cannot load
        config = check_component_config(folder / name, component_class, name)
        if config is not None and issubclass(component_class, torch.nn.Module):
            check_component_weights(folder / name, component_class, config, name)
            checked.add((folder / name).resolve())
    return checked


def _source_folder(component) -> Path | None:
    """The local folder a loaded model came from, as diffusers and transformers record it."""
    config = getattr(component, "config", None)
    path = getattr(config, "_name_or_path", None) if config is not None else None
    if path is None and isinstance(config, dict):
        path = config.get("_name_or_path")
    if isinstance(path, (str, os.PathLike)) and path and Path(path).is_dir():
        return Path(path)
    return None


def check_finite_weights(pipeline):
    """Raise if a loaded model of ``pipeline`` holds NaN or inf (tensors on the meta device, offloaded, are skipped)."""
    problems = []
    for name, component in pipeline.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = [*component.named_parameters(), *component.named_buffers()]
        bad = [key for key, tensor in tensors if not all_finite(tensor.detach())]
        if bad:
            where = _source_folder(component)
            problems.append(f"{name}{f' ({where})' if where else ''}: {bad[:6]}{' ...' if len(bad) > 6 else ''}")
            if component.dtype == torch.float16:
                problems[-1] += " (float16 overflows beyond ±65504: load with dtype=torch.bfloat16)"
    if problems:
        raise ValueError(
            f"NaN or inf weights in {'; '.join(problems)}. A model with them draws blank images; the weights are "
            "damaged: convert the original checkpoint again, or download the folder again."
        )


class BitDancePretrainedMixin:
    r"""
    Strict `from_pretrained` and model-card-keeping `save_pretrained` for BitDance pipelines (see the module docstring).

    A folder whose weights miss or add tensors, hold NaN or inf, or whose ``model_index.json`` or component configs are
    missing or damaged is refused with an error that names the file and the fix.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained`, after checking a local folder (configs, component folders, weights)."""
        folder = Path(pretrained_model_name_or_path)
        checked = check_pipeline_folder(folder, cls, kwargs) if folder.is_dir() else set()
        token = _checked_folders.set(_checked_folders.get() | checked)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            _checked_folders.reset(token)

    def register_to_config(self, **kwargs):
        super().register_to_config(**kwargs)
        if "_name_or_path" in kwargs:  # the end of DiffusionPipeline.from_pretrained (and of from_pipe)
            self._check_loaded_pipeline()

    def _check_loaded_pipeline(self):
        """Strict weight files for every model loaded from a local folder, finite weights, and the model card."""
        checked = _checked_folders.get()
        folders = []
        for name, component in self.components.items():
            folder = _source_folder(component) if isinstance(component, torch.nn.Module) else None
            if folder is None:
                continue
            folders.append(folder)
            if folder.resolve() not in checked:
                config = check_component_config(folder, type(component), name)
                check_component_weights(folder, type(component), config, name)
        check_finite_weights(self)
        card = next((folder.parent / MODEL_CARD for folder in folders if (folder.parent / MODEL_CARD).is_file()), None)
        self._model_card = ModelCard.load(card) if card is not None else None

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs):
        """`DiffusionPipeline.save_pretrained`; a pipeline loaded from a folder with a model card writes that card too
        (also when pushing to the Hub, where diffusers would otherwise write a blank one)."""
        card = getattr(self, "_model_card", None)
        if card is None:
            return super().save_pretrained(save_directory, *args, push_to_hub=push_to_hub, **kwargs)
        hub_options = {key: kwargs.pop(key) for key in ("commit_message", "private", "create_pr", "token", "repo_id")
                       if key in kwargs}  # fmt: skip
        super().save_pretrained(save_directory, *args, **kwargs)
        card.save(Path(save_directory) / MODEL_CARD)
        if push_to_hub:
            token = hub_options.get("token")
            repo_id = hub_options.get("repo_id", str(save_directory).split(os.path.sep)[-1])
            repo_id = create_repo(repo_id, exist_ok=True, private=hub_options.get("private"), token=token).repo_id
            self._upload_folder(save_directory, repo_id, token=token, commit_message=hub_options.get("commit_message"),
                                create_pr=hub_options.get("create_pr", False))  # fmt: skip
