"""The small BitDance that ships with the package: trained on CPU on the synthetic shapes set.

`train_shapes_demo` trains, in order, a byte-level BPE text tokenizer on the captions, a binary tokenizer
(`BitDanceTokenizer`) on the images, then a tiny text-to-image model (Qwen3 language model, projector, head) with the
frozen binary tokenizer, and saves the complete `BitDancePipeline` folder.
"""

from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from ..models import BitDanceDiffusionHead, BitDanceProjector, BitDanceTokenizer
from ..pipelines import BitDancePipeline
from ..special_tokens import SPECIAL_TOKENS
from ..schedulers import BinaryFlowScheduler
from .data import EncodedDataset
from .shapes import ShapesDataset
from .shapes_detector import detect_shape
from .t2i_objective import T2IObjectiveConfig
from .tokenizer_objective import TokenizerObjectiveConfig
from .trainer import TrainingConfig, train_text_to_image, train_tokenizer


# The dataset seed kept out of the demo model's training (its held-out prompts).
HELD_OUT_SEED = 10_000


@dataclass
class DemoConfig:
    resolution: int = 128
    tokenizer_resolution: int = 64  # the tokenizer first trains on smaller renders of the same scenes (6x cheaper)
    block_size: int = 16
    max_objects: int = 1
    num_images: int = 12_000  # generator training set, encoded once by the trained tokenizer
    text_vocab_size: int = 1000
    # 4 GroupNorm groups keep 8 channels per group, as the released tokenizers do (256 / 32): with one channel per
    # group the norms would erase each image's absolute colour.
    vae: dict = field(default_factory=lambda: dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32,
                                                   norm_num_groups=4))  # fmt: skip
    language_model: dict = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, max_position_embeddings=512))  # fmt: skip
    head: dict = field(default_factory=lambda: dict(hidden_size=256, num_layers=4, num_ada_ln_layers=2,
                                                    attention_head_dim=64))  # fmt: skip


def train_text_tokenizer(captions: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE fitted to ``captions``, with BitDance's special tokens (looked up by name at inference)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"] + SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(captions + ["\n"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|endoftext|>")


def build_demo_pipeline(config: DemoConfig, text_tokenizer, vae: BitDanceTokenizer) -> BitDancePipeline:
    lm_config = Qwen3Config(vocab_size=len(text_tokenizer), pad_token_id=text_tokenizer.pad_token_id,
                            **config.language_model)  # fmt: skip
    lm_config._attn_implementation = "sdpa"
    hidden_size = lm_config.hidden_size
    return BitDancePipeline(
        tokenizer=text_tokenizer,
        language_model=Qwen3Model(lm_config),
        projector=BitDanceProjector(in_channels=vae.config.z_channels, hidden_size=hidden_size),
        diffusion_head=BitDanceDiffusionHead(in_channels=vae.config.z_channels, condition_channels=hidden_size,
                                             **config.head),  # fmt: skip
        vae=vae,
        scheduler=BinaryFlowScheduler(),
        block_size=config.block_size,
        image_sizes=[[config.resolution, config.resolution]],
    )


@torch.no_grad()
def score_held_out_prompts(pipe: BitDancePipeline, num_prompts: int, batch_size: int = 10, **call_kwargs) -> dict:
    """Draw the captions of the first ``num_prompts`` held-out scenes (generator seed ``i`` for scene ``i``) and count
    the images where the pixel detector finds the scene's ``color``, ``position``, ``background`` and ``shape``."""
    height, width = pipe.config.image_sizes[0]
    held_out = ShapesDataset(num_prompts, resolution=height, seed=HELD_OUT_SEED, max_objects=1)
    hits = {"color": 0, "position": 0, "background": 0, "shape": 0}
    for first in range(0, num_prompts, batch_size):
        indices = range(first, min(first + batch_size, num_prompts))
        scenes = [held_out.scene(i) for i in indices]
        images = pipe([scene.caption() for scene in scenes], height=height, width=width, output_type="pt",
                      generator=[torch.Generator().manual_seed(i) for i in indices], **call_kwargs).images  # fmt: skip
        for scene, image in zip(scenes, images):
            detection, target = detect_shape(image * 2 - 1), scene.objects[0]
            hits["color"] += detection.color == target.color
            hits["position"] += detection.position == target.position
            hits["background"] += detection.background == scene.background
            hits["shape"] += detection.shape == target.shape
    return hits


def train_shapes_demo(
    output_dir: str,
    tokenizer_training: TrainingConfig,
    t2i_training: TrainingConfig,
    config: DemoConfig = DemoConfig(),
    seed: int = 0,
    tokenizer_objective: TokenizerObjectiveConfig = TokenizerObjectiveConfig(),
    tokenizer_finetuning: TrainingConfig | None = None,
    decoder_finetuning: TrainingConfig | None = None,
    decoder_objective: TokenizerObjectiveConfig = TokenizerObjectiveConfig(decoder_only=True),
    adversarial_finetuning: TrainingConfig | None = None,
    adversarial_objective: TokenizerObjectiveConfig = TokenizerObjectiveConfig(decoder_only=True, gan_weight=0.1),
) -> BitDancePipeline:
    """Train the demo model and save the pipeline to ``output_dir/pipeline``.

    The binary tokenizer trains at ``config.tokenizer_resolution`` (checkpoints in ``output_dir/vae``), then, with
    ``tokenizer_finetuning``, at ``config.resolution`` (``output_dir/vae-finetune``); with ``decoder_finetuning`` its
    decoder alone then learns to draw the now fixed codes (``output_dir/vae-decoder``, ``decoder_objective``), and
    with ``adversarial_finetuning`` it goes on against a discriminator (``output_dir/vae-gan``,
    ``adversarial_objective``). The generator trains on the frozen tokenizer's codes (``output_dir/t2i``). Every stage
    resumes from its latest checkpoint.
    """
    if not (decoder_objective.decoder_only and adversarial_objective.decoder_only):
        raise ValueError("The decoder stages' objectives need decoder_only=True: the codes are fixed by then.")
    dataset = ShapesDataset(config.num_images, resolution=config.resolution, seed=seed,
                            max_objects=config.max_objects)  # fmt: skip
    text_tokenizer = train_text_tokenizer([dataset.scene(i).caption() for i in range(5000)], config.text_vocab_size)

    torch.manual_seed(seed)
    vae = BitDanceTokenizer(**config.vae)
    stages = [(tokenizer_training, config.tokenizer_resolution, "vae", tokenizer_objective)]
    if tokenizer_finetuning is not None:
        stages.append((tokenizer_finetuning, config.resolution, "vae-finetune", tokenizer_objective))
    if decoder_finetuning is not None:
        stages.append((decoder_finetuning, config.resolution, "vae-decoder", decoder_objective))
    if adversarial_finetuning is not None:
        stages.append((adversarial_finetuning, config.resolution, "vae-gan", adversarial_objective))
    for training, resolution, name, objective in stages:
        training.output_dir, training.resume_from_checkpoint = f"{output_dir}/{name}", "latest"
        images = ShapesDataset(config.num_images, resolution=resolution, seed=seed, max_objects=config.max_objects)
        train_tokenizer(vae, images, training, objective)

    torch.manual_seed(seed + 1)
    pipe = build_demo_pipeline(config, text_tokenizer, vae)
    dataset = EncodedDataset.encode(dataset, vae)
    t2i_training.output_dir, t2i_training.resume_from_checkpoint = f"{output_dir}/t2i", "latest"
    train_text_to_image(pipe, dataset, t2i_training, T2IObjectiveConfig())
    pipe.save_pretrained(f"{output_dir}/pipeline")
    return pipe
