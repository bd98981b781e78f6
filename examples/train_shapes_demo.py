"""Train the small shapes BitDance on CPU (or GPUs with `accelerate launch`) and save the pipeline folder.

    python examples/train_shapes_demo.py --output_dir runs/shapes

The default recipe is the one of the model shipped in ``src/bitdance_diffusers/pretrained/bitdance-shapes-128``:
the binary tokenizer trains at 64x64 and is fine-tuned at 128x128, its decoder alone is then fine-tuned to draw
sharper outlines from the fixed codes, first with an outline loss, then against a patch discriminator, and the
generator trains on those codes. Interrupted runs resume from the latest checkpoint in ``--output_dir``. The result,
``runs/shapes/pipeline``, loads with ``BitDancePipeline.from_pretrained``.
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
    parser.add_argument("--decoder_finetune_steps", type=int, default=1500,
                        help="then the decoder alone, at 128x128, on the fixed codes (0 to skip)")
    parser.add_argument("--decoder_finetune_learning_rate", type=float, default=3e-4)
    parser.add_argument("--edge_weight", type=float, default=1.0, help="weight of the decoder stage's outline loss")
    parser.add_argument("--adversarial_steps", type=int, default=400,
                        help="then the decoder alone against a patch discriminator (0 to skip)")
    parser.add_argument("--adversarial_learning_rate", type=float, default=1e-4)
    parser.add_argument("--gan_weight", type=float, default=0.1)
    parser.add_argument("--t2i_steps", type=int, default=8000)
    parser.add_argument("--t2i_batch_size", type=int, default=16)
    parser.add_argument("--t2i_learning_rate", type=float, default=1e-3)
    parser.add_argument("--checkpoint_every", type=int, default=250)
    parser.add_argument("--tokenizer_resolution", type=int, default=64)
    parser.add_argument("--tokenizer_loss", choices=["l1", "l2"], default="l1")
    parser.add_argument("--foreground_weight", type=float, default=10.0,
                        help="reconstruction weight of the shapes' pixels against the background's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tokenizer_steps <= 0 or args.t2i_steps <= 0:
        parser.error("--tokenizer_steps and --t2i_steps must be positive: the tokenizer and the generator must train.")

    def stage(steps, batch_size, learning_rate, warmup_steps):
        """One training stage of the recipe; ``None`` when it has no steps."""
        if not steps:
            return None
        return TrainingConfig(output_dir=args.output_dir, max_train_steps=steps, train_batch_size=batch_size,
                              learning_rate=learning_rate, lr_warmup_steps=warmup_steps, lr_scheduler="cosine",
                              adam_epsilon=1e-8, checkpointing_steps=args.checkpoint_every, seed=args.seed)  # fmt: skip

    objective = dict(reconstruction=args.tokenizer_loss, foreground_weight=args.foreground_weight)
    train_shapes_demo(
        args.output_dir,
        stage(args.tokenizer_steps, args.tokenizer_batch_size, args.tokenizer_learning_rate, 100),
        stage(args.t2i_steps, args.t2i_batch_size, args.t2i_learning_rate, 200),
        DemoConfig(tokenizer_resolution=args.tokenizer_resolution),
        seed=args.seed,
        tokenizer_objective=TokenizerObjectiveConfig(**objective),
        tokenizer_finetuning=stage(args.tokenizer_finetune_steps, args.tokenizer_finetune_batch_size,
                                   args.tokenizer_finetune_learning_rate, 50),  # fmt: skip
        decoder_finetuning=stage(args.decoder_finetune_steps, args.tokenizer_finetune_batch_size,
                                 args.decoder_finetune_learning_rate, 50),  # fmt: skip
        decoder_objective=TokenizerObjectiveConfig(**objective, edge_weight=args.edge_weight, decoder_only=True),
        adversarial_finetuning=stage(args.adversarial_steps, args.tokenizer_finetune_batch_size,
                                     args.adversarial_learning_rate, 50),  # fmt: skip
        adversarial_objective=TokenizerObjectiveConfig(**objective, edge_weight=args.edge_weight, decoder_only=True,
                                                       gan_weight=args.gan_weight),  # fmt: skip
    )


if __name__ == "__main__":
    main()
