"""The converters' output folder: --overwrite replaces only converted folders, never the source, the working folder,
the home folder or a file; a killed conversion loses nothing and the next one cleans up after it; ordinary
permissions."""

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bitdance_diffusers import BitDanceTokenizer
from bitdance_diffusers.conversion.common import ConversionError
from bitdance_diffusers.conversion.t2i import convert_t2i
from bitdance_diffusers.conversion.tokenizer import convert_tokenizer
from conftest import FIXTURES


TOKENIZER = FIXTURES / "tokenizer" / "ae_d16c32.safetensors"
RELEASE = FIXTURES / "t2i_p16" / "model"


def copy_tokenizer(folder):
    """The fixture tokenizer (weights + config) copied into ``folder``; returns the weights path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ae_d16c32.safetensors", "ae_d16c32_config.json"):
        shutil.copy(FIXTURES / "tokenizer" / name, folder / name)
    return folder / "ae_d16c32.safetensors"


def digest(folder):
    """Hash of every file under ``folder`` by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }  # fmt: skip


def hidden_entries(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# --overwrite -------------------------------------------------------------------------------------------------------


def test_overwrite_replaces_a_converted_folder_also_one_converted_before_model_cards(tmp_path):
    out = tmp_path / "out"
    convert_tokenizer(str(TOKENIZER), str(out), dtype="bf16")
    (out / "README.md").unlink()  # the layout of folders converted before the converters wrote model cards
    with pytest.raises(ConversionError, match="already holds a converted model; pass --overwrite"):
        convert_tokenizer(str(TOKENIZER), str(out))
    convert_tokenizer(str(TOKENIZER), str(out), overwrite=True)
    assert BitDanceTokenizer.from_pretrained(out).dtype == torch.float32 and (out / "README.md").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_filled_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    convert_tokenizer(str(TOKENIZER), str(tmp_path / "out"))
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("extra", ["photo.png", "notes/todo.txt"])
def test_overwrite_refuses_a_folder_with_foreign_files(tmp_path, extra):
    out = tmp_path / "out"
    convert_tokenizer(str(TOKENIZER), str(out))
    (out / extra).parent.mkdir(exist_ok=True)
    (out / extra).write_text("mine")
    before = digest(out)
    with pytest.raises(ConversionError, match=f"not written by a BitDance conversion .*{extra.split('/')[0]}"):
        convert_tokenizer(str(TOKENIZER), str(out), overwrite=True)
    assert digest(out) == before and hidden_entries(tmp_path) == []


def test_overwrite_refuses_a_foreign_folder_and_a_foreign_pipeline(tmp_path):
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ConversionError, match="not written by a BitDance conversion"):
        convert_tokenizer(str(TOKENIZER), str(foreign), overwrite=True)
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ConversionError, match="not that of a BitDance pipeline"):
        convert_tokenizer(str(TOKENIZER), str(other), overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "years of work" and (other / "model_index.json").is_file()


def test_a_file_at_the_dump_path_is_refused_untouched(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match="is a file, not a folder"):
            convert_tokenizer(str(TOKENIZER), str(target), overwrite=overwrite)
    assert target.read_text() == "precious" and sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ConversionError, match="is a file, not a folder"):
        convert_tokenizer(str(TOKENIZER), str(target / "inside"))


def test_a_symbolic_link_at_the_dump_path_is_refused(tmp_path):
    convert_tokenizer(str(TOKENIZER), str(tmp_path / "real"))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConversionError, match="symbolic link"):
        convert_tokenizer(str(TOKENIZER), str(tmp_path / "link"), overwrite=True)
    assert (tmp_path / "real" / "config.json").is_file()


@pytest.mark.parametrize("where", ["working folder", "parent of the working folder", "home", "root"])
def test_working_home_and_root_folders_are_never_replaced(tmp_path, monkeypatch, where):
    work = tmp_path / "home" / "me" / "work"
    work.mkdir(parents=True)
    (work / "data.txt").write_text("keep")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    dump = {"working folder": ".", "parent of the working folder": "..", "home": "~", "root": "/"}[where]
    with pytest.raises(ConversionError):
        convert_tokenizer(str(TOKENIZER), os.path.expanduser(dump), overwrite=True)
    assert (work / "data.txt").read_text() == "keep"
    # Even when the working folder holds nothing but a converted model, "." is not replaced.
    shutil.rmtree(work)
    convert_tokenizer(str(TOKENIZER), str(work))
    monkeypatch.chdir(work)
    with pytest.raises(ConversionError, match="working folder, the home folder or one above them"):
        convert_tokenizer(str(TOKENIZER), ".", overwrite=True)
    assert (work / "config.json").is_file()


def test_the_source_is_never_replaced(tmp_path):
    weights = copy_tokenizer(tmp_path / "release")
    before = digest(tmp_path / "release")
    for dump in (tmp_path / "release", tmp_path, weights):  # the folder holding it, one above, the file itself
        with pytest.raises(ConversionError, match="source"):
            convert_tokenizer(str(weights), str(dump), overwrite=True)
    with pytest.raises(ConversionError, match="lies inside the source folder"):
        convert_t2i(str(RELEASE), str(RELEASE / "diffusers"), overwrite=True)
    assert digest(tmp_path / "release") == before and not (RELEASE / "diffusers").exists()


def test_source_is_protected_through_symbolic_links(tmp_path):
    weights = copy_tokenizer(tmp_path / "release")
    (tmp_path / "alias").symlink_to(tmp_path / "release")
    with pytest.raises(ConversionError, match="source"):
        convert_tokenizer(str(tmp_path / "alias" / weights.name), str(tmp_path / "release"), overwrite=True)
    assert weights.is_file()


def test_an_unwritable_dump_path_is_refused_before_converting(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConversionError, match="a_file is a file"):
        convert_t2i(str(RELEASE), str(tmp_path / "a_file" / "sub" / "out"))


def test_command_line_refusals_are_one_line_with_status_2(tmp_path, capsys):
    from bitdance_diffusers import cli

    (tmp_path / "out").write_text("precious")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "tokenizer", "--checkpoint_path", str(TOKENIZER), "--dump_path", str(tmp_path / "out"),
                  "--overwrite"])  # fmt: skip
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert "is a file" in error and (tmp_path / "out").read_text() == "precious"


# Permissions -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_converted_folders_get_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        convert_tokenizer(str(TOKENIZER), str(tmp_path / "out"))
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


# Leftovers of interrupted conversions --------------------------------------------------------------------------------


def fake_interrupted_run(parent, name, transaction, alive=False):
    """What a conversion to ``parent/name`` leaves while running (``alive``) or after being killed."""
    owner = parent / f".{name}.owner-{transaction}"
    owner.write_text("pid 1 on somehost, started earlier")
    (parent / f".{name}.partial-{transaction}").mkdir()
    (parent / f".{name}.partial-{transaction}" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    if alive:
        handle = open(owner)
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle
    return None


def test_stale_staging_folders_of_killed_runs_are_removed(tmp_path, caplog):
    fake_interrupted_run(tmp_path, "out", "111-dead")
    with caplog.at_level(logging.WARNING, logger="bitdance_diffusers.conversion"):
        convert_tokenizer(str(TOKENIZER), str(tmp_path / "out"))
    assert "left by an interrupted conversion" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_running_conversions_folders_are_left_alone(tmp_path):
    running = fake_interrupted_run(tmp_path, "out", "222-alive", alive=True)
    try:
        convert_tokenizer(str(TOKENIZER), str(tmp_path / "other"))  # another output in the same folder
        with pytest.raises(ConversionError, match="Another conversion is writing .*pid 1 on somehost"):
            convert_tokenizer(str(TOKENIZER), str(tmp_path / "out"))
        assert (tmp_path / ".out.partial-222-alive" / "diffusion_pytorch_model.safetensors").is_file()
        assert (tmp_path / ".out.owner-222-alive").is_file() and not (tmp_path / "out").exists()
    finally:
        running.close()
    convert_tokenizer(str(TOKENIZER), str(tmp_path / "out"))  # its owner is gone now
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other", "out"]


def test_leftovers_of_earlier_versions_are_named_not_deleted(tmp_path, caplog):
    (tmp_path / ".out.partial-x8k2l1m0").mkdir()
    with caplog.at_level(logging.WARNING, logger="bitdance_diffusers.conversion"):
        convert_tokenizer(str(TOKENIZER), str(tmp_path / "out"))
    assert ".out.partial-x8k2l1m0 was left by an earlier conversion that recorded no owner" in caplog.text
    assert (tmp_path / ".out.partial-x8k2l1m0").is_dir()


# SIGKILL fault injection -------------------------------------------------------------------------------------------

# Runs the tokenizer converter with one step slowed down; READY_FILE appears when it is reached, then the test kills.
KILLABLE_CONVERTER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from bitdance_diffusers.models.binary_autoencoder import BitDanceTokenizer
    from bitdance_diffusers.conversion.tokenizer import main

    ready, stage = Path(os.environ["READY_FILE"]), os.environ["KILL_AT"]

    def pause():
        ready.touch()
        time.sleep(600)

    if stage == "writing":  # the weights are in the staging folder, the model card not yet
        save = BitDanceTokenizer.save_pretrained
        BitDanceTokenizer.save_pretrained = lambda self, *a, **k: (save(self, *a, **k), pause())
    else:  # "swapping": the previous output is moved aside, the new one not yet in place
        rename = Path.rename
        def rename_then_pause(self, target):
            moved = rename(self, target)
            if ".replaced-" in Path(target).name:
                pause()
            return moved
        Path.rename = rename_then_pause
    main(sys.argv[1:])
""")


def run_and_kill(stage, tmp_path, *arguments):
    ready = tmp_path / f"ready-{stage}"
    env = {**os.environ, "READY_FILE": str(ready), "KILL_AT": stage}
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_CONVERTER, *arguments], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the conversion ended before the kill point: {process.stderr.read().decode()}")
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    ready.unlink()


@pytest.mark.slow
def test_sigkill_while_writing_then_rerun(tmp_path):
    weights = copy_tokenizer(tmp_path / "release")
    source = digest(tmp_path / "release")
    work = tmp_path / "converted"
    work.mkdir()
    run_and_kill("writing", tmp_path, "--checkpoint_path", str(weights), "--dump_path", str(work / "out"))
    assert not (work / "out").exists()
    assert [name.split("-")[0] for name in hidden_entries(work)] == [".out.owner", ".out.partial"]

    convert_tokenizer(str(weights), str(work / "out"))
    assert sorted(path.name for path in work.iterdir()) == ["out"]  # nothing stale
    assert digest(tmp_path / "release") == source  # nothing lost
    BitDanceTokenizer.from_pretrained(work / "out")


@pytest.mark.slow
def test_sigkill_while_replacing_keeps_the_previous_output(tmp_path):
    weights = copy_tokenizer(tmp_path / "release")
    out = tmp_path / "converted" / "out"
    convert_tokenizer(str(weights), str(out), dtype="bf16")
    previous = digest(out)
    run_and_kill("swapping", tmp_path, "--checkpoint_path", str(weights), "--dump_path", str(out), "--overwrite")
    assert not out.exists()  # killed between moving the previous output aside and putting the new one in place

    # The next run puts the previous output back before anything else: without --overwrite it stops there.
    with pytest.raises(ConversionError, match="already holds a converted model"):
        convert_tokenizer(str(weights), str(out))
    assert digest(out) == previous and hidden_entries(out.parent) == []
    convert_tokenizer(str(weights), str(out), overwrite=True)
    assert BitDanceTokenizer.from_pretrained(out).dtype == torch.float32
    assert sorted(path.name for path in out.parent.iterdir()) == ["out"]
