"""Acceptance: every text-to-image fixture case of the original, converted and run through BitDancePipeline."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import bitdance_diffusers  # noqa: F401  (registers BitDancePipeline with diffusers)
from conftest import FIXTURES


def t2i_cases():
    import json

    cases = json.loads((FIXTURES / "cases.json").read_text())["t2i"]
    return [pytest.param(model["parallel_num"], case, id=case["dir"]) for model in cases for case in model["cases"]]


@pytest.fixture(scope="module")
def pipelines(converted_t2i):
    pipes = {}
    for block_size, folder in converted_t2i.items():
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        pipes[block_size] = pipe
    return pipes


@pytest.mark.parametrize("block_size,case", t2i_cases())
def test_t2i_case_matches_original(pipelines, block_size, case):
    pipe = pipelines[block_size]
    kwargs = case["call"]["kwargs"]
    guided = kwargs["guidance_scale"] > 1
    assert pipe.tokenize_prompt(kwargs["prompt"]) == [case["cond_ids"]]
    if guided:
        assert pipe.tokenize_prompt(None) == [case["uncond_ids_if_cfg"]]
    assert pipe.image_prefix_ids(kwargs["height"], kwargs["width"]) == case["image_prefix_ids"]

    conditions = []
    head_forward = pipe.diffusion_head.forward

    def recording_forward(sample, timestep, condition, **kwargs):
        conditions.append(condition.clone())
        return head_forward(sample, timestep, condition, **kwargs)

    pipe.diffusion_head.forward = recording_forward
    try:
        codes = pipe(
            kwargs["prompt"],
            height=kwargs["height"],
            width=kwargs["width"],
            num_inference_steps=kwargs["num_sampling_steps"],
            guidance_scale=kwargs["guidance_scale"],
            num_images_per_prompt=kwargs["num_images"],
            generator=torch.Generator().manual_seed(case["seed"]),
            output_type="latent",
        ).images
    finally:
        del pipe.diffusion_head.forward

    case_dir = FIXTURES / case["dir"]
    np.testing.assert_array_equal(codes.numpy(), np.load(case_dir / "tokens.npy").astype(np.float32))
    head_cond = np.load(case_dir / "head_cond_step0.npy")
    assert np.abs(conditions[0].numpy() - head_cond).max() <= 1e-4
    assert len(conditions) == case["num_ar_steps"] * (kwargs["num_sampling_steps"] + 1)

    with torch.no_grad():
        decoded = pipe.vae.decode(codes).sample
    assert np.abs(decoded[:1].numpy() - np.load(case_dir / "image_float.npy")).max() <= 1e-4
    images = pipe.image_processor.postprocess(decoded, output_type="pil")
    for index, image in enumerate(images):
        reference = np.asarray(Image.open(case_dir / f"image_{index}.png").convert("RGB")).astype(int)
        assert np.abs(np.asarray(image).astype(int) - reference).max() <= 1
