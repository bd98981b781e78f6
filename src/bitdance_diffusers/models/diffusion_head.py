"""BitDanceDiffusionHead: the adaLN transformer that denoises all P tokens of a block jointly.

Used by the text-to-image models (1.76 B parameters at width 5120) and, with ``bounded_output=False`` and 64-wide
attention heads, by the class-conditional P > 1 ImageNet models. Parameter names equal the original checkpoint's
keys without their ``net.`` prefix.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .embeddings import TimestepEmbedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` in two kernels (the head is eager elementwise-bound at large batches)."""
    return torch.addcmul(shift, x, 1 + scale)


class HeadAttnProcessor:
    """Bidirectional self-attention over the P tokens of a block (no mask, no positional encoding)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "HeadAttention", hidden_states: torch.Tensor, attention_kwargs: dict | None = None):
        batch, length, _ = hidden_states.shape
        qkv = attn.wqkv(hidden_states).view(batch, length, 3, attn.heads, attn.head_dim)
        query, key, value = qkv.unbind(dim=2)  # each [B, P, H, D]
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attention_kwargs=attention_kwargs,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.wo(out.reshape(batch, length, attn.heads * attn.head_dim))


class HeadAttention(nn.Module, AttentionModuleMixin):
    _default_processor_cls = HeadAttnProcessor
    _available_processors = [HeadAttnProcessor]
    # Query, key and value are one projection already (``wqkv``): nothing for `fuse_qkv_projections` to fuse.
    _supports_qkv_fusion = False

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"Head width {dim} is not divisible by the attention head dim {head_dim}.")
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)
        self.set_processor(self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor, attention_kwargs: dict | None = None) -> torch.Tensor:
        return self.processor(self, hidden_states, attention_kwargs)


class HeadTransformerBlock(nn.Module):
    """adaLN-modulated pre-norm block: attention then SwiGLU, both gated; modulation comes from outside."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        hidden = int(dim * 1.5)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HeadAttention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.w1 = nn.Linear(dim, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, attention_kwargs: dict | None = None) -> torch.Tensor:
        """``x`` ``[B, P, W]``; ``modulation`` ``[B, P, 6W]`` chunked scale1, shift1, gate1, scale2, shift2, gate2."""
        scale1, shift1, gate1, scale2, shift2, gate2 = modulation.chunk(6, dim=-1)
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), attention_kwargs))
        gate, value = self.w1(modulate(self.norm2(x), shift2, scale2)).chunk(2, dim=-1)
        return torch.addcmul(x, gate2, self.w2(F.silu(gate) * value))


class HeadFinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_ln_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def run_ada_ln_head(head: ModelMixin, sample, timestep, condition, *block_args) -> torch.Tensor:
    """The forward every BitDance head shares: embed tokens, time and condition, run the adaLN-modulated blocks (block
    ``i`` takes the modulation of projection ``i // ada_ln_switch_freq``), then the final layer. ``block_args`` are
    passed to every block after ``(x, modulation)``."""
    x = head.input_proj(sample.to(head.dtype))
    y = F.silu(head.time_embed(timestep, head.dtype).unsqueeze(1) + head.cond_embed(condition.to(head.dtype)))
    modulations = [projection(y) for projection in head.ada_ln_blocks]
    for index, block in enumerate(head.res_blocks):
        modulation = modulations[index // head.ada_ln_switch_freq]
        if torch.is_grad_enabled() and head.gradient_checkpointing:
            x = head._gradient_checkpointing_func(block, x, modulation, *block_args)
        else:
            x = block(x, modulation, *block_args)
    return head.final_layer(x, y)


class BitDanceDiffusionHead(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    x-prediction network for one block of P binary tokens, conditioned per token on the backbone's hidden states.

    Parameters:
        in_channels (`int`, defaults to 32): bits per token (``ch_target``).
        condition_channels (`int`, defaults to 5120): width of the backbone condition (``ch_cond``).
        hidden_size (`int`, defaults to 5120): width of the head (``ch_latent``).
        num_layers (`int`, defaults to 6): transformer blocks (``depth_latent``).
        num_ada_ln_layers (`int`, defaults to 2): adaLN projections; block ``i`` uses projection
            ``i // max(1, num_layers // num_ada_ln_layers)`` (``depth_adanln``).
        attention_head_dim (`int`, defaults to 128): 128 for the text-to-image heads, 64 for the ImageNet heads.
        bounded_output (`bool`, defaults to `True`): return ``2 * sigmoid(out) - 1`` (text-to-image) instead of the
            raw prediction (ImageNet).
        time_logit_mean (`float`, defaults to 0.0), time_logit_std (`float`, defaults to 1.0): logit-normal training
            time distribution (``P_mean``/``P_std``); not used at inference.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["HeadTransformerBlock"]
    _repeated_blocks = ["HeadTransformerBlock"]
    _skip_layerwise_casting_patterns = ["norm", "time_embed"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        condition_channels: int = 5120,
        hidden_size: int = 5120,
        num_layers: int = 6,
        num_ada_ln_layers: int = 2,
        attention_head_dim: int = 128,
        bounded_output: bool = True,
        time_logit_mean: float = 0.0,
        time_logit_std: float = 1.0,
    ):
        super().__init__()
        if (num_layers - 1) // max(1, num_layers // num_ada_ln_layers) >= num_ada_ln_layers:
            raise ValueError(
                f"num_layers={num_layers} does not split evenly over num_ada_ln_layers={num_ada_ln_layers}: the last "
                "blocks would have no adaLN projection; use a num_layers that is a multiple of num_ada_ln_layers."
            )
        self.time_embed = TimestepEmbedding(hidden_size)
        self.cond_embed = nn.Linear(condition_channels, hidden_size)
        self.input_proj = nn.Linear(in_channels, hidden_size)
        self.res_blocks = nn.ModuleList(HeadTransformerBlock(hidden_size, attention_head_dim) for _ in range(num_layers))
        self.ada_ln_blocks = nn.ModuleList(nn.Linear(hidden_size, 6 * hidden_size) for _ in range(num_ada_ln_layers))
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
            sample: noisy tokens ``[B, P, in_channels]`` at time ``timestep``.
            timestep: ``[B]`` flow time ``t`` in [0, 1] (1 = data).
            condition: ``[B, P, condition_channels]`` backbone hidden states (+ positional embedding).

            return_dict: return a `Transformer2DModelOutput` (else a 1-tuple).
        Returns:
            ``[B, P, in_channels]`` prediction of the clean tokens, in ``.sample`` or the tuple.
        """
        out = run_ada_ln_head(self, sample, timestep, condition, attention_kwargs)
        out = 2 * torch.sigmoid(out) - 1 if self.config.bounded_output else out
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
