"""Replay forwards from CUDA graphs, and tell when a captured graph no longer matches what it captured.

The diffusion head runs ``N + 1`` times per autoregressive block on inputs of one fixed shape, and the language model
once per block over a static KV cache; in eager mode each call launches hundreds of small kernels (about a thousand
for a 40-layer language model), so at batch 1 the GPU waits on the CPU. A captured graph launches them all at once.
Inputs are copied into the graph's static buffers, so callers pass ordinary tensors.

A graph replays the kernels of its capture on the memory of its capture: it goes stale when a weight is replaced (a
``.to()``, a quantization, an adapter moved), when the Python around the kernels changes (LoRA adapters added,
removed, fused, disabled or rescaled; ``compile``) or when hooks start moving weights (offloading).
`graph_dependencies` sums that up; the owners of graphs compare it before replaying and drop their graphs when it
changed. This is the only module that captures CUDA graphs.
"""

import torch


class CUDAGraphRunner:
    """Calls ``function(*tensors, **options)`` through a CUDA graph captured for each distinct tensor shape and dtype.

    ``options`` must stay the same between calls (they are baked into the graph). The function returns a tensor or a
    tuple of tensors; what is returned is a copy of the graph's output buffers, safe to keep across calls.
    """

    def __init__(self, function, warmup_calls: int = 2, state: list[torch.Tensor] | None = None):
        """
        Args:
            function: the callable to capture (a module or a function of tensors).
            warmup_calls: eager calls before the capture (on a side stream, as CUDA graphs require).
            state: tensors the call updates in place (e.g. a static KV cache's fill counters); their values are
                restored after the warm-up calls, so capturing does not advance them.
        """
        self.function = function
        self.warmup_calls = warmup_calls
        self.state = state or []
        # (shape, dtype) of every input -> (graph, static inputs, static output)
        self.graphs = {}

    def capture(self, static_inputs: list[torch.Tensor], options: dict):
        """Capture ``function(*static_inputs, **options)``; returns ``(graph, static_output)``."""
        if static_inputs[0].device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need CUDA tensors, got a tensor on {static_inputs[0].device}: move the pipeline to a GPU "
                "(`pipe.to('cuda')`) or call `pipe.disable_cuda_graphs()`."
            )
        saved_state = [tensor.clone() for tensor in self.state]
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):  # warm-up outside the graph: cuBLAS handles, lazy initialisation
            for _ in range(self.warmup_calls):
                self.function(*static_inputs, **options)
        torch.cuda.current_stream().wait_stream(side_stream)
        for tensor, saved in zip(self.state, saved_state):
            tensor.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.function(*static_inputs, **options)
        return graph, static_output

    def __call__(self, *tensors: torch.Tensor, **options):
        key = tuple((tensor.shape, tensor.dtype) for tensor in tensors)
        if key not in self.graphs:
            static_inputs = [tensor.clone() for tensor in tensors]
            self.graphs[key] = (*self.capture(static_inputs, options), static_inputs)
        graph, static_output, static_inputs = self.graphs[key]
        for static_input, tensor in zip(static_inputs, tensors):
            static_input.copy_(tensor)
        graph.replay()
        if isinstance(static_output, tuple):
            return tuple(output.clone() for output in static_output)
        return static_output.clone()


def _tensor_key(tensor: torch.Tensor) -> tuple:
    try:
        address = tensor.data_ptr()
    except RuntimeError:  # a tensor subclass without storage of its own (torchao's quantized weights)
        address = None
    return id(tensor), type(tensor), tensor.dtype, tensor.device, tuple(tensor.shape), address


def graph_dependencies(module: torch.nn.Module) -> tuple:
    """Everything a CUDA graph of ``module`` depends on besides its inputs; compare two of them with ``==``.

    Covers every parameter and buffer (object, type, dtype, device, shape, address: ``.to()``, quantization,
    offloading, adapters moved between devices), every submodule's class and compiled forward (``compile``, adapter
    layers added or removed), its accelerate and diffusers hooks (offloading, layerwise casting) and, for LoRA layers,
    the active, merged and disabled adapters and their scales (``set_adapters``, ``fuse_lora``, ``disable_lora``).
    Weights changed in place (a hot-swapped adapter) keep their address, and a replayed graph reads them anew.
    """
    entries = [id(module)]
    for name, submodule in module.named_modules():
        diffusers_hooks = getattr(submodule, "_diffusers_hook", None)
        hooks = tuple(diffusers_hooks.hooks) if diffusers_hooks is not None else ()
        compiled = getattr(submodule, "_compiled_call_impl", None)
        entries.append((name, type(submodule), id(compiled), id(getattr(submodule, "_hf_hook", None)), hooks))
        if hasattr(submodule, "lora_A") and hasattr(submodule, "merged_adapters"):  # a PEFT LoRA layer
            adapters = (submodule.active_adapters, submodule.merged_adapters, sorted(submodule.scaling.items()))
            entries.append((*map(tuple, adapters), bool(submodule.disable_adapters)))
    entries.extend(_tensor_key(tensor) for tensor in module.parameters())
    entries.extend(_tensor_key(tensor) for tensor in module.buffers())
    return tuple(entries)
