"""The training examples end to end: a folder of pictures in several aspect ratios, LoRA and full fine-tuning with EMA,
validation and TensorBoard, the tokenizer; a SIGKILL while a checkpoint is saved; FSDP2 over two CPU processes."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bitdance_diffusers import BitDancePipeline, BitDanceTokenizer
from bitdance_diffusers.random_pipeline import build_random_pipeline
from conftest import REPO


EXAMPLES = REPO / "examples"
# Two aspect ratios; P = 16 blocks are 64x64 pixels, and both sizes have the same area (one bucket class).
IMAGE_SIZES = [[64, 128], [128, 64]]


@pytest.fixture(scope="module")
def model_and_pictures(tmp_path_factory):
    """A tiny random pipeline saved to a folder, and 8 captioned pictures, landscape and portrait."""
    root = tmp_path_factory.mktemp("training_scripts")
    build_random_pipeline("tiny", block_size=16, image_sizes=IMAGE_SIZES).save_pretrained(root / "model")
    pictures = root / "pictures"
    pictures.mkdir()
    for index in range(8):
        shape = (70, 130, 3) if index % 2 else (130, 60, 3)
        pixels = np.random.default_rng(index).integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(pictures / f"{index}.png")
        (pictures / f"{index}.txt").write_text(f"picture number {index}")
    return root / "model", pictures


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, *arguments, check=True):
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, arguments)], capture_output=True,
                            text=True)  # fmt: skip
    if check and result.returncode:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def logged_losses(output_dir) -> dict:
    """``{step: train_loss}`` from the TensorBoard event files of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted((output_dir / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train_loss" in accumulator.Tags()["scalars"]:
            losses.update({event.step: event.value for event in accumulator.Scalars("train_loss")})
    return losses


def test_lora_script_trains_on_a_folder_resumes_and_refuses_bad_input(tmp_path, model_and_pictures, capsys):
    model, pictures = model_and_pictures
    common = ["--pretrained_model_name_or_path", model, "--train_data_dir", pictures, "--output_dir", tmp_path / "run",
              "--rank", "2", "--train_batch_size", "2", "--max_train_steps", "2", "--lr_warmup_steps", "1",
              "--checkpointing_steps", "1", "--gradient_checkpointing", "--report_to", "none"]  # fmt: skip
    assert "2 steps" in run_example("train_text_to_image_lora", *common).stdout  # as a command
    loaded = BitDancePipeline.from_pretrained(model)
    loaded.load_lora_weights(tmp_path / "run" / "final")
    assert loaded.get_list_adapters() == {"language_model": ["default_0"], "diffusion_head": ["default_0"]}

    script = load_example("train_text_to_image_lora")
    script.main([*map(str, common), "--resume_from_checkpoint", "latest"])
    assert "nothing left to train" in capsys.readouterr().out
    for extra, message in ((["--output_dir", tmp_path / "a", "--resolution", "300"],
                            "No image size of the model has about 300x300 pixels"),
                           ([], "already holds checkpoints of a run"),
                           (["--output_dir", tmp_path / "b", "--train_data_dir", tmp_path / "nowhere"],
                            "nowhere does not exist")):  # fmt: skip
        with pytest.raises(SystemExit) as refused:
            script.main([*map(str, common), *map(str, extra)])
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_full_fine_tuning_script_saves_ema_weights_validation_images_and_tensorboard_logs(tmp_path, model_and_pictures):
    model, pictures = model_and_pictures
    output_dir = tmp_path / "run"
    load_example("train_text_to_image").main([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(pictures), "--output_dir", str(output_dir),
        "--train_batch_size", "2", "--max_train_steps", "2", "--lr_warmup_steps", "1", "--learning_rate", "1e-3",
        "--use_ema", "--ema_decay", "0.5", "--cache_latents", "--logging_steps", "1",
        "--validation_prompts", "a red square", "a blue square", "--validation_steps", "2",
        "--validation_inference_steps", "2",
    ])  # fmt: skip
    trained, ema = (BitDancePipeline.from_pretrained(output_dir / name) for name in ("final", "final-ema"))
    assert not torch.equal(trained.diffusion_head.final_layer.linear.weight, ema.diffusion_head.final_layer.linear.weight)
    image = ema("a red square", height=128, width=64, num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 128, 64)
    assert Image.open(output_dir / "validation" / "step-2.png").size == (2 * 128, 64)  # two 64x128 images side by side
    assert sorted(logged_losses(output_dir)) == [1, 2]


def test_tokenizer_script_trains_on_uncaptioned_images(tmp_path, model_and_pictures):
    model, pictures = model_and_pictures
    uncaptioned = tmp_path / "images"
    uncaptioned.mkdir()
    for picture in pictures.glob("*.png"):
        (uncaptioned / picture.name).write_bytes(picture.read_bytes())
    load_example("train_tokenizer").main([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(uncaptioned), "--resolution", "64",
        "--output_dir", str(tmp_path / "run"), "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none",
        "--use_ema",
    ])  # fmt: skip
    reference = BitDanceTokenizer.from_pretrained(model, subfolder="vae")
    for name in ("final", "final-ema"):
        trained = BitDanceTokenizer.from_pretrained(tmp_path / "run" / name)
        assert {key: value for key, value in trained.config.items() if not key.startswith("_")} == {
            key: value for key, value in reference.config.items() if not key.startswith("_")}  # fmt: skip
        assert not torch.equal(trained.decoder.conv_out.weight, reference.decoder.conv_out.weight)


KILL_DURING_SAVE = """
import os, signal, sys
import bitdance_diffusers.training.trainer as trainer
save_ema = trainer.save_ema
def save_then_die(shadow, folder):
    save_ema(shadow, folder)
    if folder.parent.name == ".checkpoint-3.partial":  # weights, optimizer and EMA written; the state file not yet
        os.kill(os.getpid(), signal.SIGKILL)
trainer.save_ema = save_then_die
sys.argv = sys.argv[1:]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], "exec"), {"__name__": "__main__"})
"""


def test_sigkill_while_saving_a_checkpoint_loses_nothing(tmp_path, model_and_pictures):
    """Killed while checkpoint-3 is being written, the run leaves checkpoint-1 and -2 whole and no checkpoint-3; the
    re-run removes the staging folder, resumes from checkpoint-2 and ends with the uninterrupted run's weights. What is
    not ours (checkpoint-best, an incomplete checkpoint-99 as older trainers wrote in place) is never picked nor
    touched."""
    model, pictures = model_and_pictures
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-best").mkdir(parents=True)
    (output_dir / "checkpoint-best" / "notes.txt").write_text("mine")
    (output_dir / "checkpoint-99").mkdir()
    arguments = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(pictures),
                 "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "1",
                 "--lr_warmup_steps", "1", "--learning_rate", "1e-3", "--use_ema", "--report_to", "none",
                 "--resume_from_checkpoint", "latest"]  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(EXAMPLES / "train_text_to_image.py"),
                             *arguments, "--output_dir", str(output_dir)], capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(path.name for path in output_dir.iterdir()) == [".checkpoint-3.partial", "checkpoint-1",
                                                                   "checkpoint-2", "checkpoint-99", "checkpoint-best"]

    rerun = run_example("train_text_to_image", *arguments, "--output_dir", output_dir)
    assert "4 steps" not in rerun.stdout and "2 steps" in rerun.stdout  # resumed at step 2
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                                   "checkpoint-4", "checkpoint-99", "checkpoint-best",
                                                                   "final", "final-ema"]  # fmt: skip
    assert (output_dir / "checkpoint-best" / "notes.txt").read_text() == "mine"
    assert not any((output_dir / "checkpoint-99").iterdir())

    load_example("train_text_to_image").main([*arguments, "--output_dir", str(tmp_path / "uninterrupted")])
    for name in ("final", "final-ema"):
        for component in ("language_model/model.safetensors", "diffusion_head/diffusion_pytorch_model.safetensors"):
            resumed, whole = (load_file(folder / name / component) for folder in (output_dir, tmp_path / "uninterrupted"))
            assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole), component


@pytest.mark.slow
def test_fsdp2_over_two_cpu_processes_matches_one_process_and_resumes_exactly(tmp_path, model_and_pictures):
    """The shipped FSDP2 config on two gloo processes of batch 1: the losses of one process of batch 2 (same global
    batches, same per-sample draws) within float tolerance; sharded checkpoints; resuming one continues exactly."""
    model, pictures = model_and_pictures
    arguments = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(pictures),
                 "--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_warmup_steps", "1", "--learning_rate",
                 "1e-3", "--use_ema", "--logging_steps", "1", "--validation_prompts", "a red square",
                 "--validation_steps", "4", "--validation_inference_steps", "2"]  # fmt: skip

    def launch(output_dir, *extra):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(EXAMPLES / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision",
                   "no", "--main_process_port", str(29500 + os.getpid() % 1000), str(EXAMPLES / "train_text_to_image.py"),
                   *arguments, "--train_batch_size", "1", "--output_dir", str(output_dir), *extra]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    launch(tmp_path / "fsdp")
    load_example("train_text_to_image").main([*arguments, "--train_batch_size", "2", "--output_dir",
                                              str(tmp_path / "single")])  # fmt: skip
    fsdp, single = logged_losses(tmp_path / "fsdp"), logged_losses(tmp_path / "single")
    assert sorted(fsdp) == [1, 2, 3, 4] and fsdp == pytest.approx(single, rel=1e-4)
    shards = sorted(path.name for path in (tmp_path / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each process wrote its shard
    assert json.loads((tmp_path / "fsdp" / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2
    assert (tmp_path / "fsdp" / "validation" / "step-4.png").is_file()

    launch(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "fsdp" / "checkpoint-2"))
    resumed = logged_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and all(resumed[step] == fsdp[step] for step in (3, 4))
    for name in ("final", "final-ema"):
        whole, again = (BitDancePipeline.from_pretrained(tmp_path / run / name) for run in ("fsdp", "resumed"))
        for (key, tensor), other in zip(whole.diffusion_head.state_dict().items(), again.diffusion_head.state_dict().values()):
            assert torch.equal(tensor, other), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("setting", [["--num_gpus", "2", "--use_ema"],
                                     ["--lora_rank", "4", "--quantize", "nf4", "--gradient_checkpointing"]],
                         ids=["fsdp", "lora-nf4"])  # fmt: skip
def test_training_memory_estimate_prints_its_table(tmp_path, setting):
    rows = tmp_path / "estimate_training_memory.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "estimate_training_memory.py"), "--config",
                             "tiny", "--height", "64", "--width", "64", *setting, "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO / "benchmarks")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(rows.read_text())
    kinds = {kind.lower(): size for kind, size in row["by_kind_gib"].items()}
    assert row["peak_gib"] > 0 and kinds["activation"] > 0 and kinds["optstate"] > 0
    assert ("sharded param" in kinds) == (setting[0] == "--num_gpus")  # FSDP2 counts shards; one GPU, parameters
    assert "peak of a training step per GPU" in result.stdout
