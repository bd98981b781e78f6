"""CUDA graphs with LoRA adapters, on a GPU: after every change of the adapters, the pipeline that replays CUDA graphs
must give the codes of an eager twin that went through the same changes (tiny config, fp32, where graphs and eager
agree exactly). Exits with an error if any change breaks the agreement; the rows are appended to
``OUTPUT_DIR/gpu_lora_check.jsonl``. Needs peft (``pip install -e ".[lora]"``).

    python benchmarks/gpu_lora_check.py [--output_dir bench-out]   (also part of `benchmarks/gpu_t2i.sh check`)
"""

import argparse
import tempfile

import torch
from bench_utils import add_output_argument, append_rows, rows_path
from peft import LoraConfig

from bitdance_diffusers.loaders import add_lora_adapter
from bitdance_diffusers.random_pipeline import build_random_pipeline
from bitdance_diffusers.training import LORA_TARGET_MODULES, save_lora


def tiny_pipeline():
    pipe = build_random_pipeline("tiny", block_size=16, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def codes(pipe):
    generator = torch.Generator("cuda").manual_seed(0)
    return pipe("a red circle", height=128, width=128, num_inference_steps=4, generator=generator,
                output_type="latent").images  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_argument(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this check needs a CUDA GPU (torch.cuda.is_available() is False)")
    results_path = rows_path(parser, args, "gpu_lora_check")
    with tempfile.TemporaryDirectory() as adapters:
        rows = check_adapter_changes(adapters)
    append_rows(results_path, rows, torch.device("cuda"))
    raise SystemExit(0 if all(row["graphed_equals_eager"] for row in rows) else 1)


def check_adapter_changes(adapters: str) -> list[dict]:
    """Two random LoRA adapters saved under ``adapters``, then the changes applied to a graphed and an eager pipeline;
    one row per change: are their codes equal after it."""
    lora_dirs = []
    for seed in (1, 2):
        pipe = tiny_pipeline()
        torch.manual_seed(seed)
        for name, targets in LORA_TARGET_MODULES.items():
            config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
            add_lora_adapter(getattr(pipe, name), config)
        lora_dirs.append(f"{adapters}/{seed}")
        save_lora(pipe, lora_dirs[-1])

    graphed, eager = tiny_pipeline(), tiny_pipeline()
    graphed.enable_cuda_graphs()
    changes = [
        ("load style", lambda p: p.load_lora_weights(lora_dirs[0], adapter_name="style")),
        ("scale style 0.5", lambda p: p.set_adapters("style", 0.5)),
        ("load detail", lambda p: p.load_lora_weights(lora_dirs[1], adapter_name="detail")),
        ("mix 1 and 0.7", lambda p: p.set_adapters(["style", "detail"], [1.0, 0.7])),
        ("fuse", lambda p: p.fuse_lora()),
        ("unfuse", lambda p: p.unfuse_lora()),
        ("disable", lambda p: p.disable_lora()),
        ("enable", lambda p: p.enable_lora()),
        ("unload", lambda p: p.unload_lora_weights()),
    ]
    print(f"{'after':<20}{'graphed = eager':>16}")
    rows = []
    codes(graphed)  # captured before any adapter
    for label, change in changes:
        change(graphed)
        change(eager)
        same = torch.equal(codes(graphed), codes(eager))
        rows.append({"check": "lora_cuda_graphs", "after": label, "graphed_equals_eager": same})
        print(f"{label:<20}{'yes' if same else 'NO':>16}")
    return rows


if __name__ == "__main__":
    main()
