"""Train LoRA adapters of a BitDance text-to-image pipeline on captioned images; the base weights stay frozen.

    # CPU or one GPU
    python examples/train_text_to_image_lora.py --pretrained_model_name_or_path BitDance-14B-64x-diffusers \
        --train_data_dir my_pictures --output_dir runs/lora --rank 64 --max_train_steps 1000
    # a 24 GB card: the 14B base in bitsandbytes nf4, bf16 compute, activations recomputed
    python examples/train_text_to_image_lora.py ... --quantize nf4 --mixed_precision bf16 --gradient_checkpointing
    accelerate launch examples/train_text_to_image_lora.py ...      (data-parallel over several GPUs)

The layout and flags are those of diffusers' ``train_text_to_image_lora.py`` (data, optimisation, checkpoints and
validation flags as in ``examples/train_text_to_image.py``). Adapters of rank ``--rank`` go on every linear layer of
the language model's attention and MLP and of the head's blocks, in float32 whatever the base's dtype; ``--quantize``
stores the base's linear weights quantized (``int8wo``: torchao int8 weight-only, CPU and GPU; ``nf4``: bitsandbytes
4-bit, CUDA). The result, ``output_dir/final/pytorch_lora_weights.safetensors``, loads with
``pipe.load_lora_weights(...)`` or ``bitdance generate --lora``.
"""

import argparse
import sys

import torch
from accelerate import PartialState

from bitdance_diffusers import BitDancePipeline, pipeline_quantization_config
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from bitdance_diffusers.training import T2IObjectiveConfig, train_text_to_image
from bitdance_diffusers.training.arguments import (
    USER_ERRORS,
    add_data_arguments,
    add_text_to_image_arguments,
    add_training_arguments,
    check_output_dir,
    launched_processes,
    load_training_images,
    training_config,
)


LORA_QUANTIZATION_SCHEMES = ("int8wo", "nf4")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=str(DEMO_MODEL_PATH),
                        help="converted pipeline folder or Hub id (default: the shapes model shipped in the package)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--quantize", choices=LORA_QUANTIZATION_SCHEMES, default=None,
                        help="store the frozen base's linear weights quantized (nf4 needs CUDA)")
    add_data_arguments(parser)
    parser.add_argument("--cache_latents", action="store_true", help="encode every image once before training")
    add_training_arguments(parser, learning_rate=1e-4, lr_warmup_steps=50)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute the language model's layers and the head's blocks in the backward pass: "
                             "less memory (needed for the 14B model at 1024x1024 on a 24 GB card)")  # fmt: skip
    add_text_to_image_arguments(parser)
    return parser, parser.parse_args(argv)


def load_pipeline(args) -> BitDancePipeline:
    """The frozen base: bf16 with bf16 mixed precision (else float32), its linear weights quantized on request."""
    if args.quantize == "nf4" and not torch.cuda.is_available():
        raise ValueError("--quantize nf4 (bitsandbytes) needs a CUDA GPU; on a CPU use --quantize int8wo.")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    quantization = pipeline_quantization_config(args.quantize, compute_dtype=dtype) if args.quantize else None
    pipe = BitDancePipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                            variant=args.variant, dtype=dtype,
                                            quantization_config=quantization)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        check_output_dir(args)
        if args.quantize == "nf4" and launched_processes() > 1:
            raise ValueError("--quantize nf4 trains on one GPU per run; launch one process.")
        pipe = load_pipeline(args)
        dataset = load_training_images(args, pipe.config.image_sizes)
        config = training_config(
            args, dataset.bucket_indices, gradient_checkpointing=args.gradient_checkpointing,
            validation_prompts=args.validation_prompts, validation_steps=args.validation_steps,
            validation_kwargs={"num_inference_steps": args.validation_inference_steps,
                               "guidance_scale": args.validation_guidance_scale},
        )  # fmt: skip
    except USER_ERRORS as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    objective = T2IObjectiveConfig(bit_flip_max=args.bit_flip_max, text_dropout=args.text_dropout)
    losses = train_text_to_image(pipe, dataset, config, objective, lora_rank=args.rank,
                                 cache_latents=args.cache_latents)  # fmt: skip
    if PartialState().is_main_process:
        done = f"{len(losses)} steps, last loss {losses[-1]:.4f}" if losses else "nothing left to train"
        print(f"{done}; LoRA file in {args.output_dir}/final")


if __name__ == "__main__":
    sys.exit(main())
