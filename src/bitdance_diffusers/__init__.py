"""BitDance for Hugging Face diffusers.

Importing this package registers the BitDance pipelines with diffusers, so that
``diffusers.DiffusionPipeline.from_pretrained(folder)`` resolves them from a saved ``model_index.json`` without
``trust_remote_code`` or ``custom_pipeline``.

The import itself is light, like diffusers' own: the names below load on first use, and the registration runs as soon
as diffusers is imported (at once if it already is). ``bitdance --help`` therefore never loads torch.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Public name -> the submodule that defines it, imported on first access.
_import_structure = {
    "models": [
        "BitDanceDiffusionHead",
        "BitDanceImageNetTransformer",
        "BitDanceMLPHead",
        "BitDanceProjector",
        "BitDanceTokenizer",
    ],
    "pipelines": ["BitDanceImageNetPipeline", "BitDancePipeline"],
    "quantization": ["QUANTIZATION_SCHEMES", "pipeline_quantization_config", "quantize_model_"],
    "schedulers": ["BinaryFlowScheduler"],
}
# diffusers resolves a component's loader by looking these base-class names up in the module named in model_index.json.
_DIFFUSERS_BASE_CLASSES = ("ModelMixin", "SchedulerMixin")
_DEFINING_MODULE = {name: module for module, names in _import_structure.items() for name in names}

__all__ = [
    "BinaryFlowScheduler",
    "BitDanceDiffusionHead",
    "BitDanceImageNetPipeline",
    "BitDanceImageNetTransformer",
    "BitDanceMLPHead",
    "BitDancePipeline",
    "BitDanceProjector",
    "BitDanceTokenizer",
    "QUANTIZATION_SCHEMES",
    "pipeline_quantization_config",
    "quantize_model_",
]

if TYPE_CHECKING:
    from diffusers import ModelMixin, SchedulerMixin  # noqa: F401

    from .models import (
        BitDanceDiffusionHead,
        BitDanceImageNetTransformer,
        BitDanceMLPHead,
        BitDanceProjector,
        BitDanceTokenizer,
    )
    from .pipelines import BitDanceImageNetPipeline, BitDancePipeline
    from .quantization import QUANTIZATION_SCHEMES, pipeline_quantization_config, quantize_model_
    from .schedulers import BinaryFlowScheduler


def __getattr__(name: str):
    if name in _DEFINING_MODULE:
        value = getattr(importlib.import_module(f".{_DEFINING_MODULE[name]}", __name__), name)
    elif name in _DIFFUSERS_BASE_CLASSES:
        value = getattr(importlib.import_module("diffusers"), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule (``bitdance_diffusers.cli``, ...)
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_pipelines_with_diffusers():
    """``DiffusionPipeline.from_pretrained`` looks the model_index.json ``_class_name`` up on the diffusers module, and
    loads components only from modules already imported: the models and schedulers that model_index.json names.
    ``AutoModel.from_pretrained`` looks a component's config ``_class_name`` up on the diffusers module too, so the
    models are registered there as well."""
    import diffusers

    from . import models, schedulers
    from .pipelines import BitDanceImageNetPipeline, BitDancePipeline

    classes = (
        BitDancePipeline, BitDanceImageNetPipeline, schedulers.BinaryFlowScheduler, models.BitDanceTokenizer,
        models.BitDanceDiffusionHead, models.BitDanceMLPHead, models.BitDanceProjector, models.BitDanceImageNetTransformer,
    )  # fmt: skip
    for registered_class in classes:
        if not hasattr(diffusers, registered_class.__name__):
            setattr(diffusers, registered_class.__name__, registered_class)


class _RegisterWhenDiffusersIsImported(importlib.abc.MetaPathFinder):
    """Registers the pipelines once diffusers is imported and no import of this package's modules is under way.

    diffusers is often imported from inside one of our modules (``models`` imports ``diffusers.ModelMixin``); the
    pipelines import those modules back, so the registration waits until the outermost import has finished. The finder
    only wraps the loaders of diffusers and of our submodules to hear when they finish, and leaves ``sys.meta_path``
    once the registration is done.
    """

    def __init__(self):
        self.imports_running = 0
        self.registering = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffusers" and not fullname.startswith(f"{__name__}."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderReportingTo(self, spec.loader)
        return spec

    def import_finished(self):
        if self.imports_running or self.registering or "diffusers" not in sys.modules:
            return
        self.registering = True
        try:
            _register_pipelines_with_diffusers()
        finally:
            self.registering = False
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _LoaderReportingTo(importlib.abc.Loader):
    """Runs a module with its own ``loader`` and tells ``hook`` when it has finished; then steps aside."""

    def __init__(self, hook: _RegisterWhenDiffusersIsImported, loader):
        self.hook, self.loader = hook, loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.hook.imports_running += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.hook.imports_running -= 1
        self.hook.import_finished()

    def __getattr__(self, name):
        return getattr(self.loader, name)


if "diffusers" in sys.modules:
    _register_pipelines_with_diffusers()
else:
    sys.meta_path.insert(0, _RegisterWhenDiffusersIsImported())
