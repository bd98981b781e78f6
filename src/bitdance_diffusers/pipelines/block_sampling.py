"""The block-autoregressive sampling loop shared by every BitDance pipeline.

For one autoregressive block the backbone gives a condition per token; the diffusion head then integrates the binary
flow for the ``P`` tokens of the block jointly, with classifier-free guidance on the velocity (see
`bitdance_diffusers.schedulers.scheduling_binary_flow` for the conventions), and the result is binarised
(`sample_block_tokens`). The sampled block is fed back to the backbone, whose KV cache then yields the condition of
the next block (`BlockAutoregressiveMixin.sample_blocks`).
"""

import functools
import inspect
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..utils.cuda_graphs import CUDAGraphRunner
from ..utils.token_layout import binarize


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
    step_kwargs = {"generator": generator} if step_takes_generator(type(scheduler)) else {}
    for timestep in scheduler.timesteps:
        # The head's time t = 1 - sigma; float64 keeps it exact for BinaryFlowScheduler's float32 grid.
        t = (1 - timestep.double() / num_train_timesteps).float()
        model_input = torch.cat([sample, sample]) if guided else sample
        x_pred = head(model_input, t.expand(model_input.shape[0]), condition, attention_kwargs=attention_kwargs)
        velocity = x_prediction_to_velocity(x_pred, model_input, t)
        if guided:
            velocity_cond, velocity_uncond = velocity.chunk(2)
            velocity = velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
        sample = scheduler.step(-velocity, timestep, sample, return_dict=False, **step_kwargs)[0]
    return binarize(sample.float())


class BlockAutoregressiveMixin:
    """The block loop of a BitDance pipeline: sample a block, run callbacks, feed it back, repeat.

    The pipeline provides the backbone through two things: the head condition of the first block, and a function that
    feeds a sampled block to the backbone (extending its KV cache) and returns the condition of the next block. It
    must have ``diffusion_head``, ``scheduler`` and ``vae`` components, an ``image_processor`` and an ``_interrupt``
    flag.
    """

    _head_cuda_graphs: CUDAGraphRunner | None = None
    _cuda_graphs = False  # the backbone's block step too, where the pipeline supports it
    _static_kv_cache = False

    # Read by callbacks (``pipe.guidance_scale``, ``pipe.num_timesteps`` = number of blocks, ...).
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    def decode_codes(
        self, codes: torch.Tensor, output_type: str, generator: torch.Generator | list[torch.Generator] | None
    ):
        """Code grid ``[B, C, h, w]`` -> images of ``output_type`` (``"latent"`` returns the codes as they are).

        After an interrupt (``pipe._interrupt = True`` in a callback) the blocks not sampled are zeros; the decode reads
        them as -1, the encoder's binarisation of 0, so the image shows the blocks sampled so far.
        """
        if output_type == "latent":
            return codes
        if self.interrupt:
            codes = binarize(codes)
        image = self.vae.decode(codes.to(self.vae.dtype), generator=generator).sample
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    @staticmethod
    def check_generator_type(generator):
        """Raise unless ``generator`` is ``None``, a ``torch.Generator`` or a list of them (a seed is a common slip)."""
        generators = generator if isinstance(generator, list) else [generator]
        if not all(item is None or isinstance(item, torch.Generator) for item in generators):
            raise TypeError(
                f"`generator` must be a torch.Generator or a list of them, got {generator!r}; for a seed pass "
                "torch.Generator(device).manual_seed(seed)."
            )

    def check_scheduler(self):
        """Raise if ``self.scheduler`` cannot sample a block, which would otherwise give noise without an error.

        The head's velocity is ``dx/dsigma`` of the flow ``x = (1 - sigma) * tokens + sigma * noise``, integrated from
        sigma = 1 to 0 on a grid that does not depend on the image: noise-prediction (``epsilon``, ``v_prediction``)
        schedulers, multistep solvers outside their flow mode, dynamic (resolution-dependent) shifting and inverted
        sigmas do not fit.
        """
        config = self.scheduler.config
        name = type(self.scheduler).__name__
        prediction_type = config.get("prediction_type", "flow_prediction")
        if prediction_type != "flow_prediction" or not config.get("use_flow_sigmas", True):
            raise ValueError(
                f"{name} (prediction_type={prediction_type!r}, use_flow_sigmas={config.get('use_flow_sigmas')}) does not "
                "integrate a flow, which is what BitDance's diffusion head predicts. Use BinaryFlowScheduler (the "
                "original's sampler) or FlowMatchEulerDiscreteScheduler, or, for a multistep solver, "
                f"{name}.from_config(pipe.scheduler.config, use_flow_sigmas=True, prediction_type='flow_prediction')."
            )
        if "num_train_timesteps" not in config:
            raise ValueError(f"{name} has no num_train_timesteps; it is not a flow scheduler.")
        if config.get("use_dynamic_shifting") or config.get("invert_sigmas"):
            raise ValueError(
                f"{name} with use_dynamic_shifting={config.get('use_dynamic_shifting')}, "
                f"invert_sigmas={config.get('invert_sigmas')}: BitDance samples every block from noise to tokens with "
                "no resolution-dependent shift; set both to False (a fixed `shift` is fine)."
            )

    def enable_cuda_graphs(self, backbone: bool = True):
        r"""
        Replay the diffusion head, and with ``backbone`` the backbone's block step over a preallocated static KV cache
        (text-to-image pipeline), from CUDA graphs captured once per batch shape. At small batches the kernel launches
        of eager PyTorch, not the weight reads, would otherwise set the pace: the head runs ``N + 1`` times per block.
        CUDA only; undo with `disable_cuda_graphs`.
        """
        self._head_cuda_graphs = CUDAGraphRunner(self.diffusion_head)
        self._cuda_graphs = self._static_kv_cache = backbone

    def disable_cuda_graphs(self):
        self._head_cuda_graphs = None
        self._cuda_graphs = self._static_kv_cache = False

    def reset_cuda_graphs(self):
        """Drop the head's captured graphs: they replay the weights, LoRA adapters and adapter scales of their capture.
        The next call captures anew. Every change of the LoRA adapters calls this; the backbone's graph is captured
        per call anyway."""
        if self._head_cuda_graphs is not None:
            self._head_cuda_graphs = CUDAGraphRunner(self.diffusion_head)

    def sample_blocks(
        self,
        condition: torch.Tensor,
        feed_block: Callable[[torch.Tensor, int], torch.Tensor],
        num_images: int,
        num_blocks: int,
        num_channels: int,
        guidance_scales: list[float],
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = (),
    ) -> torch.Tensor:
        """Sample ``num_blocks`` blocks of tokens.

        Args:
            condition: ``[R, P, D]`` head condition of block 0. ``R = num_images`` without guidance, else
                ``2 * num_images`` rows: the conditional branch first, then the unconditional one.
            feed_block: ``feed_block(tokens [R, P, C], block)`` gives the backbone block ``block`` (one token row
                per condition row) and returns the ``[R, P, D]`` condition of block ``block + 1``. Not called after
                the last block.
            guidance_scales: CFG scale of every block. A block whose scale is ``<= 1`` while ``R = 2 * num_images``
                is sampled without guidance for all ``R`` rows (noise for ``R`` rows), and each branch is fed its own
                tokens; with guidance both branches are fed the same tokens.
            generator: one generator for all draws, or one per image (used for both branches of that image).
            callback_on_step_end: called after every block as ``callback(pipe, block, block, callback_kwargs)``;
                ``latents`` (``[num_images, num_blocks * P, C]``, patch-raster order, zeros after the current block)
                may be replaced through its return value.

        Returns:
            ``[num_images, num_blocks * P, C]`` float32 ±1 tokens in patch-raster order.
        """
        block_size = condition.shape[1]
        latents = torch.zeros(num_images, num_blocks * block_size, num_channels, device=condition.device)
        with self.progress_bar(total=num_blocks) as progress_bar:
            for block in range(num_blocks):
                if self._interrupt:
                    continue
                block_slice = slice(block * block_size, (block + 1) * block_size)
                rows = condition.shape[0]
                # Quirk of the original ImageNet sampler, kept: when a block's scale is exactly 1 (block 0 of the
                # linear schedule) it samples the conditional and unconditional rows as independent samples (noise for
                # all rows), and each branch then continues from its own tokens.
                guided = guidance_scales[block] > 1.0 and rows > num_images
                sampled_rows = num_images if guided else rows
                block_generator = generator * (sampled_rows // num_images) if isinstance(generator, list) else generator
                tokens = sample_block_tokens(
                    self._head_cuda_graphs or self.diffusion_head,
                    self.scheduler,
                    condition,
                    num_inference_steps,
                    guidance_scales[block] if guided else 1.0,
                    block_generator,
                    num_channels,
                    attention_kwargs,
                )
                latents[:, block_slice] = tokens[:num_images]

                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, block, block, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)

                # Feed the block back, except after the last one (its outputs would condition nothing).
                if block + 1 < num_blocks:
                    own_rows = latents[:, block_slice]
                    if guided or rows == num_images:
                        row_tokens = own_rows.repeat(rows // num_images, 1, 1)
                    else:  # the unguided 2-branch block above: the unconditional rows keep their own tokens
                        row_tokens = torch.cat([own_rows, tokens[num_images:]])
                    condition = feed_block(row_tokens, block)
                progress_bar.update()
        return latents
