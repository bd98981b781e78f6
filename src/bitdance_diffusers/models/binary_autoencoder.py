"""BitDanceTokenizer: the binary autoencoder that turns images into ±1 token grids and back.

Convolutional encoder -> channel-wise sign (``> 0 -> +1``, else ``-1``); convolutional decoder whose normalisation
is modulated by global statistics of the code grid (adaptive GroupNorm). The large tokenizers (``ae_d32c128``,
``ae_d32c256``) use a "GAN decoder" that concatenates fresh Gaussian noise to the codes, so their decoding is
stochastic. Module attribute names equal the original checkpoint keys (``encoder.down.0.block.0.conv1.weight`` ...),
so original state dicts load without renaming.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import randn_tensor

from ..utils.token_layout import binarize, grid_to_sequence, pack_codes, sequence_to_grid, unpack_codes


def _group_norm(channels: int, num_groups: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a bias-free 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, norm_num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One op per statement: each intermediate is released as soon as the next exists, so at most the input and two
        # feature maps are alive (a full-resolution map of the 14B decoder at 1024x1024 is 512 MiB in bf16).
        h = self.norm1(x)
        h = F.silu(h)
        h = self.conv1(h)
        h = self.norm2(h)
        h = F.silu(h)
        h = self.conv2(h)
        residual = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return residual + h


class AdaptiveGroupNorm(nn.Module):
    """``gamma(std(z)) * GroupNorm(x) + beta(mean(z))`` with per-channel statistics of the code grid ``z``.

    The spatial variance uses the unbiased (N - 1) estimator, as the original does; ``gamma`` multiplies directly
    (not ``1 + gamma``). Because the statistics are global over the grid, decoding cannot be tiled.
    """

    def __init__(self, z_channels: int, channels: int, norm_num_groups: int):
        super().__init__()
        self.gn = _group_norm(channels, norm_num_groups, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(2)
        std = (flat.var(dim=-1, correction=1) + 1e-6).sqrt()
        mean = flat.mean(dim=-1)
        scale = self.gamma(std)[:, :, None, None]
        shift = self.beta(mean)[:, :, None, None]
        return scale * self.gn(x) + shift


class Upsampler(nn.Module):
    """conv3x3 (C -> 4C) then depth-to-space by 2 in DCR order (channel ``(i * 2 + j) * C + c``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        batch, channels, height, width = x.shape
        x = x.view(batch, 2, 2, channels // 4, height, width).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(batch, channels // 4, 2 * height, 2 * width)


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, norm_num_groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.block = nn.ModuleList(ResBlock(widths[i], widths[i + 1], norm_num_groups) for i in range(num_res_blocks))
        self.downsample = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` -> pre-quantisation latent ``[B, z, H / f, W / f]``, ``f = 2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self, in_channels: int, ch: int, ch_mult: tuple, num_res_blocks: int, z_channels: int, norm_num_groups: int
    ):
        super().__init__()
        widths = [ch * m for m in (1, *ch_mult)]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            EncoderLevel(widths[level], widths[level + 1], num_res_blocks, norm_num_groups,
                         downsample=level < len(ch_mult) - 1)  # fmt: skip
            for level in range(len(ch_mult))
        )
        self.mid_block = nn.ModuleList(ResBlock(widths[-1], widths[-1], norm_num_groups) for _ in range(num_res_blocks))
        self.norm_out = _group_norm(widths[-1], norm_num_groups)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        for block in self.mid_block:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class DecoderLevel(nn.Module):
    """The res blocks and upsampler of one decoder resolution; `Decoder.forward` runs them (see there why)."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, norm_num_groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.block = nn.ModuleList(ResBlock(widths[i], widths[i + 1], norm_num_groups) for i in range(num_res_blocks))
        self.upsample = Upsampler(out_channels) if upsample else None


class Decoder(nn.Module):
    """±1 codes ``[B, z, h, w]`` -> image ``[B, out, f*h, f*w]`` (unclamped, about [-1, 1]).

    With ``noise_channels > 0`` (GAN decoder) ``conv_in`` sees ``[codes ‖ noise]``; the adaptive norms always use the
    noise-free codes as style.
    """

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: tuple,
        num_res_blocks: int,
        z_channels: int,
        noise_channels: int,
        norm_num_groups: int,
    ):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels + noise_channels, widths[-1], 3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(widths[-1], widths[-1], norm_num_groups) for _ in range(num_res_blocks))
        # Levels are indexed like the encoder's (0 = full resolution) but run from the last to the first.
        level_inputs = [widths[level + 1] if level + 1 < len(widths) else widths[-1] for level in range(len(widths))]
        self.adaptive = nn.ModuleList(
            AdaptiveGroupNorm(z_channels, level_inputs[level], norm_num_groups) for level in range(len(widths))
        )
        # Keyed "0", "1", ... like a list (the checkpoint's names). Not a ModuleList: `forward` calls each level's blocks
        # itself, and block-level group offloading would hook the never-called levels and leave their weights offloaded;
        # as a dict they load with the decoder.
        self.up = nn.ModuleDict(
            (str(level), DecoderLevel(level_inputs[level], widths[level], num_res_blocks, norm_num_groups, level > 0))
            for level in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0], norm_num_groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, codes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv_in(codes if noise is None else torch.cat([codes, noise], dim=1))
        for block in self.mid_block:
            x = block(x)
        # The levels' blocks run from this one frame: a level's input is released once its first block is done
        # (a call per level would hold it, and the normalised copy, for the whole level: 2x the peak at 1024x1024).
        for level in reversed(range(len(self.up))):
            x = self.adaptive[level](x, codes)
            for block in self.up[str(level)].block:
                x = block(x)
            if self.up[str(level)].upsample is not None:
                x = self.up[str(level)].upsample(x)
        x = self.norm_out(x)
        x = F.silu(x)
        return self.conv_out(x)


@dataclass
class BinaryEncoderOutput(BaseOutput):
    """
    Args:
        codes (`torch.Tensor` of shape `(batch_size, z_channels, height // f, width // f)`):
            Binary codes in {-1, +1}.
    """

    codes: torch.Tensor


class BitDanceTokenizer(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""
    Binary autoencoder of BitDance: ``encode`` maps images in [-1, 1] to ±1 code grids, ``decode`` maps codes back.

    Parameters:
        in_channels (`int`, defaults to 3): image channels.
        out_channels (`int`, defaults to 3): decoded image channels.
        ch (`int`, defaults to 256): base width.
        ch_mult (`tuple[int]`, defaults to `(1, 1, 2, 2, 4)`): width multiplier per level; the down factor is
            ``2 ** (len(ch_mult) - 1)``.
        num_res_blocks (`int`, defaults to 4): residual blocks per level and in the middle.
        z_channels (`int`, defaults to 32): code channels ``C`` (vocabulary ``2 ** C``).
        gan_decoder (`bool`, defaults to `False`): decode ``[codes ‖ Gaussian noise]`` (``ae_d32c128``/``ae_d32c256``).
        norm_num_groups (`int`, defaults to 32): groups of every GroupNorm (the released tokenizers use 32). Narrow
            models want fewer: with one channel per group the norms erase each image's absolute colour.
    """

    _supports_gradient_checkpointing = False
    _group_offload_block_modules = ["encoder", "decoder"]
    _no_split_modules = ["ResBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 256,
        ch_mult: tuple = (1, 1, 2, 2, 4),
        num_res_blocks: int = 4,
        z_channels: int = 32,
        gan_decoder: bool = False,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, norm_num_groups)
        noise_channels = z_channels if gan_decoder else 0
        self.decoder = Decoder(out_channels, ch, ch_mult, num_res_blocks, z_channels, noise_channels, norm_num_groups)
        self.use_slicing = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def enable_tiling(self):
        raise NotImplementedError(
            "BitDanceTokenizer cannot decode in tiles: its adaptive GroupNorm uses statistics of the whole code grid, "
            "so tiles would decode differently. Use enable_slicing() to bound memory over the batch instead."
        )

    def _check_images(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"encode expects a tensor [B, 3, H, W] in [-1, 1], got {type(images).__name__}; convert PIL images or "
                "arrays with diffusers' VaeImageProcessor().preprocess(image) (pipe.image_processor in a pipeline)."
            )
        if not images.is_floating_point():
            raise TypeError(
                f"encode expects floating-point images in [-1, 1], got {images.dtype}; for 0..255 pixels pass "
                "images.float() / 127.5 - 1."
            )
        if images.ndim != 4:
            raise ValueError(f"encode expects images of shape [B, 3, H, W], got shape {tuple(images.shape)}.")
        if images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"encode expects {self.config.in_channels} image channels, got {images.shape[1]} "
                f"(shape {tuple(images.shape)}); convert to RGB and pass [B, 3, H, W] (channels last: "
                "images.permute(0, 3, 1, 2))."
            )
        factor = self.downsample_factor
        height, width = images.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the down factor {factor}; resize or crop to a "
                f"multiple of {factor}."
            )

    def _check_codes(self, codes: torch.Tensor):
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"decode expects a tensor of ±1 codes [B, C, h, w], got {type(codes).__name__}.")
        if codes.ndim != 4:
            raise ValueError(f"decode expects codes of shape [B, {self.config.z_channels}, h, w], got {tuple(codes.shape)}.")
        if codes.shape[1] != self.config.z_channels:
            raise ValueError(
                f"decode expects {self.config.z_channels} code channels, got {codes.shape[1]}; "
                "if the channels are last, permute to [B, C, h, w]."
            )
        if not bool(((codes == 1) | (codes == -1)).all()):
            raise ValueError("decode expects binary codes in {-1, +1}; binarize first with torch.where(x > 0, 1, -1).")

    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_dict: bool = True) -> BinaryEncoderOutput | tuple[torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] (any float dtype; cast to the encoder's) -> ±1 codes ``[B, C, H / f, W / f]``
        (0 maps to -1)."""
        self._check_images(images)
        images = images.to(self.dtype)
        if self.use_slicing and images.shape[0] > 1:
            latents = torch.cat([self.encoder(image) for image in images.split(1)])
        else:
            latents = self.encoder(images)
        codes = binarize(latents)
        if not return_dict:
            return (codes,)
        return BinaryEncoderOutput(codes=codes)

    @apply_forward_hook
    def decode(
        self, codes: torch.Tensor, return_dict: bool = True, generator: torch.Generator | list | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """±1 codes ``[B, C, h, w]`` -> images ``[B, 3, f*h, f*w]`` (unclamped, about [-1, 1]).

        The GAN decoder draws one standard-normal tensor shaped like ``codes`` from ``generator`` (a list gives one
        generator per image); the rest is deterministic.
        """
        self._check_codes(codes)
        codes = codes.to(self.dtype)
        noise = None
        if self.config.gan_decoder:
            noise = randn_tensor(codes.shape, generator=generator, device=codes.device, dtype=torch.float32)
            noise = noise.to(codes.dtype)
        if self.use_slicing and codes.shape[0] > 1:
            noise_slices = noise.split(1) if noise is not None else [None] * codes.shape[0]
            images = torch.cat([self.decoder(c, n) for c, n in zip(codes.split(1), noise_slices)])
        else:
            images = self.decoder(codes, noise)
        if not return_dict:
            return (images,)
        return DecoderOutput(sample=images)

    def forward(self, images: torch.Tensor, return_dict: bool = True, generator=None):
        """Reconstruct: ``decode(encode(images))``."""
        codes = self.encode(images).codes
        return self.decode(codes, return_dict=return_dict, generator=generator)

    # Token helpers -------------------------------------------------------------------------------------------------

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """±1 codes ``[B, C, h, w]`` -> packed vocabulary ids ``[B, h, w, ceil(C / 32)]`` (int64, little-endian)."""
        self._check_codes(codes)
        return pack_codes(codes, dim=1).permute(0, 2, 3, 1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Packed vocabulary ids ``[B, h, w, ceil(C / 32)]`` -> ±1 codes ``[B, C, h, w]`` in the model dtype."""
        return unpack_codes(indices.permute(0, 3, 1, 2), self.config.z_channels, dim=1, dtype=self.dtype)

    @staticmethod
    def codes_to_sequence(codes: torch.Tensor, block_size: int = 1) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, h*w, C]`` in the patch-raster order used for ``block_size`` tokens per step."""
        return grid_to_sequence(codes, block_size)

    @staticmethod
    def sequence_to_codes(sequence: torch.Tensor, height: int, width: int, block_size: int = 1) -> torch.Tensor:
        """Inverse of `codes_to_sequence` for a ``height x width`` latent grid."""
        return sequence_to_grid(sequence, height, width, block_size)
