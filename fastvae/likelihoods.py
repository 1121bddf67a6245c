"""Likelihoods ``p(x | z)``: one object per family, which the models score, display and sample images with.

A model's decoder outputs the *parameters* of ``p(x | z)`` (logits, a mean, a
location); a :class:`Likelihood` turns them into numbers and images:

* ``name``: what ``VAE(likelihood=...)`` and ``fastvae train --likelihood`` call it;
* :meth:`~Likelihood.params_channels`: how many channels the decoder outputs for
  images of ``C`` channels (``C`` for every family here: one parameter per value);
* ``likelihood(params, x)``: the exact ``-log p(x | z)`` per image, ``(B,)``
  float32, in nats, constants included, so that ``-(recon + kl)`` is the ELBO;
* :meth:`~Likelihood.loss`: the fused op alone, without the constant terms, in
  ``loss_units`` (the squared error for ``"mse"``): what a plain autoencoder minimises;
* :meth:`~Likelihood.mean`: the mean of ``p(x | z)``, shaped like ``x``, for
  reconstructions and samples in figures; :meth:`~Likelihood.sample`: a draw from it.

The families, each scored by the fused :func:`fastvae.functional.reconstruction_loss`
(per image value ``x`` with decoder output ``p``):

===============  ==========================================  ==================================  ================
name             distribution                                ``-log p`` per value                ``loss_units``
===============  ==========================================  ==================================  ================
``"bce"``        Bernoulli, ``p`` the logit (grey values     ``softplus(p) - p x``               nats
                 in [0, 1] too)
``"gaussian"``   Normal, mean ``p``, learned log-variance    ``((x - p)^2 / s^2 + log s^2``      nats
                 ``log s^2`` (one scalar by default)         ``+ log 2 pi) / 2``
``"mse"``        Normal, mean ``p``, fixed variance 1/2      ``(x - p)^2 + log(pi) / 2``         squared error
``"l1"``         Laplace, location ``p``, unit scale         ``|x - p| + log 2``                 absolute error
===============  ==========================================  ==================================  ================

:data:`LIKELIHOODS` maps each name to its class; :func:`make_likelihood` builds
one from a name. A new family is a new :class:`Likelihood` subclass and a line
in :data:`LIKELIHOODS`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from fastvae.functional import reconstruction_loss


class Likelihood(nn.Module):
    """``p(x | z)`` given the decoder's output ``params``; see the module docstring for the interface."""

    name: ClassVar[str]
    loss_units: ClassVar[str] = "nats"

    def params_channels(self, image_channels: int) -> int:
        """Channels of the decoder's output for images of ``image_channels`` channels."""
        return image_channels

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``-log p(x | params)`` per image, ``(B,)`` float32 nats, constants included."""
        raise NotImplementedError

    def loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The fused loss per image, ``(B,)`` float32 in ``loss_units``: ``-log p`` up to constant terms."""
        return self(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The mean of ``p(x | params)``, of ``params``' shape (the image's, for every family here)."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from ``p(x | params)`` per value, of ``params``' shape and dtype."""
        raise NotImplementedError


class _FusedLikelihood(Likelihood):
    """A family scored by :func:`~fastvae.functional.reconstruction_loss` ``(params, x, kind)``, plus its constant."""

    kind: ClassVar[str]  # the reconstruction_loss kind
    nll_constant: ClassVar[float] = 0.0  # per value: what turns the fused loss into the exact -log p(x | z)

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.logvar: nn.Parameter | None = None  # the learned log-variance of the "gaussian" family

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.loss(params, x) + self.nll_constant * x[0].numel()

    def loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(params, x, self.kind, reduction="none", logvar=self.logvar, backend=self.backend)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class BernoulliLikelihood(_FusedLikelihood):
    """Bernoulli on the logits ``params``: ``p(x = 1) = sigmoid(params)`` (``"bce"``)."""

    name = kind = "bce"

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.mean(params), generator=generator)


class GaussianLikelihood(_FusedLikelihood):
    """Normal with mean ``params`` and a learned log-variance ``self.logvar`` (``"gaussian"``).

    Args:
        logvar_shape: the shape of ``self.logvar`` (``log sigma**2``): ``()`` for
            one scalar, the image's shape ``(C, H, W)`` for one per value, or any
            shape that broadcasts to the images.
        init_logvar: its initial value.
        backend: see :mod:`fastvae.backend`.
    """

    name = kind = "gaussian"

    def __init__(
        self, *, logvar_shape: int | tuple[int, ...] = (), init_logvar: float = 0.0, backend: str | None = None
    ):
        super().__init__(backend=backend)
        shape = (logvar_shape,) if isinstance(logvar_shape, int) else tuple(logvar_shape)
        self.logvar = nn.Parameter(torch.full(shape, float(init_logvar)))

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(params.shape, generator=generator, device=params.device, dtype=params.dtype)
        return params + torch.exp(0.5 * self.logvar).to(params.dtype) * noise

    def extra_repr(self) -> str:
        return f"logvar_shape={tuple(self.logvar.shape)}, backend={self.backend!r}"


class FixedGaussianLikelihood(_FusedLikelihood):
    """Normal with mean ``params`` and variance 1/2, so that ``-log p`` is the squared error plus a constant (``"mse"``)."""

    name = kind = "mse"
    nll_constant = 0.5 * math.log(math.pi)
    loss_units = "squared error"

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(params.shape, generator=generator, device=params.device, dtype=params.dtype)
        return params + math.sqrt(0.5) * noise


class LaplaceLikelihood(_FusedLikelihood):
    """Laplace with location ``params`` and unit scale, so that ``-log p`` is the absolute error plus a constant (``"l1"``)."""

    name = kind = "l1"
    nll_constant = math.log(2.0)
    loss_units = "absolute error"

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        # The difference of two unit exponentials is a unit Laplace.
        e1, e2 = (torch.empty_like(params).exponential_(generator=generator) for _ in range(2))
        return params + (e1 - e2)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    family.name: family
    for family in (BernoulliLikelihood, GaussianLikelihood, FixedGaussianLikelihood, LaplaceLikelihood)
}


def make_likelihood(likelihood: str | Likelihood, *, backend: str | None = None) -> Likelihood:
    """The :class:`Likelihood` named ``likelihood`` (a key of :data:`LIKELIHOODS`), or ``likelihood`` itself.

    ``backend`` goes to a likelihood built from its name; one given as an object keeps its own.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(f"likelihood must be a name or a Likelihood, got {type(likelihood).__name__}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")
    return LIKELIHOODS[likelihood](backend=backend)
