"""Block-causal attention masks shared by every BitDance backbone (inference prefill and training).

A sequence is a causal prefix (text or class tokens) followed by blocks of ``P`` tokens; a token sees everything
before its block and every token of its own block. Masks are additive floats (0 = attend, ``finfo.min`` = blocked) of
shape ``[B, 1, q_len, kv_len]``: that is the only 4-D form every attention kernel (eager, SDPA) reads the same way.
"""

import torch


def block_causal_allowed(
    num_causal: int, num_blocks: int, block_size: int, device=None, queries: slice = slice(None)
) -> torch.Tensor:
    """Boolean ``[L, L]`` (True = attend) for ``num_causal`` causal tokens then ``num_blocks`` blocks of ``block_size``.

    Position ``i >= num_causal`` belongs to block ``(i - num_causal) // block_size`` and sees every position up to the
    end of its block; earlier positions see up to themselves. ``queries`` selects rows (``[q, L]``, for a prefill in
    chunks) without building the others.
    """
    length = num_causal + num_blocks * block_size
    keys = torch.arange(length, device=device)
    index = keys[queries]
    block_end = num_causal + ((index - num_causal) // block_size + 1) * block_size - 1
    last_visible = torch.where(index < num_causal, index, block_end)
    return keys[None, :] <= last_visible[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (True = attend) -> additive float mask in ``dtype`` (0 / ``finfo(dtype).min``)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def left_padded_block_causal(
    causal_lengths: torch.Tensor, num_blocks: int, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks and positions for a batch of rows ``[left padding, causal tokens, num_blocks blocks of block_size]``.

    Args:
        causal_lengths: ``[R]`` causal tokens per row (text prompt and image-start tokens), before the blocks.
        num_blocks: bidirectional blocks after the causal part (the same number in every row).
        block_size: tokens per block ``P``.
        dtype: dtype of the additive mask (the language model's).

    Returns:
        ``(mask [R, 1, L, L], position_ids [R, L], key_padding [R, L])`` with ``L = max(causal_lengths) + num_blocks *
        block_size``: padding is never attended, positions count real tokens only (so a padded row computes what it
        would alone).
    """
    device = causal_lengths.device
    max_causal = int(causal_lengths.max())
    length = max_causal + num_blocks * block_size
    padding = (max_causal - causal_lengths)[:, None]
    index = torch.arange(length, device=device)[None]
    key_padding = index < padding
    position_ids = (index - padding).clamp_min(0)
    allowed = block_causal_allowed(max_causal, num_blocks, block_size, device=device)[None] & ~key_padding[:, None]
    return additive_mask(allowed, dtype).unsqueeze(1), position_ids, key_padding
