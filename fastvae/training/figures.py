"""PNG figures of a training run (matplotlib, no display needed).

:func:`save_model_figures` writes ``reconstructions.png``, ``samples.png`` and
``interpolation.png`` from the model's ``reconstruct``, ``sample`` and
``interpolate`` (:class:`~fastvae.models.base.TrainableModel`);
:func:`save_loss_curve` writes ``loss.png`` from ``metrics.jsonl``, and
:func:`save_metric_plots` the figures of logged metrics a model asks for
(:meth:`~fastvae.models.base.TrainableModel.metric_plots`: the hierarchical
VAE's ``kl_layers.png``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from fastvae.data import to_unit_float
from fastvae.models import MetricPlot, TrainableModel

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


def save_image_grid(path: str, images: torch.Tensor, ncols: int) -> None:
    """Write :func:`image_grid` of ``images`` to the PNG file ``path``."""
    from matplotlib import image as mpimg

    mpimg.imsave(path, image_grid(images, ncols), cmap="gray", vmin=0.0, vmax=1.0, format="png")


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
    figure.savefig(path, dpi=100)


def save_metric_plots(folder: str, plots: dict[str, Sequence[MetricPlot]], records: Sequence[dict]) -> list[str]:
    """For each ``stem: panels`` of ``plots``, draw the panels' metrics over the steps of ``records``
    (``metrics.jsonl`` lines) side by side into ``folder/<stem>.png``; returns the paths written."""
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    paths = []
    for stem, panels in plots.items():
        figure = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
        for ax, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
            for name in panel.metrics:
                ax.plot(steps, [r.get(name, math.nan) for r in records], label=name, linewidth=1)
            ax.set(xlabel="step", ylabel=panel.ylabel, title=panel.title)
            if len(panel.metrics) > 1:
                ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        paths.append(os.path.join(folder, f"{stem}.png"))
        figure.savefig(paths[-1], dpi=100)
    return paths


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
    paths: dict[str, str], model: TrainableModel, held_out: torch.Tensor, generator: torch.Generator
) -> None:
    """Write the reconstructions of the first 16 ``held_out`` images, 64 samples drawn with ``generator``, and
    the interpolations between pairs of those images, to ``paths["reconstructions"]``, ``["samples"]`` and
    ``["interpolation"]``. The model is put in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    images = to_unit_float(held_out[:16].to(device))
    ncols = min(8, len(images))
    save_image_grid(paths["reconstructions"], reconstruction_grid(model, images, ncols), ncols)
    save_image_grid(paths["samples"], model.sample(64, generator=generator), 8)
    points = 10
    save_image_grid(paths["interpolation"], interpolation_grid(model, images, points), points + 2)
