"""diffusers' pipeline contract (what its `PipelineTesterMixin` checks) for both BitDance pipelines, through their public
API only: save/load (local, variants, dtype dicts, half precision), components (passed in, left out, shared with
`from_pipe`), batching, `num_images_per_*`, dict vs tuple outputs and the step-end callbacks.

Each case is a tiny random pipeline; a call is one (text-to-image, 64x64) or four (ImageNet) blocks of two head steps.
Where the README promises exactness (fp32: a batch gives the codes of one run per image with its generator, saved
weights reload bit for bit) the checks are exact. Decoded images of a batch differ from single runs by the float
rounding of batched convolutions, which the tiny random decoder's one-channel GroupNorms amplify to about 2e-4: there
the bound is 1e-3 (diffusers' default is 1e-4; its own pipeline tests raise it likewise).
"""

import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from bitdance_diffusers import BitDanceImageNetPipeline, BitDancePipeline, BitDanceTokenizer
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline, build_random_pipeline
from conftest import captured_log, generator


@dataclass
class PipelineCase:
    name: str
    pipeline_class: type
    build: Callable[[], DiffusionPipeline]
    inputs: Callable[[int], dict]  # seed -> call arguments, with a fresh generator
    batch_param: str  # the argument a batch is a list of
    batch_values: list  # unequal items, as diffusers' batch checks use (the last one very long)
    per_item_param: str  # images per prompt / per label
    models: tuple  # the components that are models
    backbone: str
    multi_block: dict  # arguments giving several blocks (callback checks)

    def block_size(self, pipe):
        return pipe.config.block_size if self.pipeline_class is BitDancePipeline else pipe.transformer.config.block_size


def _text_to_image():
    pipe = build_random_pipeline("tiny", block_size=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _imagenet():
    pipe = build_random_imagenet_pipeline(num_classes=10)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "text_to_image": PipelineCase(
        "text_to_image",
        BitDancePipeline,
        _text_to_image,
        lambda seed: dict(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                          output_type="np", generator=generator(seed)),
        "prompt", ["a red circle", "a red", 100 * "very long "], "num_images_per_prompt",
        ("language_model", "projector", "diffusion_head", "vae"), "language_model", dict(height=128, width=128),
    ),  # fmt: skip
    "imagenet": PipelineCase(
        "imagenet",
        BitDanceImageNetPipeline,
        _imagenet,
        lambda seed: dict(class_labels=[1], guidance_scale=4.0, num_inference_steps=2, output_type="np",
                          generator=generator(seed)),
        "class_labels", [1, 7, 9], "num_images_per_label", ("transformer", "diffusion_head", "vae"), "transformer", {},
    ),  # fmt: skip
}


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


@pytest.fixture
def pipe(case):
    return case.build()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case's pipeline saved once (safetensors), with the pipeline it was saved from."""
    folders = {}
    for name, case in CASES.items():
        pipe = case.build()
        folder = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(folder)
        folders[name] = (folder, pipe)
    return folders


def run(pipe, case, seed=0, **overrides):
    return pipe(**{**case.inputs(seed), **overrides}).images


def dtypes(pipe):
    return {name: component.dtype for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)}


def config_arguments(pipe):
    """The pipeline's ``__init__`` arguments that are not components (its registered config)."""
    return {key: value for key, value in pipe.config.items() if not key.startswith("_") and key not in pipe.components}


def loaded(case, *args, **kwargs):
    pipe = case.pipeline_class.from_pretrained(*args, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Signature and components --------------------------------------------------------------------------------------


def test_call_signature(case):
    """diffusers' canonical optional arguments (its `required_optional_params`) with defaults. `latents` is not among
    them: an autoregressive pipeline draws fresh noise for every block, so there is no initial latent to pass."""
    parameters = inspect.signature(case.pipeline_class.__call__).parameters
    optional = {name for name, parameter in parameters.items() if parameter.default is not inspect.Parameter.empty}
    expected = {"num_inference_steps", case.per_item_param, "generator", "output_type", "return_dict", "guidance_scale",
                "attention_kwargs", "callback_on_step_end", "callback_on_step_end_tensor_inputs"}  # fmt: skip
    assert expected <= optional
    assert case.batch_param in parameters
    if case.pipeline_class is BitDancePipeline:
        assert {"prompt", "negative_prompt", "height", "width"} <= optional
    assert "latents" in case.pipeline_class._callback_tensor_inputs


def test_components(case, pipe):
    assert set(pipe.components) == set(case.models) | {"scheduler"} | (
        {"tokenizer"} if case.pipeline_class is BitDancePipeline else set())  # fmt: skip
    offloaded = pipe.model_cpu_offload_seq.split("->") + list(pipe._exclude_from_cpu_offload)
    assert set(offloaded) == set(case.models)  # every model is either offloaded in sequence or kept resident
    rebuilt = case.pipeline_class(**pipe.components, **config_arguments(pipe))
    assert rebuilt.components.keys() == pipe.components.keys()
    assert np.array_equal(run(rebuilt, case), run(pipe, case))


def test_from_pipe_shares_components_and_config(case, pipe):
    other = case.pipeline_class.from_pipe(pipe)
    assert all(other.components[name] is component for name, component in pipe.components.items())
    assert {key: value for key, value in other.config.items() if not key.startswith("_")} == {
        key: value for key, value in pipe.config.items() if not key.startswith("_")}  # fmt: skip
    assert np.array_equal(run(other, case), run(pipe, case))


# Saving and loading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_load_local(case, pipe, safe_serialization, tmp_path):
    reference = run(pipe, case)
    pipe.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    with captured_log("diffusers.pipelines.pipeline_utils", level=logging.INFO) as log:  # a line per loaded component
        reloaded = loaded(case, tmp_path)
    for name in pipe.components:
        assert f"Loaded {name} as" in log.getvalue(), name
    assert type(reloaded) is case.pipeline_class and dtypes(reloaded) == dtypes(pipe)
    assert np.array_equal(run(reloaded, case), reference)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is case.pipeline_class


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_save_load_half_precision(case, saved, dtype, tmp_path):
    """Half-precision components save and reload as they are (diffusers' test_save_load_float16), and the reloaded
    pipeline is the float32 one loaded with ``dtype=``. (Not the in-memory one: ``.to(dtype)`` also rounds buffers
    that are rebuilt in float32 on loading, such as the language model's rotary frequencies.)"""
    pipe = case.build().to(dtype)
    pipe.save_pretrained(tmp_path)
    reloaded = loaded(case, tmp_path, dtype=dtype)
    assert set(dtypes(reloaded).values()) == {dtype}
    for name in case.models:
        state, reloaded_state = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert all(torch.equal(tensor, reloaded_state[key]) for key, tensor in state.items()), name
    images = run(reloaded, case)
    assert np.isfinite(images).all()
    assert np.array_equal(images, run(loaded(case, saved[case.name][0], dtype=dtype), case))


def test_variants_save_load_and_missing_variant(case, saved, tmp_path):
    folder, pipe = saved[case.name]
    pipe.save_pretrained(tmp_path, variant="fp16")
    for name in case.models:
        files = [path.name for path in (tmp_path / name).iterdir() if path.suffix in (".safetensors", ".bin")]
        assert files and all(".fp16." in file for file in files), (name, files)
    reloaded = loaded(case, tmp_path, variant="fp16")
    for name in case.models:
        state, reloaded_state = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert all(torch.equal(tensor, reloaded_state[key]) for key, tensor in state.items()), name
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        case.pipeline_class.from_pretrained(folder, variant="fp16")


def test_dtype_dicts(case, saved):
    folder, _ = saved[case.name]
    first = next(iter(case.build().components))  # diffusers' check: the first component, then the default
    for dtype_dict in ({first: torch.bfloat16, "default": torch.float16},
                       {case.backbone: torch.bfloat16, "default": torch.float32},  # the README's mixed precision
                       {"default": torch.bfloat16},
                       {case.backbone: torch.bfloat16}):  # fmt: skip
        pipe = loaded(case, folder, dtype=dtype_dict)
        expected = {name: dtype_dict.get(name, dtype_dict.get("default", torch.float32)) for name in case.models}
        assert dtypes(pipe) == expected, dtype_dict
    # The mixed-precision pipeline runs: bfloat16 backbone, float32 head, ±1 codes.
    pipe = loaded(case, folder, dtype={case.backbone: torch.bfloat16, "default": torch.float32})
    codes = run(pipe, case, output_type="latent")
    assert set(codes.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.filterwarnings("ignore:There are modules in")
def test_to_dtype(case, pipe):
    assert set(dtypes(pipe).values()) == {torch.float32}
    pipe.to(dtype=torch.float16)
    assert set(dtypes(pipe).values()) == {torch.float16} and pipe.dtype == torch.float16
    pipe.to("cpu", torch.bfloat16)
    assert set(dtypes(pipe).values()) == {torch.bfloat16}
    images = run(pipe, case)
    assert images.dtype == np.float32 and np.isfinite(images).all()
    pipe.to(torch.float32)
    assert set(dtypes(pipe).values()) == {torch.float32}


# Components passed in or left out ------------------------------------------------------------------------------


def test_components_passed_to_from_pretrained_are_used(case, saved):
    folder, pipe = saved[case.name]
    torch.manual_seed(1)
    other_head = type(pipe.diffusion_head)(**pipe.diffusion_head.config).eval()
    reloaded = loaded(case, folder, diffusion_head=other_head)
    assert reloaded.diffusion_head is other_head
    expected = case.pipeline_class(**{**pipe.components, "diffusion_head": other_head}, **config_arguments(pipe))
    expected.set_progress_bar_config(disable=True)
    assert np.array_equal(run(reloaded, case), run(expected, case))
    assert not np.array_equal(run(reloaded, case), run(pipe, case))


def test_without_vae_the_pipeline_returns_codes(case, saved):
    """``vae=None`` (a pipeline loaded without its decoder) still samples: ``output_type="latent"`` gives the codes."""
    folder, pipe = saved[case.name]
    without_vae = loaded(case, folder, vae=None)
    assert without_vae.vae is None
    codes = run(without_vae, case, output_type="latent")
    assert torch.equal(codes, run(pipe, case, output_type="latent"))


def test_without_vae_images_are_refused_before_sampling(case, saved):
    folder, _ = saved[case.name]
    without_vae = loaded(case, folder, vae=None)
    head_calls = []
    without_vae.diffusion_head.register_forward_pre_hook(lambda module, args: head_calls.append(1))
    with pytest.raises(ValueError, match="vae"):
        run(without_vae, case, output_type="np")
    assert head_calls == []


# Outputs and batching ------------------------------------------------------------------------------------------


def test_dict_tuple_outputs_equivalent(case, pipe):
    output = pipe(**case.inputs(0))
    as_tuple = pipe(**case.inputs(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert np.array_equal(as_tuple[0], output.images) and np.array_equal(output[0], output.images)


@pytest.mark.parametrize("output_type", ["np", "pil", "pt", "latent"])
def test_inference_batch_consistent(case, pipe, output_type):
    for batch_size in (2, 3):
        images = run(pipe, case, **{case.batch_param: case.batch_values[:batch_size], "output_type": output_type,
                                    "generator": [generator(index) for index in range(batch_size)]})  # fmt: skip
        assert len(images) == batch_size
        if output_type == "pil":
            assert all(isinstance(image, PIL.Image.Image) for image in images)


def test_inference_batch_single_identical(case, pipe):
    """Image ``i`` of a batch with one generator per image equals a single run with generator ``i``: the same codes,
    and images within 1e-3 (see the module docstring)."""
    batch = {case.batch_param: case.batch_values, "generator": [generator(index) for index in range(3)]}
    codes = run(pipe, case, **batch, output_type="latent")
    images = run(pipe, case, **batch)
    for index, value in enumerate(case.batch_values):
        single = {case.batch_param: [value], "generator": generator(index)}
        assert torch.equal(codes[index : index + 1], run(pipe, case, **single, output_type="latent")), index
        assert np.abs(images[index : index + 1] - run(pipe, case, **single)).max() <= 1e-3, index


def test_num_images_per_item(case, pipe):
    for batch_size in (1, 2):
        for per_item in (1, 2):
            images = run(pipe, case, **{case.batch_param: case.batch_values[:batch_size], case.per_item_param: per_item})
            assert images.shape[0] == batch_size * per_item
    # With a generator per image, image k of item k // n equals a single run of that item with generator k.
    codes = run(pipe, case, **{case.batch_param: case.batch_values[:2], case.per_item_param: 2, "output_type": "latent",
                               "generator": [generator(index) for index in range(4)]})  # fmt: skip
    for index in range(4):
        single = run(pipe, case, **{case.batch_param: [case.batch_values[index // 2]], "output_type": "latent",
                                    "generator": generator(index)})  # fmt: skip
        assert torch.equal(codes[index : index + 1], single), index


def test_negative_prompts_follow_num_images_per_prompt():
    case = CASES["text_to_image"]
    pipe = case.build()
    prompts, negatives = ["a red circle", "a blue star"], ["blurry", ""]
    codes = run(pipe, case, prompt=prompts, negative_prompt=negatives, num_images_per_prompt=2, output_type="latent",
                generator=[generator(index) for index in range(4)])  # fmt: skip
    for index in range(4):
        single = run(pipe, case, prompt=prompts[index // 2], negative_prompt=negatives[index // 2], output_type="latent",
                     generator=generator(index))  # fmt: skip
        assert torch.equal(codes[index : index + 1], single), index


def test_cfg(case, pipe):
    unguided = run(pipe, case, guidance_scale=1.0)
    guided = run(pipe, case, guidance_scale=7.5)
    assert unguided.shape == guided.shape and not np.array_equal(unguided, guided)


def test_attention_slicing_keeps_the_outputs(case, pipe):
    """diffusers' attention-slicing switch: BitDance's models have no sliceable attention, so it changes nothing."""
    reference = run(pipe, case)
    for slice_size in (1, 2, "auto"):
        pipe.enable_attention_slicing(slice_size=slice_size)
        assert np.array_equal(run(pipe, case), reference)
    pipe.disable_attention_slicing()


# Step-end callbacks (one step = one autoregressive block) -------------------------------------------------------


def test_callback_inputs(case, pipe):
    names = pipe._callback_tensor_inputs
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append(set(callback_kwargs))
        assert set(callback_kwargs) <= set(pipe._callback_tensor_inputs)
        return callback_kwargs

    for requested in (["latents"], names, []):
        seen.clear()
        run(pipe, case, callback_on_step_end=record, callback_on_step_end_tensor_inputs=requested, output_type="latent")
        assert seen and all(keys == set(requested) for keys in seen)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, case, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "not_a_tensor"])


def test_callback_latents_are_the_tokens_sampled_so_far(case, pipe):
    """At step ``i`` the callback sees the token sequence ``[images, tokens, channels]`` (one row per image, not per
    guidance branch) in patch-raster order, sampled up to block ``i`` and zero after it; the properties diffusers'
    callbacks read are set."""
    block_size = case.block_size(pipe)
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        assert not pipe.interrupt and pipe.do_classifier_free_guidance
        seen.append((step, timestep, pipe.num_timesteps, callback_kwargs["latents"].clone()))
        return callback_kwargs

    batch = {case.batch_param: case.batch_values[:2], case.per_item_param: 2, "output_type": "latent",
             **case.multi_block}  # fmt: skip
    codes = run(pipe, case, **batch, callback_on_step_end=record)
    final = BitDanceTokenizer.codes_to_sequence(codes, block_size)
    num_blocks = final.shape[1] // block_size
    assert num_blocks > 1 and [step for step, *_ in seen] == list(range(num_blocks))
    for step, timestep, num_timesteps, latents in seen:
        assert timestep == step and num_timesteps == num_blocks
        assert latents.shape == final.shape == (4, num_blocks * block_size, codes.shape[1])
        sampled = (step + 1) * block_size
        assert torch.equal(latents[:, :sampled], final[:, :sampled]) and bool((latents[:, sampled:] == 0).all())


def test_callback_edits_are_fed_back(case, pipe):
    """Latents a callback returns replace the sampled ones: the next blocks are conditioned on them."""
    block_size = case.block_size(pipe)

    def flip_first_block(pipe, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        if step == 0:
            latents = torch.cat([-latents[:, :block_size], latents[:, block_size:]], dim=1)
        return {"latents": latents}

    arguments = {"output_type": "latent", **case.multi_block}
    plain = BitDanceTokenizer.codes_to_sequence(run(pipe, case, **arguments), block_size)
    edited = BitDanceTokenizer.codes_to_sequence(
        run(pipe, case, **arguments, callback_on_step_end=flip_first_block), block_size)  # fmt: skip
    assert torch.equal(edited[:, :block_size], -plain[:, :block_size])
    # Same noise (one generator, same draws), other conditions: the later blocks change.
    assert not torch.equal(edited[:, block_size:], plain[:, block_size:])


def test_callback_changing_the_last_latents_changes_the_output(case, pipe):
    def zero_at_last_step(pipe, step, timestep, callback_kwargs):
        if step == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    codes = run(pipe, case, callback_on_step_end=zero_at_last_step, output_type="latent", **case.multi_block)
    assert codes.abs().sum() == 0
