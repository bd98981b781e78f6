"""Weight quantization of BitDance pipelines: ready-made `PipelineQuantizationConfig`s, and in-place quantization.

A BitDance pipeline mixes a transformers model (the text-to-image ``language_model``) with diffusers models (the
diffusion head, the ImageNet ``transformer``), and diffusers' ``quant_backend=`` shortcut cannot build torchao
configs for both kinds at once. `pipeline_quantization_config` builds the per-component ``quant_mapping`` instead:

    from bitdance_diffusers import BitDancePipeline, pipeline_quantization_config

    pipe = BitDancePipeline.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=pipeline_quantization_config("int8wo")
    )

Schemes (weights are quantized while loading; activations stay in the compute dtype unless noted):

- ``"int8wo"``: torchao int8 weight-only, per output row. Runs on CPU and GPU.
- ``"fp8wo"``: torchao float8 (e4m3) weight-only. Runs on CPU and GPU.
- ``"fp8"``: torchao float8 weights and dynamically quantized float8 activations, per row. CUDA only (float8 matmuls
  of compute capability 8.9+).
- ``"nf4"``: bitsandbytes 4-bit NormalFloat with double quantization, computing in ``compute_dtype``. CUDA only.
- ``"int8"``: bitsandbytes LLM.int8(). CUDA only.

The projector, the autoencoder, embeddings and norms stay unquantized. `quantize_model_` applies a scheme to a model
already in memory (a pipeline built or loaded unquantized), with the same layer types.

Importing this module imports nothing heavy: torch, diffusers and the quantization libraries load in the functions,
when a scheme is asked for.
"""

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch
    from diffusers.quantizers import PipelineQuantizationConfig


QUANTIZATION_SCHEMES = ("int8wo", "fp8wo", "fp8", "nf4", "int8")
BITSANDBYTES_SCHEMES = ("nf4", "int8")  # the others are torchao's
CUDA_ONLY_SCHEMES = ("fp8", "nf4", "int8")

# The heavy components of BitDancePipeline; BitDanceImageNetPipeline's are ("transformer", "diffusion_head").
DEFAULT_COMPONENTS = ("language_model", "diffusion_head")

# Components that are transformers models; every other component is a diffusers model.
TRANSFORMERS_COMPONENTS = ("language_model",)


def pipeline_quantization_config(
    scheme: str,
    components: tuple[str, ...] | list[str] = DEFAULT_COMPONENTS,
    compute_dtype: "torch.dtype | None" = None,
) -> "PipelineQuantizationConfig":
    """The `PipelineQuantizationConfig` that quantizes ``components`` with ``scheme`` when a pipeline loads.

    Args:
        scheme (`str`): one of ``QUANTIZATION_SCHEMES`` (see the module docstring).
        components (`tuple[str]`): names of the pipeline components to quantize; pass
            ``("transformer", "diffusion_head")`` for `BitDanceImageNetPipeline`.
        compute_dtype (`torch.dtype`, defaults to `torch.bfloat16`): dtype of the bitsandbytes matmuls (``"nf4"``);
            match the pipeline's ``dtype``.
    """
    import torch
    from diffusers.quantizers import PipelineQuantizationConfig

    _check_scheme(scheme)
    if not components:
        raise ValueError("`components` is empty; name at least one pipeline component to quantize.")
    compute_dtype = torch.bfloat16 if compute_dtype is None else compute_dtype
    return PipelineQuantizationConfig(
        quant_mapping={name: _component_config(scheme, name in TRANSFORMERS_COMPONENTS, compute_dtype) for name in components}
    )  # fmt: skip


def _check_scheme(scheme: str):
    if scheme not in QUANTIZATION_SCHEMES:
        raise ValueError(f"Unknown quantization scheme {scheme!r}; choose one of {', '.join(QUANTIZATION_SCHEMES)}.")


def _component_config(scheme: str, is_transformers: bool, compute_dtype: "torch.dtype"):
    if scheme in BITSANDBYTES_SCHEMES:
        if is_transformers:
            from transformers import BitsAndBytesConfig
        else:
            from diffusers import BitsAndBytesConfig
        if scheme == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )

    if is_transformers:
        from transformers import TorchAoConfig
    else:
        from diffusers import TorchAoConfig
    return TorchAoConfig(torchao_quant_type(scheme))


def torchao_quant_type(scheme: str):
    """The torchao config of a torchao scheme, for `torchao.quantization.quantize_` on a model already in memory."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    except ImportError as error:
        raise ImportError(f"The {scheme!r} quantization scheme needs torchao: `pip install torchao`.") from error
    # set_inductor_config=False: torchao's default would switch the whole process to TF32 float32 matmuls
    # (`torch.set_float32_matmul_precision("high")`), silently changing every float32 model beside the quantized one.
    if scheme == "int8wo":
        return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False, version=2)
    if scheme == "fp8wo":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    raise ValueError(f"{scheme!r} is not a torchao scheme; choose one of int8wo, fp8wo, fp8.")


def quantize_model_(model: "torch.nn.Module", scheme: str):
    """Quantize the ``nn.Linear`` layers of ``model`` in place with ``scheme``, on the device they are on.

    torchao schemes turn the weights into torchao tensor subclasses; ``"nf4"`` and ``"int8"`` replace the layers with
    bitsandbytes ``Linear4bit`` (computing in the layer's dtype) and ``Linear8bitLt``.
    """
    import torch

    _check_scheme(scheme)
    if scheme not in BITSANDBYTES_SCHEMES:
        from torchao.quantization import quantize_

        quantize_(model, torchao_quant_type(scheme))
        return
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError(f"The {scheme!r} quantization scheme needs bitsandbytes: `pip install bitsandbytes`.") from error

    for parent in list(model.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            weight, has_bias = linear.weight.data, linear.bias is not None
            if scheme == "nf4":
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, device="meta",
                                          compute_dtype=weight.dtype, quant_type="nf4", compress_statistics=True)  # fmt: skip
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
            else:
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, device="meta",
                                            has_fp16_weights=False, threshold=6.0)  # fmt: skip
                # Int8Params quantizes only when it leaves the CPU: a weight already on the GPU starts from a CPU copy.
                layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
            layer.weight = layer.weight.to(weight.device)  # bitsandbytes quantizes when the weight is moved
            if has_bias:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, name, layer)
