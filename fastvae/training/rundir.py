"""The run folder that :func:`fastvae.training.train` writes (default ``runs/<data>-<model>-<YYYYmmdd-HHMMSS>``):

* ``metrics.jsonl``: one JSON line per optimizer step: ``step``, ``epoch``,
  ``loss`` and the model's metrics (for a VAE ``recon`` and ``kl``; means over
  the global batch, nats per image), the values the model logs with the step
  (a VAE's ``kl_weight``), ``lr``, ``grad_norm`` (the gradient norm before
  clipping, when gradients are clipped: ``--grad-clip``, or the model's default)
  and ``samples_per_s`` (global, averaged over the ``log_every`` steps it was
  measured on); the hierarchical VAE adds the KL of each stochastic layer
  (``kl_0`` is the top one) and ``active_channels``;
* ``checkpoint.pt``: model, optimizer, grad scaler, step, config, every
  rank's RNG state and the data's fingerprint, written atomically (a temporary file, then a rename)
  every ``checkpoint_every`` steps and at the end;
* at the end: ``reconstructions.png`` (held-out images over their
  reconstructions), ``samples.png`` (decoded draws from the prior),
  ``interpolation.png`` (decodes along a line between two encoded held-out
  images, each row framed by the two originals), ``loss.png`` (the loss and each
  of the model's metrics per step), the figures of logged metrics the model asks
  for (the hierarchical VAE's ``kl_layers.png``: the KL of each layer and the
  active latent channels over training) and ``eval.json`` (the model's held-out
  evaluation, also printed: for a VAE the ELBO and the importance-sampled
  log-likelihood, for an autoencoder the reconstruction error; a denoising run
  adds the same measured from corrupted inputs against the clean images, under
  ``corrupted_inputs``), each written atomically, ``eval.json`` last;
* and where they apply (:data:`OPTIONAL_FILES`): ``denoising.png`` for a
  denoising run (rows of held-out images, their corrupted versions, and the
  model's outputs for those), and ``latents.png`` for a 2-D latent space (the
  held-out images' codes, coloured by their labels where the dataset has them);
* with ``--tensorboard``: ``events.out.tfevents.*``, TensorBoard's event files
  (:mod:`fastvae.training.tensorboard_log`), one per process that trained the run.

* ``.lock``: the lock a command holds while it writes into the folder
  (:mod:`fastvae.training.runlock`): a second command is refused while the run is alive.

A folder that holds no checkpoint belongs to a run that stopped before its
first one (interrupted, killed, or stopped by a NaN loss): there is nothing to
resume in it, and a new run may take it over (:func:`new_run_dir`), unless the
run is still alive and holds it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastvae.errors import ConfigError
from fastvae.training.checkpoint import CHECKPOINT_FILE, load_checkpoint
from fastvae.training.files import describe_os_error
from fastvae.training.runlock import LOCK_FILE

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
    "lock": LOCK_FILE,
}
# The names of TensorBoard's event files begin with this (the rest names the time, host and process).
EVENT_FILE_PREFIX = "events.out.tfevents."
# Written when training ends, eval.json last: a finished run that lacks one was stopped while writing them.
FINAL_FILES = ("reconstructions", "samples", "interpolation", "loss_curve", "eval")
# Written only where they apply: a denoising run; a run with a 2-D latent space.
OPTIONAL_FILES = {"denoising": "denoising.png", "latent_scatter": "latents.png"}


def new_run_dir(config: TrainConfig, data_name: str, hold: Callable[[str], None]) -> tuple[str, bool]:
    """Create the run folder: ``config.out``, or a fresh ``runs/<data>-<model>-<time>``; returns it, and whether
    it took over ``config.out``: an existing folder holding no checkpoint and only files a run writes.

    ``hold(folder)`` takes the folder's lock (:func:`~fastvae.training.runlock.hold_run_folder`) before anything
    in it is looked at or removed: a folder held by a live run is refused, even before its first checkpoint.
    """
    if config.out:
        return config.out, _claim(config.out, hold)
    stem = os.path.join(RUNS_DIR, f"{data_name}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    for attempt in range(1, 1000):
        path = stem if attempt == 1 else f"{stem}-{attempt}"
        try:
            os.makedirs(path)
        except FileExistsError:
            continue
        except OSError as err:
            raise ConfigError(f"cannot create the run folder {path}: {describe_os_error(err)}; pass --out") from None
        hold(path)
        return path, False
    raise ConfigError(f"cannot find a free run folder name like {stem}; pass --out")


def _claim(out: str, hold: Callable[[str], None]) -> bool:
    """Create the folder ``out``, or empty one that held a run without a checkpoint; whether it existed."""
    existed = os.path.isdir(out)
    if existed:
        _claimable_files(out)  # refused before the lock is taken: a refused folder is left as it was
    else:
        if os.path.lexists(out):
            raise ConfigError(f"{out} already exists and is not a folder; choose another --out")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the run folder {out}: {describe_os_error(err)}") from None
    hold(out)
    for name in _claimable_files(out):  # again, now that no other command writes into it: what a run that stopped
        with contextlib.suppress(FileNotFoundError):  # before its first checkpoint left (its metrics, its events)
            os.remove(os.path.join(out, name))
    return existed


def _claimable_files(out: str) -> list[str]:
    """The files in the folder ``out`` but its lock file; a ConfigError unless they are those of a run stopped
    before its first checkpoint."""
    names = [name for name in _list(out) if name != LOCK_FILE]
    if CHECKPOINT_FILE in names:
        raise ConfigError(
            f"{out} already exists and holds a run; pass --resume to continue it, or choose another --out"
        )
    run_files = set(FILES.values()) | {f"{name}.tmp" for name in FILES.values()}
    others = sorted(name for name in set(names) - run_files if not name.startswith(EVENT_FILE_PREFIX))
    if others:
        raise ConfigError(
            f"{out} already exists and holds files of its own ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); choose another --out"
        )
    return names


def _list(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError as err:
        raise ConfigError(f"cannot read the folder {folder}: {describe_os_error(err)}") from None


def checkpoint_to_resume(out: str) -> tuple[dict, str]:
    """The checkpoint of the run in the folder ``out`` (``--resume``), and its path; a clear error where there is none."""
    if not os.path.lexists(out):
        raise ConfigError(f"{out} does not exist: there is no run to resume")
    if not os.path.isdir(out):
        raise ConfigError(
            f"--out {out} is a file; --resume continues a run folder: --out {os.path.dirname(out) or '.'}"
        )
    if CHECKPOINT_FILE not in _list(out):
        raise ConfigError(
            f"{out} holds no checkpoint: its run stopped before writing one, so there is nothing to resume; "
            "run the command again without --resume (a new run takes over a folder without a checkpoint)"
        )
    return load_checkpoint(out)


def remove_temporaries(out: str) -> None:
    """Remove the temporary files that a run killed while writing (SIGKILL, a power cut) left in ``out``."""
    for name in FILES.values():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, f"{name}.tmp"))


def missing_final_files(out: str) -> list[str]:
    """The files of :data:`FINAL_FILES` that the run folder ``out`` lacks."""
    return [FILES[key] for key in FINAL_FILES if not os.path.exists(os.path.join(out, FILES[key]))]
