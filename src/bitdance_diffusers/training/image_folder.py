"""Captioned images from a folder, for fine-tuning (full or LoRA) on one's own pictures.

The folder holds the images and their captions in one of two layouts: a ``metadata.jsonl`` with one line per image,
``{"file_name": "cat.png", "text": "a cat on a sofa"}`` (the layout of Hugging Face ``imagefolder`` datasets), or a
``<name>.txt`` caption beside each ``<name>.png`` / ``.jpg``.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captions(folder: Path) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs of ``folder``, sorted by file name."""
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        pairs = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata}, line {number} is not JSON ({error}): {line[:80]!r}") from error
            if not isinstance(record, dict) or "file_name" not in record or "text" not in record:
                raise ValueError(f"{metadata}, line {number}: each line needs 'file_name' and 'text', got {record}.")
            pairs.append((folder / record["file_name"], record["text"]))
        missing = [str(path) for path, _ in pairs if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{metadata} names images that are not there: {missing[:3]}.")
        return sorted(pairs)
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    uncaptioned = [path.name for path in images if not path.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise FileNotFoundError(
            f"No caption for {uncaptioned[:3]} in {folder}: put a <name>.txt beside each image, or write a "
            'metadata.jsonl with lines {"file_name": ..., "text": ...}.'
        )
    return [(path, path.with_suffix(".txt").read_text(encoding="utf-8").strip()) for path in images]


class ImageCaptionFolder(torch.utils.data.Dataset):
    """``dataset[i]`` -> ``{"pixel_values": [3, H, W] in [-1, 1], "caption": str}``.

    Each image is scaled so that it covers ``height x width`` and centre-cropped to it; pick a size the pipeline
    supports (``pipe.config.image_sizes``).
    """

    def __init__(self, folder: str | Path, height: int, width: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder {folder} does not exist.")
        self.pairs = read_captions(folder)
        if not self.pairs:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        self.height, self.width = height, width or height

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.pairs[index]
        try:
            image = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Cannot read the image {path}: {error}") from error
        scale = max(self.width / image.width, self.height / image.height)
        size = (max(self.width, round(image.width * scale)), max(self.height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - self.width) // 2, (size[1] - self.height) // 2
        image = image.crop((left, top, left + self.width, top + self.height))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        return {"pixel_values": pixels.permute(2, 0, 1).contiguous(), "caption": caption}
