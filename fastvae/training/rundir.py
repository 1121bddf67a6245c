"""The run folder that :func:`fastvae.training.train` writes (default ``runs/<data>-<model>-<YYYYmmdd-HHMMSS>``):

* ``metrics.jsonl``: one JSON line per optimizer step: ``step``, ``epoch``,
  ``loss`` and the model's metrics (for a VAE ``recon`` and ``kl``; means over
  the global batch, nats per image), the values the model logs with the step
  (a VAE's ``kl_weight``), ``lr`` and ``samples_per_s`` (global, averaged over
  the ``log_every`` steps it was measured on);
* ``checkpoint.pt``: model, optimizer, grad scaler, step, config and every
  rank's RNG state, written atomically (a temporary file, then a rename)
  every ``checkpoint_every`` steps and at the end;
* at the end: ``reconstructions.png`` (held-out images over their
  reconstructions), ``samples.png`` (decoded draws from the prior),
  ``interpolation.png`` (decodes along a line between two encoded held-out
  images, each row framed by the two originals), ``loss.png`` (the loss and each
  of the model's metrics per step) and ``eval.json`` (the model's held-out
  evaluation, also printed: for a VAE the ELBO and the importance-sampled
  log-likelihood, for an autoencoder the reconstruction error; a denoising run
  adds the same measured from corrupted inputs against the clean images, under
  ``corrupted_inputs``);
* and where they apply (:data:`OPTIONAL_FILES`): ``denoising.png`` for a
  denoising run (rows of held-out images, their corrupted versions, and the
  model's outputs for those), and ``latents.png`` for a 2-D latent space (the
  held-out images' codes, coloured by their labels where the dataset has them).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from fastvae.errors import ConfigError
from fastvae.training.checkpoint import CHECKPOINT_FILE

if TYPE_CHECKING:
    from fastvae.training.config import TrainConfig

RUNS_DIR = "runs"
FILES = {
    "metrics": "metrics.jsonl",
    "checkpoint": CHECKPOINT_FILE,
    "reconstructions": "reconstructions.png",
    "samples": "samples.png",
    "interpolation": "interpolation.png",
    "loss_curve": "loss.png",
    "eval": "eval.json",
}
# Written only where they apply: a denoising run; a run with a 2-D latent space.
OPTIONAL_FILES = {"denoising": "denoising.png", "latent_scatter": "latents.png"}


def new_run_dir(config: TrainConfig, data_name: str) -> str:
    """Create the run folder: ``config.out``, which must not exist, or a fresh ``runs/<data>-<model>-<time>``."""
    if config.out:
        if os.path.exists(config.out):
            raise ConfigError(
                f"{config.out} already exists; pass --resume to continue that run, or choose another --out"
            )
        os.makedirs(config.out)
        return config.out
    stem = os.path.join(RUNS_DIR, f"{data_name}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    for attempt in range(1, 1000):
        path = stem if attempt == 1 else f"{stem}-{attempt}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot find a free run folder name like {stem}; pass --out")
