"""BitDanceImageNetPipeline: class-conditional generation with the BitDance ImageNet models (B/L/H, 1x/4x/16x)."""

import difflib
import numbers
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from ..loaders.lora import BitDanceLoraLoaderMixin
from ..loaders.pretrained import BitDancePretrainedMixin
from ..models.binary_autoencoder import BitDanceTokenizer
from ..models.diffusion_head import BitDanceDiffusionHead
from ..models.imagenet_transformer import BitDanceImageNetTransformer
from ..models.mlp_head import BitDanceMLPHead
from ..utils.token_layout import sequence_to_grid
from .block_sampling import BlockAutoregressiveMixin
from .engines import DiffusionHeadSampler, ImageNetTransformerBlockEngine


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import bitdance_diffusers  # registers the BitDance pipelines with diffusers
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/BitDance-B-4x-diffusers").to("cuda")
        >>> class_ids = pipe.get_label_ids(["golden retriever", "volcano"])
        >>> images = pipe(class_ids, guidance_scale=3.9, generator=torch.Generator().manual_seed(0)).images
        ```
"""


class BitDanceImageNetPipeline(
    BlockAutoregressiveMixin, BitDancePretrainedMixin, BitDanceLoraLoaderMixin, DiffusionPipeline
):
    r"""
    Class-conditional image generation with BitDance: a LlamaGen-style transformer reads 64 class tokens and then,
    block by block, the image's binary tokens in patch-raster order; a diffusion head samples the ``P`` tokens of each
    block from the transformer's output; the binary autoencoder decodes the token grid.

    Args:
        transformer ([`BitDanceImageNetTransformer`]): the autoregressive backbone.
        diffusion_head ([`BitDanceMLPHead`] or [`BitDanceDiffusionHead`]): samples one block (the MLP head for
            ``P = 1``, the transformer head for ``P > 1``).
        vae ([`BitDanceTokenizer`]): binary autoencoder (``ae_d16c32``).
        scheduler ([`BinaryFlowScheduler`] or any diffusers flow scheduler): integrates the head's flow.
        id2label (`dict[int, str]`, *optional*): class names (comma-separated synonyms) by id, as diffusers'
            `DiTPipeline` takes them; saved in ``model_index.json``. The converter writes the ImageNet-1k names
            (`conversion.imagenet.imagenet_id2label`).
    """

    model_cpu_offload_seq = "transformer->vae"
    # The head runs num_inference_steps + 1 times per block: keep it on the accelerator instead of shuttling it.
    _exclude_from_cpu_offload = ["diffusion_head"]
    _callback_tensor_inputs = ["latents"]
    _lora_loadable_modules = ["transformer", "diffusion_head"]

    def __init__(
        self,
        transformer: BitDanceImageNetTransformer,
        diffusion_head: BitDanceMLPHead | BitDanceDiffusionHead,
        vae: BitDanceTokenizer,
        scheduler,
        id2label: dict[int, str] | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, diffusion_head=diffusion_head, vae=vae, scheduler=scheduler)
        self.register_to_config(id2label=id2label)
        self.vae_scale_factor = vae.downsample_factor if vae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.block_engine = ImageNetTransformerBlockEngine()
        self.head_sampler = DiffusionHeadSampler()
        self._id2label = {int(key): value for key, value in (id2label or {}).items()}
        # name -> id for every comma-separated synonym, as diffusers' DiTPipeline. A name shared by several classes
        # goes to the class it is the first name of, if that is a single one ("harp" -> 594, not "harmonica, ...,
        # harp"); otherwise it is ambiguous ("crane" is a bird and a machine) and must be given as an id.
        synonyms, first_names = defaultdict(set), defaultdict(set)
        for key, value in self._id2label.items():
            names = [name.strip() for name in value.split(",")]
            first_names[names[0]].add(key)
            for name in names:
                synonyms[name].add(key)
        self.labels, self._ambiguous_labels = {}, {}
        for name, ids in sorted(synonyms.items()):
            candidates = ids if len(ids) == 1 else ids & first_names[name]
            if len(candidates) == 1:
                self.labels[name] = next(iter(candidates))
            else:
                self._ambiguous_labels[name] = sorted(ids)

    @property
    def num_blocks(self) -> int:
        """Autoregressive blocks of an image: ``sample_size**2 / block_size``."""
        config = self.transformer.config
        return config.sample_size**2 // config.block_size

    # Labels ----------------------------------------------------------------------------------------------------

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of label names: any comma-separated synonym of a class in ``id2label``, case-insensitive.

        Example: ``pipe.get_label_ids(["golden retriever", "volcano"])`` -> ``[207, 980]``. `labels` lists the
        accepted names.
        """
        labels = [label] if isinstance(label, str) else list(label)
        if not self.labels:
            raise ValueError(
                "This pipeline has no label names (no id2label in its model_index.json); pass integer class ids, or "
                "load it with names: from_pretrained(folder, id2label=imagenet_id2label()) with `from "
                "bitdance_diffusers.conversion.imagenet import imagenet_id2label` for the ImageNet-1k classes."
            )
        return [self._label_id(name) for name in labels]

    def _label_id(self, label: str) -> int:
        name = label.strip()
        if name not in self.labels and name not in self._ambiguous_labels:
            # Case-insensitive fallback; exact case still tells "Cardigan" (the corgi) from "cardigan" (the sweater).
            matches = [known for known in (*self.labels, *self._ambiguous_labels) if known.lower() == name.lower()]
            if len(matches) > 1:
                raise ValueError(f"Label name {label!r} matches {matches}; use the exact case or a class id.")
            name = matches[0] if matches else name
        if name in self.labels:
            return self.labels[name]
        if name in self._ambiguous_labels:
            classes = "; ".join(f"{index}: {self._id2label[index]}" for index in self._ambiguous_labels[name])
            raise ValueError(f"Label name {label!r} names several classes ({classes}); pass the class id instead.")
        by_lowercase = {known.lower(): known for known in self.labels}
        close = [by_lowercase[match] for match in difflib.get_close_matches(name.lower(), by_lowercase, n=3)]
        hint = f" Did you mean {', '.join(repr(match) for match in close)}?" if close else ""
        raise ValueError(
            f"Unknown label name {label!r}.{hint} `pipe.labels` lists every accepted name; integer class ids "
            f"0..{self.transformer.config.num_classes - 1} work too."
        )

    def resolve_class_labels(self, class_labels: int | str | list | torch.Tensor | np.ndarray) -> list[int]:
        """Class ids of ``class_labels``, checked against the model's class count.

        Accepts what diffusers' `DiTPipeline` accepts (an int, a list, nested lists such as ``[[1], [2]]``, a tensor or
        array of any shape: flattened in order) and label names anywhere among them (see `get_label_ids`).
        """
        items = self._flatten_labels(class_labels)
        if not items:
            raise ValueError("`class_labels` is empty; pass at least one class id or label name.")
        ids = []
        for item in items:
            if isinstance(item, str):
                ids.extend(self.get_label_ids(item))
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                ids.append(int(item))
            else:
                raise ValueError(f"`class_labels` entries must be int class ids or label names, got {item!r}.")
        num_classes = self.transformer.config.num_classes
        invalid = [index for index in ids if not 0 <= index < num_classes]
        if invalid:
            raise ValueError(
                f"Class ids {invalid} are outside [0, {num_classes - 1}]; this model knows {num_classes} classes "
                f"(id {num_classes} is the internal null class). Use pipe.get_label_ids('name') to look ids up."
            )
        return ids

    @classmethod
    def _flatten_labels(cls, labels) -> list:
        """Every entry of ``labels`` in order, through nested lists, tuples, tensors and arrays."""
        if isinstance(labels, (torch.Tensor, np.ndarray)):
            return labels.reshape(-1).tolist()
        if isinstance(labels, (list, tuple)):
            return [item for entry in labels for item in cls._flatten_labels(entry)]
        return [labels]

    def check_inputs(
        self, guidance_scale, guidance_schedule, num_inference_steps, num_images_per_label, generator, num_images,
        callback_inputs,
    ):  # fmt: skip
        if not isinstance(num_images_per_label, int) or num_images_per_label < 1:
            raise ValueError(f"`num_images_per_label` must be a positive integer, got {num_images_per_label!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        self.check_guidance(guidance_scale, guidance_schedule, self.num_blocks)
        self.check_generator_type(generator)
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {num_images} images; pass one generator, or exactly "
                "one per image (labels x num_images_per_label)."
            )
        if callback_inputs is not None and not all(k in self._callback_tensor_inputs for k in callback_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}.")
        self.check_scheduler()

    # Generation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list | torch.Tensor,
        guidance_scale: float = 4.0,
        guidance_schedule: str | list[float] = "linear",
        num_inference_steps: int = 100,
        num_images_per_label: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""
        Generate images of ImageNet classes.

        Args:
            class_labels (`int`, `str`, `list` or `torch.Tensor`): class ids in ``[0, num_classes - 1]`` and/or label
                names (see `get_label_ids`); nested lists and tensors are flattened, as in diffusers' `DiTPipeline`.
            guidance_scale (`float`, defaults to 4.0): classifier-free guidance on the head's velocity; ``<= 1``
                disables the unconditional branch. The original's tuned values: B-1x 3.2, B-4x 3.9, B-16x 6.1,
                L-1x 4.0, H-1x 4.55. Live: a callback may change ``pipe._guidance_scale`` for the next blocks (the
                schedule then ramps to the new value); once no later block is guided the unconditional branch leaves
                the batch (half the cost).
            guidance_schedule (`str` or `list[float]`, defaults to `"linear"`): ``"linear"`` ramps the scale from 1
                at the first block to ``guidance_scale`` as the original does (see `guidance_scale_at`);
                ``"constant"`` guides every block with ``guidance_scale`` (not the original's behaviour); a list of
                one weight ``w >= 0`` per block gives each block ``1 + (guidance_scale - 1) * w``.
            num_inference_steps (`int`, defaults to 100): flow steps of the head per block (the default scheduler adds
                one final deterministic step, as the original).
            num_images_per_label (`int`, defaults to 1): images per class label.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator for the batch (the
                draws then equal the original's global-RNG draws after ``torch.manual_seed``), or one per image.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the ±1 code grid
                ``[B, C, h, w]``; 0 in the blocks an interrupt left unsampled).
            return_dict (`bool`, defaults to `True`): return an [`~pipelines.ImagePipelineOutput`].
            attention_kwargs (`dict`, *optional*): passed to the attention processors of the head.
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
        class_ids = self.resolve_class_labels(class_labels)
        num_images = len(class_ids) * num_images_per_label
        self.check_inputs(
            guidance_scale,
            guidance_schedule,
            num_inference_steps,
            num_images_per_label,
            generator,
            num_images,
            callback_on_step_end_tensor_inputs,
        )
        self.check_decoder(output_type)
        config = self.transformer.config
        self.start_guidance(guidance_scale, guidance_schedule, self.num_blocks)
        self._interrupt = False
        device = self._execution_device

        labels = torch.tensor(class_ids, device=device).repeat_interleave(num_images_per_label)
        if self.do_classifier_free_guidance:
            # Conditional rows first, then one null-class row per image: one batched forward per block.
            labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])
        with self.block_engine.session(self.transformer):
            condition = self.block_engine.prefill(labels)
            latents = self.sample_blocks(
                condition=condition,
                num_images=num_images,
                num_channels=config.in_channels,
                num_inference_steps=num_inference_steps,
                generator=generator,
                attention_kwargs=attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )

        codes = sequence_to_grid(latents, config.sample_size, config.sample_size, config.block_size)
        image = self.decode_codes(codes, output_type, generator)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
