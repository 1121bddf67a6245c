"""The one place that maps a :class:`~fastvae.training.config.TrainConfig` to a model.

Everything else in :mod:`fastvae.training` speaks to the model through
:class:`~fastvae.models.base.TrainableModel` only. A new architecture is a
function here and an entry in :data:`MODELS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastvae.errors import ConfigError
from fastvae.models import VAE, HierarchicalVAE, TrainableModel, conv_vae, mlp_vae

if TYPE_CHECKING:
    from fastvae.training.config import TrainConfig


def _mlp(config: TrainConfig, image_shape: tuple[int, int, int], **common) -> VAE:
    return mlp_vae(image_shape, **common, **({"hidden": config.hidden} if config.hidden else {}))


def _conv(config: TrainConfig, image_shape: tuple[int, int, int], **common) -> VAE:
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"model 'conv' takes square images, got {height}x{width}; use model 'mlp'")
    return conv_vae(channels, height, widths=config.hidden, **common)


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


# config.model -> the function building it; its keys are the choices of --model.
MODELS = {"mlp": _mlp, "conv": _conv, "hvae": _hvae}


def build_model(
    config: TrainConfig, image_shape: tuple[int, int, int], backend: str | None = None
) -> TrainableModel:
    """The model that ``config`` describes, for images of ``image_shape`` ``(C, H, W)``."""
    common = dict(
        latent_dim=config.latent_dim,
        likelihood=config.likelihood,
        beta=config.beta,
        kl_warmup=config.kl_warmup,
        logvar_limit=config.logvar_limit or None,
        backend=backend,
    )
    try:
        return MODELS[config.model](config, image_shape, **common)
    except ValueError as err:
        raise ConfigError(f"cannot build model {config.model!r}: {err}") from None


def describe_model(config: TrainConfig, model: TrainableModel) -> str:
    """The ``model`` that ``config`` built, in words, for the lines printed about the run (``"mlp VAE"``)."""
    return f"{config.model} {type(model).__name__}"


def grad_clip(config: TrainConfig, model: TrainableModel) -> float | None:
    """The gradient norm to clip to: ``config.grad_clip``, else the model's default; ``None`` for no clipping."""
    clip = config.grad_clip if config.grad_clip is not None else model.default_grad_clip
    return clip or None


def evaluation_options(config: TrainConfig) -> dict:
    """The settings of the model's held-out evaluation (:meth:`TrainableModel.evaluate`) that ``config`` asks for."""
    return {"k": config.eval_k}
