"""Live classifier-free guidance, as diffusers' dynamic-guidance callbacks use it, in both pipelines.

A callback that sets ``pipe._guidance_scale`` changes the next blocks; when guidance ends the unconditional rows leave
the batch. The reference of every test is a run whose per-block schedule was given up front (``guidance_schedule``
weights), which must give the same tokens.
"""

import math

import pytest
import torch

from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline
from conftest import generator
from cuda_graph_stub import eager_graphs  # noqa: F401 (fixture)


def t2i(pipe, **kwargs):
    kwargs = {"height": 128, "width": 128, "num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "latent",
              "generator": [generator(0), generator(1)], **kwargs}  # fmt: skip
    return pipe(["a red circle", "two small blue squares"], **kwargs).images


def set_guidance_after(block_index, value, seen=None):
    """A callback that sets ``pipe._guidance_scale = value`` after block ``block_index`` and records what the pipeline
    reports at every block."""

    def callback(pipe, block, timestep, callback_kwargs):
        if seen is not None:
            seen.append((pipe.guidance_scale, pipe.do_classifier_free_guidance))
        if block == block_index:
            pipe._guidance_scale = value
        return callback_kwargs

    return callback


class RowCounter:
    """Rows of every backbone block step and head call (what the rest of the run costs)."""

    def __init__(self, pipe):
        self.pipe, self.steps, self.heads = pipe, [], []

    def observe(self, kind, forward):
        def wrapper(*args, **kwargs):
            if kind == "block step":
                self.steps.append((kwargs.get("tokens", args[-1] if args else None)).shape[0])
            elif kind == "head":
                self.heads.append(args[0].shape[0])
            return forward(*args, **kwargs)

        return wrapper

    def __enter__(self):
        self._contexts = [self.pipe.block_engine.observe_calls(self.observe),
                          self.pipe.head_sampler.observe_calls(self.observe)]  # fmt: skip
        for context in self._contexts:
            context.__enter__()
        return self

    def __exit__(self, *exc):
        for context in reversed(self._contexts):
            context.__exit__(*exc)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic-cache", "static-cache"])
def test_guidance_ended_by_a_callback_equals_the_schedule_given_up_front(tiny_pipe, static_cache):
    tiny_pipe.block_engine.static_cache = static_cache
    seen = []
    with RowCounter(tiny_pipe) as live:
        cut = t2i(tiny_pipe, callback_on_step_end=set_guidance_after(1, 0.0, seen))
    # 4 blocks: guided, guided, then unguided with the unconditional rows gone from the cache and the head.
    assert seen == [(4.0, True), (4.0, True), (0.0, False), (0.0, False)]
    assert tiny_pipe.do_classifier_free_guidance is False
    assert live.steps == [4, 2, 2] and live.heads == [4] * 6 + [2] * 6
    with RowCounter(tiny_pipe) as scheduled:
        up_front = t2i(tiny_pipe, guidance_schedule=[1, 1, 0, 0])
    assert torch.equal(cut, up_front) and scheduled.steps == live.steps and scheduled.heads == live.heads
    assert not torch.equal(cut, t2i(tiny_pipe))
    assert tiny_pipe.do_classifier_free_guidance is True  # every block of that run was guided


def test_guidance_raised_every_block_equals_the_schedule_given_up_front(tiny_pipe):
    """diffusers' test_callback_cfg pattern: the scale grows by one after every block."""

    def increase(pipe, block, timestep, callback_kwargs):
        pipe._guidance_scale += 1.0
        return callback_kwargs

    live = t2i(tiny_pipe, guidance_scale=2.0, callback_on_step_end=increase)
    assert tiny_pipe.guidance_scale == 2.0 + tiny_pipe.num_timesteps
    # Block b is guided with 2 + b = 1 + (2 - 1) * (1 + b).
    assert torch.equal(live, t2i(tiny_pipe, guidance_scale=2.0, guidance_schedule=[1.0, 2.0, 3.0, 4.0]))


def test_guidance_raised_after_it_ended_warns_and_stays_off(tiny_pipe, caplog):
    def off_then_on(pipe, block, timestep, callback_kwargs):
        pipe._guidance_scale = 0.0 if block == 0 else 5.0
        return callback_kwargs

    codes = t2i(tiny_pipe, callback_on_step_end=off_then_on)
    assert "after guidance had ended" in caplog.text
    assert torch.equal(codes, t2i(tiny_pipe, guidance_schedule=[1, 0, 0, 0]))


def test_graphed_run_drops_the_unconditional_rows_too(tiny_pipe, eager_graphs):
    eager = t2i(tiny_pipe, callback_on_step_end=set_guidance_after(1, 1.0))
    tiny_pipe.enable_cuda_graphs()
    assert torch.equal(t2i(tiny_pipe, callback_on_step_end=set_guidance_after(1, 1.0)), eager)
    # Head: one graph for 4 rows, one for 2; block step: one over the 4-row cache, one after the rows were dropped.
    assert len(eager_graphs) == 4


@pytest.fixture
def tiny_imagenet():
    pipe = build_random_imagenet_pipeline(block_size=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def imagenet(pipe, **kwargs):
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "latent",
              "generator": [generator(0), generator(1)], **kwargs}  # fmt: skip
    return pipe([3, 7], **kwargs).images


def test_imagenet_schedule_follows_the_new_scale(tiny_imagenet):
    """The linear ramp continues from the new value: 1 + (2 - 1) * b / 4 after block 1, as weights for the scale 3."""
    live = imagenet(tiny_imagenet, callback_on_step_end=set_guidance_after(1, 2.0))
    weights = [0 / 4, 1 / 4, 0.5 * 2 / 4, 0.5 * 3 / 4]
    assert tiny_imagenet.guidance_scales(3.0, 4, weights) == [1.0, 1.5, 1.5, 1.75]
    assert torch.equal(live, imagenet(tiny_imagenet, guidance_schedule=weights))
    assert not torch.equal(live, imagenet(tiny_imagenet))


def test_imagenet_guidance_ended_by_a_callback_drops_the_null_class_rows(tiny_imagenet):
    seen = []
    with RowCounter(tiny_imagenet) as live:
        cut = imagenet(tiny_imagenet, callback_on_step_end=set_guidance_after(1, 1.0, seen))
    assert [cfg for _, cfg in seen] == [True, True, False, False] and not tiny_imagenet.do_classifier_free_guidance
    assert live.steps == [4, 2, 2]
    assert torch.equal(cut, imagenet(tiny_imagenet, guidance_schedule=[0, 1 / 4, 0, 0]))


def test_guidance_is_checked_by_name(tiny_pipe, tiny_imagenet):
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="`guidance_scale` must be finite"):
            t2i(tiny_pipe, guidance_scale=bad)
        with pytest.raises(ValueError, match="`guidance_scale` must be finite"):
            imagenet(tiny_imagenet, guidance_scale=bad)
    for bad in ("7.5", None, True, [7.5]):
        with pytest.raises(ValueError, match="`guidance_scale` must be a number"):
            t2i(tiny_pipe, guidance_scale=bad)
        with pytest.raises(ValueError, match="`guidance_scale` must be a number"):
            imagenet(tiny_imagenet, guidance_scale=bad)
    with pytest.raises(ValueError, match="`guidance_schedule` must be one of .* got 'cosine'"):
        t2i(tiny_pipe, guidance_schedule="cosine")
    for bad in ([1, 1, 1], [1, 1, -1, 1], [1, 1, math.nan, 1]):
        with pytest.raises(ValueError, match="4 finite numbers for this image's 4 blocks"):
            imagenet(tiny_imagenet, guidance_schedule=bad)
