from .samplers import FLOW_OPTIONS, SAMPLERS, scheduler_for_sampler
from .scheduling_binary_flow import BinaryFlowScheduler, BinaryFlowSchedulerOutput
