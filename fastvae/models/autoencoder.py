"""The deterministic baseline: :class:`Autoencoder`, ``z = f(x)``, ``x_hat = g(z)``, trained on ``||x - x_hat||^2``.

Its loss is a likelihood's fused loss (:meth:`fastvae.likelihoods.Likelihood.loss`,
``"mse"`` by default), in that likelihood's ``loss_units``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastvae.likelihoods import Likelihood, make_likelihood
from fastvae.models.base import TrainableModel


class AutoencoderOutput(NamedTuple):
    """What :meth:`Autoencoder.forward` returns."""

    loss: torch.Tensor  # () float32: mean over the batch of recon
    recon: torch.Tensor  # (B,) float32: the likelihood's loss per image (||x - x_hat||^2 for "mse")
    z: torch.Tensor  # (B, D) the code
    x_hat: torch.Tensor  # (B, ...) the decoder's output (the reconstruction for "mse")

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """The per-image values the training engine logs: ``recon``, ``(B,)``."""
        return {"recon": self.recon}


class Autoencoder(TrainableModel):
    """The deterministic baseline: ``z = head(encoder(x))``, ``x_hat = decoder(z)``, loss ``||x - x_hat||^2``.

    The same encoders and decoders as :class:`VAE` fit (for instance
    ``Autoencoder(mlp_encoder((1, 28, 28)), mlp_decoder(16, (1, 28, 28)), 16, features=256)``);
    the squared error comes from the fused ``reconstruction_loss(kind="mse")``, through
    the ``"mse"`` likelihood's :meth:`~fastvae.likelihoods.Likelihood.loss`.

    Args:
        encoder: images ``(B, ...)`` to features ``(B, features)``.
        decoder: ``(B, latent_dim)`` to images.
        latent_dim: size of the code ``z``.
        likelihood: whose fused loss is minimised: a name from
            :data:`fastvae.likelihoods.LIKELIHOODS` or a :class:`~fastvae.likelihoods.Likelihood`.
        features: the encoder's output size; ``None`` infers it from the first batch.
        backend: for the fused loss; see :mod:`fastvae.backend`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        *,
        likelihood: str | Likelihood = "mse",
        features: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.head = nn.LazyLinear(latent_dim) if features is None else nn.Linear(features, latent_dim)
        self.decoder = decoder
        self.likelihood = make_likelihood(likelihood, backend=backend)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        z = self.encode(x)
        x_hat = self.decoder(z)
        recon = self.likelihood.loss(x_hat, x)
        return AutoencoderOutput(recon.mean(), recon, z, x_hat)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.likelihood.reconstruction(self.decoder(self.encode(x)))
