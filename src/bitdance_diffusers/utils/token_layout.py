"""Where binary tokens live: latent grids, patch-raster token sequences and packed vocabulary ids.

BitDance generates a ``[B, C, h, w]`` grid of ±1 codes. The autoregressive models consume it as a sequence in
*patch-raster* order: the grid is cut into ``ps x ps`` patches (``ps = sqrt(P)`` for ``P`` tokens per step), patches
are visited in raster order and the tokens inside a patch in raster order (einops
``b c (h p1) (w p2) -> b (h w p1 p2) c``). ``P = 1`` is plain raster order.

A token is a vector of ``C`` bits, i.e. an id in a ``2**C`` vocabulary. ``C`` reaches 256, more than an int64 holds,
so ids are *packed* into ``ceil(C / 32)`` int64 words, little-endian: channel ``c`` is bit ``c % 32`` of word
``c // 32`` and a bit is set where the code is ``+1``. For ``C <= 32`` the single word is the vocabulary id itself.
"""

import math

import torch


BITS_PER_WORD = 32


def patch_size_for_block(block_size: int) -> int:
    """Side ``ps`` of the square patch holding ``block_size`` tokens (1, 4, 16, 64 -> 1, 2, 4, 8)."""
    patch_size = math.isqrt(block_size)
    if patch_size * patch_size != block_size:
        raise ValueError(f"block_size must be a square number of tokens (1, 4, 16, 64, ...), got {block_size}.")
    return patch_size


def grid_to_sequence(grid: torch.Tensor, block_size: int = 1) -> torch.Tensor:
    """``[B, C, h, w]`` latent grid -> ``[B, h*w, C]`` token sequence in patch-raster order."""
    if grid.ndim != 4:
        raise ValueError(f"Expected a latent grid of shape [B, C, h, w], got shape {tuple(grid.shape)}.")
    batch, channels, height, width = grid.shape
    ps = patch_size_for_block(block_size)
    if height % ps or width % ps:
        raise ValueError(f"Latent grid {height}x{width} is not divisible into {ps}x{ps} patches (block_size={block_size}).")
    grid = grid.reshape(batch, channels, height // ps, ps, width // ps, ps)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, height * width, channels)


def sequence_to_grid(sequence: torch.Tensor, height: int, width: int, block_size: int = 1) -> torch.Tensor:
    """``[B, h*w, C]`` patch-raster token sequence -> ``[B, C, h, w]`` latent grid (inverse of `grid_to_sequence`)."""
    if sequence.ndim != 3 or sequence.shape[1] != height * width:
        raise ValueError(
            f"Expected a token sequence of shape [B, {height * width}, C] for a {height}x{width} grid, "
            f"got shape {tuple(sequence.shape)}."
        )
    batch, _, channels = sequence.shape
    ps = patch_size_for_block(block_size)
    if height % ps or width % ps:
        raise ValueError(f"Latent grid {height}x{width} is not divisible into {ps}x{ps} patches (block_size={block_size}).")
    sequence = sequence.reshape(batch, height // ps, width // ps, ps, ps, channels)
    return sequence.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def pack_codes(codes: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """±1 codes -> packed vocabulary ids.

    Args:
        codes: ±1 tensor with the ``C`` code channels along ``dim``.
        dim: the channel axis.

    Returns:
        int64 tensor shaped like ``codes`` with axis ``dim`` replaced by ``ceil(C / 32)`` words (see module docstring).
    """
    if not bool(((codes == 1) | (codes == -1)).all()):
        raise ValueError("pack_codes expects binary codes in {-1, +1}; binarize first (e.g. torch.where(x > 0, 1, -1)).")
    codes = codes.movedim(dim, -1)
    channels = codes.shape[-1]
    num_words = math.ceil(channels / BITS_PER_WORD)
    bits = torch.nn.functional.pad((codes > 0).long(), (0, num_words * BITS_PER_WORD - channels))
    bits = bits.reshape(*bits.shape[:-1], num_words, BITS_PER_WORD)
    weights = 2 ** torch.arange(BITS_PER_WORD, device=codes.device, dtype=torch.long)
    return (bits * weights).sum(-1).movedim(-1, dim)


def unpack_codes(indices: torch.Tensor, num_channels: int, dim: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed vocabulary ids (see `pack_codes`) -> ±1 codes with ``num_channels`` channels along ``dim``."""
    num_words = math.ceil(num_channels / BITS_PER_WORD)
    indices = indices.movedim(dim, -1)
    if indices.shape[-1] != num_words:
        raise ValueError(f"{num_channels} channels pack into {num_words} words, got {indices.shape[-1]} along dim {dim}.")
    shifts = torch.arange(BITS_PER_WORD, device=indices.device, dtype=torch.long)
    bits = (indices.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*bits.shape[:-2], num_words * BITS_PER_WORD)[..., :num_channels]
    return (bits.to(dtype) * 2 - 1).movedim(-1, dim)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Map to ±1 with the original's encoder convention: ``> 0 -> +1``, ``<= 0 -> -1``."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)
