"""Training of the binary tokenizer and the text-to-image generator, reusing the inference models."""

from .data import (
    BucketBatchSampler,
    BucketedImageCaptions,
    EncodedDataset,
    bucket_sizes,
    load_hub_dataset,
    load_image_folder,
    select_columns,
)
from .discriminator import PatchDiscriminator
from .lora import LORA_TARGET_MODULES, add_trainable_lora, save_lora
from .shapes import ShapesDataset
from .t2i_objective import T2IObjectiveConfig, t2i_training_loss, teacher_forced_conditions
from .tokenizer_objective import TokenizerObjectiveConfig, bit_usage, psnr, ssim, tokenizer_training_loss
from .trainer import TrainingConfig, train_text_to_image, train_tokenizer
