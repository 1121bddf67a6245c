"""diffusers' ``AutoencoderKL`` posterior with its sample and KL in one fused call.

``AutoencoderKL.encode(x).latent_dist`` is a ``DiagonalGaussianDistribution``
(``diffusers/models/autoencoders/vae.py``): it splits the encoder's output
``(B, 2C, H, W)`` into ``mean`` and ``logvar`` with ``torch.chunk``, clamps
``logvar`` to ``[-30, 20]``, and computes ``std = exp(logvar / 2)`` and
``var = exp(logvar)`` at once; ``sample()`` draws noise and computes
``mean + std * noise``, ``kl()`` sums ``mean**2 + var - 1 - logvar`` over
dims ``[1, 2, 3]``. That is a dozen kernels forward and more backward, and
``std``, ``var`` and the noise kept for the backward.

:class:`FusedDiagonalGaussianDistribution` is a subclass with the same
attributes and the same values, which computes ``z`` and the KL in one call of
:func:`fastvae.reparameterize_kl` (the clamp inside the kernels:
``logvar_clamp=(-30, 20)``, the channel halves read in place), and
:func:`patch_autoencoder_kl` makes every ``AutoencoderKL`` return it::

    from fastvae.integrations.diffusers import patch_autoencoder_kl

    patch_autoencoder_kl()
    posterior = vae.encode(x).latent_dist      # a FusedDiagonalGaussianDistribution
    z = posterior.sample(generator=generator)  # diffusers' noise, the same z
    kl = posterior.kl()                        # computed by the same call as z

The Triton kernels run on CUDA tensors; elsewhere (the CPU) the fused op's
reference path in plain PyTorch does (see :mod:`fastvae.backend`).
"""
from __future__ import annotations

import functools

import torch

try:
    from diffusers.models.autoencoders import autoencoder_kl as _autoencoder_kl
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "fastvae.integrations.diffusers needs diffusers: pip install \"fastvae[diffusers]\" (or pip install diffusers)"
    ) from error

from fastvae.backend import requested_backend
from fastvae.ops.reparameterize_kl import reparameterize_kl

__all__ = ["FusedDiagonalGaussianDistribution", "patch_autoencoder_kl", "unpatch_autoencoder_kl"]

# diffusers' clamp of the log-variance, and the dims its kl() sums over.
LOGVAR_CLAMP = (-30.0, 20.0)
KL_DIMS = (1, 2, 3)


def _summed_dims_last(ndim: int) -> tuple[int, ...]:
    """The permutation that puts the dims diffusers' KL sums over (1, 2, 3) last, as one event: fastvae's op sums
    the last ``event_dims`` dims. The identity for 4-D latents; ``(0, 4, 1, 2, 3)`` for 5-D (video) ones, whose
    KL diffusers leaves per sample and last dim."""
    return (0, *range(4, ndim), *KL_DIMS)


class FusedDiagonalGaussianDistribution(DiagonalGaussianDistribution):
    """diffusers' ``DiagonalGaussianDistribution`` whose ``sample()`` computes ``z`` and the KL in one fused call.

    Args:
        parameters: the encoder's output ``(B, 2C, H, W)`` (or ``(B, 2C, T, H, W)``
            for video latents): the mean's channels, then the log-variance's.
            float32, bfloat16 or float16 (float64 on the reference path).
        deterministic: as diffusers: ``std`` and ``var`` are zeros, ``sample()``
            returns the mean, ``kl()`` and ``nll()`` return ``torch.Tensor([0.0])``.
        backend: fastvae's backend for the fused call (``None``: the Triton kernels
            for CUDA tensors, the reference path otherwise; see :mod:`fastvae.backend`).

    Attributes, with diffusers' values: ``parameters``, ``deterministic``,
    ``mean`` (a view of the first half of the channels), ``logvar`` (clamped to
    ``[-30, 20]``), ``std`` and ``var``; the last three are computed the first
    time they are read (the fused path never needs them).

    ``sample(generator)`` draws the noise as diffusers does (``randn_tensor`` of
    the mean's shape, device and dtype: the same generator state gives the same
    noise) and returns ``mean + std * noise`` from the fused op, which also
    computes the KL (with gradients of both, through the clamp as
    ``torch.clamp``'s). ``kl()`` returns that KL, summed over dims ``[1, 2, 3]``
    in the parameters' dtype, or computes it (fused too) when ``sample()`` was
    not called, and for ``kl(other)`` against another diagonal Gaussian (whose
    log-variance the op clamps to ``[-30, 20]``, as its constructor did).
    ``mode()`` and ``nll()`` are diffusers' own.

    The channel halves of a contiguous encoder output are read where they lie;
    those of a channels_last one (what AutoencoderKL's encoder returns on the
    CPU, its mid-block attention reshaping to that layout) are copied to
    contiguous ones inside the op, forward and backward, and not kept (an event
    of the C channels of a pixel would read them in place, but the kernels'
    tiles for so few columns spill registers at C = 4). The kernels return ``z``
    contiguous. Latents of 5 or more dims (diffusers' video autoencoders) give
    diffusers' numbers too: its KL sums dims 1, 2, 3 and keeps the others, which
    the op reads through a permuted view; ``z`` then costs one copy more, to
    return it contiguous. Latents of fewer than 4 dims, a
    deterministic posterior and a ``kl(other)`` that is not a non-deterministic
    ``DiagonalGaussianDistribution`` of a shape that broadcasts to this one's
    take diffusers' own code.
    """

    backend: str | None = None

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, *, backend: str | None = None):
        # diffusers' __init__ is not called: it would compute the clamp, std and var right away.
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, self._logvar_unclamped = torch.chunk(parameters, 2, dim=1)
        if backend is not None:
            requested_backend(backend)  # a ValueError for an unknown name, now rather than at sample()
            self.backend = backend
        self._sampled_kl: torch.Tensor | None = None

    # ---- diffusers' attributes, computed when read ---------------------------------------------------------------

    @functools.cached_property
    def logvar(self) -> torch.Tensor:
        return torch.clamp(self._logvar_unclamped, *LOGVAR_CLAMP)

    @functools.cached_property
    def std(self) -> torch.Tensor:
        return self._zeros if self.deterministic else torch.exp(0.5 * self.logvar)

    @functools.cached_property
    def var(self) -> torch.Tensor:
        return self._zeros if self.deterministic else torch.exp(self.logvar)

    @functools.cached_property
    def _zeros(self) -> torch.Tensor:
        """A deterministic posterior's ``std`` and ``var`` (one tensor, as in diffusers)."""
        return torch.zeros_like(self.mean, device=self.parameters.device, dtype=self.parameters.dtype)

    # ---- the fused path ---------------------------------------------------------------------------------------

    @property
    def _fused(self) -> bool:
        """Whether the fused op computes this posterior's sample and KL (else diffusers' own code does)."""
        return not self.deterministic and self.mean.dim() >= 4

    def _reparameterize_kl(self, noise: torch.Tensor, other: DiagonalGaussianDistribution | None = None):
        """``(z, kl)`` of one fused call with ``noise``: ``z`` in the mean's shape and layout, the KL over dims
        ``[1, 2, 3]`` in diffusers' dtype; against ``other`` (a diagonal Gaussian prior) when given."""
        tensors = [self.mean, self._logvar_unclamped, noise]
        dtype = self.parameters.dtype
        if other is not None:
            # A fused prior's raw log-variance (the kernel clamps it); another's is clamped already.
            fused = isinstance(other, FusedDiagonalGaussianDistribution)
            other_logvar = other._logvar_unclamped if fused else other.logvar
            tensors += [other.mean, other_logvar]
            dtype = torch.promote_types(dtype, torch.promote_types(other.mean.dtype, other_logvar.dtype))
        order = _summed_dims_last(self.mean.dim())
        permuted = order != tuple(range(self.mean.dim()))
        if permuted:  # video latents: the summed dims last, as a view
            tensors = [t.permute(order) for t in tensors]
        mean, logvar, noise, *prior = tensors
        z, kl = reparameterize_kl(
            mean, logvar, noise, prior_mu=prior[0] if prior else None, prior_logvar=prior[1] if prior else None,
            event_dims=len(KL_DIMS), logvar_clamp=LOGVAR_CLAMP, backend=self.backend,
        )
        if permuted:
            z = z.permute(_inverse(order)).contiguous()
        return z, kl.to(dtype)

    def _fuses_kl_against(self, other) -> bool:
        """Whether ``kl(other)`` can be the fused op's KL against a prior: ``other`` a non-deterministic diagonal
        Gaussian (``var = exp(logvar)``) whose shape broadcasts to this one's, with as many dims."""
        if not isinstance(other, DiagonalGaussianDistribution) or other.deterministic:
            return False
        if other.mean.dim() != self.mean.dim() or other.mean.device != self.mean.device:
            return False
        try:
            return torch.broadcast_shapes(other.mean.shape, self.mean.shape) == self.mean.shape
        except RuntimeError:
            return False

    # ---- diffusers' methods -----------------------------------------------------------------------------------

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * noise`` with diffusers' noise (``randn_tensor``), the KL computed by the same call."""
        if not self._fused:
            return super().sample(generator)
        noise = randn_tensor(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype
        )
        z, self._sampled_kl = self._reparameterize_kl(noise)
        return z

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """``KL(self || N(0, I))`` (or ``|| other``) summed over dims ``[1, 2, 3]``: the one ``sample()``
        computed, or one fused call (with zero noise, no draw) when it was not."""
        if not self._fused or (other is not None and not self._fuses_kl_against(other)):
            return super().kl(other)
        if other is None and self._sampled_kl is not None:
            return self._sampled_kl
        no_noise = self.mean.new_zeros(()).expand(self.mean.shape)  # read as one value: stride 0
        return self._reparameterize_kl(no_noise, other)[1]


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return tuple(inverse)


@functools.cache
def _distribution_class(backend: str | None) -> type[FusedDiagonalGaussianDistribution]:
    """The fused class, or a subclass of it whose instances use ``backend`` (one class per backend)."""
    if backend is None:
        return FusedDiagonalGaussianDistribution
    return type("FusedDiagonalGaussianDistribution", (FusedDiagonalGaussianDistribution,),
                {"backend": backend, "__module__": __name__, "__doc__": FusedDiagonalGaussianDistribution.__doc__})


def patch_autoencoder_kl(*, backend: str | None = None) -> None:
    """Make every diffusers ``AutoencoderKL`` (its ``encode`` and ``tiled_encode``) return a
    :class:`FusedDiagonalGaussianDistribution` as ``latent_dist``, until :func:`unpatch_autoencoder_kl`.

    ``AutoencoderKL`` looks its posterior class up in its module at each call, so
    this covers models built before and after the patch. Calling it again
    replaces the patch (with another ``backend``, say).

    Args:
        backend: fastvae's backend for the fused op (``None``: the Triton kernels
            for CUDA tensors, the reference path otherwise; ``"triton"``, ``"torch"``).
    """
    if backend is not None:
        requested_backend(backend)
    _autoencoder_kl.DiagonalGaussianDistribution = _distribution_class(backend)


def unpatch_autoencoder_kl() -> None:
    """Give ``AutoencoderKL`` diffusers' own ``DiagonalGaussianDistribution`` back (a no-op when not patched)."""
    _autoencoder_kl.DiagonalGaussianDistribution = DiagonalGaussianDistribution
