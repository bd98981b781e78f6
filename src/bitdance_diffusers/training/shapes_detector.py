"""A pixel-level detector for the synthetic shapes set: background colour, dominant object colour, position, shape.

It reads the picture the way the captions describe it: the background is the palette colour of the border; every
other pixel is assigned to its nearest palette colour; the object colour is the most frequent non-background colour;
its position is the nearest of the nine named positions to that colour's centroid; its shape is read off how much of
its bounding box it fills (square 1, circle pi/4, star about 0.38, triangle 0.5).
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .shapes import COLORS, POSITIONS


PALETTE_NAMES = list(COLORS)
PALETTE = np.array([COLORS[name] for name in PALETTE_NAMES], dtype=np.float32)  # [K, 3]

# Upper bounds of the fill ratio (object area / bounding-box area) per shape: midpoints between the rendered shapes'
# ratios, star 0.384, triangle 0.5, circle pi / 4 = 0.785, square 1.
_FILL_THRESHOLDS = [(0.44, "star"), (0.64, "triangle"), (0.89, "circle"), (float("inf"), "square")]


@dataclass
class Detection:
    background: str
    color: str | None  # None when no object pixels were found
    position: str | None
    area: float  # fraction of the image covered by the object colour
    shape: str | None = None


def _as_array(image) -> np.ndarray:
    """PIL image, ``[3, H, W]`` tensor in [-1, 1] or ``[H, W, 3]`` uint8 array -> ``[H, W, 3]`` float32 in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    return np.asarray(image, dtype=np.float32)


def detect_shape(image, min_area: float = 0.005) -> Detection:
    pixels = _as_array(image)
    height, width, _ = pixels.shape
    labels = ((pixels[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)  # [H, W] nearest palette colour
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = np.bincount(border, minlength=len(PALETTE)).argmax()
    counts = np.bincount(labels.ravel(), minlength=len(PALETTE)).astype(np.float64)
    counts[background] = 0
    color = counts.argmax()
    area = counts[color] / (height * width)
    if area < min_area:
        return Detection(PALETTE_NAMES[background], None, None, float(area))
    ys, xs = np.nonzero(labels == color)
    center = np.array([xs.mean() / width, ys.mean() / height])
    names = list(POSITIONS)
    distances = [np.sum((center - np.array(POSITIONS[name])) ** 2) for name in names]
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    shape = next(name for threshold, name in _FILL_THRESHOLDS if fill < threshold)
    return Detection(PALETTE_NAMES[background], PALETTE_NAMES[color], names[int(np.argmin(distances))], float(area),
                     shape)  # fmt: skip
