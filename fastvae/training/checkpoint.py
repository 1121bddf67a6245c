"""Training checkpoints: written atomically, read back safely, the RNG state they carry, and the model in one.

A checkpoint is a dict of tensors and plain values (``torch.load(...,
weights_only=True)`` reads it without running pickled code): its ``format``,
the run's ``config``, ``image_shape``, ``step``, the ``model``, ``optimizer``
and ``scaler`` states, ``rng``: one RNG state per process of the run, and
``data``: the fingerprint of the images it was trained on
(:func:`fastvae.data.fingerprint`; checkpoints written before it existed lack it
and go unchecked).
"""

from __future__ import annotations

import os

import torch

from fastvae.data import ImageData, describe_fingerprint, fingerprint
from fastvae.errors import ConfigError
from fastvae.models import TrainableModel
from fastvae.training.builders import build_model
from fastvae.training.config import TrainConfig, checkpoint_config
from fastvae.training.files import describe_os_error, write_atomic

CHECKPOINT_FORMAT = "fastvae-train-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


# What each entry of a checkpoint must be; "data" is checked where it is used (older checkpoints lack it).
_ENTRIES = {
    "config": dict,
    "image_shape": list,
    "step": int,
    "model": dict,
    "optimizer": dict,
    "scaler": dict,
    "rng": list,
}
_FINGERPRINT = {"images", "image_shape", "dtype", "blake2b"}
# Names listed in one error message before "... and N more".
_LISTED = 4


def save_atomic(obj, path: str, save=None) -> None:
    """``save(obj, file)`` (default ``torch.save``, looked up at the call) to a temporary file beside ``path``, flushed to disk, then renamed
    over ``path``.

    A crash leaves either the old file or the new one, never half of one; a
    failed write (a full disk: ``OSError``) removes the temporary file, and
    Ctrl-C waits for the write to finish (see :func:`~fastvae.training.files.write_atomic`).
    """
    write = save or torch.save
    write_atomic(path, lambda f: write(obj, f))


def load_checkpoint(path: str) -> tuple[dict, str]:
    """Read a checkpoint written by :func:`train`, given its path or its run folder; returns it and its path.

    Checkpoints hold tensors and plain values only, so they load with
    ``weights_only=True``. Raises :class:`ConfigError` for a missing, empty,
    foreign or incomplete file.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{path} is empty (0 bytes), not a fastvae checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {describe_os_error(err)}") from None
    except Exception:  # pickle, zip and torch errors alike; torch's hint to load unsafely is no advice to pass on
        raise ConfigError(f"{path} is not a fastvae checkpoint: torch.load cannot read it") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a fastvae training checkpoint")
    bad = [name for name, kind in _ENTRIES.items() if not isinstance(checkpoint.get(name), kind)]
    shape = checkpoint.get("image_shape")
    if "image_shape" not in bad and not (len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        bad.append("image_shape")
    if "data" in checkpoint and not (
        isinstance(checkpoint["data"], dict) and checkpoint["data"].keys() >= _FINGERPRINT
    ):
        bad.append("data")
    if bad:
        raise ConfigError(
            f"{path} is an incomplete or damaged fastvae checkpoint: {', '.join(bad)} missing or malformed"
        )
    return checkpoint, path


def check_checkpoint_data(checkpoint: dict, path: str, data: ImageData, source: str) -> None:
    """Raise :class:`ConfigError` unless ``data`` (loaded from ``source``) is what the checkpoint at ``path`` was
    trained on, by :func:`~fastvae.data.fingerprint`; a checkpoint from before fingerprints is not checked."""
    expected = checkpoint.get("data")
    if expected is None:
        return
    found = fingerprint(data)
    keys = _FINGERPRINT | ({"files"} & (found.keys() | expected.keys()))  # a folder's file names and sizes too
    if {key: found.get(key) for key in keys} != {key: expected.get(key) for key in keys}:
        raise ConfigError(
            f"the data {source} is not what the checkpoint {path} was trained on: it holds "
            f"{describe_fingerprint(found)}, the run's data held {describe_fingerprint(expected)}"
        )


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch reported as a ConfigError naming ``path`` and what did not fit.

    The message lists the model's weights the checkpoint lacks, the checkpoint's
    the model has no place for, and the weights whose shapes differ (a few of
    each, then how many more).
    """
    mismatch = state_mismatch(model.state_dict(), state)
    try:
        if not mismatch:
            model.load_state_dict(state)
    except RuntimeError as err:
        mismatch = str(err).splitlines()[0]
    if mismatch:
        raise ConfigError(f"the checkpoint {path} does not fit this model: {mismatch}") from None


def state_mismatch(expected: dict, state: dict) -> str:
    """What keeps ``state`` from loading where ``expected`` is (two state dicts), in words; ``""`` when it fits."""
    parts = []
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    shapes = [
        f"{name} {_shape(state[name])} in the checkpoint, {_shape(value)} in the model"
        for name, value in expected.items()
        if name in state and _shape(state[name]) != _shape(value)
    ]
    for what, items in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)):
        if items:
            more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
            parts.append(f"{what}: {', '.join(items[:_LISTED])}{more}")
    return "; ".join(parts)


def _shape(value) -> tuple | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


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
    config = checkpoint_config(checkpoint, path)
    model = build_model(config, tuple(checkpoint["image_shape"]), backend)
    load_model_state(model, checkpoint["model"], path)
    return model.to(device).eval(), config
