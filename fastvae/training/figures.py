"""The figures of a training run, PNG (matplotlib, no display needed), each written atomically.

:func:`save_model_figures` writes ``reconstructions.png``, ``samples.png`` and
``interpolation.png`` from the model's ``reconstruct``, ``sample`` and
``interpolate`` (:class:`~fastvae.models.base.TrainableModel`), and where they
apply ``denoising.png`` (:func:`denoising_grid`) and ``latents.png``
(:func:`save_latent_scatter`, from ``codes``); :func:`save_loss_curve` writes
``loss.png`` from ``metrics.jsonl``, and :func:`save_metric_plots` the figures
of logged metrics a model asks for
(:meth:`~fastvae.models.base.TrainableModel.metric_plots`: the hierarchical
VAE's ``kl_layers.png``).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fastvae.corruption import Corruption
from fastvae.data import to_unit_float
from fastvae.errors import ConfigError
from fastvae.models import MetricPlot, TrainableModel
from fastvae.training.evaluate import batched_codes
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
# A labelled grid is drawn at LABEL_DPI, one pixel of the grid per pixel of the file; its font takes about
# CHAR_PIXELS a character (at most: DejaVu Sans at 9 points) and LINE_PIXELS a line.
LABEL_DPI, LABEL_FONT_SIZE, CHAR_PIXELS, LINE_PIXELS = 100, 9, 8, 14


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


def save_image_grid(
    path: str, images: torch.Tensor, ncols: int, *, title: str | None = None, row_labels: Sequence[str] = ()
) -> None:
    """Write :func:`image_grid` of ``images`` to ``path``, atomically, in the format its suffix names.

    With a ``title`` (above the grid) or ``row_labels`` (left of each row, repeated in turn down the rows), the
    grid is drawn with its labels, one pixel of the image per pixel of the file; without, the file is the grid.
    """
    from matplotlib import image as mpimg

    grid, kind = image_grid(images, ncols), image_format(path)
    if title is None and not row_labels:
        write_atomic(path, lambda f: mpimg.imsave(f, grid, cmap="gray", vmin=0.0, vmax=1.0, format=kind))
        return
    figure = _labelled_grid(grid, math.ceil(len(images) / ncols), title, row_labels)
    write_atomic(path, lambda f: figure.savefig(f, dpi=LABEL_DPI, format=kind))


def row_label_pixels(row_labels: Sequence[str]) -> int:
    """The width of the margin that holds ``row_labels`` left of a grid (0 for none), in pixels."""
    return 12 + CHAR_PIXELS * max(map(len, row_labels)) if row_labels else 0


def _labelled_grid(grid: np.ndarray, rows: int, title: str | None, row_labels: Sequence[str]):
    """A matplotlib figure of the :func:`image_grid` ``grid`` (``rows`` rows of tiles) at its own pixel size, with
    ``title`` above it and ``row_labels`` beside its rows."""
    from matplotlib.figure import Figure

    height, width = grid.shape[:2]
    left = row_label_pixels(row_labels)
    fig_width = width + left
    title = "\n".join(textwrap.wrap(title or "", max(16, fig_width // CHAR_PIXELS)))  # a narrow grid: more lines
    top = 10 + LINE_PIXELS * (title.count("\n") + 1) if title else 0
    fig_height = height + top
    figure = Figure(figsize=(fig_width / LABEL_DPI, fig_height / LABEL_DPI), dpi=LABEL_DPI, facecolor="white")
    ax = figure.add_axes((left / fig_width, 0, width / fig_width, height / fig_height))
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        figure.text(0.5, 1 - top / 2 / fig_height, title, ha="center", va="center", fontsize=LABEL_FONT_SIZE)
    pitch = (height - PAD) / rows  # a row of tiles and the border below it
    for row in range(rows if row_labels else 0):
        middle = PAD + row * pitch + (pitch - PAD) / 2  # pixels from the grid's top
        label = row_labels[row % len(row_labels)]
        figure.text((left - 6) / fig_width, (height - middle) / fig_height, label, ha="right", va="center",
                    fontsize=LABEL_FONT_SIZE)
    return figure


def save_loss_curve(path: str, records: Sequence[dict], metrics: Sequence[str], units: str) -> None:
    """Plot the per-step ``loss`` of ``records`` (``metrics.jsonl`` lines) and each of the model's ``metrics``.

    One panel each, in ``units`` per image (the model's :attr:`~TrainableModel.units`);
    a metric equal to the loss at every step (an autoencoder's ``recon``) is not drawn twice.
    """
    from matplotlib.figure import Figure  # drawn without pyplot: no display or backend choice needed

    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    same = [name for name in metrics if [r[name] for r in records] == loss]
    series = {" = ".join(["loss", *same]): loss}
    series.update({name: [r[name] for r in records] for name in metrics if name not in same})
    figure = Figure(figsize=(0.5 + 3.7 * len(series), 3.5), layout="constrained")
    for i, (ax, (name, values)) in enumerate(zip(np.atleast_1d(figure.subplots(1, len(series))), series.items())):
        ax.plot(steps, values, color=f"C{i}", linewidth=1)
        # A log scale shows the late, slow progress; a Gaussian likelihood's loss can be negative, though.
        ax.set(xlabel="step", ylabel=f"{units} per image", title=name, yscale="log" if min(values) > 0 else "linear")
        ax.grid(alpha=0.3)
    write_atomic(path, lambda f: figure.savefig(f, dpi=100, format=image_format(path)))


def save_latent_scatter(path: str, codes: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Scatter the 2-D ``codes`` ``(N, 2)``, coloured by ``labels`` ``(N,)`` (one colour per class) if given."""
    from matplotlib.figure import Figure

    codes = codes.detach().float().cpu().numpy()
    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = figure.subplots()
    if labels is None:
        ax.scatter(codes[:, 0], codes[:, 1], s=6, alpha=0.7)
    else:
        labels = labels.cpu().numpy()
        for i, label in enumerate(np.unique(labels)):
            chosen = labels == label
            ax.scatter(codes[chosen, 0], codes[chosen, 1], s=6, alpha=0.7, color=f"C{i % 10}", label=str(label))
        ax.legend(title="label", markerscale=2.5, fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set(xlabel="z[0]", ylabel="z[1]", title=f"codes of {len(codes)} held-out images")
    ax.grid(alpha=0.3)
    write_atomic(path, lambda f: figure.savefig(f, dpi=100, format=image_format(path)))


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
        path = os.path.join(folder, f"{stem}.png")
        write_atomic(path, lambda f, figure=figure: figure.savefig(f, dpi=100, format="png"))
        paths.append(path)
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
def denoising_grid(
    model: TrainableModel, images: torch.Tensor, corruption: Corruption, generator: torch.Generator, ncols: int
) -> torch.Tensor:
    """Row triples of ``ncols``: ``images``, their corrupted versions (noise from ``generator``) and the model's
    reconstructions of those; ready for a grid of ``ncols`` columns."""
    corrupted = corruption(images, generator=generator)
    outputs = model.reconstruct(corrupted).to(images.dtype)
    rows = []
    for start in range(0, len(images), ncols):
        rows += [part[start : start + ncols] for part in (images, corrupted, outputs)]
    return torch.cat(rows)


@torch.no_grad()
def save_model_figures(
    paths: dict[str, str],
    model: TrainableModel,
    held_out: torch.Tensor,
    generator: torch.Generator,
    *,
    corruption: Corruption | None = None,
    labels: torch.Tensor | None = None,
    written: Callable[[str], None] | None = None,
) -> None:
    """Write the reconstructions of the first 16 ``held_out`` images, 64 samples drawn with ``generator``, and
    the interpolations between pairs of those images, to ``paths["reconstructions"]``, ``["samples"]`` and
    ``["interpolation"]`` (:data:`MODEL_FIGURES`), calling ``written(key)`` after each (a progress bar's tick);
    with a ``corruption``, the denoising of those images to ``paths["denoising"]``; with 2-D codes, the codes of
    all ``held_out`` images (coloured by ``labels``, if given) to ``paths["latent_scatter"]``. The model is put
    in eval mode."""
    written = written or (lambda key: None)
    model.eval()
    device = next(model.parameters()).device
    images = to_unit_float(held_out[:16].to(device))
    ncols = min(8, len(images))
    save_image_grid(
        paths["reconstructions"],
        reconstruction_grid(model, images, ncols),
        ncols,
        title=f"reconstructions of {len(images)} held-out images",
        row_labels=("held out", "reconstructed"),
    )
    written("reconstructions")
    save_image_grid(paths["samples"], model.sample(64, generator=generator), 8, title="samples: 64 random codes, decoded")
    written("samples")
    points = 10
    save_image_grid(
        paths["interpolation"],
        interpolation_grid(model, images, points),
        points + 2,
        title=f"interpolation: each row decodes {points} points between the codes of the two held-out images at "
        "its ends",
    )
    written("interpolation")
    if corruption is not None:
        save_image_grid(
            paths["denoising"],
            denoising_grid(model, images, corruption, generator, ncols),
            ncols,
            title=f"denoising: held-out images corrupted by {corruption}",
            row_labels=("clean", "corrupted", "output"),
        )
    try:
        code = model.codes(images[:1])
    except NotImplementedError:  # a model without codes has no scatter
        return
    if code.shape == (1, 2) and code.is_floating_point():  # 2-D codes (a VQ-VAE's integer code maps are not)
        save_latent_scatter(paths["latent_scatter"], batched_codes(model, held_out), labels)
