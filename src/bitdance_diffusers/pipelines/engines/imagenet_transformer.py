"""The class-conditional backbone over blocks: `BitDanceImageNetTransformer` and its KV cache.

One generation is one `ImageNetTransformerBlockEngine.session`. `prefill` runs the class tokens (and the ``P - 1``
query tokens) of every row, the conditional labels first and then one null-class row per guided image; `step` runs one
block of sampled tokens over the cache. The masks and rotary positions are the model's own (one block is bidirectional
and sees the whole cache, so a cached step needs no mask).
"""

from contextlib import contextmanager

import torch
from transformers import DynamicCache

from .block_engine import BlockEngine


class ImageNetTransformerBlockEngine(BlockEngine):
    """Runs a `BitDanceImageNetTransformer` over the blocks of one image, over a growing ``DynamicCache``."""

    supports_cuda_graphs = False

    def __init__(self):
        super().__init__()
        self._transformer = self._cache = None

    @contextmanager
    def session(self, transformer: torch.nn.Module):
        """One generation: binds the backbone and frees its KV cache at the end."""
        self._transformer = transformer
        try:
            yield self
        finally:
            self._transformer = self._cache = None

    def prefill(self, class_labels: torch.Tensor) -> torch.Tensor:
        """Class ids ``[R]`` (``num_classes`` = null class) -> head condition ``[R, P, D]`` of image block 0."""
        self._cache = DynamicCache()
        self._device = class_labels.device
        forward = self._observed("prefill", self._transformer)
        return forward(class_labels=class_labels, past_key_values=self._cache).sample

    def step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        forward = self._observed("block step", self._transformer)
        return forward(tokens=tokens, past_key_values=self._cache).sample

    def select_rows(self, rows: list[int]):
        self._cache.batch_select_indices(torch.tensor(rows, device=self._device))
