"""Fine-tune a BitDance text-to-image pipeline (language model, projector and diffusion head) on captioned images.

    # CPU or one GPU
    python examples/train_text_to_image.py --pretrained_model_name_or_path BitDance-14B-64x-diffusers \
        --train_data_dir my_pictures --output_dir runs/full --resolution 1024 --max_train_steps 2000 --use_ema
    # 8 GPUs, sharded (FSDP2: parameters, gradients, optimizer and EMA states; activation checkpointing)
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml examples/train_text_to_image.py ...

The layout and flags are those of diffusers' ``train_text_to_image.py``: ``--train_data_dir`` (an imagefolder with a
``metadata.jsonl``, or a ``.txt`` caption beside each image) or ``--dataset_name`` (🤗 datasets, offline from the
local caches), ``--image_column`` / ``--caption_column``, aspect-ratio buckets over the model's ``image_sizes``
(``--resolution``), ``--lr_scheduler`` / ``--lr_warmup_steps`` (diffusers' schedules),
``--gradient_accumulation_steps``, ``--use_ema``, ``--checkpointing_steps`` / ``--checkpoints_total_limit`` /
``--resume_from_checkpoint latest``, ``--validation_prompts`` every ``--validation_steps`` (grids in
``output_dir/validation``, logged to TensorBoard).
The optimizer defaults are the original recipe's (AdamW, betas 0.9 / 0.95, epsilon 1e-15, learning rate 1e-5 after a
warm-up, gradients clipped at 1; text dropout and bit flips 0.1).

The result is a pipeline folder, ``output_dir/final`` (and ``output_dir/final-ema`` with ``--use_ema``: the EMA
weights, as the original releases are), for ``BitDancePipeline.from_pretrained``. ``--from_scratch`` initialises the
language model, projector and head afresh from their configs and trains a new generator on the model's tokenizers
(that is how ``benchmarks/RESULTS.md`` retrains the shipped shapes model with this script).
"""

import argparse
import os
import sys

import torch
from accelerate import PartialState
from diffusers.training_utils import set_seed

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from bitdance_diffusers.training import T2IObjectiveConfig, train_text_to_image
from bitdance_diffusers.training.trainer import model_from_config
from bitdance_diffusers.training.arguments import (
    USER_ERRORS,
    add_data_arguments,
    add_text_to_image_arguments,
    add_training_arguments,
    check_output_dir,
    load_training_images,
    training_config,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=str(DEMO_MODEL_PATH),
                        help="converted pipeline folder or Hub id (default: the shapes model shipped in the package)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--from_scratch", action="store_true",
                        help="re-initialise the language model, projector and head (keep the tokenizers)")
    add_data_arguments(parser)
    parser.add_argument("--cache_latents", action="store_true",
                        help="encode every image once before training (the tokenizer then leaves the training step)")
    add_training_arguments(parser, learning_rate=1e-5, lr_warmup_steps=500)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute the language model's layers and the head's blocks in the backward pass "
                             "(without FSDP; the FSDP config checkpoints activations itself)")  # fmt: skip
    parser.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights (output_dir/final-ema)")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    add_text_to_image_arguments(parser)
    return parser, parser.parse_args(argv)


def load_pipeline(args) -> BitDancePipeline:
    """The pipeline to train, its trained components in float32, or bf16 when FSDP keeps float32 masters itself."""
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    dtype = torch.bfloat16 if fsdp and mixed_precision == "bf16" else torch.float32
    pipe = BitDancePipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                            variant=args.variant, dtype=dtype)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if args.from_scratch:
        set_seed(args.seed)
        for name in ("language_model", "projector", "diffusion_head"):
            model = getattr(pipe, name)
            pipe.register_modules(**{name: model_from_config(model).to(dtype)})
    return pipe


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        check_output_dir(args)
        pipe = load_pipeline(args)
        dataset = load_training_images(args, pipe.config.image_sizes)
        config = training_config(
            args, dataset.bucket_indices, gradient_checkpointing=args.gradient_checkpointing, use_ema=args.use_ema,
            ema_decay=args.ema_decay, validation_prompts=args.validation_prompts,
            validation_steps=args.validation_steps,
            validation_kwargs={"num_inference_steps": args.validation_inference_steps,
                               "guidance_scale": args.validation_guidance_scale},
        )  # fmt: skip
    except USER_ERRORS as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    objective = T2IObjectiveConfig(bit_flip_max=args.bit_flip_max, text_dropout=args.text_dropout)
    losses = train_text_to_image(pipe, dataset, config, objective, cache_latents=args.cache_latents)
    if PartialState().is_main_process:
        done = f"{len(losses)} steps, last loss {losses[-1]:.4f}" if losses else "nothing left to train"
        print(f"{done}; pipeline in {args.output_dir}/final")


if __name__ == "__main__":
    sys.exit(main())
