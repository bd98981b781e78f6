"""BinaryFlowScheduler against a float64 transcription of the original sampler, and diffusers interoperability."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from bitdance_diffusers import BinaryFlowScheduler
from bitdance_diffusers.pipelines.engines import x_prediction_to_velocity
from bitdance_diffusers.schedulers import SAMPLERS, scheduler_for_sampler


WEIGHT = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 3


def toy_x_prediction(x, t, cond):
    """A smooth nonlinear x-prediction in (-1, 1), like the text-to-image head's output."""
    return torch.tanh(x @ WEIGHT + cond * (1 + t))


def original_sampler_float64(noise_draws, cond_c, cond_u, cfg, steps, t_max=0.95):
    """The original Euler-Maruyama sampler (SPEC §3.9) in float64 with the noise draws given in order."""
    x = noise_draws[0].double()
    t_grid = np.linspace(0, t_max, steps + 1)
    t = 0.0
    for i in range(steps):
        dt = t_grid[i + 1] - t_grid[i]
        v_c = (toy_x_prediction(x, t, cond_c) - x) / max(1 - t, 0.05)
        v_u = (toy_x_prediction(x, t, cond_u) - x) / max(1 - t, 0.05)
        v = v_u + cfg * (v_c - v_u)
        score = (t * v - x) / (1 - t)
        drift = v + (1 - t) * score
        x = x + drift * dt + np.sqrt(2 * (1 - t) * dt) * noise_draws[i + 1].double()
        t += dt
    t = t_max
    v_c = (toy_x_prediction(x, t, cond_c) - x) / max(1 - t, 0.05)
    v_u = (toy_x_prediction(x, t, cond_u) - x) / max(1 - t, 0.05)
    return x + (v_u + cfg * (v_c - v_u)) * (1 - t_max)


def run_scheduler(scheduler, steps, cond_c, cond_u, cfg, seed, **set_timesteps_kwargs):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, generator=generator)
    scheduler.set_timesteps(steps, **set_timesteps_kwargs)
    for timestep in scheduler.timesteps:
        t = (1 - timestep.double() / scheduler.config.num_train_timesteps).float()
        v_c = x_prediction_to_velocity(toy_x_prediction(x.double(), t.double(), cond_c).float(), x, t)
        v_u = x_prediction_to_velocity(toy_x_prediction(x.double(), t.double(), cond_u).float(), x, t)
        x = scheduler.step(-(v_u + cfg * (v_c - v_u)), timestep, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 4, 25, 50])
def test_matches_float64_original(steps):
    cond_c, cond_u = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    replay = torch.Generator().manual_seed(123)
    noise_draws = [torch.randn(2, 4, 8, generator=replay) for _ in range(steps + 1)]
    reference = original_sampler_float64(noise_draws, cond_c, cond_u, 4.0, steps)

    scheduler = BinaryFlowScheduler(binarize=False)
    sample = run_scheduler(scheduler, steps, cond_c, cond_u, 4.0, seed=123)
    assert len(scheduler.timesteps) == steps + 1
    assert np.abs(sample.double().numpy() - reference.numpy()).max() < 2e-5

    binary = run_scheduler(BinaryFlowScheduler(), steps, cond_c, cond_u, 4.0, seed=123)
    assert torch.equal(binary, torch.where(sample > 0, 1.0, -1.0))


def test_default_grid_is_the_original():
    scheduler = BinaryFlowScheduler()
    scheduler.set_timesteps(50)
    times = 1 - scheduler.timesteps.double() / 1000
    grid = torch.linspace(0, 0.95, 51, dtype=torch.float32)
    # t is accumulated in float32 as the original does; for 50 steps that equals the linspace grid exactly.
    assert torch.equal(times.float()[:-1], grid[:-1]) and times[-1].item() == pytest.approx(0.95)
    assert scheduler.sigmas[-1] == 0


def test_euler_mode_equals_flow_match_euler_on_the_same_grid():
    sigmas = np.linspace(1.0, 1 / 8, 8)
    cond_c, cond_u = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = run_scheduler(BinaryFlowScheduler(solver="euler", binarize=False), None, cond_c, cond_u, 3.0, 5, sigmas=sigmas)
    theirs = run_scheduler(FlowMatchEulerDiscreteScheduler(), None, cond_c, cond_u, 3.0, 5, sigmas=sigmas)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_time_shift_matches_diffusers_shift():
    scheduler = BinaryFlowScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigma = 1 - torch.linspace(0, 0.95, 11, dtype=torch.float64)
    shifted = 3 * sigma / (1 + 2 * sigma)
    # The shift applies to the SDE grid; the final deterministic step still starts at t_max.
    assert torch.allclose(scheduler.sigmas[:10], shifted[:10], atol=1e-6)


def test_set_timesteps_per_block_resets_the_sampler():
    cond_c, cond_u = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scheduler = BinaryFlowScheduler()
    first = run_scheduler(scheduler, 6, cond_c, cond_u, 2.0, seed=9)
    second = run_scheduler(scheduler, 6, cond_c, cond_u, 2.0, seed=9)
    assert torch.equal(first, second)
    assert set(first.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="step called"):
        scheduler.step(torch.zeros(2, 4, 8), scheduler.timesteps[-1], first)


def test_config_round_trip(tmp_path):
    scheduler = BinaryFlowScheduler(shift=2.0, solver="euler", t_max=0.9)
    scheduler.save_pretrained(tmp_path)
    loaded = BinaryFlowScheduler.from_pretrained(tmp_path)
    for key in ("num_train_timesteps", "shift", "solver", "t_max", "binarize"):
        assert loaded.config[key] == scheduler.config[key]
    swapped = FlowMatchEulerDiscreteScheduler.from_config(loaded.config)
    assert swapped.config.shift == 2.0
    assert BinaryFlowScheduler.from_config(swapped.config).config.solver == "euler"


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="solver"):
        BinaryFlowScheduler(solver="heun")
    with pytest.raises(ValueError, match="t_max"):
        BinaryFlowScheduler(t_max=1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        BinaryFlowScheduler().step(torch.zeros(1), 0, torch.zeros(1))
    for steps in (0, 2.5, None):
        with pytest.raises(ValueError, match="positive integer"):
            BinaryFlowScheduler().set_timesteps(steps)


def test_samplers_by_name_keep_the_pipeline_configuration():
    config = BinaryFlowScheduler(shift=2.0).config
    for name in SAMPLERS:
        scheduler = scheduler_for_sampler(name, config)
        assert scheduler.config.num_train_timesteps == config.num_train_timesteps
    assert scheduler_for_sampler("flow-euler", config).config.shift == 2.0
    assert scheduler_for_sampler("binary-flow-ode", config).config.solver == "euler"
    assert scheduler_for_sampler("flow-unipc", config).config.use_flow_sigmas
    with pytest.raises(ValueError, match="Unknown sampler 'ddim'; choose one of binary-flow, "):
        scheduler_for_sampler("ddim", config)
