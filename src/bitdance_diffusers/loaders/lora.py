"""LoRA adapters for BitDance pipelines, in diffusers' LoRA format.

A LoRA file is one ``pytorch_lora_weights.safetensors`` whose keys start with the name of the component they adapt
(``language_model.layers.0.self_attn.q_proj.lora_A.weight``, ``diffusion_head.res_blocks.0.w1.lora_B.weight``) and
whose metadata holds each component's PEFT ``LoraConfig``, as written by `save_lora_weights`. The heads and the
ImageNet transformer take adapters through diffusers' `PeftAdapterMixin`; the text-to-image backbone, a transformers
model, takes them from PEFT directly (`add_lora_adapter`), which needs only the PEFT that diffusers needs.
`LoraBaseMixin` then provides ``fuse_lora``, ``unfuse_lora``, ``set_adapters``, ``disable_lora``, ``enable_lora``,
``delete_adapters`` and ``unload_lora_weights`` over every loadable component.
"""

import os
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
from diffusers import ModelMixin
from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA
from diffusers.utils import is_peft_available
from diffusers.utils.peft_utils import _create_lora_config
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.utils import validate_hf_hub_args


def require_peft():
    if not is_peft_available():
        raise ImportError("LoRA adapters need the peft library: pip install peft (or pip install -e '.[lora]').")


@contextmanager
def several_adapters_allowed():
    """PEFT warns whenever a model that carries adapters gets one more; several named adapters are intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def add_lora_adapter(model: torch.nn.Module, config, adapter_name: str = "default"):
    """Add a new LoRA adapter (``peft.LoraConfig``) to a diffusers model or a transformers backbone, for training or
    loading; its weights are the only trainable ones when the model was frozen before."""
    require_peft()
    from peft import inject_adapter_in_model

    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name=adapter_name)
        return
    configs = getattr(model, "peft_config", {})
    if adapter_name in configs:
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}; choose another name.")
    with several_adapters_allowed():
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    model.peft_config = {**configs, adapter_name: config}
    # The flag diffusers and transformers read to tell that a transformers model carries PEFT adapters.
    model._hf_peft_config_loaded = True


def load_lora_into_backbone(
    model: torch.nn.Module,
    state_dict: dict,
    metadata: dict | None,
    adapter_name: str,
    hotswap: bool = False,
    hotswap_preparation: dict | None = None,
):
    """Give a transformers backbone the adapter ``adapter_name`` with the LoRA tensors ``state_dict`` (keys without the
    component prefix); the config comes from ``metadata`` or, without it, from the tensors' ranks.

    With ``hotswap`` the tensors replace those of the existing adapter ``adapter_name`` in place (no new modules, so a
    compiled backbone is not recompiled). ``hotswap_preparation`` (the options of ``enable_lora_hotswap``) pads a newly
    added adapter to the rank of later ones.
    """
    from peft import set_peft_model_state_dict
    from peft.utils.hotswap import (
        check_hotswap_configs_compatible,
        hotswap_adapter_from_state_dict,
        prepare_model_for_compiled_hotswap,
    )

    ranks = {f"^{key}": tensor.shape[1] for key, tensor in state_dict.items() if "lora_B" in key and tensor.ndim > 1}
    config = _create_lora_config(state_dict, None, metadata, ranks, is_unet=False)
    if hotswap:
        if adapter_name not in getattr(model, "peft_config", {}):
            raise ValueError(
                f"hotswap=True replaces the weights of the adapter {adapter_name!r}, which {type(model).__name__} "
                "does not have; load the first adapter without hotswap, under the same adapter_name."
            )
        check_hotswap_configs_compatible(model.peft_config[adapter_name], config)
        # The swap addresses the adapter's parameters by their full names: ...lora_A.<adapter_name>.weight
        named = {
            key.replace(".lora_A.", f".lora_A.{adapter_name}.").replace(".lora_B.", f".lora_B.{adapter_name}."): value
            for key, value in state_dict.items()
        }
        hotswap_adapter_from_state_dict(model, named, adapter_name=adapter_name, config=config)
        return
    add_lora_adapter(model, config, adapter_name)
    result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = [key for key in result.unexpected_keys if "lora_" in key]
    if unexpected:
        raise ValueError(
            f"The LoRA layers {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} match no module of "
            f"{type(model).__name__}; the file was saved for a different model."
        )
    if hotswap_preparation:
        prepare_model_for_compiled_hotswap(model, config=model.peft_config, **hotswap_preparation)


def check_lora_pairs(state_dict: dict):
    """Raise unless every ``lora_A`` weight has its ``lora_B`` and the reverse (a half adapter would load as zeros or
    fail deep inside PEFT)."""
    down = {key.replace(".lora_A.", ".lora_*.") for key in state_dict if ".lora_A." in key}
    up = {key.replace(".lora_B.", ".lora_*.") for key in state_dict if ".lora_B." in key}
    missing = sorted([key.replace("*", "B") for key in down - up] + [key.replace("*", "A") for key in up - down])
    if missing:
        raise ValueError(
            f"The LoRA checkpoint is incomplete: {len(missing)} tensors are missing, e.g. {missing[:3]} (every lora_A "
            "weight needs its lora_B, and the reverse). Save the adapter again with save_lora_weights."
        )


class BitDanceLoraLoaderMixin(LoraBaseMixin):
    r"""
    Load, save, fuse and switch LoRA adapters of the backbone and the diffusion head.

    Each pipeline names its adaptable components in ``_lora_loadable_modules``: ``["language_model",
    "diffusion_head"]`` for text-to-image, ``["transformer", "diffusion_head"]`` for the ImageNet models. No CUDA graph
    replays old adapters: the pipeline's engines compare the adapters, scales and weights of their modules before
    replaying (`pipelines.engines.cuda_graphs.graph_dependencies`).
    """

    _lora_loadable_modules: list[str] = []
    _backbone_hotswap_preparation: dict | None = None

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        return_lora_metadata: bool = False,
        **kwargs,
    ):
        """The LoRA tensors (and with ``return_lora_metadata`` the adapter configs) of a folder, Hub repo or dict.

        Keyword arguments as in diffusers: ``weight_name``, ``subfolder``, ``use_safetensors``, ``local_files_only``,
        ``cache_dir``, ``revision``, ``token``, ``force_download``, ``proxies``.
        """
        use_safetensors = kwargs.pop("use_safetensors", None)
        weight_name, local_files_only = kwargs.pop("weight_name", None), kwargs.pop("local_files_only", None)
        cache_dir, revision = kwargs.pop("cache_dir", None), kwargs.pop("revision", None)
        source = pretrained_model_name_or_path_or_dict
        offline = local_files_only or hub_constants.HF_HUB_OFFLINE
        if weight_name is None and offline and isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
            # Offline the Hub cannot list the repo's files to find the weights: look in its cached snapshot instead.
            source = snapshot_download(str(source), revision=revision, cache_dir=cache_dir, local_files_only=True)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=source,
            weight_name=weight_name,
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=revision,
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is None,
        )
        if kwargs:
            raise TypeError(f"lora_state_dict got unexpected keyword arguments {sorted(kwargs)}.")
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """Add the LoRA adapter saved at ``pretrained_model_name_or_path_or_dict`` to every component it has layers for.

        Args:
            pretrained_model_name_or_path_or_dict: a folder or Hub repo holding ``pytorch_lora_weights.safetensors``
                (or ``weight_name``), or a state dict with component-prefixed keys.
            adapter_name: name under which the adapter is registered in every component (default ``default_<n>``,
                the same ``n`` in all of them), for ``set_adapters`` and ``delete_adapters``.
            hotswap: replace the weights of the already loaded adapter ``adapter_name`` in place, which keeps a
                compiled pipeline from recompiling (adapters of other ranks need ``enable_lora_hotswap`` first).
            kwargs: ``low_cpu_mem_usage`` and the loading options of `lora_state_dict`.
        """
        require_peft()
        if hotswap and adapter_name is None:
            raise ValueError("hotswap=True replaces a loaded adapter: pass its adapter_name.")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, True, **kwargs)
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError(
                "Not a LoRA checkpoint: every tensor name must contain 'lora' (e.g. "
                "'diffusion_head.res_blocks.0.w1.lora_A.weight'); save adapters with save_lora_weights."
            )
        components = {key.split(".", 1)[0] for key in state_dict}
        unknown = sorted(components - set(self._lora_loadable_modules))
        if unknown:
            raise ValueError(
                f"The LoRA checkpoint has layers for {unknown}, which {type(self).__name__} does not take; its "
                f"adaptable components are {self._lora_loadable_modules} (tensor names start with the component)."
            )
        check_lora_pairs(state_dict)
        models = [getattr(self, name) for name in self._lora_loadable_modules]
        if adapter_name is None:
            adapter_name = f"default_{max(len(getattr(model, 'peft_config', {})) for model in models)}"
        # Accelerate's offload hooks wrap the modules as they are: take them off while adapter layers are added.
        offloading = self._optionally_disable_offloading(self)
        try:
            with several_adapters_allowed():
                for name, model in zip(self._lora_loadable_modules, models):
                    if name in components:
                        self._load_component_lora(name, model, state_dict, metadata, adapter_name, hotswap,
                                                  low_cpu_mem_usage)  # fmt: skip
        finally:
            self._reapply_offloading(*offloading)

    def _load_component_lora(self, name, model, state_dict, metadata, adapter_name, hotswap, low_cpu_mem_usage):
        prefix = f"{name}."
        # Without this component's config in the metadata, the config is read off the tensors (ranks, modules).
        has_config = any(key.startswith(prefix) for key in metadata or {})
        if isinstance(model, ModelMixin):
            model.load_lora_adapter(
                state_dict, prefix=name, adapter_name=adapter_name, metadata=metadata if has_config else None,
                hotswap=hotswap, low_cpu_mem_usage=low_cpu_mem_usage,
            )  # fmt: skip
            return
        load_lora_into_backbone(
            model,
            {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)},
            {key.removeprefix(prefix): value for key, value in metadata.items() if key.startswith(prefix)}
            if has_config
            else None,
            adapter_name,
            hotswap,
            None if hotswap else self._take_backbone_hotswap_preparation(),
        )

    def _take_backbone_hotswap_preparation(self) -> dict | None:
        # Applied once, with the first adapter loaded after `enable_lora_hotswap` (as diffusers does for its models).
        preparation, self._backbone_hotswap_preparation = self._backbone_hotswap_preparation, None
        return preparation

    def enable_lora_hotswap(self, **kwargs):
        """Prepare every adaptable component for hot-swapping adapters of other ranks (``target_rank``) or scales
        into a compiled pipeline; call before loading the first adapter. See diffusers' ``enable_lora_hotswap``."""
        super().enable_lora_hotswap(**kwargs)
        self._backbone_hotswap_preparation = kwargs

    def _reapply_offloading(self, model_offload: bool, sequential_offload: bool, group_offload: bool):
        device = getattr(self, "_offload_device", None)
        if model_offload:
            self.enable_model_cpu_offload(device=device)
        elif sequential_offload:
            self.enable_sequential_cpu_offload(device=device)
        elif group_offload:
            for component in self.components.values():
                if isinstance(component, torch.nn.Module):
                    _maybe_remove_and_reapply_group_offloading(component)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`DiffusionPipeline.save_pretrained`, refused while adapters are attached: the folder would hold the base
        weights beside adapter layers (or, for the language model, the adapter alone) instead of a usable model."""
        adapters = {}  # read directly, not through get_list_adapters, which needs PEFT installed
        for name in self._lora_loadable_modules:
            configs = getattr(getattr(self, name, None), "peft_config", None)
            if configs:
                adapters[name] = list(configs)
        if adapters:
            raise ValueError(
                f"The pipeline carries LoRA adapters {adapters}. Save them on their own with save_lora_weights "
                "(bitdance_diffusers.training.save_lora(pipe, folder) does it for every component), or merge them "
                "into the weights first with pipe.fuse_lora(); pipe.unload_lora_weights()."
            )
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        **component_lora_layers,
    ):
        """Write LoRA layers as one diffusers LoRA file.

        Pass ``<component>_lora_layers`` (the adapter's state dict, e.g. ``peft.get_peft_model_state_dict(model)``)
        and ``<component>_lora_adapter_metadata`` (its ``LoraConfig.to_dict()``, so that loading needs no guessing) for
        each component in ``_lora_loadable_modules``; at least one component's layers.
        """
        lora_layers, lora_metadata = {}, {}
        for name in cls._lora_loadable_modules:
            layers = component_lora_layers.pop(f"{name}_lora_layers", None)
            metadata = component_lora_layers.pop(f"{name}_lora_adapter_metadata", None)
            if layers:
                lora_layers[name], lora_metadata[name] = layers, metadata
        expected = [f"{name}_lora_layers" for name in cls._lora_loadable_modules]
        if component_lora_layers:
            raise TypeError(f"Unexpected arguments {sorted(component_lora_layers)}; {cls.__name__} takes {expected}.")
        if not lora_layers:
            raise ValueError(f"Nothing to save: pass at least one of {expected}.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=lora_layers,
            lora_metadata=lora_metadata,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Merge the active adapters into the weights of ``components`` (default: every adaptable component)."""
        super().fuse_lora(
            components=components or self._lora_loadable_modules,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Undo `fuse_lora` on ``components`` (default: every adaptable component)."""
        super().unfuse_lora(components=components or self._lora_loadable_modules, **kwargs)


def adapter_state_and_config(model: torch.nn.Module, adapter_name: str = "default") -> tuple[dict, dict]:
    """The LoRA tensors and ``LoraConfig`` dict of ``model``'s adapter ``adapter_name``, as `save_lora_weights` takes
    them (``<component>_lora_layers``, ``<component>_lora_adapter_metadata``)."""
    require_peft()
    from peft import get_peft_model_state_dict

    config = model.peft_config[adapter_name].to_dict()
    return get_peft_model_state_dict(model, adapter_name=adapter_name), config
