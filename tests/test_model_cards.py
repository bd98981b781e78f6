"""Every converter writes a model card (README.md) with Hugging Face metadata and a usage snippet that runs; a pipeline
loaded from such a folder keeps the card when saved (also when pushed to the Hub)."""

import json
import re
import shutil
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

from bitdance_diffusers import BitDanceImageNetPipeline, BitDancePipeline
from bitdance_diffusers.conversion import t2i
from bitdance_diffusers.conversion.imagenet import convert_imagenet
from bitdance_diffusers.conversion.tokenizer import convert_tokenizer
from conftest import FIXTURES


IMAGENET = FIXTURES / "imagenet"


@pytest.fixture(scope="module")
def converted_imagenet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards") / "BitDance_tiny-diffusers"
    convert_imagenet(str(IMAGENET / "BitDance_tiny_imagenet_p4.pt"), str(folder), str(IMAGENET / "ae_d16c32.pt"),
                     num_attention_heads=1)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def converted_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards") / "ae_d16c32-diffusers"
    convert_tokenizer(str(FIXTURES / "tokenizer" / "ae_d16c32.safetensors"), str(folder))
    return folder


def usage_snippet(card: ModelCard) -> str:
    return re.search(r"```python\n(.*?)```", card.text, re.DOTALL)[1]


def run_snippet(card: ModelCard, folder, monkeypatch):
    """Run the card's usage snippet from the folder's parent (the snippet names the folder relatively), on the CPU
    and with 2 head steps instead of the recommended ones."""
    monkeypatch.chdir(folder.parent)
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", usage_snippet(card).replace('"cuda"', '"cpu"'))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize(
    "which,pipeline_tag,base_model,class_name",
    [
        ("t2i", "text-to-image", "shallowdream204/BitDance-14B-16x", "BitDancePipeline"),
        ("imagenet", "unconditional-image-generation", "shallowdream204/BitDance-ImageNet", "BitDanceImageNetPipeline"),
        ("tokenizer", "image-to-image", "shallowdream204/BitDance-Tokenizer", "BitDanceTokenizer"),
    ],
)
def test_every_converter_writes_a_model_card(
    request, monkeypatch, which, pipeline_tag, base_model, class_name
):  # fmt: skip
    folder = {
        "t2i": lambda: request.getfixturevalue("converted_t2i")[16],
        "imagenet": lambda: request.getfixturevalue("converted_imagenet"),
        "tokenizer": lambda: request.getfixturevalue("converted_tokenizer"),
    }[which]()
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == pipeline_tag and data["base_model"] == base_model and "bitdance" in data["tags"]
    assert f'{class_name}.from_pretrained("{folder.name}"' in usage_snippet(card)
    assert "Converted from" in card.text and "apache-2.0" in card.text
    namespace = run_snippet(card, folder, monkeypatch)  # the usage snippet runs as written (on the CPU)
    if which == "tokenizer":
        assert namespace["reconstruction"].shape == (1, 3, 256, 256)
    elif which == "imagenet":
        assert [image.size for image in namespace["images"]] == [(64, 64)] * 2
    else:
        assert namespace["image"].size == (64, 64)


def test_t2i_card_states_sizes_and_steps(converted_t2i):
    folder = converted_t2i[64]
    card = ModelCard.load(folder / "README.md")
    sizes = json.loads((folder / "model_index.json").read_text())["image_sizes"]
    assert f"Sizes (height x width): {', '.join(f'{h}x{w}' for h, w in sizes)}." in card.text
    height, width = (int(v) for v in re.search(r"height=(\d+), width=(\d+)", usage_snippet(card)).groups())
    assert [height, width] in sizes and "num_inference_steps=50" in usage_snippet(card)
    assert card.data.base_model == "shallowdream204/BitDance-14B-64x" and "64 tokens per step" in card.text


def test_a_hub_source_is_the_base_model(tmp_path, monkeypatch):
    snapshot = shutil.copytree(FIXTURES / "t2i_p16" / "model", tmp_path / "snapshot")
    monkeypatch.setattr(t2i, "snapshot_download", lambda repo_id: str(snapshot))
    t2i.convert_t2i("someone/BitDance-finetune", str(tmp_path / "out"), image_sizes="64x64")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "someone/BitDance-finetune" and "`someone/BitDance-finetune`" in card.text
    assert str(tmp_path) not in card.text  # local paths stay private


@pytest.mark.parametrize("loader", [DiffusionPipeline, BitDancePipeline])
def test_save_pretrained_keeps_the_card(converted_t2i, tmp_path, loader):
    original = ModelCard.load(converted_t2i[16] / "README.md")
    pipe = loader.from_pretrained(converted_t2i[16])
    pipe.save_pretrained(tmp_path / "copy")
    copy = ModelCard.load(tmp_path / "copy" / "README.md")
    assert copy.data.to_dict() == original.data.to_dict() and copy.text == original.text
    again = BitDancePipeline.from_pretrained(tmp_path / "copy")  # and the copy keeps it in turn
    again.save_pretrained(tmp_path / "copy2")
    assert ModelCard.load(tmp_path / "copy2" / "README.md").text == original.text


def test_imagenet_save_pretrained_keeps_the_card(converted_imagenet, tmp_path):
    pipe = BitDanceImageNetPipeline.from_pretrained(converted_imagenet)
    pipe.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "README.md").read_text() == (converted_imagenet / "README.md").read_text()


def test_push_to_hub_uploads_the_card(converted_t2i, tmp_path, monkeypatch):
    from bitdance_diffusers.loaders import pretrained

    pushed = {}

    class Repo:
        repo_id = "me/my-bitdance"

    monkeypatch.setattr(pretrained, "create_repo", lambda repo_id, **kwargs: Repo())
    pipe = BitDancePipeline.from_pretrained(converted_t2i[16])

    def upload(folder, repo_id, **kwargs):
        pushed.update(repo_id=repo_id, card=(Path(folder) / "README.md").read_text())

    monkeypatch.setattr(pipe, "_upload_folder", upload)
    pipe.save_pretrained(tmp_path / "push", push_to_hub=True, repo_id="me/my-bitdance")
    assert pushed["repo_id"] == "me/my-bitdance"
    assert pushed["card"] == (converted_t2i[16] / "README.md").read_text()
