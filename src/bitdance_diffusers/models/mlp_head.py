"""BitDanceMLPHead: the per-token diffusion head of the next-token (``P = 1``) ImageNet models.

A stack of adaLN-modulated residual SwiGLU blocks acting on each token independently (no attention). Parameter names
equal the original checkpoint's keys without their ``head.net.`` prefix.
"""

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .diffusion_head import HeadFinalLayer, modulate, run_ada_ln_head
from .embeddings import TimestepEmbedding
from .imagenet_transformer import SwiGLU


class MLPResBlock(SwiGLU):
    """``x + gate * SwiGLU(LayerNorm(x) * (1 + scale) + shift)``; the modulation comes from outside.

    A `SwiGLU` (its ``w1``/``w2`` are the block's own weights, as in the original) plus the block's LayerNorm.
    """

    def __init__(self, dim: int):
        super().__init__(dim, int(1.5 * dim), dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., W]``; ``modulation`` ``[..., 3W]`` chunked scale, shift, gate."""
        scale, shift, gate = modulation.chunk(3, dim=-1)
        return torch.addcmul(x, gate, super().forward(modulate(self.norm(x), shift, scale)))


class BitDanceMLPHead(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    x-prediction network for single binary tokens, conditioned per token on the backbone output.

    Parameters:
        in_channels (`int`, defaults to 32): bits per token.
        condition_channels (`int`, defaults to 768): width of the backbone condition.
        hidden_size (`int`, defaults to 768): width of the head.
        num_layers (`int`, defaults to 6): residual blocks.
        num_ada_ln_layers (`int`, defaults to 2): adaLN projections; block ``i`` uses projection
            ``i // max(1, num_layers // num_ada_ln_layers)``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["MLPResBlock"]
    _repeated_blocks = ["MLPResBlock"]
    _skip_layerwise_casting_patterns = ["norm", "time_embed"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        condition_channels: int = 768,
        hidden_size: int = 768,
        num_layers: int = 6,
        num_ada_ln_layers: int = 2,
    ):
        super().__init__()
        self.time_embed = TimestepEmbedding(hidden_size)
        self.cond_embed = nn.Linear(condition_channels, hidden_size)
        self.input_proj = nn.Linear(in_channels, hidden_size)
        self.res_blocks = nn.ModuleList(MLPResBlock(hidden_size) for _ in range(num_layers))
        self.ada_ln_blocks = nn.ModuleList(nn.Linear(hidden_size, 3 * hidden_size) for _ in range(num_ada_ln_layers))
        self.final_layer = HeadFinalLayer(hidden_size, in_channels)
        self.ada_ln_switch_freq = max(1, num_layers // num_ada_ln_layers)
        self.gradient_checkpointing = False

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            sample: noisy tokens ``[B, P, in_channels]`` at time ``timestep`` (each token is processed alone).
            timestep: ``[B]`` flow time ``t`` in [0, 1] (1 = data).
            condition: ``[B, P, condition_channels]`` backbone output.
            attention_kwargs: unused (the head has no attention); accepted so that every BitDance head is called
                the same way.

            return_dict: return a `Transformer2DModelOutput` (else a 1-tuple).
        Returns:
            ``[B, P, in_channels]`` raw prediction of the clean tokens, in ``.sample`` or the tuple.
        """
        out = run_ada_ln_head(self, sample, timestep, condition)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
