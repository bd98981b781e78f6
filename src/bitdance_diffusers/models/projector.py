"""BitDanceProjector: embeds ±1 token vectors into the language model's hidden space."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput


class BitDanceProjector(ModelMixin, ConfigMixin):
    r"""
    Two-layer MLP ``fc2(gelu_tanh(fc1(tokens)))``: ``[B, P, in_channels]`` -> ``[B, P, hidden_size]``.

    Parameters:
        in_channels (`int`, defaults to 32): bits per token.
        hidden_size (`int`, defaults to 5120): the language model's hidden size.
    """

    @register_to_config
    def __init__(self, in_channels: int = 32, hidden_size: int = 5120):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, tokens: torch.Tensor, return_dict: bool = True) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """``tokens [B, P, in_channels]`` -> embeddings ``[B, P, hidden_size]`` (in ``.sample``, or a 1-tuple)."""
        out = self.fc2(F.gelu(self.fc1(tokens.to(self.dtype)), approximate="tanh"))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
