"""What the block loop asks of a backbone engine, and what every owner of forwards offers (graphs, observers).

A block engine runs one backbone over the blocks of an image: it prefills the prefix (prompt or class tokens), then
takes the sampled tokens of each block and returns the diffusion-head condition of the next one, keeping the KV cache
and everything the block step needs. It owns the backbone's fast paths (static cache, CUDA graphs) and the one
`invalidate` that drops what they captured.
"""

from contextlib import contextmanager
from typing import Callable

import torch


class ForwardRunner:
    """What every owner of a module's forwards offers: a CUDA-graph switch with its one invalidation, and call
    observers that let benchmarks and profilers see every forward, graph replays included, from outside any compiled
    code (a wrapped ``forward`` would be traced by ``torch.compile`` and skipped by a replay)."""

    supports_cuda_graphs = True

    def __init__(self):
        self.cuda_graphs = False
        self._observers = []

    def enable_cuda_graphs(self):
        """Replay the forwards from CUDA graphs (CUDA only)."""
        if not self.supports_cuda_graphs:
            raise NotImplementedError(f"{type(self).__name__} has no CUDA-graph path for its forwards.")
        self.cuda_graphs = True
        self.invalidate()

    def disable_cuda_graphs(self):
        self.cuda_graphs = False
        self.invalidate()

    def invalidate(self):
        """Drop every captured graph: the next forward captures anew. Needed whenever the module's weights, adapters
        or placement change (see `graph_dependencies`)."""

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


class BlockEngine(ForwardRunner):
    """Base of the backbone engines. Subclasses implement a ``session`` context, ``prefill``, `step` and
    `select_rows`; those that cannot replay their block step from CUDA graphs clear ``supports_cuda_graphs``."""

    def step(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        """Feed the sampled tokens ``[R, P, C]`` of block ``block`` and return the ``[R, P, D]`` float32 head
        condition of block ``block + 1``."""
        raise NotImplementedError

    def select_rows(self, rows: list[int]):
        """Keep only the batch rows ``rows`` (in that order) from now on: cache, masks and positions."""
        raise NotImplementedError
