"""BitDanceImageNetTransformer: the class-conditional LlamaGen-style backbone of the ImageNet models.

A decoder-only transformer reads 64 class tokens (one embedding row per class, index ``num_classes`` = null class for
classifier-free guidance), then, for ``P > 1``, ``P - 1`` learned query tokens, then the image's ±1 tokens in
patch-raster order, ``P`` at a time. The last class token and the query tokens form the first block; every block is
bidirectional inside and causal across blocks (KV cache). The output for the ``P`` positions of a block, after the
final RMSNorm plus a learned per-token embedding (``pos_for_diff``), conditions the diffusion head that samples the
next block. Parameter names equal the original checkpoint's keys.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .attention_masks import block_causal_allowed
from ..utils.token_layout import grid_to_sequence, patch_size_for_block


# Image token (row r, column c) sits at rotary position (r + ROPE_POSITION_OFFSET, c + ROPE_POSITION_OFFSET): the
# original places tokens at their cell centres (+0.5) and shifts the grid by one so that no image token shares the
# identity rotation (position 0) of the class and query tokens.
ROPE_POSITION_OFFSET = 1.5


def feed_forward_hidden_size(hidden_size: int, multiple_of: int = 256) -> int:
    """SwiGLU width ``int(2 * 4 * hidden_size / 3)`` rounded up to a multiple of ``multiple_of`` (LlamaGen)."""
    hidden = int(2 * 4 * hidden_size / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def rope_2d_angles(grid_size: int, head_dim: int, block_size: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of the image tokens, ``[grid_size**2, head_dim / 2]`` float32, in patch-raster order.

    Rotary pairs are adjacent dims ``(2i, 2i + 1)``. The first half of the pairs rotates with the column (x), the
    second half with the row (y); each half uses the frequencies ``theta ** (-2j / (head_dim / 2))``.
    """
    num_pairs = head_dim // 2
    if head_dim % 4:
        raise ValueError(f"2-D rotary embeddings need a head dim divisible by 4, got {head_dim}.")
    frequencies = 1.0 / theta ** (torch.arange(0, num_pairs, 2, dtype=torch.float32) / num_pairs)
    coordinates = torch.arange(grid_size, dtype=torch.float32) + ROPE_POSITION_OFFSET
    rows, columns = torch.meshgrid(coordinates, coordinates, indexing="ij")
    angles = torch.cat([columns[..., None] * frequencies, rows[..., None] * frequencies], dim=-1)  # [g, g, pairs]
    return grid_to_sequence(angles.permute(2, 0, 1).unsqueeze(0), block_size)[0]


def apply_rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` ``[B, S, H, D]`` by angles given as ``cos``/``sin`` ``[S, D / 2]`` (float32)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


class SwiGLU(nn.Module):
    """``w2(silu(a) * b)`` with ``[a | b] = w1(x)`` (the gate is the first half)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * value)


class ImageNetAttnProcessor:
    """Multi-head self-attention with 2-D RoPE, a KV cache and an optional boolean mask."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "ImageNetAttention",
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values,
        layer_index: int,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = attn.wqkv(hidden_states).view(batch, length, 3, attn.heads, attn.head_dim)
        query, key, value = qkv.unbind(dim=2)  # each [B, S, H, D]
        query = apply_rotary_embedding(query, *rotary)
        key = apply_rotary_embedding(key, *rotary)
        if past_key_values is not None:
            # transformers caches are [B, H, S, D].
            key, value = past_key_values.update(key.transpose(1, 2), value.transpose(1, 2), layer_index)
            key, value = key.transpose(1, 2), value.transpose(1, 2)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            attention_kwargs=attention_kwargs,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.wo(out.reshape(batch, length, attn.heads * attn.head_dim))


class ImageNetAttention(nn.Module, AttentionModuleMixin):
    _default_processor_cls = ImageNetAttnProcessor
    _available_processors = [ImageNetAttnProcessor]
    # Query, key and value are one projection already (``wqkv``): nothing for `fuse_qkv_projections` to fuse.
    _supports_qkv_fusion = False

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}.")
        self.heads = heads
        self.head_dim = dim // heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.set_processor(self._default_processor_cls())

    def forward(self, hidden_states, rotary, attention_mask, past_key_values, layer_index, attention_kwargs=None):
        return self.processor(self, hidden_states, rotary, attention_mask, past_key_values, layer_index, attention_kwargs)


class ImageNetTransformerBlock(nn.Module):
    """Pre-RMSNorm block: attention then a bias-free SwiGLU feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, feed_forward_hidden: int, eps: float):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=eps)
        self.attention = ImageNetAttention(dim, heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=eps)
        self.feed_forward = SwiGLU(dim, feed_forward_hidden, dim, bias=False)

    def forward(self, x, rotary, attention_mask, past_key_values, layer_index, attention_kwargs=None):
        attention = self.attention(
            self.attention_norm(x), rotary, attention_mask, past_key_values, layer_index, attention_kwargs
        )
        x = x + attention
        return x + self.feed_forward(self.ffn_norm(x))


class BitDanceImageNetTransformer(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    Class-conditional autoregressive backbone of BitDance-{B,L,H} (ImageNet 256x256).

    Parameters:
        num_classes (`int`, defaults to 1000): class count; embedding row ``num_classes`` is the null class.
        sample_size (`int`, defaults to 16): side of the square latent grid (256 px / 16).
        in_channels (`int`, defaults to 32): bits per image token.
        hidden_size (`int`, defaults to 768): model width (B 768, L 1024, H 1280).
        num_layers (`int`, defaults to 24): transformer blocks (B 24, L 32, H 40).
        num_attention_heads (`int`, defaults to 12): attention heads (width / 64 in every released model).
        num_class_tokens (`int`, defaults to 64): tokens the class embedding is split into.
        block_size (`int`, defaults to 1): tokens per autoregressive step ``P`` (1, 4 or 16).
        feed_forward_multiple_of (`int`, defaults to 256): the feed-forward width is rounded up to this multiple.
        norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        rope_theta (`float`, defaults to 10000.0): rotary base.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ImageNetTransformerBlock"]
    _repeated_blocks = ["ImageNetTransformerBlock"]
    # proj_in (a SwiGLU, not a layer) is matched by diffusers' default "^proj_in$" pattern: its linear layers keep the
    # compute dtype, and listing it says so. pos_for_diff is added to the head condition in full precision.
    _skip_layerwise_casting_patterns = ["norm", "pos_for_diff", "proj_in"]

    @register_to_config
    def __init__(
        self,
        num_classes: int = 1000,
        sample_size: int = 16,
        in_channels: int = 32,
        hidden_size: int = 768,
        num_layers: int = 24,
        num_attention_heads: int = 12,
        num_class_tokens: int = 64,
        block_size: int = 1,
        feed_forward_multiple_of: int = 256,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        patch_size = patch_size_for_block(block_size)
        if sample_size % patch_size:
            raise ValueError(
                f"A {sample_size}x{sample_size} latent grid does not split into blocks of {block_size} tokens."
            )
        self.cls_embedding = nn.Embedding(num_classes + 1, num_class_tokens * hidden_size)
        if block_size > 1:
            self.query_token = nn.Parameter(torch.zeros(1, block_size - 1, hidden_size))
        self.proj_in = SwiGLU(in_channels, int(1.5 * hidden_size), hidden_size, bias=True)
        self.emb_norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        feed_forward_hidden = feed_forward_hidden_size(hidden_size, feed_forward_multiple_of)
        self.layers = nn.ModuleList(
            ImageNetTransformerBlock(hidden_size, num_attention_heads, feed_forward_hidden, norm_eps)
            for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.pos_for_diff = nn.Embedding(sample_size * sample_size, hidden_size)
        self.gradient_checkpointing = False

    @property
    def num_image_tokens(self) -> int:
        return self.config.sample_size**2

    @property
    def prefix_length(self) -> int:
        """Positions before the first image token: the class tokens and the ``P - 1`` query tokens."""
        return self.config.num_class_tokens + self.config.block_size - 1

    def _rotary(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` ``[end - start, head_dim / 2]`` of sequence positions ``start..end - 1``.

        The class and query tokens get the identity rotation; the image token at position ``prefix_length + k`` gets
        the angles of token ``k`` (patch-raster order).
        """
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        image_angles = rope_2d_angles(self.config.sample_size, head_dim, self.config.block_size, self.config.rope_theta)
        angles = torch.cat([image_angles.new_zeros(self.prefix_length, head_dim // 2), image_angles])[start:end]
        angles = angles.to(device)
        return angles.cos(), angles.sin()

    def forward(
        self,
        class_labels: torch.LongTensor | None = None,
        tokens: torch.Tensor | None = None,
        past_key_values=None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Run the next part of the sequence and return the diffusion-head conditions of the tokens it predicts.

        Args:
            class_labels: ``[B]`` class ids (``num_classes`` = null class). Starts a sequence: the class and query
                tokens are run first (the cache, if given, must be empty).
            tokens: ``[B, L, in_channels]`` ±1 image tokens in patch-raster order, continuing the sequence (after the
                class labels, or after what ``past_key_values`` holds). ``L`` is a multiple of ``block_size``.
            past_key_values (`transformers.DynamicCache`, *optional*): keys and values of the earlier positions;
                updated in place.
            attention_kwargs: passed to the attention processors.

        Returns:
            ``sample`` ``[B, M, hidden_size]``: ``norm(hidden) + pos_for_diff`` for the ``M`` image tokens predicted
            by the new positions, in patch-raster order (``M = block_size`` after the class labels or after one
            block of tokens; class labels plus ``L`` tokens predict ``block_size + L`` tokens).
        """
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if class_labels is None and tokens is None:
            raise ValueError("Pass class_labels to start a sequence and/or tokens to continue it.")
        if (class_labels is None) == (past == 0):
            raise ValueError(
                "class_labels start a new sequence (use an empty cache); without them, pass the cache of the "
                "sequence that the tokens continue."
            )
        inputs = []
        if class_labels is not None:
            if bool(((class_labels < 0) | (class_labels > self.config.num_classes)).any()):
                num_classes = self.config.num_classes
                raise ValueError(f"class_labels must lie in [0, {num_classes}] ({num_classes} = the null class).")
            classes = self.cls_embedding(class_labels).unflatten(-1, (self.config.num_class_tokens, -1))
            inputs.append(classes)
            if self.config.block_size > 1:
                inputs.append(self.query_token.expand(classes.shape[0], -1, -1))
        if tokens is not None:
            inputs.append(self.proj_in(tokens.to(self.dtype)))
        hidden_states = self.emb_norm(torch.cat(inputs, dim=1))

        block_size = self.config.block_size
        end = past + hidden_states.shape[1]
        first_predicted = max(past, self.config.num_class_tokens - 1) - (self.config.num_class_tokens - 1)
        num_predicted = end - (self.config.num_class_tokens - 1) - first_predicted
        if (end - self.prefix_length) % block_size or first_predicted + num_predicted > self.num_image_tokens:
            raise ValueError(
                f"The sequence would end at position {end}: image tokens must come in whole blocks of {block_size} and "
                f"at most {self.num_image_tokens - block_size} of them are ever fed (the last block predicts nothing)."
            )
        # Causal over the class tokens, then bidirectional blocks of P starting at the last class token.
        num_blocks = (end - self.config.num_class_tokens + 1) // block_size
        # Built on the CPU: a cached block step sees everything and then needs no mask (and no device sync).
        allowed = block_causal_allowed(self.config.num_class_tokens - 1, num_blocks, block_size)[past:end]
        attention_mask = None if bool(allowed.all()) else allowed[None, None].to(hidden_states.device)
        rotary = self._rotary(past, end, hidden_states.device)

        for index, layer in enumerate(self.layers):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    layer, hidden_states, rotary, attention_mask, past_key_values, index, attention_kwargs
                )
            else:
                hidden_states = layer(hidden_states, rotary, attention_mask, past_key_values, index, attention_kwargs)

        hidden_states = self.norm(hidden_states[:, hidden_states.shape[1] - num_predicted :])
        # Called, not indexed as a weight: offloading and casting hooks run on a module's call.
        predicted = torch.arange(first_predicted, first_predicted + num_predicted, device=hidden_states.device)
        positions = self.pos_for_diff(predicted)
        sample = hidden_states + positions
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)
