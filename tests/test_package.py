"""The installed package: cheap import, diffusers registration in a fresh process, the command line."""

import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from PIL import Image

from conftest import REPO


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)


def test_import_is_lazy_about_models_and_registers_the_pipeline():
    out = run_python("""
        import sys
        import bitdance_diffusers, diffusers
        assert diffusers.BitDancePipeline is bitdance_diffusers.BitDancePipeline
        heavy = [m for m in sys.modules if m.startswith(("transformers.models.qwen3", "bitdance_diffusers.random"))]
        print(heavy)
    """)
    assert out.stdout.strip() == "[]"


def test_diffusion_pipeline_loads_a_saved_folder_in_a_fresh_process(tmp_path):
    run_python(f"""
        from bitdance_diffusers.random_pipeline import build_random_pipeline
        build_random_pipeline("tiny").save_pretrained({str(tmp_path)!r})
    """)
    out = run_python(f"""
        import bitdance_diffusers
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r})
        print(type(pipe).__name__, type(pipe.vae).__name__, type(pipe.scheduler).__name__)
    """)
    assert out.stdout.split() == ["BitDancePipeline", "BitDanceTokenizer", "BinaryFlowScheduler"]


def test_wheel_ships_every_module_and_the_demo_model(tmp_path):
    # Built from a fresh copy: files left in a previous build/ folder must not stand in for missing package data.
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package = source / "src" / "bitdance_diffusers"
    expected = {path.relative_to(package.parent).as_posix() for path in package.rglob("*") if path.is_file()}
    assert any("bitdance-shapes-128/vae/" in name for name in expected)
    assert sorted(expected - shipped) == []


def test_command_line_falls_back_to_a_tiny_random_model(tmp_path, monkeypatch, capsys):
    from bitdance_diffusers import cli
    from bitdance_diffusers import pretrained

    monkeypatch.setattr(pretrained, "DEMO_MODEL_PATH", tmp_path / "missing")
    output = tmp_path / "fox.png"
    cli.main(["generate", "--prompt", "a red fox", "--steps", "2", "--output", str(output)])
    assert "tiny randomly initialised" in capsys.readouterr().err
    assert Image.open(output).size == (256, 256)


def test_command_line_swaps_the_sampler(tmp_path, monkeypatch):
    from bitdance_diffusers import BitDancePipeline, cli

    head_calls = []
    pipeline_call = BitDancePipeline.__call__

    def counting_call(pipe, *args, **kwargs):
        assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
        head_forward = pipe.diffusion_head.forward
        pipe.diffusion_head.forward = lambda *a, **k: head_calls.append(1) or head_forward(*a, **k)
        return pipeline_call(pipe, *args, **kwargs)

    monkeypatch.setattr(BitDancePipeline, "__call__", counting_call)
    output = tmp_path / "circle.png"
    cli.main(["generate", "--prompt", "a large red circle in the center on a blue background", "--sampler",
              "flow-unipc", "--steps", "2", "--output", str(output)])  # fmt: skip
    assert Image.open(output).size == (128, 128)
    assert len(head_calls) == 2 * 4  # 2 steps per block, 4 blocks of the 128x128 shapes model (P = 16, no final step)


def test_command_line_gpu_switches_name_their_requirement():
    from bitdance_diffusers.cli import build_parser, load_pipeline

    args = build_parser().parse_args(["generate", "--prompt", "a fox", "--offload", "model", "--cuda_graphs"])
    assert (args.offload, args.cuda_graphs) == ("model", True)
    with pytest.raises(ValueError, match="--offload model moves weights .* drop --offload"):
        load_pipeline(None, torch.float32, "cpu", offload="model")
    with pytest.raises(ValueError, match="--cuda_graphs needs a CUDA GPU"):
        load_pipeline(None, torch.float32, "cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="use --offload model with --cuda_graphs"):
        load_pipeline(None, torch.float32, "cuda", offload="sequential", cuda_graphs=True)


def test_command_line_reports_bad_input_without_a_traceback(capsys):
    from bitdance_diffusers import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "a fox", "--height", "96", "--width", "96", "--output", "unused.png"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "bitdance generate: error: Size 96x96 (height x width) is not supported" in error
    assert "Traceback" not in error


def test_command_line_generates_with_class_conditional_models(tmp_path, capsys):
    from bitdance_diffusers import cli
    from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline

    model = tmp_path / "imagenet"
    build_random_imagenet_pipeline(block_size=4).save_pretrained(model)
    output = tmp_path / "labels.png"
    cli.main(["generate", "--model", str(model), "--class_labels", "1", "tench", "--steps", "2", "--output", str(output)])
    for index in range(2):
        assert Image.open(tmp_path / f"labels_{index}.png").size == (64, 64)  # the tiny random model's size
    for argv, message in [
        (["--model", str(model), "--prompt", "a fox"], "class-conditional ImageNet model: pass --class_labels"),
        (["--class_labels", "1"], "--class_labels needs --model"),
        (["--prompt", "a fox", "--class_labels", "1"], "Pass --prompt for a text-to-image model or --class_labels"),
    ]:
        with pytest.raises(SystemExit):
            cli.main(["generate", *argv, "--output", str(output)])
        assert message in capsys.readouterr().err


def test_command_line_help():
    generate_help = subprocess.run(["bitdance", "generate", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--prompt" in generate_help and "--model" in generate_help
    help_text = subprocess.run(["bitdance", "convert", "tokenizer", "--help"], capture_output=True, text=True).stdout
    assert "--checkpoint_path" in help_text and "--config_path" in help_text


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ('pip install torch==2.13.0 && pip install -e ".[test]"', "python -m pytest tests -q"):
        assert command in readme and command in ci
