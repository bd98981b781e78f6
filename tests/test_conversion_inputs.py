"""Bad inputs to the three converters: every unreadable, damaged, wrongly typed or unusable input ends as a
`ConversionError` that names it (exit status 2 and one line on the command line), before anything is written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_diffusers import cli
from bitdance_diffusers.conversion.common import ConversionError
from bitdance_diffusers.conversion.imagenet import convert_imagenet
from bitdance_diffusers.conversion.t2i import convert_t2i
from bitdance_diffusers.conversion.tokenizer import convert_tokenizer
from bitdance_diffusers.random_pipeline import build_byte_tokenizer
from conftest import FIXTURES


RELEASE = FIXTURES / "t2i_p16" / "model"
IMAGENET = FIXTURES / "imagenet"
CHECKPOINT_P4 = IMAGENET / "BitDance_tiny_imagenet_p4.pt"
VAE_CHECKPOINT = IMAGENET / "ae_d16c32.pt"


def writable_copy(source, target):
    shutil.copytree(source, target) if source.is_dir() else shutil.copy(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def expect_refusal(tmp_path, converter, message, *args, **kwargs):
    """The converter raises a ConversionError matching ``message`` and leaves nothing where it writes."""
    out = tmp_path / "converted" / "out"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(ConversionError, match=message):
        converter(*args, dump_path=str(out), **kwargs)
    assert list(out.parent.iterdir()) == []


# Text-to-image -----------------------------------------------------------------------------------------------------


def edit_json(name, change):
    def mutate(release):
        path = release / name
        path.write_text(change(json.loads(path.read_text())) if callable(change) else change)

    return mutate


def edit_tensors(name, change):
    def mutate(release):
        tensors = load_file(release / name)
        change(tensors)
        save_file(tensors, release / name)

    return mutate


def truncate(name, keep=100):
    def mutate(release):
        path = release / name
        path.write_bytes(path.read_bytes()[:keep])

    return mutate


def set_value(key, value, nested=None):
    def change(config):
        (config[nested] if nested else config)[key] = value
        return json.dumps(config)

    return change


def nan_at(key, value=float("nan")):
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return change


def replace_tokenizer(release):
    """A Qwen2 byte tokenizer without BitDance's resolution and query tokens."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json"):  # fmt: skip
        (release / name).unlink()
    build_byte_tokenizer().__class__(vocab={"a": 0, "b": 1}, merges=[]).save_pretrained(release)


T2I_BAD_INPUTS = {
    "corrupt head config": (edit_json("vision_head_config.json", '{"ch_target": 32,'), "vision_head_config.json' is not a valid JSON file"),
    "head config is a list": (edit_json("vision_head_config.json", "[1, 2]"), "holds a JSON list, expected an object"),
    "head width as text": (edit_json("vision_head_config.json", set_value("ch_latent", "128")), "'ch_latent' must be a positive integer"),
    "block size not square": (edit_json("vision_head_config.json", set_value("parallel_num", 12)), "parallel_num 12 is not a square"),
    "head width not a multiple of 128": (edit_json("vision_head_config.json", set_value("ch_latent", 100)), "does not build a BitDanceDiffusionHead"),
    "ch_mult not a list": (edit_json("ae_config.json", set_value("ch_mult", 4, "ddconfig")), "'ch_mult' must be a non-empty list"),
    "ddconfig not an object": (edit_json("ae_config.json", set_value("ddconfig", "x")), "'ddconfig' must be an object"),
    "missing language model config": (lambda release: (release / "config.json").unlink(), "Missing language model config"),
    "corrupt language model config": (edit_json("config.json", "{oops"), "config.json' is not a valid JSON file"),
    "language model config of another model": (edit_json("config.json", set_value("model_type", "bert")), "expected a Qwen3 language model|usable language model"),
    "language model config with a text width": (edit_json("config.json", set_value("hidden_size", "64")), "usable language model"),
    "truncated language model": (truncate("model.safetensors", 5000), "model.safetensors.*truncated, corrupt or not a safetensors"),
    "garbage language model": (lambda release: (release / "model.safetensors").write_bytes(b"\x00garbage" * 100), "truncated, corrupt or not a safetensors"),
    "corrupt language model index": (lambda release: (release / "model.safetensors.index.json").write_text("{"), "model.safetensors.index.json' is not a valid JSON file"),
    "index without weight_map": (lambda release: (release / "model.safetensors.index.json").write_text("{}"), "has no weight_map"),
    "tokenizer without BitDance's tokens": (replace_tokenizer, "lacks BitDance's special tokens"),
    "damaged tokenizer": (lambda release: (release / "tokenizer.json").write_text("{not json"), "Cannot load the text tokenizer"),
    "NaN in the head": (edit_tensors("vision_head.safetensors", nan_at("net.input_proj.weight")), "NaN or inf values: \\['net.input_proj.weight'\\]"),
    "inf in the language model": (edit_tensors("model.safetensors", nan_at("model.norm.weight", float("inf"))), "model.safetensors: 1 tensor\\(s\\) hold NaN or inf values: \\['model.norm.weight'\\]"),
    "non-float autoencoder tensor": (edit_tensors("ae.safetensors", lambda t: t.update({"encoder.conv_in.weight": t["encoder.conv_in.weight"].int()})), "expected a floating point tensor"),
    "projector of another width": (edit_tensors("projector.safetensors", lambda t: t.update({k: torch.zeros(48, *v.shape[1:]) if k.startswith("fc1") else v for k, v in t.items()})), "disagree on the widths"),
    "1-D projector weight": (edit_tensors("projector.safetensors", lambda t: t.update({"fc1.weight": torch.zeros(3)})), "no 2-D fc1.weight"),
}  # fmt: skip


@pytest.mark.parametrize("mutate,message", T2I_BAD_INPUTS.values(), ids=T2I_BAD_INPUTS.keys())
def test_t2i_bad_release_is_named_before_writing(tmp_path, mutate, message):
    release = writable_copy(RELEASE, tmp_path / "release")
    mutate(release)
    expect_refusal(tmp_path, convert_t2i, message, str(release), image_sizes="64x64")


@pytest.mark.parametrize(
    "sizes,message",
    [
        ("100x100", "100x100 does not split into the model's 64x64-pixel blocks"),
        ("64x64,-5x0", "must look like 1024x1024,512x512"),
        ("0x64", "not a \\[height, width\\] pair of positive integers"),
        ("64x64x64", "must look like"),
        ("big", "must look like"),
        ("", "must look like"),
        ("64x4160", "lacks BitDance's special tokens \\['<\\|res_260\\|>'\\]"),
    ],
)
def test_t2i_unusable_image_sizes_are_refused(tmp_path, sizes, message):
    expect_refusal(tmp_path, convert_t2i, message, str(RELEASE), image_sizes=sizes)


def test_fp16_overflow_is_named(tmp_path):
    release = writable_copy(RELEASE, tmp_path / "release")
    edit_tensors("projector.safetensors", nan_at("fc2.weight", 1e6))(release)
    expect_refusal(tmp_path, convert_t2i, "fc2.weight \\(after the cast to torch.float16\\).*use --dtype bf16",
                   str(release), dtype="fp16", image_sizes="64x64")  # fmt: skip


# ImageNet ----------------------------------------------------------------------------------------------------------


def edit_checkpoint(change):
    def mutate(path):
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)

    return mutate


IMAGENET_BAD_INPUTS = {
    "missing backbone key": (edit_checkpoint(lambda c: c["ema"].pop("pos_for_diff.weight")), "lacks 'pos_for_diff.weight'"),
    "missing head key": (edit_checkpoint(lambda c: c["ema"].pop("head.net.input_proj.weight")), "head lacks 'input_proj.weight'"),
    "non-tensor entry": (edit_checkpoint(lambda c: c["ema"].update({"norm.weight": 3})), "entry 'norm.weight' is a int, not a named tensor"),
    "list entry": (edit_checkpoint(lambda c: c["ema"].update({"layers.0.extra": [1, 2]})), "is a list, not a named tensor"),
    "scalar where a matrix belongs": (edit_checkpoint(lambda c: c["ema"].update({"emb_norm.weight": torch.tensor(1.0)})), "wrong shape"),
    "NaN in the backbone": (edit_checkpoint(lambda c: c["ema"]["norm.weight"].fill_(float("nan"))), "NaN or inf values: \\['norm.weight'\\]"),
    "garbage file": (lambda path: path.write_bytes(b"hello world " * 50), "Cannot read .* as a torch checkpoint"),
    "empty file": (lambda path: path.write_bytes(b""), "Cannot read .* as a torch checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("mutate,message", IMAGENET_BAD_INPUTS.values(), ids=IMAGENET_BAD_INPUTS.keys())
def test_imagenet_bad_checkpoint_is_named(tmp_path, mutate, message):
    checkpoint = writable_copy(CHECKPOINT_P4, tmp_path / "BitDance_tiny.pt")
    mutate(checkpoint)
    expect_refusal(tmp_path, convert_imagenet, message, str(checkpoint), vae_checkpoint_path=str(VAE_CHECKPOINT),
                   num_attention_heads=1)  # fmt: skip


def test_imagenet_bad_tokenizer_checkpoint_is_named(tmp_path):
    vae = writable_copy(VAE_CHECKPOINT, tmp_path / "ae.pt")
    edit_checkpoint(lambda c: c["state_dict"].update({"encoder.conv_in.weight": "weights"}))(vae)
    expect_refusal(tmp_path, convert_imagenet, "is a str, not a named tensor", str(CHECKPOINT_P4),
                   vae_checkpoint_path=str(vae), num_attention_heads=1)  # fmt: skip


@pytest.mark.parametrize(
    "heads,message",
    [
        (-1, "does not divide"),
        (0, "does not divide"),
        (3, "does not divide the backbone's width 32"),
        (16, "divisible by 4"),
    ],
)
def test_imagenet_unusable_head_counts_are_refused(tmp_path, heads, message):
    expect_refusal(tmp_path, convert_imagenet, message, str(CHECKPOINT_P4), vae_checkpoint_path=str(VAE_CHECKPOINT),
                   num_attention_heads=heads)  # fmt: skip


# Tokenizer ---------------------------------------------------------------------------------------------------------

TOKENIZER_BAD_INPUTS = {
    "corrupt config": (lambda folder: (folder / "ae_d16c32_config.json").write_text("{"), "not a valid JSON file"),
    "config is a string": (lambda folder: (folder / "ae_d16c32_config.json").write_text('"ae"'), "holds a JSON str"),
    "width as text": (lambda folder: edit_json("ae_d16c32_config.json", set_value("ch", "32", "ddconfig"))(folder), "'ch' must be a positive integer"),
    "width that no GroupNorm divides": (lambda folder: edit_json("ae_d16c32_config.json", set_value("ch", 33, "ddconfig"))(folder), "does not build a BitDanceTokenizer"),
    "garbage weights": (lambda folder: (folder / "ae_d16c32.safetensors").write_bytes(b"{}" * 10), "not a safetensors file"),
    "config is a folder": (lambda folder: ((folder / "ae_d16c32_config.json").unlink(), (folder / "ae_d16c32_config.json").mkdir()), "must be a file, but .* is a folder"),
}  # fmt: skip


@pytest.mark.parametrize("mutate,message", TOKENIZER_BAD_INPUTS.values(), ids=TOKENIZER_BAD_INPUTS.keys())
def test_tokenizer_bad_release_is_named(tmp_path, mutate, message):
    folder = tmp_path / "release"
    folder.mkdir()
    for name in ("ae_d16c32.safetensors", "ae_d16c32_config.json"):
        writable_copy(FIXTURES / "tokenizer" / name, folder / name)
    mutate(folder)
    expect_refusal(tmp_path, convert_tokenizer, message, str(folder / "ae_d16c32.safetensors"))


# Command line ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["t2i", "--checkpoint_path", str(RELEASE), "--image_sizes", "100x100,-5x0"], "--image_sizes must look like"),
        (["imagenet", "--checkpoint_path", str(CHECKPOINT_P4), "--num_attention_heads", "-1"], "does not divide"),
        (
            ["tokenizer", "--checkpoint_path", str(RELEASE / "config.json"), "--config_path", str(RELEASE)],
            "must be a file",
        ),
    ],
)
def test_command_line_bad_input_is_one_line_with_status_2(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", *arguments, "--dump_path", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert message in error and not (tmp_path / "out").exists()
