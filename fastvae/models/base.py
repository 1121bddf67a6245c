"""The interface between the training engine (:mod:`fastvae.training`) and a model: :class:`TrainableModel`.

The engine knows no model by name: it steps, logs, evaluates and draws any
subclass of :class:`TrainableModel` through the methods below, and
:mod:`fastvae.training.builders` is the one place that maps a config to a model.

A training step is::

    inputs = model.step_inputs(step)                        # per-step forward arguments, and values to log
    noise = model.noise_inputs(global_batch, generator=g, device=d)  # --noise global only; sliced per rank
    out = model(x, **noise, **inputs.forward)               # out.loss: () tensor; out.metrics: {name: (B,) or ()}
    out = model(corrupt(x), target=x, **noise, **inputs.forward)    # instead, when denoising (--denoise)
    out.loss.backward()                                     # then the gradient norm clipped to model.default_grad_clip

and the engine logs ``{"step", "epoch", **inputs.log, "lr", "loss", **batch means of out.metrics}``
(plus ``grad_norm`` when it clips gradients).
A denoising run differs only in what the model is given: ``x`` is what the
encoder sees, ``target`` what the output is scored against (``x`` itself by
default); the corruption (:mod:`fastvae.corruption`) is the engine's, not the model's.
When training ends the engine calls ``model.after_training(batches)`` with the
training images. Then it averages ``model.evaluate(x, generator=g, **options)``
over the held-out images (and, for a denoising run, ``model.evaluate(corrupt(x),
target=x, ...)``), writes them to ``eval.json`` and prints
``model.format_evaluation(results, n_images=..., **options)``; its figures
come from ``reconstruct``, ``sample``, ``interpolate`` and ``codes``, and from
the logged metrics that ``metric_plots`` names; ``fastvae encode`` writes ``codes``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn


class StepInputs(NamedTuple):
    """What a model wants for one training step, from :meth:`TrainableModel.step_inputs`."""

    # Keyword arguments of forward. Tensors, not floats: torch.compile would recompile for every new value.
    forward: dict[str, torch.Tensor]
    # Plain values logged with the step in metrics.jsonl (for instance the KL weight of a warm-up).
    log: dict[str, float]


class MetricPlot(NamedTuple):
    """One panel of a figure of logged metrics over training (:meth:`TrainableModel.metric_plots`)."""

    title: str
    ylabel: str
    metrics: tuple[str, ...]  # names of out.metrics, one line each


class TrainableModel(nn.Module):
    """A model that :func:`fastvae.training.train` can train.

    ``forward(x, *, target=None, **inputs)`` returns an output with ``loss`` (a
    ``()`` float32 tensor, what the optimizer minimises) and ``metrics`` (a dict
    of name -> ``(B,)`` per-image tensors, such as ``recon`` and ``kl``, or
    ``()`` values of the whole batch; the engine logs their batch means, in the
    dict's order). ``target`` (``x``'s shape) is what the output is scored
    against, ``x`` when ``None``; the engine passes it only when it corrupts
    ``x`` (denoising). The methods below have defaults for a model without
    per-step inputs or noise; the evaluation and figure methods are the model's own.
    """

    # The unit of the loss and metrics per image, for figures: "nats", "squared error", ...
    units: str = "per image"
    # The gradient norm the engine clips to unless its config says otherwise (None: no clipping).
    default_grad_clip: float | None = None

    def step_inputs(self, step: int) -> StepInputs:
        """The forward arguments and logged values of the training step ``step`` (from 0)."""
        return StepInputs({}, {})

    def noise_inputs(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor] | None:
        """Forward arguments holding the noise of ``batch_size`` images drawn from ``generator``, or ``None``.

        Used by ``--noise global``: the engine draws the global batch's noise
        and gives each rank its slice along dim 0. ``None``: the model draws no noise.
        """
        return None

    def after_training(self, batches: Iterable[torch.Tensor]) -> None:
        """Called once when training ends (before the last checkpoint), with the training images in batches.

        ``batches``: float32 ``(B, ...)`` tensors in [0, 1] on the model's device,
        under ``torch.no_grad`` with the model in eval mode. A model may keep
        statistics of the data here (an autoencoder: the spread of its codes,
        for :meth:`sample`), in buffers, so that they are checkpointed. Default: nothing.
        """

    def evaluate(
        self, x: torch.Tensor, *, generator: torch.Generator, target: torch.Tensor | None = None, **options
    ) -> dict[str, torch.Tensor]:
        """Held-out metrics of the images ``x`` ``(B, ...)``: name -> ``(B,)`` per-image values (averaged over the
        held-out images), or ``(B, n)`` per-image counts (summed over them, for :meth:`summarize_totals`).

        ``target``: the images the outputs are scored against (``x`` when
        ``None``; the clean images when ``x`` is corrupted). ``generator`` draws
        any noise; ``options`` are the evaluation's settings (for a VAE, ``k``),
        which the engine also writes to ``eval.json``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no held-out evaluation")

    def summarize_totals(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out numbers from the sums over all the held-out images of :meth:`evaluate`'s per-image counts: the
        metrics it returns as ``(B, n)`` tensors (a VQ-VAE's code usage, ``(B, K)``) are summed to ``(n,)`` float64
        CPU tensors in ``totals``, and what this returns joins the means of the ``(B,)`` ones. Default: nothing."""
        return {}

    def format_evaluation(
        self, results: dict[str, float], *, n_images: int, corruption: str | None = None, **options
    ) -> str:
        """The lines printed for ``results``, the means over ``n_images`` images of :meth:`evaluate`'s metrics.

        ``corruption``: the spec (``"gaussian:0.3"``) of the corruption of the
        inputs that ``results`` were measured from (against the clean images), or ``None``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no held-out evaluation")

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic latent code of each image of ``x`` ``(B, ...)``: ``(B, D)`` (a VAE's posterior mean)."""
        raise NotImplementedError(f"{type(self).__name__} has no latent codes")

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images reconstructed from ``x`` ``(B, ...)``, of ``x``'s shape."""
        raise NotImplementedError(f"{type(self).__name__} cannot reconstruct")

    def metric_plots(self) -> dict[str, list[MetricPlot]]:
        """Figures the engine draws from ``metrics.jsonl`` at the end of a run: file stem -> its panels."""
        return {}

    def sample(self, n: int, *, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images generated by the model, ``(n, ...)``; ``temperature`` scales the spread of the prior's
        draws (1: the model itself)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample")

    def sample_note(self) -> str | None:
        """What a person should know about :meth:`sample`'s images, printed with them; ``None``: nothing."""
        return None

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, points: int) -> torch.Tensor:
        """Decodes along a line between the codes of ``a`` and ``b`` ``(P, ...)``: ``(P, points, ...)``, ends included."""
        raise NotImplementedError(f"{type(self).__name__} cannot interpolate")


def check_batch(x: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a batch of at least one image, ``(B, ...)`` with ``B >= 1``: a loss
    is a mean over the batch, which an empty one does not have (per-image results of no images are empty instead)."""
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(
            f"{name} must be a batch of at least one image, (B, ...) with B >= 1; got shape {tuple(x.shape)}"
        )


def check_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature``, the scale of the prior's spread when sampling, is ``>= 0``."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")


def held_out_label(what: str, corruption: str | None) -> str:
    """``"held-out <what>"``, followed by the inputs' corruption when there is one, for evaluation lines."""
    label = f"held-out {what}"
    return label if corruption is None else f"{label} from inputs corrupted by {corruption} (against the clean images)"


def lerp_codes(z_a: torch.Tensor, z_b: torch.Tensor, points: int) -> torch.Tensor:
    """``z_a + t (z_b - z_a)`` for ``t`` in ``linspace(0, 1, points)``: ``(P, D)`` each to ``(P, points, D)``."""
    t = torch.linspace(0, 1, points, device=z_a.device).view(1, points, 1)
    return z_a[:, None] + t * (z_b - z_a)[:, None]
