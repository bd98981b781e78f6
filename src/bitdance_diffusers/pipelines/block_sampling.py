"""The block-autoregressive sampling loop shared by every BitDance pipeline.

For one autoregressive block the pipeline's block engine gives a condition per token; the head sampler draws the
block's tokens from it (`engines.head_sampler`); the sampled block is fed back to the engine, whose KV cache then
yields the condition of the next block (`BlockAutoregressiveMixin.sample_blocks`).

Guidance is live, as in diffusers: the scale of each block is read when the block starts, from
``pipe._guidance_scale`` (which a ``callback_on_step_end`` may change) and the pipeline's guidance schedule. When no
later block can be guided any more, the unconditional rows leave the batch and their KV cache rows are dropped, so the
rest of the image costs half.
"""

import math
import numbers
from typing import Callable, Sequence

import torch
from diffusers.utils import logging

from ..utils.token_layout import binarize
from .engines import BlockEngine, DiffusionHeadSampler


logger = logging.get_logger(__name__)

GUIDANCE_SCHEDULES = ("constant", "linear")


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
        """Whether the unconditional branch is (still) in the batch: False once guidance has ended."""
        return self._do_classifier_free_guidance

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # Guidance ---------------------------------------------------------------------------------------------------

    @staticmethod
    def check_guidance(guidance_scale, guidance_schedule, num_blocks: int):
        """Raise unless ``guidance_scale`` is a finite number and ``guidance_schedule`` one of ``GUIDANCE_SCHEDULES``
        or ``num_blocks`` finite non-negative weights (NaN would silently disable guidance, inf blank the image)."""
        if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool):
            raise ValueError(
                f"`guidance_scale` must be a number, got {guidance_scale!r} ({type(guidance_scale).__name__}); e.g. "
                "guidance_scale=7.5, or 1.0 for no guidance."
            )
        if not math.isfinite(guidance_scale):
            raise ValueError(
                f"`guidance_scale` must be finite, got {guidance_scale}; e.g. 7.5, or 1.0 for no guidance."
            )
        if isinstance(guidance_schedule, str):
            if guidance_schedule not in GUIDANCE_SCHEDULES:
                raise ValueError(
                    f"`guidance_schedule` must be one of {GUIDANCE_SCHEDULES} or a list of {num_blocks} per-block "
                    f"weights, got {guidance_schedule!r}."
                )
            return
        weights = list(guidance_schedule) if isinstance(guidance_schedule, Sequence) else None
        if weights is None or len(weights) != num_blocks or not all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
        ):
            raise ValueError(
                f"`guidance_schedule` as a list gives every block a weight w >= 0 (scale 1 + (guidance_scale - 1) * "
                f"w): {num_blocks} finite numbers for this image's {num_blocks} blocks, got {guidance_schedule!r}."
            )

    @staticmethod
    def guidance_scale_at(guidance_scale: float, block: int, num_blocks: int, schedule: str | Sequence[float]) -> float:
        """CFG scale of block ``block``.

        ``"constant"`` guides every block with ``guidance_scale``. ``"linear"`` is the original ImageNet schedule
        ``1 + (guidance_scale - 1) * block / num_blocks``: exactly 1.0 at the first block, which the original then
        samples *without* guidance on the full conditional + unconditional batch, so the two branches draw separate
        noise and get different first tokens (reproduced by `sample_blocks`). A list gives per-block weights ``w``:
        ``1 + (guidance_scale - 1) * w``.
        """
        if schedule == "constant":
            return guidance_scale
        if schedule == "linear":
            return 1 + (guidance_scale - 1) * block / num_blocks
        return 1 + (guidance_scale - 1) * schedule[block]

    def guidance_scales(self, guidance_scale: float, num_blocks: int, schedule: str | Sequence[float]) -> list[float]:
        """CFG scale of every block (see `guidance_scale_at`)."""
        return [self.guidance_scale_at(guidance_scale, block, num_blocks, schedule) for block in range(num_blocks)]

    def start_guidance(self, guidance_scale: float, guidance_schedule: str | Sequence[float], num_blocks: int):
        """Set the call's guidance (checked with `check_guidance`) and whether it starts with the unconditional
        branch; sets ``pipe.num_timesteps`` to ``num_blocks``."""
        self._guidance_scale = guidance_scale
        self._num_timesteps = num_blocks
        if isinstance(guidance_schedule, str):
            self._guidance_schedule = guidance_schedule
            # The last block with a positive weight: block 0 of the linear schedule has weight 0.
            self._last_weighted_block = num_blocks - 1 if guidance_schedule == "constant" or num_blocks > 1 else -1
        else:
            self._guidance_schedule = tuple(float(weight) for weight in guidance_schedule)
            positive = [index for index, weight in enumerate(self._guidance_schedule) if weight > 0]
            self._last_weighted_block = positive[-1] if positive else -1
        self._do_classifier_free_guidance = self._guided_after(-1)
        self._warn_if_guidance_raised = False

    def _guided_after(self, block: int) -> bool:
        """Whether a block after ``block`` is guided under the current scale (the schedule's weights are >= 0)."""
        return self._guidance_scale > 1.0 and self._last_weighted_block > block

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
        # One image at a time: a batch that fit in memory through the block loop fits through the decode too (a
        # 1024x1024 decode holds gigabytes of activations per image), and every image decodes as it would alone.
        use_slicing, self.vae.use_slicing = self.vae.use_slicing, True
        try:
            image = self.vae.decode(codes.to(self.vae.dtype), generator=generator).sample
        finally:
            self.vae.use_slicing = use_slicing
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    def check_decoder(self, output_type: str):
        """Raise before sampling if images are asked for and the pipeline has no vae to decode them."""
        if output_type != "latent" and self.vae is None:
            raise ValueError(
                f"output_type={output_type!r} needs the vae to decode images, and this pipeline has none (vae=None); "
                "pass output_type='latent' for the codes, or load the pipeline with its vae."
            )

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
        num_channels: int,
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = (),
    ) -> torch.Tensor:
        """Sample the ``pipe.num_timesteps`` blocks of the image (see `start_guidance`), feeding each to
        ``self.block_engine`` (prefilled by the caller).

        Args:
            condition: ``[R, P, D]`` head condition of block 0. ``R = num_images`` without guidance, else
                ``2 * num_images`` rows: the conditional branch first, then the unconditional one.
            generator: one generator for all draws, or one per image (used for both branches of that image).
            callback_on_step_end: called after every block as ``callback(pipe, block, block, callback_kwargs)``;
                ``latents`` (``[num_images, num_blocks * P, C]``, patch-raster order, zeros after the current block)
                may be replaced through its return value, and ``pipe._guidance_scale`` changed for the next blocks.

        Each block's scale is read live (`guidance_scale_at`). A block whose scale is ``<= 1`` while the
        unconditional rows are in the batch is sampled without guidance for all rows (noise for every row), and each
        branch is fed its own tokens; with guidance both branches are fed the same tokens. Once no later block can be
        guided, the unconditional rows leave the batch (`BlockEngine.select_rows`).

        Returns:
            ``[num_images, num_blocks * P, C]`` float32 ±1 tokens in patch-raster order.
        """
        num_blocks, block_size = self._num_timesteps, condition.shape[1]
        latents = torch.zeros(num_images, num_blocks * block_size, num_channels, device=condition.device)
        with self.progress_bar(total=num_blocks) as progress_bar:
            for block in range(num_blocks):
                if self.interrupt:
                    continue
                block_slice = slice(block * block_size, (block + 1) * block_size)
                rows = condition.shape[0]
                scale = self.guidance_scale_at(self._guidance_scale, block, num_blocks, self._guidance_schedule)
                if scale > 1.0 and rows == num_images and self._warn_if_guidance_raised:
                    logger.warning(
                        f"`pipe._guidance_scale` was raised to {self._guidance_scale} at block {block}, after guidance "
                        "had ended and the unconditional branch had left the batch; the remaining blocks stay unguided."
                    )
                    self._warn_if_guidance_raised = False  # once
                guided = scale > 1.0 and rows > num_images
                sampled_rows = num_images if guided else rows
                block_generator = generator * (sampled_rows // num_images) if isinstance(generator, list) else generator
                tokens = self.head_sampler.sample(
                    self.diffusion_head,
                    self.scheduler,
                    condition,
                    num_inference_steps,
                    scale if guided else 1.0,
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
                    if rows > num_images and not self._guided_after(block):
                        # Guidance has ended: the unconditional rows leave the batch.
                        self.block_engine.select_rows(list(range(num_images)))
                        rows, tokens = num_images, tokens[:num_images]
                        self._do_classifier_free_guidance, self._warn_if_guidance_raised = False, True
                    own_rows = latents[:, block_slice]
                    if guided or rows == num_images:
                        row_tokens = own_rows.repeat(rows // num_images, 1, 1)
                    else:  # the unguided 2-branch block above: the unconditional rows keep their own tokens
                        row_tokens = torch.cat([own_rows, tokens[num_images:]])
                    condition = self.block_engine.step(row_tokens, block)
                progress_bar.update()
        return latents
