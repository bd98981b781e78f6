"""The `bitdance` command: one file per image, outputs checked before any work, atomic writes, one-line errors with
exit status 2 for every kind of user mistake, a quiet terminal, a light `--help`, and the `demo` sub-command."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance_diffusers import cli
from bitdance_diffusers.cli import files
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline, build_random_pipeline
from conftest import REPO, offline_hub_cache


PROMPT = "a large red circle in the center on a blue background"
HEAVY_MODULES = ("torch", "diffusers", "transformers", "torchao", "bitsandbytes")


def run_cli(*argv, env=None, cwd=None):
    """The `bitdance` command as a user runs it: the program in a fresh process (its imports its own)."""
    code = "import sys; from bitdance_diffusers.cli import main; sys.argv[0] = 'bitdance'; main()"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=cwd)


def error_of(argv, capsys) -> str:
    """The stderr of ``bitdance ARGV`` run in-process, after checking that it is one line and the exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(("bitdance generate: error: ", "bitdance: error: ")), err
    return lines[0]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_random_pipeline("tiny", block_size=16, image_sizes=[[64, 64]]).save_pretrained(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the command gets as far as loading a pipeline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the bad input was reported")

    monkeypatch.setattr(cli.generate, "load_pipeline", refuse)


# Light start ----------------------------------------------------------------------------------------------------


def test_help_imports_no_heavy_library():
    code = textwrap.dedent(f"""
        import sys
        from bitdance_diffusers.cli import main
        for argv in (["--help"], ["generate", "--help"], ["convert", "--help"]):
            try:
                main(argv)
            except SystemExit:
                pass
        print([name for name in {HEAVY_MODULES!r} if name in sys.modules])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"
    assert "output files:" in result.stdout and "--overwrite" in result.stdout and "exit status:" in result.stdout


def test_the_parsers_sampler_names_are_the_packages():
    from bitdance_diffusers.schedulers import SAMPLERS

    assert cli.SAMPLER_NAMES == tuple(SAMPLERS)


# Output files ---------------------------------------------------------------------------------------------------


def test_every_image_gets_its_own_file_for_any_extension(tmp_path, capsys):
    folder = tmp_path / "shots.png.d"  # a ".png" in a folder name stays as it is
    folder.mkdir()
    cli.main(["generate", "--prompt", PROMPT, "--steps", "1", "--num_images", "3", "--output", str(folder / "fox.jpg")])
    written = sorted(path.name for path in folder.iterdir())
    assert written == ["fox_0.jpg", "fox_1.jpg", "fox_2.jpg"]
    assert capsys.readouterr().out.splitlines() == [f"wrote {folder / name} (128x128)" for name in written]
    images = [np.asarray(Image.open(folder / name)) for name in written]
    assert all(Image.open(folder / name).format == "JPEG" for name in written)
    assert not np.array_equal(images[0], images[1])  # three images, not one written three times


def test_numbered_names_are_padded_and_keep_folders():
    paths = files.image_paths(REPO / "a.png" / "b.webp", 12)
    assert paths[0].name == "b_00.webp" and paths[11].name == "b_11.webp"
    assert {path.parent for path in paths} == {REPO / "a.png"}
    assert files.image_paths(REPO / "x.png", 1) == [REPO / "x.png"]


@pytest.mark.parametrize(
    "output, message",
    [
        ("{tmp}/no/such/folder/x.png", "of --output does not exist; create it first"),
        ("{tmp}", "is a folder; name an image file inside it"),
        ("{tmp}/a_file.png/x.png", "is a file, not a folder"),
        ("{tmp}/existing.png", "already exists; pass --overwrite to replace it"),
        ("{tmp}/x", "has no file extension; add the image type, e.g."),
        ("{tmp}/x.notanimage", "Pillow knows no image type '.notanimage'"),
        ("{tmp}/x.xbm", "Pillow cannot write RGB images as .xbm"),
        ("/proc/x.png", "Cannot write into /proc"),
    ],
)
def test_output_paths_are_refused_before_loading(tmp_path, capsys, no_loading, output, message):
    (tmp_path / "a_file.png").write_bytes(b"not a folder")
    (tmp_path / "existing.png").write_bytes(b"an earlier result")
    line = error_of(["generate", "--prompt", "a fox", "--output", output.format(tmp=tmp_path)], capsys)
    assert message in line
    assert (tmp_path / "existing.png").read_bytes() == b"an earlier result"


def test_a_numbered_path_that_exists_is_refused(tmp_path, capsys, no_loading):
    (tmp_path / "fox_1.png").write_bytes(b"kept")
    argv = ["generate", "--prompt", "a fox", "--num_images", "2", "--output", str(tmp_path / "fox.png")]
    line = error_of(argv, capsys)
    assert f"{tmp_path / 'fox_1.png'} (one of the 2 images of --output) already exists" in line


def test_overwrite_replaces_the_file_atomically_with_ordinary_permissions(tmp_path, capsys):
    output = tmp_path / "circle.png"
    output.write_bytes(b"an earlier result")
    cli.main(["generate", "--prompt", PROMPT, "--steps", "1", "--output", str(output), "--overwrite", "--quiet"])
    assert capsys.readouterr().out == f"{output}\n"
    assert Image.open(output).size == (128, 128)
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["circle.png"]  # no temporary file left


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"previous")

    def write_half_then_fail(file):
        file.write(b"\x89PNG half an image")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
    with pytest.raises(FileExistsError):
        files.atomic_write(path, lambda file: file.write(b"new"), overwrite=False)
    assert path.read_bytes() == b"previous"


def test_sigkill_while_writing_never_leaves_a_partial_image(tmp_path):
    """A writer killed mid-file leaves the destination untouched (only a hidden temporary file), and the next run into
    the folder removes that temporary file."""
    path = tmp_path / "image.png"
    code = textwrap.dedent(f"""
        import sys, time
        from bitdance_diffusers.cli.files import atomic_write
        def slow(file):
            file.write(b"half an image")
            file.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(path)!r}, slow)
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not path.exists()
    (partial,) = tmp_path.iterdir()
    assert partial.name == f".image.png.{writer.pid}.partial"
    assert files.remove_stale_partials(tmp_path) == [partial]
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_file_of_a_running_writer_is_kept(tmp_path):
    running = tmp_path / f".image.png.{os.getppid()}.partial"
    running.write_bytes(b"being written")
    assert files.remove_stale_partials(tmp_path) == [] and running.exists()


# One-line errors, exit status 2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "x", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--prompt", "x", "--steps", "-5"], "argument --steps: must be at least 1, got -5"),
        (["--prompt", "x", "--steps", "2.5"], "argument --steps: expected a whole number, got '2.5'"),
        (["--prompt", "x", "--num_images", "0"], "argument --num_images: must be at least 1"),
        (["--prompt", "x", "--height", "-128"], "argument --height: must be at least 1"),
        (["--prompt", "x", "--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
        (["--prompt", "x", "--guidance=-inf"], "argument --guidance: must be a finite number"),
        (["--prompt", "x", "--guidance", "seven"], "argument --guidance: expected a number, got 'seven'"),
        (["--prompt", "x", "--seed", "-1"], "argument --seed: must be between 0 and 2**64 - 1"),
        (["--prompt", "x", "--seed", str(2**64)], "argument --seed: must be between 0 and 2**64 - 1"),
        (["--prompt", "x", "--lora", "a", "--lora_scale", "inf"], "argument --lora_scale: must be a finite number"),
        (["--prompt", "  "], "argument --prompt: is empty; describe what to draw"),
        (["--prompt", "x", "--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
        (["--prompt", "x", "--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
        (["--prompt", "x", "--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
        (["--prompt", "x", "--no_such_option"], "unrecognized arguments: --no_such_option"),
        (["--prompt", "x", "--quiet", "--verbose"], "argument --verbose: not allowed with argument --quiet"),
        (["--class_labels", "-3"], "argument --class_labels: class ids start at 0, got -3"),
        ([], "Pass --prompt for a text-to-image model or --class_labels"),
        (["--prompt", "x", "--height", "96"], "Size 96x96 (height x width) is not supported by this model; choose one"),
        (["--prompt", "x", "--width", "128", "--height", "256"], "Size 256x128 (height x width) is not supported"),
        (["--prompt", "x", "--lora_scale", "1"], "Got 1 --lora_scale values for 0 --lora files"),
        (["--prompt", "x", "--lora", "{tmp}/no/such/lora"], "--lora {tmp}/no/such/lora: no such file or folder"),
        (["--prompt", "x", "--lora", "{tmp}"], "holds no .safetensors file; pass the folder that save_lora_weights"),
        (["--prompt", "x", "--lora", "{tmp}/notes.txt"], "is not a .safetensors file"),
        (["--prompt", "x", "--model", "{tmp}/no/such/model"], "no such folder; pass a folder written by `bitdance"),
        (["--prompt", "x", "--model", "{tmp}"], "has no model_index.json, so it is not a diffusers pipeline folder"),
        (["--prompt", "x", "--model", "{tmp}/notes.txt"], "is a file; pass the pipeline folder"),
        (["--prompt", "x", "--model", "{tmp}/corrupt"], "model_index.json ("),
        (["--prompt", "x", "--model", "{tmp}/other"], "holds a StableDiffusionPipeline pipeline, not a BitDance one"),
        (["--prompt", "x", "--device", "nonsense"], "--device 'nonsense' is not a device; use cpu, cuda or cuda:N"),
        (["--prompt", "x", "--device", "meta"], "--device meta: BitDance runs on cpu or cuda"),
        (["--prompt", "x", "--device", "cpu:1"], "--device cpu:1: torch has one CPU device; use --device cpu"),
        (["--prompt", "x", "--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "use --device cpu"),
        (["--prompt", "x", "--offload", "model", "--device", "cpu"], "--offload model moves weights"),
        (["--prompt", "x", "--quantize", "nf4", "--device", "cpu"], "--quantize nf4 needs a CUDA GPU"),
        (["--prompt", "x", "--cuda_graphs", "--device", "cpu"], "--cuda_graphs needs a CUDA GPU"),
        (["--class_labels", "3"], "--class_labels needs --model with a converted ImageNet checkpoint"),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, no_loading, argv, message):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model_index.json").write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    argv = [part.format(tmp=tmp_path) for part in argv]
    line = error_of(["generate", *argv, "--output", str(tmp_path / "out.png")], capsys)
    assert message.format(tmp=tmp_path) in line
    assert not (tmp_path / "out.png").exists()


def test_command_line_level_errors_are_one_line(capsys):
    assert "invalid choice: 'nonsense'" in error_of(["nonsense"], capsys)
    assert "the following arguments are required" in error_of([], capsys)


def test_inputs_that_do_not_fit_the_model_kind(tmp_path, capsys, no_loading):
    model = tmp_path / "imagenet"
    build_random_imagenet_pipeline(block_size=4).save_pretrained(model)
    output = str(tmp_path / "out.png")
    line = error_of(["generate", "--model", str(model), "--class_labels", "1", "--height", "64", "--output", output],
                    capsys)  # fmt: skip
    assert "--height do not apply to a class-conditional ImageNet model" in line
    line = error_of(["generate", "--model", str(model), "--class_labels", "1", "--negative_prompt", "x", "--output",
                     output], capsys)  # fmt: skip
    assert "--negative_prompt do not apply" in line


def test_broken_model_and_lora_files_are_user_errors(saved_tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(saved_tiny, broken)
    (broken / "diffusion_head" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    output = str(tmp_path / "out.png")
    line = error_of(["generate", "--model", str(broken), "--prompt", "x", "--output", output], capsys)
    assert f"Cannot load the pipeline in {broken}:" in line and "Re-convert or re-download it." in line
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"garbage")
    line = error_of(["generate", "--model", str(saved_tiny), "--prompt", "x", "--lora", str(lora), "--output", output],
                    capsys)  # fmt: skip
    assert f"Cannot apply --lora {lora}:" in line
    assert not (tmp_path / "out.png").exists()


def test_inputs_the_pipeline_refuses_are_user_errors(tmp_path, capsys):
    model = tmp_path / "imagenet"
    build_random_imagenet_pipeline(block_size=4).save_pretrained(model)
    line = error_of(["generate", "--model", str(model), "--class_labels", "no such animal", "--steps", "1", "--output",
                     str(tmp_path / "out.png")], capsys)  # fmt: skip
    assert "no such animal" in line


@pytest.mark.slow
def test_hub_ids_offline_are_read_from_the_cache_or_refused(saved_tiny, tmp_path):
    snapshot, env = offline_hub_cache(tmp_path, "someone/bitdance-tiny")
    shutil.copytree(saved_tiny, snapshot)
    env = {**env, "PYTHONPATH": str(REPO / "src")}
    ok = run_cli("generate", "--model", "someone/bitdance-tiny", "--prompt", "x", "--steps", "1", "--output",
                 str(tmp_path / "ok.png"), env=env)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert Image.open(tmp_path / "ok.png").size == (64, 64)
    for argv, message in [
        (["--model", "someone/not-cached"], "is neither a folder here nor a Hub repository in the Hugging Face cache"),
        (["--lora", "someone/not-cached-lora"], "is neither a file nor a folder here, nor a Hub repository"),
    ]:
        result = run_cli("generate", "--prompt", "x", *argv, "--output", str(tmp_path / "no.png"), env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# Errors that are not the user's, interrupts -------------------------------------------------------------------


def test_unexpected_errors_and_interrupts(tmp_path, capsys, monkeypatch):
    output = str(tmp_path / "out.png")

    def fail(exception):
        def draw(*args, **kwargs):
            raise exception

        monkeypatch.setattr(cli.generate, "draw", draw)

    fail(RuntimeError("a bug of ours"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "x", "--output", output])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert "unexpected error: RuntimeError: a bug of ours (run again with --verbose for the traceback" in err
    with pytest.raises(RuntimeError, match="a bug of ours"):  # --verbose lets the traceback through
        cli.main(["generate", "--prompt", "x", "--output", output, "--verbose"])
    fail(KeyboardInterrupt())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "x", "--output", output])
    assert exit_info.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_a_disk_that_fills_up_while_writing_is_one_line_and_leaves_nothing_partial(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli.generate, "draw", lambda *args, **kwargs: [Image.new("RGB", (8, 8))])

    def save_until_the_disk_is_full(image, path, format_name, overwrite=True):
        def write(file):
            file.write(b"\x89PNG the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        files.atomic_write(path, write, overwrite)

    monkeypatch.setattr(cli.generate, "save_image", save_until_the_disk_is_full)
    line = error_of(["generate", "--prompt", "x", "--quiet", "--output", str(tmp_path / "x.png")], capsys)
    assert f"Cannot write {tmp_path / 'x.png'} (No space left on device); free space" in line
    assert list(tmp_path.iterdir()) == []


# A quiet terminal -------------------------------------------------------------------------------------------------

OUR_STDERR_LINE = re.compile(
    r"No --model given: using the small shapes model shipped with the package .*"
    r"|token blocks(?: of \d+ images)?: +\d+%\|[^|]*\| \d+/\d+ \[[^\]]*\]"
)
REPORT_MODULES = "import sys; print({name: sys.modules.get(name) is not None for name in ('torchao', 'bitsandbytes')})"


def run_program_reporting_modules(*argv, cwd):
    code = f"import sys; from bitdance_diffusers.cli import main; main()\n{REPORT_MODULES}"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_the_readme_command_prints_only_our_lines(tmp_path):
    result = run_program_reporting_modules("generate", "--prompt", PROMPT, "--output", "circle.png", "--steps", "3",
                                           cwd=tmp_path)  # fmt: skip
    lines = [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip()]
    assert lines and all(OUR_STDERR_LINE.fullmatch(line) for line in lines), result.stderr
    assert any(line.startswith("token blocks: 100%|") for line in lines)
    assert result.stdout.splitlines() == ["wrote circle.png (128x128)", "{'torchao': False, 'bitsandbytes': False}"]

    quantized = run_program_reporting_modules("generate", "--prompt", PROMPT, "--output", "q.png", "--steps", "1",
                                              "--num_images", "2", "--quantize", "int8wo", cwd=tmp_path)  # fmt: skip
    lines = [line for line in re.split(r"[\r\n]+", quantized.stderr) if line.strip()]
    assert lines and all(OUR_STDERR_LINE.fullmatch(line) for line in lines), quantized.stderr
    assert any(line.startswith("token blocks of 2 images: 100%|") for line in lines)
    assert quantized.stdout.splitlines()[-1] == "{'torchao': True, 'bitsandbytes': False}"


def test_quiet_and_verbose(tmp_path, capsys):
    cli.main(["generate", "--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / "q.png"), "--quiet"])
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == f"{tmp_path / 'q.png'}\n"  # no note, no bar: the path alone
    cli.main(["generate", "--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / "v.png"), "--verbose"])
    verbose = capsys.readouterr()
    assert "Loading pipeline components" in verbose.err  # the libraries' loading bars are back
    assert "No --model given" in verbose.err and "token blocks: 100%" in verbose.err


def test_library_output_settings_are_restored_after_an_in_process_run(tmp_path):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    cli.main(["generate", "--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / "x.png"), "--quiet"])
    after = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    assert after == before
    assert sys.modules.get("torchao", "absent") is not None  # an in-process call hides no library of the caller's


# The demo sub-command ---------------------------------------------------------------------------------------------


def test_demo_subcommand_runs_the_demo_module(monkeypatch, capsys):
    calls = []
    demo = types.ModuleType("bitdance_diffusers.demo")
    demo.add_demo_arguments = lambda parser: parser.add_argument("--port", type=int, default=7860, help="Port.")
    demo.run_demo = calls.append
    monkeypatch.setitem(sys.modules, "bitdance_diffusers.demo", demo)

    cli.main(["demo", "--port", "8123"])
    assert [args.port for args in calls] == [8123]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--port" in capsys.readouterr().out
    assert "demo" in cli.build_parser().format_help()


def test_the_import_time_benchmark_prints_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_import_time.py"), "--repeats", "1",
                             "--commands", "python (empty),bitdance --help", "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, check=True, cwd=REPO / "benchmarks")  # fmt: skip
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["bitdance --help"][-1] == "none" and "python (empty)" in rows
