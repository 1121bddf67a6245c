"""The one place that maps a :class:`~fastvae.training.config.TrainConfig` to a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastvae.errors import ConfigError
from fastvae.models import VAE, conv_vae, mlp_vae

if TYPE_CHECKING:
    from fastvae.training.config import TrainConfig

MODELS = ("mlp", "conv")


def build_model(config: TrainConfig, image_shape: tuple[int, int, int], backend: str | None = None) -> VAE:
    """The VAE that ``config`` describes, for images of ``image_shape`` ``(C, H, W)``."""
    common = dict(
        latent_dim=config.latent_dim,
        likelihood=config.likelihood,
        beta=config.beta,
        logvar_limit=config.logvar_limit or None,
        backend=backend,
    )
    try:
        if config.model == "mlp":
            return mlp_vae(image_shape, **common, **({"hidden": config.hidden} if config.hidden else {}))
        channels, height, width = image_shape
        if height != width:
            raise ValueError(f"model 'conv' takes square images, got {height}x{width}; use model 'mlp'")
        return conv_vae(channels, height, widths=config.hidden, **common)
    except ValueError as err:
        raise ConfigError(f"cannot build model {config.model!r}: {err}") from None
