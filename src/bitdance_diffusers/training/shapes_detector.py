"""A pixel-level detector for the synthetic shapes set: background colour, dominant object colour, position, shape.

It reads the picture the way the captions describe it: the background is the palette colour of the border; every
other pixel is assigned to its nearest palette colour; the object colour is the most frequent non-background colour;
its position is the nearest of the nine named positions to that colour's centroid; its shape is the one whose
outline, drawn upright at that centroid with the same area, overlaps the object's pixels best (intersection over
union). Matching whole outlines rather than, say, a bounding-box fill ratio keeps a slightly blurred star a star.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .shapes import COLORS, POSITIONS, SHAPES, draw_shape, unit_area


PALETTE_NAMES = list(COLORS)
PALETTE = np.array([COLORS[name] for name in PALETTE_NAMES], dtype=np.float32)  # [K, 3]


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


def read_shape(mask: np.ndarray) -> str:
    """The shape of the object ``mask [H, W]`` (bool): the best intersection over union with each shape's outline
    drawn at the mask's centroid with the mask's area."""
    ys, xs = np.nonzero(mask)
    best_iou, best_shape = -1.0, None
    for shape in SHAPES:
        template = Image.new("1", (mask.shape[1], mask.shape[0]))
        draw_shape(ImageDraw.Draw(template), shape, xs.mean(), ys.mean(), np.sqrt(len(xs) / unit_area(shape)), 1)
        template = np.asarray(template)
        iou = (template & mask).sum() / (template | mask).sum()
        if iou > best_iou:
            best_iou, best_shape = iou, shape
    return best_shape


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
    mask = labels == color
    ys, xs = np.nonzero(mask)
    center = np.array([xs.mean() / width, ys.mean() / height])
    names = list(POSITIONS)
    distances = [np.sum((center - np.array(POSITIONS[name])) ** 2) for name in names]
    return Detection(PALETTE_NAMES[background], PALETTE_NAMES[color], names[int(np.argmin(distances))], float(area),
                     read_shape(mask))  # fmt: skip
