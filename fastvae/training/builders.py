"""The one place that maps a :class:`~fastvae.training.config.TrainConfig` to a model.

Everything else in :mod:`fastvae.training` speaks to the model through
:class:`~fastvae.models.base.TrainableModel` only. A new architecture is a
function here and an entry in :data:`MODELS`; a new objective (what is trained
on that architecture) an entry in :data:`OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastvae.errors import ConfigError
from fastvae.likelihoods import make_likelihood
from fastvae.models import (
    VQVAE,
    HierarchicalVAE,
    TrainableModel,
    conv_autoencoder,
    conv_vae,
    mlp_autoencoder,
    mlp_vae,
)

if TYPE_CHECKING:
    from fastvae.training.config import TrainConfig


@dataclass(frozen=True)
class Objective:
    """What ``--objective`` trains on the chosen architecture, and which settings it takes."""

    description: str  # for --help
    mlp: Callable[..., TrainableModel]  # mlp_vae-like builder
    conv: Callable[..., TrainableModel]  # conv_vae-like builder
    default_likelihood: str
    # Its model's keyword arguments taken from the config, beyond latent_dim, likelihood and backend.
    model_options: Callable[[TrainConfig], dict] = lambda config: {}
    # Its held-out evaluation's settings (TrainableModel.evaluate's options) taken from the config.
    evaluation_options: Callable[[TrainConfig], dict] = lambda config: {}
    # Options that mean nothing to it: config field -> why, for the error a user gets when setting one.
    unused_options: dict[str, str] = field(default_factory=dict)


# fastvae train's mlp: one hidden layer of 400, as the canonical VAE, beats (512, 256) at its 2,100 steps (README).
MLP_HIDDEN = (400,)


def _vae_options(config: TrainConfig) -> dict:
    return dict(beta=config.beta, kl_warmup=config.kl_warmup, logvar_limit=config.logvar_limit or None)


# Importance samples per image of --objective iwae by default (Burda et al. train with 5 and 50).
DEFAULT_IWAE_K = 5
_NO_KL = "an autoencoder has no KL term"
_IWAE_ONLY = "the importance samples per image belong to --objective iwae"
OBJECTIVES: dict[str, Objective] = {
    "vae": Objective(
        "the variational autoencoder, trained on the negative ELBO",
        mlp_vae,
        conv_vae,
        default_likelihood="bce",
        model_options=_vae_options,
        evaluation_options=lambda config: {"k": config.eval_k},
        unused_options={"iwae_k": _IWAE_ONLY},
    ),
    "iwae": Objective(
        "the VAE's networks trained on the importance-weighted bound (IWAE) with --iwae-k samples per image",
        mlp_vae,
        conv_vae,
        default_likelihood="bce",
        model_options=lambda config: dict(_vae_options(config), iwae_k=config.iwae_k),
        evaluation_options=lambda config: {"k": config.eval_k},
    ),
    "ae": Objective(
        "the deterministic autoencoder, trained on the reconstruction error",
        mlp_autoencoder,
        conv_autoencoder,
        default_likelihood="mse",
        unused_options={
            "beta": _NO_KL,
            "kl_warmup": _NO_KL,
            "logvar_limit": "an autoencoder's code is deterministic, with no log-variance",
            "eval_k": "an autoencoder has no likelihood to importance-sample (its evaluation is the reconstruction "
            "error)",
            "iwae_k": _IWAE_ONLY,
        },
    ),
}


def _mlp(config: TrainConfig, image_shape: tuple[int, int, int], **common) -> TrainableModel:
    build = OBJECTIVES[config.objective].mlp
    return build(image_shape, **common, hidden=config.hidden or MLP_HIDDEN)


def _conv(config: TrainConfig, image_shape: tuple[int, int, int], **common) -> TrainableModel:
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"model 'conv' takes square images, got {height}x{width}; use model 'mlp'")
    return OBJECTIVES[config.objective].conv(channels, height, widths=config.hidden, **common)


def _hvae(config: TrainConfig, image_shape: tuple[int, int, int], *, latent_dim, **common) -> HierarchicalVAE:
    if config.hidden is not None and len(config.hidden) != 1:
        raise ValueError(f"model 'hvae' takes one hidden size, its width, got {len(config.hidden)}")
    options = {
        "layers_per_resolution": config.layers_per_resolution,
        "latent_channels": config.latent_channels,
        "width": config.hidden[0] if config.hidden else None,
    }
    # latent_dim is the flat models' size of z; the hierarchy's is latent_channels per layer.
    return HierarchicalVAE(
        image_shape, free_bits=config.free_bits, **{k: v for k, v in options.items() if v is not None}, **common
    )


def _vqvae(config: TrainConfig, image_shape: tuple[int, int, int], *, likelihood, backend, **_) -> VQVAE:
    # The objective's settings (a VAE's beta, KL warm-up, clamp) mean nothing here: VQ_UNUSED_OPTIONS refuses them.
    options = {"num_codes": config.num_codes, "code_dim": config.code_dim, "widths": config.hidden}
    given = {name: value for name, value in options.items() if value is not None}
    return VQVAE(image_shape, likelihood=likelihood, backend=backend, **given)


# config.model -> the function building it; its keys are the choices of --model.
MODELS = {"mlp": _mlp, "conv": _conv, "hvae": _hvae, "vqvae": _vqvae}

# The VQ-VAE trains its own loss whatever the objective: options that mean nothing to it (field -> why), and its
# held-out evaluation, which takes no settings.
_VQ_NO_KL = "the VQ-VAE has no KL term to weigh (its commitment weight is 0.25)"
VQ_UNUSED_OPTIONS = {
    "latent_dim": "the VQ-VAE's latent is a map of codes: set --code-dim and --num-codes",
    "beta": _VQ_NO_KL,
    "kl_warmup": _VQ_NO_KL,
    "logvar_limit": "the VQ-VAE's codes are deterministic, with no log-variance",
    "eval_k": "the VQ-VAE's posterior is one code per position: its ELBO needs no importance sampling",
}


def build_model(config: TrainConfig, image_shape: tuple[int, int, int], backend: str | None = None) -> TrainableModel:
    """The model that ``config`` describes (a VAE, or an autoencoder), for images of ``image_shape`` ``(C, H, W)``."""
    from fastvae.training.config import likelihood_options

    common = dict(
        latent_dim=config.latent_dim,
        likelihood=make_likelihood(
            config.likelihood, backend=backend, channels=image_shape[0], **likelihood_options(config)
        ),
        backend=backend,
        **OBJECTIVES[config.objective].model_options(config),
    )
    try:
        return MODELS[config.model](config, image_shape, **common)
    except ValueError as err:
        raise ConfigError(f"cannot build model {config.model!r}: {err}") from None


# Importance samples of the held-out log-likelihood by default: 1000, the usual k of published results, but 100
# for the hierarchical VAE, whose k = 1000 evaluation (500,000 top-down decodes of MNIST's held-out digits) takes
# longer than its training on a 2-core CPU. README: its numbers at both.
DEFAULT_EVAL_K = 1000
MODEL_EVAL_K = {"hvae": 100}


def default_eval_k(model: str) -> int:
    """The importance samples of a ``model``'s held-out log-likelihood when none are asked for (``--eval-k``)."""
    return MODEL_EVAL_K.get(model, DEFAULT_EVAL_K)


def describe_default_eval_k() -> str:
    """The default of ``--eval-k`` in words, for help texts: ``"1000; 100 for hvae"``."""
    return "; ".join([str(DEFAULT_EVAL_K), *(f"{k} for {model}" for model, k in MODEL_EVAL_K.items())])


def default_likelihood(objective: str) -> str:
    """The likelihood an ``objective`` trains with when none is given (``"bce"`` for ``"vae"``, ``"mse"`` for ``"ae"``)."""
    return OBJECTIVES[objective].default_likelihood if objective in OBJECTIVES else OBJECTIVES["vae"].default_likelihood


def check_options_apply(
    config: TrainConfig, explicit: Collection[str], option_names: dict[str, str] | None = None
) -> None:
    """Raise :class:`ConfigError` for an option in ``explicit`` (set by the user) that ``config``'s objective ignores.

    ``option_names``: how the user spelled a field, where it is not
    ``--field-name`` (``fastvae eval`` calls ``eval_k`` ``--k``).
    ``--noise global`` draws the noise of the global batch: the VAE's latent
    noise, and a denoising run's corruption; an autoencoder without
    ``--denoise`` draws none, so asking for it is an error too.
    """
    objective = OBJECTIVES[config.objective]
    for name in objective.unused_options:
        if name in explicit:
            option = (option_names or {}).get(name, f"--{name.replace('_', '-')}")
            raise ConfigError(
                f"{option} does not apply to --objective {config.objective}: "
                f"{objective.unused_options[name]}; leave it out"
            )
    if config.model == "vqvae":
        for name, why in VQ_UNUSED_OPTIONS.items():
            if name in explicit:
                option = (option_names or {}).get(name, f"--{name.replace('_', '-')}")
                raise ConfigError(f"{option} does not apply to --model vqvae: {why}; leave it out")
    if config.objective == "ae" and "noise" in explicit and config.noise == "global" and config.denoise is None:
        raise ConfigError(
            "--noise global does not apply to --objective ae without --denoise: an autoencoder draws no noise; "
            "leave it out"
        )
    if config.model == "vqvae" and "noise" in explicit and config.noise == "global" and config.denoise is None:
        raise ConfigError("--noise global does not apply to --model vqvae without --denoise: a VQ-VAE draws no "
                          "noise; leave it out")


def describe_model(config: TrainConfig, model: TrainableModel) -> str:
    """The ``model`` that ``config`` built, in words, for the lines printed about the run (``"mlp VAE"``)."""
    return f"{config.model} {type(model).__name__}"


def grad_clip(config: TrainConfig, model: TrainableModel) -> float | None:
    """The gradient norm to clip to: ``config.grad_clip``, else the model's default; ``None`` for no clipping."""
    clip = config.grad_clip if config.grad_clip is not None else model.default_grad_clip
    return clip or None


def evaluation_options(config: TrainConfig) -> dict:
    """The settings of the model's held-out evaluation (:meth:`TrainableModel.evaluate`) that ``config`` asks for."""
    if config.model == "vqvae":
        return {}
    return OBJECTIVES[config.objective].evaluation_options(config)
