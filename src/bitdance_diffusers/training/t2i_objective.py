"""Training objective of the text-to-image generator, computed with the inference pipeline's own modules.

One teacher-forced forward of the language model sees, per row, ``[prompt, <|vision_start|>, <|res_h|>]`` causally,
then the prefix block ``[<|res_w|>, <|query_1..P-1|>]`` and the image blocks ``0 .. n-2`` as bidirectional blocks
(the block-causal mask of `models.attention_masks`, the same one the cached inference builds step by step). The hidden
states of block ``j`` plus the 2-D sin-cos position of image block ``j`` condition the diffusion head, which learns
block ``j`` with the flow objective: ``t ~ sigmoid(N(mean, std))``, ``z = (1 - t) noise + t x``, loss
``|v - v_hat|^2`` with ``v = (x - z) / max(1 - t, 0.05)`` and ``v_hat`` from the head's x-prediction.
Augmentations of the original recipe: each input bit is flipped with probability ``U * bit_flip_max`` (``U`` uniform
per image) and the prompt is replaced by the unconditional template with probability ``text_dropout``.
"""

from dataclasses import dataclass

import torch

from ..models.attention_masks import left_padded_block_causal
from ..models.embeddings import sincos_2d_sequence
from ..pipelines.engines import x_prediction_to_velocity
from ..pipelines.pipeline_bitdance import BitDancePipeline
from ..utils.token_layout import grid_to_sequence
from .randomness import Generators, random_rows


@dataclass
class T2IObjectiveConfig:
    bit_flip_max: float = 0.1
    text_dropout: float = 0.1


def flip_bits(tokens: torch.Tensor, max_probability: float, generator: Generators) -> torch.Tensor:
    """Flip each ±1 entry of ``tokens [B, ...]`` with probability ``U * max_probability``, ``U ~ U(0, 1)`` per row."""
    if max_probability <= 0:
        return tokens
    rate = random_rows((tokens.shape[0],), generator, tokens.device) * max_probability
    flips = random_rows(tokens.shape, generator, tokens.device) < rate.view(-1, *[1] * (tokens.ndim - 1))
    return torch.where(flips, -tokens, tokens)


def flow_matching_loss(
    head: torch.nn.Module, tokens: torch.Tensor, condition: torch.Tensor, generator: Generators
) -> torch.Tensor:
    """Flow loss of the head on the blocks ``tokens [B, n, P, C]`` of ``B`` samples given ``condition [B, n, P, D]``;
    one time per block."""
    config = head.config
    batch, num_blocks, block_size, channels = tokens.shape
    t = torch.sigmoid(random_rows((batch, num_blocks), generator, tokens.device, normal=True) * config.time_logit_std
                      + config.time_logit_mean).flatten()  # fmt: skip
    noise = random_rows(tokens.shape, generator, tokens.device, normal=True).flatten(0, 1)
    tokens, condition = tokens.flatten(0, 1), condition.flatten(0, 1)
    t_tokens = t.view(-1, 1, 1)
    noisy = (1 - t_tokens) * noise + t_tokens * tokens
    target = x_prediction_to_velocity(tokens, noisy, t_tokens)
    predicted = x_prediction_to_velocity(head(noisy, t, condition, return_dict=False)[0], noisy, t_tokens)
    return (predicted - target).pow(2).mean()


def teacher_forced_conditions(
    pipe: BitDancePipeline, row_ids: list[list[int]], codes: torch.Tensor, input_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Head conditions for every block of every row in one language-model forward.

    Args:
        pipe: supplies the tokenizer, language model, projector and block size.
        row_ids: prompt token ids per row (as `BitDancePipeline.tokenize_prompt` builds them).
        codes: ±1 grids ``[B, C, h, w]`` (the image of each row).
        input_tokens: the tokens fed to the language model ``[B, h*w, C]`` (e.g. with flipped bits); default: ``codes``.

    Returns:
        ``[B, n, P, D]`` float32: hidden states of block ``j`` plus the position of image block ``j``.
    """
    block_size = pipe.config.block_size
    batch, _, grid_height, grid_width = codes.shape
    factor = pipe.vae_scale_factor
    num_blocks = grid_height * grid_width // block_size
    tokens = grid_to_sequence(codes, block_size) if input_tokens is None else input_tokens
    prefix = pipe.image_prefix_ids(grid_height * factor, grid_width * factor)
    device, lm_dtype = codes.device, pipe.language_model.dtype

    embed_tokens = pipe.language_model.get_input_embeddings()
    hidden_size = embed_tokens.embedding_dim
    positions = sincos_2d_sequence(grid_height, grid_width, hidden_size, block_size).to(device)
    fed_back = (num_blocks - 1) * block_size  # the last block conditions nothing
    projected = pipe.projector(tokens[:, :fed_back], return_dict=False)[0]
    image_embeds = (projected.float() + positions[:fed_back]).to(lm_dtype)

    causal_lengths = torch.tensor([len(ids) + len(prefix) - block_size for ids in row_ids], device=device)
    mask, position_ids, _ = left_padded_block_causal(causal_lengths, num_blocks, block_size, lm_dtype)
    pad_id = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else 0
    text_length = int(causal_lengths.max()) + block_size
    text_ids = torch.tensor(
        [[pad_id] * (text_length - len(ids) - len(prefix)) + ids + prefix for ids in row_ids], device=device
    )
    inputs_embeds = torch.cat([embed_tokens(text_ids), image_embeds], dim=1)
    output = pipe.language_model(
        inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
    )
    hidden = output.last_hidden_state[:, -num_blocks * block_size :].float() + positions
    return hidden.view(batch, num_blocks, block_size, hidden_size)


def t2i_training_loss(
    pipe: BitDancePipeline,
    captions: list[str],
    codes: torch.Tensor,
    generator: Generators = None,
    config: T2IObjectiveConfig = T2IObjectiveConfig(),
) -> torch.Tensor:
    """The generator's training loss on ``codes [B, C, h, w]`` with their ``captions``; ``generator`` may be a list of
    one generator per sample."""
    drop = [False] * len(captions)
    if config.text_dropout > 0:
        drop = (random_rows((len(captions),), generator, codes.device) < config.text_dropout).tolist()
    # A dropped caption reads the prompt-free template of the unconditional branch.
    row_ids = pipe.tokenize_prompt([None if dropped else caption for caption, dropped in zip(captions, drop)])
    targets = grid_to_sequence(codes, pipe.config.block_size)
    inputs = flip_bits(targets, config.bit_flip_max, generator)
    conditions = teacher_forced_conditions(pipe, row_ids, codes, inputs)
    batch, num_blocks, block_size, _ = conditions.shape
    return flow_matching_loss(
        pipe.diffusion_head, targets.view(batch, num_blocks, block_size, codes.shape[1]), conditions, generator
    )
