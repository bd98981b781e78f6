"""The per-block head sampling loop shared by every BitDance pipeline.

For one autoregressive block the backbone gives a condition per token; the diffusion head then integrates the binary
flow for the ``P`` tokens of the block jointly, with classifier-free guidance on the velocity (see
`bitdance_diffusers.schedulers.scheduling_binary_flow` for the conventions), and the result is binarised.
"""

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..utils.token_layout import binarize


# x-prediction -> velocity divides by (1 - t), floored as in training (target v = (x - z) / max(1 - t, 0.05)).
VELOCITY_DENOMINATOR_MIN = 0.05


def x_prediction_to_velocity(x_pred: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``v = (x_pred - x_t) / max(1 - t, 0.05)`` in float32."""
    return (x_pred.float() - sample) / (1 - t).clamp_min(VELOCITY_DENOMINATOR_MIN)


def sample_block_tokens(
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
        condition: ``[R, P, D]``. With guidance (``guidance_scale > 1``) the first ``R / 2`` rows are the conditional
            branch and the rest the unconditional one, and ``R / 2`` token rows are sampled; otherwise ``R`` rows.
        num_inference_steps: passed to ``scheduler.set_timesteps`` (called here, once per block).
        guidance_scale: CFG scale on the velocity; ``<= 1`` samples every condition row independently.
        generator: noise source: the initial noise ``[rows, P, C]`` float32, then the scheduler's per-step draws.
        num_channels: bits per token ``C``.

    Returns:
        ``[rows, P, C]`` float32 tokens in {-1, +1}.
    """
    guided = guidance_scale > 1.0
    rows, block_size = condition.shape[0] // (2 if guided else 1), condition.shape[1]
    device = condition.device
    sample = randn_tensor((rows, block_size, num_channels), generator=generator, device=device, dtype=torch.float32)
    scheduler.set_timesteps(num_inference_steps, device=device)
    num_train_timesteps = scheduler.config.num_train_timesteps
    for timestep in scheduler.timesteps:
        # The head's time t = 1 - sigma; float64 keeps it exact for BinaryFlowScheduler's float32 grid.
        t = (1 - timestep.double() / num_train_timesteps).float()
        model_input = torch.cat([sample, sample]) if guided else sample
        x_pred = head(model_input, t.expand(model_input.shape[0]), condition, attention_kwargs=attention_kwargs)
        velocity = x_prediction_to_velocity(x_pred, model_input, t)
        if guided:
            velocity_cond, velocity_uncond = velocity.chunk(2)
            velocity = velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
        sample = scheduler.step(-velocity, timestep, sample, generator=generator, return_dict=False)[0]
    return binarize(sample.float())
