"""Training loops for the binary tokenizer and the text-to-image generator, on `accelerate`.

Both loops are deterministic by step: the batch of step ``s`` on process ``r`` and every random draw of that step
(time, noise, bit flips, text dropout) come from ``(seed, s, r)``, so resuming from a checkpoint continues exactly as
an uninterrupted run. Checkpoints (``accelerator.save_state``: weights, optimizer, LR schedule) go to
``output_dir/checkpoint-<step>``; the result is saved in the diffusers folder format (or, for LoRA training, as a
diffusers LoRA file) to ``output_dir/final``.
"""

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..models.binary_autoencoder import BitDanceTokenizer
from ..pipelines.pipeline_bitdance import BitDancePipeline
from .discriminator import PatchDiscriminator
from .lora import add_trainable_lora, save_lora
from .t2i_objective import T2IObjectiveConfig, t2i_training_loss
from .tokenizer_objective import TokenizerObjectiveConfig, tokenizer_training_loss


@dataclass
class TrainingConfig:
    output_dir: str
    max_steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" decay to 0 at max_steps
    adam_betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    mixed_precision: str = "no"  # "bf16" on GPUs
    # Recompute the activations of the language model's layers and the head's blocks in the backward pass instead of
    # keeping them: less memory, a third more compute (text-to-image training).
    gradient_checkpointing: bool = False


class TokenizerTrainingModule(torch.nn.Module):
    def __init__(self, vae: BitDanceTokenizer, objective: TokenizerObjectiveConfig):
        super().__init__()
        self.vae, self.objective = vae, objective
        vae.encoder.requires_grad_(not objective.decoder_only)
        self.discriminator = None
        if objective.gan_weight:
            self.discriminator = PatchDiscriminator(base_channels=objective.discriminator_channels,
                                                    num_layers=objective.discriminator_layers)  # fmt: skip

    def forward(self, batch: dict, generator: torch.Generator):
        return tokenizer_training_loss(self.vae, batch["pixel_values"], self.objective, self.discriminator)


class T2ITrainingModule(torch.nn.Module):
    """The trainable parts of a `BitDancePipeline` (language model, projector, head); the tokenizer stays frozen.

    Batches carry ``pixel_values`` (encoded here, every step) or ready ``codes`` (see `EncodedDataset`).
    """

    def __init__(self, pipe: BitDancePipeline, objective: T2IObjectiveConfig):
        super().__init__()
        self.language_model, self.projector, self.diffusion_head = pipe.language_model, pipe.projector, pipe.diffusion_head
        self.objective = objective
        object.__setattr__(self, "pipe", pipe)  # not a submodule: the VAE is not trained
        pipe.vae.requires_grad_(False)

    def forward(self, batch: dict, generator: torch.Generator):
        codes = batch.get("codes")
        if codes is None:
            with torch.no_grad():
                codes = self.pipe.vae.encode(batch["pixel_values"].to(self.pipe.vae.dtype)).codes
        loss = t2i_training_loss(self.pipe, batch["caption"], codes, generator, self.objective)
        return loss, {}


def _lr_factor(config: TrainingConfig, step: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine decay to 0 at ``max_steps``."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "constant":
        return warmup
    if config.lr_schedule == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * min(step, config.max_steps) / config.max_steps))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}.")


def _batch(dataset, step: int, process: int, num_processes: int, batch_size: int, device) -> dict:
    """The deterministic batch of ``step`` for ``process``: consecutive dataset indices, wrapping around."""
    start = (step * num_processes + process) * batch_size
    items = [dataset[(start + i) % len(dataset)] for i in range(batch_size)]
    batch = {"caption": [item["caption"] for item in items]}
    for key in ("pixel_values", "codes"):  # images, or (for the generator) images already encoded to ±1 codes
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items]).to(device)
    return batch


def _latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


def run_training(module: torch.nn.Module, dataset, config: TrainingConfig, save_final, resume: bool = True) -> list:
    """Train ``module`` (its ``forward(batch, generator)`` returns ``(loss, parts)``); returns the per-step losses."""
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    output_dir = Path(config.output_dir)
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_lr_factor, config))
    module, optimizer, schedule = accelerator.prepare(module, optimizer, schedule)

    start_step = 0
    checkpoint = _latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start_step = int(checkpoint.name.split("-")[1])

    losses = []
    progress = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
                    disable=not accelerator.is_local_main_process, desc="training")  # fmt: skip
    for step in progress:
        started = time.perf_counter()
        generator = torch.Generator(accelerator.device).manual_seed(
            config.seed * 1_000_003 + step * 1009 + accelerator.process_index
        )
        batch = _batch(dataset, step, accelerator.process_index, accelerator.num_processes, config.batch_size,
                       accelerator.device)  # fmt: skip
        with accelerator.autocast():
            loss, parts = module(batch, generator)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"Loss became {loss.item()} at step {step}; lower the learning rate.")
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        images_per_second = config.batch_size * accelerator.num_processes / (time.perf_counter() - started)
        progress.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_per_second:.1f}",
                             **{k: f"{v.item():.3f}" for k, v in parts.items()})  # fmt: skip
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.max_steps:
            accelerator.save_state(str(output_dir / f"checkpoint-{step + 1}"))

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(output_dir / "final")
    return losses


def enable_gradient_checkpointing(pipe: BitDancePipeline):
    """Checkpoint the language model's decoder layers and the head's blocks. Non-reentrant checkpointing, so that
    gradients reach LoRA adapters inside a frozen model, whose layer inputs do not require gradients."""
    language_model = pipe.language_model
    if hasattr(language_model, "activation_checkpointing_enable"):  # transformers >= 5.24 (non-reentrant by default)
        language_model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pipe.diffusion_head.enable_gradient_checkpointing()


def train_tokenizer(vae: BitDanceTokenizer, dataset, config: TrainingConfig,
                    objective: TokenizerObjectiveConfig = TokenizerObjectiveConfig(), resume: bool = True) -> list:  # fmt: skip
    """Train ``vae`` in place on ``dataset`` (items with ``pixel_values`` in [-1, 1])."""
    if config.gradient_checkpointing:
        raise ValueError("The tokenizer trains without gradient checkpointing; set gradient_checkpointing=False.")
    vae.train()
    losses = run_training(TokenizerTrainingModule(vae, objective), dataset, config, vae.save_pretrained, resume)
    vae.eval()
    return losses


def train_text_to_image(pipe: BitDancePipeline, dataset, config: TrainingConfig,
                        objective: T2IObjectiveConfig = T2IObjectiveConfig(), resume: bool = True,
                        lora_rank: int | None = None) -> list:  # fmt: skip
    """Train the language model, projector and head of ``pipe`` in place on captioned images, and save the pipeline.

    With ``lora_rank``, train rank-``lora_rank`` LoRA adapters of the language model and the head instead (base
    weights frozen, see `add_trainable_lora`) and save only them, as a LoRA file for ``load_lora_weights``.
    """
    save_final = pipe.save_pretrained
    if lora_rank is not None:
        add_trainable_lora(pipe, lora_rank)
        save_final = partial(save_lora, pipe)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(pipe)
    for module in (pipe.language_model, pipe.projector, pipe.diffusion_head):
        module.train()
    losses = run_training(T2ITrainingModule(pipe, objective), dataset, config, save_final, resume)
    for module in (pipe.language_model, pipe.projector, pipe.diffusion_head):
        module.eval()
    return losses
