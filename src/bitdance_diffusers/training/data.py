"""Captioned images for training: loading through 🤗 datasets, aspect-ratio buckets, and the batch sampler.

Two sources, as in diffusers' training examples:

- a folder (``--train_data_dir``) in the Hugging Face ``imagefolder`` layout, images with a ``metadata.jsonl`` of
  ``{"file_name": "cat.png", "text": "a cat on a sofa"}`` lines (or ``metadata.csv`` / ``.parquet``), or with a
  ``<name>.txt`` caption beside each ``<name>.png`` / ``.jpg``;
- a dataset of the Hub (``--dataset_name``), read from the local caches when ``HF_HUB_OFFLINE=1``: the datasets cache
  of an earlier ``load_dataset``, else the Hub cache (``huggingface-cli download --repo-type dataset NAME``).

Every image goes to the bucket, among the pipeline's ``image_sizes`` of about the training resolution's area, whose
aspect ratio is nearest its own; it is scaled to cover the bucket and centre-cropped. `BucketBatchSampler` draws
every global batch (all processes of a step together) from one bucket, in an order fixed by the seed and the epoch,
so a run resumes exactly and all processes of a step share a shape.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Buckets are the image sizes whose area is within this factor of the training resolution squared.
BUCKET_AREA_TOLERANCE = 1.5


def _require_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError("Loading training images needs 🤗 datasets: `pip install datasets`.") from error
    return datasets


def _check_metadata_jsonl(folder: Path):
    """Name the line of ``metadata.jsonl`` that is not a ``{"file_name", "text"}`` record, or the missing image."""
    metadata = folder / "metadata.jsonl"
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata}, line {number} is not JSON ({error}): {line[:80]!r}") from error
        if not isinstance(record, dict) or "file_name" not in record or "text" not in record:
            raise ValueError(f"{metadata}, line {number}: each line needs 'file_name' and 'text', got {record}.")
        if not (folder / record["file_name"]).is_file():
            raise FileNotFoundError(
                f"{metadata}, line {number} names an image that is not there: {record['file_name']}."
            )


def load_image_folder(folder: str | Path, cache_dir: str | None = None, captions: bool = True):
    """The captioned images of ``folder`` as a `datasets.Dataset` with columns ``image`` and ``text`` (without
    ``captions``: the images alone, for the tokenizer)."""
    datasets = _require_datasets()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist.")
    if any((folder / f"metadata.{suffix}").is_file() for suffix in ("jsonl", "csv", "parquet")):
        if (folder / "metadata.jsonl").is_file():
            _check_metadata_jsonl(folder)
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=cache_dir)
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    features = datasets.Features({"image": datasets.Image()})
    if not captions:
        return datasets.Dataset.from_dict({"image": [str(path) for path in images]}, features=features)
    uncaptioned = [path.name for path in images if not path.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise FileNotFoundError(
            f"No caption for {uncaptioned[:3]} in {folder}: put a <name>.txt beside each image, or write a "
            'metadata.jsonl with lines {"file_name": ..., "text": ...}.'
        )
    texts = [path.with_suffix(".txt").read_text(encoding="utf-8").strip() for path in images]
    features["text"] = datasets.Value("string")
    return datasets.Dataset.from_dict({"image": [str(path) for path in images], "text": texts}, features=features)


def load_hub_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None):
    """The ``train`` split of dataset ``name`` (Hub id or local folder); offline, from the datasets or the Hub cache."""
    datasets = _require_datasets()
    try:
        return datasets.load_dataset(name, config_name, split="train", cache_dir=cache_dir)
    except ConnectionError as unreachable:  # offline, and not in the datasets cache: try the Hub's file cache
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise ConnectionError(
                f"The dataset {name!r} is neither in the datasets cache nor in the Hub cache, and the Hub cannot be "
                f"reached ({unreachable}). Download it first (`huggingface-cli download --repo-type dataset {name}`) "
                "or pass --train_data_dir with a local folder."
            ) from unreachable
        return datasets.load_dataset(snapshot, config_name, split="train", cache_dir=cache_dir)


def select_columns(dataset, image_column: str | None = None, caption_column: str | None = None, captions: bool = True):
    """The dataset reduced to ``image`` (undecoded: path or bytes) and ``text`` columns, from the named ones (without
    ``captions``, to ``image`` alone).

    Without names, the first ``Image`` column and the ``text`` (else first string) column are used.
    """
    datasets = _require_datasets()
    features = dataset.features
    if image_column is None:
        image_column = next((name for name, feature in features.items() if isinstance(feature, datasets.Image)), None)
    if caption_column is None and captions:
        strings = [name for name, feature in features.items() if getattr(feature, "dtype", None) == "string"]
        caption_column = "text" if "text" in strings else next(iter(strings), None)
    wanted = (("--image_column", image_column), ("--caption_column", caption_column))[: 2 if captions else 1]
    for flag, column in wanted:
        if column not in features:
            found = f"'{column}' is not one of its columns" if column else "no column was found"
            raise ValueError(f"{flag}: {found}; the dataset has {', '.join(features)}.")
    dataset = dataset.select_columns([column for _, column in wanted])
    renames = {old: new for (_, old), new in zip(wanted, ("image", "text")) if old != new}
    dataset = dataset.rename_columns(renames)
    return dataset.cast_column("image", datasets.Image(decode=False))


def _read_image(record: dict, header_only: bool = False):
    """The RGB image of an undecoded ``datasets.Image`` value (``{"path", "bytes"}``), or its ``(width, height)``."""
    source = record["path"] if record.get("bytes") is None else io.BytesIO(record["bytes"])
    try:
        with Image.open(source) as image:
            return image.size if header_only else image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read the image {record.get('path') or '(bytes)'}: {error}") from error


def bucket_sizes(image_sizes: list, resolution: int | None = None) -> list[list[int]]:
    """The ``[height, width]`` sizes of ``image_sizes`` whose area is within `BUCKET_AREA_TOLERANCE` of
    ``resolution ** 2`` (default: the area of the first size)."""
    if resolution is None:
        resolution = math.sqrt(image_sizes[0][0] * image_sizes[0][1])
    buckets = [list(size) for size in image_sizes
               if abs(math.log(size[0] * size[1] / resolution**2)) <= math.log(BUCKET_AREA_TOLERANCE)]  # fmt: skip
    if not buckets:
        sizes = ", ".join(f"{h}x{w}" for h, w in image_sizes)
        raise ValueError(f"No image size of the model has about {resolution}x{resolution} pixels; its sizes are "
                         f"{sizes}: pass one of those areas as --resolution.")  # fmt: skip
    return buckets


def nearest_bucket(width: int, height: int, buckets: list) -> int:
    """Index of the ``[height, width]`` bucket whose aspect ratio is nearest ``width / height`` (first on ties)."""
    ratios = [abs(math.log(width / height) - math.log(bucket_width / bucket_height))
              for bucket_height, bucket_width in buckets]  # fmt: skip
    return int(np.argmin(ratios))


def resize_and_crop(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """``[3, height, width]`` in [-1, 1]: ``image`` scaled to cover the size (bicubic), then centre-cropped."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous()


class BucketedImageCaptions(torch.utils.data.Dataset):
    """``dataset[i]`` -> ``{"pixel_values": [3, H, W] in [-1, 1], "caption": str}`` at the bucket of image ``i``.

    Args:
        dataset: a `datasets.Dataset` with ``image`` (undecoded) and ``text`` columns (see `select_columns`).
        buckets: ``[height, width]`` sizes (see `bucket_sizes`); each image goes to the nearest in aspect ratio.
    """

    def __init__(self, dataset, buckets: list):
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty.")
        self.dataset, self.buckets = dataset, [list(bucket) for bucket in buckets]
        self.bucket_indices = [nearest_bucket(*_read_image(record, header_only=True), self.buckets)
                               for rows in dataset.select_columns(["image"]).iter(batch_size=256)
                               for record in rows["image"]]  # fmt: skip

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        record = self.dataset[index]
        height, width = self.buckets[self.bucket_indices[index]]
        pixels = resize_and_crop(_read_image(record["image"]), height, width)
        return {"pixel_values": pixels, "caption": record.get("text", "")}


class EncodedDataset(torch.utils.data.Dataset):
    """Captions with their images' ±1 codes (int8 ``[C, h, w]``), encoded once (``--cache_latents``).

    ``bucket_indices`` follow the images' sizes, so a `BucketBatchSampler` still batches equal shapes.
    """

    def __init__(self, codes: list[torch.Tensor], captions: list[str], bucket_indices: list[int] | None = None):
        self.codes, self.captions = codes, captions
        self.bucket_indices = bucket_indices if bucket_indices is not None else [0] * len(captions)

    @classmethod
    @torch.no_grad()
    def encode(cls, dataset, vae, batch_size: int = 32, progress: bool = False) -> "EncodedDataset":
        """Encode every image of ``dataset`` (items with ``pixel_values``) with ``vae``, batching equal sizes."""
        from tqdm.auto import tqdm

        bucket_indices = list(getattr(dataset, "bucket_indices", [0] * len(dataset)))
        codes, captions = [None] * len(dataset), [None] * len(dataset)
        by_bucket = {}
        for index, bucket in enumerate(bucket_indices):
            by_bucket.setdefault(bucket, []).append(index)
        parameter = next(vae.parameters())
        batches = [group[start : start + batch_size] for group in by_bucket.values()
                   for start in range(0, len(group), batch_size)]  # fmt: skip
        for indices in tqdm(batches, disable=not progress, desc="encoding"):
            items = [dataset[index] for index in indices]
            images = torch.stack([item["pixel_values"] for item in items]).to(parameter.device, parameter.dtype)
            for index, item, code in zip(indices, items, vae.encode(images).codes.to("cpu", torch.int8)):
                codes[index], captions[index] = code, item["caption"]
        return cls(codes, captions, bucket_indices)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"codes": self.codes[index].float(), "caption": self.captions[index]}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of one bucket each, for ``num_processes`` processes and ``accumulation_steps`` micro-batches per
    optimizer step, in an order fixed by ``seed`` and the epoch.

    Each epoch shuffles the dataset (generator seeded with ``(seed, epoch)``), cuts every bucket's indices into global
    batches of ``batch_size * num_processes * accumulation_steps`` (dropping each bucket's incomplete rest), shuffles
    the global batches and yields each as consecutive batches of ``batch_size``: micro-batch ``k`` of process ``r`` is
    chunk ``k * num_processes + r``, which is how `accelerate` hands batches out (process ``r`` takes batches ``r,
    r + num_processes, ...``). A global batch is thus the same samples however it is split over processes and
    accumulated micro-batches.
    """

    def __init__(self, bucket_indices: list[int], batch_size: int, num_processes: int = 1, seed: int = 0,
                 accumulation_steps: int = 1):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"The batch size must be at least 1, got {batch_size}.")
        self.bucket_indices = list(bucket_indices)
        self.batch_size, self.num_processes, self.seed, self.epoch = batch_size, num_processes, seed, 0
        self.chunks = num_processes * accumulation_steps
        global_batch = batch_size * self.chunks
        sizes = np.bincount(self.bucket_indices) if self.bucket_indices else np.zeros(0, dtype=int)
        self.num_global_batches = int(sum(size // global_batch for size in sizes))
        if self.num_global_batches == 0:
            raise ValueError(
                f"No bucket holds a whole global batch of {global_batch} images (batch size {batch_size} x "
                f"{num_processes} processes x {accumulation_steps} accumulation steps; images per bucket: "
                f"{sizes.tolist()}): lower --train_batch_size or --gradient_accumulation_steps, or add images."
            )

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_global_batches * self.chunks

    def __iter__(self):
        seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(len(self.bucket_indices), generator=generator).tolist()
        global_batch = self.batch_size * self.chunks
        by_bucket = {}
        for index in order:
            by_bucket.setdefault(self.bucket_indices[index], []).append(index)
        batches = [indices[start : start + global_batch] for _, indices in sorted(by_bucket.items())
                   for start in range(0, len(indices) - global_batch + 1, global_batch)]  # fmt: skip
        for position in torch.randperm(len(batches), generator=generator).tolist():
            batch = batches[position]
            for chunk in range(self.chunks):
                yield batch[chunk * self.batch_size : (chunk + 1) * self.batch_size]


def collate(items: list[dict]) -> dict:
    """Stack ``pixel_values`` or ``codes`` (one bucket per batch) and list the captions."""
    batch = {"caption": [item["caption"] for item in items]}
    for key in ("pixel_values", "codes"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch
