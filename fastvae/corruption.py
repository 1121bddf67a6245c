"""Input corruptions for denoising training (``fastvae train --denoise KIND:LEVEL``).

A denoising model sees a corrupted image and is scored against the clean one:
``model(corrupt(x), target=x)``. A :class:`Corruption` is a data transform the
model knows nothing about; the training engine applies it to every training
batch with fresh noise, and to the held-out images when it evaluates.

==================  =======================================================================
``gaussian:SIGMA``  add ``N(0, SIGMA^2)`` noise to every value, then clip to [0, 1] (the data range)
``mask:FRACTION``   set each pixel (all its channels) to 0 with probability ``FRACTION``
==================  =======================================================================

The noise is drawn apart from its use (:meth:`Corruption.noise`, then
:meth:`Corruption.apply`), so the engine can draw it for the global batch and
give each process its slice. Drawing is ``torch.randn``/``torch.rand`` from the
generator given, on the images' device: no host sync.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch


class Corruption:
    """A random corruption of images ``(B, C, H, W)`` with values in [0, 1]; ``str()`` gives its spec, ``"kind:level"``."""

    name: ClassVar[str]
    level_name: ClassVar[str]  # what the level is, for error messages

    def __init__(self, level: float):
        self.level = float(level)

    def noise_shape(self, batch_size: int, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the noise of ``batch_size`` images of ``image_shape`` ``(C, H, W)``."""
        return (batch_size, *image_shape)

    def noise(
        self, batch_size: int, image_shape: tuple[int, ...], *, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """The noise of ``batch_size`` images, float32, drawn from ``generator`` (sliceable along dim 0)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x`` corrupted with ``noise`` (from :meth:`noise`): a new tensor of ``x``'s shape and dtype."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """``x`` ``(B, C, H, W)`` corrupted with fresh noise from ``generator``."""
        return self.apply(x, self.noise(len(x), tuple(x.shape[1:]), generator=generator, device=x.device))

    def __str__(self) -> str:
        return f"{self.name}:{self.level:g}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.level:g})"


class GaussianCorruption(Corruption):
    """``clip(x + SIGMA * n, 0, 1)``, ``n ~ N(0, 1)`` per value (``gaussian:SIGMA``, ``SIGMA > 0``)."""

    name = "gaussian"
    level_name = "the noise's standard deviation SIGMA, a positive number"

    def noise(self, batch_size, image_shape, *, generator, device):
        return torch.randn(self.noise_shape(batch_size, image_shape), generator=generator, device=device)

    def apply(self, x, noise):
        return (x + self.level * noise.to(x.dtype)).clamp_(0, 1)


class MaskCorruption(Corruption):
    """Each pixel set to 0 (every channel) with probability ``FRACTION``, kept otherwise (``mask:FRACTION``, ``0 < FRACTION < 1``)."""

    name = "mask"
    level_name = "the fraction of pixels zeroed, a number strictly between 0 and 1"

    def noise_shape(self, batch_size, image_shape):
        return (batch_size, 1, *image_shape[1:])  # one draw per pixel, shared by its channels

    def noise(self, batch_size, image_shape, *, generator, device):
        return torch.rand(self.noise_shape(batch_size, image_shape), generator=generator, device=device)

    def apply(self, x, noise):
        return x * (noise >= self.level).to(x.dtype)


CORRUPTIONS: dict[str, type[Corruption]] = {kind.name: kind for kind in (GaussianCorruption, MaskCorruption)}


def parse_corruption(spec: str | None) -> Corruption | None:
    """The :class:`Corruption` that ``spec`` (``"gaussian:0.3"``, ``"mask:0.5"``) names; ``None`` for ``None``.

    Raises:
        ValueError: an unknown kind, or a level out of its range (a level that corrupts nothing included).
    """
    if spec is None:
        return None
    kind, _, text = str(spec).partition(":")
    if kind not in CORRUPTIONS:
        raise ValueError(
            f"denoise must be KIND:LEVEL with KIND one of {', '.join(CORRUPTIONS)} (gaussian:0.3, mask:0.5), got {spec!r}"
        )
    corruption = CORRUPTIONS[kind]
    try:
        level = float(text)
    except ValueError:
        level = math.nan
    valid = level > 0 and math.isfinite(level) and (kind != "mask" or level < 1)
    if not valid:
        raise ValueError(f"denoise {spec!r}: the level of {kind} is {corruption.level_name}")
    return corruption(level)
