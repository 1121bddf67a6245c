"""The reparameterization trick and the analytic KL term of a diagonal Gaussian posterior.

``reparameterize_kl`` is the public op; ``reparameterize_kl_reference`` is its
specification in plain PyTorch. The Triton path is a pair of custom ops
(``fastvae::reparameterize_kl`` and its backward) joined by
``register_autograd``, so ``torch.compile(fullgraph=True)`` sees one opaque op
and no graph break.
"""
from __future__ import annotations

import torch

from fastvae.backend import resolve_backend
from fastvae.ops.checks import (
    REDUCTIONS,
    check_choice,
    check_float_tensor,
    check_generator,
    check_same_device,
    check_same_shape,
    compute_dtype,
    reduce_per_sample,
)
from fastvae.ops.rng import philox_seed_offset


def reparameterize_kl_reference(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, reduction: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`reparameterize_kl` with ``eps`` given, in plain PyTorch.

    Computes in float32 (float64 when an input is float64), as the kernels do.
    """
    acc = compute_dtype(mu.dtype, logvar.dtype)
    mu_, logvar_ = mu.to(acc), logvar.to(acc)
    z = (mu_ + torch.exp(0.5 * logvar_) * eps.to(acc)).to(mu.dtype)
    kl = -0.5 * torch.sum(1 + logvar_ - mu_ * mu_ - torch.exp(logvar_), dim=-1)
    return z, reduce_per_sample(kl, reduction)


def _kernels():
    # Imported on first use: fastvae imports without Triton, and TRITON_INTERPRET
    # is read when the kernels are defined.
    from fastvae.kernels import reparameterize_kl

    return reparameterize_kl


def _reserve_philox(generator: torch.Generator | None, mu: torch.Tensor) -> list[int]:
    """Philox ``[seed, first_counter]`` for the noise of one call on ``mu``, taken from ``generator``."""
    return list(philox_seed_offset(generator, mu.device, _kernels().philox_rounds(mu.shape)))


@torch.library.custom_op(
    "fastvae::reparameterize_kl", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _fused_forward(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, philox: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``z``, the per-sample KL, and the Philox ``(seed, first_counter)`` as a CPU int64 tensor.

    Without ``eps`` and ``philox`` the noise comes from the device's default
    generator, read here, inside the op, so that torch.compile traces no
    generator state (the tag keeps compiled graphs from merging two calls).
    """
    seed, first_counter = 0, 0
    if eps is None:
        seed, first_counter = philox if philox is not None else _reserve_philox(None, mu)
    philox_state = torch.tensor([seed, first_counter], dtype=torch.int64)
    if mu.numel() == 0:
        z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
        return z, torch.zeros(mu.shape[:-1], dtype=torch.float32, device=mu.device), philox_state
    z, kl = _kernels().reparameterize_kl_forward(mu, logvar, eps, seed, first_counter)
    return z, kl, philox_state


@_fused_forward.register_fake
def _(mu, logvar, eps, philox):
    z = mu.new_empty(mu.shape)
    kl = mu.new_empty(mu.shape[:-1], dtype=torch.float32)
    return z, kl, torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.custom_op("fastvae::reparameterize_kl_backward", mutates_args=())
def _fused_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    philox_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if mu.numel() == 0:
        return torch.zeros_like(mu, memory_format=torch.contiguous_format), torch.zeros_like(
            logvar, memory_format=torch.contiguous_format
        )
    seed, first_counter = philox_state.tolist()
    return _kernels().reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, first_counter)


@_fused_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, eps, philox_state):
    return mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, _ = inputs
    ctx.save_for_backward(mu, logvar, eps, output[2])
    # An unused output gets no gradient tensor at all, rather than a buffer of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_z, grad_kl, _grad_philox):
    mu, logvar, eps, philox_state = ctx.saved_tensors
    if grad_z is None and grad_kl is None:
        return None, None, None, None
    grad_mu, grad_logvar = _fused_backward(grad_z, grad_kl, mu, logvar, eps, philox_state)
    grad_eps = None
    if eps is not None and ctx.needs_input_grad[2] and grad_z is not None:
        grad_eps = (grad_z * torch.exp(0.5 * logvar.float())).to(eps.dtype)
    return grad_mu, grad_logvar, grad_eps, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    *,
    reduction: str = "none",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Sample ``z ~ N(mu, exp(logvar))`` by reparameterization, with ``KL(N(mu, exp(logvar)) || N(0, I))``.

    .. math::
        z = \mu + e^{\log\sigma^2 / 2} \, \epsilon, \qquad
        \mathrm{KL} = -\tfrac12 \sum_d \left(1 + \log\sigma^2_d - \mu_d^2 - e^{\log\sigma^2_d}\right)

    Args:
        mu: ``(..., D)`` posterior means; any leading dims, any ``D >= 1``.
            float16, bfloat16, float32 (float64 on the reference path).
        logvar: ``(..., D)`` posterior log-variances (``log sigma**2``, not ``log sigma``),
            same shape and device as ``mu``.
        eps: optional ``(..., D)`` standard-normal noise, used as is. ``None``
            draws it: in the Triton kernels with Philox (never stored; the
            backward regenerates it), on the reference path with ``torch.randn``.
            If ``eps`` requires grad it gets ``grad_z * exp(logvar / 2)``.
        reduction: ``"none"`` (KL per sample), ``"sum"`` or ``"mean"`` (over samples).
        generator: the generator to draw ``eps`` from (default: torch's default
            generator of the tensors' device), so ``torch.manual_seed`` makes
            runs reproducible.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``; see
            :mod:`fastvae.backend`.

    Returns:
        ``(z, kl)``: ``z`` with ``mu``'s shape and dtype; ``kl`` of shape
        ``mu.shape[:-1]`` (``"none"``) or a scalar, in float32 (float64 for
        float64 inputs). Gradients flow to ``mu`` and ``logvar`` from both.
    """
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    if mu.dim() == 0:
        raise ValueError("mu must have shape (..., D) with at least one dimension, got a 0-d tensor")
    check_same_shape("logvar", logvar, "mu", mu)
    if eps is not None:
        check_float_tensor("eps", eps)
        check_same_shape("eps", eps, "mu", mu)
    check_same_device(mu=mu, logvar=logvar, eps=eps)
    check_choice("reduction", reduction, REDUCTIONS)
    check_generator(generator, mu.device)
    dtypes = {"mu": mu.dtype, "logvar": logvar.dtype, **({"eps": eps.dtype} if eps is not None else {})}

    if resolve_backend(backend, mu.device, dtypes) == "torch":
        if eps is None:
            acc = compute_dtype(mu.dtype, logvar.dtype)
            eps = torch.randn(mu.shape, generator=generator, dtype=acc, device=mu.device)
        return reparameterize_kl_reference(mu, logvar, eps, reduction)

    # An explicit generator cannot enter the op's schema: its Philox state is read here.
    philox = _reserve_philox(generator, mu) if eps is None and generator is not None else None
    z, kl, _ = _fused_forward(mu, logvar, eps, philox)
    return z, reduce_per_sample(kl, reduction)
