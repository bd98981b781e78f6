"""The diffusers workflows users reach for: Hub ids from the cache, dtypes, variants, compile, attention backends
(the dataset generation script: tests/test_generate_dataset.py)."""

import shutil
import subprocess
import sys

import pytest
import torch

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.random_pipeline import build_random_pipeline
from conftest import offline_hub_cache


KWARGS = dict(height=128, width=128, num_inference_steps=2, guidance_scale=3.0, output_type="latent")


def codes(pipe, prompt="a red circle", seed=0):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **KWARGS).images


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_random_pipeline("tiny").save_pretrained(folder)
    return folder


def test_hub_id_loads_offline_from_the_cache(saved_tiny, tmp_path):
    snapshot, env = offline_hub_cache(tmp_path, "someone/bitdance-tiny-diffusers")
    shutil.copytree(saved_tiny, snapshot)
    code = (
        "import bitdance_diffusers\nfrom diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained('someone/bitdance-tiny-diffusers')\n"
        "print(type(pipe).__name__, pipe.config.block_size)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["BitDancePipeline", "16"]


def test_dtype_single_and_per_component(saved_tiny):
    pipe = BitDancePipeline.from_pretrained(saved_tiny, dtype=torch.bfloat16)
    assert {pipe.language_model.dtype, pipe.diffusion_head.dtype, pipe.vae.dtype} == {torch.bfloat16}
    pipe = BitDancePipeline.from_pretrained(saved_tiny, dtype={"language_model": torch.bfloat16, "default": torch.float32})
    assert pipe.language_model.dtype == torch.bfloat16 and pipe.diffusion_head.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    assert codes(pipe).abs().eq(1).all()


def test_torch_dtype_still_works_as_diffusers_deprecated_alias_of_dtype(saved_tiny):
    with pytest.warns(FutureWarning, match="torch_dtype"):
        pipe = BitDancePipeline.from_pretrained(saved_tiny, torch_dtype=torch.bfloat16)
    assert {pipe.language_model.dtype, pipe.diffusion_head.dtype, pipe.vae.dtype} == {torch.bfloat16}


def test_variant_and_low_cpu_mem_usage_round_trip(saved_tiny, tmp_path):
    reference = BitDancePipeline.from_pretrained(saved_tiny)
    reference.save_pretrained(tmp_path / "variant", variant="v2")
    files = {path.name for path in (tmp_path / "variant").rglob("*.safetensors")}
    assert "diffusion_pytorch_model.v2.safetensors" in files and "model.v2.safetensors" in files
    for low_cpu_mem_usage in (True, False):
        pipe = BitDancePipeline.from_pretrained(tmp_path / "variant", variant="v2", low_cpu_mem_usage=low_cpu_mem_usage)
        for name in ("language_model", "projector", "diffusion_head", "vae"):
            loaded, original = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
            assert all(torch.equal(loaded[key], original[key]) for key in original), name


def test_compile_repeated_blocks_without_graph_breaks(tiny_pipe):
    eager = codes(tiny_pipe)
    head = tiny_pipe.diffusion_head
    try:
        head.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        assert codes(tiny_pipe).equal(eager)
    finally:
        for block in head.res_blocks:
            block._compiled_call_impl = None  # back to eager for the other tests of the session


def test_attention_backends_of_the_head(tiny_pipe):
    head = tiny_pipe.diffusion_head
    sample, t, condition = torch.randn(2, 16, 32), torch.rand(2), torch.randn(2, 16, 64)
    with torch.no_grad():
        native = head(sample, t, condition).sample
        head.set_attention_backend("_native_math")
        try:
            math = head(sample, t, condition).sample
        finally:
            head.reset_attention_backend()
    assert (native - math).abs().max() < 1e-5
    with pytest.raises(ValueError):
        head.set_attention_backend("no-such-backend")
