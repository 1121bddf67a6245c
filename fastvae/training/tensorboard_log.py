"""TensorBoard event files of a run (``fastvae train --tensorboard``), written with ``torch.utils.tensorboard``.

The event files go into the run folder itself, so ``tensorboard --logdir runs``
shows one run per folder. :class:`TensorBoardLog` writes, under these tags:

* ``train/<name>``: every value of every ``metrics.jsonl`` record but ``step``
  and ``epoch``, at the record's step: ``loss``, whatever metrics the model
  reports (``recon``, ``kl``, a KL per layer, ...), the values it logs with the
  step (``kl_weight``), ``lr`` and ``samples_per_s``;
* ``images/reconstructions`` (held-out images over their reconstructions) and
  ``images/samples`` (decodes of the same 64 draws from the prior every time;
  none for a model that cannot sample), every ``image_every`` steps and at the end;
* ``held_out/<name>``: the final held-out evaluation (``elbo``, ``log_likelihood``), at the last step.

A resumed run appends a new event file to the folder, purging (``purge_step``)
whatever the interrupted run had logged after the checkpoint it resumes from,
so every step appears once. The ``tensorboard`` package is an optional extra
(``pip install -e ".[tensorboard]"`` in a checkout, or ``pip install tensorboard``).
"""

from __future__ import annotations

import importlib

import torch

from fastvae.data import to_unit_float
from fastvae.errors import ConfigError
from fastvae.models import TrainableModel
from fastvae.training.figures import image_grid, reconstruction_grid

# Not pip install "fastvae[tensorboard]": another project's package is called fastvae on PyPI.
INSTALL_HINT = 'pip install tensorboard (in a fastvae checkout: pip install -e ".[tensorboard]")'
RECONSTRUCTED_IMAGES = 16
SAMPLED_IMAGES = 64
NOT_LOGGED = ("step", "epoch")  # record keys that are positions, not values to plot


def require_tensorboard() -> None:
    """Raise :class:`ConfigError` (one line: what to install) if ``torch.utils.tensorboard`` cannot be imported."""
    try:
        importlib.import_module("torch.utils.tensorboard")  # raises ImportError without the tensorboard package
    except ImportError:
        raise ConfigError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None


class TensorBoardLog:
    """The TensorBoard event files of one run (rank 0 only); see the module's docstring for the tags.

    Args:
        log_dir: the run folder.
        resumed_from: the step of the checkpoint the run resumes from (0 for a new run); events
            an earlier process logged after it are purged.
        held_out: the held-out images ``(N, C, H, W)``; the first 16 are reconstructed.
        image_every: log the image grids every this many steps.
        seed: seed of the prior draws of ``images/samples``.
    """

    def __init__(self, log_dir: str, *, resumed_from: int, held_out: torch.Tensor, image_every: int, seed: int):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, purge_step=resumed_from + 1 if resumed_from else None)
        self.held_out = held_out[:RECONSTRUCTED_IMAGES]
        self.image_every = image_every
        self.seed = seed
        self.images_step = None

    def add_records(self, records: list[dict]) -> None:
        """Log the values of ``metrics.jsonl`` ``records`` as ``train/<name>`` scalars at their steps."""
        for record in records:
            for name, value in record.items():
                if name not in NOT_LOGGED:
                    self.writer.add_scalar(f"train/{name}", value, record["step"])

    def after_step(self, model: TrainableModel, step: int) -> None:
        """Log the image grids of ``model`` if ``step`` (steps done) is a multiple of ``image_every``."""
        if step % self.image_every == 0:
            self.add_images(model, step)

    @torch.no_grad()
    def add_images(self, model: TrainableModel, step: int) -> None:
        """Log ``model``'s reconstructions of the held-out images and its samples at ``step`` (once per step).

        The model runs in eval mode, in float32, and draws from a generator of
        its own, so training's random streams are untouched.
        """
        if step == self.images_step:
            return
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.autocast(device.type, enabled=False):
            images = to_unit_float(self.held_out.to(device))
            ncols = min(8, len(images))
            self._add_grid("images/reconstructions", reconstruction_grid(model, images, ncols), ncols, step)
            generator = torch.Generator(device=device).manual_seed(self.seed)
            try:
                samples = model.sample(SAMPLED_IMAGES, generator=generator)
            except NotImplementedError:  # a model without a generative side (an autoencoder)
                samples = None
            if samples is not None:
                self._add_grid("images/samples", samples, 8, step)
        model.train(was_training)
        self.images_step = step

    def _add_grid(self, tag: str, images: torch.Tensor, ncols: int, step: int) -> None:
        grid = image_grid(images, ncols)
        self.writer.add_image(tag, grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")

    def add_evaluation(self, results: dict, step: int) -> None:
        """Log the held-out ``results`` (``eval.json``'s values) as ``held_out/<name>`` scalars at ``step``; a
        nested dict (a denoising run's ``corrupted_inputs``) as ``held_out/<key>/<name>``."""
        for name, value in results.items():
            if isinstance(value, dict):
                for inner, number in value.items():
                    self.writer.add_scalar(f"held_out/{name}/{inner}", number, step)
            else:
                self.writer.add_scalar(f"held_out/{name}", value, step)

    def flush(self) -> None:
        """Write what is pending to disk (at each checkpoint, so the log is as complete as the checkpoint)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
