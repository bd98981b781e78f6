"""The block engines and the head sampler: their fast paths' logic on CPU (CUDA-graph captures stubbed, see
cuda_graph_stub), the graph invalidation, the observers; the GPU scripts compare real graphs with eager runs."""

import pytest
import torch
from diffusers.hooks import apply_group_offloading
from peft import LoraConfig

from bitdance_diffusers.loaders import add_lora_adapter
from bitdance_diffusers.pipelines.engines import CUDAGraphRunner, graph_dependencies
from bitdance_diffusers.quantization import quantize_model_
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline, build_random_pipeline
from conftest import generator
from cuda_graph_stub import eager_graphs  # noqa: F401 (fixture)


def t2i(pipe, prompt=("a red circle", "two blue squares on a longer line"), **kwargs):
    kwargs = {"height": 128, "width": 128, "num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "latent",
              "generator": generator(0), **kwargs}  # fmt: skip
    return pipe(list(prompt), **kwargs).images


def test_graph_runner_captures_once_per_shape_and_restores_state(eager_graphs):
    counter = torch.zeros((), dtype=torch.long)

    def step(x, scale=1.0):
        counter.add_(1)  # state the call advances, as a static cache's fill counter
        return x * scale + counter

    runner = CUDAGraphRunner(step, state=[counter])
    first = runner(torch.ones(2), scale=2.0)
    assert counter.item() == 1 and torch.equal(first, torch.full((2,), 3.0))  # capturing did not advance it
    second = runner(torch.zeros(2), scale=2.0)
    assert torch.equal(second, torch.full((2,), 2.0)) and torch.equal(first, torch.full((2,), 3.0))  # outputs copied
    runner(torch.ones(3), scale=2.0)
    assert len(eager_graphs) == 2 and len(runner.graphs) == 2  # one capture per input shape


def test_graph_runner_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors.*disable_cuda_graphs"):
        CUDAGraphRunner(torch.nn.Identity())(torch.ones(1))


def test_graphed_text_to_image_gives_the_eager_tokens(tiny_pipe, eager_graphs):
    eager = t2i(tiny_pipe)
    tiny_pipe.enable_cuda_graphs()
    assert tiny_pipe.block_engine.uses_static_cache
    graphed = t2i(tiny_pipe)
    assert torch.equal(graphed, eager)
    functions = [runner.function for runner in eager_graphs]
    # One head graph (one input shape); the language model's step graph is bound to the call's static cache.
    assert functions.count(tiny_pipe.diffusion_head) == 1 and len(functions) == 2
    assert torch.equal(t2i(tiny_pipe), eager)
    assert len(eager_graphs) == 3  # the head's graph replayed; the block step captured again for the new cache
    tiny_pipe.disable_cuda_graphs()
    assert not tiny_pipe.block_engine.uses_static_cache and torch.equal(t2i(tiny_pipe), eager)
    assert len(eager_graphs) == 3


def test_graphed_imagenet_gives_the_eager_tokens(eager_graphs):
    pipe = build_random_imagenet_pipeline(block_size=4)
    pipe.set_progress_bar_config(disable=True)
    run = dict(class_labels=[1, 2], num_inference_steps=2, output_type="latent")
    eager = pipe(**run, generator=generator(0)).images
    pipe.enable_cuda_graphs()  # the head only: the backbone's step runs over a growing cache
    assert not pipe.block_engine.cuda_graphs
    assert torch.equal(pipe(**run, generator=generator(0)).images, eager)
    assert [runner.function for runner in eager_graphs] == [pipe.diffusion_head]
    with pytest.raises(NotImplementedError, match="no CUDA-graph path"):
        pipe.block_engine.enable_cuda_graphs()


def test_reset_from_a_callback_captures_the_block_step_again(tiny_pipe, eager_graphs):
    """A callback that changes the language model's adapters mid-generation resets the graphs; the block step of
    the next block is captured anew (and the head's graph too, checked by the head sampler itself)."""
    eager = t2i(tiny_pipe)
    tiny_pipe.enable_cuda_graphs()

    def reset_after_block_1(pipe, block, timestep, callback_kwargs):
        if block == 1:
            pipe.reset_cuda_graphs()
        return callback_kwargs

    assert torch.equal(t2i(tiny_pipe, callback_on_step_end=reset_after_block_1), eager)
    functions = [runner.function for runner in eager_graphs]
    assert functions.count(tiny_pipe.diffusion_head) == 2 and len(functions) == 4


def test_graph_dependencies_see_every_change_of_weights_or_placement(tiny_pipe):
    head = tiny_pipe.diffusion_head
    before = graph_dependencies(head)
    assert graph_dependencies(head) == before

    changes = {
        "to(dtype)": lambda: head.to(torch.bfloat16),
        "to(float32)": lambda: head.to(torch.float32),
        "quantization": lambda: quantize_model_(head, "int8wo"),
        "compile": lambda: head.compile(backend="eager"),
        "group offloading": lambda: apply_group_offloading(head, onload_device=torch.device("cpu"),
                                                           offload_type="leaf_level"),
        "LoRA adapter": lambda: add_lora_adapter(head, LoraConfig(r=2, target_modules=["w1"])),
        "LoRA scale": lambda: head.set_adapters(["default"], weights=[0.5]),
        "LoRA disabled": lambda: head.disable_lora(),
    }  # fmt: skip
    for name, change in changes.items():
        change()
        after = graph_dependencies(head)
        assert after != before, name
        before = after


def test_head_graphs_are_captured_again_after_a_move_a_quantization_or_a_compile(tiny_pipe, eager_graphs):
    tiny_pipe.enable_cuda_graphs(backbone=False)

    def captures_after(change):
        change()
        t2i(tiny_pipe, prompt=["a"], height=64, width=64, num_inference_steps=1)
        return len(eager_graphs)

    assert captures_after(lambda: None) == 1 and captures_after(lambda: None) == 1
    assert captures_after(lambda: tiny_pipe.to(torch.bfloat16)) == 2
    assert captures_after(lambda: tiny_pipe.to(torch.float32)) == 3
    assert captures_after(lambda: quantize_model_(tiny_pipe.diffusion_head, "int8wo")) == 4
    assert captures_after(lambda: tiny_pipe.diffusion_head.compile(backend="eager")) == 5
    assert captures_after(lambda: None) == 5


def test_graphs_refuse_a_language_model_that_moves_its_weights_in_every_forward(tiny_pipe):
    apply_group_offloading(tiny_pipe.language_model, onload_device=torch.device("cpu"), offload_type="block_level",
                           num_blocks_per_group=1)  # fmt: skip
    tiny_pipe.enable_cuda_graphs()
    with pytest.raises(ValueError, match="sequential CPU offload or group offloading.*enable_model_cpu_offload"):
        t2i(tiny_pipe)


def test_observers_see_every_backbone_and_head_call(tiny_pipe):
    calls = []

    def observe(kind, forward):
        def wrapper(*args, **kwargs):
            calls.append(kind)
            return forward(*args, **kwargs)

        return wrapper

    with tiny_pipe.block_engine.observe_calls(observe), tiny_pipe.head_sampler.observe_calls(observe):
        t2i(tiny_pipe, num_inference_steps=2)
    # 128x128 with P = 16: 4 blocks of (2 + 1) head calls, one prefill, 3 block steps.
    assert calls.count("prefill") == 1 and calls.count("block step") == 3 and calls.count("head") == 12
    calls.clear()
    t2i(tiny_pipe)
    assert calls == []
