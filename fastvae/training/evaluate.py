"""Evaluating a trained model on held-out images: the means of its per-image metrics, and ``eval.json``.

:func:`evaluate_held_out` is what ``fastvae train`` runs at the end and
``fastvae eval`` runs on a checkpoint: the model's metrics of the clean images
and, given a corruption (a denoising run's, or ``fastvae eval --denoise``), the
same metrics of the corrupted images scored against the clean ones, under
:data:`CORRUPTED`; :func:`format_held_out` prints both with the model's words.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from fastvae.corruption import Corruption
from fastvae.data import to_unit_float
from fastvae.models import TrainableModel
from fastvae.training.files import write_atomic
from fastvae.training.progress import progress_bar

# The key of the metrics measured from corrupted inputs, in the results and in eval.json.
CORRUPTED = "corrupted_inputs"


@torch.no_grad()
def evaluate(
    model: TrainableModel,
    images: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    corruption: Corruption | None = None,
    progress: bool = False,
    **options,
) -> dict[str, float]:
    """The means over ``images`` of :meth:`TrainableModel.evaluate`'s per-image metrics, batch by batch, and what
    :meth:`TrainableModel.summarize_totals` makes of the sums of its per-image counts (``(B, n)`` metrics: a
    VQ-VAE's code usage).

    For a VAE (``options``: ``k``): ``elbo`` and ``log_likelihood``, nats per
    image; for an autoencoder ``recon``, in its loss's units. With a
    ``corruption``, each batch is corrupted (noise from ``generator``) and the
    model's outputs for it are scored against the clean batch. Runs in float32
    (autocast off) with the model in eval mode; ``generator`` draws the noise.
    ``progress``: show a bar of the images done on stderr.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = defaultdict(float)
    totals: dict[str, torch.Tensor] = {}  # per-image counts (B, n), summed over the images
    bar = progress_bar(total=len(images), desc="held-out evaluation", unit="image", enabled=progress)
    with torch.autocast(device.type, enabled=False), bar:
        for batch in images.split(batch_size):
            x = to_unit_float(batch.to(device))
            if corruption is None:
                metrics = model.evaluate(x, generator=generator, **options)
            else:
                metrics = model.evaluate(corruption(x, generator=generator), generator=generator, target=x, **options)
            for name, values in metrics.items():
                if values.dim() == 2:
                    totals[name] = values.double().sum(dim=0) + totals.get(name, 0)
                else:
                    sums[name] += values.sum().item()
            bar.update(len(batch))
    model.train(was_training)
    results = {name: total / len(images) for name, total in sums.items()}
    if totals:
        results.update(model.summarize_totals({name: total.cpu() for name, total in totals.items()}))
    return results


@torch.no_grad()
def batched_codes(model: TrainableModel, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model.codes`` of ``images`` ``(N, C, H, W)`` (any dtype :func:`to_unit_float` takes), batch by batch, in
    float32 with the model in eval mode: ``(N, D)`` on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.autocast(device.type, enabled=False):
        codes = [model.codes(to_unit_float(batch.to(device))) for batch in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(codes)


def evaluate_held_out(
    model: TrainableModel,
    images: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    corruption: Corruption | None,
    options: dict,
    progress: bool = False,
) -> dict:
    """:func:`evaluate` of the clean ``images``, then, given a ``corruption``, of the corrupted ones under
    :data:`CORRUPTED` (``progress``: a bar for each)."""
    results: dict = evaluate(model, images, batch_size=batch_size, generator=generator, progress=progress, **options)
    if corruption is not None:
        results[CORRUPTED] = evaluate(
            model, images, batch_size=batch_size, generator=generator, corruption=corruption, progress=progress, **options
        )
    return results


def format_held_out(
    model: TrainableModel, results: dict, *, n_images: int, corruption: Corruption | None, options: dict
) -> str:
    """The lines printed for :func:`evaluate_held_out`'s ``results``: the model's :meth:`~TrainableModel.format_evaluation`
    of the clean images' metrics, then of the corrupted inputs' ones."""
    clean = {name: value for name, value in results.items() if name != CORRUPTED}
    text = model.format_evaluation(clean, n_images=n_images, **options)
    if corruption is not None:
        corrupted = model.format_evaluation(
            results[CORRUPTED], n_images=n_images, corruption=str(corruption), **options
        )
        text = f"{text}\n{corrupted}"
    return text


def write_evaluation(
    path: str, results: dict, *, step: int, n_images: int, options: dict, corruption: Corruption | None = None
) -> None:
    """Write ``eval.json`` atomically: the step, the number of held-out images, the evaluation's settings (the corruption's
    spec as ``denoise``) and ``results``."""
    settings = {**options, **({"denoise": str(corruption)} if corruption is not None else {})}
    record = {"step": step, "held_out_images": n_images, **settings, **results}
    write_atomic(path, lambda f: json.dump(record, f, indent=1), binary=False)
