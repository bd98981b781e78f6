import contextlib
import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "original"
FIXTURE_IMAGE_SIZES = "64x64,64x128,128x64,128x128,128x256,256x128,256x256"
# The 64x fixture draws blocks of 128x128 pixels: the sizes above that split into them.
FIXTURE_IMAGE_SIZES_P64 = "128x128,128x256,256x128,256x256"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: longer tests (browser, SIGKILL, multi-process, full scripts): run with -m slow (CI runs both)"
    )


def pytest_collection_modifyitems(config, items):
    """Without a ``-m`` expression the slow tests are left out: ``python -m pytest tests -q`` is the quick suite and
    ``python -m pytest tests -q -m slow`` the rest (CI runs both, as the README says)."""
    if config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def fixture_cases():
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"Parity fixtures not found at {FIXTURES}; the repo expects ../shared beside it.")
    return json.loads((FIXTURES / "cases.json").read_text())


@pytest.fixture(scope="session")
def converted_t2i(tmp_path_factory):
    """Each fixture release converted once with the converter, keyed by block size."""
    from bitdance_diffusers.conversion.t2i import convert_t2i

    folders = {}
    for block_size in (16, 64):
        dump = tmp_path_factory.mktemp("t2i") / f"p{block_size}"
        sizes = FIXTURE_IMAGE_SIZES if block_size == 16 else FIXTURE_IMAGE_SIZES_P64
        convert_t2i(str(FIXTURES / f"t2i_p{block_size}" / "model"), str(dump), image_sizes=sizes)
        folders[block_size] = dump
    return folders


@pytest.fixture
def tiny_pipe():
    from bitdance_diffusers.random_pipeline import build_random_pipeline

    pipe = build_random_pipeline("tiny", block_size=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed):
    return torch.Generator().manual_seed(seed)


def offline_hub_cache(root: Path, repo_id: str) -> tuple[Path, dict]:
    """A Hugging Face cache under ``root``, laid out as huggingface_hub does, with ``repo_id`` at one commit.

    Returns the repo's snapshot folder (not created yet: copy or save its files there) and the environment under which
    a subprocess reads the cache offline.
    """
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit, {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def captured_log(name: str, level: int = logging.WARNING):
    """What the diffusers logger ``name`` writes at ``level`` and above inside the block (diffusers' loggers do not
    propagate to pytest's caplog)."""
    logger = logging.getLogger(name)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
