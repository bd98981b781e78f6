"""examples/generate_dataset.py: prompt files, data-parallel runs, a manifest that decides what is done, refusal of
folders that no longer match, bad arguments, and a SIGKILL in the middle of a run."""

import json
import signal
import subprocess
import sys
import time

import pytest

from bitdance_diffusers.random_pipeline import build_random_pipeline
from conftest import REPO


SCRIPT = REPO / "examples" / "generate_dataset.py"
SMALL_RUN = ["--images_per_prompt", "2", "--height", "64", "--width", "64", "--steps", "1", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_random_pipeline("tiny").save_pretrained(folder)
    return folder


def write_prompts(path, prompts):
    path.write_text("\n".join(json.dumps({"prompt": prompt, "tag": index}) for index, prompt in enumerate(prompts)))
    return path


def run_script(model, prompts, output_dir, *options, check=True):
    command = [sys.executable, str(SCRIPT), "--model", str(model), "--prompts", str(prompts), "--output_dir",
               str(output_dir), *SMALL_RUN, *options]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def snapshot(output_dir):
    """Every file under ``output_dir`` with its bytes and modification time."""
    return {str(path.relative_to(output_dir)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(output_dir.rglob("*")) if path.is_file()}  # fmt: skip


def finished_prompts(output_dir, names) -> set[str]:
    """The prompt folders among ``names`` whose manifest lists their images (written last, once they are complete)."""
    finished = set()
    for name in names:
        try:
            if json.loads((output_dir / name / "manifest.json").read_text())["images"]:
                finished.add(name)
        except (OSError, ValueError, KeyError):  # not there yet
            pass
    return finished


def assert_consistent(output_dir, prompts, images_per_prompt=2):
    """Each prompt folder holds exactly its images, metadata and a complete manifest that matches them; nothing else
    (no temporary file), and no folder beyond the prompts."""
    assert sorted(path.name for path in output_dir.iterdir()) == [f"{i:05d}" for i in range(len(prompts))]
    for index, prompt in enumerate(prompts):
        folder = output_dir / f"{index:05d}"
        names = [f"{k:04d}.png" for k in range(images_per_prompt)]
        assert sorted(path.name for path in folder.iterdir()) == sorted([*names, "manifest.json", "metadata.jsonl"])
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["record"]["prompt"] == prompt
        assert [image["file"] for image in manifest["images"]] == names
        seeds = [image["seed"] for image in manifest["images"]]
        assert seeds == [index * images_per_prompt + k for k in range(images_per_prompt)]
        assert json.loads((folder / "metadata.jsonl").read_text())["seeds"] == seeds


@pytest.mark.parametrize("suffix", ["txt", "json", "jsonl"])
def test_prompt_files(tmp_path, suffix):
    sys.path.insert(0, str(REPO / "examples"))
    from generate_dataset import read_prompts

    from bitdance_diffusers.cli.arguments import UsageError

    prompts = ["a red circle", "a blue square"]
    path = tmp_path / f"prompts.{suffix}"
    if suffix == "txt":
        path.write_text("\n".join(prompts) + "\n\n")
    elif suffix == "json":
        path.write_text(json.dumps([{"prompt": p, "tag": "x"} for p in prompts]))
    else:
        path.write_text("\n".join(json.dumps({"prompt": p, "include": []}) for p in prompts))
    assert [record["prompt"] for record in read_prompts(str(path))] == prompts
    path.write_text(json.dumps([{"text": "no prompt field"}]) if suffix != "txt" else "")
    with pytest.raises(UsageError, match="has no 'prompt'" if suffix != "txt" else "holds no prompts"):
        read_prompts(str(path))
    if suffix == "jsonl":
        path.write_text('{"prompt": "fine"}\n{broken\n')
        with pytest.raises(UsageError, match=r"Line 2 of .* is not JSON"):
            read_prompts(str(path))


@pytest.mark.slow
def test_two_processes_and_resume(saved_tiny, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"prompt number {i}" for i in range(3)])
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
        "--model", str(saved_tiny), "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"), *SMALL_RUN,
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert_consistent(tmp_path / "out", [f"prompt number {i}" for i in range(3)])
    assert "process 0/2: 2 of 2 prompts" in first.stdout and "process 1/2: 1 of 1 prompts" in first.stdout
    assert json.loads((tmp_path / "out" / "00002" / "metadata.jsonl").read_text())["seeds"] == [4, 5]

    (tmp_path / "out" / "00001" / "0001.png").unlink()
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "process 0/2: 0 of 2 prompts" in second.stdout and "process 1/2: 1 of 1 prompts" in second.stdout
    assert_consistent(tmp_path / "out", [f"prompt number {i}" for i in range(3)])


@pytest.mark.slow
def test_changed_prompts_and_settings_are_refused_then_regenerated_with_overwrite(saved_tiny, tmp_path):
    out = tmp_path / "out"
    run_script(saved_tiny, write_prompts(tmp_path / "p.jsonl", ["a red circle", "a blue square", "a star"]), out)
    before = snapshot(out)

    changed = write_prompts(tmp_path / "changed.jsonl", ["a red circle", "a green square"])
    refused = run_script(saved_tiny, changed, out, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "00001: prompt changed (was 'a blue square')" in refused.stderr
    assert "00002: the prompt file has no such prompt" in refused.stderr and "--overwrite" in refused.stderr
    settings = run_script(saved_tiny, tmp_path / "p.jsonl", out, "--guidance", "3", check=False)
    assert settings.returncode == 2 and "settings changed (guidance 7.5 -> 3.0)" in settings.stderr
    assert snapshot(out) == before  # refused: nothing touched

    again = run_script(saved_tiny, changed, out, "--overwrite")
    assert "1 of 2 prompts to generate" in again.stdout
    assert_consistent(out, ["a red circle", "a green square"])
    after = snapshot(out)
    kept = [name for name in before if name.startswith("00000/")]
    assert all(after[name] == before[name] for name in kept)  # the matching prompt was not regenerated


@pytest.mark.slow
def test_files_of_others_are_never_touched(saved_tiny, tmp_path):
    out = tmp_path / "out"
    (out / "00000").mkdir(parents=True)
    (out / "00000" / "notes.txt").write_text("mine")
    (out / "README.md").write_text("mine too")
    (out / "00000" / "0000.png").write_bytes(b"an image from elsewhere")
    refused = run_script(saved_tiny, write_prompts(tmp_path / "p.jsonl", ["a red circle"]), out, check=False)
    assert refused.returncode == 2 and "00000: no readable manifest.json" in refused.stderr
    run_script(saved_tiny, tmp_path / "p.jsonl", out, "--overwrite")
    assert (out / "00000" / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "mine too"
    assert json.loads((out / "00000" / "manifest.json").read_text())["images"][0]["file"] == "0000.png"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--images_per_prompt", "0"], "argument --images_per_prompt: must be at least 1, got 0"),
        (["--steps", "-1"], "argument --steps: must be at least 1"),
        (["--guidance", "nan"], "argument --guidance: must be a finite number"),
        (["--seed", "-5"], "argument --seed: must be between 0 and 2**64 - 1"),
        (["--height", "96"], "Size 96x64 (height x width) is not supported by this model"),
        (["--prompts", "{tmp}/missing.txt"], "Cannot read the prompt file"),
        (["--prompts", "{tmp}/prompts.csv"], "Unknown prompt file type '.csv'"),
        (["--prompts", "{tmp}/empty.txt"], "holds no prompts"),
        (["--model", "{tmp}/no_model"], "no such folder"),
        (["--model", "{tmp}"], "has no model_index.json"),
        (["--output_dir", "{tmp}/empty.txt"], "is a file; choose a folder"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(saved_tiny, tmp_path, options, message):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "prompts.csv").write_text("a,b")
    prompts = write_prompts(tmp_path / "p.jsonl", ["a red circle"])
    options = [option.format(tmp=tmp_path) for option in options]
    result = run_script(saved_tiny, prompts, tmp_path / "out", *options, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigkill_during_generation_then_rerun_loses_nothing_and_leaves_nothing_stale(saved_tiny, tmp_path):
    prompts = [f"prompt number {i}" for i in range(12)]
    write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--model", str(saved_tiny), "--prompts", str(tmp_path / "p.jsonl"),
               "--output_dir", str(out), *SMALL_RUN]  # fmt: skip
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not finished_prompts(out, ["00001"]):  # kill after two prompts, in the middle of the third
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    finished = finished_prompts(out, [folder.name for folder in out.iterdir()])
    assert finished and len(finished) < len(prompts)
    before = {name: data for name, data in snapshot(out).items() if name.split("/")[0] in finished}

    rerun = run_script(saved_tiny, tmp_path / "p.jsonl", out)
    assert f"{len(prompts) - len(finished)} of {len(prompts)} prompts to generate" in rerun.stdout
    assert_consistent(out, prompts)
    after = snapshot(out)
    assert all(after[name] == data for name, data in before.items())  # finished prompts kept as they were


@pytest.mark.slow
def test_interrupted_states_are_completed(saved_tiny, tmp_path):
    """The states a kill can leave, made by hand: a manifest without images beside a half-written temporary file and
    an image of the interrupted write, an empty folder. The next run completes them without --overwrite."""
    out = tmp_path / "out"
    prompts = write_prompts(tmp_path / "p.jsonl", ["a red circle", "a blue square", "a star"])
    run_script(saved_tiny, prompts, out)
    manifest = json.loads((out / "00001" / "manifest.json").read_text())
    (out / "00001" / "manifest.json").write_text(json.dumps({**manifest, "images": []}))
    (out / "00001" / ".0001.png.999999999.partial").write_bytes(b"half")
    (out / "00001" / "metadata.jsonl").unlink()
    for path in (out / "00002").iterdir():
        path.unlink()
    rerun = run_script(saved_tiny, prompts, out)
    assert "2 of 3 prompts to generate" in rerun.stdout
    assert_consistent(out, ["a red circle", "a blue square", "a star"])
