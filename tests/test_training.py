"""Training: the teacher-forced mask equals cached inference, losses decrease, resume is bit-exact (EMA included),
gradient accumulation equals a larger batch, shapes data."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from bitdance_diffusers import BitDancePipeline, BitDanceTokenizer
from bitdance_diffusers.random_pipeline import build_random_pipeline
from bitdance_diffusers.training import (
    PatchDiscriminator,
    ShapesDataset,
    T2IObjectiveConfig,
    TokenizerObjectiveConfig,
    TrainingConfig,
    bit_usage,
    psnr,
    ssim,
    t2i_training_loss,
    tokenizer_training_loss,
    teacher_forced_conditions,
    train_text_to_image,
    train_tokenizer,
)
from bitdance_diffusers.training.demo import DemoConfig, train_shapes_demo
from bitdance_diffusers.training.tokenizer_objective import foreground_weights, pixel_differences
from bitdance_diffusers.training.shapes import SHAPES, draw_shape, render_scene, unit_area
from bitdance_diffusers.training.shapes_detector import detect_shape, read_shape
from bitdance_diffusers.utils.token_layout import grid_to_sequence


@pytest.mark.parametrize("block_size,height,width", [(1, 64, 64), (4, 64, 128), (16, 128, 256), (64, 256, 256)])
def test_training_conditions_equal_cached_inference(block_size, height, width):
    pipe = build_random_pipeline("tiny", block_size=block_size, image_sizes=[[height, width]])
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a much longer prompt about two blue squares at the top"]
    codes = torch.where(torch.rand(2, 32, height // 16, width // 16) > 0.5, 1.0, -1.0)
    sequence = grid_to_sequence(codes, block_size)

    inference_conditions = []
    head_forward = pipe.diffusion_head.forward
    pipe.diffusion_head.forward = lambda s, t, c, **k: inference_conditions.append(c.clone()) or head_forward(s, t, c, **k)

    def force_tokens(pipe, block, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        latents[:, block * block_size : (block + 1) * block_size] = sequence[:, block * block_size : (block + 1) * block_size]
        return {"latents": latents}

    pipe(prompts, height=height, width=width, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
         callback_on_step_end=force_tokens)  # fmt: skip
    cached = torch.stack(inference_conditions[::2], dim=1)  # first head call of every block
    with torch.no_grad():
        teacher_forced = teacher_forced_conditions(pipe, pipe.tokenize_prompt(prompts), codes)
    assert teacher_forced.shape == cached.shape
    assert (teacher_forced - cached).abs().max() < 1e-5


def tiny_vae():
    torch.manual_seed(0)
    return BitDanceTokenizer(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32)


@pytest.mark.parametrize("gan_weight", [0.0, 0.1])
def test_tokenizer_training_reduces_loss_and_resumes_exactly(tmp_path, gan_weight):
    dataset = ShapesDataset(4, resolution=64, seed=1)
    objective = TokenizerObjectiveConfig(gan_weight=gan_weight, discriminator_channels=8, discriminator_layers=2)
    config = TrainingConfig(output_dir=str(tmp_path / "a"), max_train_steps=12, train_batch_size=4, learning_rate=3e-3,
                            lr_warmup_steps=1, checkpointing_steps=6, adam_epsilon=1e-8, logging_steps=5)  # fmt: skip
    losses = train_tokenizer(tiny_vae(), dataset, config, objective)
    assert len(losses) == 12
    if not gan_weight:  # with a discriminator the total is a two-player game's, not one that must fall
        assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    reloaded = BitDanceTokenizer.from_pretrained(tmp_path / "a" / "final")

    # Stop after 6 steps, then resume from the checkpoint in a fresh model: same weights as the uninterrupted run.
    partial = TrainingConfig(**{**config.__dict__, "output_dir": str(tmp_path / "b"), "max_train_steps": 6})
    train_tokenizer(tiny_vae(), dataset, partial, objective)
    resumed_config = TrainingConfig(**{**config.__dict__, "output_dir": str(tmp_path / "b"), "resume_from_checkpoint": "latest"})
    resumed = tiny_vae()
    resumed_losses = train_tokenizer(resumed, dataset, resumed_config, objective)
    assert resumed_losses == losses[6:]
    for (name, a), b in zip(reloaded.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_decoder_fine_tuning_keeps_the_codes(tmp_path):
    dataset = ShapesDataset(4, resolution=64, seed=1)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(4)])
    vae = tiny_vae()
    encoder_before = {name: tensor.clone() for name, tensor in vae.encoder.state_dict().items()}
    decoder_before = {name: tensor.clone() for name, tensor in vae.decoder.state_dict().items()}
    codes_before = vae.encode(images).codes
    objective = TokenizerObjectiveConfig(decoder_only=True, edge_weight=1.0)
    _, parts = tokenizer_training_loss(vae, images, objective)
    assert set(parts) == {"reconstruction", "edge"}
    losses = train_tokenizer(vae, dataset, TrainingConfig(output_dir=str(tmp_path), max_train_steps=12, train_batch_size=4,
                                                          learning_rate=3e-3, lr_warmup_steps=1, adam_epsilon=1e-8),
                             objective)  # fmt: skip
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    for name, tensor in vae.encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), name
    assert torch.equal(vae.encode(images).codes, codes_before)
    assert any(not torch.equal(t, decoder_before[n]) for n, t in vae.decoder.state_dict().items())


def test_adversarial_loss_trains_each_player_on_its_own_term():
    images = torch.stack([item["pixel_values"] for item in ShapesDataset(2, resolution=64, seed=4)])
    torch.manual_seed(1)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    assert discriminator(images).shape == (2, 1, 14, 14)
    with pytest.raises(ValueError, match="needs a discriminator"):
        tokenizer_training_loss(tiny_vae(), images, TokenizerObjectiveConfig(gan_weight=0.1))

    def gradients(gan_weight):
        vae = tiny_vae()
        discriminator.zero_grad()
        loss, parts = tokenizer_training_loss(vae, images, TokenizerObjectiveConfig(gan_weight=gan_weight), discriminator)
        loss.backward()
        assert {"adversarial", "discriminator"} <= set(parts)
        return [p.grad.clone() for p in discriminator.parameters()], vae.decoder.conv_out.weight.grad.clone()

    (critic_a, decoder_a), (critic_b, decoder_b) = gradients(0.1), gradients(1.0)
    for a, b in zip(critic_a, critic_b):  # the discriminator learns from its hinge loss only
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(decoder_a, decoder_b)  # the tokenizer feels the adversarial weight


def test_edge_loss_compares_pixel_differences():
    flat, ramp = torch.zeros(1, 3, 8, 8), torch.arange(8.0).expand(1, 3, 8, 8) / 8
    vertical, horizontal = pixel_differences(ramp)
    assert vertical.shape == (1, 3, 7, 8) and torch.all(vertical == 0)
    assert horizontal.shape == (1, 3, 8, 7) and torch.allclose(horizontal, torch.full_like(horizontal, 1 / 8))
    assert all(torch.all(d == 0) for d in pixel_differences(flat + 0.5))


def tiny_t2i_pipeline():
    pipe = build_random_pipeline("tiny", block_size=16, image_sizes=[[64, 64]])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_to_image_training_reduces_loss_and_resumes_exactly_with_its_ema(tmp_path):
    dataset = ShapesDataset(2, resolution=64, seed=2)
    objective = T2IObjectiveConfig()
    config = TrainingConfig(output_dir=str(tmp_path / "a"), max_train_steps=16, train_batch_size=2, learning_rate=2e-3,
                            lr_warmup_steps=1, checkpointing_steps=8, adam_epsilon=1e-8, use_ema=True, ema_decay=0.9,
                            logging_steps=5)  # fmt: skip

    def fixed_batch_loss(pipe):
        """The loss on the (single, fixed) batch with fixed times and noise: the per-step loss is too noisy to compare."""
        batch = [dataset[0], dataset[1]]
        with torch.no_grad():
            codes = pipe.vae.encode(torch.stack([item["pixel_values"] for item in batch])).codes
            return t2i_training_loss(pipe, [item["caption"] for item in batch], codes, torch.Generator().manual_seed(0),
                                     T2IObjectiveConfig(bit_flip_max=0.0, text_dropout=0.0)).item()  # fmt: skip

    pipe = tiny_t2i_pipeline()
    before = fixed_batch_loss(pipe)
    losses = train_text_to_image(pipe, dataset, config, objective)
    assert len(losses) == 16 and fixed_batch_loss(pipe) < 0.7 * before
    final = BitDancePipeline.from_pretrained(tmp_path / "a" / "final")
    ema = BitDancePipeline.from_pretrained(tmp_path / "a" / "final-ema")  # the EMA weights load as a pipeline
    for name in ("language_model", "projector", "diffusion_head"):
        for key, tensor in final.components[name].state_dict().items():
            assert torch.equal(tensor, pipe.components[name].state_dict()[key]), key
    assert not torch.equal(ema.diffusion_head.final_layer.linear.weight, final.diffusion_head.final_layer.linear.weight)
    assert ema("a red circle", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 64, 64)

    partial = TrainingConfig(**{**config.__dict__, "output_dir": str(tmp_path / "b"), "max_train_steps": 8})
    train_text_to_image(tiny_t2i_pipeline(), dataset, partial, objective)
    resumed = tiny_t2i_pipeline()
    resumed_config = TrainingConfig(**{**config.__dict__, "output_dir": str(tmp_path / "b"), "resume_from_checkpoint": "latest"})
    assert train_text_to_image(resumed, dataset, resumed_config, objective) == losses[8:]
    resumed_ema = BitDancePipeline.from_pretrained(tmp_path / "b" / "final-ema")
    for name in ("language_model", "diffusion_head"):
        for (key, tensor), other in zip(final.components[name].state_dict().items(),
                                        resumed.components[name].state_dict().values()):  # fmt: skip
            assert torch.equal(tensor, other), key
        for (key, tensor), other in zip(ema.components[name].state_dict().items(),
                                        resumed_ema.components[name].state_dict().values()):  # fmt: skip
            assert torch.equal(tensor, other), key


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Batch 2 x 2 accumulated micro-batches trains as batch 4: the same samples, the same per-sample random draws."""
    dataset = ShapesDataset(8, resolution=64, seed=2)
    runs = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        pipe = tiny_t2i_pipeline()
        config = TrainingConfig(output_dir=str(tmp_path / f"{batch}x{accumulation}"), max_train_steps=3,
                                train_batch_size=batch, gradient_accumulation_steps=accumulation, learning_rate=1e-3,
                                lr_warmup_steps=1, adam_epsilon=1e-8)  # fmt: skip
        runs[batch] = (train_text_to_image(pipe, dataset, config), pipe.diffusion_head.state_dict())
    (losses, weights), (accumulated_losses, accumulated_weights) = runs[4], runs[2]
    assert losses == pytest.approx(accumulated_losses, rel=1e-5)
    for key, tensor in weights.items():
        torch.testing.assert_close(accumulated_weights[key], tensor, rtol=1e-4, atol=1e-5)


def test_metrics():
    images = torch.stack([item["pixel_values"] for item in ShapesDataset(2, resolution=32)])
    assert torch.all(psnr(images, images) > 90) and torch.allclose(ssim(images, images), torch.ones(2))
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(-1, 1)
    assert torch.all(psnr(noisy, images) < 25) and torch.all(ssim(noisy, images) < 0.9)
    codes = torch.where(torch.rand(4, 32, 8, 8) > 0.5, 1.0, -1.0)
    usage = bit_usage(codes)
    assert usage["per_bit_mean"].shape == (32,) and 5.0 < usage["group_entropy_bits"] <= 8.0
    assert bit_usage(torch.ones(1, 32, 4, 4))["group_entropy_bits"] == 0


def test_shapes_dataset_is_deterministic_and_captioned():
    first, again = ShapesDataset(8, resolution=64, seed=3), ShapesDataset(8, resolution=64, seed=3)
    for index in range(8):
        assert first[index]["caption"] == again[index]["caption"]
        assert torch.equal(first[index]["pixel_values"], again[index]["pixel_values"])
    item = first[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].min() >= -1
    assert " background" in item["caption"] and item["caption"].startswith("a ")


@pytest.mark.parametrize("resolution,blur", [(64, 0), (128, 0), (256, 0), (128, 2)])
def test_shapes_detector_reads_rendered_scenes(resolution, blur):
    dataset = ShapesDataset(40, resolution=resolution, seed=11, max_objects=1)
    for index in range(40):
        scene = dataset.scene(index)
        detection = detect_shape(render_scene(scene, resolution).filter(ImageFilter.GaussianBlur(blur)))
        assert (detection.color, detection.position, detection.background, detection.shape) == (
            scene.objects[0].color, scene.objects[0].position, scene.background, scene.objects[0].shape
        ), scene.caption()


def test_shape_reader_tells_each_outline_from_the_others():
    for shape in SHAPES:
        mask = Image.new("1", (96, 96))
        draw_shape(ImageDraw.Draw(mask), shape, 40.0, 52.0, 25.0, 1)
        assert read_shape(np.asarray(mask)) == shape
        assert np.asarray(mask).sum() == pytest.approx(unit_area(shape) * 25.0**2, rel=0.1)  # PIL fills the edge pixels too


def test_demo_recipe_runs_end_to_end(tmp_path):
    config = DemoConfig(num_images=16, tokenizer_resolution=64)
    steps = dict(max_train_steps=2, train_batch_size=2, lr_warmup_steps=1, checkpointing_steps=2, output_dir="",
                 lr_scheduler="cosine")
    train_shapes_demo(str(tmp_path), TrainingConfig(**steps), TrainingConfig(**steps), config,
                      tokenizer_finetuning=TrainingConfig(**steps), decoder_finetuning=TrainingConfig(**steps),
                      adversarial_finetuning=TrainingConfig(**steps),
                      adversarial_objective=TokenizerObjectiveConfig(decoder_only=True, gan_weight=0.1,
                                                                     discriminator_channels=8))  # fmt: skip
    for stage in ("vae", "vae-finetune", "vae-decoder", "vae-gan", "t2i"):
        assert (tmp_path / stage / "checkpoint-2").is_dir(), stage
    pipe = BitDancePipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.tokenizer.convert_tokens_to_ids("<|query_15|>") != pipe.tokenizer.unk_token_id
    assert len(pipe.tokenizer.tokenize("a small red circle at the top left")) < 12  # real BPE merges, not bytes
    image = pipe("a small red circle at the top left on a blue background", num_inference_steps=1, output_type="pt")
    assert image.images.shape == (1, 3, 128, 128)


def test_foreground_weights_mark_the_shapes():
    dataset = ShapesDataset(4, resolution=64, seed=5, max_objects=1)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(4)])
    weights = foreground_weights(images, 10.0)
    background = images[:, :, :1, :1]
    on_shape = (images - background).abs().amax(1, keepdim=True) > 0.5
    assert weights.shape == (4, 1, 64, 64) and set(weights.unique().tolist()) == {1.0, 10.0}
    assert torch.equal(weights == 10, on_shape)


def test_tokenizer_training_refuses_gradient_checkpointing(tmp_path):
    config = TrainingConfig(output_dir=str(tmp_path), max_train_steps=1, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="set gradient_checkpointing=False"):
        train_tokenizer(tiny_vae(), ShapesDataset(1, resolution=64), config)
    assert not any(tmp_path.iterdir())
