"""The shapes model shipped with the package: small plain files, draws the prompted shape, and is the CLI default."""

import subprocess

import torch
from PIL import Image

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from bitdance_diffusers.training.demo import score_held_out_prompts
from bitdance_diffusers.training.shapes_detector import detect_shape


def test_shipped_model_is_small_and_plain():
    weights = sorted(DEMO_MODEL_PATH.glob("*/*.safetensors"))
    assert {path.parent.name for path in weights} == {"language_model", "projector", "diffusion_head", "vae"}
    assert sum(path.stat().st_size for path in weights) <= 25 * 2**20
    for path in weights:  # real tensors, not git-LFS pointer files
        assert not path.read_bytes()[:40].startswith(b"version https://git-lfs"), path


def test_shipped_model_draws_the_prompted_shape():
    pipe = BitDancePipeline.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    hits = score_held_out_prompts(pipe, num_prompts=8)
    assert hits["color"] >= 7 and hits["position"] >= 6 and hits["background"] >= 7 and hits["shape"] >= 6, hits


def test_command_line_default_draws_the_prompt(tmp_path):
    output = tmp_path / "circle.png"
    prompt = "a large red circle in the center on a blue background"
    result = subprocess.run(["bitdance", "generate", "--prompt", prompt, "--output", str(output)],
                            capture_output=True, text=True, check=True, cwd=tmp_path)  # fmt: skip
    assert "shapes model shipped with the package" in result.stderr
    detection = detect_shape(Image.open(output))
    assert (detection.color, detection.position, detection.background, detection.shape) == (
        "red", "in the center", "blue", "circle"
    ), detection
