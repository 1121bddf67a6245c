"""Likelihoods ``p(x | z)``: one object per family, which the models score, display and sample images with.

A model's decoder outputs the *parameters* of ``p(x | z)`` (logits, a mean, a
location); a :class:`Likelihood` turns them into numbers and images:

* ``name``: what ``VAE(likelihood=...)`` and ``fastvae train --likelihood`` call it;
* :meth:`~Likelihood.params_channels`: how many channels the decoder outputs for
  images of ``C`` channels (``C``, one parameter per value, for every family but
  ``"dmol"``);
* ``likelihood(params, x)``: the exact ``-log p(x | z)`` per image, ``(B,)``
  float32, in nats, constants included, so that ``-(recon + kl)`` is the ELBO;
* :meth:`~Likelihood.loss`: the fused op alone, without the constant terms, in
  ``loss_units`` (the squared error for ``"mse"``): what a plain autoencoder minimises;
* :meth:`~Likelihood.batch_nll` and :meth:`~Likelihood.batch_loss`: the mean of
  either over the batch (the training loss's term, differentiable) with the
  per-image values beside it (detached, for the metrics); the fused families
  take the mean inside the op (``reduction="mean"``), so that ``loss.backward()``
  hands the gradient the forward wrote over without scaling it;
* :meth:`~Likelihood.mean`: the mean of ``p(x | z)``, shaped like ``x`` (not for
  ``"dmol"``, where it has no closed form); :meth:`~Likelihood.sample`: a draw from it;
* :meth:`~Likelihood.reconstruction` and :meth:`~Likelihood.generate`: the
  images figures show, for reconstructions (and interpolations) and for samples
  of the model: the mean for the fused families here (their draws add
  independent noise to every value: a fixed standard deviation of 0.71 for
  ``"mse"``, black or white for ``"bce"``), the mode and a draw for ``"dmol"``;
* ``discrete``: whether ``p(x | z)`` is a probability of discrete values (then
  ``-log p`` in bits per dim means something); :meth:`~Likelihood.comparable_with`:
  what its nats can be compared with, a line for the evaluation's output;
* ``options``: the settings a likelihood built by name takes, with their
  defaults (``fastvae train`` options of the same names).

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

and ``"dmol"``, the discretized mixture of logistics (PixelCNN++'s), scored by
the fused :func:`fastvae.functional.discretized_logistic_mixture_nll`: ``M``
logistics per pixel (``num_mixtures``, 10) integrated over the bins of
``2**num_bits`` levels (8 bits), the colour channels conditioned on one another,
``M (C + 1)(C + 2) / 2`` parameters per pixel; ``-log p`` of a pixel's ``C``
values at once, in nats (``loss_units`` too).

:data:`LIKELIHOODS` maps each name to its class; :func:`make_likelihood` builds
one from a name and its options. A new family is a new :class:`Likelihood`
subclass and a line in :data:`LIKELIHOODS`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from fastvae.functional import discretized_logistic_mixture_nll, reconstruction_loss
from fastvae.nn import DiscretizedLogisticMixture


class Likelihood(nn.Module):
    """``p(x | z)`` given the decoder's output ``params``; see the module docstring for the interface."""

    name: ClassVar[str]
    loss_units: ClassVar[str] = "nats"
    # Whether p(x | z) is a probability of discrete values (levels) rather than a density.
    discrete: ClassVar[bool] = False
    # Keyword settings of __init__ that make_likelihood(name, **options) and fastvae train take, with defaults.
    options: ClassVar[dict[str, object]] = {}
    # Whether __init__ takes the images' channels (channels=), which make_likelihood passes on to it.
    takes_channels: ClassVar[bool] = False

    def params_channels(self, image_channels: int) -> int:
        """Channels of the decoder's output for images of ``image_channels`` channels."""
        return image_channels

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``-log p(x | params)`` per image, ``(B,)`` float32 nats, constants included."""
        raise NotImplementedError

    def loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The fused loss per image, ``(B,)`` float32 in ``loss_units``: ``-log p`` up to constant terms."""
        return self(params, x)

    def batch_nll(self, params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean over the batch of -log p(x | params), the per-image values)``: what a model's training loss
        takes, ``()`` and ``(B,)`` float32 nats. Only the mean is differentiable; the per-image values are detached
        (metrics). The fused families take the mean inside the op, so its backward under ``loss.backward()`` hands
        the forward's gradient over without a pass; this default averages :meth:`forward`."""
        per_image = self(params, x)
        return per_image.mean(), per_image.detach()

    def batch_loss(self, params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch_nll` of :meth:`loss`: the mean fused loss and the per-image values (detached), in
        ``loss_units``."""
        per_image = self.loss(params, x)
        return per_image.mean(), per_image.detach()

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The mean of ``p(x | params)``, shaped like the images ``x``."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from ``p(x | params)``, shaped like the images ``x``."""
        raise NotImplementedError

    def reconstruction(self, params: torch.Tensor) -> torch.Tensor:
        """The deterministic image figures show for ``params`` (reconstructions, interpolations): the mean here."""
        return self.mean(params)

    def generate(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The image a sample of the model shows, for ``params`` decoded from ``z ~ p(z)``: the mean here.

        A draw of these families adds independent noise to every value, which
        is not what a figure of samples is for; a likelihood that learns its
        own spread per value (``"dmol"``) shows a draw.
        """
        return self.reconstruction(params)

    def comparable_with(self) -> str:
        """What this likelihood's held-out numbers can be compared with: one line for the evaluation's output."""
        return (
            f"{self.name}: nats of a density of the values, comparable with other models of the same images whose "
            "likelihood is a density (mse, gaussian, l1), not with the probabilities of discrete levels (dmol, bits/dim)"
        )


class _FusedLikelihood(Likelihood):
    """A family scored by :func:`~fastvae.functional.reconstruction_loss` ``(params, x, kind)``, plus its constant."""

    kind: ClassVar[str]  # the reconstruction_loss kind
    nll_constant: ClassVar[float] = 0.0  # per value: what turns the fused loss into the exact -log p(x | z)

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.logvar: nn.Parameter | None = None  # the learned log-variance of the "gaussian" family

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        constant = self.nll_constant * x[0].numel()
        return self.loss(params, x) + constant if constant else self.loss(params, x)  # no kernel to add 0

    def loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(params, x, self.kind, reduction="none", logvar=self.logvar, backend=self.backend)

    def batch_nll(self, params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, per_image = self.batch_loss(params, x)
        constant = self.nll_constant * x[0].numel()
        return (mean + constant, per_image + constant) if constant else (mean, per_image)

    def batch_loss(self, params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reconstruction_loss(
            params, x, self.kind, reduction="mean", logvar=self.logvar, backend=self.backend, return_per_sample=True
        )

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

    def comparable_with(self) -> str:
        return (
            "bce: nats of Bernoulli probabilities of the values (a normalised likelihood of binary images only), "
            "comparable with other bce models of the same images"
        )


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


class DiscretizedLogisticMixtureLikelihood(Likelihood):
    """The discretized mixture of logistics of PixelCNN++ (``"dmol"``), for images with values in [0, 1].

    Each pixel's ``C`` values are read as levels ``round(x (2**num_bits - 1))``,
    and their probability is a mixture of ``num_mixtures`` logistics integrated
    over the levels' bins, each channel's mean shifted by the values of the
    channels before it: the decoder outputs ``num_mixtures (C + 1)(C + 2) / 2``
    channels per pixel (3M for greyscale, 10M for RGB). ``-log p`` is exact, in
    nats, through the fused :func:`~fastvae.functional.discretized_logistic_mixture_nll`
    (:class:`fastvae.nn.DiscretizedLogisticMixture`, ``self.mixture``). Its
    values are probabilities of discrete levels, not densities, so they are
    also reported in bits per dim, the unit such models are compared in.

    Figures: :meth:`reconstruction` is the mode (each pixel's likeliest
    component at its likeliest levels: deterministic, and sharp, where the
    mixture's mean would average the components into a blur); :meth:`generate`
    is a draw from the mixture, since the model learns its spread per pixel
    and its draws are the images it generates. :meth:`mean` is not offered:
    with the channels conditioned on one another it has no closed form.

    Args:
        num_mixtures: ``M``, logistic components per pixel (10).
        num_bits: bits per value, 1 to 16: ``2**num_bits`` levels (8 for 256).
        channels: the images' channels, if known (the models built by
            :func:`fastvae.training.builders.build_model` pass them): then
            checked by :meth:`params_channels`, the nll and the images shown,
            whose parameters alone cannot tell RGB at M = 3 from greyscale at M = 10.
        backend: see :mod:`fastvae.backend`.
    """

    name = "dmol"
    discrete = True
    options = {"num_mixtures": 10, "num_bits": 8}
    takes_channels = True

    def __init__(
        self, *, num_mixtures: int = 10, num_bits: int = 8, channels: int | None = None, backend: str | None = None
    ):
        super().__init__()
        self.mixture = DiscretizedLogisticMixture(num_mixtures, num_bits, channels=channels, backend=backend)

    def params_channels(self, image_channels: int) -> int:
        return self.mixture.params_channels(image_channels)

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.mixture(params, x)

    def batch_nll(self, params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixture = self.mixture
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            mixture.check_channels(x.shape[1], f"x of shape {tuple(x.shape)}")
        return discretized_logistic_mixture_nll(
            params, x, num_mixtures=mixture.num_mixtures, num_bits=mixture.num_bits, reduction="mean",
            backend=mixture.backend, return_per_sample=True,
        )

    def batch_loss(self, params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch_nll(params, x)  # its fused loss is the exact nll

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "the mean of a discretized logistic mixture whose channels are conditioned on one another has no closed "
            "form; use mode() or sample()"
        )

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """Each pixel's likeliest component at its likeliest levels, ``(B, C, ...)`` on the level grid."""
        return self.mixture.mode(params)

    def sample(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the mixture, ``(B, C, ...)`` on the level grid, float32."""
        return self.mixture.sample(params, generator=generator)

    def reconstruction(self, params: torch.Tensor) -> torch.Tensor:
        return self.mode(params)

    def generate(self, params: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(params, generator=generator)

    def comparable_with(self) -> str:
        bits = self.mixture.num_bits
        return (
            f"dmol: probabilities of discrete {bits}-bit levels; nats and bits/dim comparable with any model of the "
            f"same {bits}-bit images (PixelCNN++, VDVAE report bits/dim), not with the nats of mse, gaussian, l1 "
            "(densities) or bce"
        )


LIKELIHOODS: dict[str, type[Likelihood]] = {
    family.name: family
    for family in (
        BernoulliLikelihood,
        GaussianLikelihood,
        FixedGaussianLikelihood,
        LaplaceLikelihood,
        DiscretizedLogisticMixtureLikelihood,
    )
}


def bits_per_dim(nats: torch.Tensor | float, values_per_image: int) -> torch.Tensor | float:
    """Nats per image in bits per value: ``nats / (values_per_image ln 2)`` (``values_per_image = C H W``)."""
    return nats / (values_per_image * math.log(2.0))


def make_likelihood(
    likelihood: str | Likelihood, *, backend: str | None = None, channels: int | None = None, **options
) -> Likelihood:
    """The :class:`Likelihood` named ``likelihood`` (a key of :data:`LIKELIHOODS`), or ``likelihood`` itself.

    ``backend`` and ``options`` (the family's settings, its ``options``:
    ``num_mixtures`` and ``num_bits`` for ``"dmol"``) go to a likelihood built
    from its name; one given as an object keeps its own, and takes no options.
    ``channels``, the images' channels if known, goes to a family built from
    its name that checks them (``takes_channels``: ``"dmol"``); the others
    have no use for it.
    """
    if isinstance(likelihood, Likelihood):
        if options:
            raise ValueError(f"options {sorted(options)} apply to a likelihood given by name, not to {likelihood!r}")
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(f"likelihood must be a name or a Likelihood, got {type(likelihood).__name__}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")
    family = LIKELIHOODS[likelihood]
    unknown = sorted(set(options) - set(family.options))
    if unknown:
        takes = f"its options are {', '.join(family.options)}" if family.options else "it takes none"
        raise ValueError(f"likelihood {likelihood!r} has no option {', '.join(unknown)}; {takes}")
    if family.takes_channels and channels is not None:
        options["channels"] = channels
    return family(backend=backend, **options)
