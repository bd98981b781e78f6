"""Fine-tune LoRA adapters of a BitDance text-to-image pipeline on a folder of captioned images.

    python examples/train_lora.py --model BitDance-14B-64x-diffusers --data_dir my_pictures --output_dir runs/lora \
        --height 1024 --width 1024 --rank 16 --steps 1000 --learning_rate 1e-4 --mixed_precision bf16 \
        --gradient_checkpointing
    accelerate launch examples/train_lora.py ...     (data-parallel over several GPUs)

The folder holds the images with either a metadata.jsonl ({"file_name": ..., "text": ...} per line) or a .txt
caption beside each image. Adapters go on the language model's and the head's linear layers, the base weights stay
frozen; they are saved to <output_dir>/final as a diffusers LoRA file for `pipe.load_lora_weights(...)` or
`bitdance generate --lora`. An interrupted run resumes from its latest checkpoint in --output_dir. Without --model the
shapes model shipped with the package (128x128) is fine-tuned.
"""

import argparse

import torch
from accelerate import PartialState

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from bitdance_diffusers.training import ImageCaptionFolder, TrainingConfig, train_text_to_image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL_PATH), help="converted pipeline folder or Hub id")
    parser.add_argument("--data_dir", required=True, help="folder of images with their captions")
    parser.add_argument("--output_dir", required=True, help="checkpoints and, in final/, the LoRA file")
    parser.add_argument("--height", type=int, default=None, help="training size (default: the model's first size)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=1, help="images per step and process")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--checkpoint_every", type=int, default=250)
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                        help="bf16 autocast on GPUs; the model then loads in bf16 and the adapters train in fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory (needed for the 14B model at "
                             "1024x1024 on one GPU), about a third more compute")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    pipe = BitDancePipeline.from_pretrained(args.model, dtype=dtype).to(PartialState().device)
    height, width = args.height, args.width
    if height is None and width is None:
        height, width = pipe.config.image_sizes[0]
    height, width = height or width, width or height
    if [height, width] not in pipe.config.image_sizes:
        parser.error(f"{height}x{width} is not a size of this model; choose one of {pipe.config.image_sizes}.")

    dataset = ImageCaptionFolder(args.data_dir, height, width)
    config = TrainingConfig(output_dir=args.output_dir, max_steps=args.steps, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                            checkpoint_every=args.checkpoint_every, seed=args.seed,
                            mixed_precision=args.mixed_precision,
                            gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
    losses = train_text_to_image(pipe, dataset, config, lora_rank=args.rank)
    print(f"{len(losses)} steps, last loss {losses[-1]:.4f}; LoRA file in {args.output_dir}/final" if losses else
          f"nothing left to train; LoRA file in {args.output_dir}/final")  # fmt: skip


if __name__ == "__main__":
    main()
