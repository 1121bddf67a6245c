"""Drop-in VAE layers over fastvae's fused ops.

* :class:`ReparamKL`: the module form of :func:`fastvae.functional.reparameterize_kl`.
* :class:`GaussianLatent`: a linear head giving ``mu`` and ``logvar``, then the
  fused sample + KL: the layer between a VAE's encoder and its decoder.
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
    sample_discretized_logistic_mixture,
)
from fastvae.ops.checks import REDUCTIONS, check_choice
from fastvae.ops.discretized_logistic_mixture import check_settings, params_per_component
from fastvae.ops.reconstruction_loss import KINDS


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


def soft_clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    """``limit * tanh(x / limit)``: about ``x`` for ``|x|`` well below ``limit``, never beyond ``+-limit``.

    Unlike a hard clamp it keeps a gradient everywhere.
    """
    return limit * torch.tanh(x / limit)


class LatentSample(NamedTuple):
    """What :class:`GaussianLatent` returns: the sample, its KL, and the posterior's parameters."""

    z: torch.Tensor  # (..., D) sample (or mu, see GaussianLatent's mean_in_eval)
    kl: torch.Tensor  # (...) float32 KL(N(mu, exp(logvar)) || N(0, I)), reduced as asked
    mu: torch.Tensor  # (..., D)
    logvar: torch.Tensor  # (..., D) log sigma**2, after the soft clamp


class GaussianLatent(nn.Module):
    r"""A diagonal Gaussian latent layer: ``features -> (mu, logvar) -> z`` with the KL to ``N(0, I)``.

    A linear head maps ``(..., in_features)`` to ``mu`` and ``logvar``
    (``latent_dim`` each; ``logvar = log sigma**2``); then
    ``z = mu + exp(logvar / 2) * eps`` and
    :math:`\mathrm{KL} = -\tfrac12 \sum_d (1 + \log\sigma^2_d - \mu_d^2 - \sigma^2_d)`
    come from one fused op.

    Args:
        in_features: size of the encoder's feature vector; ``None`` infers it
            from the first input (``nn.LazyLinear``; run one batch before
            handing the parameters to an optimizer or DDP).
        latent_dim: ``D``, the size of ``z``.
        logvar_limit: if given, ``logvar`` is soft-clamped to
            ``(-logvar_limit, logvar_limit)`` (:func:`soft_clamp`), so that
            ``exp(logvar)`` stays finite even in float16 (``e**11 < 65504``).
        mean_in_eval: in eval mode, return ``z = mu`` (the posterior mean, no
            noise) instead of a sample; the KL is the same. Training mode always samples.
        reduction: of the KL: ``"none"``, ``"sum"`` or ``"mean"`` over samples.
        backend: see :mod:`fastvae.backend`.

    ``forward(h, eps=None)`` takes ``h`` of shape ``(..., in_features)`` and
    optional noise ``eps`` of shape ``(..., D)``, and returns a
    :class:`LatentSample` ``(z, kl, mu, logvar)``.
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
        if logvar_limit is not None and not logvar_limit > 0:
            raise ValueError(f"logvar_limit must be positive or None, got {logvar_limit}")
        check_choice("reduction", reduction, REDUCTIONS)
        self.head = nn.LazyLinear(2 * latent_dim) if in_features is None else nn.Linear(in_features, 2 * latent_dim)
        self.latent_dim = latent_dim
        self.logvar_limit = logvar_limit
        self.mean_in_eval = mean_in_eval
        self.reduction = reduction
        self.backend = backend

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z | h)``, each ``(..., D)``; ``logvar`` soft-clamped if asked."""
        mu, logvar = self.head(h).chunk(2, dim=-1)
        if self.logvar_limit is not None:
            logvar = soft_clamp(logvar, self.logvar_limit)
        return mu, logvar

    def forward(self, h: torch.Tensor, eps: torch.Tensor | None = None) -> LatentSample:
        mu, logvar = self.posterior(h)
        if eps is None and self.mean_in_eval and not self.training:
            eps = torch.zeros_like(mu)  # z = mu; the op still gives the KL
        z, kl = reparameterize_kl(mu, logvar, eps, reduction=self.reduction, backend=self.backend)
        return LatentSample(z, kl, mu, logvar)

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, logvar_limit={self.logvar_limit}, mean_in_eval={self.mean_in_eval}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
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
