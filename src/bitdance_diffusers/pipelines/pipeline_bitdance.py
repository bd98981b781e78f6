"""BitDancePipeline: text-to-image generation by next-block diffusion over binary tokens."""

import numbers
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loaders.lora import BitDanceLoraLoaderMixin
from ..loaders.pretrained import BitDancePretrainedMixin
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


logger = logging.get_logger(__name__)

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


def check_block_size_and_image_sizes(block_size, image_sizes):
    """Raise unless ``block_size`` is a positive square number of tokens and ``image_sizes`` a list of positive
    ``[height, width]`` integer pairs (both come from a saved ``model_index.json``)."""
    if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(
            f"`block_size` must be a positive square number of tokens per block (16 or 64 for the released models), "
            f"got {block_size!r}; fix `block_size` in the pipeline's model_index.json."
        )
    patch_size_for_block(block_size)
    if not isinstance(image_sizes, (list, tuple)) or not image_sizes or not all(
        isinstance(size, (list, tuple)) and len(size) == 2
        and all(isinstance(side, numbers.Integral) and not isinstance(side, bool) and side > 0 for side in size)
        for size in image_sizes
    ):  # fmt: skip
        raise ValueError(
            f"`image_sizes` must be a non-empty list of [height, width] pairs of positive integers, got "
            f"{image_sizes!r}; fix `image_sizes` in the pipeline's model_index.json."
        )


class BitDancePipeline(BlockAutoregressiveMixin, BitDancePretrainedMixin, BitDanceLoraLoaderMixin, DiffusionPipeline):
    r"""
    Text-to-image with BitDance: a Qwen3 language model reads the prompt and then, block by block, the image's binary
    tokens in patch-raster order; a diffusion head samples the ``P`` tokens of each block jointly from the model's
    hidden states; the binary autoencoder decodes the token grid.

    The language model runs through ``pipe.block_engine`` (a `LanguageModelBlockEngine`: KV cache, masks, static
    cache and CUDA graphs), the head through ``pipe.head_sampler`` (a `DiffusionHeadSampler`).

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
        image_sizes = DEFAULT_IMAGE_SIZES if image_sizes is None else image_sizes
        check_block_size_and_image_sizes(block_size, image_sizes)
        self.register_to_config(block_size=int(block_size), image_sizes=[[int(h), int(w)] for h, w in image_sizes])
        self.vae_scale_factor = vae.downsample_factor if vae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._special_token_ids = None
        self.block_engine = LanguageModelBlockEngine()
        self.head_sampler = DiffusionHeadSampler()

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

    def positions_for_prompt(self, height: int, width: int) -> int:
        """Positions of the language model left for a templated prompt beside an image of ``height x width``: the
        image prefix (``P + 2`` tokens) and every image token but the last block's take the rest."""
        image_tokens = (height // self.vae_scale_factor) * (width // self.vae_scale_factor)
        return self.language_model.config.max_position_embeddings - image_tokens - 2

    def _template_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the chat template before and after the prompt text."""
        head, tail = USER_TEMPLATE.split("{}")
        return self.tokenizer.encode(head), self.tokenizer.encode(tail)

    def max_prompt_tokens(self) -> int:
        """The default ``max_sequence_length``: the most prompt-text tokens (inside the chat template) that leave room
        in the language model's positions for the largest image of ``config.image_sizes``."""
        head, tail = self._template_ids()
        free = min(self.positions_for_prompt(height, width) for height, width in self.config.image_sizes)
        return free - len(head) - len(tail)

    def tokenize_prompt(
        self, prompt: str | list[str] | None, max_sequence_length: int | None = None
    ) -> list[list[int]]:
        """Token ids of each prompt in BitDance's chat template (``special_tokens.USER_TEMPLATE``); ``None`` gives the
        prompt-free template of the unconditional branch (training's text dropout).

        A prompt of more than ``max_sequence_length`` text tokens (default `max_prompt_tokens`) keeps its first ones,
        with a warning that quotes what was dropped; the template around it stays whole.
        """
        prompts = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt)
        limit = self.max_prompt_tokens() if max_sequence_length is None else max_sequence_length
        head, tail = self._template_ids()
        rows = []
        for text in prompts:
            if text is None:
                rows.append(self.tokenizer.encode(UNCONDITIONAL_PROMPT))
                continue
            ids = self.tokenizer.encode(USER_TEMPLATE.format(text))
            if len(ids) - len(head) - len(tail) > limit:
                if ids[len(ids) - len(tail) :] != tail:
                    raise ValueError(
                        f"Cannot shorten the prompt to max_sequence_length={limit} tokens without breaking the chat "
                        f"template ({self.tokenizer.decode(ids[-len(tail):])!r} does not end it); shorten the prompt."
                    )
                dropped = self.tokenizer.decode(ids[len(head) + limit : len(ids) - len(tail)])
                logger.warning(
                    f"The following part of your input was truncated because `max_sequence_length` is set to {limit} "
                    f"tokens: {dropped!r}"
                )
                ids = ids[: len(head) + limit] + tail
            rows.append(ids)
        return rows

    def _embed_rows(self, rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id rows -> left-padded input embeddings ``[B, L, D]`` and mask ``[B, L]`` (1 = token, 0 = padding)."""
        length = max(len(ids) for ids in rows)
        mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in rows], device=device)
        ids = torch.tensor([[0] * (length - len(ids)) + ids for ids in rows], device=device)
        embeds = embed_token_ids(self.language_model, ids, device)
        return embeds * mask[..., None].to(embeds.dtype), mask

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
    ):
        r"""
        Encode prompts into what `__call__` takes as ``prompt_embeds`` and ``negative_prompt_embeds``: the language
        model's input embeddings of the templated prompts (`tokenize_prompt`), left-padded, with their masks. Encode
        once and reuse them across calls, seeds and batch sizes, or edit them (prompt weighting).

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompts (or pass ``prompt_embeds``).
            negative_prompt (`str` or `list[str]`, *optional*): text of the unconditional branch, one for all prompts
                or one per prompt; by default (and where blank) the original's prompt-free template.
            do_classifier_free_guidance (`bool`, defaults to `True`): also encode the unconditional branch.
            num_images_per_prompt (`int`, defaults to 1): rows per prompt in the output.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): ``[B, L, D]`` embeddings encoded
                before; repeated ``num_images_per_prompt`` times.
            prompt_embeds_mask, negative_prompt_embeds_mask (`torch.Tensor`, *optional*): ``[B, L]``, 1 where
                ``*_embeds`` hold a token (default: everywhere).
            max_sequence_length (`int`, *optional*): the most prompt-text tokens (see `tokenize_prompt`).
            device (`torch.device`, *optional*): where the embeddings go (default: the pipeline's execution device).

        Returns:
            `tuple`: ``prompt_embeds [B * n, L, D]``, ``prompt_embeds_mask [B * n, L]``, ``negative_prompt_embeds``
            and ``negative_prompt_embeds_mask`` (``None`` without guidance), ``n = num_images_per_prompt``.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            rows = self.tokenize_prompt(prompt, max_sequence_length)
            prompt_embeds, prompt_embeds_mask = self._embed_rows(rows, device)
        elif prompt_embeds_mask is None:
            prompt_embeds_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        num_prompts = prompt_embeds.shape[0]
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds_mask = None
        elif negative_prompt_embeds is None:
            if not isinstance(negative_prompt, (list, tuple)):
                negative_prompt = [negative_prompt] * num_prompts
            # A blank negative prompt means none: the prompt-free template the model was trained with.
            negatives = [text if text is not None and text.strip() else None for text in negative_prompt]
            rows = self.tokenize_prompt(negatives, max_sequence_length)
            negative_prompt_embeds, negative_prompt_embeds_mask = self._embed_rows(rows, device)
        elif negative_prompt_embeds_mask is None:
            negative_prompt_embeds_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=negative_prompt_embeds.device
            )
        prompt_embeds, prompt_embeds_mask = (
            x.to(device).repeat_interleave(num_images_per_prompt, dim=0) for x in (prompt_embeds, prompt_embeds_mask)
        )
        if negative_prompt_embeds is not None:
            negative_prompt_embeds, negative_prompt_embeds_mask = (
                x.to(device).repeat_interleave(num_images_per_prompt, dim=0)
                for x in (negative_prompt_embeds, negative_prompt_embeds_mask)
            )
        return prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask

    # Checks ----------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        num_images_per_prompt,
        generator,
        prompt_embeds=None,
        prompt_embeds_mask=None,
        negative_prompt_embeds=None,
        negative_prompt_embeds_mask=None,
        callback_on_step_end_tensor_inputs=None,
        max_sequence_length=None,
    ):
        if prompt is not None and prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `prompt`: {prompt} and `prompt_embeds`: {prompt_embeds}. Please make sure to"
                " only forward one of the two."
            )
        if prompt is None and prompt_embeds is None:
            raise ValueError(
                "Provide either `prompt` or `prompt_embeds`. Cannot leave both `prompt` and `prompt_embeds` undefined."
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `negative_prompt`: {negative_prompt} and `negative_prompt_embeds`:"
                f" {negative_prompt_embeds}. Please make sure to only forward one of the two."
            )
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
            if not prompts:
                raise ValueError("`prompt` is an empty list; pass at least one prompt.")
            num_prompts = len(prompts)
        else:
            num_prompts = self._check_embeds("prompt_embeds", prompt_embeds, prompt_embeds_mask, None)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
                raise ValueError(
                    f"`negative_prompt` must be a string (for every prompt) or a list of strings, one per prompt; got "
                    f"{negative_prompt!r}."
                )
            if len(negative_prompt) != num_prompts:
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for {num_prompts} prompts.")
        if negative_prompt_embeds is not None:
            self._check_embeds(
                "negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_mask, num_prompts
            )
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(
                    f"`{name}` must be an integer number of pixels, got {value!r} ({type(value).__name__})."
                )
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
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        num_images = num_prompts * num_images_per_prompt
        self.check_generator_type(generator)
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {num_images} images ({num_prompts} prompts x "
                f"{num_images_per_prompt} per prompt); pass one generator, or exactly one per image."
            )
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}.")
        self._check_prompt_length(height, width, max_sequence_length, prompt_embeds, prompt_embeds_mask,
                                  negative_prompt_embeds, negative_prompt_embeds_mask)  # fmt: skip
        self.check_scheduler()

    def _check_embeds(self, name: str, embeds, mask, num_prompts: int | None) -> int:
        """Raise unless ``embeds`` is ``[B, L, D]`` for this language model (and ``B = num_prompts`` if given) with a
        ``[B, L]`` mask or none; returns ``B``."""
        width = self.language_model.config.hidden_size
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width or not len(embeds):
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"`{name}` must be a tensor [B, L, {width}] as `pipe.encode_prompt` returns it, got {shape}."
            )
        if num_prompts is not None and embeds.shape[0] != num_prompts:
            raise ValueError(f"`{name}` has {embeds.shape[0]} rows for {num_prompts} prompts; pass one per prompt.")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2])):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"`{name}_mask` must be a tensor of shape {tuple(embeds.shape[:2])}, got {shape}.")
        return embeds.shape[0]

    def _check_prompt_length(self, height, width, max_sequence_length, *embeds_and_masks):
        """Prompt and image must fit the language model's positions: refuse what truncation cannot fix."""
        positions = self.language_model.config.max_position_embeddings
        free = self.positions_for_prompt(height, width)
        head, tail = self._template_ids() if self.tokenizer is not None else ([], [])
        room = free - len(head) - len(tail)
        if room < 1:
            raise ValueError(
                f"A {height}x{width} image leaves no room for a prompt in the language model's {positions} positions; "
                "choose a smaller size."
            )
        if max_sequence_length is not None:
            if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= room:
                raise ValueError(
                    f"`max_sequence_length` must be an integer in [1, {room}] (the language model's {positions} "
                    f"positions minus the chat template and a {height}x{width} image), got {max_sequence_length!r}."
                )
        elif self.tokenizer is not None and self.max_prompt_tokens() < 1:
            raise ValueError(
                f"config.image_sizes has a size that leaves no room for a prompt in the language model's {positions} "
                f"positions, so the default max_sequence_length is undefined; pass max_sequence_length (at most {room} "
                f"for {height}x{width}) or remove that size from pipe.config.image_sizes."
            )
        for name, embeds, mask in (("prompt_embeds", *embeds_and_masks[:2]), ("negative_prompt_embeds",
                                                                              *embeds_and_masks[2:])):  # fmt: skip
            if embeds is not None:
                longest = int(mask.bool().sum(1).max()) if mask is not None else embeds.shape[1]
                if longest > free:
                    raise ValueError(
                        f"`{name}` holds {longest} tokens; with a {height}x{width} image the language model's "
                        f"{positions} positions leave {free}. Encode a shorter prompt (pipe.encode_prompt truncates "
                        "with max_sequence_length)."
                    )

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
        guidance_schedule: str | list[float] = "constant",
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int | None = None,
    ):
        r"""
        Generate images from text.

        Args:
            prompt (`str` or `list[str]`): what to draw (or pass ``prompt_embeds``).
            negative_prompt (`str` or `list[str]`, *optional*): text of the unconditional branch, one for all prompts
                or one per prompt; by default (and where blank) the original's prompt-free template
                ``<|im_start|>assistant\n``.
            height (`int`, *optional*), width (`int`, *optional*): output size; one of ``config.image_sizes``
                (default 1024x1024 when supported, else the first supported size).
            num_inference_steps (`int`, defaults to 50): flow steps of the head per block (the default scheduler adds
                one final deterministic step, as the original).
            guidance_scale (`float`, defaults to 7.5): classifier-free guidance on the head's velocity; ``<= 1``
                disables the unconditional branch. Live: a callback may change ``pipe._guidance_scale`` for the next
                blocks; once no later block is guided the unconditional branch leaves the batch (half the cost).
            guidance_schedule (`str` or `list[float]`, defaults to `"constant"`): ``"constant"`` (the original's)
                guides every block with ``guidance_scale``; ``"linear"`` ramps it up from 1 at the first block; a list
                of one weight ``w >= 0`` per block gives each block ``1 + (guidance_scale - 1) * w``.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator for the batch (the
                draws then equal the original's global-RNG draws for the same seed), or one per image.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): ``[B, L, D]`` prompt encodings from
                `encode_prompt`, instead of ``prompt`` / ``negative_prompt``.
            prompt_embeds_mask, negative_prompt_embeds_mask (`torch.Tensor`, *optional*): their ``[B, L]`` masks (1 =
                token; default: every position).
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
            max_sequence_length (`int`, *optional*): the most prompt-text tokens; longer prompts are truncated with a
                warning. Default: what the language model's positions leave beside the largest supported image
                (`max_prompt_tokens`); at most what they leave beside this image.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images (or codes for ``output_type="latent"``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if height is None and width is None:
            height, width = [1024, 1024] if [1024, 1024] in self.config.image_sizes else self.config.image_sizes[0]
        height = width if height is None else height
        width = height if width is None else width
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            num_images_per_prompt,
            generator,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            callback_on_step_end_tensor_inputs,
            max_sequence_length,
        )
        self.check_decoder(output_type)
        height, width, block_size = int(height), int(width), self.config.block_size
        grid_height, grid_width = height // self.vae_scale_factor, width // self.vae_scale_factor
        num_blocks = grid_height * grid_width // block_size
        self.check_guidance(guidance_scale, guidance_schedule, num_blocks)
        self.start_guidance(guidance_scale, guidance_schedule, num_blocks)
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt(
            prompt,
            negative_prompt,
            self.do_classifier_free_guidance,
            num_images_per_prompt,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            max_sequence_length,
            device,
        )
        # One language-model row per image and branch: the conditional rows, then the unconditional ones.
        prompt_rows = [embeds[mask.bool()] for embeds, mask in zip(prompt_embeds, prompt_embeds_mask)]
        if self.do_classifier_free_guidance:
            negatives = zip(negative_prompt_embeds, negative_prompt_embeds_mask)
            prompt_rows += [embeds[mask.bool()] for embeds, mask in negatives]
        with self.block_engine.session(self.language_model, self.projector, block_size):
            condition = self.block_engine.prefill(
                prompt_rows, self.image_prefix_ids(height, width), grid_height, grid_width
            )
            latents = self.sample_blocks(
                condition=condition,
                num_images=prompt_embeds.shape[0],
                num_channels=self.projector.config.in_channels,
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
