"""Per-sample random draws: what a sample draws does not depend on the batch it is in, nor on the process holding it.

Training draws, for sample ``g`` of the global batch of optimizer step ``s``, from a generator seeded with
``(seed, s, g)`` (`sample_generators`); the objectives take such a list, one generator per batch row, as diffusers'
pipelines do (`random_rows`).
"""

import numpy as np
import torch


Generators = torch.Generator | list[torch.Generator] | None


def random_rows(shape: tuple, generator: Generators, device, normal: bool = False) -> torch.Tensor:
    """Uniform (or, with ``normal``, Gaussian) draws of ``shape [B, ...]``; with a list of ``B`` generators row ``b``
    comes from generator ``b`` (so a sample's draws do not depend on the batch it is in, as in diffusers' pipelines)."""
    draw = torch.randn if normal else torch.rand
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per sample.")
        return torch.cat([draw((1, *shape[1:]), generator=row, device=device) for row in generator])
    return draw(shape, generator=generator, device=device)


def sample_generators(seed: int, step: int, first_sample: int, count: int, device) -> list[torch.Generator]:
    """One generator per sample of a micro-batch: sample ``g`` of the global batch of optimizer step ``step`` draws
    from ``(seed, step, g)``, whichever process and micro-batch hold it."""
    seeds = [np.random.SeedSequence([seed, step, sample]).generate_state(1, np.uint64)[0]
             for sample in range(first_sample, first_sample + count)]  # fmt: skip
    return [torch.Generator(device).manual_seed(int(sample_seed)) for sample_seed in seeds]
