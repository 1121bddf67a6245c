"""The settings of a training run: :class:`TrainConfig`, its validation, and merging it with a checkpoint's on resume."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from fastvae.backend import BACKENDS, requested_backend, resolve_backend
from fastvae.corruption import parse_corruption
from fastvae.errors import ConfigError
from fastvae.models import LIKELIHOODS
from fastvae.training.builders import DEFAULT_IWAE_K, MODELS, OBJECTIVES, default_eval_k, default_likelihood
from fastvae.training.distributed import DEVICES
from fastvae.training.schedule import LR_SCHEDULES

PRECISIONS = ("fp32", "bf16", "fp16")
NOISE_MODES = ("rank", "global")


@dataclass
class TrainConfig:
    """Everything a training run depends on; the ``fastvae train`` options map onto these fields one to one.

    A resumed run (``resume=True``) keeps every field it was started with
    except those in :data:`PER_INVOCATION`; a field the resume sets explicitly
    changes it only if it is in :data:`ADJUSTABLE_ON_RESUME` or
    :data:`LENGTH_FIELDS`, and is an error otherwise (see :func:`resumed_config`).
    """

    # What is trained.
    data: str = "mnist"
    num_images: int | None = None
    image_size: int | None = None  # a folder of images: resize the shorter side to this, crop the centre square
    objective: str = "vae"  # "vae"; "iwae": the importance-weighted bound; or "ae": the deterministic autoencoder
    model: str = "mlp"
    latent_dim: int = 20
    hidden: tuple[int, ...] | None = None
    likelihood: str | None = None  # None: the objective's default ("bce" for "vae", "mse" for "ae"), set on creation
    # Settings of the likelihood, for those that take them (its `options`); None: the likelihood's default,
    # filled in for a likelihood that takes them.
    num_mixtures: int | None = None
    num_bits: int | None = None
    logvar_limit: float | None = 10.0  # 0 or None: no clamp
    # The hierarchical VAE's (model "hvae"); None: the model's defaults.
    layers_per_resolution: tuple[int, ...] | None = None
    latent_channels: int | None = None
    # The VQ-VAE's (model "vqvae"); None: the model's defaults (512 codes of 64 values).
    num_codes: int | None = None
    code_dim: int | None = None
    # How it is trained.
    beta: float = 1.0
    free_bits: float = 0.0  # hvae: nats per latent channel of each layer that the KL term counts at least
    grad_clip: float | None = None  # clip the gradient norm to this; None: the model's default; 0: no clipping
    kl_warmup: int = 0
    iwae_k: int | None = None  # objective "iwae": importance samples per image (None: DEFAULT_IWAE_K, set on creation)
    denoise: str | None = None  # "gaussian:SIGMA" or "mask:FRACTION": corrupt the inputs, score the clean images
    batch_size: int = 128
    lr: float = 3e-3  # the peak of the schedule
    lr_schedule: str = "cosine"
    precision: str = "fp32"
    seed: int = 0
    noise: str = "rank"
    # How long: steps, when given, wins over epochs. A resumed run may extend either.
    epochs: int = 60
    steps: int | None = None
    # How it runs.
    out: str | None = None
    resume: bool = False
    backend: str = "auto"  # train() takes FASTVAE_BACKEND's value when this is not set explicitly
    compile: bool = False
    # The training step as a CUDA graph (fastvae.training.cuda_graph); fixed on resume: it changes the optimizer
    # (a capturable Adam with the learning rate on the device) and how the noise is drawn.
    cuda_graphs: bool = False
    device: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    eval_k: int | None = None  # None: the model's default (default_eval_k), set on creation
    quiet: bool = False
    tensorboard: bool = False
    tensorboard_image_every: int = 500

    def __post_init__(self):
        if self.hidden is not None:
            self.hidden = tuple(self.hidden)
        if self.layers_per_resolution is not None:
            self.layers_per_resolution = tuple(self.layers_per_resolution)
        if self.likelihood is None:
            self.likelihood = default_likelihood(self.objective)
        if self.eval_k is None:
            self.eval_k = default_eval_k(self.model)
        if self.iwae_k is None and self.objective == "iwae":
            self.iwae_k = DEFAULT_IWAE_K
        # The likelihood's own defaults for the settings it takes and that are not given, so that a checkpoint
        # records the values the run used.
        family = LIKELIHOODS.get(self.likelihood)
        for field, default in family.options.items() if family is not None else ():
            if field in LIKELIHOOD_OPTION_FIELDS and getattr(self, field) is None:
                setattr(self, field, default)


# The hierarchical VAE's fields, and the VQ-VAE's: an error with any other model.
HVAE_FIELDS = ("layers_per_resolution", "latent_channels", "free_bits")
VQVAE_FIELDS = ("num_codes", "code_dim")
# The fields that hold a likelihood's settings (fastvae.likelihoods.Likelihood.options), under the same names.
LIKELIHOOD_OPTION_FIELDS = ("num_mixtures", "num_bits")
# Fields of the command, not of the run: a resume never takes them from the checkpoint.
PER_INVOCATION = ("out", "resume", "quiet")
# The run's, but a resume may set them explicitly (its start line says so). The data may move: its
# fingerprint, not its path, decides whether it is the run's.
ADJUSTABLE_ON_RESUME = (
    "data",
    "backend",
    "compile",
    "device",
    "checkpoint_every",
    "log_every",
    "eval_k",
    "tensorboard",
    "tensorboard_image_every",
)
LENGTH_FIELDS = ("epochs", "steps")
# Everything else is fixed: a resume that sets it to another value is refused. New fields land here by default.
FIXED_ON_RESUME = tuple(
    f.name
    for f in dataclasses.fields(TrainConfig)
    if f.name not in PER_INVOCATION + ADJUSTABLE_ON_RESUME + LENGTH_FIELDS
)
# Adam's first step is lr / (1 - beta1) with torch's beta1 = 0.9, applied in float32.
MAX_LR = float(torch.finfo(torch.float32).max) * (1 - 0.9)
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def option_name(field: str) -> str:
    """The ``fastvae train`` option of the :class:`TrainConfig` field ``field``: ``eval_k`` -> ``--eval-k``."""
    return "--" + field.replace("_", "-")


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

    choose("objective", OBJECTIVES)
    choose("model", MODELS)
    choose("likelihood", LIKELIHOODS)
    choose("precision", PRECISIONS)
    choose("backend", BACKENDS)
    choose("device", DEVICES)
    choose("noise", NOISE_MODES)
    choose("lr_schedule", LR_SCHEDULES)
    for name in ("latent_dim", "batch_size", "epochs", "checkpoint_every", "log_every", "eval_k"):
        at_least(name, 1)
    at_least("tensorboard_image_every", 1)
    at_least("steps", 1, allow_none=True)
    at_least("num_images", 2, allow_none=True)
    at_least("image_size", 1, allow_none=True)
    at_least("kl_warmup", 0)
    at_least("iwae_k", 1, allow_none=True)
    at_least("seed", 0)
    if config.seed > MAX_SEED:
        raise ConfigError(f"seed must be at most 2**64 - 1 = {MAX_SEED}, got {config.seed}")
    if config.hidden is not None and (not config.hidden or min(config.hidden) < 1):
        raise ConfigError(f"hidden must list positive sizes, got {config.hidden}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ConfigError(f"lr must be a positive number, got {config.lr}")
    if config.lr > MAX_LR:
        raise ConfigError(
            f"lr must be at most {MAX_LR:.3g}, got {config.lr:g}: Adam's first step, lr / (1 - 0.9), must fit a float32"
        )
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
    at_least("num_codes", 1, allow_none=True)
    at_least("code_dim", 1, allow_none=True)
    if not config.free_bits >= 0 or not math.isfinite(config.free_bits):
        raise ConfigError(f"free_bits must be a non-negative number, got {config.free_bits}")
    if config.grad_clip is not None and (not config.grad_clip >= 0 or not math.isfinite(config.grad_clip)):
        raise ConfigError(f"grad_clip must be a non-negative number (0 turns clipping off), got {config.grad_clip}")
    if not config.resume:  # a resumed run's model comes from its checkpoint: its fields are checked by resumed_config
        check_model_fields(config)
    try:
        parse_corruption(config.denoise)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.resume and not config.out:
        raise ConfigError("resume needs out: the folder of the run to continue")
    if not config.resume:  # a resumed run's likelihood comes from its checkpoint: checked by resumed_config
        likelihood_options(config)


def check_cuda_graphs(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` for ``cuda_graphs`` where it cannot run: without a CUDA device, with
    ``--compile`` or with fp16's gradient scaler (which reads its inf check on the host)."""
    if not config.cuda_graphs:
        return
    if config.device == "cpu" or not torch.cuda.is_available():
        raise ConfigError("--cuda-graphs needs a CUDA GPU, and there is none here (or --device cpu was given)")
    if config.compile:
        raise ConfigError("--cuda-graphs and --compile are two ways to cut launch overhead: choose one")
    if config.precision == "fp16":
        raise ConfigError("--cuda-graphs does not take --precision fp16 (its gradient scaler syncs with the host): "
                          "use bf16 or fp32")


def check_model_fields(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` for a field of the hierarchical VAE or the VQ-VAE given to another model, or
    either of them with an objective other than the VAE's (the default)."""
    for model, fields in (("hvae", HVAE_FIELDS), ("vqvae", VQVAE_FIELDS)):
        for name in fields if config.model != model else ():
            if getattr(config, name) != getattr(TrainConfig, name):
                raise ConfigError(f"{option_name(name)} applies to model {model!r} only, not {config.model!r}")
    if config.model == "hvae" and config.objective != "vae":
        raise ConfigError(f"model 'hvae' trains objective 'vae' only, not {config.objective!r}")
    if config.model == "vqvae" and config.objective != "vae":
        raise ConfigError(
            f"model 'vqvae' trains its own loss (reconstruction, codebook and commitment terms), not objective "
            f"{config.objective!r}: leave --objective out"
        )


def likelihood_options(config: TrainConfig, likelihood: str | None = None) -> dict:
    """The settings that ``config`` gives its likelihood (``likelihood``, default ``config.likelihood``).

    Raises :class:`ConfigError` for a setting the likelihood does not take (say
    ``num_mixtures`` for ``"bce"``) or a value it refuses.
    """
    name = config.likelihood if likelihood is None else likelihood
    if name not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}")
    family = LIKELIHOODS[name]
    given = {field: getattr(config, field) for field in LIKELIHOOD_OPTION_FIELDS if getattr(config, field) is not None}
    for field in given:
        if field not in family.options:
            takers = [other for other, cls in LIKELIHOODS.items() if field in cls.options]
            raise ConfigError(
                f"{field} ({option_name(field)}) is a setting of likelihood {' or '.join(takers)} only, "
                f"not of {name}"
            )
    try:
        family(**given)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"likelihood {name}: {err}") from None
    return given


def resumed_config(config: TrainConfig, saved: TrainConfig, explicit: Collection[str]) -> tuple[TrainConfig, list[str]]:
    """``config`` for resuming the run whose checkpoint holds ``saved``, and what the resume changes, in words.

    Every field comes from ``saved`` except those of :data:`PER_INVOCATION`
    and those in ``explicit`` (set by the user): an explicit field of
    :data:`ADJUSTABLE_ON_RESUME` or :data:`LENGTH_FIELDS` replaces the saved
    value (listed in the changes, as ``"--eval-k 1000 -> 10"``); one of
    :data:`FIXED_ON_RESUME` that contradicts the checkpoint is a :class:`ConfigError`.
    """
    merged = dataclasses.replace(config)
    # Settings the saved run's likelihood does not take are refused as such, before any conflict.
    likelihood_options(config, config.likelihood if "likelihood" in explicit else saved.likelihood)
    changes = []
    new_length = bool(set(explicit) & set(LENGTH_FIELDS))  # a new length replaces both: --steps wins over --epochs
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in PER_INVOCATION:
            continue
        saved_value, value = getattr(saved, name), getattr(config, name)
        given = new_length if name in LENGTH_FIELDS else name in explicit
        if not given:
            setattr(merged, name, saved_value)
        elif name in FIXED_ON_RESUME and value != saved_value:
            raise ConfigError(
                f"the checkpoint in {config.out} was trained with {name}={saved_value!r}, not "
                f"{value!r}; a resumed run keeps its settings (leave {option_name(name)} out)"
            )
        elif name in explicit and value != saved_value:
            changes.append(f"{option_name(name)} {_words(saved_value)} -> {_words(value)}")
    return merged, changes


def _words(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def backend_from_environment() -> str:
    """The backend ``FASTVAE_BACKEND`` names (``"auto"`` when it is unset): the default of ``--backend``.

    Raises :class:`ConfigError` for a value that names no backend.
    """
    try:
        return requested_backend(None)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_backend(backend: str | None, device: torch.device) -> str:
    """The backend (``"triton"`` or ``"torch"``) that ``backend`` picks for float32 tensors on ``device``.

    ``None``: the one ``FASTVAE_BACKEND`` names (:func:`backend_from_environment`).
    """
    if backend is None:
        backend = backend_from_environment()
    try:
        return resolve_backend(backend, device, {"images": torch.float32})
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"backend {backend!r} cannot run here: {err}") from None


# The defaults that checkpoints written before ``lr_schedule`` existed were trained with, where they differ
# from today's: such a run resumes, evaluates and samples as the model it was.
_DEFAULTS_BEFORE_LR_SCHEDULE = {"lr_schedule": "constant"}
_MLP_HIDDEN_BEFORE_LR_SCHEDULE = (512, 256)


def checkpoint_config(checkpoint: dict, path: str) -> TrainConfig:
    """The config the checkpoint read from ``path`` was trained with (fields this version does not know are dropped).

    A checkpoint written before ``lr_schedule`` existed gets the defaults of its time (a constant rate; for
    the mlp, hidden sizes (512, 256)). Raises :class:`ConfigError` when it holds values no run could have used.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        saved = {name: value for name, value in checkpoint["config"].items() if name in known}
        if "lr_schedule" not in saved:
            saved.update(_DEFAULTS_BEFORE_LR_SCHEDULE)
            if saved.get("model", "mlp") == "mlp" and saved.get("hidden") is None:
                saved["hidden"] = _MLP_HIDDEN_BEFORE_LR_SCHEDULE
        config = TrainConfig(**saved)
        validate_config(config)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{path} holds a damaged run configuration: {err}") from None
    return config
