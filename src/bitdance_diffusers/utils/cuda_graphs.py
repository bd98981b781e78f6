"""Replay forwards from CUDA graphs: one graph per input shape, captured on first use.

The diffusion head runs ``N + 1`` times per autoregressive block on inputs of one fixed shape, and the language model
once per block over a static KV cache; in eager mode each call launches hundreds of small kernels (about a thousand
for a 40-layer language model), so at batch 1 the GPU waits on the CPU. A captured graph launches them all at once.
Inputs are copied into the graph's static buffers, so callers pass ordinary tensors.
"""

import torch


class CUDAGraphRunner:
    """Calls ``module(*tensors, **options)`` through a CUDA graph captured for each distinct tensor shape and dtype.

    ``options`` must stay the same between calls (they are baked into the graph). The returned tensor is a copy of the
    graph's output buffer, safe to keep across calls.
    """

    def __init__(self, module, warmup_calls: int = 2, state: list[torch.Tensor] | None = None):
        """
        Args:
            module: the callable to capture (a module or a function of tensors).
            warmup_calls: eager calls before the capture (on a side stream, as CUDA graphs require).
            state: tensors the call updates in place (e.g. a static KV cache's fill counters); their values are
                restored after the warm-up calls, so capturing does not advance them.
        """
        self.module = module
        self.warmup_calls = warmup_calls
        self.state = state or []
        self.graphs = {}

    def _capture(self, tensors: tuple, options: dict):
        static_inputs = [tensor.clone() for tensor in tensors]
        saved_state = [tensor.clone() for tensor in self.state]
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):  # warm-up outside the graph: cuBLAS handles, lazy initialisation
            for _ in range(self.warmup_calls):
                self.module(*static_inputs, **options)
        torch.cuda.current_stream().wait_stream(side_stream)
        for tensor, saved in zip(self.state, saved_state):
            tensor.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.module(*static_inputs, **options)
        return graph, static_inputs, static_output

    def __call__(self, *tensors: torch.Tensor, **options):
        if tensors[0].device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need CUDA tensors, got a tensor on {tensors[0].device}: move the pipeline to a GPU "
                "(`pipe.to('cuda')`) or call `pipe.disable_cuda_graphs()`."
            )
        key = tuple((tensor.shape, tensor.dtype) for tensor in tensors)
        if key not in self.graphs:
            self.graphs[key] = self._capture(tensors, options)
        graph, static_inputs, static_output = self.graphs[key]
        for static_input, tensor in zip(static_inputs, tensors):
            static_input.copy_(tensor)
        graph.replay()
        return static_output.clone()
