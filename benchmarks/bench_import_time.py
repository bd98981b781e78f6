"""Start-up cost of the package and of the `bitdance` command: wall time of fresh processes, and what they import.

    python benchmarks/bench_import_time.py                 # 5 runs of each command, best and median
    python benchmarks/bench_import_time.py --repeats 9 --output_dir bench-out

Each row is one command run in a new Python process (`python -c ...` or `python -m bitdance_diffusers.cli ...`, so the
console script's launcher is not counted); its columns are the best and the median wall time over the repeats, and
whether the process ended with torch, diffusers, transformers, torchao or bitsandbytes in `sys.modules`. The reference
rows (`import torch`, `import diffusers`) show the floor that any command loading a pipeline pays. The figures depend
on the machine's load: compare rows of the same run. The rows are appended to ``OUTPUT_DIR/bench_import_time.jsonl``.
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

import torch
from bench_utils import add_output_argument, append_rows, cpu_name, print_table, rows_path


HEAVY_MODULES = ("torch", "diffusers", "transformers", "torchao", "bitsandbytes")
MARKER = "heavy modules: "
REPORT_MODULES = (
    f"import sys; print({MARKER!r} + ','.join(m for m in {HEAVY_MODULES!r} if sys.modules.get(m) is not None))"
)

RUN_CLI = "from bitdance_diffusers.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"

# name -> Python code run in a fresh process; the CLI rows run `main` as the `bitdance` command does.
COMMANDS = {
    "python (empty)": "pass",
    "import torch": "import torch",
    "import diffusers": "import diffusers",
    "import bitdance_diffusers": "import bitdance_diffusers",
    "import bitdance_diffusers + DiffusionPipeline": (
        "import bitdance_diffusers\nfrom diffusers import DiffusionPipeline"
    ),
    "bitdance --help": RUN_CLI.format(argv=["--help"]),
    "bitdance generate --help": RUN_CLI.format(argv=["generate", "--help"]),
    "bitdance generate --steps 0 (its error)": RUN_CLI.format(argv=["generate", "--prompt", "x", "--steps", "0"]),
}


def run_once(code: str) -> tuple[float, str]:
    """Seconds of one fresh process running ``code``, and the heavy modules it had imported at the end."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{REPORT_MODULES}"], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - start
    (report,) = [line for line in result.stdout.splitlines() if line.startswith(MARKER)]
    return seconds, report.removeprefix(MARKER)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="Fresh processes per command (best and median kept).")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="Comma-separated names of the rows to run.")
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "bench_import_time")

    names = [name.strip() for name in args.commands.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMMANDS]
    if unknown or args.repeats < 1:
        parser.error(f"unknown command rows {unknown}" if unknown else "--repeats must be at least 1")
    rows = []
    for name in names:
        run_once(COMMANDS[name])  # warm the file cache: every row then reads the same warm files
        times, modules = [], ""
        for _ in range(args.repeats):
            seconds, modules = run_once(COMMANDS[name])
            times.append(seconds)
        rows.append({"command": name, "best_s": min(times), "median_s": statistics.median(times),
                     "heavy_modules": modules or "none"})  # fmt: skip
    versions = {name: version(name) for name in ("torch", "diffusers", "transformers")}
    libraries = ", ".join(f"{name} {number}" for name, number in versions.items())
    title = (f"Fresh-process start-up, best / median of {args.repeats} runs ({cpu_name()}, Python "
             f"{platform.python_version()}, {libraries})")  # fmt: skip
    header = ["command", "best s", "median s", "heavy modules imported"]
    print_table(title, header, [[row["command"], f"{row['best_s']:.2f}", f"{row['median_s']:.2f}", row["heavy_modules"]]
                                for row in rows])  # fmt: skip
    records = [{"benchmark": "import_time", "repeats": args.repeats, **row} for row in rows]
    append_rows(results_path, records, torch.device("cpu"))


if __name__ == "__main__":
    main()
