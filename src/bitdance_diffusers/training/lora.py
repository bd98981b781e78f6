"""LoRA fine-tuning of a text-to-image BitDance: adapters on the language model and the head, base weights frozen.

The adapters go on every linear layer of the language model's attention and MLP and of the head's blocks; the
projector, the embeddings, the norms and the tokenizer stay as they are. The result is a diffusers LoRA file that
`BitDancePipeline.load_lora_weights` reads back.
"""

from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params

from ..loaders.lora import adapter_state_and_config, add_lora_adapter, require_peft
from ..pipelines.pipeline_bitdance import BitDancePipeline


LORA_TARGET_MODULES = {
    "language_model": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "diffusion_head": ["wqkv", "wo", "w1", "w2"],
}


def add_trainable_lora(pipe: BitDancePipeline, rank: int, alpha: float | None = None, adapter_name: str = "default"):
    """Freeze the language model, projector and head of ``pipe`` and add rank-``rank`` float32 LoRA adapters (scale
    ``alpha / rank``, default 1) to the layers of `LORA_TARGET_MODULES`; only the adapters then require gradients."""
    require_peft()
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"The LoRA rank must be a positive integer, got {rank!r}.")
    for module in (pipe.language_model, pipe.projector, pipe.diffusion_head):
        module.requires_grad_(False)
    for name, targets in LORA_TARGET_MODULES.items():
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian")
        model = getattr(pipe, name)
        add_lora_adapter(model, config, adapter_name)
        # Adapters train in float32 beside bf16 base weights (PEFT casts the input and the output around them).
        cast_training_params(model, dtype=torch.float32)


def save_lora(pipe: BitDancePipeline, save_directory: str | Path, adapter_name: str = "default"):
    """Write adapter ``adapter_name`` of every component that has one as ``pytorch_lora_weights.safetensors``."""
    components = {}
    for name in pipe._lora_loadable_modules:
        model = getattr(pipe, name)
        if adapter_name in getattr(model, "peft_config", {}):
            layers, config = adapter_state_and_config(model, adapter_name)
            components[f"{name}_lora_layers"], components[f"{name}_lora_adapter_metadata"] = layers, config
    if not components:
        raise ValueError(f"No component of the pipeline has a LoRA adapter named {adapter_name!r}.")
    pipe.save_lora_weights(save_directory, **components)
