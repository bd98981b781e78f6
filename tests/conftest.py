import json
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "original"
FIXTURE_IMAGE_SIZES = "64x64,64x128,128x64,128x128,128x256,256x128,256x256"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (run in CI, deselect with -m 'not slow')")


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
        convert_t2i(str(FIXTURES / f"t2i_p{block_size}" / "model"), str(dump), image_sizes=FIXTURE_IMAGE_SIZES)
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
