"""Helpers shared by the benchmark scripts: device synchronisation, peak memory, GPU ceilings, tables, JSON rows."""

import argparse
import datetime
import json
import platform
import resource
import statistics
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Named text-to-image configs: (random_pipeline size, block size P).
T2I_CONFIGS = {"tiny": ("tiny", 16), "small": ("small", 64), "14b-16x": ("14b", 16), "14b-64x": ("14b", 64)}


def add_t2i_run_arguments(parser):
    """The text-to-image generation options every t2i benchmark takes: size, steps, guidance, batch, dtype, device."""
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process lifetime peak


def measure_gpu_ceilings(device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), medians of repeated runs."""
    source = torch.randn(2**28, device=device)  # 1 GiB
    target = torch.empty_like(source)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    def median_time(function, repeats=10):
        for _ in range(3):
            function()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(repeats):
            start.record()
            function()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return statistics.median(samples)

    bandwidth = 2 * source.numel() * source.element_size() / median_time(lambda: target.copy_(source))
    flops = 2 * 8192**3 / median_time(lambda: a @ b)
    del source, target, a, b
    torch.cuda.empty_cache()
    return bandwidth, flops


def module_bytes(module, skip: str | None = None) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if skip is None or skip not in n)


def module_matmul_params(module, skip: str | None = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if p.ndim == 2 and (skip is None or skip not in n))


def print_table(title: str, header: list[str], rows: list[list]):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def cpu_name() -> str:
    """The CPU model with the number of cores torch uses, e.g. ``"AMD EPYC 9B14 (2 threads)"``."""
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({torch.get_num_threads()} threads)"


def add_output_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--output_dir", default="bench-out",
                        help="folder for the results (created if missing): the rows are appended as JSON lines to "
                             "OUTPUT_DIR/<benchmark>.jsonl (default: bench-out/ in the current directory)")  # fmt: skip


def rows_path(parser: argparse.ArgumentParser, args: argparse.Namespace, benchmark: str) -> Path:
    """``<--output_dir>/<benchmark>.jsonl``, its folder created now: an unusable ``--output_dir`` stops the script
    before the benchmark runs, not after."""
    folder = Path(args.output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output_dir {folder}: cannot create the folder ({error.strerror}); pass a writable folder")
    return folder / f"{benchmark}.jsonl"


def library_versions() -> dict[str, str]:
    """Versions of torch and of the libraries a run's figures depend on (those installed)."""
    versions = {"torch": torch.__version__}
    for name in ("diffusers", "transformers", "torchao", "bitsandbytes", "peft"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def append_rows(path: Path, rows: list[dict], device: torch.device):
    """Append ``rows`` as JSON lines, each with the machine, the library versions and the date."""
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    with open(path, "a") as handle:
        for row in rows:
            row.update(machine=machine, **library_versions(), date=datetime.date.today().isoformat())
            handle.write(json.dumps(row) + "\n")
    print(f"rows appended to {path}")
