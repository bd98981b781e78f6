"""LoRA adapters: diffusers' LoRA file format, load / fuse / switch / unload on both pipelines (LoRA training:
test_training_lora.py)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image
from safetensors import safe_open

from bitdance_diffusers import BitDanceImageNetPipeline, BitDancePipeline
from bitdance_diffusers.loaders import adapter_state_and_config, add_lora_adapter
from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline, build_random_pipeline
from bitdance_diffusers.training import LORA_TARGET_MODULES
from conftest import generator, offline_hub_cache
from cuda_graph_stub import eager_graphs  # noqa: F401 (fixture)


def fresh_pipe():
    pipe = build_random_pipeline("tiny", block_size=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    return pipe("a red circle", height=128, width=128, num_inference_steps=2, generator=generator(0),
                output_type="latent").images  # fmt: skip


@torch.no_grad()
def model_outputs(pipe):
    """The language model's hidden states and the head's prediction on fixed inputs (compared with a tolerance where
    rounding may flip a token of the chaotic random model)."""
    torch.manual_seed(2)
    width = pipe.diffusion_head.config.condition_channels
    head_inputs = (torch.randn(2, 16, 32), torch.rand(2), torch.randn(2, 16, width))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    return pipe.language_model(input_ids=ids).last_hidden_state, pipe.diffusion_head(*head_inputs).sample


def add_random_adapters(pipe, targets, rank=4, seed=1):
    """Adapters with random (non-zero) weights, so that they change the result."""
    torch.manual_seed(seed)
    for name, modules in targets.items():
        add_lora_adapter(getattr(pipe, name), LoraConfig(r=rank, lora_alpha=rank, target_modules=modules,
                                                         init_lora_weights=False))  # fmt: skip


def save_adapters(pipe, directory, configs_of=None):
    """Save every component's adapter, with the LoRA configs of the components ``configs_of`` (default: all)."""
    arguments = {}
    for name in pipe._lora_loadable_modules:
        layers, config = adapter_state_and_config(getattr(pipe, name))
        arguments[f"{name}_lora_layers"] = layers
        if configs_of is None or name in configs_of:
            arguments[f"{name}_lora_adapter_metadata"] = config
    type(pipe).save_lora_weights(directory, **arguments)


# Without a component's config in the file, its ranks and modules are read off the tensors.
@pytest.mark.parametrize("configs_of", [None, (), ("diffusion_head",)], ids=["configs", "no-configs", "head-config"])
def test_saved_adapters_load_fuse_switch_and_unload(tmp_path, configs_of):
    pipe = fresh_pipe()
    base, base_outputs = run(pipe), model_outputs(pipe)
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    adapted = run(pipe)
    assert not torch.equal(adapted, base)
    save_adapters(pipe, tmp_path, configs_of)
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"language_model", "diffusion_head"}

    loaded = fresh_pipe()
    loaded.load_lora_weights(tmp_path)
    assert loaded.get_list_adapters() == {"language_model": ["default_0"], "diffusion_head": ["default_0"]}
    assert torch.equal(run(loaded), adapted)
    loaded.set_adapters("default_0", 0.0)
    assert torch.equal(run(loaded), base)
    loaded.set_adapters("default_0", 1.0)
    assert torch.equal(run(loaded), adapted)

    # Fusing merges the adapter into the base weights; both models then compute what they did with the separate
    # adapter (to rounding).
    head, language_model = loaded.diffusion_head, loaded.language_model

    def base_weights():
        return [head.res_blocks[0].w1.base_layer.weight.clone(),
                language_model.layers[0].self_attn.q_proj.base_layer.weight.clone()]  # fmt: skip

    with_adapter, unfused = model_outputs(loaded), base_weights()
    loaded.fuse_lora()
    assert all(not torch.equal(fused, weight) for fused, weight in zip(base_weights(), unfused))
    for fused, reference in zip(model_outputs(loaded), with_adapter):
        assert torch.allclose(fused, reference, atol=1e-5)
    loaded.unfuse_lora()
    for restored, weight in zip(base_weights(), unfused):
        assert torch.allclose(restored, weight, atol=1e-6)
    loaded.unload_lora_weights()
    assert loaded.get_list_adapters() == {}
    for output, reference in zip(model_outputs(loaded), base_outputs):  # unfusing restores the weights to rounding
        assert torch.allclose(output, reference, atol=1e-5)


def test_saving_the_pipeline_wants_the_adapters_merged_or_saved_apart(tmp_path, monkeypatch):
    pipe = fresh_pipe()
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    adapted = model_outputs(pipe)
    merge_or_save_apart = r"carries LoRA adapters.*save_lora_weights.*fuse_lora\(\); pipe.unload_lora_weights"
    with pytest.raises(ValueError, match=merge_or_save_apart):
        pipe.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    with monkeypatch.context() as patch:  # saving needs no PEFT
        patch.setattr("diffusers.loaders.lora_base.USE_PEFT_BACKEND", False)
        pipe.save_pretrained(tmp_path / "merged")
    merged = BitDancePipeline.from_pretrained(tmp_path / "merged")
    assert merged.get_list_adapters() == {}
    for output, reference in zip(model_outputs(merged), adapted):
        assert torch.allclose(output, reference, atol=1e-5)


def test_adapters_of_one_component_and_named_adapters(tmp_path):
    pipe = fresh_pipe()
    add_random_adapters(pipe, {"diffusion_head": LORA_TARGET_MODULES["diffusion_head"]})
    layers, config = adapter_state_and_config(pipe.diffusion_head)
    BitDancePipeline.save_lora_weights(tmp_path, diffusion_head_lora_layers=layers,
                                       diffusion_head_lora_adapter_metadata=config)  # fmt: skip
    loaded = fresh_pipe()
    loaded.load_lora_weights(tmp_path, adapter_name="style")
    assert loaded.get_list_adapters() == {"diffusion_head": ["style"]}
    assert torch.equal(run(loaded), run(pipe))
    loaded.delete_adapters("style")
    assert torch.equal(run(loaded), run(fresh_pipe()))


def test_several_named_adapters_mix_and_delete(tmp_path):
    pipe = fresh_pipe()
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    adapted = run(pipe)
    save_adapters(pipe, tmp_path)
    loaded = fresh_pipe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.load_lora_weights(tmp_path, adapter_name="style")
        loaded.load_lora_weights(tmp_path, adapter_name="other")
    assert not [w for w in caught if "peft_config" in str(w.message)]
    assert loaded.get_list_adapters() == {"language_model": ["style", "other"], "diffusion_head": ["style", "other"]}
    loaded.set_adapters(["style", "other"], [1.0, 0.0])
    assert torch.equal(run(loaded), adapted)
    loaded.delete_adapters("style")
    assert loaded.get_list_adapters() == {"language_model": ["other"], "diffusion_head": ["other"]}
    loaded.set_adapters("other", 0.0)
    assert torch.equal(run(loaded), run(fresh_pipe()))


def test_hotswap_replaces_the_weights_in_place_even_at_another_rank(tmp_path):
    results = {}
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2)):
        pipe = fresh_pipe()
        add_random_adapters(pipe, LORA_TARGET_MODULES, rank=rank, seed=seed)
        save_adapters(pipe, tmp_path / name)
        results[name] = run(pipe)
    assert not torch.equal(results["a"], results["b"])

    pipe = fresh_pipe()
    pipe.enable_lora_hotswap(target_rank=8)  # pads the first adapter to the largest rank to come
    pipe.load_lora_weights(tmp_path / "a", adapter_name="style")
    assert torch.equal(run(pipe), results["a"])
    modules = {name: [id(m) for m in getattr(pipe, name).modules()] for name in pipe._lora_loadable_modules}
    pipe.load_lora_weights(tmp_path / "b", adapter_name="style", hotswap=True)
    # The same modules (a compiled pipeline is not recompiled), now computing the second adapter.
    assert modules == {name: [id(m) for m in getattr(pipe, name).modules()] for name in pipe._lora_loadable_modules}
    assert torch.equal(run(pipe), results["b"])
    with pytest.raises(ValueError, match="pass its adapter_name"):
        pipe.load_lora_weights(tmp_path / "b", hotswap=True)


def test_hotswap_into_a_compiled_pipeline_does_not_recompile(tmp_path):
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2)):
        pipe = fresh_pipe()
        add_random_adapters(pipe, LORA_TARGET_MODULES, rank=rank, seed=seed)
        save_adapters(pipe, tmp_path / name)
    pipe = fresh_pipe()
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(tmp_path / "a", adapter_name="style")
    pipe.diffusion_head.compile(fullgraph=True)
    for layer in pipe.language_model.layers:
        layer.compile(fullgraph=True)
    try:
        first = run(pipe)
        pipe.load_lora_weights(tmp_path / "b", adapter_name="style", hotswap=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = run(pipe)
    finally:
        torch._dynamo.reset()
    assert not torch.equal(first, second)


def test_adapters_load_by_hub_id_from_the_offline_cache(tmp_path):
    pipe = fresh_pipe()
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    snapshot, env = offline_hub_cache(tmp_path, "someone/bitdance-style-lora")
    save_adapters(pipe, snapshot)
    # A community-style file name: offline, the weights are found by listing the cached snapshot.
    (snapshot / "pytorch_lora_weights.safetensors").rename(snapshot / "bitdance_style.safetensors")
    code = (
        "from bitdance_diffusers.random_pipeline import build_random_pipeline\n"
        "pipe = build_random_pipeline('tiny', block_size=16)\n"
        "pipe.load_lora_weights('someone/bitdance-style-lora', adapter_name='style')\n"
        "print(sorted(pipe.get_list_adapters().items()))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[('diffusion_head', ['style']), ('language_model', ['style'])]"


def test_every_change_of_the_adapters_drops_captured_cuda_graphs(tmp_path, eager_graphs):
    """A head graph replays the adapters and scales of its capture: after each change the next call captures anew,
    and without a change the graphs are replayed (captures stubbed, see cuda_graph_stub)."""
    pipe = fresh_pipe()
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    save_adapters(pipe, tmp_path)
    pipe = fresh_pipe()
    pipe.enable_cuda_graphs(backbone=False)

    def head_captures():
        pipe("a", height=64, width=64, num_inference_steps=1, generator=generator(0), output_type="latent")
        return sum(runner.function is pipe.diffusion_head for runner in eager_graphs)

    changes = [
        lambda: pipe.load_lora_weights(tmp_path, adapter_name="style"),
        lambda: pipe.set_adapters("style", 0.5),
        lambda: pipe.fuse_lora(),
        lambda: pipe.unfuse_lora(),
        lambda: pipe.disable_lora(),
        lambda: pipe.enable_lora(),
        lambda: pipe.delete_adapters("style"),
        lambda: pipe.load_lora_weights(tmp_path, adapter_name="other"),
        lambda: pipe.unload_lora_weights(),
    ]
    captured = head_captures()
    assert captured == 1 and head_captures() == captured  # replayed, not captured again
    for change in changes:
        change()
        assert head_captures() == captured + 1
        captured += 1
        assert head_captures() == captured


def test_loading_after_model_offload_keeps_the_offload(tmp_path):
    pipe = fresh_pipe()
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    save_adapters(pipe, tmp_path)
    offloaded = fresh_pipe()
    offloaded.enable_model_cpu_offload(device="cpu")
    offloaded.load_lora_weights(tmp_path)
    assert hasattr(offloaded.language_model, "_hf_hook")
    assert torch.equal(run(offloaded), run(pipe))


def test_bad_lora_files_are_named(tmp_path, monkeypatch):
    pipe = fresh_pipe()
    with monkeypatch.context() as patch:
        patch.setattr("bitdance_diffusers.loaders.lora.is_peft_available", lambda: False)
        with pytest.raises(ImportError, match="pip install peft"):
            pipe.load_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="Not a LoRA checkpoint"):
        pipe.load_lora_weights({"diffusion_head.input_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"layers for \['unet'\].*adaptable components"):
        pipe.load_lora_weights({"unet.conv.lora_A.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="not found in the base model"):
        pipe.load_lora_weights({"language_model.layers.0.mlp.fc9.lora_A.weight": torch.zeros(4, 64),
                                "language_model.layers.0.mlp.fc9.lora_B.weight": torch.zeros(64, 4)})  # fmt: skip
    # Half an adapter: an up projection without its down projection and the reverse.
    with pytest.raises(ValueError, match=r"incomplete: 2 tensors are missing, e\.g\. \['diffusion_head\.x\.lora_B\.weight'"):
        pipe.load_lora_weights({"diffusion_head.x.lora_A.weight": torch.zeros(4, 4),
                                "language_model.y.lora_B.weight": torch.zeros(4, 4)})  # fmt: skip
    # Saved for a deeper language model: its config targets q_proj, but layer 9 does not exist here.
    q_proj = pipe.language_model.layers[0].self_attn.q_proj
    BitDancePipeline.save_lora_weights(
        tmp_path,
        language_model_lora_layers={"layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, q_proj.in_features),
                                    "layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(q_proj.out_features, 4)},
        language_model_lora_adapter_metadata={"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"layers\.9\.self_attn\.q_proj.* match no module of Qwen3Model"):
        pipe.load_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="Nothing to save"):
        BitDancePipeline.save_lora_weights(tmp_path)
    with pytest.raises(TypeError, match="takes"):
        BitDancePipeline.save_lora_weights(tmp_path, transformer_lora_layers={"a.lora_A.weight": torch.zeros(1)})


def test_adapters_on_an_int8_weight_only_pipeline(tmp_path):
    """The 24 GB mode with a LoRA: PEFT wraps torchao's int8 layers; the base weights stay int8."""
    from peft.tuners.lora.torchao import TorchaoLoraLinear
    from torchao.quantization import Int8Tensor

    from bitdance_diffusers import pipeline_quantization_config

    pipe = fresh_pipe()
    pipe.save_pretrained(tmp_path / "model")
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    save_adapters(pipe, tmp_path / "lora")
    config = pipeline_quantization_config("int8wo")
    quantized = BitDancePipeline.from_pretrained(tmp_path / "model", quantization_config=config)
    quantized.set_progress_bar_config(disable=True)
    base = run(quantized)
    quantized.load_lora_weights(tmp_path / "lora")
    for model in (quantized.language_model, quantized.diffusion_head):
        layers = [module for module in model.modules() if isinstance(module, TorchaoLoraLinear)]
        assert layers and all(isinstance(layer.base_layer.weight, Int8Tensor) for layer in layers)
    assert not torch.equal(run(quantized), base)
    quantized.set_adapters("default_0", 0.0)
    assert torch.equal(run(quantized), base)


def test_class_conditional_pipeline_adapts_transformer_and_head(tmp_path):
    def fresh():
        pipe = build_random_imagenet_pipeline(block_size=4)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe):
        return pipe([1, 2], num_inference_steps=2, generator=generator(0), output_type="latent").images

    pipe = fresh()
    base = sample(pipe)
    add_random_adapters(pipe, {"transformer": ["wqkv", "wo"], "diffusion_head": ["wqkv", "w1"]})
    adapted = sample(pipe)
    assert not torch.equal(adapted, base)
    save_adapters(pipe, tmp_path)
    loaded = fresh()
    loaded.load_lora_weights(tmp_path)
    assert type(loaded) is BitDanceImageNetPipeline and torch.equal(sample(loaded), adapted)


def test_command_line_applies_lora_files(tmp_path, capsys):
    from bitdance_diffusers import cli

    pipe = fresh_pipe()
    pipe.save_pretrained(tmp_path / "model")
    add_random_adapters(pipe, LORA_TARGET_MODULES)
    save_adapters(pipe, tmp_path / "lora")

    def generate(*options):
        output = tmp_path / "image.png"
        cli.main(["generate", "--model", str(tmp_path / "model"), "--prompt", "a red circle", "--steps", "2",
                  "--output", str(output), "--overwrite", *options])  # fmt: skip
        return np.asarray(Image.open(output))

    base, adapted = generate(), generate("--lora", str(tmp_path / "lora"))
    assert not np.array_equal(adapted, base)
    assert np.array_equal(generate("--lora", str(tmp_path / "lora"), "--lora_scale", "0"), base)
    with pytest.raises(SystemExit):
        generate("--lora", str(tmp_path / "lora"), "--lora_scale", "1", "0.5")
    assert "one per file" in capsys.readouterr().err
