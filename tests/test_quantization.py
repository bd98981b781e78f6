"""Weight quantization: `pipeline_quantization_config` with diffusers' `PipelineQuantizationConfig`, and
`quantize_model_` in place.

On CPU: torchao int8 weight-only while loading, end to end; bitsandbytes nf4/int8 while loading for the language model
(diffusers' loader refuses bitsandbytes without a GPU) and in place for the head; float8 weight-only in place. Dynamic
float8 needs CUDA: here only its config is checked (benchmarks/gpu_memory_modes.sh runs every scheme on a device).
"""

import bitsandbytes as bnb
import diffusers
import pytest
import torch
import transformers
from torchao.quantization import Int8Tensor

from bitdance_diffusers import (
    QUANTIZATION_SCHEMES,
    BitDanceImageNetPipeline,
    BitDancePipeline,
    pipeline_quantization_config,
    quantize_model_,
)
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline, build_random_pipeline
from bitdance_diffusers.training import psnr
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH


def linear_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """Weights of the plain ``nn.Linear`` layers (torchao keeps the layer and swaps the weight; bitsandbytes swaps the
    layer for a subclass)."""
    return [layer.weight for layer in module.modules() if type(layer) is torch.nn.Linear]


def generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_random_pipeline("tiny").save_pretrained(folder)
    return folder


def test_int8_weight_only_quantizes_language_model_and_head_only(saved_tiny):
    pipe = BitDancePipeline.from_pretrained(saved_tiny, quantization_config=pipeline_quantization_config("int8wo"))
    # torchao's default would have switched every float32 matmul of the process to TF32 / reduced precision.
    assert torch.get_float32_matmul_precision() == "highest"
    for name in ("language_model", "diffusion_head"):
        weights = linear_weights(getattr(pipe, name))
        assert weights and all(isinstance(weight, Int8Tensor) for weight in weights), name
    for name in ("projector", "vae"):
        assert not any(isinstance(weight, Int8Tensor) for weight in getattr(pipe, name).parameters()), name
    assert not isinstance(pipe.language_model.embed_tokens.weight, Int8Tensor)

    reference = BitDancePipeline.from_pretrained(saved_tiny)
    kwargs = dict(prompt="a red circle", height=128, width=128, num_inference_steps=4, output_type="latent")
    quantized_codes, reference_codes = generate(pipe, **kwargs), generate(reference, **kwargs)
    assert quantized_codes.abs().eq(1).all()
    # Per-row int8 weights move a random model's hidden states slightly: most tokens keep their sign, not all.
    agreement = (quantized_codes == reference_codes).float().mean().item()
    assert 0.9 <= agreement < 1.0


def test_int8_weight_only_keeps_the_shapes_model_images():
    """On trained weights int8 weight-only changes the picture far less than the speed issue allows fp8 (PSNR >= 30 dB)."""
    prompts = ["a large red circle at the top left on a blue background", "a small green star in the center on a white background"]  # fmt: skip
    kwargs = dict(prompt=prompts, num_inference_steps=10, guidance_scale=4.0, output_type="pt")
    reference = generate(BitDancePipeline.from_pretrained(DEMO_MODEL_PATH), **kwargs)
    config = pipeline_quantization_config("int8wo", compute_dtype=torch.float32)
    quantized = generate(BitDancePipeline.from_pretrained(DEMO_MODEL_PATH, quantization_config=config), **kwargs)
    assert psnr(quantized, reference).min() >= 30.0


def test_int8_weight_only_on_the_imagenet_pipeline(tmp_path):
    build_random_imagenet_pipeline(block_size=4).save_pretrained(tmp_path)
    config = pipeline_quantization_config("int8wo", components=("transformer", "diffusion_head"))
    # diffusers' pipeline device map: each component is loaded and quantized directly on the device ("cuda" on a GPU).
    pipe = BitDanceImageNetPipeline.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    assert pipe.hf_device_map == "cpu"
    for name in ("transformer", "diffusion_head"):
        weights = linear_weights(getattr(pipe, name))
        assert weights and all(isinstance(weight, Int8Tensor) for weight in weights), name
    codes = generate(pipe, class_labels=[1, 2], num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    assert codes.shape[0] == 2 and codes.abs().eq(1).all()


BNB_LAYERS = {"nf4": (bnb.nn.Linear4bit, torch.uint8), "int8": (bnb.nn.Linear8bitLt, torch.int8)}


def bnb_layers(module):
    return [layer for layer in module.modules() if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_bitsandbytes_language_model_while_loading_and_head_in_place(saved_tiny, scheme):
    config = pipeline_quantization_config(scheme, components=("language_model",), compute_dtype=torch.float32)
    pipe = BitDancePipeline.from_pretrained(saved_tiny, quantization_config=config)
    quantize_model_(pipe.diffusion_head, scheme)
    layer_type, storage_dtype = BNB_LAYERS[scheme]
    for name in ("language_model", "diffusion_head"):
        module = getattr(pipe, name)
        assert not linear_weights(module), f"{name} kept plain nn.Linear layers"
        layers = bnb_layers(module)
        assert layers and all(type(layer) is layer_type and layer.weight.dtype == storage_dtype for layer in layers)
    assert pipe.diffusion_head.dtype == torch.float32  # the compute dtype, not the packed storage's

    reference = BitDancePipeline.from_pretrained(saved_tiny)
    kwargs = dict(prompt="a red circle", height=128, width=128, num_inference_steps=4, output_type="latent")
    quantized_codes, reference_codes = generate(pipe, **kwargs), generate(reference, **kwargs)
    assert quantized_codes.abs().eq(1).all()
    assert (quantized_codes == reference_codes).float().mean() >= 0.8


@pytest.mark.parametrize("scheme", ["int8wo", "fp8wo", "nf4", "int8"])
def test_quantize_model_in_place_keeps_the_shapes_model_images(scheme):
    prompts = ["a large red circle at the top left on a blue background"]
    kwargs = dict(prompt=prompts, num_inference_steps=10, guidance_scale=4.0, output_type="pt")
    reference = generate(BitDancePipeline.from_pretrained(DEMO_MODEL_PATH), **kwargs)
    pipe = BitDancePipeline.from_pretrained(DEMO_MODEL_PATH)
    quantize_model_(pipe.language_model, scheme)
    quantize_model_(pipe.diffusion_head, scheme)
    assert not linear_weights(pipe.language_model) or scheme in ("int8wo", "fp8wo")
    assert psnr(generate(pipe, **kwargs), reference).min() >= 25.0


@pytest.mark.parametrize("scheme", QUANTIZATION_SCHEMES)
def test_each_component_gets_a_config_of_its_library(scheme):
    """The language model is a transformers model, the head and the ImageNet transformer are diffusers models."""
    components = ("language_model", "transformer", "diffusion_head")
    mapping = pipeline_quantization_config(scheme, components, compute_dtype=torch.float16).quant_mapping
    assert set(mapping) == set(components)
    library = {"nf4": "BitsAndBytesConfig", "int8": "BitsAndBytesConfig"}.get(scheme, "TorchAoConfig")
    assert isinstance(mapping["language_model"], getattr(transformers, library))
    for name in ("transformer", "diffusion_head"):
        assert isinstance(mapping[name], getattr(diffusers, library))
        assert not isinstance(mapping[name], getattr(transformers, library))
    if scheme == "nf4":
        for config in mapping.values():
            assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
            assert config.bnb_4bit_compute_dtype == torch.float16
    if scheme == "int8":
        assert all(config.load_in_8bit for config in mapping.values())


def test_bad_schemes_and_components_are_named():
    with pytest.raises(ValueError, match="Unknown quantization scheme 'int4'.*int8wo"):
        pipeline_quantization_config("int4")
    with pytest.raises(ValueError, match="Unknown quantization scheme 'fp4'"):
        quantize_model_(torch.nn.Linear(4, 4), "fp4")
    with pytest.raises(ValueError, match="`components` is empty"):
        pipeline_quantization_config("int8wo", components=())
    assert set(pipeline_quantization_config("int8wo").quant_mapping) == {"language_model", "diffusion_head"}


def test_command_line_quantizes_while_loading(tmp_path):
    from bitdance_diffusers.cli import build_parser, load_pipeline

    args = build_parser().parse_args(["generate", "--prompt", "a red circle", "--quantize", "int8wo"])
    pipe = load_pipeline(args.model, torch.float32, "cpu", args.quantize)
    assert all(isinstance(weight, Int8Tensor) for weight in linear_weights(pipe.diffusion_head))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "a red circle", "--quantize", "int4"])
    with pytest.raises(ValueError, match="--quantize nf4 needs a CUDA GPU .*use int8wo or fp8wo"):
        load_pipeline(None, torch.float32, "cpu", "nf4")


def test_command_line_quantizes_the_imagenet_backbone(tmp_path):
    from bitdance_diffusers.cli import load_pipeline

    build_random_imagenet_pipeline(block_size=4).save_pretrained(tmp_path)
    pipe = load_pipeline(str(tmp_path), torch.float32, "cpu", "int8wo")
    for model in (pipe.transformer, pipe.diffusion_head):
        weights = linear_weights(model)
        assert weights and all(isinstance(weight, Int8Tensor) for weight in weights)
