"""BitDanceTokenizer: fixture parity through the converter script, helpers and input errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance_diffusers import BitDanceTokenizer
from bitdance_diffusers.conversion.common import ConversionError
from bitdance_diffusers.conversion.tokenizer import convert_tokenizer
from bitdance_diffusers.utils.token_layout import grid_to_sequence, pack_codes, sequence_to_grid, unpack_codes
from conftest import FIXTURES, REPO


def tokenizer_cases():
    models = json.loads((FIXTURES / "cases.json").read_text())["tokenizer"]
    return [pytest.param(model, case, id=case["dir"]) for model in models for case in model["cases"]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert each fixture tokenizer with the command-line script (config found beside the weights)."""
    folders = {}
    for name in ("ae_d16c32", "ae_d32c64"):
        dump = tmp_path_factory.mktemp("tok") / name
        subprocess.run(
            [sys.executable, str(REPO / "conversion/convert_bitdance_tokenizer.py"),
             "--checkpoint_path", str(FIXTURES / "tokenizer" / f"{name}.safetensors"), "--dump_path", str(dump)],
            check=True,
        )  # fmt: skip
        folders[name] = dump
    return folders


@pytest.mark.parametrize("model,case", tokenizer_cases())
def test_tokenizer_matches_original(converted, model, case):
    vae = BitDanceTokenizer.from_pretrained(converted[model["name"]])
    assert vae.config.gan_decoder == model["gan_decoder"]
    pixels = np.stack([np.asarray(Image.open(FIXTURES / "tokenizer" / p).convert("RGB")) for p in case["inputs_png"]])
    images = torch.from_numpy((pixels.astype(np.float32) / 255.0 - 0.5) * 2.0).permute(0, 3, 1, 2)
    case_dir = FIXTURES / case["dir"]
    with torch.no_grad():
        codes = vae.encode(images).codes
        generator = torch.Generator().manual_seed(case["decode_seed"]) if case["decode_seed"] is not None else None
        decoded = vae.decode(codes, generator=generator).sample
    np.testing.assert_array_equal(codes.numpy(), np.load(case_dir / "codes.npy").astype(np.float32))
    assert np.abs(decoded[:1].numpy() - np.load(case_dir / "decoded_float.npy")).max() <= 1e-4


def test_slicing_gives_the_same_result(converted):
    vae = BitDanceTokenizer.from_pretrained(converted["ae_d32c64"])
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = vae.encode(images).codes
        full = vae.decode(codes, generator=torch.Generator().manual_seed(0)).sample
        vae.enable_slicing()
        assert torch.equal(vae.encode(images).codes, codes)
        sliced = vae.decode(codes, generator=torch.Generator().manual_seed(0)).sample
    # Same arithmetic; oneDNN blocks a batch-3 convolution differently from batch 1 (float32 rounding, up to ~3e-5 on
    # images about 1 in size, depending on the input).
    assert torch.allclose(full, sliced, atol=1e-4)
    with pytest.raises(NotImplementedError, match="tiles"):
        vae.enable_tiling()


def test_return_dict_false_returns_tuples():
    vae = BitDanceTokenizer(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8).eval()
    with torch.no_grad():
        (codes,) = vae.encode(torch.zeros(1, 3, 8, 8), return_dict=False)
        (image,) = vae.decode(codes, return_dict=False)
    assert codes.shape == (1, 8, 4, 4) and image.shape == (1, 3, 8, 8)
    assert bool(((codes == 1) | (codes == -1)).all())


def test_encode_and_decode_take_any_float_dtype():
    vae = BitDanceTokenizer(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8).eval()
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        codes = vae.encode(images).codes
        assert torch.equal(vae.encode(images.double()).codes, codes)
        vae.to(torch.bfloat16)
        assert vae.encode(images).codes.dtype == torch.bfloat16
        assert vae.decode(codes).sample.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "images,message",
    [
        (torch.zeros(1, 4, 32, 32), "image channels"),
        (torch.zeros(1, 3, 31, 32), "not divisible by the down factor 2"),
        (torch.zeros(3, 32, 32), "shape \\[B, 3, H, W\\]"),
    ],
)
def test_encode_rejects_bad_images(images, message):
    vae = BitDanceTokenizer(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8)
    with pytest.raises(ValueError, match=message):
        vae.encode(images)


@pytest.mark.parametrize(
    "images,message",
    [
        (Image.new("RGB", (32, 32)), "got Image; convert PIL images or arrays with diffusers' VaeImageProcessor"),
        (np.zeros((1, 3, 32, 32), np.float32), "got ndarray"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"got torch.uint8; for 0..255 pixels pass images.float\(\)"),
    ],
)
def test_encode_names_the_conversion_of_other_image_types(images, message):
    vae = BitDanceTokenizer(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8)
    with pytest.raises(TypeError, match=message):
        vae.encode(images)
    with pytest.raises(TypeError, match="decode expects a tensor of ±1 codes"):
        vae.decode(np.ones((1, 8, 16, 16), np.float32))


@pytest.mark.parametrize(
    "codes,message",
    [
        (torch.ones(1, 4, 2, 2), "8 code channels"),
        (torch.full((1, 8, 2, 2), 0.5), "binary codes"),
        (torch.ones(8, 2, 2), "shape"),
    ],
)
def test_decode_rejects_bad_codes(codes, message):
    vae = BitDanceTokenizer(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8)
    with pytest.raises(ValueError, match=message):
        vae.decode(codes)


@pytest.mark.parametrize("channels", [8, 32, 64, 256])
def test_packed_indices_round_trip(channels):
    codes = torch.where(torch.rand(2, channels, 3, 5) > 0.5, 1.0, -1.0)
    vae = BitDanceTokenizer(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=channels)
    indices = vae.codes_to_indices(codes)
    assert indices.shape == (2, 3, 5, -(-channels // 32)) and indices.dtype == torch.int64
    assert torch.equal(vae.indices_to_codes(indices), codes)


def test_packed_index_is_the_vocabulary_id_for_32_bits():
    codes = -torch.ones(1, 32, 1, 1)
    codes[0, [0, 3, 31], 0, 0] = 1
    assert pack_codes(codes).item() == 1 + 8 + 2**31
    assert torch.equal(unpack_codes(pack_codes(codes), 32), codes)


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_patch_raster_order(block_size):
    grid = torch.arange(2 * 3 * 8 * 16, dtype=torch.float32).reshape(2, 3, 8, 16)
    sequence = grid_to_sequence(grid, block_size)
    assert torch.equal(sequence_to_grid(sequence, 8, 16, block_size), grid)
    ps = int(block_size**0.5)
    # The first block is the top-left ps x ps patch, in raster order.
    expected = grid[0, :, :ps, :ps].reshape(3, -1).T
    assert torch.equal(sequence[0, :block_size], expected)


def test_converter_errors(tmp_path):
    weights = FIXTURES / "tokenizer" / "ae_d16c32.safetensors"
    with pytest.raises(ConversionError, match="does not exist"):
        convert_tokenizer(tmp_path / "missing.safetensors", tmp_path / "out")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match="corrupt"):
        convert_tokenizer(corrupt, tmp_path / "out", config_path=FIXTURES / "tokenizer" / "ae_d16c32_config.json")
    with pytest.raises(ConversionError, match="shape"):
        convert_tokenizer(weights, tmp_path / "out", config_path=FIXTURES / "tokenizer" / "ae_d32c64_config.json")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.safetensors"]
