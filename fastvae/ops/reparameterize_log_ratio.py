"""Importance samples of a diagonal Gaussian posterior with their log density ratio to a prior: the latent part of
the IWAE's log weights.

``reparameterize_log_ratio`` is the public op; ``reparameterize_log_ratio_reference``
is its specification in plain PyTorch. The Triton path is a pair of custom ops
(``fastvae::reparameterize_log_ratio`` and its backward) joined by
``register_autograd``, wired as :mod:`fastvae.ops.reparameterize_kl` is (the
same Philox noise, reserved the same ways, regenerated in the backward; the
same modes: eager, traced, CUDA-graph capture, and ``create_graph=True``,
whose backward is torch ops on the noise written out, so every order is exact).

``samples=K`` draws ``K`` samples for each posterior in one call: ``mu`` and
``logvar`` are read in place (their tiles from memory once, from cache for
each further sample), never expanded into copies, and the backward sums their
gradients over the samples in registers.
"""
from __future__ import annotations

import torch

from fastvae.backend import resolve_backend
from fastvae.ops.checks import (
    check_broadcasts_to,
    check_float_tensor,
    check_generator,
    check_int_in_range,
    check_positive_number,
    check_same_device,
    check_same_shape,
    compute_dtype,
)
from fastvae.ops.grad_in_forward import Mode, add_grads, backward_mode, is_tracing
from fastvae.ops.reparameterize_kl import _event_sum, soft_clamp
from fastvae.ops.rng import device_philox_state, needs_device_state, philox_seed_offset
from fastvae.ops.sampling_wiring import (differentiable_input_grads, fake_backward_grads, grad_to_input,
                                          op_input_grads, philox_for_backward, philox_ints, priors_to_differentiate,
                                          unpack_traced_grads, zero_grads)


def _output_shape(mu: torch.Tensor, samples: int | None) -> torch.Size:
    return mu.shape if samples is None else torch.Size((samples, *mu.shape))


def _log_ratio_shape(mu: torch.Tensor, samples: int | None, event_dims: int) -> torch.Size:
    shape = _output_shape(mu, samples)
    return shape[: len(shape) - event_dims]


def reparameterize_log_ratio_reference(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    *,
    samples: int | None = None,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`reparameterize_log_ratio` with ``eps`` given, in plain PyTorch.

    Computes in float32 (float64 when an input is float64), as the kernels do;
    with ``samples``, ``mu`` and ``logvar`` are broadcast against ``eps`` (views, as ``mu.expand`` gives).
    """
    priors = [t for t in (prior_mu, prior_logvar) if t is not None]
    acc = compute_dtype(mu.dtype, logvar.dtype, *(t.dtype for t in priors))
    mu_, logvar_ = mu.to(acc), logvar.to(acc)
    if logvar_limit is not None:
        logvar_ = soft_clamp(logvar_, logvar_limit)
    eps_ = eps.to(acc)
    z = mu_ + torch.exp(0.5 * logvar_) * eps_
    standardized = z - prior_mu.to(acc) if prior_mu is not None else z
    log_ratio = logvar_
    if prior_logvar is not None:
        prior_logvar_ = prior_logvar.to(acc)
        if logvar_limit is not None:
            prior_logvar_ = soft_clamp(prior_logvar_, logvar_limit)
        standardized = standardized * torch.exp(-0.5 * prior_logvar_)
        log_ratio = log_ratio - prior_logvar_
    # log N(z; pmu, e^plv) - log N(z; mu, e^lv): the log(2 pi) terms cancel; eps^2 - t^2 as a product.
    terms = log_ratio + (eps_ - standardized) * (eps_ + standardized)
    return z.to(mu.dtype), 0.5 * _event_sum(terms, event_dims)


def _kernels():
    # Imported on first use: fastvae imports without Triton, and TRITON_INTERPRET is read when the kernels are defined.
    from fastvae.kernels import reparameterize_log_ratio

    return reparameterize_log_ratio


def _noise_kernels():
    from fastvae.kernels import reparameterize_kl

    return reparameterize_kl


def _reserve_philox(generator: torch.Generator | None, mu: torch.Tensor, samples: int | None,
                    event_dims: int) -> list[int]:
    """Philox ``[seed, first_counter]`` for the noise of one call, taken from ``generator``."""
    rounds = _kernels().philox_rounds(mu.shape, samples, event_dims)
    return list(philox_seed_offset(generator, mu.device, rounds))


@torch.library.custom_op(
    "fastvae::reparameterize_log_ratio", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _fused_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    philox: list[int] | None,
    philox_device: torch.Tensor | None,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    samples: int | None,
    event_dims: int,
    logvar_limit: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``z``, the log ratio per row, and the Philox ``(seed, first_counter)`` as a CPU int64 tensor
    (the arguments and the tag as in ``fastvae::reparameterize_kl``)."""
    seed, first_counter = 0, 0
    if eps is None and philox_device is None:
        seed, first_counter = philox if philox is not None else _reserve_philox(None, mu, samples, event_dims)
    philox_state = torch.tensor([seed, first_counter], dtype=torch.int64)
    if mu.numel() == 0:
        z = torch.empty(_output_shape(mu, samples), dtype=mu.dtype, device=mu.device)
        log_ratio = torch.zeros(_log_ratio_shape(mu, samples, event_dims), dtype=torch.float32, device=mu.device)
        return z, log_ratio, philox_state
    z, log_ratio = _kernels().reparameterize_log_ratio_forward(
        mu, logvar, eps, seed, first_counter, samples=samples, prior_mu=prior_mu, prior_logvar=prior_logvar,
        event_dims=event_dims, logvar_limit=logvar_limit, philox_state=philox_device,
    )
    return z, log_ratio, philox_state


@_fused_forward.register_fake
def _(mu, logvar, eps, philox, philox_device, prior_mu, prior_logvar, samples, event_dims, logvar_limit):
    z = mu.new_empty(_output_shape(mu, samples))
    log_ratio = mu.new_empty(_log_ratio_shape(mu, samples, event_dims), dtype=torch.float32)
    return z, log_ratio, torch.empty(2, dtype=torch.int64, device="cpu")


def _launch_backward(grad_z, grad_log_ratio, mu, logvar, eps, seed: int, first_counter: int, prior_mu, prior_logvar,
                     samples, event_dims: int, logvar_limit, prior_grads: tuple[bool, bool], philox_device=None):
    """The backward kernel's four gradients (``None`` for a prior gradient not asked for)."""
    wanted = priors_to_differentiate(prior_mu, prior_logvar, prior_grads, grad_log_ratio)
    if mu.numel() == 0:
        return zero_grads(mu, logvar, *wanted)
    return _kernels().reparameterize_log_ratio_backward(
        grad_z, grad_log_ratio, mu, logvar, eps, seed, first_counter, samples=samples, prior_mu=prior_mu,
        prior_logvar=prior_logvar, event_dims=event_dims, logvar_limit=logvar_limit,
        prior_grads=tuple(p is not None for p in wanted), philox_state=philox_device,
    )


@torch.library.custom_op("fastvae::reparameterize_log_ratio_backward", mutates_args=())
def _fused_backward(
    grad_z: torch.Tensor | None,
    grad_log_ratio: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    philox_state: torch.Tensor,
    philox_device: torch.Tensor | None,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    samples: int | None,
    event_dims: int,
    logvar_limit: float | None,
    grad_prior_mu: bool,
    grad_prior_logvar: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel for a traced graph, which knows the Philox state only as the forward's CPU tensor (or
    the device tensor the forward read). A prior gradient not asked for (or not defined) is an empty tensor."""
    seed, first_counter = philox_state.tolist() if philox_device is None else (0, 0)  # a CPU tensor: no sync
    grads = _launch_backward(grad_z, grad_log_ratio, mu, logvar, eps, seed, first_counter, prior_mu, prior_logvar,
                             samples, event_dims, logvar_limit, (grad_prior_mu, grad_prior_logvar), philox_device)
    return tuple(g if g is not None else mu.new_empty(0) for g in grads)


@_fused_backward.register_fake
def _(grad_z, grad_log_ratio, mu, logvar, eps, philox_state, philox_device, prior_mu, prior_logvar, samples,
      event_dims, logvar_limit, grad_prior_mu, grad_prior_logvar):
    return fake_backward_grads(mu, logvar, prior_mu, prior_logvar, (grad_prior_mu, grad_prior_logvar),
                               grad_log_ratio)


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, philox, philox_device, prior_mu, prior_logvar, samples, event_dims, logvar_limit = inputs
    ctx.philox = philox_for_backward(eps, philox, philox_device)
    ctx.samples, ctx.event_dims, ctx.logvar_limit = samples, event_dims, logvar_limit
    ctx.save_for_backward(mu, logvar, eps, prior_mu, prior_logvar, output[2],
                          philox_device if eps is None else None)
    ctx.set_materialize_grads(False)


def _differentiable_backward(grad_z, grad_log_ratio, mu, logvar, eps, prior_mu, prior_logvar, event_dims,
                             logvar_limit):
    """``(grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar)`` in float32 torch ops, per element of
    the output (the formulas of :mod:`fastvae.kernels.reparameterize_log_ratio`), which autograd records under
    ``create_graph``; ``None`` where there is no gradient. The caller sums each to its input's shape."""
    logvar = logvar.float()
    clamp_slope = prior_clamp_slope = None
    if logvar_limit is not None:
        logvar = soft_clamp(logvar, logvar_limit)
        clamp_slope = 1.0 - (logvar / logvar_limit) ** 2
    std = torch.exp(0.5 * logvar)
    eps = eps.float()
    grad_std_eps = grad_z.float() if grad_z is not None else None  # d(loss)/d(std * eps) with z's own gradient
    grad_logvar = grad_eps = grad_prior_mu = grad_prior_logvar = None
    if grad_log_ratio is not None:
        g = grad_log_ratio.float().reshape(grad_log_ratio.shape + (1,) * event_dims)
        z = mu.float() + std * eps
        t = z - prior_mu.float() if prior_mu is not None else z
        s = t
        if prior_logvar is not None:
            prior_logvar = prior_logvar.float()
            if logvar_limit is not None:
                prior_logvar = soft_clamp(prior_logvar, logvar_limit)
                prior_clamp_slope = 1.0 - (prior_logvar / logvar_limit) ** 2
            inv_sd = torch.exp(-0.5 * prior_logvar)
            t = t * inv_sd
            s = t * inv_sd
        grad_std_eps = add_grads(grad_std_eps, -g * s, dtype=torch.float32)
        grad_logvar = g.expand(grad_std_eps.shape)
        grad_eps = g * eps
        grad_prior_mu = g * s
        grad_prior_logvar = 0.5 * g * (t * t - 1.0)
        if prior_clamp_slope is not None:
            grad_prior_logvar = grad_prior_logvar * prior_clamp_slope
    grad_logvar = 0.5 * add_grads(grad_logvar, std * eps * grad_std_eps, dtype=torch.float32)
    if clamp_slope is not None:
        grad_logvar = grad_logvar * clamp_slope
    grad_eps = add_grads(grad_eps, std * grad_std_eps, dtype=torch.float32)
    return grad_std_eps, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar


def _noise_for_backward(ctx, mu, eps, philox_state, philox_device):
    """The forward's noise as a tensor: ``eps`` itself, or regenerated bit for bit (``create_graph=True`` only)."""
    if eps is not None:
        return eps
    seed, first_counter = philox_ints(ctx.philox, philox_state)
    return _noise_kernels().draw_noise(_output_shape(mu, ctx.samples), mu.device, seed, first_counter,
                                       ctx.event_dims, philox_state=philox_device)


def _backward(ctx, grad_z, grad_log_ratio, _grad_philox):
    mu, logvar, eps, prior_mu, prior_logvar, philox_state, philox_device = ctx.saved_tensors
    samples, event_dims, limit = ctx.samples, ctx.event_dims, ctx.logvar_limit
    needs = ctx.needs_input_grad
    if grad_z is None and grad_log_ratio is None:
        return (None,) * 10
    mode = backward_mode(mu)
    if mode is Mode.DIFFERENTIABLE:
        # create_graph=True: plain torch ops, so that autograd can differentiate the backward again.
        noise = _noise_for_backward(ctx, mu, eps, philox_state, philox_device)
        grads = _differentiable_backward(grad_z, grad_log_ratio, mu, logvar, noise, prior_mu, prior_logvar,
                                         event_dims, limit)
        return differentiable_input_grads(grads, mu, logvar, eps, prior_mu, prior_logvar, needs)
    prior_grads = (needs[5], needs[6])
    if mode is Mode.TRACED or ctx.philox is None:
        grads = _fused_backward(grad_z, grad_log_ratio, mu, logvar, eps, philox_state, philox_device, prior_mu,
                                prior_logvar, samples, event_dims, limit, *prior_grads)
        grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar = unpack_traced_grads(grads, prior_grads,
                                                                                     grad_log_ratio)
    else:
        grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar = _launch_backward(
            grad_z, grad_log_ratio, mu, logvar, eps, *ctx.philox, prior_mu, prior_logvar, samples, event_dims, limit,
            prior_grads, philox_device,
        )
    grad_eps = None
    if eps is not None and needs[2]:  # given noise that requires grad: rare, so in torch ops
        grad_eps = _differentiable_backward(grad_z, grad_log_ratio, mu, logvar, eps, prior_mu, prior_logvar,
                                            event_dims, limit)[2]
        grad_eps = grad_to_input(grad_eps, eps, True)
    return op_input_grads(grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def reparameterize_log_ratio(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    *,
    samples: int | None = None,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Draw ``z ~ N(mu, exp(logvar))`` by reparameterization (``samples`` of them per posterior) with the log
    density ratio ``log p(z) - log q(z)`` of each: the latent part of an importance weight (IWAE).

    The prior ``p`` is ``N(prior_mu, exp(prior_logvar))`` (``N(0, I)`` by
    default), ``q = N(mu, exp(logvar))``. With ``lv = logvar`` and
    ``plv = prior_logvar`` (after the soft clamp, if ``logvar_limit`` is
    given), summed over the event:

    .. math::
        z = \mu + e^{lv / 2} \epsilon, \qquad
        \log \frac{p(z)}{q(z)} = \tfrac12 \sum \left(lv - plv + \epsilon^2 - \frac{(z - \mu_p)^2}{e^{plv}}\right)

    which for ``N(0, I)`` is :math:`\tfrac12 \sum (lv + \epsilon^2 - z^2)`.
    Its mean over the noise is ``-KL(q || p)`` (:func:`~fastvae.functional.reparameterize_kl`);
    with the reconstruction term it is the log weight of the IWAE bound
    :math:`\log \frac1K \sum_k p(x \mid z_k) \frac{p(z_k)}{q(z_k \mid x)}`.

    Gradients are the reparameterized ("total") ones: through ``z`` and
    through both densities, with ``eps`` held fixed, as autograd differentiates
    the formulas above; so the gradient of ``logsumexp`` over the samples of
    ``log_ratio - recon`` is the IWAE estimator of Burda et al. (2016).

    Args:
        mu: ``(*lead, *event)`` posterior means: ``event`` is the last
            ``event_dims`` dims (``(D,)`` by default; ``(C, H, W)`` for latent
            feature maps with ``event_dims=3``). float16, bfloat16, float32
            (float64 on the reference path); any strides, read in place (the
            halves of a linear head, the channel slices of a conv output, or a
            tensor expanded with stride 0, such as ``mu.expand(K, B, D)``).
        logvar: posterior log-variances (``log sigma**2``), ``mu``'s shape and device.
        eps: optional standard-normal noise of ``z``'s shape (any strides), used
            as is; if it requires grad it gets its gradient. ``None`` draws it:
            in the Triton kernels with Philox (never stored; the backward
            regenerates it; the noise ``reparameterize_kl`` would draw for
            ``z``'s shape), on the reference path with ``torch.randn``. Under
            CUDA-graph capture as for ``reparameterize_kl``.
        samples: ``K >= 1``: draw ``K`` samples per posterior in one call;
            ``z`` gets a leading dim of ``K``. ``mu`` and ``logvar`` are then
            read once per sample from the same memory, never copied, and their
            gradients summed over the samples inside the backward kernel.
            ``None`` (default): one sample, no extra dim.
        prior_mu, prior_logvar: the prior's mean and log-variance, each
            ``None`` (0) or a tensor that broadcasts to ``z``'s shape: one per
            sample ``(K, *lead, *event)`` (a hierarchical VAE's prior, which
            depends on the samples above), one per posterior (``mu``'s shape,
            shared by the ``K`` samples), or a learned prior shared by all
            (``event`` or fewer dims). They get gradients, summed over the dims they are broadcast along.
        event_dims: how many trailing dims of ``mu`` one log ratio sums over, ``1..mu.dim()``.
        logvar_limit: ``L > 0``: ``logvar`` and ``prior_logvar`` pass through
            the soft clamp ``L * tanh(x / L)`` inside the op, as in ``reparameterize_kl``.
        generator: the generator to draw ``eps`` from (default: the device's default generator).
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``; see :mod:`fastvae.backend`.

    Returns:
        ``(z, log_ratio)``: ``z`` of shape ``(K, *lead, *event)`` (``samples=K``)
        or ``mu``'s shape, in ``mu``'s dtype; ``log_ratio`` of ``z``'s shape
        without the event dims, float32 (float64 for float64 inputs).
    """
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    if mu.dim() == 0:
        raise ValueError("mu must have shape (..., D) with at least one dimension, got a 0-d tensor")
    check_same_shape("logvar", logvar, "mu", mu)
    if samples is not None:
        check_int_in_range("samples", samples, 1, 2**31 - 1)
    shape = _output_shape(mu, samples)
    reference = torch.empty(shape, device="meta")
    if eps is not None:
        check_float_tensor("eps", eps)
        if eps.shape != shape:
            raise ValueError(f"eps must have the shape of z, {tuple(shape)} (samples, then mu's shape), "
                             f"got {tuple(eps.shape)}")
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is not None:
            check_float_tensor(name, prior)
            check_broadcasts_to(name, prior, "z", reference)
    check_same_device(mu=mu, logvar=logvar, eps=eps, prior_mu=prior_mu, prior_logvar=prior_logvar)
    check_int_in_range("event_dims", event_dims, 1, mu.dim())
    check_positive_number("logvar_limit", logvar_limit)
    logvar_limit = float(logvar_limit) if logvar_limit is not None else None
    check_generator(generator, mu.device)
    tensors = {"mu": mu, "logvar": logvar, "eps": eps, "prior_mu": prior_mu, "prior_logvar": prior_logvar}
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}

    if resolve_backend(backend, mu.device, dtypes) == "torch":
        if eps is None:
            eps = torch.randn(shape, generator=generator, dtype=compute_dtype(mu.dtype, logvar.dtype), device=mu.device)
        return reparameterize_log_ratio_reference(
            mu, logvar, eps, samples=samples, prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=event_dims,
            logvar_limit=logvar_limit,
        )

    # The Philox state, as reparameterize_kl takes it: read here for an explicit generator and for eager calls,
    # inside the op for a traced one, drawn on the device under CUDA-graph capture.
    philox = philox_device = None
    if eps is None and needs_device_state(mu.device):
        philox_device = device_philox_state(generator, mu.device)
    elif eps is None and (generator is not None or not is_tracing(mu)):
        philox = _reserve_philox(generator, mu, samples, event_dims)
    z, log_ratio, _ = _fused_forward(mu, logvar, eps, philox, philox_device, prior_mu, prior_logvar, samples,
                                     event_dims, logvar_limit)
    return z, log_ratio
