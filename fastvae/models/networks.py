"""Ready-made encoders, decoders, VAEs and autoencoders: fully connected (:func:`mlp_vae`) and convolutional (:func:`conv_vae`).

* :func:`mlp_encoder`, :func:`mlp_decoder`: Linear + ReLU stacks over flattened images.
* :func:`conv_encoder`, :func:`conv_decoder`: stride-2 4x4 (transposed) convolutions, one per halving of the image.
* :func:`mlp_vae`, :func:`conv_vae`: a :class:`~fastvae.models.vae.VAE` from a pair of them;
  :func:`mlp_autoencoder`, :func:`conv_autoencoder`: an :class:`~fastvae.models.autoencoder.Autoencoder`
  from the same pair (a deterministic code of the same size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from fastvae.likelihoods import Likelihood, make_likelihood
from fastvae.models.autoencoder import Autoencoder
from fastvae.models.vae import VAE


def _mlp(sizes: Sequence[int]) -> list[nn.Module]:
    """Linear layers between consecutive ``sizes``, with a ReLU after each."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return layers


def mlp_encoder(input_shape: Sequence[int], hidden: Sequence[int] = (512, 256)) -> nn.Sequential:
    """Flatten ``(B, *input_shape)`` and apply Linear + ReLU layers; outputs ``(B, hidden[-1])``."""
    return nn.Sequential(nn.Flatten(), *_mlp([math.prod(input_shape), *hidden]))


def mlp_decoder(latent_dim: int, output_shape: Sequence[int], hidden: Sequence[int] = (256, 512)) -> nn.Sequential:
    """Linear + ReLU layers from ``(B, latent_dim)``, then a linear output reshaped to ``(B, *output_shape)``."""
    sizes = [latent_dim, *hidden]
    return nn.Sequential(
        *_mlp(sizes), nn.Linear(sizes[-1], math.prod(output_shape)), nn.Unflatten(1, tuple(output_shape))
    )


def mlp_vae(
    input_shape: Sequence[int],
    *,
    latent_dim: int = 16,
    hidden: Sequence[int] = (512, 256),
    likelihood: str | Likelihood = "bce",
    beta: float = 1.0,
    kl_warmup: int = 0,
    logvar_limit: float | None = 10.0,
    iwae_k: int | None = None,
    backend: str | None = None,
) -> VAE:
    """An MLP VAE for images of shape ``input_shape`` (``(C, H, W)``, or any shape).

    The encoder has hidden layers ``hidden``; the decoder mirrors them and
    outputs the likelihood's parameters: ``likelihood.params_channels(C)``
    channels for ``input_shape = (C, ...)``. ``iwae_k``: train on the
    importance-weighted bound with this many samples per image (see :class:`~fastvae.models.VAE`).
    """
    likelihood = make_likelihood(likelihood, backend=backend, channels=input_shape[0])
    encoder, decoder, features = _mlp_networks(input_shape, latent_dim, hidden, likelihood)
    return VAE(
        encoder,
        decoder,
        latent_dim,
        likelihood,
        beta,
        kl_warmup=kl_warmup,
        features=features,
        logvar_limit=logvar_limit,
        iwae_k=iwae_k,
        backend=backend,
    )


def mlp_autoencoder(
    input_shape: Sequence[int],
    *,
    latent_dim: int = 16,
    hidden: Sequence[int] = (512, 256),
    likelihood: str | Likelihood = "mse",
    backend: str | None = None,
) -> Autoencoder:
    """An MLP :class:`~fastvae.models.autoencoder.Autoencoder`: the networks of :func:`mlp_vae`, a deterministic code."""
    likelihood = make_likelihood(likelihood, backend=backend, channels=input_shape[0])
    encoder, decoder, features = _mlp_networks(input_shape, latent_dim, hidden, likelihood)
    return Autoencoder(encoder, decoder, latent_dim, likelihood=likelihood, features=features)


def _mlp_networks(
    input_shape: Sequence[int], latent_dim: int, hidden: Sequence[int], likelihood: Likelihood
) -> tuple[nn.Module, nn.Module, int]:
    """The encoder, the mirrored decoder (outputting ``likelihood``'s parameters) and the encoder's output size."""
    hidden = tuple(hidden)
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must list at least one positive layer size, got {hidden}")
    params_shape = (likelihood.params_channels(input_shape[0]), *input_shape[1:])
    return mlp_encoder(input_shape, hidden), mlp_decoder(latent_dim, params_shape, hidden[::-1]), hidden[-1]


CONV_WIDTHS = (32, 64, 128, 256)
CONV_MIN_SIZE = 4


def default_conv_widths(image_size: int) -> tuple[int, ...]:
    """One stride-2 layer per halving of ``image_size`` that stays even and at least 4 pixels (28 -> 14 -> 7)."""
    n_layers, size = 0, image_size
    while size % 2 == 0 and size // 2 >= CONV_MIN_SIZE and n_layers < len(CONV_WIDTHS):
        size //= 2
        n_layers += 1
    return CONV_WIDTHS[: max(n_layers, 1)]


def _conv_final_size(image_size: int, widths: Sequence[int]) -> int:
    factor = 2 ** len(widths)
    if image_size % 2:
        raise ValueError(
            f"image_size {image_size} is odd, and each stride-2 conv layer halves the image: the conv networks "
            "need an even size; use an MLP for these images (mlp_vae, --model mlp)"
        )
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} must be divisible by 2**len(widths) = {factor}: each of the "
            f"{len(widths)} conv layers halves it; pass fewer widths"
        )
    return image_size // factor


def conv_encoder(channels: int, image_size: int, widths: Sequence[int]) -> nn.Sequential:
    """Stride-2 4x4 convolutions with ReLU, halving the image per layer, then flatten.

    Outputs ``(B, widths[-1] * s * s)`` with ``s = image_size / 2**len(widths)``.
    """
    _conv_final_size(image_size, widths)
    layers: list[nn.Module] = []
    for n_in, n_out in zip([channels, *widths[:-1]], widths):
        layers += [nn.Conv2d(n_in, n_out, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten())


def conv_decoder(latent_dim: int, channels: int, image_size: int, widths: Sequence[int]) -> nn.Sequential:
    """The mirror of :func:`conv_encoder`: a linear layer to ``(widths[-1], s, s)``, then stride-2 transposed convs."""
    size = _conv_final_size(image_size, widths)
    reversed_widths = list(widths[::-1])
    layers: list[nn.Module] = [
        nn.Linear(latent_dim, reversed_widths[0] * size * size),
        nn.ReLU(),
        nn.Unflatten(1, (reversed_widths[0], size, size)),
    ]
    for n_in, n_out in zip(reversed_widths[:-1], reversed_widths[1:]):
        layers += [nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1), nn.ReLU()]
    layers.append(nn.ConvTranspose2d(reversed_widths[-1], channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


def conv_vae(
    channels: int,
    image_size: int,
    *,
    latent_dim: int = 32,
    widths: Sequence[int] | None = None,
    likelihood: str | Likelihood = "bce",
    beta: float = 1.0,
    kl_warmup: int = 0,
    logvar_limit: float | None = 10.0,
    iwae_k: int | None = None,
    backend: str | None = None,
) -> VAE:
    """A convolutional VAE for square ``(channels, image_size, image_size)`` images.

    ``widths``: channels of the encoder's stride-2 conv layers, one layer per
    halving; ``image_size`` must be divisible by ``2**len(widths)``. The default
    (:func:`default_conv_widths`) halves while the size stays even and at least
    4: 28 -> ``(32, 64)``, 64 -> ``(32, 64, 128, 256)``, 8 -> ``(32,)``. The
    decoder outputs the likelihood's parameters: ``likelihood.params_channels(channels)`` channels.
    ``iwae_k``: as for :func:`mlp_vae`.
    """
    likelihood = make_likelihood(likelihood, backend=backend, channels=channels)
    encoder, decoder, features = _conv_networks(channels, image_size, latent_dim, widths, likelihood)
    return VAE(
        encoder,
        decoder,
        latent_dim,
        likelihood,
        beta,
        kl_warmup=kl_warmup,
        features=features,
        logvar_limit=logvar_limit,
        iwae_k=iwae_k,
        backend=backend,
    )


def conv_autoencoder(
    channels: int,
    image_size: int,
    *,
    latent_dim: int = 32,
    widths: Sequence[int] | None = None,
    likelihood: str | Likelihood = "mse",
    backend: str | None = None,
) -> Autoencoder:
    """A convolutional :class:`~fastvae.models.autoencoder.Autoencoder`: the networks of :func:`conv_vae`."""
    likelihood = make_likelihood(likelihood, backend=backend, channels=channels)
    encoder, decoder, features = _conv_networks(channels, image_size, latent_dim, widths, likelihood)
    return Autoencoder(encoder, decoder, latent_dim, likelihood=likelihood, features=features)


def _conv_networks(
    channels: int, image_size: int, latent_dim: int, widths: Sequence[int] | None, likelihood: Likelihood
) -> tuple[nn.Module, nn.Module, int]:
    """The encoder, the mirrored decoder (outputting ``likelihood``'s parameters) and the encoder's output size."""
    widths = default_conv_widths(image_size) if widths is None else tuple(widths)
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must list at least one positive channel count, got {widths}")
    size = _conv_final_size(image_size, widths)
    encoder = conv_encoder(channels, image_size, widths)
    decoder = conv_decoder(latent_dim, likelihood.params_channels(channels), image_size, widths)
    return encoder, decoder, widths[-1] * size * size
