"""Packed grouped-query attention: the same numbers as transformers' sdpa, without repeating the KV cache."""

import pytest
import torch
from conftest import generator
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bitdance_diffusers.models.grouped_query_attention import (
    PACKED_GQA_SDPA,
    packed_gqa_attention,
    packed_gqa_sdpa_forward,
)


class GroupedAttention(torch.nn.Module):
    num_key_value_groups = 4


def attention_inputs(dtype, batch=2, heads=8, kv_heads=2, length=16, cached=40, head_dim=32):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, length, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)  # non-contiguous
    key, value = (torch.randn(batch, kv_heads, cached, head_dim, generator=gen).to(dtype) for _ in range(2))
    return query, key, value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_mask_gives_sdpa_output_bit_for_bit(dtype):
    query, key, value = attention_inputs(dtype)
    hidden = torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) < 0.3
    mask = torch.zeros(2, 1, 1, 40, dtype=dtype).masked_fill(hidden[:, None, None], torch.finfo(dtype).min)
    expected, _ = sdpa_attention_forward(GroupedAttention(), query, key, value, mask, scaling=0.2)
    packed, _ = packed_gqa_sdpa_forward(GroupedAttention(), query, key, value, mask, scaling=0.2)
    assert packed.shape == (2, 16, 8, 32)
    assert torch.equal(packed, expected)


def test_per_query_mask_goes_to_sdpa(monkeypatch):
    query, key, value = attention_inputs(torch.float32)
    causal = torch.ones(16, 40, dtype=torch.bool).tril(24)
    mask = torch.zeros(2, 1, 16, 40).masked_fill(~causal, torch.finfo(torch.float32).min)
    repeated = []
    monkeypatch.setattr("transformers.integrations.sdpa_attention.repeat_kv", lambda x, n: repeated.append(n) or
                        x.repeat_interleave(n, dim=1))  # fmt: skip
    expected, _ = sdpa_attention_forward(GroupedAttention(), query, key, value, mask)
    output, _ = packed_gqa_sdpa_forward(GroupedAttention(), query, key, value, mask)
    assert repeated == [4, 4, 4, 4]  # both calls repeated keys and values: the per-query mask was not packed
    assert torch.equal(output, expected)


def test_pipeline_block_steps_use_packed_attention_and_match_sdpa(tiny_pipe, monkeypatch):
    language_model = tiny_pipe.language_model
    packed_calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        packed_calls.append(attention_mask.shape[2] == 1)
        return packed_gqa_sdpa_forward(module, query, key, value, attention_mask, **kwargs)

    run = dict(prompt="a cat", height=64, width=64, num_inference_steps=3, output_type="latent")
    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_GQA_SDPA, spy)
    packed = tiny_pipe(**run, generator=generator(0)).images
    num_layers = language_model.config.num_hidden_layers
    num_blocks = 64 // tiny_pipe.vae_scale_factor * (64 // tiny_pipe.vae_scale_factor) // tiny_pipe.config.block_size
    # prefill (per-query mask) once, then one shared-mask step per block but the last, every layer
    assert packed_calls == [False] * num_layers + [True] * num_layers * (num_blocks - 1)
    assert language_model.config._attn_implementation == "sdpa"  # restored after the call

    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_GQA_SDPA, sdpa_attention_forward)
    assert torch.equal(packed, tiny_pipe(**run, generator=generator(0)).images)


def test_other_attention_implementations_are_left_alone(tiny_pipe):
    language_model = tiny_pipe.language_model
    language_model.set_attn_implementation("eager")
    with packed_gqa_attention(language_model):
        assert language_model.config._attn_implementation == "eager"


def test_implementation_is_restored_after_an_error(tiny_pipe):
    language_model = tiny_pipe.language_model
    with pytest.raises(RuntimeError, match="boom"):
        with packed_gqa_attention(language_model):
            assert language_model.config._attn_implementation == PACKED_GQA_SDPA
            raise RuntimeError("boom")
    assert language_model.config._attn_implementation == "sdpa"


def test_language_model_layers_compile_without_graph_breaks(tiny_pipe):
    run = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, output_type="latent")
    eager = tiny_pipe(**run, generator=generator(0)).images
    layers = tiny_pipe.language_model.layers
    try:
        for layer in layers:
            layer.compile(fullgraph=True, backend="aot_eager")
        assert torch.equal(tiny_pipe(**run, generator=generator(0)).images, eager)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # back to eager
