"""The run's random streams, all derived from its seed.

Reproducibility: the data order is a permutation per epoch drawn from
``(seed, epoch)``; the model is initialised from ``seed`` on every rank; the
noise of rank ``r`` comes from torch's default generators seeded from
``(seed, r)``, so ranks draw different noise. ``noise="global"`` instead draws
the noise of the whole global batch from one generator seeded alike on every
rank, each rank taking its slice: results then do not depend on the number of
processes (at the cost of materialising the noise). A denoising run's
corruption (``--denoise``) draws from a generator of its own, on the run's
device, following the same choice: seeded from ``(seed, r)`` on rank ``r``
(``noise="rank"``: each rank corrupts its own images with its own stream), or
from ``seed`` alike on every rank, which draws the global batch's corruption
noise and takes its slice (``noise="global"``). ``resume=True`` restores the
model, optimizer, scaler and RNG states (the corruption generator's included)
and the position in the data, so an interrupted run resumed ends with the
weights of one never interrupted.
"""

from __future__ import annotations

import numpy as np
import torch

# Independent random streams derived from the seed (see derived_seed).
_STREAM_NOISE, _STREAM_EPOCH, _STREAM_GLOBAL_NOISE, _STREAM_EVAL, _STREAM_CORRUPTION = range(5)


def derived_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for the random stream ``stream`` of a run seeded ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0]) >> 1


def epoch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The order of the ``n`` training images in ``epoch``: the same on every rank and after a resume."""
    generator = torch.Generator().manual_seed(derived_seed(seed, _STREAM_EPOCH, epoch))
    return torch.randperm(n, generator=generator).to(device)


def eval_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of the noise used to evaluate and draw figures: independent of training's."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, _STREAM_EVAL))


def seed_rank_noise(seed: int, rank: int) -> None:
    """Seed torch's default generators, which draw rank ``rank``'s noise: each rank its own."""
    torch.manual_seed(derived_seed(seed, _STREAM_NOISE, rank))


def global_noise_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of the global batch's noise (``noise="global"``): seeded alike on every rank."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, _STREAM_GLOBAL_NOISE))


def corruption_generator(seed: int, rank: int | None, device: torch.device) -> torch.Generator:
    """The generator of a denoising run's corruption noise: rank ``rank``'s own, or (``rank=None``) the global
    batch's, seeded alike on every rank."""
    stream = (_STREAM_CORRUPTION,) if rank is None else (_STREAM_CORRUPTION, rank)
    return torch.Generator(device=device).manual_seed(derived_seed(seed, *stream))
