"""Head samplers by name: the original's and the diffusers flow schedulers that drop in for it.

Used by ``bitdance generate --sampler NAME`` and the benchmarks; in Python, assign the scheduler directly
(``pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, **FLOW_OPTIONS)``).
"""

from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from .scheduling_binary_flow import BinaryFlowScheduler


# The multistep solvers integrate a flow only in this mode.
FLOW_OPTIONS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

SAMPLERS = {
    "binary-flow": (BinaryFlowScheduler, {}),  # the original's Euler–Maruyama SDE (steps + 1 head calls)
    "binary-flow-ode": (BinaryFlowScheduler, {"solver": "euler"}),  # the same grid without noise
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow-heun": (FlowMatchHeunDiscreteScheduler, {}),  # two head calls per step but the last
    "flow-unipc": (UniPCMultistepScheduler, FLOW_OPTIONS),
    "flow-dpmsolver": (DPMSolverMultistepScheduler, FLOW_OPTIONS),
}


def scheduler_for_sampler(name: str, config) -> SchedulerMixin:
    """The scheduler of sampler ``name`` (a key of ``SAMPLERS``), built from a pipeline's scheduler ``config``."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    scheduler_class, options = SAMPLERS[name]
    return scheduler_class.from_config(config, **options)
