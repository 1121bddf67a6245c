"""The reparameterization trick and the analytic KL term of a diagonal Gaussian posterior.

``reparameterize_kl`` is the public op; ``reparameterize_kl_reference`` is its
specification in plain PyTorch. The Triton path is a pair of custom ops
(``fastvae::reparameterize_kl`` and its backward) joined by
``register_autograd``, so ``torch.compile(fullgraph=True)`` sees one opaque op
and no graph break.

The backward reads nothing on the host: in eager mode the Philox seed and
counter of drawn noise are Python ints from the start (reserved before the op
runs); only a traced graph, which cannot know them at trace time, passes them
from the forward to the backward as a small CPU tensor. Under
``create_graph=True`` the backward is computed in torch ops from ``mu``,
``logvar`` and the noise (regenerated bit for bit into a tensor, only then), so
gradients of every order are exact.
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
from fastvae.ops.grad_in_forward import Mode, add_grads, backward_mode, is_tracing
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

    ``philox`` is the reserved state of drawn noise (eager calls). Without
    ``eps`` and ``philox`` (a traced call) the noise comes from the device's
    default generator, read here, inside the op, so that torch.compile traces
    no generator state (the tag keeps compiled graphs from merging two calls).
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


def _launch_backward(grad_z, grad_kl, mu, logvar, eps, seed: int, first_counter: int):
    if mu.numel() == 0:
        return torch.zeros_like(mu, memory_format=torch.contiguous_format), torch.zeros_like(
            logvar, memory_format=torch.contiguous_format
        )
    return _kernels().reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, first_counter)


@torch.library.custom_op("fastvae::reparameterize_kl_backward", mutates_args=())
def _fused_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    philox_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel for a traced graph, which knows the Philox state only as the forward's CPU tensor."""
    seed, first_counter = philox_state.tolist()  # a CPU tensor: no device sync
    return _launch_backward(grad_z, grad_kl, mu, logvar, eps, seed, first_counter)


@_fused_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, eps, philox_state):
    return mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, philox = inputs
    # Eager calls reserve the Philox state outside the op (see reparameterize_kl), so the backward has it as
    # Python ints; a traced one draws it inside, and its backward reads the CPU tensor the op returned.
    ctx.philox = (0, 0) if eps is not None else (tuple(philox) if philox is not None else None)
    ctx.save_for_backward(mu, logvar, eps, output[2])
    # An unused output gets no gradient tensor at all, rather than a buffer of zeros.
    ctx.set_materialize_grads(False)


def _differentiable_backward(grad_z, grad_kl, mu, logvar, eps):
    """``(grad_mu, grad_logvar, grad_eps)`` in float32 torch ops, which autograd records under ``create_graph``."""
    logvar = logvar.float()
    std = torch.exp(0.5 * logvar)
    grad_mu = grad_logvar = grad_eps = None
    if grad_z is not None:
        grad_z = grad_z.float()
        grad_mu, grad_logvar, grad_eps = grad_z, 0.5 * grad_z * eps.float() * std, grad_z * std
    if grad_kl is not None:
        grad_kl = grad_kl.float().unsqueeze(-1)
        grad_mu = add_grads(grad_mu, grad_kl * mu.float(), dtype=torch.float32)
        grad_logvar = add_grads(grad_logvar, 0.5 * grad_kl * (std * std - 1.0), dtype=torch.float32)
    return grad_mu, grad_logvar, grad_eps


def _backward(ctx, grad_z, grad_kl, _grad_philox):
    mu, logvar, eps, philox_state = ctx.saved_tensors
    if grad_z is None and grad_kl is None:
        return None, None, None, None
    mode = backward_mode(mu)
    if mode is Mode.DIFFERENTIABLE:
        # create_graph=True: plain torch ops, so that autograd can differentiate the backward again.
        noise = eps
        if eps is None and grad_z is not None:
            seed, first_counter = ctx.philox if ctx.philox is not None else philox_state.tolist()
            noise = _kernels().draw_noise(mu.shape, mu.device, seed, first_counter)
        grad_mu, grad_logvar, grad_eps = _differentiable_backward(grad_z, grad_kl, mu, logvar, noise)
        grad_eps = grad_eps.to(eps.dtype) if grad_eps is not None and ctx.needs_input_grad[2] else None
        return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype), grad_eps, None
    if mode is Mode.TRACED or ctx.philox is None:
        grad_mu, grad_logvar = _fused_backward(grad_z, grad_kl, mu, logvar, eps, philox_state)
    else:
        grad_mu, grad_logvar = _launch_backward(grad_z, grad_kl, mu, logvar, eps, *ctx.philox)
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

    # The op's schema takes no generator, so an explicit one's Philox state is read here. So is the default
    # generator's in eager mode, which gives the backward the state as Python ints; a traced call must read it
    # inside the op (at run time, not once at trace time).
    philox = None
    if eps is None and (generator is not None or not is_tracing(mu)):
        philox = _reserve_philox(generator, mu)
    z, kl, _ = _fused_forward(mu, logvar, eps, philox)
    return z, reduce_per_sample(kl, reduction)
