"""Loading BitDance pipelines is strict: missing, unexpected, mis-shaped or non-finite weights and missing or damaged
configs are errors that name the file and the fix, through `DiffusionPipeline.from_pretrained` and the pipelines'
own `from_pretrained` alike."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from bitdance_diffusers import BitDanceImageNetPipeline, BitDancePipeline
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline, build_random_pipeline


HEAD = "diffusion_head/diffusion_pytorch_model.safetensors"
LANGUAGE_MODEL = "language_model/model.safetensors"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_random_pipeline("tiny", block_size=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_imagenet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet") / "pipeline"
    build_random_imagenet_pipeline(block_size=4).save_pretrained(folder)
    return folder


def edit_weights(name, change):
    def mutate(folder):
        tensors = load_file(folder / name)
        change(tensors)
        save_file(tensors, folder / name)

    return mutate


def first_key_changed(value):
    def change(tensors):
        key = min(tensors)
        tensors[key] = tensors[key].clone().fill_(value)

    return change


WEIGHT_PROBLEMS = {
    "head tensor missing": (edit_weights(HEAD, lambda t: t.pop("final_layer.linear.bias")), "missing \\['final_layer.linear.bias'\\]"),
    "head tensor unexpected": (edit_weights(HEAD, lambda t: t.update({"extra.weight": torch.zeros(2)})), "unexpected \\['extra.weight'\\]"),
    # DiffusionPipeline.from_pretrained never reaches the check for these two: diffusers' loader raises first.
    "head tensor of another shape": (edit_weights(HEAD, lambda t: t.update({"final_layer.linear.bias": torch.zeros(5)})), "wrong shapes \\['final_layer.linear.bias: \\[5\\] in the file|final_layer.linear.bias expected shape"),
    "language model layer missing": (edit_weights(LANGUAGE_MODEL, lambda t: t.pop("layers.1.mlp.up_proj.weight")), "language_model \\(Qwen3Model\\).*missing \\['layers.1.mlp.up_proj.weight'\\]"),
    "language model tensor unexpected": (edit_weights(LANGUAGE_MODEL, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)})), "unexpected \\['lm_head.weight'\\]"),
    "vae tensor missing": (edit_weights("vae/diffusion_pytorch_model.safetensors", lambda t: t.pop("decoder.conv_out.bias")), "vae \\(BitDanceTokenizer\\).*missing"),
    "NaN in the head": (edit_weights(HEAD, first_key_changed(float("nan"))), "NaN or inf weights in diffusion_head"),
    "inf in the language model": (edit_weights(LANGUAGE_MODEL, first_key_changed(float("inf"))), "NaN or inf weights in language_model"),
    "truncated head": (lambda folder: (folder / HEAD).write_bytes((folder / HEAD).read_bytes()[:300]), "truncated or not a safetensors file|Unable to load weights from checkpoint file"),
}  # fmt: skip


@pytest.mark.parametrize("loader", [DiffusionPipeline, BitDancePipeline])
@pytest.mark.parametrize("mutate,message", WEIGHT_PROBLEMS.values(), ids=WEIGHT_PROBLEMS.keys())
def test_bad_weights_are_refused(saved_tiny, tmp_path, loader, mutate, message):
    folder = shutil.copytree(saved_tiny, tmp_path / "pipeline")
    mutate(folder)
    with pytest.raises((ValueError, OSError), match=message):
        loader.from_pretrained(folder)


def test_sharded_weights_with_a_missing_shard_are_refused(saved_tiny, tmp_path):
    folder = shutil.copytree(saved_tiny, tmp_path / "pipeline")
    pipe = BitDancePipeline.from_pretrained(folder)
    pipe.language_model.save_pretrained(folder / "language_model", max_shard_size="100KB")
    (folder / "language_model" / "model.safetensors").unlink(missing_ok=True)
    shards = sorted((folder / "language_model").glob("model-*.safetensors"))
    assert len(shards) > 1
    BitDancePipeline.from_pretrained(folder)  # complete shards load
    shards[-1].unlink()
    with pytest.raises(OSError, match=f"names the shards \\['{shards[-1].name}'\\]"):
        BitDancePipeline.from_pretrained(folder)


def test_float16_overflow_is_reported_with_the_fix(saved_tiny, tmp_path):
    folder = shutil.copytree(saved_tiny, tmp_path / "pipeline")
    edit_weights(HEAD, first_key_changed(1e6))(folder)
    BitDancePipeline.from_pretrained(folder)  # finite in float32
    with pytest.raises(ValueError, match="float16 overflows.*dtype=torch.bfloat16"):
        BitDancePipeline.from_pretrained(folder, dtype=torch.float16)


CONFIG_PROBLEMS = {
    "corrupt model_index.json": ("model_index.json", "{oops", "model_index.json' is not a valid JSON file"),
    "missing vae config": ("vae/config.json", None, "vae/config.json is missing|no file named config.json found in directory .*/vae"),
    "corrupt vae config": ("vae/config.json", "{oops", "vae/config.json' is not a valid JSON file"),
    "corrupt language model config": ("language_model/config.json", "[1,", "language_model/config.json' is not a valid JSON file"),
    "corrupt scheduler config": ("scheduler/scheduler_config.json", "{", "scheduler_config.json' is not a valid JSON file"),
}  # fmt: skip


@pytest.mark.parametrize("loader", [DiffusionPipeline, BitDancePipeline])
@pytest.mark.parametrize("name,content,message", CONFIG_PROBLEMS.values(), ids=CONFIG_PROBLEMS.keys())
def test_missing_or_damaged_configs_name_the_file(saved_tiny, tmp_path, loader, name, content, message):
    folder = shutil.copytree(saved_tiny, tmp_path / "pipeline")
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_text(content)
    with pytest.raises(OSError, match=message):
        loader.from_pretrained(folder)


@pytest.mark.parametrize(
    "name,content,message",
    [
        # transformers would build a default-sized (8B) Qwen3 without its config.json, and fail only for lack of memory.
        ("language_model/config.json", None, "language_model/config.json is missing"),
        ("tokenizer/tokenizer_config.json", "{oops", "tokenizer_config.json' is not a valid JSON file"),
        (
            "diffusion_head/config.json",
            '{"_class_name": "BitDanceDiffusionHead", "hidden_size": 100}',
            "does not describe a valid BitDanceDiffusionHead",
        ),
    ],
)
def test_the_pipeline_class_checks_configs_before_loading_anything(saved_tiny, tmp_path, name, content, message):
    folder = shutil.copytree(saved_tiny, tmp_path / "pipeline")
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_text(content)
    with pytest.raises((OSError, ValueError), match=message):
        BitDancePipeline.from_pretrained(folder)


def test_missing_component_folder_and_wrong_pipeline_class_are_named(saved_tiny, saved_imagenet, tmp_path):
    folder = shutil.copytree(saved_tiny, tmp_path / "pipeline")
    shutil.rmtree(folder / "diffusion_head")
    with pytest.raises(ValueError, match="components \\['diffusion_head'\\] in model_index.json"):
        BitDancePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds a BitDanceImageNetPipeline.*BitDanceImageNetPipeline.from_pretrained"):
        BitDancePipeline.from_pretrained(saved_imagenet)


def test_components_passed_in_are_not_read_from_the_folder(saved_tiny, tmp_path):
    folder = shutil.copytree(saved_tiny, tmp_path / "pipeline")
    vae = BitDancePipeline.from_pretrained(saved_tiny).vae
    edit_weights("vae/diffusion_pytorch_model.safetensors", lambda t: t.pop("decoder.conv_out.bias"))(folder)
    assert BitDancePipeline.from_pretrained(folder, vae=vae).vae is vae


@pytest.mark.parametrize("loader", [DiffusionPipeline, BitDanceImageNetPipeline])
def test_imagenet_pipeline_loads_strictly_too(saved_imagenet, tmp_path, loader):
    assert type(loader.from_pretrained(saved_imagenet)) is BitDanceImageNetPipeline
    folder = shutil.copytree(saved_imagenet, tmp_path / "pipeline")
    edit_weights(HEAD, lambda t: t.pop(min(t)))(folder)
    with pytest.raises(ValueError, match="diffusion_head .* does not match|does not match the diffusion_head"):
        loader.from_pretrained(folder)
    folder = shutil.copytree(saved_imagenet, tmp_path / "nan")
    edit_weights("transformer/diffusion_pytorch_model.safetensors", first_key_changed(float("nan")))(folder)
    with pytest.raises(ValueError, match="NaN or inf weights in transformer"):
        loader.from_pretrained(folder)


def test_model_index_of_a_pipeline_saved_by_diffusers_still_loads(saved_tiny):
    index = json.loads((saved_tiny / "model_index.json").read_text())
    assert index["_class_name"] == "BitDancePipeline"
    pipe = DiffusionPipeline.from_pretrained(saved_tiny)
    assert type(pipe) is BitDancePipeline and pipe._model_card is None
