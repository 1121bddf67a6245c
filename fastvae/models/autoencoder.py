"""The deterministic baseline: :class:`Autoencoder`, ``z = f(x)``, ``x_hat = g(z)``, trained on ``||x - x_hat||^2``.

Its loss is a likelihood's fused loss (:meth:`fastvae.likelihoods.Likelihood.loss`,
``"mse"`` by default), in that likelihood's ``loss_units``. It has no prior over
its codes, so :meth:`Autoencoder.sample` can only guess where codes lie: it draws
from a Gaussian fitted to the codes of the training images
(:meth:`Autoencoder.after_training`), and what it decodes is the classic
demonstration of why the VAE exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from fastvae.likelihoods import Likelihood, make_likelihood
from fastvae.models.base import TrainableModel, check_batch, check_temperature, held_out_label, lerp_codes


class AutoencoderOutput(NamedTuple):
    """What :meth:`Autoencoder.forward` returns."""

    loss: torch.Tensor  # () float32: mean over the batch of recon
    recon: torch.Tensor  # (B,) float32: the likelihood's loss per image (||target - x_hat||^2 for "mse"), detached
    z: torch.Tensor  # (B, D) the code
    x_hat: torch.Tensor  # (B, ...) the decoder's output (the reconstruction for "mse")

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """The per-image values the training engine logs: ``recon``, ``(B,)``."""
        return {"recon": self.recon}


class Autoencoder(TrainableModel):
    """The deterministic baseline: ``z = head(encoder(x))``, ``x_hat = decoder(z)``, loss ``||x - x_hat||^2``.

    The same encoders and decoders as :class:`VAE` fit (for instance
    ``Autoencoder(mlp_encoder((1, 28, 28)), mlp_decoder(16, (1, 28, 28)), 16, features=256)``;
    :func:`~fastvae.models.mlp_autoencoder` and :func:`~fastvae.models.conv_autoencoder`
    build them); the squared error comes from the fused ``reconstruction_loss(kind="mse")``,
    through the ``"mse"`` likelihood's :meth:`~fastvae.likelihoods.Likelihood.loss`.

    The buffers ``code_mean`` and ``code_std`` ``(D,)`` hold the per-dimension
    mean and standard deviation of the codes of the training images, set by
    :meth:`after_training` (0 and 1 until then), for :meth:`sample`.

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
        self.latent_dim = latent_dim
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_std", torch.ones(latent_dim))

    @property
    def units(self) -> str:
        """The likelihood's ``loss_units``: ``"squared error"`` for ``"mse"``."""
        return self.likelihood.loss_units

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code ``z`` ``(B, D)`` of ``x`` ``(B, ...)``."""
        return self.head(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output for ``z`` ``(B, D)``: the likelihood's parameters (the image for ``"mse"``)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, *, target: torch.Tensor | None = None) -> AutoencoderOutput:
        """Encode and decode ``x`` ``(B, ...)``; ``recon`` scores the output against ``target`` (default ``x``).
        An empty batch is a ``ValueError`` (its loss, a mean, is undefined)."""
        check_batch(x)
        z = self.encode(x)
        x_hat = self.decode(z)
        # The batch mean inside the fused op: loss.backward() hands its gradient over without a scaling pass.
        loss, recon = self.likelihood.batch_loss(x_hat, x if target is None else target)
        return AutoencoderOutput(loss, recon, z, x_hat)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's :meth:`~fastvae.likelihoods.Likelihood.reconstruction` (its mean; the mode for
        ``"dmol"``) decoded from the code of ``x``; ``x``'s shape."""
        return self.likelihood.reconstruction(self.decode(self.encode(x)))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The code ``z`` ``(B, D)`` of ``x`` (:meth:`encode`, without a graph)."""
        return self.encode(x)

    @torch.no_grad()
    def after_training(self, batches: Iterable[torch.Tensor]) -> None:
        """Set ``code_mean`` and ``code_std`` to the per-dimension mean and (population) std of the codes of ``batches``."""
        total = squares = None
        n = 0
        for x in batches:
            z = self.encode(x).double()
            total = z.sum(0) if total is None else total + z.sum(0)
            squares = z.square().sum(0) if squares is None else squares + z.square().sum(0)
            n += len(x)
        if n == 0:
            return
        mean = total / n
        self.code_mean.copy_(mean)
        self.code_std.copy_((squares / n - mean.square()).clamp_min(0).sqrt())

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` codes ``code_mean + temperature * code_std * N(0, I)`` decoded to the likelihood's
        :meth:`~fastvae.likelihoods.Likelihood.generate` (its mean; a draw for ``"dmol"``): ``(n, ...)``."""
        check_temperature(temperature)
        noise = temperature * torch.randn((n, self.latent_dim), generator=generator, device=self.code_mean.device)
        return self.likelihood.generate(self.decode(self.code_mean + self.code_std * noise), generator=generator)

    def sample_note(self) -> str:
        return (
            "an autoencoder has no prior: these decode codes drawn from N(0, I) scaled to the per-dimension mean "
            "and std of its codes on the training images, which need not look like data (a VAE's prior is what "
            "makes its samples plausible)"
        )

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, points: int = 10) -> torch.Tensor:
        """The likelihood's reconstruction decoded along the line from the code of ``a`` to that of ``b`` (``(P, ...)`` each):
        ``(P, points, ...)``, ends included."""
        z = lerp_codes(self.encode(a), self.encode(b), points)
        return self.likelihood.reconstruction(self.decode(z.flatten(0, 1))).view(len(a), points, *a.shape[1:])

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per image: ``recon``, the likelihood's loss of the output for ``x`` against ``target`` (default ``x``),
        in :attr:`units`. ``generator`` is unused: nothing is random."""
        return {"recon": self(x, target=target).recon}

    def format_evaluation(self, results: dict[str, float], *, n_images: int, corruption: str | None = None) -> str:
        """One line: the held-out reconstruction error (:meth:`evaluate`'s mean), in :attr:`units` per image."""
        label = held_out_label("reconstruction error", corruption)
        return f"{label}: {results['recon']:.2f} {self.units}/image ({n_images} images)"
