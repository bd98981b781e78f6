"""The patch discriminator of the tokenizer's optional adversarial loss (off by default).

A PatchGAN: strided 4x4 convolutions score overlapping patches of an image as real or reconstructed, so the loss
judges local texture and edges rather than the whole picture. GroupNorm instead of BatchNorm keeps every image's
score independent of the rest of its batch.
"""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """``forward(images [B, C, H, W]) -> logits [B, 1, H / 2**num_layers - 2, W / 2**num_layers - 2]``."""

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for index in range(1, num_layers + 1):
            out_channels = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, out_channels // 4), out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Pushes the scores of real patches above 1 and of reconstructed ones below -1."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adversarial_loss(discriminator: PatchDiscriminator, reconstruction: torch.Tensor) -> torch.Tensor:
    """The tokenizer's side of the game: raise the (frozen) discriminator's score of its reconstructions. The
    discriminator's weights are detached here, so this term trains the tokenizer only."""
    frozen = {name: parameter.detach() for name, parameter in discriminator.named_parameters()}
    return -torch.func.functional_call(discriminator, frozen, (reconstruction,)).mean()
