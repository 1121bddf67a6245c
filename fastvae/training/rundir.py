"""The run folder that :func:`fastvae.training.train` writes (default ``runs/<data>-<model>-<YYYYmmdd-HHMMSS>``):

* ``metrics.jsonl``: one JSON line per optimizer step: ``step``, ``epoch``,
  ``loss`` and the model's metrics (for a VAE ``recon`` and ``kl``; means over
  the global batch, nats per image), the values the model logs with the step
  (a VAE's ``kl_weight``), ``lr``, ``grad_norm`` (the gradient norm before
  clipping, when gradients are clipped: ``--grad-clip``, or the model's default)
  and ``samples_per_s`` (global, averaged over the ``log_every`` steps it was
  measured on); the hierarchical VAE adds the KL of each stochastic layer
  (``kl_0`` is the top one) and ``active_channels``;
* ``checkpoint.pt``: model, optimizer, grad scaler, step, config and every
  rank's RNG state, written atomically (a temporary file, then a rename)
  every ``checkpoint_every`` steps and at the end;
* at the end: ``reconstructions.png`` (held-out images over their
  reconstructions), ``samples.png`` (decoded draws from the prior),
  ``interpolation.png`` (decodes along a line between two encoded held-out
  images, each row framed by the two originals), ``loss.png``, the figures of
  logged metrics the model asks for (the hierarchical VAE's ``kl_layers.png``:
  the KL of each layer and the active latent channels over training) and
  ``eval.json`` (the model's held-out evaluation, also printed: for a VAE the
  ELBO and the importance-sampled log-likelihood).
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
