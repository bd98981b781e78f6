"""BinaryFlowScheduler: the BitDance head sampler in diffusers' flow-matching convention.

Conventions. BitDance integrates ``x_t = t * x_1 + (1 - t) * noise`` from ``t = 0`` (noise) to ``t = 1`` (data) with the
velocity ``v = dx/dt``. diffusers' flow schedulers use ``sigma = 1 - t`` and a model output ``dx/dsigma = -v``, with
``timestep = sigma * num_train_timesteps``. Hence, for any flow scheduler (this one, ``FlowMatchEulerDiscreteScheduler``,
``FlowMatchHeunDiscreteScheduler``, ...) the pipelines do, per head evaluation:

1. ``t = 1 - timestep / num_train_timesteps`` (the head's time input);
2. ``x_pred = head(x, t, cond)`` (an x-prediction, i.e. the head's guess of the clean tokens);
3. ``v = (x_pred - x) / max(1 - t, 0.05)`` for each CFG branch, then classifier-free guidance **on the velocity**:
   ``v = v_uncond + guidance_scale * (v_cond - v_uncond)``;
4. ``model_output = -v`` and ``x = scheduler.step(model_output, timestep, x).prev_sample``.

The default configuration reproduces the original sampler exactly: ``N`` Euler–Maruyama steps on the grid
``linspace(0, t_max, N + 1)`` (``t`` accumulated in float32 as the original does), drift ``(1 + t) v - x`` and noise
``sqrt(2 (1 - t) dt) * randn`` drawn with the caller's generator (float32, shaped like the sample, one draw per SDE
step), then one deterministic Euler step of size ``1 - t_max`` and binarisation to ±1. That is ``N + 1`` head
evaluations and ``N`` noise draws per call of ``set_timesteps(N)``.
"""

import numbers
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..utils.token_layout import binarize


@dataclass
class BinaryFlowSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): the sample at the next time; ±1 after the last step when ``binarize`` is set.
    """

    prev_sample: torch.Tensor


class BinaryFlowScheduler(SchedulerMixin, ConfigMixin):
    """
    Velocity integration of BitDance's binary-token flow, ending on the hypercube ±1.

    Parameters:
        num_train_timesteps (`int`, defaults to 1000): scale of ``timesteps`` (``timestep = sigma * 1000``).
        shift (`float`, defaults to 1.0): time shift ``t -> t / (t + shift * (1 - t))``, equal to diffusers'
            ``sigma -> shift * sigma / (1 + (shift - 1) * sigma)``.
        solver (`str`, defaults to `"euler_maruyama"`): ``"euler_maruyama"`` (the original SDE) or ``"euler"`` (ODE).
        t_max (`float`, defaults to 0.95): end of the SDE grid; one deterministic Euler step of ``1 - t_max`` follows.
        binarize (`bool`, defaults to `True`): map the final sample to ±1 (``> 0 -> +1``, else ``-1``).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        solver: str = "euler_maruyama",
        t_max: float = 0.95,
        binarize: bool = True,
    ):
        if solver not in ("euler_maruyama", "euler"):
            raise ValueError(f"solver must be 'euler_maruyama' or 'euler', got {solver!r}.")
        if not 0.0 < t_max < 1.0:
            raise ValueError(f"t_max must lie in (0, 1), got {t_max}.")
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._times = None
        self._step_sizes = None
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def _default_times(self, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The original grid: float32 ``linspace(0, t_max, N + 1)``, shifted, with ``t`` accumulated step by step."""
        grid = torch.linspace(0.0, self.config.t_max, num_inference_steps + 1, dtype=torch.float32)
        if self.config.shift != 1.0:
            inverse_shift = 1.0 / self.config.shift
            grid = inverse_shift / (inverse_shift + (1.0 / grid - 1.0))
        step_sizes = torch.diff(grid)
        times = torch.zeros(num_inference_steps + 1, dtype=torch.float32)
        for i in range(num_inference_steps):
            times[i + 1] = times[i] + step_sizes[i]
        # The final deterministic step starts at t_max itself and has size 1 - t_max.
        times[-1] = self.config.t_max
        step_sizes = torch.cat([step_sizes, torch.tensor([1.0 - self.config.t_max], dtype=torch.float32)])
        return times, step_sizes

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ):
        """Build the time grid. Call once per sampled block; it also resets the step index.

        Args:
            num_inference_steps: ``N`` SDE (or ODE) steps on ``[0, t_max]``; ``N + 1`` model evaluations in total.
            device: where ``timesteps`` live.
            sigmas: a custom descending grid in (0, 1] (``sigma = 1 - t``); the scheduler appends ``sigma = 0`` and the
                last step (into ``sigma = 0``) is deterministic. Excludes ``num_inference_steps`` and ``timesteps``.
            timesteps: like ``sigmas`` but scaled by ``num_train_timesteps``.
            mu: not used (no dynamic shifting); accepted for signature compatibility.
        """
        if timesteps is not None:
            sigmas = np.asarray(timesteps, dtype=np.float64) / self.config.num_train_timesteps
        if sigmas is not None:
            sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float32))
            if sigmas.ndim != 1 or len(sigmas) == 0 or bool((sigmas <= 0).any() or (sigmas > 1).any()):
                raise ValueError("sigmas must be a non-empty 1-D descending grid in (0, 1].")
            times = 1.0 - sigmas
            step_sizes = torch.diff(torch.cat([times, torch.ones(1)]))
        else:
            if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}.")
            times, step_sizes = self._default_times(num_inference_steps)
        self.num_inference_steps = len(times) - 1 if sigmas is None else len(times)
        self._times = times
        self._step_sizes = step_sizes
        # float64 keeps ``1 - timestep / num_train_timesteps`` exactly equal to the float32 times above.
        self.sigmas = torch.cat([1.0 - times.double(), torch.zeros(1, dtype=torch.float64)])
        self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        # If a timestep repeats, the first step to use is the second match (as in diffusers' flow schedulers).
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device, self.timesteps.dtype)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> BinaryFlowSchedulerOutput | tuple[torch.Tensor]:
        """Advance ``sample`` from ``timestep`` to the next grid point.

        Args:
            model_output: ``dx/dsigma = -v`` (the negated, already guided velocity), shaped like ``sample``.
            timestep: the current entry of ``self.timesteps``.
            sample: the current state ``x_t`` ``[B, P, C]``.
            generator: noise source for Euler–Maruyama (one generator, or one per batch row).
            return_dict: return a `BinaryFlowSchedulerOutput` instead of a tuple.
        """
        if self.timesteps is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if index >= len(self._step_sizes):
            raise ValueError(f"step called {index + 1} times after set_timesteps; the grid has {len(self._step_sizes)} steps.")

        x = sample.float()
        v = -model_output.float()
        # 0-dim float32 tensors: the same arithmetic as the original's float32 scalars, on any device.
        t = self._times[index]
        dt = self._step_sizes[index]
        is_last = index == len(self._step_sizes) - 1
        if is_last or self.config.solver == "euler":
            prev_sample = x + v * dt
        else:
            score = (t * v - x) / (1 - t)
            drift = v + (1 - t) * score
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            prev_sample = x + drift * dt + torch.sqrt(2 * (1 - t) * dt) * noise
        if is_last and self.config.binarize:
            prev_sample = binarize(prev_sample)

        self._step_index += 1
        prev_sample = prev_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return BinaryFlowSchedulerOutput(prev_sample=prev_sample)

    def __len__(self):
        return self.config.num_train_timesteps
