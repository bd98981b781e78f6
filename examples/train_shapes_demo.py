"""Train the small shapes BitDance on CPU (or GPUs with `accelerate launch`) and save the pipeline folder.

    python examples/train_shapes_demo.py --output_dir runs/shapes

The default recipe is the one of the model shipped in ``src/bitdance_diffusers/pretrained/bitdance-shapes-128``:
the binary tokenizer trains at 64x64, is fine-tuned at 128x128, then the generator trains on its codes. Interrupted
runs resume from the latest checkpoint in ``--output_dir``. The result, ``runs/shapes/pipeline``, loads with
``BitDancePipeline.from_pretrained``.
"""

import argparse

from bitdance_diffusers.training import TokenizerObjectiveConfig, TrainingConfig
from bitdance_diffusers.training.demo import DemoConfig, train_shapes_demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tokenizer_steps", type=int, default=3000, help="tokenizer steps at --tokenizer_resolution")
    parser.add_argument("--tokenizer_finetune_steps", type=int, default=800, help="then at 128x128 (0 to skip)")
    parser.add_argument("--tokenizer_batch_size", type=int, default=16)
    parser.add_argument("--tokenizer_finetune_batch_size", type=int, default=8)
    parser.add_argument("--tokenizer_learning_rate", type=float, default=2e-3)
    parser.add_argument("--tokenizer_finetune_learning_rate", type=float, default=5e-4)
    parser.add_argument("--t2i_steps", type=int, default=4000)
    parser.add_argument("--t2i_batch_size", type=int, default=16)
    parser.add_argument("--t2i_learning_rate", type=float, default=1e-3)
    parser.add_argument("--checkpoint_every", type=int, default=250)
    parser.add_argument("--tokenizer_resolution", type=int, default=64)
    parser.add_argument("--tokenizer_loss", choices=["l1", "l2"], default="l1")
    parser.add_argument("--foreground_weight", type=float, default=10.0,
                        help="reconstruction weight of the shapes' pixels against the background's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    common = dict(output_dir=args.output_dir, lr_schedule="cosine", checkpoint_every=args.checkpoint_every,
                  seed=args.seed)  # fmt: skip
    finetuning = None
    if args.tokenizer_finetune_steps:
        finetuning = TrainingConfig(max_steps=args.tokenizer_finetune_steps, batch_size=args.tokenizer_finetune_batch_size,
                                    learning_rate=args.tokenizer_finetune_learning_rate, warmup_steps=50, **common)  # fmt: skip
    train_shapes_demo(
        args.output_dir,
        TrainingConfig(max_steps=args.tokenizer_steps, batch_size=args.tokenizer_batch_size,
                       learning_rate=args.tokenizer_learning_rate, warmup_steps=100, **common),  # fmt: skip
        TrainingConfig(max_steps=args.t2i_steps, batch_size=args.t2i_batch_size, learning_rate=args.t2i_learning_rate,
                       warmup_steps=200, **common),  # fmt: skip
        DemoConfig(tokenizer_resolution=args.tokenizer_resolution),
        seed=args.seed,
        tokenizer_objective=TokenizerObjectiveConfig(reconstruction=args.tokenizer_loss,
                                                     foreground_weight=args.foreground_weight),
        tokenizer_finetuning=finetuning,
    )


if __name__ == "__main__":
    main()
