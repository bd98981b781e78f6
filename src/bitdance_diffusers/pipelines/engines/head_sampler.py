"""The diffusion head's sampler: the tokens of one block, integrated by a flow scheduler, with guidance.

For one autoregressive block the backbone gives a condition per token; the diffusion head then integrates the binary
flow for the ``P`` tokens of the block jointly, with classifier-free guidance on the velocity (see
`bitdance_diffusers.schedulers.scheduling_binary_flow` for the conventions), and the result is binarised.
`DiffusionHeadSampler` owns the head's fast path: its calls replayed from CUDA graphs, dropped whenever the head's
weights, adapters or placement change.
"""

import functools
import inspect

import torch
from diffusers.utils.torch_utils import randn_tensor

from ...utils.token_layout import binarize
from .block_engine import ForwardRunner
from .cuda_graphs import CUDAGraphRunner, graph_dependencies


# x-prediction -> velocity divides by (1 - t), floored as in training (target v = (x - z) / max(1 - t, 0.05)).
VELOCITY_DENOMINATOR_MIN = 0.05


def x_prediction_to_velocity(x_pred: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``v = (x_pred - x_t) / max(1 - t, 0.05)`` in float32."""
    return (x_pred.float() - sample) / (1 - t).clamp_min(VELOCITY_DENOMINATOR_MIN)


@functools.cache
def step_takes_generator(scheduler_class: type) -> bool:
    """Stochastic schedulers draw their noise from a ``generator``; deterministic ones (UniPC, DPM-Solver) take none.
    Looked up once per scheduler class, not once per block."""
    return "generator" in inspect.signature(scheduler_class.step).parameters


class DiffusionHeadSampler(ForwardRunner):
    """Samples the ±1 tokens of one block with a diffusion head and a flow scheduler.

    With `enable_cuda_graphs` every head call replays a CUDA graph captured once per input shape (at small batches the
    kernel launches of eager PyTorch, not the weight reads, would otherwise set the pace: the head runs ``N + 1`` times
    per block). The graphs are dropped (`invalidate`) when the head given to `sample` is another module or when its
    `graph_dependencies` changed since the capture: new weights, adapters, scales, placement, hooks or compilation.
    """

    def __init__(self):
        super().__init__()
        self._runner = self._dependencies = None

    def invalidate(self):
        self._runner = self._dependencies = None

    def _forward(self, head: torch.nn.Module):
        """``head`` itself, or with CUDA graphs the runner that replays it (checked against the head's current
        dependencies once per block: a callback may change adapters between blocks)."""
        if not self.cuda_graphs:
            return head
        dependencies = graph_dependencies(head)
        if self._runner is None or self._runner.function is not head or dependencies != self._dependencies:
            self.invalidate()
            self._runner, self._dependencies = CUDAGraphRunner(head), dependencies
        return self._runner

    def sample(
        self,
        head: torch.nn.Module,
        scheduler,
        condition: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        num_channels: int,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Sample the ±1 tokens of one block.

        Args:
            head: maps ``(x_t [R, P, C], t [R], condition [R, P, D])`` to an x-prediction.
            scheduler: a flow scheduler (`BinaryFlowScheduler`, ``FlowMatchEulerDiscreteScheduler``, ...).
            condition: ``[R, P, D]``. With guidance (``guidance_scale > 1``) the first ``R / 2`` rows are the
                conditional branch and the rest the unconditional one, and ``R / 2`` token rows are sampled; otherwise
                ``R`` rows.
            num_inference_steps: passed to ``scheduler.set_timesteps`` (called here, once per block).
            guidance_scale: CFG scale on the velocity; ``<= 1`` samples every condition row independently.
            generator: noise source: the initial noise ``[rows, P, C]`` float32, then the scheduler's per-step draws.
            num_channels: bits per token ``C``.
            attention_kwargs: passed to the head's attention processors.

        Returns:
            ``[rows, P, C]`` float32 tokens in {-1, +1}.
        """
        guided = guidance_scale > 1.0
        rows, block_size = condition.shape[0] // (2 if guided else 1), condition.shape[1]
        device = condition.device
        sample = randn_tensor((rows, block_size, num_channels), generator=generator, device=device, dtype=torch.float32)
        scheduler.set_timesteps(num_inference_steps, device=device)
        num_train_timesteps = scheduler.config.num_train_timesteps
        step_kwargs = {"generator": generator} if step_takes_generator(type(scheduler)) else {}
        forward = self._observed("head", self._forward(head))
        for timestep in scheduler.timesteps:
            # The head's time t = 1 - sigma; float64 keeps it exact for BinaryFlowScheduler's float32 grid.
            t = (1 - timestep.double() / num_train_timesteps).float()
            model_input = torch.cat([sample, sample]) if guided else sample
            x_pred = forward(
                model_input, t.expand(model_input.shape[0]), condition, attention_kwargs=attention_kwargs, return_dict=False
            )[0]
            velocity = x_prediction_to_velocity(x_pred, model_input, t)
            if guided:
                velocity_cond, velocity_uncond = velocity.chunk(2)
                velocity = velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
            sample = scheduler.step(-velocity, timestep, sample, return_dict=False, **step_kwargs)[0]
        return binarize(sample.float())
