"""Fixed embeddings of BitDance: the 2-D sin-cos table for image tokens and the sinusoidal time embedding."""

import math

import numpy as np
import torch
import torch.nn as nn

from ..utils.token_layout import grid_to_sequence


def sincos_1d_table(num_positions: int, dim: int) -> np.ndarray:
    """``[num_positions, dim]`` float64: ``[sin(p * w_k) ‖ cos(p * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 2))``."""
    if dim % 2:
        raise ValueError(f"sin-cos table width must be even, got {dim}.")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_sequence(height: int, width: int, dim: int, block_size: int = 1) -> torch.Tensor:
    """Positional embedding of a ``height x width`` token grid, ``[height * width, dim]`` float32, patch-raster order.

    Cell (row ``r``, column ``c``) gets ``[table(c) ‖ table(r)]`` (the column/x half first), each half ``dim / 2`` wide.
    The table is computed in float64 and stored in float32: it is added in float32 (never in the weight dtype).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos width must be a multiple of 4, got {dim}.")
    table = torch.from_numpy(sincos_1d_table(max(height, width), dim // 2))
    rows = table[:height, None, :].expand(height, width, -1)
    cols = table[None, :width, :].expand(height, width, -1)
    grid = torch.cat([cols, rows], dim=-1).permute(2, 0, 1).unsqueeze(0)  # [1, dim, h, w]
    return grid_to_sequence(grid, block_size)[0].float()


class TimestepEmbedding(nn.Module):
    """``t`` in [0, 1] -> ``mlp([cos(1000 t w) ‖ sin(1000 t w)])`` with 256 frequencies ``w_k = 10000 ** (-k / 128)``."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (1000 * t.float())[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B]`` -> ``[B, hidden_size]``, computed in ``dtype``: the owning model's compute dtype (under weight
        quantization the layers' weights are integer containers and do not tell it)."""
        return self.mlp(self.sinusoid(t).to(dtype))
