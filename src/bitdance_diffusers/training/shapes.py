"""A synthetic captioned image set, generated on the fly and deterministic from a seed: coloured shapes.

Every image shows one or two shapes (circle, square, triangle, star) of a named colour and size at a named position
on a plain background of another colour; the caption says exactly that, e.g. "a small red circle at the top left on
a blue background". Sample ``i`` of seed ``s`` is always the same picture.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw


COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.16, "large": 0.30}  # shape radius as a fraction of the image side
POSITIONS = {
    "at the top left": (0.25, 0.25),
    "at the top": (0.5, 0.25),
    "at the top right": (0.75, 0.25),
    "on the left": (0.25, 0.5),
    "in the center": (0.5, 0.5),
    "on the right": (0.75, 0.5),
    "at the bottom left": (0.25, 0.75),
    "at the bottom": (0.5, 0.75),
    "at the bottom right": (0.75, 0.75),
}


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.position}"


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple
    background: str

    def caption(self) -> str:
        article = "an" if self.background[0] in "aeiou" else "a"
        return " and ".join(obj.phrase() for obj in self.objects) + f" on {article} {self.background} background"


def sample_scene(rng: random.Random, max_objects: int = 2) -> SceneSpec:
    """A random scene: 1..max_objects shapes at distinct positions, colours distinct from the background."""
    background = rng.choice(list(COLORS))
    colors = [c for c in COLORS if c != background]
    positions = rng.sample(list(POSITIONS), rng.randint(1, max_objects))
    objects = tuple(
        ShapeSpec(rng.choice(SHAPES), rng.choice(colors), rng.choice(list(SIZES)), position) for position in positions
    )
    return SceneSpec(objects, background)


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list:
    if shape == "square":
        r = radius * 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    points = []  # five-pointed star
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def unit_area(shape: str) -> float:
    """Area of ``shape`` drawn with radius 1 (the radius `draw_shape` takes)."""
    if shape == "circle":
        return math.pi
    points = _polygon(shape, 0.0, 0.0, 1.0)
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    """Draw ``shape`` centred on ``(cx, cy)`` in pixels: the circle's radius, the other shapes' circumradius (the
    square's half side is ``0.85 * radius``); triangles and stars point up."""
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=fill)


def render_scene(scene: SceneSpec, resolution: int) -> Image.Image:
    image = Image.new("RGB", (resolution, resolution), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        radius = SIZES[obj.size] * resolution / 2 * 1.6
        draw_shape(draw, obj.shape, fx * resolution, fy * resolution, radius, COLORS[obj.color])
    return image


class ShapesDataset(torch.utils.data.Dataset):
    """``dataset[i]`` -> ``{"pixel_values": [3, R, R] in [-1, 1], "caption": str}``, deterministic in ``(seed, i)``."""

    def __init__(self, size: int, resolution: int = 128, seed: int = 0, max_objects: int = 2):
        self.size, self.resolution, self.seed, self.max_objects = size, resolution, seed, max_objects

    def __len__(self):
        return self.size

    def scene(self, index: int) -> SceneSpec:
        return sample_scene(random.Random(f"{self.seed}-{index}"), self.max_objects)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.size} images")
        scene = self.scene(index)
        pixels = np.asarray(render_scene(scene, self.resolution), dtype=np.float32) / 127.5 - 1.0
        return {"pixel_values": torch.from_numpy(pixels).permute(2, 0, 1), "caption": scene.caption()}
