"""Drop-in VAE layers over fastvae's fused ops.

* :class:`ReparamKL`: the module form of :func:`fastvae.functional.reparameterize_kl`.
* :class:`GaussianLatent`: a linear head giving ``mu`` and ``logvar``, then the
  fused sample + KL: the layer between a VAE's encoder and its decoder.
* :class:`ConvGaussianLatent`: one stochastic layer of a hierarchical VAE on
  feature maps: posterior and prior as channel slices of conv outputs, the
  fused sample + KL per image and channel, free bits, sampling from the prior
  at a temperature, and the importance weight of a sample.
* :func:`free_bits_kl`: the KL term of the loss under free bits (the IAF form).
* :class:`ReconstructionLoss`: the module form of
  :func:`fastvae.functional.reconstruction_loss`, holding the learned
  log-variance of ``kind="gaussian"``.
* :class:`DiscretizedLogisticMixture`: the discretized mixture of logistics as
  a likelihood: its nll (fused), how many parameters it needs, sampling and a
  deterministic image for reconstructions.

Every layer takes ``backend`` (``None``/``"auto"``, ``"triton"``, ``"torch"``;
see :mod:`fastvae.backend`) and passes it to the op it wraps.

The posterior's spread is always a **log-variance**, ``logvar = log sigma**2``
(not ``log sigma``): ``sigma = exp(logvar / 2)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastvae.functional import (
    discretized_logistic_mixture_mode,
    discretized_logistic_mixture_nll,
    reconstruction_loss,
    reparameterize_kl,
    reparameterize_log_ratio,
    sample_discretized_logistic_mixture,
)
from fastvae.ops.checks import REDUCTIONS, check_choice, check_positive_number
from fastvae.ops.discretized_logistic_mixture import check_settings, params_per_component
from fastvae.ops.reconstruction_loss import KINDS
from fastvae.ops.reparameterize_kl import soft_clamp


class ReparamKL(nn.Module):
    """``(z, kl) = reparameterize_kl(mu, logvar, eps)`` as a module.

    Args:
        reduction: of the KL: ``"none"`` (one value per sample), ``"sum"`` or ``"mean"``.
        backend: see :mod:`fastvae.backend`.

    Shapes: ``mu``, ``logvar`` and ``eps`` are ``(..., D)``; ``z`` is too, and
    ``kl`` is ``(...)`` float32 (a scalar when reduced).
    """

    def __init__(self, reduction: str = "none", *, backend: str | None = None):
        super().__init__()
        check_choice("reduction", reduction, REDUCTIONS)
        self.reduction = reduction
        self.backend = backend

    def forward(
        self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return reparameterize_kl(mu, logvar, eps, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


class LatentSample(NamedTuple):
    """What :class:`GaussianLatent` returns: the sample, its KL, and the posterior's parameters."""

    z: torch.Tensor  # (..., D) sample (or mu, see GaussianLatent's mean_in_eval)
    kl: torch.Tensor  # (...) float32 KL(N(mu, exp(logvar)) || prior), reduced as asked
    mu: torch.Tensor  # (..., D)
    logvar: torch.Tensor  # (..., D) log sigma**2 as the head gives it: the op soft-clamps it (GaussianLatent.clamp)


class ImportanceSamples(NamedTuple):
    """What :meth:`GaussianLatent.importance_samples` returns: ``K`` samples per input and their log ratios."""

    z: torch.Tensor  # (K, ..., D) the samples
    log_ratio: torch.Tensor  # (K, ...) float32 log p(z) - log q(z | x) of each sample
    mu: torch.Tensor  # (..., D)
    logvar: torch.Tensor  # (..., D) log sigma**2 as the head gives it (before the op's soft clamp)


class GaussianLatent(nn.Module):
    r"""A diagonal Gaussian latent layer: ``features -> (mu, logvar) -> z`` with the KL to ``N(0, I)``.

    A linear head maps ``(..., in_features)`` to ``mu`` and ``logvar``
    (``latent_dim`` each; ``logvar = log sigma**2``); then
    ``z = mu + exp(logvar / 2) * eps`` and
    :math:`\mathrm{KL} = -\tfrac12 \sum_d (1 + \log\sigma^2_d - \mu_d^2 - \sigma^2_d)`
    come from one fused op, which also applies the soft clamp of ``logvar``.
    A prior other than ``N(0, I)`` can be passed to ``forward``.

    Args:
        in_features: size of the encoder's feature vector; ``None`` infers it
            from the first input (``nn.LazyLinear``; run one batch before
            handing the parameters to an optimizer or DDP).
        latent_dim: ``D``, the size of ``z``.
        logvar_limit: if given, ``logvar`` is soft-clamped to
            ``(-logvar_limit, logvar_limit)`` (:func:`~fastvae.ops.reparameterize_kl.soft_clamp`)
            inside the fused op, so that ``exp(logvar)`` stays finite even in float16 (``e**11 < 65504``).
        mean_in_eval: in eval mode, return ``z = mu`` (the posterior mean, no
            noise) instead of a sample; the KL is the same. Training mode always samples.
        reduction: of the KL: ``"none"``, ``"sum"`` or ``"mean"`` over samples.
        backend: see :mod:`fastvae.backend`.

    ``forward(h, eps=None, *, prior_mu=None, prior_logvar=None)`` takes ``h``
    of shape ``(..., in_features)``, optional noise ``eps`` of shape
    ``(..., D)`` and an optional prior (see
    :func:`~fastvae.functional.reparameterize_kl`; its log-variance is clamped
    too), and returns a :class:`LatentSample` ``(z, kl, mu, logvar)``, with
    ``logvar`` before the clamp (:meth:`clamp` gives the clamped one).
    :meth:`importance_samples` draws ``K`` samples per input with their log
    density ratios instead, for an importance-weighted bound (IWAE).
    """

    def __init__(
        self,
        in_features: int | None,
        latent_dim: int,
        *,
        logvar_limit: float | None = None,
        mean_in_eval: bool = False,
        reduction: str = "none",
        backend: str | None = None,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")
        check_positive_number("logvar_limit", logvar_limit)
        check_choice("reduction", reduction, REDUCTIONS)
        self.head = nn.LazyLinear(2 * latent_dim) if in_features is None else nn.Linear(in_features, 2 * latent_dim)
        self.latent_dim = latent_dim
        self.logvar_limit = logvar_limit
        self.mean_in_eval = mean_in_eval
        self.reduction = reduction
        self.backend = backend

    def clamp(self, logvar: torch.Tensor) -> torch.Tensor:
        """``logvar`` soft-clamped as the fused op clamps it (itself without ``logvar_limit``), in torch ops."""
        return soft_clamp(logvar, self.logvar_limit) if self.logvar_limit is not None else logvar

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z | h)``, each ``(..., D)``, ``logvar`` clamped: for evaluation, in torch ops
        (``forward`` leaves the clamp to the fused op)."""
        mu, logvar = self.head(h).chunk(2, dim=-1)
        return mu, self.clamp(logvar)

    def forward(
        self,
        h: torch.Tensor,
        eps: torch.Tensor | None = None,
        *,
        prior_mu: torch.Tensor | None = None,
        prior_logvar: torch.Tensor | None = None,
    ) -> LatentSample:
        mu, logvar = self.head(h).chunk(2, dim=-1)
        if eps is None and self.mean_in_eval and not self.training:
            eps = torch.zeros_like(mu)  # z = mu; the op still gives the KL
        z, kl = reparameterize_kl(
            mu, logvar, eps, prior_mu=prior_mu, prior_logvar=prior_logvar, logvar_limit=self.logvar_limit,
            reduction=self.reduction, backend=self.backend,
        )
        return LatentSample(z, kl, mu, logvar)

    def importance_samples(
        self,
        h: torch.Tensor,
        k: int,
        eps: torch.Tensor | None = None,
        *,
        prior_mu: torch.Tensor | None = None,
        prior_logvar: torch.Tensor | None = None,
    ) -> ImportanceSamples:
        """``k`` samples ``z ~ q(z | h)`` per input and ``log p(z) - log q(z | h)`` of each, from one fused op
        (:func:`~fastvae.functional.reparameterize_log_ratio` with ``samples=k``): the latent part of the log
        weights of an importance-weighted bound.

        ``h``: ``(..., in_features)``; ``eps``: optional noise ``(k, ..., D)``;
        the prior as in ``forward`` (``N(0, I)`` by default). Returns
        :class:`ImportanceSamples` with ``z`` ``(k, ..., D)`` and ``log_ratio``
        ``(k, ...)`` float32. ``mu`` and ``logvar`` (the head's halves) are read
        in place by each sample, never copied; ``mean_in_eval`` does not apply.
        """
        mu, logvar = self.head(h).chunk(2, dim=-1)
        z, log_ratio = reparameterize_log_ratio(
            mu, logvar, eps, samples=k, prior_mu=prior_mu, prior_logvar=prior_logvar, logvar_limit=self.logvar_limit,
            backend=self.backend,
        )
        return ImportanceSamples(z, log_ratio, mu, logvar)

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, logvar_limit={self.logvar_limit}, mean_in_eval={self.mean_in_eval}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


def free_bits_kl(kl: torch.Tensor, free_bits: float) -> torch.Tensor:
    r"""The KL term of the loss under free bits (Kingma et al. 2016, the IAF form), a ``()`` tensor.

    ``kl``: ``(B, G)`` float32, the KL of each image's ``G`` groups of latents
    (the channels of a stochastic layer). Each group's KL, averaged over the
    batch, counts as at least ``free_bits`` nats:
    :math:`\sum_g \max(\lambda, \mathrm{mean}_B\, \mathrm{KL}_g)`. Below
    ``free_bits`` a group gets no gradient from the KL, so the encoder is free
    to use those nats instead of collapsing the group to the prior. With
    ``free_bits = 0`` this is the batch mean of the KL per image. The KL a model
    reports stays the true one; only the loss sees this.
    """
    per_group = kl.mean(dim=0)
    if free_bits > 0:
        per_group = per_group.clamp(min=free_bits)
    return per_group.sum()


class StochasticSample(NamedTuple):
    """What :class:`ConvGaussianLatent` returns (``B`` images, ``C`` latent channels of ``H x W``)."""

    z: torch.Tensor  # (B, C, H, W) the sample
    kl: torch.Tensor  # (B,) float32 KL(q || p) per image, nats
    kl_channels: torch.Tensor  # (B, C) float32 KL(q || p) per image and latent channel, nats


class ConvGaussianLatent(nn.Module):
    r"""One stochastic layer of a hierarchical VAE (VDVAE, NVAE) on latent feature maps ``(B, C, H, W)``.

    The posterior ``q(z | x, z_<l)`` and the prior ``p(z | z_<l)`` are diagonal
    Gaussians whose parameters a model's convs compute: the first ``2 C``
    channels of a ``(B, >= 2C, H, W)`` tensor hold ``mu`` and then ``logvar``
    (``log sigma**2``), read in place as channel slices; any further channels
    (VDVAE's prior net also outputs features for the decoder's state) are left
    alone. A prior may also be a learned ``(2C, H, W)`` tensor shared by the
    batch, or ``None`` for ``N(0, I)``.

    * ``forward(posterior, prior=None, eps=None)``: ``z ~ q`` by
      reparameterization and ``KL(q || p)`` per image and channel, from one
      fused op (``event_dims=2``, the clamp of both log-variances fused in):
      a :class:`StochasticSample`.
    * :meth:`kl_loss`: the layer's KL term for the loss, with free bits.
    * :meth:`sample`: ``z ~ p`` with the prior's spread scaled by a temperature, through the fused op.
    * :meth:`log_weight`: ``z ~ q`` and ``log p(z) - log q(z)`` per image, for importance sampling.

    Args:
        latent_channels: ``C``.
        logvar_limit: soft clamp ``L tanh(x / L)`` of both log-variances, fused into the op (``None``: none).
        free_bits: nats per latent channel, averaged over the batch, that the KL term counts at least (:func:`free_bits_kl`).
        backend: see :mod:`fastvae.backend`.
    """

    def __init__(
        self,
        latent_channels: int,
        *,
        logvar_limit: float | None = None,
        free_bits: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be at least 1, got {latent_channels}")
        check_positive_number("logvar_limit", logvar_limit)
        if not 0 <= free_bits < float("inf"):
            raise ValueError(f"free_bits must be a non-negative number, got {free_bits}")
        self.latent_channels = latent_channels
        self.logvar_limit = logvar_limit
        self.free_bits = free_bits
        self.backend = backend

    def split(self, params: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``: the first two groups of ``C`` channels (dim -3) of ``params``, as views."""
        c = self.latent_channels
        if params.dim() < 3 or params.shape[-3] < 2 * c:
            raise ValueError(
                f"{name} must have at least 2 * latent_channels = {2 * c} channels in dim -3, got shape "
                f"{tuple(params.shape)}"
            )
        return params[..., :c, :, :], params[..., c : 2 * c, :, :]

    def forward(
        self, posterior: torch.Tensor, prior: torch.Tensor | None = None, eps: torch.Tensor | None = None
    ) -> StochasticSample:
        mu, logvar = self.split(posterior, "posterior")
        prior_mu, prior_logvar = self.split(prior, "prior") if prior is not None else (None, None)
        z, kl_channels = reparameterize_kl(
            mu, logvar, eps, prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=2,
            logvar_limit=self.logvar_limit, backend=self.backend,
        )
        return StochasticSample(z, kl_channels.sum(dim=1), kl_channels)

    def kl_loss(self, kl_channels: torch.Tensor) -> torch.Tensor:
        """The layer's KL term of the loss, a ``()`` tensor: :func:`free_bits_kl` of ``kl_channels`` ``(B, C)``."""
        return free_bits_kl(kl_channels, self.free_bits)

    def sample(
        self, prior: torch.Tensor, *, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``z ~ N(prior_mu, temperature**2 exp(prior_logvar))`` for a ``(B, >= 2C, H, W)`` prior, ``(B, C, H, W)``.

        The fused op draws it (the prior's log-variance clamped as in training);
        at a temperature other than 1 its noise is ``temperature * randn`` from
        ``generator``, so that temperature 0 gives the prior's mean.
        """
        prior_mu, prior_logvar = self.split(prior, "prior")
        eps = None
        if temperature != 1.0:
            noise = torch.randn(prior_mu.shape, generator=generator, device=prior_mu.device)
            eps, generator = temperature * noise, None
        z, _ = reparameterize_kl(
            prior_mu, prior_logvar, eps, event_dims=3, logvar_limit=self.logvar_limit, generator=generator,
            backend=self.backend,
        )
        return z

    def clamp(self, logvar: torch.Tensor) -> torch.Tensor:
        """``logvar`` soft-clamped as the fused op clamps it, in torch ops (itself without ``logvar_limit``)."""
        return soft_clamp(logvar, self.logvar_limit) if self.logvar_limit is not None else logvar

    def log_weight(
        self, posterior: torch.Tensor, prior: torch.Tensor | None, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = mu + sigma * eps`` and ``log p(z) - log q(z)`` per image, ``(B,)`` float32, from one fused op
        (:func:`~fastvae.functional.reparameterize_log_ratio`, log-variances clamped as in training).

        The importance weight's share of this layer: with ``eps`` standard
        normal, ``log q(z) = -0.5 * sum(eps**2 + logvar) + const`` and
        ``log p(z) = -0.5 * sum((z - prior_mu)**2 / exp(prior_logvar) + prior_logvar) + const``,
        the constants cancelling.
        """
        mu, logvar = self.split(posterior, "posterior")
        prior_mu, prior_logvar = self.split(prior, "prior") if prior is not None else (None, None)
        return reparameterize_log_ratio(
            mu, logvar, eps, prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=3,
            logvar_limit=self.logvar_limit, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"latent_channels={self.latent_channels}, logvar_limit={self.logvar_limit}, "
            f"free_bits={self.free_bits}, backend={self.backend!r}"
        )


class ReconstructionLoss(nn.Module):
    """``reconstruction_loss(x_hat, x, kind)`` as a module, with a learned ``logvar`` for ``kind="gaussian"``.

    Args:
        kind: ``"mse"``, ``"bce"`` (``x_hat`` are logits), ``"gaussian"`` or ``"l1"``;
            see :func:`fastvae.functional.reconstruction_loss` for the formulas.
        reduction: ``"none"`` (per-sample sums, ``(B,)``), ``"sum"``, or
            ``"mean"`` over samples of the per-sample sums (not torch's element-wise mean).
        logvar_shape: ``kind="gaussian"`` only: the shape of the learned
            log-variance (``log sigma**2``) parameter ``self.logvar``: ``()``
            for one scalar, or the feature shape ``x.shape[1:]`` for one per feature.
        init_logvar: its initial value.
        backend: see :mod:`fastvae.backend`.

    ``forward(x_hat, x)`` takes two ``(B, ...)`` tensors and returns the loss in float32.
    """

    def __init__(
        self,
        kind: str = "mse",
        reduction: str = "none",
        *,
        logvar_shape: int | tuple[int, ...] = (),
        init_logvar: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        check_choice("kind", kind, KINDS)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kind = kind
        self.reduction = reduction
        self.backend = backend
        shape = (logvar_shape,) if isinstance(logvar_shape, int) else tuple(logvar_shape)
        self.logvar = nn.Parameter(torch.full(shape, float(init_logvar))) if kind == "gaussian" else None

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(
            x_hat, x, self.kind, reduction=self.reduction, logvar=self.logvar, backend=self.backend
        )

    def extra_repr(self) -> str:
        shape = None if self.logvar is None else tuple(self.logvar.shape)
        return f"kind={self.kind!r}, reduction={self.reduction!r}, logvar_shape={shape}, backend={self.backend!r}"


class DiscretizedLogisticMixture(nn.Module):
    """The discretized mixture of logistics (PixelCNN++'s likelihood) for images with values in [0, 1].

    A decoder outputs ``params_channels(C)`` channels per pixel; this module
    scores images against them with the fused
    :func:`fastvae.functional.discretized_logistic_mixture_nll`, draws images
    from them, and gives a deterministic image for reconstructions.

    Args:
        num_mixtures: ``M``, logistic components per pixel (10 in PixelCNN++).
        num_bits: bits per value: ``2**num_bits`` levels (8 for 256).
        reduction: of the nll: ``"none"`` (per image, ``(B,)``), ``"sum"`` or ``"mean"`` over images.
        backend: see :mod:`fastvae.backend`.

    ``forward(params, x)`` takes ``params`` ``(B, params_channels(C), ...)``
    and images ``x`` ``(B, C, ...)`` and returns the nll in nats (float32).
    """

    def __init__(
        self, num_mixtures: int = 10, num_bits: int = 8, reduction: str = "none", *, backend: str | None = None
    ):
        super().__init__()
        check_settings(num_mixtures, num_bits)
        check_choice("reduction", reduction, REDUCTIONS)
        self.num_mixtures = num_mixtures
        self.num_bits = num_bits
        self.reduction = reduction
        self.backend = backend

    def params_channels(self, channels: int) -> int:
        """Channels of ``params`` for images of ``channels`` channels: ``M (1 + 2C + C(C-1)/2)`` (10M for RGB)."""
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        return self.num_mixtures * params_per_component(channels)

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return discretized_logistic_mixture_nll(
            params, x, num_mixtures=self.num_mixtures, num_bits=self.num_bits, reduction=self.reduction,
            backend=self.backend,
        )

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, C, ...)`` in [0, 1] drawn from the mixture.

        See :func:`~fastvae.functional.sample_discretized_logistic_mixture`.
        """
        return sample_discretized_logistic_mixture(
            params, num_mixtures=self.num_mixtures, num_bits=self.num_bits, generator=generator
        )

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """A deterministic image for reconstructions: each pixel's likeliest component at its likeliest levels.

        Not the mixture's mean, which averages the components into the blur
        this likelihood avoids; see :func:`~fastvae.functional.discretized_logistic_mixture_mode`.
        """
        return discretized_logistic_mixture_mode(params, num_mixtures=self.num_mixtures, num_bits=self.num_bits)

    def extra_repr(self) -> str:
        return (
            f"num_mixtures={self.num_mixtures}, num_bits={self.num_bits}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )
