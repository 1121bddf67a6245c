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
* :class:`VectorQuantizer`: the VQ-VAE's bottleneck over the fused
  :func:`fastvae.functional.vector_quantize`: a codebook learned by EMA (or by
  gradient), dead codes restarted from the batch's vectors, and the
  perplexity of code usage.

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
    vector_quantize,
)
from fastvae.ops.checks import REDUCTIONS, check_choice, check_positive_number
from fastvae.ops.discretized_logistic_mixture import check_image_channels, check_settings, params_per_component
from fastvae.ops.reconstruction_loss import KINDS
from fastvae.ops.reparameterize_kl import soft_clamp
from fastvae.ops.vector_quantize import check_beta, check_inputs


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
        channels: the images' channels ``C``, if known: then checked everywhere
            (``params_channels``, the images scored, and the parameters drawn
            from, which alone cannot tell RGB at M = 3 from greyscale at M = 10).
            ``None``: any ``C``, read off ``x`` or, to draw, off ``params``.
        backend: see :mod:`fastvae.backend`.

    ``forward(params, x)`` takes ``params`` ``(B, params_channels(C), ...)``
    and images ``x`` ``(B, C, ...)`` and returns the nll in nats (float32).
    """

    def __init__(
        self,
        num_mixtures: int = 10,
        num_bits: int = 8,
        reduction: str = "none",
        *,
        channels: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        check_settings(num_mixtures, num_bits)
        check_choice("reduction", reduction, REDUCTIONS)
        if channels is not None:
            check_image_channels(channels)
        self.num_mixtures = num_mixtures
        self.num_bits = num_bits
        self.reduction = reduction
        self.channels = channels
        self.backend = backend

    def params_channels(self, channels: int) -> int:
        """Channels of ``params`` for images of ``channels`` channels: ``M (1 + 2C + C(C-1)/2)`` (10M for RGB)."""
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.check_channels(channels, f"params_channels({channels})")
        return self.num_mixtures * params_per_component(channels)

    def check_channels(self, channels: int, got: str) -> None:
        """Raise ``ValueError`` (naming ``got``) if this module is for images of other than ``channels`` channels."""
        if self.channels is not None and channels != self.channels:
            raise ValueError(f"this DiscretizedLogisticMixture is for images of {self.channels} channels, got {got}")

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            self.check_channels(x.shape[1], f"x of shape {tuple(x.shape)}")
        return discretized_logistic_mixture_nll(
            params, x, num_mixtures=self.num_mixtures, num_bits=self.num_bits, reduction=self.reduction,
            backend=self.backend,
        )

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, C, ...)`` in [0, 1] drawn from the mixture.

        See :func:`~fastvae.functional.sample_discretized_logistic_mixture`.
        """
        return sample_discretized_logistic_mixture(
            params, num_mixtures=self.num_mixtures, num_bits=self.num_bits, channels=self.channels,
            generator=generator,
        )

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """A deterministic image for reconstructions: each pixel's likeliest component at its likeliest levels.

        Not the mixture's mean, which averages the components into the blur
        this likelihood avoids; see :func:`~fastvae.functional.discretized_logistic_mixture_mode`.
        """
        return discretized_logistic_mixture_mode(
            params, num_mixtures=self.num_mixtures, num_bits=self.num_bits, channels=self.channels
        )

    def extra_repr(self) -> str:
        channels = f", channels={self.channels}" if self.channels is not None else ""
        return (
            f"num_mixtures={self.num_mixtures}, num_bits={self.num_bits}, reduction={self.reduction!r}{channels}, "
            f"backend={self.backend!r}"
        )


class Quantized(NamedTuple):
    """What :class:`VectorQuantizer` returns for ``z`` with ``N`` vectors."""

    z_q: torch.Tensor  # z's shape and dtype: the chosen codes; the gradient passes straight through to z
    indices: torch.Tensor  # int64, z's shape without the code dim
    loss: torch.Tensor  # () float32: mean over the vectors of ||sg[z] - e||^2 + beta ||z - sg[e]||^2
    perplexity: torch.Tensor  # () float32: exp(entropy of the batch's code frequencies), 1 to min(N, K)
    codes_used: torch.Tensor  # () float32: codes that at least one vector of the batch chose
    counts: torch.Tensor  # (K,) float32: how many vectors of the batch chose each code


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VectorQuantizer(nn.Module):
    r"""The VQ-VAE's bottleneck (van den Oord et al. 2017): each vector of ``z`` replaced by its nearest code.

    ``forward(z)`` runs the fused :func:`fastvae.functional.vector_quantize`
    (no ``N x K`` distance matrix) and returns a :class:`Quantized`: ``z_q``
    (gradient straight through), the ``indices``, ``loss`` (its mean over the
    vectors: the codebook term plus ``beta`` times the commitment term) and the
    ``perplexity`` of code usage in the batch, with ``codes_used`` and the
    per-code ``counts``.

    The codebook, ``self.codebook`` ``(K, D)``, starts uniform in ``(-1/K, 1/K)`` and learns:

    * by **EMA** (``ema_decay``, the default 0.99; a buffer, no gradient): in
      training mode, after each quantization, the cluster sizes ``n_k`` and sums
      ``m_k`` of the vectors that chose each code move towards the batch's by
      ``1 - decay``; the code becomes ``m_k / n_k`` with the sizes
      Laplace-smoothed (``(n_k + eps) / (n + K eps) n``). Its loss term then
      carries no gradient, and only the commitment term trains the encoder;
    * by **gradient** (``ema_decay=None``; an ``nn.Parameter``): from the loss's
      codebook term, through the optimizer.

    **Dead codes** are restarted in training mode, before the quantization:
    every code whose usage (``cluster_size``, the EMA of how many vectors of a
    batch chose it, with ``ema_decay`` or 0.99) is below
    ``dead_code_threshold`` is moved onto a vector of the current batch drawn at
    random (torch's generator), its usage set to the threshold (and its EMA sum
    to match), so that codes the encoder never reaches come back where its
    vectors are (Jukebox's random restarts). ``dead_code_threshold=0`` turns
    this off. Nothing here reads a value on the host: the updates are
    branch-free tensor ops. Under ``torch.distributed`` the counts and sums are
    summed over the processes and the restarted codebook is broadcast from rank
    0, so every process keeps the same codebook.

    Args:
        num_codes: ``K``.
        dim: ``D``, the size of each code (and of each vector of ``z``).
        beta: weight of the commitment term (0.25).
        ema_decay: the EMA's decay in ``(0, 1)``, or ``None`` to learn the codebook by gradient.
        epsilon: the Laplace smoothing of the EMA's cluster sizes.
        dead_code_threshold: usage (vectors per batch, as an EMA) below which a code is restarted; 0: never.
        channel_dim: the axis of ``z`` holding the ``D`` values: ``-1`` for ``(..., D)``, ``1`` for ``(B, D, H, W)``.
        backend: see :mod:`fastvae.backend`.
    """

    USAGE_DECAY = 0.99  # of the usage that dead-code restarts read, when the codebook learns by gradient

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        beta: float = 0.25,
        ema_decay: float | None = 0.99,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 1.0,
        channel_dim: int = -1,
        backend: str | None = None,
    ):
        super().__init__()
        for name, value in (("num_codes", num_codes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_beta(beta)
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), or None to learn the codebook by gradient, got {ema_decay}")
        check_positive_number("epsilon", epsilon)
        if not 0 <= dead_code_threshold < float("inf"):
            raise ValueError(f"dead_code_threshold must be a finite number >= 0, got {dead_code_threshold}")
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.ema_decay, self.epsilon = float(beta), ema_decay, float(epsilon)
        self.dead_code_threshold = float(dead_code_threshold)
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.backend = backend
        codebook = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)
        if ema_decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            # Sizes start at 1 with the sums at the codes: an unused code keeps its value as both decay.
            self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("cluster_size", torch.ones(num_codes))

    def forward(self, z: torch.Tensor) -> Quantized:
        rows = None
        if self.training:  # the batch's vectors, for the restarts and the EMA (a copy where z's layout has no rows)
            axis = check_inputs(z, self.codebook, self.channel_dim)
            rows = z.detach().movedim(axis, -1).reshape(-1, self.dim).float()
            if rows.shape[0] and self.dead_code_threshold > 0:
                self._restart_dead_codes(rows)
        z_q, indices, loss = vector_quantize(
            z, self.codebook, beta=self.beta, dim=self.channel_dim, reduction="mean", backend=self.backend
        )
        flat = indices.reshape(-1)
        ones = torch.ones_like(flat, dtype=torch.float32)
        counts = torch.zeros(self.num_codes, device=z.device).index_add_(0, flat, ones)
        if self.training:
            self._update(counts, flat, rows)
        frequencies = counts / max(flat.numel(), 1)
        perplexity = torch.exp(-torch.xlogy(frequencies, frequencies).sum())
        return Quantized(z_q, indices, loss, perplexity, (counts > 0).float().sum(), counts)

    @torch.no_grad()
    def _restart_dead_codes(self, rows: torch.Tensor) -> None:
        """Move every code whose usage is below the threshold onto a random vector of ``rows`` ``(N, D)``."""
        dead = (self.cluster_size < self.dead_code_threshold)[:, None]
        fresh = rows[torch.randint(0, rows.shape[0], (self.num_codes,), device=rows.device)]
        self.codebook.copy_(torch.where(dead, fresh.to(self.codebook.dtype), self.codebook))
        if self.ema_decay is not None:
            self.ema_sum.copy_(torch.where(dead, fresh * self.dead_code_threshold, self.ema_sum))
        self.cluster_size.copy_(torch.where(dead[:, 0], self.dead_code_threshold, self.cluster_size))
        if _distributed():
            for buffer in self._state():
                torch.distributed.broadcast(buffer, src=0)

    @torch.no_grad()
    def _update(self, counts: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> None:
        """The usage EMA and, by EMA, the codebook, from the batch's ``counts`` and its vectors ``rows``."""
        sums = None
        if self.ema_decay is not None:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, rows)
        if _distributed():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
            if sums is not None:
                torch.distributed.all_reduce(sums)
        decay = self.ema_decay if self.ema_decay is not None else self.USAGE_DECAY
        self.cluster_size.lerp_(counts, 1 - decay)
        if self.ema_decay is None:
            return
        self.ema_sum.lerp_(sums, 1 - self.ema_decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    def _state(self) -> list[torch.Tensor]:
        """The tensors that define the codebook: the codebook, its usage and (EMA) the sums."""
        return [self.codebook.data, self.cluster_size] + ([self.ema_sum] if self.ema_decay is not None else [])

    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_q, indices)`` of ``z`` without touching the codebook, in any mode: no restart, no EMA update."""
        z_q, indices, _ = vector_quantize(z, self.codebook, beta=self.beta, dim=self.channel_dim, backend=self.backend)
        return z_q, indices

    @torch.no_grad()
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of ``indices`` (int64, any shape), with their ``D`` values along ``channel_dim``."""
        return self.codebook[indices].movedim(-1, self.channel_dim)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema_decay={self.ema_decay}, "
            f"dead_code_threshold={self.dead_code_threshold}, channel_dim={self.channel_dim}, backend={self.backend!r}"
        )
