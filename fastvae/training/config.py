"""The settings of a training run: :class:`TrainConfig`, its validation, and merging it with a checkpoint's on resume."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from fastvae.backend import BACKENDS, resolve_backend
from fastvae.errors import ConfigError
from fastvae.models import LIKELIHOODS
from fastvae.training.builders import MODELS
from fastvae.training.distributed import DEVICES

PRECISIONS = ("fp32", "bf16", "fp16")
NOISE_MODES = ("rank", "global")


@dataclass
class TrainConfig:
    """Everything a training run depends on; the ``fastvae train`` options map onto these fields one to one."""

    # What is trained. A resumed run keeps these (and the next group) from its checkpoint.
    data: str = "mnist"
    num_images: int | None = None
    model: str = "mlp"
    latent_dim: int = 16
    hidden: tuple[int, ...] | None = None
    likelihood: str = "bce"
    logvar_limit: float | None = 10.0  # 0 or None: no clamp
    # The hierarchical VAE's (model "hvae"); None: the model's defaults.
    layers_per_resolution: tuple[int, ...] | None = None
    latent_channels: int | None = None
    # How it is trained.
    beta: float = 1.0
    free_bits: float = 0.0  # hvae: nats per latent channel of each layer that the KL term counts at least
    grad_clip: float | None = None  # clip the gradient norm to this; None: the model's default; 0: no clipping
    kl_warmup: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    precision: str = "fp32"
    seed: int = 0
    noise: str = "rank"
    # How long: steps, when given, wins over epochs. A resumed run may extend either.
    epochs: int = 60
    steps: int | None = None
    # How it runs: free to change when resuming.
    out: str | None = None
    resume: bool = False
    backend: str = "auto"
    compile: bool = False
    device: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    eval_k: int = 1000
    quiet: bool = False

    def __post_init__(self):
        if self.hidden is not None:
            self.hidden = tuple(self.hidden)
        if self.layers_per_resolution is not None:
            self.layers_per_resolution = tuple(self.layers_per_resolution)


MODEL_FIELDS = (
    "data", "num_images", "model", "latent_dim", "hidden", "likelihood", "logvar_limit", "layers_per_resolution",
    "latent_channels",
)
FIXED_ON_RESUME = MODEL_FIELDS + (
    "beta", "kl_warmup", "batch_size", "lr", "precision", "seed", "noise", "free_bits", "grad_clip",
)
HVAE_FIELDS = ("layers_per_resolution", "latent_channels", "free_bits")
LENGTH_FIELDS = ("epochs", "steps")


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the option for a value no run could use."""

    def choose(name, choices):
        if getattr(config, name) not in choices:
            raise ConfigError(f"unknown {name} {getattr(config, name)!r}: choose one of {', '.join(choices)}")

    def at_least(name, low, allow_none=False):
        value = getattr(config, name)
        if value is None and allow_none:
            return
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer of at least {low}, got {value!r}")

    choose("model", MODELS)
    choose("likelihood", LIKELIHOODS)
    choose("precision", PRECISIONS)
    choose("backend", BACKENDS)
    choose("device", DEVICES)
    choose("noise", NOISE_MODES)
    for name in ("latent_dim", "batch_size", "epochs", "checkpoint_every", "log_every", "eval_k"):
        at_least(name, 1)
    at_least("steps", 1, allow_none=True)
    at_least("num_images", 2, allow_none=True)
    at_least("kl_warmup", 0)
    at_least("seed", 0)
    if config.hidden is not None and (not config.hidden or min(config.hidden) < 1):
        raise ConfigError(f"hidden must list positive sizes, got {config.hidden}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ConfigError(f"lr must be a positive number, got {config.lr}")
    if not config.beta >= 0 or not math.isfinite(config.beta):
        raise ConfigError(f"beta must be a non-negative number, got {config.beta}")
    if config.logvar_limit is not None and not config.logvar_limit >= 0:
        raise ConfigError(f"logvar_limit must be non-negative (0 turns the clamp off), got {config.logvar_limit}")
    if config.layers_per_resolution is not None and (
        not config.layers_per_resolution or min(config.layers_per_resolution) < 0 or sum(config.layers_per_resolution) < 1
    ):
        raise ConfigError(
            f"layers_per_resolution must list non-negative counts, at least one layer in all, got "
            f"{config.layers_per_resolution}"
        )
    at_least("latent_channels", 1, allow_none=True)
    if not config.free_bits >= 0 or not math.isfinite(config.free_bits):
        raise ConfigError(f"free_bits must be a non-negative number, got {config.free_bits}")
    if config.grad_clip is not None and (not config.grad_clip >= 0 or not math.isfinite(config.grad_clip)):
        raise ConfigError(f"grad_clip must be a non-negative number (0 turns clipping off), got {config.grad_clip}")
    if config.model != "hvae":
        for name in HVAE_FIELDS:
            if getattr(config, name) != getattr(TrainConfig, name):
                raise ConfigError(f"{name} applies to model 'hvae' only, not {config.model!r}")
    if config.resume and not config.out:
        raise ConfigError("resume needs out: the folder of the run to continue")


def resumed_config(config: TrainConfig, saved: TrainConfig, explicit: Collection[str]) -> TrainConfig:
    """``config`` with the run-defining fields taken from the ``saved`` config of a checkpoint.

    A field in ``explicit`` (set by the user) that contradicts the checkpoint is an error.
    """
    merged = dataclasses.replace(config)
    for name in FIXED_ON_RESUME:
        saved_value = getattr(saved, name)
        if name not in explicit:
            setattr(merged, name, saved_value)
        elif getattr(config, name) != saved_value:
            raise ConfigError(
                f"the checkpoint in {config.out} was trained with {name}={saved_value!r}, not "
                f"{getattr(config, name)!r}; a resumed run keeps its settings (leave the option out)"
            )
    if not explicit & set(LENGTH_FIELDS):  # the run's own length, unless a new one is given
        for name in LENGTH_FIELDS:
            setattr(merged, name, getattr(saved, name))
    return merged


def check_backend(backend: str, device: torch.device) -> str:
    """The backend (``"triton"`` or ``"torch"``) that ``backend`` picks for float32 tensors on ``device``."""
    try:
        return resolve_backend(backend, device, {"images": torch.float32})
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"backend {backend!r} cannot run here: {err}") from None


def checkpoint_config(checkpoint: dict) -> TrainConfig:
    """The config a checkpoint was trained with (fields this version does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in checkpoint["config"].items() if name in known})
