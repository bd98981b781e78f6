"""The block-autoregressive sampling loop shared by every BitDance pipeline.

For one autoregressive block the pipeline's block engine gives a condition per token; the head sampler draws the
block's tokens from it (`engines.head_sampler`); the sampled block is fed back to the engine, whose KV cache then
yields the condition of the next block (`BlockAutoregressiveMixin.sample_blocks`).
"""

from typing import Callable

import torch

from ..utils.token_layout import binarize
from .engines import BlockEngine, DiffusionHeadSampler


class BlockAutoregressiveMixin:
    """The block loop of a BitDance pipeline: sample a block, run callbacks, feed it back, repeat.

    The pipeline sets ``block_engine`` (a `BlockEngine` for its backbone) and ``head_sampler`` (a
    `DiffusionHeadSampler`) in ``__init__``, prefills the engine inside its ``session`` and calls `sample_blocks`. It
    must have ``diffusion_head``, ``scheduler`` and ``vae`` components, an ``image_processor`` and an ``_interrupt``
    flag.
    """

    block_engine: BlockEngine
    head_sampler: DiffusionHeadSampler

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
        Replay the diffusion head, and with ``backbone`` the backbone's block step where its engine supports it (the
        text-to-image language model, over a preallocated static KV cache), from CUDA graphs captured once per batch
        shape. At small batches the kernel launches of eager PyTorch, not the weight reads, would otherwise set the
        pace: the head runs ``N + 1`` times per block. CUDA only; undo with `disable_cuda_graphs`.
        """
        self.head_sampler.enable_cuda_graphs()
        if backbone and self.block_engine.supports_cuda_graphs:
            self.block_engine.enable_cuda_graphs()

    def disable_cuda_graphs(self):
        self.head_sampler.disable_cuda_graphs()
        self.block_engine.disable_cuda_graphs()

    def reset_cuda_graphs(self):
        """Drop every captured graph; the next call captures anew. The head sampler does it by itself whenever the
        head's weights, adapters, scales, placement, hooks or compilation change (`graph_dependencies`), and the
        backbone's graph lives for one call; call this from a callback that changes the backbone's adapters
        mid-generation."""
        self.head_sampler.invalidate()
        self.block_engine.invalidate()

    def sample_blocks(
        self,
        condition: torch.Tensor,
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
        """Sample ``num_blocks`` blocks of tokens, feeding each to ``self.block_engine`` (prefilled by the caller).

        Args:
            condition: ``[R, P, D]`` head condition of block 0. ``R = num_images`` without guidance, else
                ``2 * num_images`` rows: the conditional branch first, then the unconditional one.
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
                if self.interrupt:
                    continue
                block_slice = slice(block * block_size, (block + 1) * block_size)
                rows = condition.shape[0]
                # Quirk of the original ImageNet sampler, kept: when a block's scale is exactly 1 (block 0 of the
                # linear schedule) it samples the conditional and unconditional rows as independent samples (noise for
                # all rows), and each branch then continues from its own tokens.
                guided = guidance_scales[block] > 1.0 and rows > num_images
                sampled_rows = num_images if guided else rows
                block_generator = generator * (sampled_rows // num_images) if isinstance(generator, list) else generator
                tokens = self.head_sampler.sample(
                    self.diffusion_head,
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
                    condition = self.block_engine.step(row_tokens, block)
                progress_bar.update()
        return latents
