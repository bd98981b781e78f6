"""A text-to-image generation on fake tensors (shapes and dtypes only: no memory, no compute, no GPU) at any config.

The set-up `estimate_memory.py`, `profiling/count_traffic.py` and `profiling/profile_gemms.py` share: their options,
the random pipeline built under the caller's `FakeTensorMode`, the generation they watch, and the hooks that tell its
head calls and block steps apart. Values are never read under fake tensors, so building the pipeline here also
bypasses the two value lookups of a generation (the scheduler's step lookup and the decoder's ±1 check) for the rest
of the process, and the generation takes every prompt token's mask as set (`AllTokensMask`).
"""

import torch
from bench_utils import DTYPES, T2I_CONFIGS
from torch.utils._python_dispatch import TorchDispatchMode

from bitdance_diffusers import BinaryFlowScheduler, BitDanceTokenizer
from bitdance_diffusers.random_pipeline import build_random_pipeline


PROMPT = "a red fox in the snow"


def add_fake_generation_arguments(parser):
    """Config, size, guidance, batch and dtype, defaulting to BitDance-14B-64x at 1024x1024 in bf16."""
    parser.add_argument("--config", choices=sorted(T2I_CONFIGS), default="14b-64x")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")


def build_fake_pipeline(args):
    """The random pipeline of ``args``, built under the caller's `FakeTensorMode`, and the tensors it holds (weights
    and buffers: what a counter must not count as new)."""
    BinaryFlowScheduler._init_step_index = lambda scheduler, timestep: setattr(scheduler, "_step_index", 0)
    BitDanceTokenizer._check_codes = lambda tokenizer, codes: None
    model, block_size = T2I_CONFIGS[args.config]
    pipe = build_random_pipeline(model, block_size=block_size, image_sizes=[[args.height, args.width]],
                                 dtype=DTYPES[args.dtype])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    modules = [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]
    return pipe, [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]


class AllTokensMask(TorchDispatchMode):
    """Indexing with a boolean mask, whose result's size depends on the mask's values, taken with the whole mask set.

    The pipeline selects each prompt's tokens from its left-padded row with the row's mask; a fake generation's prompts
    are all the same (and the unconditional ones too), so no row has padding and the whole row is selected.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            source, indices = args
            if len(indices) != 1 or tuple(indices[0].shape) != tuple(source.shape[: indices[0].dim()]):
                raise NotImplementedError(f"boolean indexing of {tuple(source.shape)} by {len(indices)} indices")
            return source.reshape(-1, *source.shape[indices[0].dim() :]).clone()
        return func(*args, **(kwargs or {}))


def generate(pipe, args, num_inference_steps: int, output_type: str):
    """One generation of ``args.batch`` images of the prompt at the size and guidance of ``args``."""
    with AllTokensMask():
        return pipe([PROMPT] * args.batch, height=args.height, width=args.width,
                    num_inference_steps=num_inference_steps, guidance_scale=args.guidance,
                    output_type=output_type)  # fmt: skip


def watch_calls(pipe, enter, leave):
    """Calls ``enter(part)`` before and ``leave(part)`` after every head call (``part`` ``"head call"``) and every
    language-model block step (``"language-model block step"``) of ``pipe``. The language model's call before the
    first head call, the prompt's prefill, is not watched."""
    head_called = False

    def hooks(part):
        def before(*_):
            nonlocal head_called
            head_called = head_called or part == "head call"
            if head_called:
                enter(part)

        def after(*_):
            if head_called:
                leave(part)

        return before, after

    for module, part in ((pipe.language_model, "language-model block step"), (pipe.diffusion_head, "head call")):
        before, after = hooks(part)
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
