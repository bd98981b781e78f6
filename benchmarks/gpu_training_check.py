"""Training on a CUDA GPU: the measured peak of a LoRA step on a bitsandbytes nf4 base at 14B shapes, against the
fake-tensor estimate, and the shipped FSDP2 config on the GPUs there are.

    python benchmarks/gpu_training_check.py [--skip_14b] [--output_dir bench-out]

1. BitDance-14B-64x shapes with random weights (bf16, built on the GPU), language model and head quantized to nf4,
   rank-64 LoRA adapters (float32), gradient checkpointing, bf16 autocast, one 1024x1024 image per step (codes given,
   as ``--cache_latents`` trains): peak `torch.cuda.max_memory_allocated` over two AdamW steps, for the row of
   `estimate_training_memory.py --lora_rank 64 --quantize nf4 --gradient_checkpointing` (target: <= 22 GB).
2. `examples/train_text_to_image.py` on a tiny random pipeline under ``accelerate launch`` with
   `examples/accelerate_configs/fsdp2.yaml` (bf16, one process per GPU): it must finish and save both pipelines.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_utils import add_output_argument, append_rows, rows_path
from PIL import Image

from bitdance_diffusers import quantize_model_
from bitdance_diffusers.random_pipeline import build_random_pipeline
from bitdance_diffusers.training import T2IObjectiveConfig, add_trainable_lora
from bitdance_diffusers.training.randomness import sample_generators
from bitdance_diffusers.training.trainer import T2ITrainingModule, enable_gradient_checkpointing


REPO = Path(__file__).resolve().parents[1]


def lora_nf4_peak(rank: int = 64, size: int = 1024) -> float:
    """GiB allocated at the peak of two LoRA steps on an nf4 base at 14B shapes."""
    pipe = build_random_pipeline("14b", block_size=64, image_sizes=[[size, size]], dtype=torch.bfloat16, device="cuda")
    pipe.vae.to("cpu")  # the codes are cached before training
    for name in ("language_model", "diffusion_head"):
        quantize_model_(getattr(pipe, name), "nf4")
    torch.cuda.empty_cache()
    add_trainable_lora(pipe, rank)
    enable_gradient_checkpointing(pipe)
    module = T2ITrainingModule(pipe, T2IObjectiveConfig()).train()
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.95), eps=1e-15)
    codes = torch.where(torch.rand(1, 32, size // 16, size // 16, device="cuda") > 0.5, 1.0, -1.0)
    torch.cuda.reset_peak_memory_stats()
    for step in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = module({"codes": codes, "caption": ["a red fox in the snow"]},
                             sample_generators(0, step, 0, 1, "cuda"))  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def fsdp_example_runs() -> bool:
    """The FSDP2 example on a tiny pipeline over every GPU; True when it finished and saved both pipelines."""
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        build_random_pipeline("tiny", block_size=16, image_sizes=[[128, 128]]).save_pretrained(root / "model")
        (root / "images").mkdir()
        for index in range(8):
            pixels = np.random.default_rng(index).integers(0, 256, (128, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{index}.png")
            (root / "images" / f"{index}.txt").write_text(f"picture {index}")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "examples" / "accelerate_configs" / "fsdp2.yaml"), "--num_processes",
                   str(torch.cuda.device_count()), str(REPO / "examples" / "train_text_to_image.py"),
                   "--pretrained_model_name_or_path", str(root / "model"), "--train_data_dir", str(root / "images"),
                   "--train_batch_size", "1", "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema",
                   "--report_to", "none", "--output_dir", str(root / "run")]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        print(result.stdout[-1000:], result.stderr[-3000:] if result.returncode else "")
        return result.returncode == 0 and all((root / "run" / name / "model_index.json").is_file()
                                              for name in ("final", "final-ema"))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip_14b", action="store_true", help="only the FSDP example")
    add_output_argument(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this check needs a CUDA GPU (torch.cuda.is_available() is False)")
    results_path = rows_path(parser, args, "gpu_training_check")
    row = {"benchmark": "gpu_training_check", "gpus": torch.cuda.device_count()}
    if not args.skip_14b:
        row["lora_rank64_nf4_checkpointing_peak_gib"] = lora_nf4_peak()
        print(f"LoRA rank 64, nf4 base, gradient checkpointing, 14B-64x shapes, 1024x1024: peak "
              f"{row['lora_rank64_nf4_checkpointing_peak_gib']:.2f} GiB allocated")  # fmt: skip
    row["fsdp_example_ok"] = fsdp_example_runs()
    print(f"FSDP2 example over {row['gpus']} GPU(s): {'ok' if row['fsdp_example_ok'] else 'FAILED'}")
    append_rows(results_path, [row], torch.device("cuda"))
    return 0 if row["fsdp_example_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
