"""Custom-op wiring shared by the ops that draw Gaussian noise in the kernel.

:mod:`fastvae.ops.reparameterize_kl` and :mod:`fastvae.ops.reparameterize_log_ratio` have the same
autograd plumbing around different kernels: the Philox state the backward regenerates the noise from, the
prior gradients a backward computes, the shapes their fake (meta) kernels return, and the gradients summed
back to a broadcast input's shape. It lives here once.

The Philox state reaches the backward in one of three forms:

* eager calls reserve it outside the op (see :func:`fastvae.ops.rng.philox_seed_offset`) and pass it in, so the
  backward holds it as Python ints;
* under CUDA-graph capture it is a device tensor (:func:`fastvae.ops.rng.device_philox_state`) that the
  kernels read themselves: the ints are unused and set to ``(0, 0)``;
* a traced call (torch.compile) draws it inside the op, and its backward reads the small CPU tensor the op
  returned: no ints (``None``).

With a given ``eps`` there is no state at all (``(0, 0)``, unused).
"""
from __future__ import annotations

import torch


def philox_for_backward(eps: torch.Tensor | None, philox: list[int] | None,
                        philox_device: torch.Tensor | None) -> tuple[int, int] | None:
    """The Philox state a backward keeps as Python ints: ``(seed, first_counter)``, ``(0, 0)`` when the
    kernels do not use it (given ``eps``, or a device state), or ``None`` for a traced call, whose backward
    reads the CPU tensor the forward returned (:func:`philox_ints`)."""
    if eps is not None or philox_device is not None:
        return (0, 0)
    return tuple(philox) if philox is not None else None


def philox_ints(kept: tuple[int, int] | None, philox_state: torch.Tensor) -> tuple[int, int]:
    """``(seed, first_counter)``: the ints :func:`philox_for_backward` kept, else the forward's returned state
    (a CPU tensor, so reading it never waits for a device)."""
    return kept if kept is not None else tuple(philox_state.tolist())


def priors_to_differentiate(prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None,
                            prior_grads: tuple[bool, bool], grad_out: torch.Tensor | None) -> list:
    """``[prior_mu, prior_logvar]``, each replaced by ``None`` where its gradient is not computed: no such
    prior, its gradient not asked for, or no gradient of the output the prior enters (the KL, the log ratio)."""
    return [p if (p is not None and needed and grad_out is not None) else None
            for p, needed in zip((prior_mu, prior_logvar), prior_grads)]


def zero_grads(*tensors: torch.Tensor | None) -> tuple:
    """Contiguous zeros shaped like each tensor (``None`` kept): the gradients of an empty input."""
    return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) if t is not None else None
                 for t in tensors)


def fake_backward_grads(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None,
                        prior_logvar: torch.Tensor | None, prior_grads: tuple[bool, bool],
                        grad_out: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The shapes a traced backward op returns: the gradients of ``mu`` and ``logvar``, then each prior's
    gradient, an empty tensor where it is not computed (:func:`priors_to_differentiate`)."""
    priors = priors_to_differentiate(prior_mu, prior_logvar, prior_grads, grad_out)
    return (mu.new_empty(mu.shape), logvar.new_empty(logvar.shape),
            *(p.new_empty(p.shape) if p is not None else mu.new_empty(0) for p in priors))


def unpack_traced_grads(grads: tuple[torch.Tensor, ...], prior_grads: tuple[bool, bool],
                        grad_out: torch.Tensor | None) -> tuple:
    """A traced backward op's four outputs as autograd's gradients: ``None`` for each prior gradient not
    computed (the op returned an empty tensor for it)."""
    grad_mu, grad_logvar, *priors = grads
    computed = [wanted and grad_out is not None for wanted in prior_grads]
    return (grad_mu, grad_logvar, *(g if c else None for g, c in zip(priors, computed)))


def grad_to_input(grad: torch.Tensor | None, tensor: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    """``grad`` (per element of the output) summed to ``tensor``'s shape, in its dtype; ``None`` if not needed."""
    if grad is None or tensor is None or not needed:
        return None
    if grad.shape != tensor.shape:
        grad = grad.sum_to_size(tensor.shape)
    return grad.to(tensor.dtype)


def op_input_grads(grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar) -> tuple:
    """autograd's ten gradients, in the order of both ops' inputs: ``mu, logvar, eps, philox, philox_device,
    prior_mu, prior_logvar`` and three options (no gradient for the state or the options)."""
    return grad_mu, grad_logvar, grad_eps, None, None, grad_prior_mu, grad_prior_logvar, None, None, None


def differentiable_input_grads(grads: tuple, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None,
                               prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None,
                               needs: tuple[bool, ...]) -> tuple:
    """:func:`op_input_grads` from the five per-element gradients of a differentiable backward (``mu``,
    ``logvar``, ``eps``, ``prior_mu``, ``prior_logvar``), each summed to its input's shape and dtype;
    ``needs`` is ``ctx.needs_input_grad``."""
    grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar = grads
    return op_input_grads(
        grad_to_input(grad_mu, mu, True),
        grad_to_input(grad_logvar, logvar, True),
        grad_to_input(grad_eps, eps, needs[2]),
        grad_to_input(grad_prior_mu, prior_mu, needs[5]),
        grad_to_input(grad_prior_logvar, prior_logvar, needs[6]),
    )
