"""What the block loop asks of a backbone engine, and the call observers every engine offers.

A block engine runs one backbone over the blocks of an image: it prefills the prefix (prompt or class tokens), then
takes the sampled tokens of each block and returns the diffusion-head condition of the next one, keeping the KV cache
and everything the block step needs. It owns the backbone's fast paths (static cache, CUDA graphs) and the one
`invalidate` that drops what they captured.
"""

from contextlib import contextmanager
from typing import Callable

import torch


class ObservableCalls:
    """Lets benchmarks and profilers see every forward an engine makes, graph replays included, from outside any
    compiled code (a wrapped ``forward`` would be traced by ``torch.compile`` and skipped by a replay)."""

    def __init__(self):
        self._observers = []

    @contextmanager
    def observe_calls(self, wrap: Callable[[str, Callable], Callable]):
        """Within the block, every forward goes through ``wrap(kind, forward)(*args, **kwargs)``; ``kind`` names the
        call (``"prefill"``, ``"block step"``, ``"head"``)."""
        self._observers.append(wrap)
        try:
            yield
        finally:
            self._observers.remove(wrap)

    def _observed(self, kind: str, forward: Callable) -> Callable:
        for wrap in self._observers:
            forward = wrap(kind, forward)
        return forward


class BlockEngine(ObservableCalls):
    """Base of the backbone engines. Subclasses implement a ``session`` context, ``prefill``, `step` and
    `select_rows`; those that can replay their block step from CUDA graphs set ``supports_cuda_graphs``."""

    supports_cuda_graphs = False

    def __init__(self):
        super().__init__()
        self.cuda_graphs = False

    def enable_cuda_graphs(self):
        """Replay the block step from a CUDA graph (CUDA only)."""
        if not self.supports_cuda_graphs:
            raise NotImplementedError(f"{type(self).__name__} has no CUDA-graph path for its block step.")
        self.cuda_graphs = True
        self.invalidate()

    def disable_cuda_graphs(self):
        self.cuda_graphs = False
        self.invalidate()

    def invalidate(self):
        """Drop every captured graph: the next block step captures anew. Called whenever the backbone's weights,
        adapters or placement change (see `graph_dependencies`)."""

    def step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        """Feed the sampled tokens ``[R, P, C]`` of block ``block`` and return the ``[R, P, D]`` float32 head
        condition of block ``block + 1``."""
        raise NotImplementedError

    def select_rows(self, rows: list[int]):
        """Keep only the batch rows ``rows`` (in that order) from now on: cache, masks and positions."""
        raise NotImplementedError
