"""Training data and checkpoints: image folders and Hub datasets through 🤗 datasets, aspect-ratio buckets, the batch
sampler, and the crash-consistent checkpoint folders."""

import io
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from bitdance_diffusers.training.checkpoints import (
    STATE_FILE,
    commit_folder,
    list_checkpoints,
    prune_checkpoints,
    remove_stale_staging,
    resolve_checkpoint,
)
from bitdance_diffusers.training.data import (
    BucketBatchSampler,
    BucketedImageCaptions,
    bucket_sizes,
    load_image_folder,
    nearest_bucket,
    select_columns,
)
from bitdance_diffusers.pipelines.pipeline_bitdance import DEFAULT_IMAGE_SIZES


def write_image_folder(folder, layout, sizes=((40, 80), (40, 80))):
    """Two pictures, red and blue, each with a white band on its left edge (which a centre crop cuts away)."""
    folder.mkdir()
    captions = {"red.png": "a red square", "blue.jpg": "a blue square"}
    for index, ((name, caption), (height, width)) in enumerate(zip(captions.items(), sizes)):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[..., 0 if index == 0 else 2] = 255
        pixels[:, :8] = 255
        Image.fromarray(pixels).save(folder / name)
        if layout == "txt":
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
    if layout == "metadata":
        lines = [json.dumps({"file_name": name, "text": caption}) for name, caption in captions.items()]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return captions


@pytest.mark.parametrize("layout", ["metadata", "txt"])
def test_image_folder_reads_both_layouts(tmp_path, layout):
    captions = write_image_folder(tmp_path / "images", layout)
    dataset = BucketedImageCaptions(select_columns(load_image_folder(tmp_path / "images", str(tmp_path / "cache"))),
                                    [[32, 32]])  # fmt: skip
    assert len(dataset) == 2
    items = {item["caption"]: item["pixel_values"] for item in dataset}
    assert set(items) == set(captions.values())
    red = items["a red square"]
    assert red.shape == (3, 32, 32) and red.dtype == torch.float32
    # Scaled to cover 32x32 (64x32), then centre-cropped: pure red, the white band is gone.
    assert torch.allclose(red[0], torch.ones(32, 32), atol=0.02)
    assert torch.allclose(red[1:], -torch.ones(2, 32, 32), atol=0.02)


def test_image_folder_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path / "empty")
    write_image_folder(tmp_path / "uncaptioned", "none")
    with pytest.raises(FileNotFoundError, match=r"No caption for \['blue.jpg', 'red.png'\]"):
        load_image_folder(tmp_path / "uncaptioned")
    assert len(load_image_folder(tmp_path / "uncaptioned", captions=False)) == 2  # the tokenizer needs no captions
    write_image_folder(tmp_path / "meta", "metadata")
    (tmp_path / "meta" / "red.png").unlink()
    with pytest.raises(FileNotFoundError, match="line 1 names an image that is not there: red.png"):
        load_image_folder(tmp_path / "meta")
    (tmp_path / "meta" / "metadata.jsonl").write_text(json.dumps({"image": "blue.jpg"}))
    with pytest.raises(ValueError, match="line 1: each line needs 'file_name' and 'text'"):
        load_image_folder(tmp_path / "meta")
    (tmp_path / "meta" / "metadata.jsonl").write_text('{"file_name": "blue.jpg", "text": "a blue square"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_image_folder(tmp_path / "meta")
    write_image_folder(tmp_path / "broken", "txt")
    (tmp_path / "broken" / "red.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot read the image .*red.png"):
        BucketedImageCaptions(select_columns(load_image_folder(tmp_path / "broken")), [[32, 32]])
    with pytest.raises(ValueError, match="--caption_column: 'prompt' is not one of its columns; the dataset has image, text"):
        select_columns(load_image_folder(tmp_path / "uncaptioned", captions=False).add_column("text", ["a", "b"]),
                       caption_column="prompt")  # fmt: skip


def test_hub_dataset_loads_offline_from_the_hub_cache(tmp_path):
    """A dataset downloaded with `huggingface-cli download --repo-type dataset` (parquet, own column names) loads with
    HF_HUB_OFFLINE=1 although the datasets cache has never seen it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someone--shapes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "data").mkdir(parents=True)

    def png(index):
        buffer = io.BytesIO()
        Image.fromarray(np.full((32, 48, 3), 40 * index, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    features = datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"picture": [{"bytes": png(i), "path": None} for i in range(3)],
                                        "prompt": [f"prompt {i}" for i in range(3)]}, features=features)  # fmt: skip
    table.to_parquet(str(repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet"))
    code = ("from bitdance_diffusers.training.data import load_hub_dataset, select_columns, BucketedImageCaptions\n"
            "data = BucketedImageCaptions(select_columns(load_hub_dataset('someone/shapes'), 'picture', 'prompt'), "
            "[[32, 32], [32, 64]])\n"
            "print(len(data), data[2]['caption'], tuple(data[2]['pixel_values'].shape), data.bucket_indices)\n"
            "load_hub_dataset('someone/elsewhere')\n")  # fmt: skip
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "3 prompt 2 (3, 32, 64) [1, 1, 1]" in result.stdout, result.stderr[-2000:]
    assert "'someone/elsewhere' is neither in the datasets cache nor in the Hub cache" in result.stderr


def test_buckets_follow_the_aspect_ratio_and_the_resolution():
    large = bucket_sizes(DEFAULT_IMAGE_SIZES, 1024)
    assert [1024, 1024] in large and [512, 512] not in large and len(large) == 11
    assert bucket_sizes(DEFAULT_IMAGE_SIZES, 512) == [[1024, 256], [896, 256], [640, 384], [512, 512], [384, 640],
                                                      [256, 896], [256, 1024]]  # fmt: skip
    assert bucket_sizes([[128, 128]]) == [[128, 128]]
    with pytest.raises(ValueError, match="No image size of the model has about 300x300 pixels"):
        bucket_sizes([[128, 128]], 300)
    buckets = [[256, 256], [128, 256], [256, 128]]  # [height, width]
    assert nearest_bucket(300, 290, buckets) == 0
    assert nearest_bucket(640, 300, buckets) == 1  # landscape
    assert nearest_bucket(100, 210, buckets) == 2  # portrait


def test_bucket_sampler_is_deterministic_and_independent_of_the_number_of_processes():
    rng = np.random.default_rng(0)
    buckets = rng.integers(0, 3, size=50).tolist()

    def epoch(sampler, number):
        sampler.set_epoch(number)
        return list(sampler)

    sampler = BucketBatchSampler(buckets, batch_size=4, num_processes=1, seed=7)
    first = epoch(sampler, 0)
    assert first == epoch(BucketBatchSampler(buckets, 4, 1, seed=7), 0)  # same seed and epoch: same batches
    assert first != epoch(sampler, 1) and first != epoch(BucketBatchSampler(buckets, 4, 1, seed=8), 0)
    assert len(first) == len(sampler) == sum(count // 4 for count in np.bincount(buckets))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in first)  # one bucket per batch
    assert len({i for batch in first for i in batch}) == 4 * len(first)  # no image twice in an epoch

    # Two processes of batch 2: batches 2k and 2k + 1 (processes 0 and 1 of step k) make the global batch k of batch 4.
    split = epoch(BucketBatchSampler(buckets, batch_size=2, num_processes=2, seed=7), 0)
    assert [split[k] + split[k + 1] for k in range(0, len(split), 2)] == first
    # And with 2 accumulated micro-batches of 1 per process: chunk k * 2 + rank of each global batch, in that order.
    accumulated = epoch(BucketBatchSampler(buckets, batch_size=1, num_processes=2, seed=7, accumulation_steps=2), 0)
    assert [sum(accumulated[k : k + 4], []) for k in range(0, len(accumulated), 4)] == first
    with pytest.raises(ValueError, match="No bucket holds a whole global batch of 64 images"):
        BucketBatchSampler(buckets, batch_size=32, num_processes=2)


def make_checkpoint(output_dir, step, complete=True):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def test_checkpoint_lookup_ignores_what_is_not_ours_and_refuses_a_second_run(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 30)
    make_checkpoint(tmp_path, 40, complete=False)  # e.g. written in place by an older trainer, then killed
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-7.txt").write_text("a note")
    assert [folder.name for folder in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-30"
    assert resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-10")).name == "checkpoint-10"
    assert resolve_checkpoint(tmp_path, "checkpoint-10").name == "checkpoint-10"
    with pytest.raises(FileNotFoundError, match="checkpoint-40 is not a complete checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-40")
    with pytest.raises(FileExistsError, match="already holds checkpoints of a run .*--resume_from_checkpoint latest"):
        resolve_checkpoint(tmp_path, None)
    assert resolve_checkpoint(tmp_path / "fresh", None) is None and resolve_checkpoint(tmp_path / "fresh", "latest") is None

    prune_checkpoints(tmp_path, 1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-30", "checkpoint-40", "checkpoint-7.txt",
                                                                "checkpoint-best"]  # fmt: skip


def test_results_replace_the_previous_ones_only_when_complete(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old.txt").write_text("old")
    staging = tmp_path / ".final.partial"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    commit_folder(staging, tmp_path / "final")
    assert [path.name for path in (tmp_path / "final").iterdir()] == ["new.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final"]
    # What killed runs leave behind: staging folders and a result moved aside. Only those names are removed.
    for name in (".checkpoint-20.partial", ".final.partial", ".final.replaced", ".mine", "notes.partial"):
        (tmp_path / name).mkdir()
    remove_stale_staging(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".mine", "final", "notes.partial"]
