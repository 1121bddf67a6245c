"""Evaluating a trained model on held-out images: the means of its per-image metrics, and ``eval.json``."""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from fastvae.data import to_unit_float
from fastvae.models import TrainableModel
from fastvae.training.files import write_atomic
from fastvae.training.progress import progress_bar


@torch.no_grad()
def evaluate(
    model: TrainableModel,
    images: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = False,
    **options,
) -> dict[str, float]:
    """The means over ``images`` of :meth:`TrainableModel.evaluate`'s per-image metrics, batch by batch.

    For a VAE (``options``: ``k``): ``elbo`` and ``log_likelihood``, nats per
    image. Runs in float32 (autocast off) with the model in eval mode;
    ``generator`` draws the noise. ``progress``: show a bar of the images done on stderr.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = defaultdict(float)
    bar = progress_bar(total=len(images), desc="held-out evaluation", unit="image", enabled=progress)
    with torch.autocast(device.type, enabled=False), bar:
        for batch in images.split(batch_size):
            x = to_unit_float(batch.to(device))
            for name, values in model.evaluate(x, generator=generator, **options).items():
                sums[name] += values.sum().item()
            bar.update(len(batch))
    model.train(was_training)
    return {name: total / len(images) for name, total in sums.items()}


def write_evaluation(path: str, results: dict[str, float], *, step: int, n_images: int, options: dict) -> None:
    """Write ``eval.json`` atomically: the step, the number of held-out images, the evaluation's settings and ``results``."""
    record = {"step": step, "held_out_images": n_images, **options, **results}
    write_atomic(path, lambda f: json.dump(record, f, indent=1), binary=False)
