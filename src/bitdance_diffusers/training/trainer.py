"""Training loops for the binary tokenizer and the text-to-image generator, on `accelerate`.

The parts are the ecosystem's: `accelerate` for devices, processes, mixed precision, gradient accumulation, FSDP2 and
checkpoint state; a `torch.utils.data.DataLoader` (with workers) over aspect-ratio buckets, resumed mid-epoch with
``skip_first_batches``; `diffusers.optimization.get_scheduler` for the learning rate;
`diffusers.training_utils.EMAModel` for the weight average; the tracker of ``report_to`` (TensorBoard writes offline)
for losses and validation images.

Runs are exact by step: the batches of an epoch follow from ``(seed, epoch)`` (`BucketBatchSampler`), and every random
draw of sample ``g`` of the global batch of step ``s`` (time, noise, bit flips, text dropout) from its own generator
seeded with ``(seed, s, g)``; so a resumed run continues as the uninterrupted one, and a global batch gives the same
draws however processes and accumulated micro-batches share it. Checkpoints (``accelerator.save_state``: weights, optimizer, schedule, sampler
position; EMA weights) go to ``output_dir/checkpoint-<step>`` through a staging folder (see `checkpoints`); results to
``output_dir/final`` (and, with EMA, ``output_dir/final-ema``).
"""

import json
import math
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import (
    SAFE_WEIGHTS_NAME,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    ProjectConfiguration,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..models.binary_autoencoder import BitDanceTokenizer
from ..pipelines.pipeline_bitdance import BitDancePipeline
from .checkpoints import (
    STATE_FILE,
    commit_folder,
    load_ema,
    prune_checkpoints,
    read_training_state,
    remove_stale_staging,
    resolve_checkpoint,
    save_ema,
    staging_folder,
    write_result,
)
from .data import BucketBatchSampler, EncodedDataset, collate
from .randomness import sample_generators
from .discriminator import PatchDiscriminator
from .lora import add_trainable_lora, save_lora
from .t2i_objective import T2IObjectiveConfig, t2i_training_loss
from .tokenizer_objective import TokenizerObjectiveConfig, tokenizer_training_loss


logger = get_logger(__name__)

TRAINED_COMPONENTS = ("language_model", "projector", "diffusion_head")


@dataclass
class TrainingConfig:
    """Settings of a training run; the names are those of diffusers' training scripts' flags.

    The optimizer defaults are the original BitDance recipe's (AdamW, betas (0.9, 0.95), epsilon 1e-15, no weight
    decay, gradient norm clipped at 1). ``train_batch_size`` is per process; the global batch is
    ``train_batch_size * num_processes * gradient_accumulation_steps``.
    """

    output_dir: str
    max_train_steps: int = 1000
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"  # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-15
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    # None: a fresh run (refused if output_dir holds checkpoints); "latest"; or a checkpoint folder.
    resume_from_checkpoint: str | None = None
    seed: int = 0
    mixed_precision: str = "no"  # "bf16" on GPUs
    # Recompute the activations of the language model's layers and the head's blocks in the backward pass instead of
    # keeping them: less memory, a third more compute (text-to-image training; under FSDP use the accelerate config's
    # fsdp_activation_checkpointing instead).
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    logging_steps: int = 10  # losses reach the host (and the tracker) every so many steps
    report_to: str | None = None  # "tensorboard", "wandb", "all" (accelerate trackers)
    logging_dir: str = "logs"
    tracker_project_name: str = "bitdance"
    dataloader_num_workers: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 500
    validation_kwargs: dict = field(default_factory=lambda: {"num_inference_steps": 25, "guidance_scale": 4.0})

    def __post_init__(self):
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                     "logging_steps", "validation_steps"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be at least 1 (or None), got "
                             f"{self.checkpoints_total_limit}.")  # fmt: skip
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")


# Accelerator --------------------------------------------------------------------------------------------------------


def create_accelerator(config: TrainingConfig) -> Accelerator:
    """An `Accelerator` for ``config``, with FSDP2 also on CPU processes.

    On a machine without an accelerator, processes started by ``accelerate launch`` (or ``torchrun``) join one gloo
    process group. accelerate only turns FSDP on for accelerator devices, although torch's FSDP2 runs on gloo; with an
    FSDP launch config on CPU processes the same FSDP2 path is turned on here, so that one script and one config run
    from a CPU to many GPUs.
    """
    on_cpu = not torch.accelerator.is_available()
    fsdp_on_cpu = on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    fsdp_plugin = FullyShardedDataParallelPlugin() if fsdp_on_cpu else None
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=str(Path(config.output_dir) / config.logging_dir)),  # fmt: skip
        cpu=on_cpu,
        fsdp_plugin=fsdp_plugin,
    )
    if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        if fsdp_plugin.fsdp_version != 2:
            raise ValueError("On CPU processes only FSDP2 runs (fsdp_version: 2 in the accelerate config).")
        if accelerator.mixed_precision != "no":  # (as accelerate does for its FSDP processes)
            fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = fsdp_plugin
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate runs {accelerator.num_processes} (distributed type "
            f"{accelerator.distributed_type}): they would train separate copies. Check the accelerate config."
        )
    return accelerator


# Training modules ---------------------------------------------------------------------------------------------------


class TokenizerTrainingModule(torch.nn.Module):
    def __init__(self, vae: BitDanceTokenizer, objective: TokenizerObjectiveConfig):
        super().__init__()
        self.vae, self.objective = vae, objective
        vae.encoder.requires_grad_(not objective.decoder_only)
        self.discriminator = None
        if objective.gan_weight:
            self.discriminator = PatchDiscriminator(base_channels=objective.discriminator_channels,
                                                    num_layers=objective.discriminator_layers)  # fmt: skip

    def forward(self, batch: dict, generators: list[torch.Generator]):
        return tokenizer_training_loss(self.vae, batch["pixel_values"], self.objective, self.discriminator, generators)


class T2ITrainingModule(torch.nn.Module):
    """The trainable parts of a `BitDancePipeline` (language model, projector, head); the tokenizer stays frozen.

    Batches carry ``pixel_values`` (encoded here, every step) or ready ``codes`` (`EncodedDataset`).
    """

    # FSDP units (accelerate's transformer-based wrap policy reads this when the config names no classes).
    _no_split_modules = ["Qwen3DecoderLayer", "HeadTransformerBlock"]

    def __init__(self, pipe: BitDancePipeline, objective: T2IObjectiveConfig):
        super().__init__()
        self.language_model, self.projector = pipe.language_model, pipe.projector
        self.diffusion_head = pipe.diffusion_head
        self.objective = objective
        object.__setattr__(self, "pipe", pipe)  # not a submodule: the VAE is not trained
        pipe.vae.requires_grad_(False)

    def forward(self, batch: dict, generators: list[torch.Generator]):
        codes = batch.get("codes")
        if codes is None:
            with torch.no_grad():
                codes = self.pipe.vae.encode(batch["pixel_values"].to(self.pipe.vae.dtype)).codes
        return t2i_training_loss(self.pipe, batch["caption"], codes, generators, self.objective), {}


def enable_gradient_checkpointing(pipe: BitDancePipeline):
    """Checkpoint the language model's decoder layers and the head's blocks. Non-reentrant checkpointing, so that
    gradients reach LoRA adapters inside a frozen model, whose layer inputs do not require gradients."""
    language_model = pipe.language_model
    if hasattr(language_model, "activation_checkpointing_enable"):  # transformers >= 5.24 (non-reentrant by default)
        language_model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pipe.diffusion_head.enable_gradient_checkpointing()


# The loop -----------------------------------------------------------------------------------------------------------


def _parameter_name(name: str) -> str:
    """The parameter's name without the wrappers FSDP's activation checkpointing inserts."""
    return name.replace("_checkpoint_wrapped_module.", "")


def _keep_trained_weights(trained: set, models: list, weights: list, output_dir: str):
    """accelerate's save-state hook: checkpoint the trained parameters, not the frozen (maybe quantized) weights."""
    for index, state in enumerate(weights):
        weights[index] = {name: tensor for name, tensor in state.items() if name in trained}


@contextmanager
def gathered_parameters(module: torch.nn.Module):
    """Inference on FSDP2-sharded modules: gather every unit's parameters once for the duration (calls that skip the
    root module's forward, such as a pipeline's, would otherwise meet sharded root parameters)."""
    from torch.distributed.fsdp import FSDPModule

    units = [unit for unit in module.modules() if isinstance(unit, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


class TrainingRun:
    """One run of ``module`` (its ``forward(batch, generators)`` returns ``(loss, parts)``) over ``dataset``.

    ``save_results(run)`` writes the results once training ends; ``validate(run, step)`` (optional) runs every
    ``validation_steps``. Items of ``dataset`` hold ``pixel_values`` or ``codes`` and a ``caption``; its
    ``bucket_indices`` (all 0 when absent) group equal shapes into batches.
    """

    def __init__(self, module: torch.nn.Module, dataset, config: TrainingConfig, save_results, validate=None,
                 accelerator: Accelerator | None = None):  # fmt: skip
        self.config, self.save_results, self.validate = config, save_results, validate
        self.output_dir = Path(config.output_dir)
        accelerator = self.accelerator = accelerator or create_accelerator(config)
        fsdp_checkpointing = accelerator.is_fsdp2 and accelerator.state.fsdp_plugin.activation_checkpointing
        if fsdp_checkpointing and config.gradient_checkpointing:
            raise ValueError("Both gradient_checkpointing and the FSDP config's fsdp_activation_checkpointing are on: "
                             "keep one (under FSDP, the config's).")  # fmt: skip
        # Refuse a second run over a first one before anything is written.
        checkpoint = resolve_checkpoint(self.output_dir, config.resume_from_checkpoint)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.output_dir)
        accelerator.wait_for_everyone()

        bucket_indices = getattr(dataset, "bucket_indices", None) or [0] * len(dataset)
        self.sampler = BucketBatchSampler(bucket_indices, config.train_batch_size, accelerator.num_processes,
                                          config.seed, config.gradient_accumulation_steps)  # fmt: skip
        dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate,
                                                 num_workers=config.dataloader_num_workers)  # fmt: skip
        parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                      eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)  # fmt: skip
        # The prepared schedule steps once per process and optimizer step (as in diffusers' scripts).
        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                     num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=config.max_train_steps * accelerator.num_processes)  # fmt: skip
        self.module, self.optimizer, self.lr_scheduler, self.dataloader = accelerator.prepare(
            module, optimizer, lr_scheduler, dataloader
        )
        # FSDP2 replaces the parameters by sharded ones: read them after `prepare`.
        self.named_parameters = {_parameter_name(name): parameter for name, parameter in self.module.named_parameters()
                                 if parameter.requires_grad}  # fmt: skip
        self.parameters = list(self.named_parameters.values())
        self.ema = EMAModel(self.parameters, decay=config.ema_decay) if config.use_ema else None
        if not accelerator.is_fsdp2:  # (FSDP writes sharded checkpoints of its own)
            accelerator.register_save_state_pre_hook(partial(_keep_trained_weights, set(self.named_parameters)))

        self.global_step = 0
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            self.global_step = read_training_state(checkpoint)["global_step"]
            if self.ema is not None:
                load_ema(self.ema_state(), checkpoint / "ema")
                self.ema.optimization_step = self.global_step
            logger.info(f"Resumed from {checkpoint} at step {self.global_step}.")
        elif config.resume_from_checkpoint is not None:
            logger.info(f"No checkpoint in {self.output_dir} yet: a new run starts.")

    def load_checkpoint(self, checkpoint: Path):
        """``accelerator.load_state``; outside FSDP the checkpoint holds the trained parameters only (not a frozen,
        maybe quantized base), which must be this run's."""
        if self.accelerator.is_fsdp2:
            self.accelerator.load_state(str(checkpoint))
            return
        with safe_open(str(checkpoint / SAFE_WEIGHTS_NAME), "pt") as weights:
            saved = set(weights.keys())
        if saved != set(self.named_parameters):
            raise ValueError(
                f"{checkpoint} holds other trained weights than this run trains ({len(saved)} tensors, e.g. "
                f"{sorted(saved ^ set(self.named_parameters))[:3]} differ): resume with the settings it was trained "
                "with (full or LoRA, rank, decoder-only), or start in another output folder."
            )
        self.accelerator.load_state(str(checkpoint), strict=False)

    def ema_state(self) -> dict:
        return dict(zip(self.named_parameters, self.ema.shadow_params))

    @contextmanager
    def ema_weights(self):
        """The EMA weights in the trained parameters for the duration (none without EMA)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def state_dict(self) -> dict:
        """The module's full state dict on the main process (gathered from the shards under FSDP)."""
        return self.accelerator.get_state_dict(self.module)

    def inference(self):
        """The context in which the unwrapped modules run a pipeline: eval mode, no gradients, gathered weights."""
        module = self.accelerator.unwrap_model(self.module)

        @contextmanager
        def context():
            module.eval()
            try:
                with torch.no_grad(), gathered_parameters(self.module) if self.accelerator.is_fsdp2 else nullcontext():
                    yield
            finally:
                module.train()

        return context()

    def save_checkpoint(self):
        """``accelerator.save_state`` (and the EMA) into a staging folder, renamed ``checkpoint-<step>`` once whole."""
        accelerator, target = self.accelerator, self.output_dir / f"checkpoint-{self.global_step}"
        staging = staging_folder(target)
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        if self.ema is not None:
            save_ema(self.ema_state(), staging / "ema")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"global_step": self.global_step, "config": asdict(self.config)}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
            commit_folder(staging, target)
            prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    def train(self) -> list[float]:
        """Train to ``max_train_steps``; returns the mean loss of every optimizer step run by this call."""
        accelerator, config = self.accelerator, self.config
        if accelerator.is_main_process and config.report_to:
            settings = {key: value for key, value in asdict(config).items()
                        if isinstance(value, (int, float, str, bool))}  # fmt: skip
            accelerator.init_trackers(config.tracker_project_name, config=settings)
        steps_per_epoch = len(self.dataloader)
        micro_step = self.global_step * config.gradient_accumulation_steps
        losses, pending, step_loss = [], [], 0.0
        progress = tqdm(total=config.max_train_steps, initial=self.global_step, desc="training",
                        disable=not accelerator.is_local_main_process)  # fmt: skip
        self.module.train()
        ran = False
        while self.global_step < config.max_train_steps:
            epoch, skip = divmod(micro_step, steps_per_epoch)
            # The prepared loader sets its epoch on the sampler when iterated (not through a multi-process shard).
            self.dataloader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            for batch in batches:
                # This micro-batch is chunk (k * processes + rank) of the global batch of its optimizer step.
                step, k = divmod(micro_step, config.gradient_accumulation_steps)
                size = len(batch["caption"])
                first_sample = (k * accelerator.num_processes + accelerator.process_index) * size
                generators = sample_generators(config.seed, step, first_sample, size, accelerator.device)
                with accelerator.accumulate(self.module):
                    with accelerator.autocast():
                        loss, _ = self.module(batch, generators)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro_step += 1
                step_loss = step_loss + loss.detach()
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                ran = True
                if self.ema is not None:
                    self.ema.step(self.parameters)
                pending.append(step_loss / config.gradient_accumulation_steps)
                step_loss = 0.0
                progress.update(1)
                last = self.global_step == config.max_train_steps
                checkpoint = self.global_step % config.checkpointing_steps == 0 or last
                if self.global_step % config.logging_steps == 0 or checkpoint:
                    losses += self.flush_losses(pending, progress)  # the one host synchronisation of the interval
                    pending = []
                if checkpoint:
                    self.save_checkpoint()
                validation = self.validate is not None and config.validation_prompts
                if validation and self.global_step % config.validation_steps == 0:
                    self.validate(self, self.global_step)
                if last:
                    break
        progress.close()
        accelerator.wait_for_everyone()
        if ran or not (self.output_dir / "final").is_dir():
            self.save_results(self)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return losses

    def flush_losses(self, pending: list, progress) -> list[float]:
        """Bring the pending steps' losses (averaged over processes) to the host, check them and log them."""
        values = self.accelerator.reduce(torch.stack(pending), reduction="mean").tolist()
        first_step = self.global_step - len(values) + 1
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(f"The loss became {value} at step {first_step + offset}; lower the learning "
                                         f"rate, or resume from a checkpoint before that step.")  # fmt: skip
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        for offset, value in enumerate(values):
            self.accelerator.log({"train_loss": value, "lr": learning_rate}, step=first_step + offset)
        progress.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{learning_rate:.2e}")
        return values


def run_training(module: torch.nn.Module, dataset, config: TrainingConfig, save_results, validate=None) -> list:
    """Build a `TrainingRun` and train; returns the per-step losses of this call."""
    return TrainingRun(module, dataset, config, save_results, validate).train()


# Tokenizer ----------------------------------------------------------------------------------------------------------


def train_tokenizer(vae: BitDanceTokenizer, dataset, config: TrainingConfig,
                    objective: TokenizerObjectiveConfig = TokenizerObjectiveConfig()) -> list:  # fmt: skip
    """Train ``vae`` in place on ``dataset`` (items with ``pixel_values`` in [-1, 1]); save it to ``output_dir/final``
    (and the EMA weights, with ``use_ema``, to ``output_dir/final-ema``)."""
    if config.gradient_checkpointing:
        raise ValueError("The tokenizer trains without gradient checkpointing; set gradient_checkpointing=False.")

    def save_results(run: TrainingRun):
        write_result(run.output_dir / "final", vae.save_pretrained, run.accelerator.is_main_process)
        if run.ema is not None:
            with run.ema_weights():
                write_result(run.output_dir / "final-ema", vae.save_pretrained, run.accelerator.is_main_process)

    vae.train()
    losses = run_training(TokenizerTrainingModule(vae, objective), dataset, config, save_results)
    vae.eval()
    return losses


# Text-to-image ------------------------------------------------------------------------------------------------------


def model_from_config(model: torch.nn.Module) -> torch.nn.Module:
    """A newly initialised model of ``model``'s class and config (a transformers or a diffusers model)."""
    if isinstance(model, PreTrainedModel):
        return type(model)._from_config(model.config)
    return type(model).from_config(model.config)


def pipeline_with_weights(pipe: BitDancePipeline, state_dict: dict, dtypes: dict) -> BitDancePipeline:
    """A pipeline sharing ``pipe``'s frozen components, whose trained components hold ``state_dict`` (keys prefixed
    with the component's name; cast to ``dtypes[name]``). Built on the meta device: no second copy of any weight."""
    components = dict(pipe.components)
    for name in TRAINED_COMPONENTS:
        module, prefix = getattr(pipe, name), f"{name}."
        weights = {key[len(prefix) :]: tensor.to(dtypes[name]) for key, tensor in state_dict.items()
                   if key.startswith(prefix)}  # fmt: skip
        with torch.device("meta"):
            fresh = model_from_config(module)
        fresh.load_state_dict(weights, strict=True, assign=True)
        components[name] = fresh.eval()
    settings = {key: value for key, value in pipe.config.items() if not key.startswith("_") and key not in components}
    return type(pipe)(**components, **settings)


def save_pipeline(run: TrainingRun, pipe: BitDancePipeline, dtypes: dict):
    """Save the trained pipeline to ``output_dir/final`` and, with EMA, the EMA weights' to ``output_dir/final-ema``."""
    results = [("final", nullcontext)] + ([("final-ema", run.ema_weights)] if run.ema is not None else [])
    for folder, weights in results:
        with weights():
            state_dict = run.state_dict()  # every process takes part in gathering the shards
            if run.accelerator.is_main_process:  # (without sharding, the state dict holds the parameters themselves)
                trained = pipeline_with_weights(pipe, state_dict, dtypes)
                write_result(run.output_dir / folder, trained.save_pretrained)


def validate_pipeline(run: TrainingRun, pipe: BitDancePipeline, step: int):
    """Draw the validation prompts (with the EMA weights, if any), save them as a grid to
    ``output_dir/validation/step-<step>.png`` and log them to the trackers."""
    config = run.config
    height, width = pipe.config.image_sizes[0]
    generator = torch.Generator(run.accelerator.device).manual_seed(config.seed)
    vae_device = pipe.vae.device
    pipe.vae.to(run.accelerator.device)
    with run.ema_weights(), run.inference():
        images = pipe(config.validation_prompts, height=height, width=width, generator=generator,
                      **config.validation_kwargs).images  # fmt: skip
    pipe.vae.to(vae_device)
    if not run.accelerator.is_main_process:
        return
    columns = min(len(images), 4)
    grid = make_image_grid(images + [images[-1].copy()] * (-len(images) % columns), rows=-(-len(images) // columns),
                           cols=columns)  # fmt: skip
    folder = run.output_dir / "validation"
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{step}.png")
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(image) for image in images]), step,
                                      dataformats="NHWC")  # fmt: skip


def train_text_to_image(pipe: BitDancePipeline, dataset, config: TrainingConfig,
                        objective: T2IObjectiveConfig = T2IObjectiveConfig(), lora_rank: int | None = None,
                        cache_latents: bool = False) -> list:  # fmt: skip
    """Train the language model, projector and head of ``pipe`` in place on captioned images, and save the pipeline to
    ``output_dir/final`` (with ``use_ema``, the EMA weights' pipeline beside it, in ``output_dir/final-ema``).

    With ``lora_rank``, train rank-``lora_rank`` LoRA adapters of the language model and the head instead (base
    weights frozen, possibly quantized; see `add_trainable_lora`) and save only them, as a LoRA file for
    ``load_lora_weights``. With ``cache_latents``, the images are encoded once before training (`EncodedDataset`).
    """
    accelerator = create_accelerator(config)
    if lora_rank is not None and accelerator.is_fsdp2:
        raise ValueError("LoRA trains data-parallel (one GPU, or several with DDP); FSDP is for full fine-tuning.")
    resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)  # refuse a second run before any work
    dtypes = {name: getattr(pipe, name).dtype for name in TRAINED_COMPONENTS}  # FSDP2 may train in float32 masters
    if lora_rank is not None:
        if config.use_ema:
            raise ValueError("EMA is for full fine-tuning; LoRA training keeps the adapters only (set use_ema=False).")
        add_trainable_lora(pipe, lora_rank)

        def save_results(run: TrainingRun):
            write_result(run.output_dir / "final", partial(save_lora, pipe), run.accelerator.is_main_process)
    else:

        def save_results(run: TrainingRun):
            save_pipeline(run, pipe, dtypes)

    if config.gradient_checkpointing:
        enable_gradient_checkpointing(pipe)
    pipe.vae.to(accelerator.device)
    if cache_latents:  # the tokenizer then leaves the device, back only to decode validation images
        dataset = EncodedDataset.encode(dataset, pipe.vae, progress=accelerator.is_local_main_process)
        pipe.vae.to("cpu")
    for module in (pipe.language_model, pipe.projector, pipe.diffusion_head):
        module.train()
    run = TrainingRun(T2ITrainingModule(pipe, objective), dataset, config, save_results,
                      lambda run, step: validate_pipeline(run, pipe, step), accelerator)  # fmt: skip
    losses = run.train()
    for module in (pipe.language_model, pipe.projector, pipe.diffusion_head):
        module.eval()
    return losses
