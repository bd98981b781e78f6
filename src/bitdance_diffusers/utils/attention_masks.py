"""Block-causal attention masks shared by every BitDance backbone (inference prefill and training).

A sequence is a causal prefix (text or class tokens) followed by blocks of ``P`` tokens; a token sees everything
before its block and every token of its own block. Masks are additive floats (0 = attend, ``finfo.min`` = blocked) of
shape ``[B, 1, q_len, kv_len]``: that is the only 4-D form every attention kernel (eager, SDPA) reads the same way.
"""

import torch


def block_causal_allowed(num_causal: int, num_blocks: int, block_size: int, device=None) -> torch.Tensor:
    """Boolean ``[L, L]`` (True = attend) for ``num_causal`` causal tokens then ``num_blocks`` blocks of ``block_size``.

    The first block may start inside the causal part only through ``num_causal``: position ``i`` belongs to block
    ``(i - num_causal) // block_size`` when ``i >= num_causal``; earlier positions are causal.
    """
    length = num_causal + num_blocks * block_size
    index = torch.arange(length, device=device)
    group = torch.where(index < num_causal, index, num_causal + (index - num_causal) // block_size * block_size)
    # Token i attends j if j is not after i, or j lies in i's block. Using the block start as "group" makes both one test.
    group_end = torch.where(index < num_causal, index, group + block_size - 1)
    return index[None, :] <= group_end[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (True = attend) -> additive float mask in ``dtype`` (0 / ``finfo(dtype).min``)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
