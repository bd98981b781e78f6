"""LoRA training: only the adapters train (also over an int8 weight-only base), they save as a diffusers LoRA file,
resume exactly, and gradient checkpointing changes nothing but memory."""

import pytest
import torch
from safetensors import safe_open

from bitdance_diffusers import quantize_model_
from bitdance_diffusers.random_pipeline import build_random_pipeline
from bitdance_diffusers.training import ShapesDataset, TrainingConfig, train_text_to_image
from conftest import generator


def tiny_pipe():
    pipe = build_random_pipeline("tiny", block_size=16, image_sizes=[[64, 64]])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe):
    return pipe("a red circle", height=64, width=64, num_inference_steps=2, generator=generator(0),
                output_type="latent").images  # fmt: skip


@pytest.mark.parametrize("quantize", [None, "int8wo"], ids=["float32-base", "int8-base"])
def test_lora_training_trains_only_the_adapters_and_saves_a_lora_file(tmp_path, quantize):
    dataset = ShapesDataset(2, resolution=64, seed=2)
    config = TrainingConfig(output_dir=str(tmp_path), max_train_steps=4, train_batch_size=2, learning_rate=1e-2,
                            lr_warmup_steps=1, adam_epsilon=1e-8)  # fmt: skip
    pipe = tiny_pipe()
    if quantize:  # what `--quantize int8wo` does: torchao int8 weight-only linear weights, frozen
        for name in ("language_model", "diffusion_head"):
            quantize_model_(getattr(pipe, name), quantize)
    def plain(tensor):  # torchao's int8 weights compare through their dequantized values
        return tensor.dequantize() if hasattr(tensor, "qdata") else tensor

    base_weights = {name: plain(tensor).clone() for name, tensor in pipe.diffusion_head.state_dict().items()}
    train_text_to_image(pipe, dataset, config, lora_rank=2)

    head_state = pipe.diffusion_head.state_dict()
    for name, tensor in head_state.items():
        if "lora_" not in name:
            assert torch.equal(plain(tensor), base_weights[name.replace(".base_layer", "")]), name
        else:
            assert tensor.dtype == torch.float32, name  # the adapters train in float32 whatever the base
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in head_state.items())

    loaded = tiny_pipe()
    if quantize:
        for name in ("language_model", "diffusion_head"):
            quantize_model_(getattr(loaded, name), quantize)
    loaded.load_lora_weights(tmp_path / "final")
    assert loaded.get_list_adapters() == {"language_model": ["default_0"], "diffusion_head": ["default_0"]}
    assert torch.equal(sample(loaded), sample(pipe))
    with pytest.raises(ValueError, match="positive integer"):
        train_text_to_image(tiny_pipe(), dataset, TrainingConfig(output_dir=str(tmp_path / "zero")), lora_rank=0)


def test_lora_training_resumes_exactly(tmp_path):
    dataset = ShapesDataset(2, resolution=64, seed=2)

    def train(output_dir, max_train_steps):
        config = TrainingConfig(output_dir=str(output_dir), max_train_steps=max_train_steps, train_batch_size=2,
                                learning_rate=1e-2, lr_warmup_steps=1, checkpointing_steps=2,
                                resume_from_checkpoint="latest")  # fmt: skip
        return train_text_to_image(tiny_pipe(), dataset, config, lora_rank=2)

    whole = train(tmp_path / "whole", 4)
    train(tmp_path / "split", 2)
    resumed = train(tmp_path / "split", 4)  # a fresh pipeline resumes from checkpoint-2
    assert resumed == whole[2:]
    with safe_open(str(tmp_path / "whole" / "final" / "pytorch_lora_weights.safetensors"), "pt") as a:
        with safe_open(str(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors"), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())


@pytest.mark.parametrize("lora_rank", [None, 2], ids=["full", "lora"])
def test_gradient_checkpointing_trains_the_same(tmp_path, lora_rank):
    """Recomputing activations changes memory, not results: same losses and weights as without it."""
    dataset = ShapesDataset(2, resolution=64, seed=2)
    pipes, layer_calls = {}, {}
    for checkpointing in (False, True):
        pipe = tiny_pipe()
        calls = layer_calls[checkpointing] = []
        # Modules inside a checkpointed layer (transformers keeps the layer's own hooks outside the checkpoint).
        for inner in (pipe.language_model.layers[0].mlp, pipe.diffusion_head.res_blocks[0].attn):
            inner.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(type(module).__name__))
        config = TrainingConfig(output_dir=str(tmp_path / str(checkpointing)), max_train_steps=3, train_batch_size=2,
                                learning_rate=1e-2, lr_warmup_steps=1, gradient_checkpointing=checkpointing)  # fmt: skip
        pipes[checkpointing] = (pipe, train_text_to_image(pipe, dataset, config, lora_rank=lora_rank))
    (plain, plain_losses), (checkpointed, checkpointed_losses) = pipes[False], pipes[True]
    # Each checkpointed layer runs twice per step: in the forward pass and again in the backward pass.
    assert sorted(layer_calls[True]) == sorted(layer_calls[False] * 2)
    assert checkpointed_losses == plain_losses and len(set(plain_losses)) == 3
    for name in ("language_model", "diffusion_head"):
        trained = getattr(plain, name).state_dict()
        for key, tensor in getattr(checkpointed, name).state_dict().items():
            assert torch.equal(tensor, trained[key]), key
