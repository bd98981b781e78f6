"""BitDancePipeline behaviour on tiny random models: batching, RNG contract, schedulers, outputs, callbacks, errors."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

import bitdance_diffusers
from bitdance_diffusers import BinaryFlowScheduler, BitDancePipeline
from bitdance_diffusers.random_pipeline import build_byte_tokenizer
from bitdance_diffusers.schedulers import FLOW_OPTIONS
from bitdance_diffusers.utils.token_layout import grid_to_sequence
from conftest import generator


def run(pipe, prompt="a red circle", **kwargs):
    kwargs = {"height": 128, "width": 128, "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent", **kwargs}
    return pipe(prompt, **kwargs).images


def test_batched_prompts_equal_single_runs(tiny_pipe):
    prompts = ["a red circle", "two small blue squares at the top", "x"]
    batched = run(tiny_pipe, prompts, num_images_per_prompt=2, generator=[generator(i) for i in range(6)])
    assert batched.shape == (6, 32, 8, 8)
    for index in range(6):
        single = run(tiny_pipe, prompts[index // 2], generator=generator(index))
        assert torch.equal(batched[index : index + 1], single)


def test_batched_without_guidance_equals_single_runs(tiny_pipe):
    prompts = ["short", "a much longer prompt with many more tokens in it"]
    batched = run(tiny_pipe, prompts, guidance_scale=1.0, generator=[generator(5), generator(6)])
    for index, prompt in enumerate(prompts):
        assert torch.equal(batched[index : index + 1], run(tiny_pipe, prompt, guidance_scale=1.0, generator=generator(5 + index)))


def test_one_generator_draws_the_whole_batch_at_once(tiny_pipe):
    # With one generator the noise of all images comes from one stream (as the original's global RNG).
    first = run(tiny_pipe, "a", num_images_per_prompt=2, generator=generator(0))
    again = run(tiny_pipe, "a", num_images_per_prompt=2, generator=generator(0))
    assert torch.equal(first, again)
    assert not torch.equal(first[0], first[1])


def test_guidance_and_negative_prompt_change_the_result(tiny_pipe):
    base = run(tiny_pipe, generator=generator(0))
    assert not torch.equal(base, run(tiny_pipe, generator=generator(0), guidance_scale=1.0))
    assert not torch.equal(base, run(tiny_pipe, generator=generator(0), negative_prompt="blurry"))
    # An empty negative prompt means none (the prompt-free template), also per prompt in a batch.
    assert torch.equal(base, run(tiny_pipe, generator=generator(0), negative_prompt=""))
    assert torch.equal(base, run(tiny_pipe, ["a red circle"], generator=generator(0), negative_prompt=["  "]))


@pytest.mark.parametrize(
    "scheduler_class,options",
    [
        (FlowMatchEulerDiscreteScheduler, {}),
        (FlowMatchHeunDiscreteScheduler, {}),
        (UniPCMultistepScheduler, FLOW_OPTIONS),  # their step takes no generator
        (DPMSolverMultistepScheduler, FLOW_OPTIONS),
    ],
)
def test_diffusers_flow_schedulers_drop_in(tiny_pipe, scheduler_class, options):
    tiny_pipe.scheduler = scheduler_class.from_config(tiny_pipe.scheduler.config, **options)
    calls = []
    head_forward = tiny_pipe.diffusion_head.forward
    tiny_pipe.diffusion_head.forward = lambda *a, **k: calls.append(1) or head_forward(*a, **k)
    codes = run(tiny_pipe, num_inference_steps=4, generator=generator(0))
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    evaluations_per_block = 7 if scheduler_class is FlowMatchHeunDiscreteScheduler else 4  # Heun: 2 per step but the last
    assert len(calls) == 4 * evaluations_per_block  # 128x128 with P=16: 4 blocks
    image = run(tiny_pipe, num_inference_steps=2, generator=generator(0), output_type="pil")[0]
    assert isinstance(image, PIL.Image.Image) and image.size == (128, 128)


NOT_A_FLOW = "does not integrate a flow.*use_flow_sigmas=True, prediction_type='flow_prediction'"


@pytest.mark.parametrize(
    "scheduler,message",
    [
        (DDIMScheduler(), NOT_A_FLOW),
        (UniPCMultistepScheduler(), NOT_A_FLOW),
        (UniPCMultistepScheduler(prediction_type="flow_prediction"), NOT_A_FLOW),
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "no resolution-dependent shift; set both to False"),
        (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas=True"),
    ],
    ids=["ddim-epsilon", "unipc-epsilon", "unipc-without-flow-sigmas", "dynamic-shifting", "inverted-sigmas"],
)
def test_schedulers_that_cannot_sample_a_block_are_rejected(tiny_pipe, scheduler, message):
    tiny_pipe.scheduler = scheduler
    with pytest.raises(ValueError, match=message):
        run(tiny_pipe, generator=generator(0))


def test_num_inference_steps_sets_head_evaluations(tiny_pipe):
    calls = []
    head_forward = tiny_pipe.diffusion_head.forward
    tiny_pipe.diffusion_head.forward = lambda *a, **k: calls.append(1) or head_forward(*a, **k)
    run(tiny_pipe, num_inference_steps=5, generator=generator(0))
    assert len(calls) == 4 * 6  # N steps + the final deterministic one, per block


def test_output_types(tiny_pipe):
    pt = run(tiny_pipe, generator=generator(1), output_type="pt")
    assert pt.shape == (1, 3, 128, 128) and pt.min() >= 0 and pt.max() <= 1
    np_images = run(tiny_pipe, generator=generator(1), output_type="np")
    assert np_images.shape == (1, 128, 128, 3)
    np.testing.assert_allclose(np_images[0], pt[0].permute(1, 2, 0).numpy(), atol=1e-6)
    pil = run(tiny_pipe, generator=generator(1), output_type="pil")
    assert np.abs(np.asarray(pil[0]).astype(int) - np.round(np_images[0] * 255).astype(int)).max() <= 1
    (codes,) = tiny_pipe("a red circle", height=128, width=256, num_inference_steps=2, output_type="latent",
                         generator=generator(1), return_dict=False)  # fmt: skip
    assert codes.shape == (1, 32, 8, 16)


def test_callback_runs_once_per_block_and_can_edit_latents(tiny_pipe):
    seen = []

    def callback(pipe, block, timestep, callback_kwargs):
        seen.append((block, callback_kwargs["latents"].clone()))
        latents = callback_kwargs["latents"]
        if block == pipe.num_timesteps - 1:
            latents = torch.ones_like(latents)
        return {"latents": latents}

    codes = run(tiny_pipe, generator=generator(0), callback_on_step_end=callback)
    assert [block for block, _ in seen] == [0, 1, 2, 3] and tiny_pipe.num_timesteps == 4
    assert bool((seen[0][1][:, 16:] == 0).all()) and bool((seen[0][1][:, :16] != 0).all())
    assert bool((codes == 1).all())


def test_interrupt_from_a_callback_ends_the_loop_and_decodes_the_sampled_blocks(tiny_pipe):
    def stop_after_block_1(pipe, block, timestep, callback_kwargs):
        if block == 1:
            pipe._interrupt = True
        return callback_kwargs

    head_calls = []
    hook = tiny_pipe.diffusion_head.register_forward_pre_hook(lambda module, args: head_calls.append(1))
    try:
        full = grid_to_sequence(run(tiny_pipe, generator=generator(0)), 16)
        calls_per_block = len(head_calls) // 4
        head_calls.clear()
        stopped = run(tiny_pipe, generator=generator(0), callback_on_step_end=stop_after_block_1)
        assert len(head_calls) == 2 * calls_per_block
    finally:
        hook.remove()
    stopped_sequence = grid_to_sequence(stopped, 16)
    assert torch.equal(stopped_sequence[:, :32], full[:, :32]) and bool((stopped_sequence[:, 32:] == 0).all())

    images = run(tiny_pipe, generator=generator(0), callback_on_step_end=stop_after_block_1, output_type="np")
    binary = torch.where(stopped > 0, 1.0, -1.0)
    with torch.no_grad():
        expected = tiny_pipe.image_processor.postprocess(tiny_pipe.vae.decode(binary).sample, output_type="np")
    assert images.shape == (1, 128, 128, 3) and np.allclose(images, expected, atol=1e-6)
    # The next call starts uninterrupted.
    assert torch.equal(grid_to_sequence(run(tiny_pipe, generator=generator(0)), 16), full)


class RecordBlocks(PipelineCallback):
    tensor_inputs = ["latents"]

    def __init__(self):
        super().__init__()
        self.blocks = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.blocks.append(step_index)
        return callback_kwargs


class StopAtCutoff(PipelineCallback):
    """Interrupts at ``cutoff_step_ratio`` of the pipeline's steps (its blocks), as diffusers' cutoff callbacks count."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
            pipeline._interrupt = True
        return callback_kwargs


def test_diffusers_callback_objects_run_per_block(tiny_pipe):
    recorder = RecordBlocks()
    codes = run(tiny_pipe, generator=generator(0),
                callback_on_step_end=MultiPipelineCallbacks([recorder, StopAtCutoff(cutoff_step_ratio=0.5)]))  # fmt: skip
    assert recorder.blocks == [0, 1, 2]  # 4 blocks; cut off after block 2
    sequence = grid_to_sequence(codes, 16)
    assert bool((sequence[:, :48] != 0).all()) and bool((sequence[:, 48:] == 0).all())


def test_save_load_round_trip_and_diffusion_pipeline_resolution(tiny_pipe, tmp_path):
    reference = run(tiny_pipe, generator=generator(3))
    tiny_pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is BitDancePipeline and type(loaded.scheduler) is BinaryFlowScheduler
    assert loaded.config.block_size == 16 and [128, 128] in loaded.config.image_sizes
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(loaded, generator=generator(3)), reference)
    again = BitDancePipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert again.diffusion_head.dtype == torch.bfloat16 and again.language_model.dtype == torch.bfloat16


def test_bfloat16_runs_on_cpu(tiny_pipe):
    tiny_pipe.to(torch.bfloat16)
    image = run(tiny_pipe, generator=generator(0), output_type="pt")
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()


def test_model_cpu_offload_declaration(tiny_pipe):
    assert tiny_pipe.model_cpu_offload_seq.split("->") == ["language_model", "vae"]
    assert tiny_pipe._exclude_from_cpu_offload == ["diffusion_head", "projector"]


def test_errors_name_the_fix(tiny_pipe):
    with pytest.raises(ValueError, match="not supported by this model; choose one of: 128x128"):
        run(tiny_pipe, height=96, width=96)
    with pytest.raises(ValueError, match=r"register_to_config\(image_sizes=pipe.config.image_sizes \+ \[\[384, 128\]\]\)"):
        run(tiny_pipe, height=384, width=128)
    sizes = tiny_pipe.config.image_sizes
    tiny_pipe.register_to_config(image_sizes=sizes + [[384, 128]])
    assert run(tiny_pipe, height=384, width=128).shape == (1, 32, 24, 8)
    tiny_pipe.register_to_config(image_sizes=sizes)
    with pytest.raises(ValueError, match="empty list"):
        run(tiny_pipe, [])
    with pytest.raises(ValueError, match="list of 2 generators for 3 images"):
        run(tiny_pipe, ["a", "b", "c"], generator=[generator(0), generator(1)])
    with pytest.raises(ValueError, match="string or a list of strings"):
        run(tiny_pipe, 3)
    with pytest.raises(ValueError, match="`num_images_per_prompt` must be a positive integer, got 0"):
        run(tiny_pipe, num_images_per_prompt=0)
    with pytest.raises(TypeError, match=r"got 42; for a seed pass torch.Generator\(device\).manual_seed\(seed\)"):
        run(tiny_pipe, generator=42)


def test_tokenizer_without_query_tokens_is_rejected(tiny_pipe):
    run(tiny_pipe, num_inference_steps=1)  # the ids of the shipped tokenizer are looked up, then the tokenizer swapped
    tiny_pipe.tokenizer = build_byte_tokenizer().__class__(vocab={"a": 0, "b": 1}, merges=[])
    with pytest.raises(ValueError, match="lacks BitDance's special tokens"):
        run(tiny_pipe)


def test_missing_component_folder_is_reported(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "diffusion_head")
    with pytest.raises(ValueError, match="components \\['diffusion_head'\\] in model_index.json"):
        BitDancePipeline.from_pretrained(tmp_path)


def test_import_registers_pipeline_with_diffusers():
    import diffusers

    assert diffusers.BitDancePipeline is bitdance_diffusers.BitDancePipeline


def test_static_kv_cache_gives_the_same_tokens(tiny_pipe):
    """The CUDA-graph path's preallocated cache (positions not yet written are masked) equals the growing cache."""
    kwargs = dict(height=128, width=256, num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    prompts = ["a red circle", "two blue squares on a much longer line of text"]
    dynamic = tiny_pipe(prompts, generator=torch.Generator().manual_seed(5), **kwargs).images
    tiny_pipe.block_engine.static_cache = True
    static = tiny_pipe(prompts, generator=torch.Generator().manual_seed(5), **kwargs).images
    assert torch.equal(static, dynamic)


def test_one_progress_bar_per_generation_labelled_by_the_pipeline_config(tiny_pipe, monkeypatch):
    """One bar over the blocks, with no description of its own, so set_progress_bar_config(desc=...) labels it."""
    bars, progress_bar = [], tiny_pipe.progress_bar
    monkeypatch.setattr(tiny_pipe, "progress_bar", lambda **kwargs: bars.append(kwargs) or progress_bar(**kwargs))
    stream = io.StringIO()
    tiny_pipe.set_progress_bar_config(desc="blocks", file=stream, disable=False)
    run(tiny_pipe, generator=generator(0))
    output = stream.getvalue()
    assert bars == [{"total": 4}] and output.count("blocks:   0%") == 1 and output.count("\n") == 1 and "4/4" in output
