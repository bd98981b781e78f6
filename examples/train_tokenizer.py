"""Train or fine-tune BitDance's binary tokenizer (`BitDanceTokenizer`) on images.

    python examples/train_tokenizer.py --pretrained_model_name_or_path BitDance-14B-64x-diffusers --subfolder vae \
        --train_data_dir my_pictures --output_dir runs/tokenizer --resolution 256 --max_train_steps 5000 --use_ema
    accelerate launch examples/train_tokenizer.py ...      (data-parallel over several GPUs)

Data, optimisation, EMA, checkpoint and logging flags are those of ``examples/train_text_to_image.py`` (captions are
not needed: a folder of images will do). Images are scaled to cover ``--resolution`` x ``--resolution`` and
centre-cropped. The objective defaults are the original's quantiser recipe (sign quantisation with a straight-through
estimator, the group-wise entropy loss over groups of 8 bits at temperature 0.01, a commitment loss); the
reconstruction loss, an outline loss, decoder-only fine-tuning (the codes, and so any generator trained on them, stay
valid) and an adversarial loss against a PatchGAN discriminator are options. The result is a model folder,
``output_dir/final`` (and ``output_dir/final-ema`` with ``--use_ema``), for ``BitDanceTokenizer.from_pretrained``.
"""

import argparse
import sys

from accelerate import PartialState
from diffusers.training_utils import set_seed

from bitdance_diffusers import BitDanceTokenizer
from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
from bitdance_diffusers.training import TokenizerObjectiveConfig, train_tokenizer
from bitdance_diffusers.training.arguments import (
    USER_ERRORS,
    add_data_arguments,
    add_training_arguments,
    check_output_dir,
    load_training_images,
    training_config,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=str(DEMO_MODEL_PATH),
                        help="tokenizer folder, or a pipeline folder / Hub id with --subfolder vae")
    parser.add_argument("--subfolder", default="vae", help="the tokenizer's folder inside a pipeline ('' for none)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--from_scratch", action="store_true", help="re-initialise the tokenizer from its config")
    add_data_arguments(parser)
    add_training_arguments(parser, learning_rate=1e-4, lr_warmup_steps=100)
    parser.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights (output_dir/final-ema)")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    objective = parser.add_argument_group("objective")
    defaults = TokenizerObjectiveConfig()
    objective.add_argument("--reconstruction_loss", choices=["l1", "l2"], default=defaults.reconstruction)
    objective.add_argument("--entropy_weight", type=float, default=defaults.entropy_weight)
    objective.add_argument("--commitment_weight", type=float, default=defaults.commitment_weight)
    objective.add_argument("--bits_per_group", type=int, default=defaults.bits_per_group)
    objective.add_argument("--entropy_temperature", type=float, default=defaults.temperature)
    objective.add_argument("--foreground_weight", type=float, default=defaults.foreground_weight,
                           help="weight of pixels far from the border colour (plain-background images)")
    objective.add_argument("--edge_weight", type=float, default=defaults.edge_weight, help="outline loss weight")
    objective.add_argument("--decoder_only", action="store_true", help="freeze the encoder (and so the codes)")
    objective.add_argument("--gan_weight", type=float, default=defaults.gan_weight,
                           help="weight of the adversarial loss (PatchGAN discriminator, hinge loss); 0 = off")
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        check_output_dir(args)
        vae = BitDanceTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder=args.subfolder or None,
                                                revision=args.revision)  # fmt: skip
        if args.from_scratch:
            set_seed(args.seed)
            vae = BitDanceTokenizer.from_config(vae.config)
        resolution = args.resolution or 256
        dataset = load_training_images(args, [[resolution, resolution]], captions=False)
        config = training_config(args, dataset.bucket_indices, use_ema=args.use_ema, ema_decay=args.ema_decay)
        objective = TokenizerObjectiveConfig(
            reconstruction=args.reconstruction_loss, entropy_weight=args.entropy_weight,
            commitment_weight=args.commitment_weight, bits_per_group=args.bits_per_group,
            temperature=args.entropy_temperature, foreground_weight=args.foreground_weight,
            edge_weight=args.edge_weight, decoder_only=args.decoder_only, gan_weight=args.gan_weight,
        )  # fmt: skip
    except USER_ERRORS as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    losses = train_tokenizer(vae, dataset, config, objective)
    if PartialState().is_main_process:
        done = f"{len(losses)} steps, last loss {losses[-1]:.4f}" if losses else "nothing left to train"
        print(f"{done}; tokenizer in {args.output_dir}/final")


if __name__ == "__main__":
    sys.exit(main())
