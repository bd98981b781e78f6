"""BitDancePipeline: text-to-image generation by next-block diffusion over binary tokens."""

import json
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loaders.lora import BitDanceLoraLoaderMixin
from ..models.binary_autoencoder import BitDanceTokenizer
from ..models.diffusion_head import BitDanceDiffusionHead
from ..models.projector import BitDanceProjector
from ..special_tokens import (
    IMAGE_START_TOKEN,
    NUM_RESOLUTION_TOKENS,
    UNCONDITIONAL_PROMPT,
    USER_TEMPLATE,
    query_token,
    resolution_token,
)
from ..utils.token_layout import patch_size_for_block, sequence_to_grid
from .block_sampling import BlockAutoregressiveMixin
from .engines import DiffusionHeadSampler, LanguageModelBlockEngine, embed_token_ids


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import bitdance_diffusers  # registers the BitDance pipelines with diffusers
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/BitDance-14B-64x-diffusers", dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("a red fox in the snow", height=1024, width=1024, guidance_scale=7.5).images[0]
        ```
"""

# [height, width] pairs the original release accepts (its IMAGE_SIZE_LIST).
DEFAULT_IMAGE_SIZES = [
    [2048, 512], [1920, 512], [1536, 640], [1280, 768], [1152, 896], [1024, 1024],
    [896, 1152], [768, 1280], [640, 1536], [512, 1920], [512, 2048],
    [1024, 256], [896, 256], [640, 384], [512, 512], [384, 640], [256, 896], [256, 1024],
]  # fmt: skip

class BitDancePipeline(BlockAutoregressiveMixin, BitDanceLoraLoaderMixin, DiffusionPipeline):
    r"""
    Text-to-image with BitDance: a Qwen3 language model reads the prompt and then, block by block, the image's binary
    tokens in patch-raster order; a diffusion head samples the ``P`` tokens of each block jointly from the model's
    hidden states; the binary autoencoder decodes the token grid.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): text tokenizer with the ``<|res_k|>`` and
            ``<|query_k|>`` tokens.
        language_model ([`~transformers.Qwen3Model`]): the autoregressive backbone.
        projector ([`BitDanceProjector`]): embeds ±1 tokens into the language model.
        diffusion_head ([`BitDanceDiffusionHead`]): samples a block of tokens.
        vae ([`BitDanceTokenizer`]): binary autoencoder.
        scheduler ([`BinaryFlowScheduler`] or any diffusers flow scheduler): integrates the head's flow.
        block_size (`int`): tokens per autoregressive step ``P`` (16 or 64).
        image_sizes (`list[list[int]]`): supported ``[height, width]`` pairs.
    """

    model_cpu_offload_seq = "language_model->vae"
    # Every block runs the projector, the language model and the head (num_inference_steps + 1 times): offloading
    # any of them would shuttle the language model in and out once per block. The head and the small projector stay
    # on the accelerator; the language model leaves it only for the decode.
    _exclude_from_cpu_offload = ["diffusion_head", "projector"]
    _callback_tensor_inputs = ["latents"]
    _lora_loadable_modules = ["language_model", "diffusion_head"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        language_model: PreTrainedModel,
        projector: BitDanceProjector,
        diffusion_head: BitDanceDiffusionHead,
        vae: BitDanceTokenizer,
        scheduler,
        block_size: int = 64,
        image_sizes: list | None = None,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            language_model=language_model,
            projector=projector,
            diffusion_head=diffusion_head,
            vae=vae,
            scheduler=scheduler,
        )
        patch_size_for_block(block_size)
        image_sizes = [list(size) for size in (image_sizes or DEFAULT_IMAGE_SIZES)]
        self.register_to_config(block_size=block_size, image_sizes=image_sizes)
        self.vae_scale_factor = vae.downsample_factor if vae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._special_token_ids = None
        self.block_engine = LanguageModelBlockEngine()
        self.head_sampler = DiffusionHeadSampler()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained`, after checking that a local folder holds every component it lists."""
        folder = Path(pretrained_model_name_or_path)
        if (folder / "model_index.json").is_file():
            index = json.loads((folder / "model_index.json").read_text())
            missing = [
                name for name, entry in index.items()
                if isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)
                and name not in kwargs and not (folder / name).is_dir()
            ]  # fmt: skip
            if missing:
                raise ValueError(
                    f"{folder} lists the components {missing} in model_index.json but has no such sub-folders; "
                    "re-run the conversion or pass the missing components to from_pretrained."
                )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # Properties read by callbacks ----------------------------------------------------------------------------------

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    # Prompt ----------------------------------------------------------------------------------------------------

    def special_token_ids(self) -> dict:
        """Ids of the image-start, resolution and query tokens, looked up by name in the tokenizer."""
        if self._special_token_ids is None or self._special_token_ids[0] is not self.tokenizer:
            vocab = self.tokenizer.get_vocab()
            block_size = self.config.block_size
            names = [IMAGE_START_TOKEN] + [query_token(k) for k in range(1, block_size)]
            missing = [name for name in names if name not in vocab]
            edges = (f"<|res_{k}|>" for k in (1, NUM_RESOLUTION_TOKENS))
            missing += [name for name in edges if name not in vocab]
            if missing:
                raise ValueError(
                    f"The tokenizer lacks BitDance's special tokens {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
                    f"a block size of {block_size} needs {IMAGE_START_TOKEN}, "
                    f"<|res_1|>..<|res_{NUM_RESOLUTION_TOKENS}|> and {query_token(1)}..{query_token(block_size - 1)}. "
                    "Load the tokenizer that ships with the checkpoint."
                )
            queries = [vocab[query_token(k)] for k in range(1, block_size)]
            ids = {"image_start": vocab[IMAGE_START_TOKEN], "queries": queries}
            self._special_token_ids = (self.tokenizer, ids)
        return self._special_token_ids[1]

    def image_prefix_ids(self, height: int, width: int) -> list[int]:
        """``[<|vision_start|>, <|res_{H/16}|>, <|res_{W/16}|>, <|query_1|> .. <|query_{P-1}|>]`` (height first)."""
        ids = self.special_token_ids()
        resolution = [self.tokenizer.convert_tokens_to_ids(resolution_token(size)) for size in (height, width)]
        return [ids["image_start"], *resolution, *ids["queries"]]

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        do_classifier_free_guidance: bool,
        num_images_per_prompt: int = 1,
    ) -> list[list[int]]:
        """Token ids of every language-model row: conditional rows then (with CFG) unconditional rows.

        Conditional text is ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``; the default
        unconditional text, also for an empty negative prompt, is ``<|im_start|>assistant\\n`` (the user turn removed,
        as in training's text dropout).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [USER_TEMPLATE.format(p) for p in prompts for _ in range(num_images_per_prompt)]
        if do_classifier_free_guidance:
            if negative_prompt is None:
                negatives = [UNCONDITIONAL_PROMPT] * len(prompts)
            else:
                negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                # An empty negative prompt means none: the prompt-free template the model was trained with.
                negatives = [USER_TEMPLATE.format(n) if n.strip() else UNCONDITIONAL_PROMPT for n in negatives]
            texts += [n for n in negatives for _ in range(num_images_per_prompt)]
        return [self.tokenizer.encode(text) for text in texts]

    def check_inputs(self, prompt, negative_prompt, height, width, generator, num_images_per_prompt, callback_inputs):
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        if isinstance(prompt, list) and len(prompt) == 0:
            raise ValueError("`prompt` is an empty list; pass at least one prompt.")
        num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        if isinstance(negative_prompt, list) and len(negative_prompt) != num_prompts:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for {num_prompts} prompts.")
        if [height, width] not in self.config.image_sizes:
            sizes = ", ".join(f"{h}x{w}" for h, w in self.config.image_sizes)
            raise ValueError(
                f"Size {height}x{width} (height x width) is not supported by this model; choose one of: {sizes}. To try "
                "a size it was not trained at: pipe.register_to_config(image_sizes=pipe.config.image_sizes + "
                f"[[{height}, {width}]])."
            )
        patch = patch_size_for_block(self.config.block_size) * self.vae_scale_factor
        if height % patch or width % patch:
            raise ValueError(
                f"Size {height}x{width} does not split into {patch}x{patch}-pixel blocks of {self.config.block_size} "
                f"tokens; use a multiple of {patch} for both sides."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        num_images = num_prompts * num_images_per_prompt
        self.check_generator_type(generator)
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {num_images} images ({num_prompts} prompts x "
                f"{num_images_per_prompt} per prompt); pass one generator, or exactly one per image."
            )
        if callback_inputs is not None and not all(k in self._callback_tensor_inputs for k in callback_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}.")
        self.check_scheduler()

    # Generation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""
        Generate images from text.

        Args:
            prompt (`str` or `list[str]`): what to draw.
            negative_prompt (`str` or `list[str]`, *optional*): text of the unconditional branch; by default (and for
                an empty string) the original's prompt-free template ``<|im_start|>assistant\n``.
            height (`int`, *optional*), width (`int`, *optional*): output size; one of ``config.image_sizes``
                (default 1024x1024 when supported, else the first supported size).
            num_inference_steps (`int`, defaults to 50): flow steps of the head per block (the default scheduler adds
                one final deterministic step, as the original).
            guidance_scale (`float`, defaults to 7.5): classifier-free guidance on the head's velocity; ``<= 1``
                disables the unconditional branch.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator for the batch (the
                draws then equal the original's global-RNG draws for the same seed), or one per image.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the ±1 code grid
                ``[B, C, h, w]``; 0 in the blocks an interrupt left unsampled).
            return_dict (`bool`, defaults to `True`): return an [`~pipelines.ImagePipelineOutput`].
            attention_kwargs (`dict`, *optional*): passed to the head's attention processors.
            callback_on_step_end (`Callable`, *optional*): called after every autoregressive block as
                ``callback(pipe, block_index, timestep, callback_kwargs)``; may return a replacement ``latents``.
                Setting ``pipe._interrupt = True`` there ends the loop after that block; the images then show the
                blocks sampled so far.
            callback_on_step_end_tensor_inputs (`list[str]`): tensors given to the callback; ``latents`` is the token
                sequence ``[B, h*w, C]`` in patch-raster order, filled up to the current block (zeros after it).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images (or codes for ``output_type="latent"``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if height is None and width is None:
            height, width = [1024, 1024] if [1024, 1024] in self.config.image_sizes else self.config.image_sizes[0]
        height = height or width
        width = width or height
        self.check_inputs(
            prompt, negative_prompt, height, width, generator, num_images_per_prompt, callback_on_step_end_tensor_inputs
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False

        device = self._execution_device
        block_size = self.config.block_size
        grid_height, grid_width = height // self.vae_scale_factor, width // self.vae_scale_factor
        num_blocks = grid_height * grid_width // block_size
        self._num_timesteps = num_blocks

        row_ids = self.encode_prompt(prompt, negative_prompt, self.do_classifier_free_guidance, num_images_per_prompt)
        num_images = len(row_ids) // (2 if self.do_classifier_free_guidance else 1)
        prompt_rows = [embed_token_ids(self.language_model, torch.tensor(ids), device) for ids in row_ids]
        with self.block_engine.session(self.language_model, self.projector, block_size):
            condition = self.block_engine.prefill(
                prompt_rows, self.image_prefix_ids(height, width), grid_height, grid_width
            )
            latents = self.sample_blocks(
                condition=condition,
                num_images=num_images,
                num_blocks=num_blocks,
                num_channels=self.vae.config.z_channels,
                guidance_scales=[guidance_scale] * num_blocks,
                num_inference_steps=num_inference_steps,
                generator=generator,
                attention_kwargs=attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )

        codes = sequence_to_grid(latents, grid_height, grid_width, block_size)
        image = self.decode_codes(codes, output_type, generator)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
