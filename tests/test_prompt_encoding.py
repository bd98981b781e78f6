"""Prompt encodings as diffusers pipelines reuse them: `encode_prompt` in isolation, ``prompt_embeds`` == ``prompt``,
the checks of ``__call__``'s prompt inputs, and prompts longer than the language model's positions."""

import ast
import inspect
import json
import textwrap

import pytest
import torch

from bitdance_diffusers import BitDancePipeline
from bitdance_diffusers.special_tokens import USER_TEMPLATE
from conftest import generator


def run(pipe, prompt=None, **kwargs):
    kwargs = {"height": 128, "width": 128, "num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "latent",
              **kwargs}  # fmt: skip
    return pipe(prompt, **kwargs).images


PROMPTS = ["a red circle", "two small blue squares at the top"]


def test_prompt_embeds_give_the_tokens_of_the_prompt(tiny_pipe):
    """Encoded once, reused across seeds and batch sizes; with or without a negative prompt's encoding."""
    embeds, mask, negative_embeds, negative_mask = tiny_pipe.encode_prompt(PROMPTS, negative_prompt="blurry")
    for seed, per_prompt in ((0, 1), (1, 2)):
        generators = [generator(seed + index) for index in range(2 * per_prompt)]
        from_text = run(tiny_pipe, PROMPTS, negative_prompt="blurry", num_images_per_prompt=per_prompt,
                        generator=generators)  # fmt: skip
        generators = [generator(seed + index) for index in range(2 * per_prompt)]
        from_embeds = run(tiny_pipe, prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative_embeds,
                          negative_prompt_embeds_mask=negative_mask, num_images_per_prompt=per_prompt,
                          generator=generators)  # fmt: skip
        assert from_embeds.shape[0] == 2 * per_prompt and torch.equal(from_embeds, from_text)
    # Embeddings of the prompts with the negative prompt given as text; a single prompt needs no mask.
    mixed = run(tiny_pipe, prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt="blurry", generator=generator(7))
    assert torch.equal(mixed, run(tiny_pipe, PROMPTS, negative_prompt="blurry", generator=generator(7)))
    single, _, _, _ = tiny_pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    assert torch.equal(run(tiny_pipe, prompt_embeds=single, generator=generator(3)),
                       run(tiny_pipe, "a red circle", generator=generator(3)))  # fmt: skip


def test_encode_prompt_in_isolation_feeds_another_pipeline(tiny_pipe):
    """As diffusers' test_encode_prompt_works_in_isolation: encode with one pipeline object, generate with another, and
    the outputs of encode_prompt map by name onto __call__'s arguments."""
    source = textwrap.dedent(inspect.getsource(BitDancePipeline.encode_prompt))
    returns = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Return)]
    names = [element.id for element in returns[0].value.elts]
    assert len(returns) == 1 and set(names) <= set(inspect.signature(BitDancePipeline.__call__).parameters)

    with torch.no_grad():
        outputs = tiny_pipe.encode_prompt(PROMPTS, negative_prompt=["", "dark"], num_images_per_prompt=2)
    embeds, mask = outputs[:2]
    assert embeds.shape[:2] == mask.shape and embeds.shape[0] == 4 and embeds.dtype == tiny_pipe.language_model.dtype
    # Left padding: the shorter prompt's row starts with masked positions.
    assert mask[0].sum() < mask[2].sum() == mask.shape[1] and not bool(mask[0, 0])
    other = BitDancePipeline(**tiny_pipe.components, block_size=16, image_sizes=tiny_pipe.config.image_sizes)
    other.set_progress_bar_config(disable=True)
    from_embeds = run(other, **dict(zip(names, outputs)), generator=generator(5))
    assert torch.equal(from_embeds, run(tiny_pipe, PROMPTS, negative_prompt=["", "dark"], num_images_per_prompt=2,
                                        generator=generator(5)))  # fmt: skip


def test_prompt_inputs_are_checked_with_diffusers_messages(tiny_pipe):
    embeds, mask, negative_embeds, _ = tiny_pipe.encode_prompt(PROMPTS)
    with pytest.raises(ValueError, match="Cannot forward both `prompt`: .* and `prompt_embeds`"):
        run(tiny_pipe, PROMPTS, prompt_embeds=embeds)
    with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):
        run(tiny_pipe)
    with pytest.raises(ValueError, match="Cannot forward both `negative_prompt`: .* and `negative_prompt_embeds`"):
        run(tiny_pipe, PROMPTS, negative_prompt="dark", negative_prompt_embeds=negative_embeds)
    with pytest.raises(ValueError, match=r"`prompt_embeds` must be a tensor \[B, L, 64\]"):
        run(tiny_pipe, prompt_embeds=embeds[0])
    with pytest.raises(ValueError, match=r"`prompt_embeds_mask` must be a tensor of shape \(2, \d+\)"):
        run(tiny_pipe, prompt_embeds=embeds, prompt_embeds_mask=mask[:1])
    with pytest.raises(ValueError, match="`negative_prompt_embeds` has 1 rows for 2 prompts"):
        run(tiny_pipe, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds[:1])


def test_prompt_arguments_are_named_in_errors(tiny_pipe):
    for bad in (128.0, "128", True):
        with pytest.raises(ValueError, match="`height` must be an integer number of pixels"):
            run(tiny_pipe, PROMPTS, height=bad)
        with pytest.raises(ValueError, match="`width` must be an integer number of pixels"):
            run(tiny_pipe, PROMPTS, width=bad)
    with pytest.raises(ValueError, match="`negative_prompt` has 3 entries for 2 prompts"):
        run(tiny_pipe, PROMPTS, negative_prompt=("a", "b", "c"))
    for bad in (3, ["dark", 3], [None, "dark"]):
        with pytest.raises(ValueError, match="`negative_prompt` must be a string .* or a list of strings"):
            run(tiny_pipe, PROMPTS, negative_prompt=bad)
    with pytest.raises(ValueError, match="`num_inference_steps` must be a positive integer, got 0"):
        run(tiny_pipe, PROMPTS, num_inference_steps=0)
    # A tuple of the right length is a list of negative prompts.
    assert torch.equal(run(tiny_pipe, PROMPTS, negative_prompt=("a", "b"), generator=generator(0)),
                       run(tiny_pipe, PROMPTS, negative_prompt=["a", "b"], generator=generator(0)))  # fmt: skip


@pytest.mark.parametrize(
    "config,message",
    [({"block_size": 0}, "`block_size` must be a positive square number"), ({"block_size": 15}, "square number"),
     ({"image_sizes": [[0, 128]]}, "`image_sizes` must be a non-empty list"), ({"image_sizes": []}, "non-empty")],
    ids=["block-size-0", "block-size-15", "zero-side", "no-sizes"],
)  # fmt: skip
def test_a_saved_config_with_impossible_sizes_is_refused_by_name(tiny_pipe, tmp_path, config, message):
    tiny_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, **config}))
    with pytest.raises(ValueError, match=message):
        BitDancePipeline.from_pretrained(tmp_path)


@pytest.fixture
def short_context_pipe(tiny_pipe):
    """The tiny pipeline with 600 positions and 128x128 images: 600 - 64 image tokens - 2 leave 534 for the prompt."""
    tiny_pipe.language_model.config.max_position_embeddings = 600
    tiny_pipe.register_to_config(image_sizes=[[128, 128]])
    return tiny_pipe


def test_prompts_longer_than_the_positions_are_truncated_with_a_warning(short_context_pipe, caplog):
    pipe = short_context_pipe
    head, tail = (pipe.tokenizer.encode(part) for part in USER_TEMPLATE.split("{}"))
    limit = pipe.max_prompt_tokens()
    assert limit == 600 - 64 - 2 - len(head) - len(tail)
    long_prompt = "a red circle " * 60  # 780 byte tokens
    with caplog.at_level("WARNING"):
        (ids,) = pipe.tokenize_prompt(long_prompt)
    assert ids == pipe.tokenizer.encode(USER_TEMPLATE.format(long_prompt[:limit]))  # the template stays whole
    assert f"truncated because `max_sequence_length` is set to {limit} tokens: '{long_prompt[limit:]}'" in caplog.text
    truncated = run(pipe, long_prompt, generator=generator(0))
    assert torch.equal(truncated, run(pipe, long_prompt[:limit], generator=generator(0)))
    assert torch.equal(run(pipe, long_prompt, max_sequence_length=5, generator=generator(0)),
                       run(pipe, long_prompt[:5], generator=generator(0)))  # fmt: skip
    with pytest.raises(ValueError, match=rf"`max_sequence_length` must be an integer in \[1, {limit}\]"):
        run(pipe, "a", max_sequence_length=limit + 1)
    embeds, _, _, _ = pipe.encode_prompt(long_prompt, do_classifier_free_guidance=False, max_sequence_length=limit)
    with pytest.raises(ValueError, match="`prompt_embeds` holds 5\\d\\d tokens; .* 600 positions leave 534"):
        run(pipe, prompt_embeds=torch.cat([embeds, embeds[:, :20]], dim=1))


def test_an_image_without_room_for_a_prompt_is_refused(short_context_pipe):
    short_context_pipe.register_to_config(image_sizes=[[128, 128], [512, 512]])
    with pytest.raises(ValueError, match="A 512x512 image leaves no room for a prompt in the language model's 600"):
        run(short_context_pipe, "a", height=512, width=512)
    with pytest.raises(ValueError, match="pass max_sequence_length \\(at most 515 for 128x128\\)"):
        run(short_context_pipe, "a")
    assert run(short_context_pipe, "a", max_sequence_length=515).shape == (1, 32, 8, 8)


def test_long_prefills_run_in_chunks_with_masks_linear_in_the_prompt_length(tiny_pipe):
    engine = tiny_pipe.block_engine
    rows = [torch.randn(length, 64, generator=generator(length)) for length in (700, 300)]
    prefix = tiny_pipe.image_prefix_ids(128, 128)
    masks = []

    def record_masks(kind, forward):
        def wrapper(position_ids, attention_mask, inputs_embeds):
            masks.append(tuple(attention_mask.shape))
            return forward(position_ids, attention_mask, inputs_embeds)

        return wrapper

    conditions = {}
    for chunk in (4096, 128):
        engine.prefill_chunk_size = chunk
        with torch.no_grad(), engine.session(tiny_pipe.language_model, tiny_pipe.projector, 16):
            with engine.observe_calls(record_masks):
                conditions[chunk] = engine.prefill(rows, prefix, 8, 8)
    length = 700 + len(prefix)
    assert masks[0] == (2, 1, length, length)  # one forward: exactly the unchunked prefill
    # Chunks of 128 queries against the keys so far; the last chunk holds the whole prefix block.
    assert masks[1:] == [(2, 1, 128, end) for end in range(128, 641, 128)] + [(2, 1, length - 640, length)]
    torch.testing.assert_close(conditions[128], conditions[4096], atol=1e-5, rtol=1e-5)


def test_a_batch_decodes_one_image_at_a_time(tiny_pipe):
    batches = []
    hook = tiny_pipe.vae.decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        images = run(tiny_pipe, PROMPTS, num_images_per_prompt=2, output_type="pt", generator=generator(0))
    finally:
        hook.remove()
    assert images.shape[0] == 4 and batches == [1, 1, 1, 1] and not tiny_pipe.vae.use_slicing
