"""The text-to-image backbone over blocks: BitDance's Qwen3 language model, its KV cache and its fast paths.

One generation is one `LanguageModelBlockEngine.session`. `prefill` runs every row (conditional prompts, then the
unconditional ones) followed by the image prefix ``[<|vision_start|>, <|res_h|>, <|res_w|>, <|query_1..P-1|>]`` as
one left-padded batch: the prompt part is causal, the last ``P`` positions form the first bidirectional block, whose
outputs condition image block 0. `step` embeds a sampled block (projector + 2-D sin-cos position), runs it over the
cache and returns the condition of the next block. Padding is never attended and positions count real tokens only,
so a padded row computes what it would alone.

Memory stays linear in the prompt length: the prefill runs in chunks of ``prefill_chunk_size`` query positions (one
chunk for any prompt shorter than that, so short prompts run exactly as one forward), each with its own
``[R, 1, chunk, kv]`` mask; block steps attend with one shared mask row per batch row through packed grouped-query
attention (`models.grouped_query_attention`).
"""

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from ...models.attention_masks import additive_mask, block_causal_allowed
from ...models.embeddings import sincos_2d_sequence
from ...models.grouped_query_attention import packed_gqa_attention
from .block_engine import BlockEngine
from .cuda_graphs import CUDAGraphRunner


def cache_argument_name(model: torch.nn.Module) -> str:
    """transformers >= 5.24 calls the cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def embed_token_ids(language_model: torch.nn.Module, token_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The language model's input embeddings of ``token_ids``, on ``device``.

    Looked up where the embedding table lives: under model CPU offload it waits in host memory until the model's first
    forward, and calling the table directly bypasses the model's offload hook.
    """
    table = language_model.get_input_embeddings()
    table_device = table.weight.device
    lookup_device = device if table_device.type == "meta" else table_device  # meta: sequential offload onloads it
    return table(token_ids.to(lookup_device)).to(device)


def moves_weights_in_forward(model: torch.nn.Module) -> bool:
    """Whether hooks move ``model``'s weights inside its forward (sequential CPU offload, group offloading)."""
    for name, module in model.named_modules():
        hooks = getattr(module, "_diffusers_hook", None)
        if (name and hasattr(module, "_hf_hook")) or (hooks is not None and "group_offloading" in hooks.hooks):
            return True
    return False


class LanguageModelBlockEngine(BlockEngine):
    """Runs BitDance's Qwen3 language model over the blocks of one image (see the module docstring).

    Fast paths, both CUDA-oriented and exact on any device:

    * ``static_cache = True``: the KV cache is a preallocated transformers ``StaticCache`` sized for the image (the
      masks then span all of it; positions not yet written are hidden).
    * `enable_cuda_graphs`: the block step replays a CUDA graph over the static cache, captured at the first block
      step of each session (and again after `select_rows` or `invalidate`, which a callback may call through
      ``pipe.reset_cuda_graphs()`` after changing the language model's adapters mid-generation).

    Args:
        prefill_chunk_size: query positions per prefill forward.
    """

    def __init__(self, prefill_chunk_size: int = 1024):
        super().__init__()
        self.static_cache = False
        self.prefill_chunk_size = prefill_chunk_size
        self._release()

    @property
    def uses_static_cache(self) -> bool:
        """CUDA graphs need the static cache (their buffers never move)."""
        return self.static_cache or self.cuda_graphs

    def invalidate(self):
        self._step_runner = None

    @contextmanager
    def session(self, language_model: torch.nn.Module, projector: torch.nn.Module, block_size: int):
        """One generation: binds the modules, switches the block steps to packed grouped-query attention and frees the
        KV cache (and any graph's memory) at the end."""
        if self.cuda_graphs and moves_weights_in_forward(language_model):
            raise ValueError(
                "CUDA graphs cannot replay a language model whose weights are moved inside every forward (sequential "
                "CPU offload or group offloading); use enable_model_cpu_offload(), or pipe.disable_cuda_graphs()."
            )
        self._language_model, self._projector, self._block_size = language_model, projector, block_size
        self._cache_argument = cache_argument_name(language_model)
        self._step_runner = None
        try:
            with packed_gqa_attention(language_model):
                yield self
        finally:
            self._release()

    def _release(self):
        """Forget the session: modules, KV cache, masks, graph (and with it the graph's memory pool)."""
        self._language_model = self._projector = self._cache = self._step_runner = None
        self._key_padding = self._lengths = self._visible = self._positions = None

    def _forward(self, position_ids: torch.Tensor, attention_mask: torch.Tensor, inputs_embeds: torch.Tensor):
        """One cached forward; returns the last ``P`` hidden states ``[R, P, D]``."""
        output = self._language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_argument: self._cache},
        )
        return output.last_hidden_state[:, -self._block_size :]

    def prefill(
        self, prompt_rows: list[torch.Tensor], prefix_ids: list[int], grid_height: int, grid_width: int
    ) -> torch.Tensor:
        """Run every row's prompt and the image prefix; returns the head condition of image block 0.

        Args:
            prompt_rows: per batch row, the input embeddings ``[L_r, D]`` of its templated prompt (real tokens only).
            prefix_ids: token ids of the image prefix (``P + 2`` of them).
            grid_height, grid_width: the image's token grid.

        Returns:
            ``[R, P, D]`` float32: hidden states of the prefix block plus the sin-cos position of image block 0.
        """
        model, block_size = self._language_model, self._block_size
        device, dtype = prompt_rows[0].device, model.dtype
        prefix = embed_token_ids(model, torch.tensor(prefix_ids), device)
        rows = [torch.cat([row.to(dtype), prefix]) for row in prompt_rows]
        length = max(len(row) for row in rows)  # from the host: no device sync
        inputs_embeds = torch.stack([F.pad(row, (0, 0, length - len(row), 0)) for row in rows])
        self._lengths = torch.tensor([len(row) for row in rows], device=device)
        self._key_padding = torch.arange(length, device=device)[None] < (length - self._lengths)[:, None]
        position_ids = (torch.arange(length, device=device)[None] - (length - self._lengths)[:, None]).clamp_min(0)

        num_blocks = grid_height * grid_width // block_size
        kv_length = length + (num_blocks - 1) * block_size if self.uses_static_cache else None
        if kv_length is None:
            self._cache = DynamicCache(config=model.config)
        else:
            self._cache = StaticCache(config=model.config, max_cache_len=kv_length)
        # Every cached real token is visible to the block steps; left padding (and, in a static cache, the positions
        # not yet written) is not.
        self._visible = F.pad(~self._key_padding, (0, (kv_length or length) - length))

        # Chunks of the causal part; the last chunk holds the whole prefix block (bidirectional inside).
        bounds = [*range(0, length - block_size, self.prefill_chunk_size), length]
        forward = self._observed("prefill", self._forward)
        for start, end in zip(bounds, bounds[1:]):
            queries = slice(start, end)
            allowed = block_causal_allowed(length - block_size, 1, block_size, device, queries)[None]
            allowed = allowed[..., :end] & ~self._key_padding[:, None, :end]
            if kv_length is not None:
                allowed = F.pad(allowed, (0, kv_length - end))
            mask = additive_mask(allowed, dtype).unsqueeze(1)
            hidden = forward(position_ids[:, queries], mask, inputs_embeds[:, queries])

        # Fixed 2-D sin-cos position of every image token (float32), added to the head condition and to the embedding
        # of the same block's tokens when they are fed back.
        self._positions = sincos_2d_sequence(grid_height, grid_width, hidden.shape[-1], block_size).to(device)
        return hidden.float() + self._positions[:block_size]

    def _graphed_forward(self):
        """`_forward` replayed from a CUDA graph bound to the current generation's static cache."""
        if self._step_runner is None:
            fill_counters = [layer.cumulative_length for layer in getattr(self._cache, "layers", [])]
            if not fill_counters or not all(isinstance(counter, torch.Tensor) for counter in fill_counters):
                raise RuntimeError(
                    "CUDA graphs for the language model need a transformers StaticCache that counts its fill on the "
                    "device (transformers >= 5.24); upgrade transformers or call `enable_cuda_graphs(backbone=False)`."
                )
            self._step_runner = CUDAGraphRunner(self._forward, state=fill_counters)
        return self._step_runner

    def step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        block_size, dtype = self._block_size, self._language_model.dtype
        block_positions = self._positions[block * block_size : (block + 1) * block_size]
        inputs_embeds = (self._projector(tokens, return_dict=False)[0].float() + block_positions).to(dtype)
        position_ids = self._lengths[:, None] + block * block_size + torch.arange(block_size, device=tokens.device)
        start = self._key_padding.shape[1] + block * block_size
        if self.uses_static_cache:
            self._visible[:, start : start + block_size] = True
        else:
            self._visible = F.pad(self._visible, (0, block_size), value=True)
        mask = additive_mask(self._visible[:, None, None, :], dtype)
        forward = self._observed("block step", self._graphed_forward() if self.cuda_graphs else self._forward)
        hidden = forward(position_ids, mask, inputs_embeds)
        return hidden.float() + self._positions[(block + 1) * block_size : (block + 2) * block_size]

    def select_rows(self, rows: list[int]):
        index = torch.tensor(rows, device=self._lengths.device)
        if isinstance(self._cache, StaticCache):  # transformers selects rows of dynamic caches only
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
                layer.batch_size = len(rows)
        else:
            self._cache.batch_select_indices(index)
        self._lengths, self._key_padding = self._lengths[index], self._key_padding[index]
        self._visible = self._visible[index]
        self.invalidate()  # new batch shape and new cache buffers
