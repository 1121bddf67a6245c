"""Training checkpoints: written atomically, read back safely, the RNG state they carry, and the model in one.

A checkpoint is a dict of tensors and plain values (``torch.load(...,
weights_only=True)`` reads it without running pickled code): its ``format``,
the run's ``config``, ``image_shape``, ``step``, the ``model``, ``optimizer``
and ``scaler`` states, and ``rng``: one RNG state per process of the run.
"""

from __future__ import annotations

import os

import torch

from fastvae.models import TrainableModel
from fastvae.errors import ConfigError
from fastvae.training.builders import build_model
from fastvae.training.config import TrainConfig, checkpoint_config

CHECKPOINT_FORMAT = "fastvae-train-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


def save_atomic(obj, path: str, save=torch.save) -> None:
    """``save(obj, file)`` (``torch.save``) to a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``.

    A crash leaves either the old file or the new one, never half of one.
    """
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: str) -> tuple[dict, str]:
    """Read a checkpoint written by :func:`train`, given its path or its run folder; returns it and its path.

    Checkpoints hold tensors and plain values only, so they load with ``weights_only=True``.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike mean "not a readable checkpoint"
        raise ConfigError(f"cannot read {path} as a checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a fastvae training checkpoint")
    return checkpoint, path


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch reported as a ConfigError naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).splitlines()[0]
        raise ConfigError(f"the checkpoint {path} does not fit this model ({detail})") from None


def rng_state(
    device: torch.device,
    noise_generator: torch.Generator | None,
    corruption_generator: torch.Generator | None = None,
) -> dict:
    """This process's random state: torch's CPU generator, its GPU's, the global-noise generator and the
    corruption's (a denoising run's)."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "noise": noise_generator.get_state() if noise_generator is not None else None,
        "corruption": corruption_generator.get_state() if corruption_generator is not None else None,
    }


def set_rng_state(
    state: dict,
    device: torch.device,
    noise_generator: torch.Generator | None,
    corruption_generator: torch.Generator | None = None,
) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if noise_generator is not None and state["noise"] is not None:
        noise_generator.set_state(state["noise"])
    if corruption_generator is not None and state.get("corruption") is not None:
        corruption_generator.set_state(state["corruption"])


def model_from_checkpoint(
    checkpoint: dict, path: str, device: torch.device, backend: str | None = None
) -> tuple[TrainableModel, TrainConfig]:
    """Rebuild the model that ``checkpoint`` (read from ``path``) was trained as, with its weights, on ``device``.

    The model comes from :func:`~fastvae.training.builders.build_model` and the checkpoint's config.
    """
    config = checkpoint_config(checkpoint)
    model = build_model(config, tuple(checkpoint["image_shape"]), backend)
    load_model_state(model, checkpoint["model"], path)
    return model.to(device).eval(), config
