"""The figures of a training run, PNG (matplotlib, no display needed), each written atomically.

:func:`save_model_figures` writes ``reconstructions.png``, ``samples.png`` and
``interpolation.png`` from the model's ``reconstruct``, ``sample`` and
``interpolate`` (:class:`~fastvae.models.base.TrainableModel`);
:func:`save_loss_curve` writes ``loss.png`` from ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fastvae.data import to_unit_float
from fastvae.errors import ConfigError
from fastvae.models import TrainableModel
from fastvae.training.files import write_atomic

# The keys of the run folder's paths that save_model_figures writes, in its order.
MODEL_FIGURES = ("reconstructions", "samples", "interpolation")
# The suffixes save_image_grid writes, and the format matplotlib is given for each.
IMAGE_FORMATS = {
    ".png": "png",
    ".jpg": "jpg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".webp": "webp",
    ".gif": "gif",
    ".pdf": "pdf",
    ".svg": "svg",
    ".eps": "eps",
    ".ps": "ps",
}
# Tiles smaller than this many pixels are enlarged (nearest neighbour) so that 8x8 digits stay visible.
MIN_TILE_PIXELS = 32
PAD = 2


def image_grid(images: torch.Tensor, ncols: int) -> np.ndarray:
    """Tile ``images`` ``(N, C, H, W)`` with values in [0, 1] into one ``(rows*H', ncols*W')`` image.

    Returns an ``(H, W)`` array for one channel, ``(H, W, C)`` otherwise, float32
    in [0, 1], with a grey border between tiles.
    """
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    scale = max(1, math.ceil(MIN_TILE_PIXELS / max(h, w)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    rows = math.ceil(n / ncols)
    grid = torch.full((c, rows * (h + PAD) + PAD, ncols * (w + PAD) + PAD), 0.5)
    for i, image in enumerate(images):
        top, left = PAD + (i // ncols) * (h + PAD), PAD + (i % ncols) * (w + PAD)
        grid[:, top : top + h, left : left + w] = image
    return grid[0].numpy() if c == 1 else grid[:3].permute(1, 2, 0).numpy()


def image_format(path: str) -> str:
    """The format :func:`save_image_grid` writes to ``path``, from its suffix (``.png``, ``.jpg``, ``.pdf``, ...).

    Raises :class:`ConfigError` for a suffix it cannot write, or none.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_FORMATS:
        what = f"the image format {suffix!r}" if suffix else "a file without a suffix"
        raise ConfigError(f"cannot write {what} ({path}); name it {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def save_image_grid(path: str, images: torch.Tensor, ncols: int) -> None:
    """Write :func:`image_grid` of ``images`` to ``path``, atomically, in the format its suffix names."""
    from matplotlib import image as mpimg

    grid, kind = image_grid(images, ncols), image_format(path)
    write_atomic(path, lambda f: mpimg.imsave(f, grid, cmap="gray", vmin=0.0, vmax=1.0, format=kind))


def save_loss_curve(path: str, records: Sequence[dict]) -> None:
    """Plot the per-step ``loss``, ``recon`` and ``kl`` of ``records`` (``metrics.jsonl`` lines) to ``path``."""
    from matplotlib.figure import Figure  # drawn without pyplot: no display or backend choice needed

    steps = [r["step"] for r in records]
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_kl = figure.subplots(1, 2)
    ax_loss.plot(steps, [r["loss"] for r in records], label="loss", linewidth=1)
    ax_loss.plot(steps, [r["recon"] for r in records], label="recon (-log p(x|z))", linewidth=1)
    # A log scale shows the late, slow progress; a Gaussian likelihood's loss can be negative, though.
    positive = all(r["loss"] > 0 and r["recon"] > 0 for r in records)
    ax_loss.set(xlabel="step", ylabel="nats per image", title="training loss", yscale="log" if positive else "linear")
    ax_loss.legend()
    ax_kl.plot(steps, [r["kl"] for r in records], color="C2", linewidth=1)
    ax_kl.set(xlabel="step", ylabel="nats per image", title="KL(q(z|x) || p(z))")
    for ax in (ax_loss, ax_kl):
        ax.grid(alpha=0.3)
    write_atomic(path, lambda f: figure.savefig(f, dpi=100, format=image_format(path)))


@torch.no_grad()
def reconstruction_grid(model: TrainableModel, images: torch.Tensor, ncols: int) -> torch.Tensor:
    """``images`` and their reconstructions in alternate rows of ``ncols``: ready for a grid of ``ncols`` columns."""
    reconstructions = model.reconstruct(images).to(images.dtype)
    rows = []
    for start in range(0, len(images), ncols):
        rows += [images[start : start + ncols], reconstructions[start : start + ncols]]
    return torch.cat(rows)


@torch.no_grad()
def interpolation_grid(model: TrainableModel, images: torch.Tensor, points: int = 10) -> torch.Tensor:
    """Rows of ``[a, model.interpolate(a, b, points)..., b]`` (for a VAE: decodes between the posterior means).

    ``images`` pairs up as ``(a, b) = (images[2i], images[2i + 1])``; returns
    ``(rows * (points + 2), C, H, W)``, ready for a grid of ``points + 2`` columns.
    """
    n_pairs = len(images) // 2
    a, b = images[0 : 2 * n_pairs : 2], images[1 : 2 * n_pairs : 2]
    decoded = model.interpolate(a, b, points)
    return torch.cat([a[:, None], decoded.to(images.dtype), b[:, None]], dim=1).flatten(0, 1)


@torch.no_grad()
def save_model_figures(
    paths: dict[str, str],
    model: TrainableModel,
    held_out: torch.Tensor,
    generator: torch.Generator,
    *,
    written: Callable[[str], None] | None = None,
) -> None:
    """Write the reconstructions of the first 16 ``held_out`` images, 64 samples drawn with ``generator``, and
    the interpolations between pairs of those images, to ``paths["reconstructions"]``, ``["samples"]`` and
    ``["interpolation"]`` (:data:`MODEL_FIGURES`), calling ``written(key)`` after each (a progress bar's tick).
    The model is put in eval mode."""
    written = written or (lambda key: None)
    model.eval()
    device = next(model.parameters()).device
    images = to_unit_float(held_out[:16].to(device))
    ncols = min(8, len(images))
    save_image_grid(paths["reconstructions"], reconstruction_grid(model, images, ncols), ncols)
    written("reconstructions")
    save_image_grid(paths["samples"], model.sample(64, generator=generator), 8)
    written("samples")
    points = 10
    save_image_grid(paths["interpolation"], interpolation_grid(model, images, points), points + 2)
    written("interpolation")
