"""The benchmarks run end to end on a tiny model and print their complete tables (no timing is asserted); they write
only into their --output_dir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitdance_diffusers.random_pipeline import build_random_pipeline
from cuda_graph_stub import eager_graphs  # noqa: F401 (fixture)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROFILING = BENCHMARKS / "profiling"


def benchmark_output(script: str, output_dir: Path, *options: str) -> str:
    """The standard output of ``benchmarks/<script> <options> --output_dir <output_dir>``, which must exit
    successfully."""
    command = [sys.executable, str(BENCHMARKS / script), *options, "--output_dir", str(output_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_t2i_benchmark_prints_complete_tables(tmp_path):
    output = benchmark_output(
        "bench_t2i.py", tmp_path, "--config", "tiny", "--height", "128", "--width", "128", "--steps", "2", "--scaling",
        "--batches", "1,2",
    )
    results = tmp_path / "bench_t2i.jsonl"
    for part in ("total", "prefill", "llm_step", "head", "decode", "overhead (rest)", "per-block time", "scaling"):
        assert part in output, part
    row = json.loads(results.read_text().splitlines()[0])
    assert row["floor_s"] > 0 and row["total_s"] > 0 and set(row["parts_s"]) == {"prefill", "llm_step", "head", "decode"}
    assert [entry["vary"] for entry in row["scaling"]][:4] == ["head steps", "head steps", "batch", "batch"]
    assert row["machine"] and row["torch"] == torch.__version__ and row["diffusers"] and row["transformers"]


def test_a_benchmark_writes_into_its_output_dir_and_nowhere_else(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    script = [sys.executable, str(BENCHMARKS / "estimate_memory.py"), "--config", "tiny", "--height", "128", "--width",
              "128"]  # fmt: skip
    run = subprocess.run(script + ["--output_dir", str(tmp_path / "x")], cwd=cwd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(cwd.iterdir()) == [] and [p.name for p in (tmp_path / "x").iterdir()] == ["estimate_memory.jsonl"]
    assert f"rows appended to {tmp_path / 'x' / 'estimate_memory.jsonl'}" in run.stdout
    # Without --output_dir: bench-out/ in the current directory.
    run = subprocess.run(script, cwd=cwd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    written = [path.relative_to(cwd).as_posix() for path in sorted(cwd.rglob("*"))]
    assert written == ["bench-out", "bench-out/estimate_memory.jsonl"]
    # An --output_dir that cannot be a folder stops the script at once, with the option named.
    (cwd / "a_file").write_text("mine")
    run = subprocess.run(script + ["--output_dir", "a_file/x"], cwd=cwd, capture_output=True, text=True)
    assert run.returncode == 2 and "--output_dir a_file/x: cannot create the folder" in run.stderr
    assert (cwd / "a_file").read_text() == "mine"


def test_gpu_scripts_refuse_without_cuda_and_check_their_arguments(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a machine that has one
    for script in ("gpu_t2i.sh", "gpu_memory_modes.sh"):
        run = subprocess.run(["bash", str(BENCHMARKS / script), "--output_dir", "out"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 1 and "this script needs a CUDA GPU and PyTorch sees none" in run.stderr, run.stderr
        run = subprocess.run(["bash", str(BENCHMARKS / script), "no-such-part"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 2 and "unknown part 'no-such-part'" in run.stderr
        assert run.stderr.startswith(f"Usage: benchmarks/{script} [--output_dir DIR] [PART ...]")
    assert list(tmp_path.iterdir()) == []  # refused before creating the output folder


def test_cuda_graphs_refuse_cpu_tensors():
    pipe = build_random_pipeline("tiny")
    pipe.enable_cuda_graphs()
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors.*pipe.disable_cuda_graphs"):
        pipe("a red circle", height=128, width=128, num_inference_steps=1, output_type="latent")
    pipe.disable_cuda_graphs()
    assert pipe("a red circle", height=128, width=128, num_inference_steps=1, output_type="latent").images.shape[0] == 1


def test_quantization_benchmark_prints_its_table(tmp_path):
    output = benchmark_output(
        "bench_quantization.py", tmp_path, "--config", "tiny", "--height", "128", "--width", "128", "--steps", "2",
        "--schemes", "int8wo",
    )
    results = tmp_path / "bench_quantization.jsonl"
    for part in ("weights GiB", "tokens equal", "PSNR dB", "int8wo"):
        assert part in output, part
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["scheme"] for row in rows] == ["none", "int8wo"]
    assert rows[0]["token_agreement"] == 1.0 and 0 < rows[1]["token_agreement"] <= 1.0
    # int8 weights with one scale per row: about half the bytes of the float32 linear weights, plus the norms.
    assert rows[1]["weights_gib"] < 0.5 * rows[0]["weights_gib"]


def test_imagenet_benchmark_prints_its_table(tmp_path):
    output = benchmark_output(
        "bench_imagenet.py", tmp_path, "--size", "tiny", "--block_size", "4", "--sample_size", "4", "--batch", "2",
        "--steps", "2", "--batches", "1,2",
    )
    results = tmp_path / "bench_imagenet.jsonl"
    for part in ("total", "backbone", "head", "decode", "rest", "images/s against batch size"):
        assert part in output, part
    row = json.loads(results.read_text())
    assert row["images_per_s"] > 0 and [entry["batch"] for entry in row["scaling"]] == [1, 2]


def test_imagenet_component_timer_times_graph_replays(eager_graphs):
    sys.path.insert(0, str(BENCHMARKS))
    from bench_imagenet import ComponentTimer

    from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline

    pipe = build_random_imagenet_pipeline("tiny", block_size=4, sample_size=4)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_cuda_graphs()  # replays that bypass the head's forward (captures stubbed, see cuda_graph_stub)
    with ComponentTimer(pipe, torch.device("cpu")) as timer:
        pipe([1, 2], num_inference_steps=2, output_type="latent")
    # 4 blocks of 4 tokens at 64x64, each 2 + 1 head calls on both labels and both guidance branches.
    assert len(timer.times["head"]) == 4 * 3 and timer.head_tokens == 2 * 2 * 4 and len(eager_graphs) == 1
    assert len(timer.times["backbone"]) == 4  # the prefill and the steps of blocks 0..2


def test_live_storage_counter_counts_what_is_alive():
    sys.path.insert(0, str(BENCHMARKS))
    from estimate_memory import LiveStorageCounter
    from torch._subclasses.fake_tensor import FakeTensorMode

    mebibyte = 2**20
    with FakeTensorMode():
        weight = torch.empty(256, 1024)  # 1 MiB that exists before counting
        counter = LiveStorageCounter([weight])
        with counter:
            a = torch.empty(1024, 1024)  # 4 MiB
            b = a * 2
            del a
            c = b + 1
            transposed = weight.t()  # a view of the weight: nothing new
    assert counter.peaks["prefill"] == 8 * mebibyte and counter.live_bytes == 8 * mebibyte
    assert transposed.shape == (1024, 256) and c.shape == b.shape


def test_memory_estimate_prints_every_phase(tmp_path):
    output = benchmark_output(
        "estimate_memory.py", tmp_path, "--config", "tiny", "--height", "128", "--width", "128", "--quantize", "nf4"
    )
    results = tmp_path / "estimate_memory.jsonl"
    for part in ("weights: language model", "peak beyond weights: block loop", "decode", "whole run"):
        assert part in output, part
    row = json.loads(results.read_text())
    phases = row["beyond_weights_gib"]
    assert set(phases) == {"prefill", "block loop", "decode"}
    assert row["peak_gib"] == pytest.approx(row["weights_gib"] + max(phases.values()))
    # The decoder's output alone: one 128x128 RGB image in bf16.
    assert phases["decode"] * 2**30 >= 3 * 128 * 128 * 2


def test_traffic_counter_counts_bytes_moved_per_op():
    sys.path.insert(0, str(PROFILING))
    from count_traffic import TrafficCounter
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        weight = torch.empty(64, 32)  # 8 KiB of float32 weights
        cache = torch.zeros(4, 100)
        counter = TrafficCounter([weight])
        counter.phase = "step"
        with counter:
            x = torch.empty(8, 32)  # counted: an op writing 1 KiB
            y = x @ weight.t()  # reads the weight (8 KiB) and x (1 KiB), writes 2 KiB; the transpose is a view
            z = y[:, None].expand(8, 4, 64) * torch.ones(1)  # the broadcast input counts once: reads 2 KiB + 4 B
            cache.index_copy_(1, torch.tensor([3]), torch.ones(4, 1))  # in place: writes what it reads, not the cache
    ops = counter.bytes["step"]
    assert ops["mm"] == [8192, 1024, 2048, 1]
    assert ops["mul"] == [0, 2048 + 4, 8 * 4 * 64 * 4, 1]
    assert ops["index_copy_"] == [0, 8 + 16, 8 + 16, 1]
    assert z.shape == (8, 4, 64)


def test_traffic_count_prints_both_parts(tmp_path):
    output = benchmark_output("profiling/count_traffic.py", tmp_path, "--config", "tiny", "--height", "128", "--width",
                              "128")  # fmt: skip
    for part in ("head call", "language-model block step", "where the non-weight bytes go", "mm"):
        assert part in output, part
    rows = [json.loads(line) for line in (tmp_path / "count_traffic.jsonl").read_text().splitlines()]
    assert {row["part"] for row in rows} == {"head call", "language-model block step"}
    assert all(row["weights_gb"] > 0 and row["ops_per_call"] > 0 for row in rows)


def test_shapes_quality_benchmark_with_a_swapped_sampler_and_quantization(tmp_path):
    output = benchmark_output(
        "bench_shapes_quality.py", tmp_path, "--num_prompts", "2", "--batch_size", "2", "--steps", "3", "--scheduler",
        "flow-heun", "--quantize", "int8wo",
    )
    results = tmp_path / "bench_shapes_quality.jsonl"
    assert "flow-heun, 3 steps" in output and "language model and head int8wo" in output
    row = json.loads(results.read_text())
    assert row["scheduler"] == "flow-heun" and row["quantize"] == "int8wo" and row["prompts"] == 2
    assert all(0 <= row[metric] <= 1 for metric in ("color", "position", "background", "shape"))


def test_lora_concept_benchmark_prints_before_and_after(tmp_path):
    output = benchmark_output(
        "bench_lora_concept.py", tmp_path, "--steps", "2", "--num_train", "4", "--num_regular", "4", "--num_prompts",
        "2", "--inference_steps", "1",
    )
    results = tmp_path / "bench_lora_concept.jsonl"
    assert "LoRA rank 8, 2 steps x 8 (4 scenes of 'crimson' = red, 4 ordinary)" in output  # batch <= the 8 scenes
    assert "'crimson' drawn red" in output and "ordinary prompts: shape" in output
    row = json.loads(results.read_text())
    assert set(row["before"]) == set(row["after"]) == {"new_word_color", "color", "position", "background", "shape"}


def test_gemm_profile_times_every_product_of_a_head_call_and_a_block_step(tmp_path):
    output = benchmark_output(
        "profiling/profile_gemms.py", tmp_path, "--config", "tiny", "--height", "128", "--width", "128", "--dtype",
        "fp32", "--bandwidth", "0.02", "--calls", "2",
    )
    results = tmp_path / "profile_gemms.jsonl"
    assert "per call: products in milliseconds" in output
    gemms = json.loads(results.read_text())["gemms"]
    per_call = {part: sum(g["per_call"] for g in gemms if g["part"] == part) for part in {g["part"] for g in gemms}}
    # Tiny: 2 language-model layers of 7 projections; the head's 16 = input, 2 time, condition, 2 blocks x 4,
    # 2 adaLN projections, final modulation and output.
    assert per_call == {"language-model block step": 14, "head call": 16}
    # Both guidance branches of one 16-token block go through every token-wise product.
    assert {g["rows"] for g in gemms if g["part"] == "language-model block step"} == {32}
    for gemm in gemms:
        assert gemm["floor_us"] > 0 and gemm["linear us"] > 0 and gemm["int8 weights us"] > 0
        assert gemm["linear error"] < 1e-5 and gemm.get("split-K 2 error", 0) < 1e-5
        # One scale per output row: int8 keeps about 2 decimal digits of each weight, e4m3 about 1.
        assert 1e-4 < gemm["int8 weights error"] < 1e-2 and 1e-3 < gemm["fp8 weights error"] < 5e-2


def test_kernel_profile_attributes_work_to_every_profiled_call(tmp_path):
    output = benchmark_output(
        "profiling/profile_kernels.py", tmp_path, "--config", "tiny", "--height", "128", "--width", "128", "--steps",
        "2", "--blocks", "2",
    )
    summary = output.split("with the most time")[0]
    rows = {line.split()[0]: line.split() for line in summary.splitlines() if line.startswith(("head", "language"))}
    # Two profiled blocks: their 2 x (2 + 1) head calls and the 2 block steps that feed them.
    assert rows["head"][2] == "6" and rows["language-model"][3] == "2", output
    head_matmul_ms = float(rows["head"][5])  # the head's 16 linears per call
    assert head_matmul_ms > 0 and "aten::addmm" in output
    head_row = json.loads((tmp_path / "profile_kernels.jsonl").read_text().splitlines()[0])
    assert head_row["part"] == "head call" and head_row["calls"] == 6
    assert head_row["matmul_ms_per_call"] == pytest.approx(head_matmul_ms, abs=1e-3)


def test_t2i_benchmark_fails_below_the_required_psnr(tmp_path):
    run = [sys.executable, str(BENCHMARKS / "bench_t2i.py"), "--config", "tiny", "--height", "128", "--width", "128"]
    run += ["--output_dir", str(tmp_path)]
    reference, results = tmp_path / "reference.pt", tmp_path / "bench_t2i.jsonl"
    subprocess.run(run + ["--steps", "2", "--save_images", str(reference)], capture_output=True, check=True)
    same = subprocess.run(run + ["--steps", "2", "--compare_to", str(reference), "--min_psnr", "60"],
                          capture_output=True, text=True)  # fmt: skip
    assert same.returncode == 0 and "PSNR" in same.stdout
    results.unlink()
    other = subprocess.run(run + ["--steps", "3", "--compare_to", str(reference), "--min_psnr", "60"],
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode != 0 and "below --min_psnr 60" in other.stderr
    assert json.loads(results.read_text())["psnr_db"] < 60  # the row is written before the error
