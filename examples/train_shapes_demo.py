"""Train the small shapes BitDance on CPU (or GPUs with `accelerate launch`) and save the pipeline folder.

    python examples/train_shapes_demo.py --output_dir runs/shapes --tokenizer_steps 3000 --t2i_steps 20000

Interrupted runs resume from the latest checkpoint in ``--output_dir``. The result, ``runs/shapes/pipeline``, loads
with ``BitDancePipeline.from_pretrained``.
"""

import argparse

from bitdance_diffusers.training import TokenizerObjectiveConfig, TrainingConfig
from bitdance_diffusers.training.demo import DemoConfig, train_shapes_demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tokenizer_steps", type=int, default=3000)
    parser.add_argument("--tokenizer_batch_size", type=int, default=16)
    parser.add_argument("--t2i_steps", type=int, default=20000)
    parser.add_argument("--t2i_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--checkpoint_every", type=int, default=500)
    parser.add_argument("--tokenizer_resolution", type=int, default=64,
                        help="image side for the tokenizer's training (raise it to fine-tune at the model's size)")
    parser.add_argument("--tokenizer_loss", choices=["l1", "l2"], default="l1")
    parser.add_argument("--foreground_weight", type=float, default=1.0,
                        help="reconstruction weight of the shapes' pixels against the background's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    common = dict(output_dir=args.output_dir, learning_rate=args.learning_rate, warmup_steps=200,
                  checkpoint_every=args.checkpoint_every, seed=args.seed)  # fmt: skip
    train_shapes_demo(
        args.output_dir,
        TrainingConfig(max_steps=args.tokenizer_steps, batch_size=args.tokenizer_batch_size, **common),
        TrainingConfig(max_steps=args.t2i_steps, batch_size=args.t2i_batch_size, **common),
        DemoConfig(tokenizer_resolution=args.tokenizer_resolution),
        seed=args.seed,
        tokenizer_objective=TokenizerObjectiveConfig(reconstruction=args.tokenizer_loss,
                                                     foreground_weight=args.foreground_weight),
    )


if __name__ == "__main__":
    main()
