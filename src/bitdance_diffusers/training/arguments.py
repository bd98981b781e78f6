"""Command-line flags shared by the training examples, named and defaulted as in diffusers' training scripts.

`add_data_arguments` / `add_training_arguments` add the flag groups, `load_training_images` turns the data flags into a
bucketed dataset, `training_config` the rest into a `TrainingConfig`. The examples stay short and read the same.
"""

import argparse
import os

from .checkpoints import resolve_checkpoint
from .data import (
    BucketBatchSampler,
    BucketedImageCaptions,
    bucket_sizes,
    load_hub_dataset,
    load_image_folder,
    select_columns,
)
from .trainer import TrainingConfig


# Errors of bad input that the examples report in one line (exit status 2) instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError, ImportError)


def add_data_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("data")
    group.add_argument("--train_data_dir", default=None,
                       help="folder of images with a metadata.jsonl ({'file_name', 'text'} lines, the imagefolder "
                            "layout) or a .txt caption beside each image")  # fmt: skip
    group.add_argument("--dataset_name", default=None,
                       help="dataset of the Hub (or a local dataset folder) read with datasets.load_dataset; offline "
                            "(HF_HUB_OFFLINE=1) from the datasets cache or the Hub cache")  # fmt: skip
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument("--image_column", default=None, help="default: the first image column")
    group.add_argument("--caption_column", default=None, help="default: 'text', else the first string column")
    group.add_argument("--cache_dir", default=None, help="datasets cache folder")
    group.add_argument("--max_train_samples", type=int, default=None, help="keep this many (shuffled with --seed)")
    group.add_argument("--resolution", type=int, default=None,
                       help="train on the model's image sizes of about this many pixels squared, each image in the "
                            "size nearest its aspect ratio (default: the area of the model's first size)")  # fmt: skip
    group.add_argument("--dataloader_num_workers", type=int, default=0)


def add_training_arguments(parser: argparse.ArgumentParser, learning_rate: float, lr_warmup_steps: int):
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", required=True, help="checkpoints, logs, validation images and the result")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--train_batch_size", type=int, default=1, help="per process")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--scale_lr", action="store_true",
                       help="multiply the learning rate by the global batch (batch x processes x accumulation)")
    group.add_argument("--lr_scheduler", default="constant_with_warmup",
                       help="constant, constant_with_warmup, cosine, cosine_with_restarts, linear, polynomial")
    group.add_argument("--lr_warmup_steps", type=int, default=lr_warmup_steps)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.95, help="0.95 as the original recipe")
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--adam_epsilon", type=float, default=1e-15, help="1e-15 as the original recipe")
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--mixed_precision", choices=["no", "bf16"], default=None,
                       help="default: the accelerate config's; bf16 on GPUs")
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None,
                       help="'latest' or a checkpoint folder; without it, an output_dir with checkpoints is refused")
    group.add_argument("--logging_steps", type=int, default=10, help="losses reach the host and the tracker this often")
    group.add_argument("--report_to", default="tensorboard", help="tensorboard (offline), wandb, all or none")
    group.add_argument("--logging_dir", default="logs")
    group.add_argument("--tracker_project_name", default="bitdance-fine-tune")


def add_text_to_image_arguments(parser: argparse.ArgumentParser):
    """The text-to-image objective and the validation images, shared by the full and the LoRA training scripts."""
    parser.add_argument("--text_dropout", type=float, default=0.1, help="probability of training a prompt-free row")
    parser.add_argument("--bit_flip_max", type=float, default=0.1, help="input bits flip with probability U x this")
    parser.add_argument("--validation_prompts", nargs="*", default=[])
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument("--validation_inference_steps", type=int, default=50)
    parser.add_argument("--validation_guidance_scale", type=float, default=7.5)


def launched_processes() -> int:
    """The number of processes of this launch (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_output_dir(args):
    """Refuse, before loading anything, to start a second run over the checkpoints of a first one."""
    resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)


def load_training_images(args, image_sizes: list, captions: bool = True) -> BucketedImageCaptions:
    """The images of ``--train_data_dir`` or ``--dataset_name``, bucketed over ``image_sizes`` near ``--resolution``."""
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("Pass exactly one of --train_data_dir (a local folder) and --dataset_name (a dataset).")
    if args.train_data_dir is not None:
        dataset = load_image_folder(args.train_data_dir, args.cache_dir, captions=captions)
    else:
        dataset = load_hub_dataset(args.dataset_name, args.dataset_config_name, args.cache_dir)
    dataset = select_columns(dataset, args.image_column, args.caption_column if captions else None, captions=captions)
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
    return BucketedImageCaptions(dataset, bucket_sizes(image_sizes, args.resolution))


def training_config(args, bucket_indices: list, **settings) -> TrainingConfig:
    """The `TrainingConfig` of the training flags; ``--num_train_epochs`` counted in optimizer steps over the
    images' buckets (``bucket_indices``)."""
    processes = launched_processes()
    global_batch = args.train_batch_size * processes * args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        sampler = BucketBatchSampler(bucket_indices, args.train_batch_size, processes,
                                     accumulation_steps=args.gradient_accumulation_steps)  # fmt: skip
        max_train_steps = args.num_train_epochs * sampler.num_global_batches
    if args.allow_tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    return TrainingConfig(
        output_dir=args.output_dir,
        max_train_steps=max_train_steps,
        train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate * (global_batch if args.scale_lr else 1),
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        adam_weight_decay=args.adam_weight_decay,
        max_grad_norm=args.max_grad_norm,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        logging_steps=args.logging_steps,
        report_to=None if args.report_to == "none" else args.report_to,
        logging_dir=args.logging_dir,
        tracker_project_name=args.tracker_project_name,
        dataloader_num_workers=args.dataloader_num_workers,
        **settings,
    )
