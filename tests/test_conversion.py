"""The text-to-image converter: layouts, Hub cache, strict key accounting, atomic output and bounded memory."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.conversion.common import ConversionError
from bitdance_diffusers.conversion.t2i import convert_t2i
from conftest import FIXTURE_IMAGE_SIZES, FIXTURES, REPO, offline_hub_cache


RELEASE = FIXTURES / "t2i_p16" / "model"


def codes_of(folder, seed=0):
    pipe = BitDancePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a fox", height=64, width=64, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images  # fmt: skip


def copy_release(target):
    shutil.copytree(RELEASE, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_cli_help_and_conversion_log(tmp_path):
    script = REPO / "conversion" / "convert_bitdance_t2i.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--checkpoint_path", "--dump_path", "--dtype", "--overwrite", "--image_sizes"):
        assert option in help_text
    result = subprocess.run(
        [sys.executable, str(script), "--checkpoint_path", str(RELEASE), "--dump_path", str(tmp_path / "out"),
         "--dtype", "bf16", "--image_sizes", "64x64"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "dropped model.safetensors:lm_head.weight: text logits are never computed" in result.stderr
    head = load_file(tmp_path / "out" / "diffusion_head" / "diffusion_pytorch_model.safetensors")
    assert all(tensor.dtype == torch.bfloat16 for tensor in head.values())
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(script), "--checkpoint_path", str(RELEASE), "--dump_path",
                        str(tmp_path / "out")], capture_output=True, check=True)  # fmt: skip


def test_every_source_tensor_is_accounted_for(tmp_path):
    report = convert_t2i(str(RELEASE), str(tmp_path / "out"), image_sizes=FIXTURE_IMAGE_SIZES)
    sources = {
        f"{name}:{key}" for name in ("model", "ae", "vision_head", "projector")
        for key in load_file(RELEASE / f"{name}.safetensors")
    }  # fmt: skip
    accounted = {key.replace("model.safetensors:", "model:") for key in [*report.mapped, *report.dropped]}
    assert accounted == set(sources)
    assert list(report.dropped) == ["model.safetensors:lm_head.weight"]


def test_community_diffusers_layout_converts_to_the_same_pipeline(tmp_path, converted_t2i):
    community = tmp_path / "community"
    for folder in ("text_encoder", "tokenizer", "autoencoder", "diffusion_head", "projector"):
        (community / folder).mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(RELEASE / name, community / "text_encoder" / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json"):  # fmt: skip
        shutil.copy(RELEASE / name, community / "tokenizer" / name)
    ae_config = json.loads((RELEASE / "ae_config.json").read_text())
    flattened = {**ae_config["ddconfig"], "gan_decoder": ae_config["gan_decoder"]}
    (community / "autoencoder" / "config.json").write_text(json.dumps(flattened))
    shutil.copy(RELEASE / "ae.safetensors", community / "autoencoder" / "diffusion_pytorch_model.safetensors")
    shutil.copy(RELEASE / "vision_head_config.json", community / "diffusion_head" / "config.json")
    shutil.copy(RELEASE / "vision_head.safetensors", community / "diffusion_head" / "diffusion_pytorch_model.safetensors")
    shutil.copy(RELEASE / "projector.safetensors", community / "projector" / "diffusion_pytorch_model.safetensors")
    convert_t2i(str(community), str(tmp_path / "out"), image_sizes=FIXTURE_IMAGE_SIZES)
    assert torch.equal(codes_of(tmp_path / "out"), codes_of(converted_t2i[16]))


def test_hub_repo_id_resolves_offline_from_the_cache(tmp_path):
    snapshot, env = offline_hub_cache(tmp_path, "someone/BitDance-tiny")
    copy_release(snapshot)
    subprocess.run(
        [sys.executable, str(REPO / "conversion" / "convert_bitdance_t2i.py"), "--checkpoint_path",
         "someone/BitDance-tiny", "--dump_path", str(tmp_path / "out"), "--image_sizes", "64x64"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "BitDancePipeline"
    with pytest.raises(ConversionError, match="neither a folder nor a Hub repo id"):
        convert_t2i(str(tmp_path / "no" / "such" / "folder"), str(tmp_path / "x"))


@pytest.mark.parametrize(
    "mutation,message",
    [
        (lambda sd: sd.update({"net.extra.weight": torch.zeros(1)}), "unexpected tensor 'net.extra.weight'"),
        (lambda sd: sd.pop("net.input_proj.bias"), "missing tensors"),
        (lambda sd: sd.update({"net.input_proj.bias": torch.zeros(3)}), "has shape \\(3,\\)"),
        (lambda sd: sd.update({"net.input_proj.bias": torch.zeros(256, dtype=torch.int32)}), "floating point"),
    ],
)
def test_bad_head_weights_fail_without_leaving_output(tmp_path, mutation, message):
    release = copy_release(tmp_path / "release")
    head = load_file(release / "vision_head.safetensors")
    mutation(head)
    save_file(head, release / "vision_head.safetensors")
    with pytest.raises(ConversionError, match=message):
        convert_t2i(str(release), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_missing_and_corrupt_files_are_named(tmp_path):
    release = copy_release(tmp_path / "release")
    (release / "projector.safetensors").unlink()
    with pytest.raises(ConversionError, match="Missing projector weights"):
        convert_t2i(str(release), str(tmp_path / "out"))
    (release / "projector.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ConversionError, match="corrupt"):
        convert_t2i(str(release), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("converter", ["t2i", "tokenizer", "imagenet"])
def test_command_line_ends_a_failed_conversion_with_its_message(tmp_path, converter, capsys):
    from bitdance_diffusers import cli

    missing = str(tmp_path / "no" / "such" / "checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", converter, "--checkpoint_path", missing, "--dump_path", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: " in error and missing in error and "does not exist" in error
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "out"
    convert_t2i(str(RELEASE), str(out), image_sizes="64x64")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_t2i(str(RELEASE), str(out))
    convert_t2i(str(RELEASE), str(out), overwrite=True, image_sizes="64x64,128x128")
    assert json.loads((out / "model_index.json").read_text())["image_sizes"] == [[64, 64], [128, 128]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_language_model_is_streamed_shard_by_shard(tmp_path):
    """A synthetic 8-shard LLM converts with peak memory far below the total weight size."""
    release = copy_release(tmp_path / "release")
    for name in ("model.safetensors", "config.json"):
        (release / name).unlink()
    build = textwrap.dedent(f"""
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
        # The fixture's width (the projector and head must match it), with wide feed-forward layers for the size.
        config = Qwen3Config(vocab_size=584, hidden_size=64, intermediate_size=69632, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
        model.save_pretrained({str(release)!r}, max_shard_size="60MB")
    """)
    subprocess.run([sys.executable, "-c", build], check=True, capture_output=True)
    shards = sorted(release.glob("model-*.safetensors"))
    total = sum(shard.stat().st_size for shard in shards)
    assert len(shards) >= 6 and total > 400e6

    measure = textwrap.dedent(f"""
        import resource
        import bitdance_diffusers.conversion.t2i as t2i
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t2i.convert_t2i({str(release)!r}, {str(tmp_path / 'out')!r})
        print(baseline * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    baseline, peak = map(int, subprocess.run([sys.executable, "-c", measure], check=True, capture_output=True,
                                             text=True).stdout.split())  # fmt: skip
    largest_shard = max(shard.stat().st_size for shard in shards)
    print(f"peak RSS over baseline: {(peak - baseline) / 1e6:.0f} MB for {total / 1e6:.0f} MB in {len(shards)} shards")
    assert peak - baseline < min(0.5 * total, 4 * largest_shard + 50e6)
    index = json.loads((tmp_path / "out" / "language_model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(shards) and "lm_head.weight" not in index["weight_map"]
