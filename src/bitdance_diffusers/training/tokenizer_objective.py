"""Training objective and metrics of the binary tokenizer (`BitDanceTokenizer`).

Quantisation is the channel-wise sign with a straight-through estimator. The group-wise entropy loss follows the
original's ImageNet quantiser: the ``C`` channels form groups of ``bits_per_group`` bits; for each group the soft
assignment over its ``2 ** bits_per_group`` ±1 codewords is ``softmax(2 <h, codeword> / temperature)``; the loss is
the mean per-token entropy (pushes each token to one code) minus the entropy of the batch-averaged assignment (pushes
the batch to use every code). A commitment term ``|h - sign(h)|^2`` keeps pre-quantisation values near ±1.

With ``gan_weight > 0`` a `PatchDiscriminator` joins the game (hinge loss): the discriminator learns to tell images
from reconstructions while the tokenizer learns to fool it; both update in the same optimizer step, each from its own
term only. Off by default; enable it in a later stage, once reconstructions are already close, as VQGAN does.

With ``decoder_only`` the encoder is frozen and only the decoder learns to draw the fixed codes: the codes, and so any
generator trained on them, stay valid (the way latent-diffusion VAEs get their decoders fine-tuned).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.binary_autoencoder import BitDanceTokenizer
from ..utils.token_layout import binarize
from .discriminator import PatchDiscriminator, adversarial_loss, hinge_discriminator_loss
from .randomness import Generators, random_rows


@dataclass
class TokenizerObjectiveConfig:
    reconstruction: str = "l1"  # "l1" or "l2"
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    bits_per_group: int = 8
    temperature: float = 0.01
    # Weight of foreground pixels (those far from the image's border colour) in the reconstruction loss; 1 = off.
    # For plain-background images such as the shapes set, where small objects are a few percent of the pixels.
    foreground_weight: float = 1.0
    # Weight of an L1 loss between the horizontal and vertical pixel differences of reconstruction and image: it
    # rewards sharp outlines, which a plain pixel loss lets blur. 0 = off.
    edge_weight: float = 0.0
    decoder_only: bool = False  # freeze the encoder (and so the codes); train the decoder alone
    gan_weight: float = 0.0  # weight of the adversarial loss; 0 = off (no discriminator)
    discriminator_channels: int = 64
    discriminator_layers: int = 3


def straight_through_sign(latents: torch.Tensor) -> torch.Tensor:
    """±1 codes in the forward pass, identity gradient in the backward pass."""
    return latents + (binarize(latents) - latents).detach()


def group_codebook(bits: int, device=None) -> torch.Tensor:
    """``[2 ** bits, bits]`` ±1 codewords; codeword ``k`` has bit ``i`` set (+1) where ``k`` has bit ``i`` set."""
    index = torch.arange(2**bits, device=device)[:, None]
    return ((index >> torch.arange(bits, device=device)) & 1).float() * 2 - 1


def entropy_loss(latents: torch.Tensor, bits_per_group: int, temperature: float) -> torch.Tensor:
    """Per-token entropy minus batch entropy of the soft group assignments of ``latents [B, C, h, w]``."""
    channels = latents.shape[1]
    if channels % bits_per_group:
        raise ValueError(f"{channels} code channels do not split into groups of {bits_per_group} bits.")
    tokens = latents.permute(0, 2, 3, 1).reshape(-1, channels // bits_per_group, bits_per_group).float()
    logits = 2 * tokens @ group_codebook(bits_per_group, latents.device).T / temperature  # [N, groups, 2**bits]
    probs = logits.softmax(-1)
    token_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    mean_probs = probs.mean(0)
    batch_entropy = -(mean_probs * (mean_probs + 1e-5).log()).sum(-1).mean()
    return token_entropy - batch_entropy


def tokenizer_training_loss(
    vae: BitDanceTokenizer,
    images: torch.Tensor,
    config: TokenizerObjectiveConfig = TokenizerObjectiveConfig(),
    discriminator: PatchDiscriminator | None = None,
    generator: Generators = None,
) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts for ``images [B, 3, H, W]`` in [-1, 1]; ``discriminator`` when ``gan_weight > 0``;
    ``generator`` (one, or one per image) draws the decoder's noise of a ``gan_decoder`` tokenizer."""
    if config.gan_weight and discriminator is None:
        raise ValueError("gan_weight > 0 needs a discriminator: pass a PatchDiscriminator (train_tokenizer makes one).")
    with torch.set_grad_enabled(torch.is_grad_enabled() and not config.decoder_only):
        latents = vae.encoder(images)
    codes = straight_through_sign(latents)
    noise = None
    if vae.config.gan_decoder:
        noise = random_rows(codes.shape, generator, codes.device, normal=True).to(codes.dtype)
    reconstruction = vae.decoder(codes, noise)
    if config.reconstruction == "l1":
        errors = (reconstruction - images).abs()
    elif config.reconstruction == "l2":
        errors = (reconstruction - images).pow(2)
    else:
        raise ValueError(f"reconstruction must be 'l1' or 'l2', got {config.reconstruction!r}.")
    weights = foreground_weights(images, config.foreground_weight) if config.foreground_weight != 1 else None
    recon_loss = errors.mean() if weights is None else (errors * weights).sum() / (weights.sum() * images.shape[1])
    parts = {"reconstruction": recon_loss}
    if config.edge_weight:
        differences = zip(pixel_differences(reconstruction), pixel_differences(images))
        parts["edge"] = sum((drawn - target).abs().mean() for drawn, target in differences)
    if not config.decoder_only:  # with a frozen encoder these terms are constants
        parts["entropy"] = entropy_loss(latents, config.bits_per_group, config.temperature)
        parts["commitment"] = (latents - binarize(latents).detach()).pow(2).mean()
    if config.gan_weight:
        parts["adversarial"] = adversarial_loss(discriminator, reconstruction)
        parts["discriminator"] = hinge_discriminator_loss(discriminator(images), discriminator(reconstruction.detach()))
    loss_weights = {"reconstruction": 1.0, "edge": config.edge_weight, "entropy": config.entropy_weight,
                    "commitment": config.commitment_weight, "adversarial": config.gan_weight,
                    "discriminator": 1.0}  # fmt: skip
    total = sum(loss_weights[name] * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}


def pixel_differences(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical ``[B, C, H - 1, W]`` and horizontal ``[B, C, H, W - 1]`` neighbour differences of ``images``."""
    return images[..., 1:, :] - images[..., :-1, :], images[..., :, 1:] - images[..., :, :-1]


def foreground_weights(images: torch.Tensor, weight: float, threshold: float = 0.3) -> torch.Tensor:
    """``[B, 1, H, W]``: ``weight`` where a pixel is farther than ``threshold`` (RMS over channels, images in [-1, 1])
    from the median colour of its image's border, 1 elsewhere."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1)
    background = border.median(dim=-1).values[:, :, None, None]
    distance = (images - background).pow(2).mean(1, keepdim=True).sqrt()
    return 1 + (weight - 1) * (distance > threshold).float()


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (clamped)."""
    mse = ((reconstruction.clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(reconstruction: torch.Tensor, images: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Gaussian window, on [0, 1] intensities averaged over channels)."""
    x, y = (reconstruction.clamp(-1, 1) + 1) / 2, (images + 1) / 2
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    gauss = torch.exp(-coords**2 / (2 * sigma**2))
    kernel = (gauss[:, None] * gauss[None]) / gauss.sum() ** 2
    kernel = kernel.expand(x.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1)


def bit_usage(codes: torch.Tensor, bits_per_group: int = 8) -> dict:
    """How the codes ``[B, C, h, w]`` use the vocabulary: per-bit mean of (+1) and the group-code entropy in bits."""
    ones = (codes > 0).float()
    per_bit = ones.mean(dim=(0, 2, 3))
    groups = ones.permute(0, 2, 3, 1).reshape(-1, codes.shape[1] // bits_per_group, bits_per_group)
    index = (groups * 2 ** torch.arange(bits_per_group, device=codes.device)).sum(-1).long()
    entropies = []
    for group in range(index.shape[1]):
        counts = torch.bincount(index[:, group], minlength=2**bits_per_group).float()
        p = counts / counts.sum()
        entropies.append(-(p[p > 0] * p[p > 0].log2()).sum())
    return {"per_bit_mean": per_bit, "group_entropy_bits": torch.stack(entropies).mean()}
