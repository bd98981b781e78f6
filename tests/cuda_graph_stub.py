"""CUDA graphs without a GPU, for the logic around them: `CUDAGraphRunner.capture` replaced by an eager stand-in.

The stand-in "graph" reruns the captured function on the runner's static buffers at every replay, so the runner's
bookkeeping (one capture per input shape, inputs copied into the buffers, state restored after capturing, outputs
copied out) and the engines' use of it (when to capture, when to drop the graphs) run on CPU and must give the eager
results. Import the ``eager_graphs`` fixture into a test module to use it.
"""

import pytest

from bitdance_diffusers.pipelines.engines import CUDAGraphRunner


class EagerGraph:
    def __init__(self, runner, static_inputs, options, static_output):
        self.runner, self.static_inputs, self.options, self.static_output = runner, static_inputs, options, static_output

    def replay(self):
        output = self.runner.function(*self.static_inputs, **self.options)
        for static, value in zip(as_tuple(self.static_output), as_tuple(output)):
            static.copy_(value)


def as_tuple(output) -> tuple:
    return output if isinstance(output, tuple) else (output,)


@pytest.fixture
def eager_graphs(monkeypatch) -> list:
    """Stubs the capture; returns the list of runners, one entry per capture."""
    captures = []

    def capture(runner, static_inputs, options):
        saved = [tensor.clone() for tensor in runner.state]
        static_output = runner.function(*static_inputs, **options)  # as a real capture, only shapes the output
        for tensor, value in zip(runner.state, saved):
            tensor.copy_(value)
        captures.append(runner)
        return EagerGraph(runner, static_inputs, options, static_output), static_output

    monkeypatch.setattr(CUDAGraphRunner, "capture", capture)
    return captures
