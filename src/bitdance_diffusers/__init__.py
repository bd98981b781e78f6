"""BitDance for Hugging Face diffusers.

Importing this package registers the BitDance pipelines with diffusers, so that
``diffusers.DiffusionPipeline.from_pretrained(folder)`` resolves them from a saved ``model_index.json`` without
``trust_remote_code`` or ``custom_pipeline``.
"""

import diffusers as _diffusers

# diffusers resolves a component's loader by looking these base-class names up in the module named in model_index.json.
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


__version__ = "0.1.0"

for _pipeline_class in (BitDancePipeline, BitDanceImageNetPipeline):
    # DiffusionPipeline.from_pretrained looks the model_index.json `_class_name` up on the diffusers module.
    if not hasattr(_diffusers, _pipeline_class.__name__):
        setattr(_diffusers, _pipeline_class.__name__, _pipeline_class)

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
