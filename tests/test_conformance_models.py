"""diffusers' model contract (what its `ModelTesterMixin` and the attention, LoRA, memory and training tester mixins
check) for every BitDance model: the binary tokenizer, both diffusion heads, the projector and the ImageNet backbone.

Each case builds a tiny random model and inputs that are the same on every call; everything runs on the CPU.
"""

import copy
import json
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from diffusers import AutoModel
from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import AttnProcessor
from diffusers.utils import BaseOutput

from bitdance_diffusers import (
    BitDanceDiffusionHead,
    BitDanceImageNetTransformer,
    BitDanceMLPHead,
    BitDanceProjector,
    BitDanceTokenizer,
)
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from conftest import captured_log, generator


@dataclass
class ModelCase:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    output_shape: tuple
    lora_targets: list | None = None  # linear layers an adapter goes on (models with PeftAdapterMixin)


def _tokenizer(**config):
    return BitDanceTokenizer(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_num_groups=8, **config)


def _images():
    return torch.rand(2, 3, 16, 16, generator=generator(1)) * 2 - 1


def _tokens(*shape):
    return torch.where(torch.rand(*shape, generator=generator(2)) > 0.5, 1.0, -1.0)


def _head_inputs(block_size):
    return {
        "sample": torch.randn(2, block_size, 8, generator=generator(1)),
        "timestep": torch.tensor([0.3, 0.7]),
        "condition": torch.randn(2, block_size, 16, generator=generator(2)),
    }


CASES = {
    "tokenizer": ModelCase(lambda: _tokenizer(), lambda: {"images": _images()}, (2, 3, 16, 16)),
    # The GAN decoder draws noise: its inputs carry a freshly seeded generator.
    "tokenizer_gan": ModelCase(
        lambda: _tokenizer(gan_decoder=True), lambda: {"images": _images(), "generator": generator(3)}, (2, 3, 16, 16)
    ),
    "diffusion_head": ModelCase(
        lambda: BitDanceDiffusionHead(in_channels=8, condition_channels=16, hidden_size=32, num_layers=2,
                                      num_ada_ln_layers=2, attention_head_dim=16),
        lambda: _head_inputs(4), (2, 4, 8), ["wqkv", "wo", "w1", "w2"],
    ),  # fmt: skip
    "mlp_head": ModelCase(
        lambda: BitDanceMLPHead(in_channels=8, condition_channels=16, hidden_size=32, num_layers=2, num_ada_ln_layers=2),
        lambda: _head_inputs(1), (2, 1, 8), ["w1", "w2"],
    ),  # fmt: skip
    "projector": ModelCase(lambda: BitDanceProjector(in_channels=8, hidden_size=16), lambda: {"tokens": _tokens(2, 4, 8)},
                           (2, 4, 16)),  # fmt: skip
    # Class labels (the second is the null class) and three blocks of four tokens, teacher-forced: 16 conditions.
    "imagenet_transformer": ModelCase(
        lambda: BitDanceImageNetTransformer(num_classes=10, sample_size=4, in_channels=8, hidden_size=32, num_layers=2,
                                            num_attention_heads=2, num_class_tokens=4, block_size=4),
        lambda: {"class_labels": torch.tensor([1, 10]), "tokens": _tokens(2, 12, 8)}, (2, 16, 32), ["wqkv", "wo"],
    ),  # fmt: skip
}
ALL = pytest.mark.parametrize("name", list(CASES))
WITH_GRADIENT_CHECKPOINTING = pytest.mark.parametrize("name", ["diffusion_head", "mlp_head", "imagenet_transformer"])
WITH_ATTENTION = pytest.mark.parametrize("name", ["diffusion_head", "imagenet_transformer"])
WITH_LORA = pytest.mark.parametrize("name", ["diffusion_head", "mlp_head", "imagenet_transformer"])


def build(name, seed=0):
    torch.manual_seed(seed)
    return CASES[name].build().eval()


def forward(model, name):
    """The model's main output tensor. (diffusers models return an output object, or a tuple with ``return_dict=False``;
    `test_outputs_equivalence` checks that separately, so that the other checks do not depend on it.)"""
    with torch.no_grad():
        output = model(**CASES[name].inputs())
    return output if isinstance(output, torch.Tensor) else output[0]


def public_config(model):
    """The model's config as its config.json stores it (tuples become lists), without the ``_``-prefixed metadata."""
    public = {key: value for key, value in model.config.items() if not key.startswith("_")}
    return json.loads(json.dumps(public))


def assert_same_weights(model, other):
    state, other_state = model.state_dict(), other.state_dict()
    assert state.keys() == other_state.keys()
    for key, tensor in state.items():
        assert tensor.dtype == other_state[key].dtype and torch.equal(tensor, other_state[key]), key


# Saving and loading ---------------------------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_from_save_pretrained(name, safe_serialization, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert public_config(loaded) == public_config(model)
    assert_same_weights(model, loaded)
    assert torch.equal(forward(loaded, name), forward(model, name))


@ALL
def test_save_pretrained_variant(name, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path, variant="fp16")
    weights = [path.name for path in tmp_path.iterdir() if path.name != "config.json"]
    assert weights == ["diffusion_pytorch_model.fp16.safetensors"]
    loaded = type(model).from_pretrained(tmp_path, variant="fp16").eval()
    assert_same_weights(model, loaded)
    assert torch.equal(forward(loaded, name), forward(model, name))
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model"):
        type(model).from_pretrained(tmp_path)


@ALL
@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_low_cpu_mem_usage_loads_the_same_model(name, low_cpu_mem_usage, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert_same_weights(model, loaded)
    assert all(parameter.device.type == "cpu" for parameter in loaded.parameters())


@ALL
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoints(name, variant, tmp_path):
    model = build(name)
    size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    model.save_pretrained(tmp_path, max_shard_size=int(size * 0.75), variant=variant)
    index_name = "diffusion_pytorch_model.safetensors.index.json" if variant is None else (
        "diffusion_pytorch_model.safetensors.index.fp16.json")  # fmt: skip
    index = json.loads((tmp_path / index_name).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards == {path.name for path in tmp_path.glob("*.safetensors")}
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = type(model).from_pretrained(tmp_path, variant=variant).eval()
    assert torch.equal(forward(loaded, name), forward(model, name))


@ALL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_from_save_pretrained_dtype(name, dtype, low_cpu_mem_usage, tmp_path):
    model = build(name).to(dtype)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage)
    assert loaded.dtype == dtype
    assert {parameter.dtype for parameter in loaded.parameters()} == {dtype}
    # float32 weights loaded as another dtype are cast; a half-precision file read as float32 is upcast.
    as_float32 = type(model).from_pretrained(tmp_path, dtype=torch.float32)
    assert {parameter.dtype for parameter in as_float32.parameters()} == {torch.float32}


@ALL
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_round_trip_gives_the_same_outputs(name, dtype, tmp_path):
    model = build(name).to(dtype)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=dtype).eval()
    assert_same_weights(model, loaded)
    output = forward(loaded, name)
    assert torch.isfinite(output.float()).all() and torch.equal(output, forward(model, name))


@ALL
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_to_dtype_and_back(name, dtype):
    model = build(name)
    reference = forward(model, name)
    model.to(dtype)
    assert model.dtype == dtype and {parameter.dtype for parameter in model.parameters()} == {dtype}
    half = forward(model, name)
    assert torch.isfinite(half.float()).all()
    # A tiny random model in half precision stays near its float32 self (the tolerance is loose on purpose: random
    # weights amplify rounding; the trained tokenizer's bound is in `test_shipped_tokenizer_decodes_in_bfloat16`).
    assert (half.float() - reference).abs().max() <= 0.25 * reference.abs().max()
    model.to(torch.float32)
    assert model.dtype == torch.float32


def test_shipped_tokenizer_decodes_in_bfloat16():
    """The trained tokenizer of the shipped shapes model, loaded with `dtype=`: bfloat16 gives the float32 codes of a
    shapes image and decodes them within a few percent of the float32 decode."""
    from bitdance_diffusers.training.shapes import ShapesDataset

    image = ShapesDataset(size=1, resolution=128, seed=5)[0]["pixel_values"][None]
    models = {dtype: BitDanceTokenizer.from_pretrained(DEMO_MODEL_PATH, subfolder="vae", dtype=dtype)
              for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip
    assert models[torch.bfloat16].dtype == torch.bfloat16
    with torch.no_grad():
        codes = models[torch.float32].encode(image).codes
        agreement = (models[torch.bfloat16].encode(image).codes == codes).float().mean()
        decoded = {dtype: model.decode(codes).sample.float() for dtype, model in models.items()}
    assert agreement >= 0.95
    assert (decoded[torch.bfloat16] - decoded[torch.float32]).abs().mean() <= 0.02


@ALL
def test_auto_model_loads_a_saved_model(name, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is type(model)
    assert torch.equal(forward(loaded, name), forward(model, name))


@pytest.mark.parametrize("subfolder,model_class", [("vae", BitDanceTokenizer), ("diffusion_head", BitDanceDiffusionHead),
                                                    ("projector", BitDanceProjector)])  # fmt: skip
def test_auto_model_loads_a_pipeline_component(subfolder, model_class):
    assert type(AutoModel.from_pretrained(str(DEMO_MODEL_PATH), subfolder=subfolder)) is model_class


@ALL
def test_device_map(name, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    for device_map, message in ((-1, "can't pass device_map as a negative int"), ("foo", "needs to be a device name")):
        with pytest.raises(ValueError, match=message):
            type(model).from_pretrained(tmp_path, device_map=device_map)
    loaded = type(model).from_pretrained(tmp_path, device_map="cpu").eval()
    assert torch.equal(forward(loaded, name), forward(model, name))


# Outputs --------------------------------------------------------------------------------------------------------


@ALL
def test_determinism_and_output_shape(name):
    model = build(name)
    first, second = forward(model, name), forward(model, name)
    assert first.shape == CASES[name].output_shape
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_gan_decoder_noise_comes_from_the_generator():
    model = build("tokenizer_gan")
    images = _images()
    with torch.no_grad():
        first = model(images, generator=generator(3)).sample
        other_seed = model(images, generator=generator(4)).sample
    assert torch.equal(first, forward(model, "tokenizer_gan")) and not torch.equal(first, other_seed)


@ALL
def test_outputs_equivalence(name):
    """``return_dict=True`` (the default) gives an output object; ``return_dict=False`` the same tensors as a tuple."""
    model = build(name)
    with torch.no_grad():
        as_dict = model(**CASES[name].inputs())
        as_tuple = model(**CASES[name].inputs(), return_dict=False)
    assert isinstance(as_dict, BaseOutput), f"{type(model).__name__} returns {type(as_dict).__name__}"
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for tensor, other in zip(as_tuple, as_dict.to_tuple()):
        assert torch.equal(tensor, other)


def test_tokenizer_encode_and_decode_outputs_equivalence():
    model = build("tokenizer")
    with torch.no_grad():
        codes = model.encode(_images()).codes
        (codes_tuple,) = model.encode(_images(), return_dict=False)
        decoded = model.decode(codes).sample
        (decoded_tuple,) = model.decode(codes, return_dict=False)
    assert torch.equal(codes, codes_tuple) and torch.equal(decoded, decoded_tuple)
    assert torch.equal(decoded, forward(model, "tokenizer"))


@ALL
def test_getattr_is_correct(name):
    """Plain attributes and methods read silently; config entries read as attributes warn; unknown names raise."""
    model = build(name)
    model.dummy_attribute = 5
    model.register_to_config(test_attribute=5)
    with captured_log("diffusers.models.modeling_utils") as log, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert model.dummy_attribute == 5 and getattr(model, "dummy_attribute") == 5
        assert getattr(model, "save_pretrained") == model.save_pretrained
    assert record == [] and log.getvalue() == ""
    with pytest.warns(FutureWarning):
        assert model.test_attribute == 5
    with pytest.raises(AttributeError, match=f"^'{type(model).__name__}' object has no attribute 'does_not_exist'$"):
        model.does_not_exist


# Memory switches -----------------------------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize(
    "storage_dtype,compute_dtype",
    [(torch.float16, torch.float32), (torch.float8_e4m3fn, torch.float32), (torch.float8_e5m2, torch.float32),
     (torch.float8_e4m3fn, torch.bfloat16)],
    ids=["fp16-fp32", "e4m3-fp32", "e5m2-fp32", "e4m3-bf16"],
)  # fmt: skip
def test_layerwise_casting(name, storage_dtype, compute_dtype):
    reference = forward(build(name), name).flatten()
    model = build(name).to(compute_dtype)
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype)
    skip_patterns = DEFAULT_SKIP_MODULES_PATTERN + tuple(model._skip_layerwise_casting_patterns or ())
    stored = 0
    for module_name, module in model.named_modules():
        if not isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            continue
        expected = compute_dtype if any(re.search(pattern, module_name) for pattern in skip_patterns) else storage_dtype
        stored += expected == storage_dtype
        for parameter in module.parameters(recurse=False):
            assert parameter.dtype == expected, module_name
    assert stored > 0
    inputs = {key: value.to(compute_dtype) if torch.is_tensor(value) and value.is_floating_point() else value
              for key, value in CASES[name].inputs().items()}  # fmt: skip
    with torch.no_grad():
        output = model(**inputs)
    output = (output if isinstance(output, torch.Tensor) else output[0]).float().flatten()
    assert output.dtype == torch.float32 and torch.isfinite(output).all()
    assert torch.nn.functional.cosine_similarity(output, reference, dim=0) > 0  # diffusers: cosine distance < 1


@ALL
@pytest.mark.parametrize(
    "offload",
    [dict(offload_type="block_level", num_blocks_per_group=1), dict(offload_type="block_level", num_blocks_per_group=2),
     dict(offload_type="leaf_level")],
    ids=["block-1", "block-2", "leaf"],
)  # fmt: skip
def test_group_offloading(name, offload):
    reference = forward(build(name), name)
    model = build(name)
    model.enable_group_offload(torch.device("cpu"), **offload)
    hooked = [module for module in model.modules() if hasattr(module, "_diffusers_hook")]
    assert hooked and all(module._diffusers_hook.get_hook("group_offloading") for module in hooked)
    assert torch.equal(forward(model, name), reference)


@ALL
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_to_disk(name, offload_type, tmp_path):
    """Offloaded groups live in safetensors files between uses; every group must be loaded back when it runs."""
    reference = forward(build(name), name)
    model = build(name)
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(torch.device("cpu"), offload_type=offload_type, offload_to_disk_path=str(tmp_path), **extra)
    assert list(tmp_path.glob("*.safetensors"))
    # diffusers' own check of the files, for what it models: block level without nested block modules (the leaf level
    # prefetches, so its files are not deterministic).
    if offload_type == "block_level" and not getattr(model, "_group_offload_block_modules", None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers.utils.testing_utils is deprecated, still there
            from diffusers.utils.testing_utils import _check_safetensors_serialization

        is_correct, extra_files, missing_files = _check_safetensors_serialization(
            module=model, offload_to_disk_path=str(tmp_path), offload_type=offload_type, num_blocks_per_group=1
        )
        assert is_correct, (extra_files, missing_files)
    assert torch.equal(forward(model, name), reference)


# Training switches ---------------------------------------------------------------------------------------------


@WITH_GRADIENT_CHECKPOINTING
def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(name):
    model = build(name).train()
    assert not model.is_gradient_checkpointing
    checkpointed = copy.deepcopy(model)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    block = next(module for module in checkpointed.modules() if type(module).__name__ in model._repeated_blocks)
    calls = []
    block.register_forward_pre_hook(lambda module, args: calls.append(1))
    losses = []
    for candidate in (model, checkpointed):
        output = candidate(**CASES[name].inputs())
        output = output if isinstance(output, torch.Tensor) else output[0]
        losses.append((output - torch.randn(output.shape, generator=generator(9))).square().mean())
        losses[-1].backward()
    assert calls == [1, 1], "the checkpointed block must run again in the backward pass"
    assert torch.equal(losses[0], losses[1])
    gradients = {key: parameter.grad for key, parameter in checkpointed.named_parameters()}
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.allclose(parameter.grad, gradients[key], atol=5e-5), key
    checkpointed.disable_gradient_checkpointing()
    assert not checkpointed.is_gradient_checkpointing


@pytest.mark.parametrize("name", ["tokenizer", "projector"])
def test_gradient_checkpointing_is_refused_where_unsupported(name):
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        build(name).enable_gradient_checkpointing()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp_head", "imagenet_transformer"])  # the diffusion head: test_workflows.py
def test_compile_repeated_blocks_without_graph_breaks_or_recompiles(name):
    model = build(name)
    reference = forward(model, name)
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = forward(model, name)
        assert torch.equal(forward(model, name), compiled)
    assert torch.allclose(compiled, reference, atol=1e-5)


# Attention -----------------------------------------------------------------------------------------------------


@WITH_ATTENTION
def test_attention_processors_get_and_set(name):
    model = build(name)
    processors = model.attn_processors
    assert len(processors) == 2  # one per transformer block
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({next(iter(processors)): AttnProcessor()})
    replacements = {key: type(processor)() for key, processor in processors.items()}
    model.set_attn_processor(replacements)
    assert all(model.attn_processors[key] is processor for key, processor in replacements.items())
    for module in model.modules():
        if isinstance(module, AttentionModuleMixin):
            processor = AttnProcessor()
            module.set_processor(processor)
            assert module.get_processor() is processor


@WITH_ATTENTION
def test_fuse_and_unfuse_qkv_projections(name):
    """The query, key and value projections are one matrix already; fusing must keep the outputs."""
    model = build(name)
    reference = forward(model, name)
    model.fuse_qkv_projections()
    assert torch.equal(forward(model, name), reference)
    model.unfuse_qkv_projections()
    assert torch.equal(forward(model, name), reference)


@WITH_ATTENTION
def test_attention_backend_switch(name):
    model = build(name)
    reference = forward(model, name)
    model.set_attention_backend("native")
    assert torch.equal(forward(model, name), reference)
    model.reset_attention_backend()
    assert torch.equal(forward(model, name), reference)


# LoRA adapters (PeftAdapterMixin) -------------------------------------------------------------------------------


@WITH_LORA
def test_save_load_lora_adapter(name, tmp_path):
    from peft import LoraConfig

    model = build(name)
    base = forward(model, name)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=CASES[name].lora_targets, init_lora_weights=False)
    model.add_adapter(config)
    adapted = forward(model, name)
    assert not torch.allclose(adapted, base)
    model.save_lora_adapter(tmp_path)
    with pytest.raises(ValueError, match="Adapter name foo not found"):
        model.save_lora_adapter(tmp_path / "other", adapter_name="foo")
    model.unload_lora()
    assert torch.equal(forward(model, name), base)
    model.load_lora_adapter(tmp_path / "pytorch_lora_weights.safetensors", prefix=None, use_safetensors=True)
    (loaded,) = model.peft_config.values()
    assert (loaded.r, loaded.lora_alpha, set(loaded.target_modules)) == (4, 8, set(CASES[name].lora_targets))
    assert torch.equal(forward(model, name), adapted)
