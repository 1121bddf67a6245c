"""The reparameterization trick and the analytic KL divergence of a diagonal Gaussian posterior to a prior.

``reparameterize_kl`` is the public op; ``reparameterize_kl_reference`` is its
specification in plain PyTorch. The Triton path is a pair of custom ops
(``fastvae::reparameterize_kl`` and its backward) joined by
``register_autograd``, so ``torch.compile(fullgraph=True)`` sees one opaque op
and no graph break. The prior is N(0, I) by default, or any diagonal Gaussian
that broadcasts to the posterior (a conditional prior per sample, as in
hierarchical VAEs, or a learned one shared by the batch); ``event_dims`` says
how many trailing dims one KL value sums over (3 for latent feature maps).

The backward reads nothing on the host: in eager mode the Philox seed and
counter of drawn noise are Python ints from the start (reserved before the op
runs); only a traced graph, which cannot know them at trace time, passes them
from the forward to the backward as a small CPU tensor. Under CUDA-graph
capture they are drawn on the device instead (:mod:`fastvae.ops.rng`): a
16-byte device tensor that the kernels read, kept for the backward. Under
``create_graph=True`` the backward is computed in torch ops from the saved
inputs and the noise (regenerated bit for bit into a tensor, only then), so
gradients of every order are exact.
"""
from __future__ import annotations

import torch

from fastvae.backend import resolve_backend
from fastvae.ops.checks import (
    REDUCTIONS,
    check_broadcasts_to,
    check_choice,
    check_clamp_range,
    check_float_tensor,
    check_generator,
    check_int_in_range,
    check_positive_number,
    check_same_device,
    check_same_shape,
    compute_dtype,
    reduce_per_sample,
)
from fastvae.ops.grad_in_forward import Mode, add_grads, backward_mode, is_tracing
from fastvae.ops.rng import device_philox_state, needs_device_state, philox_seed_offset
from fastvae.ops.sampling_wiring import (differentiable_input_grads, fake_backward_grads, grad_to_input,
                                          op_input_grads, philox_for_backward, philox_ints, priors_to_differentiate,
                                          unpack_traced_grads, zero_grads)


def soft_clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    """``limit * tanh(x / limit)``: about ``x`` for ``|x|`` well below ``limit``, never beyond ``+-limit``.

    Unlike a hard clamp it keeps a gradient everywhere. ``reparameterize_kl(..., logvar_limit=limit)`` applies it
    to the log-variances inside its kernels.
    """
    return limit * torch.tanh(x / limit)


def _clamp_logvar(x: torch.Tensor, logvar_limit: float | None, logvar_clamp: tuple[float, float] | None):
    """A log-variance through the op's clamp: soft (``logvar_limit``), hard (``logvar_clamp``) or none."""
    if logvar_limit is not None:
        return soft_clamp(x, logvar_limit)
    if logvar_clamp is not None:
        return x.clamp(*logvar_clamp)
    return x


def _through_clamp(grad: torch.Tensor, x: torch.Tensor, clamped: torch.Tensor, logvar_limit: float | None,
                   logvar_clamp: tuple[float, float] | None) -> torch.Tensor:
    """``grad`` of the clamped log-variance (``clamped``) carried back through the clamp to ``x``, in torch ops
    that autograd can differentiate. Hard: torch.clamp's backward, ``grad`` on ``[lo, hi]`` (ends included),
    exactly 0 outside (a NaN ``grad`` there too)."""
    if logvar_limit is not None:
        return grad * (1.0 - (clamped / logvar_limit) ** 2)
    if logvar_clamp is not None:
        lo, hi = logvar_clamp
        return torch.where((x >= lo) & (x <= hi), grad, 0.0)
    return grad


def _event_sum(values: torch.Tensor, event_dims: int) -> torch.Tensor:
    """The sum over the last ``event_dims`` dims."""
    return values.sum(dim=-1) if event_dims == 1 else values.sum(dim=tuple(range(-event_dims, 0)))


def reparameterize_kl_reference(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    reduction: str = "none",
    *,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
    logvar_clamp: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`reparameterize_kl` with ``eps`` given, in plain PyTorch.

    Computes in float32 (float64 when an input is float64), as the kernels do.
    """
    priors = [t for t in (prior_mu, prior_logvar) if t is not None]
    acc = compute_dtype(mu.dtype, logvar.dtype, *(t.dtype for t in priors))
    mu_, logvar_ = mu.to(acc), _clamp_logvar(logvar.to(acc), logvar_limit, logvar_clamp)
    z = (mu_ + torch.exp(0.5 * logvar_) * eps.to(acc)).to(mu.dtype)
    if not priors:
        kl = -0.5 * _event_sum(1 + logvar_ - mu_ * mu_ - torch.exp(logvar_), event_dims)
        return z, reduce_per_sample(kl, reduction)
    diff = mu_ - prior_mu.to(acc) if prior_mu is not None else mu_
    if prior_logvar is None:
        terms = torch.exp(logvar_) + diff * diff - 1 - logvar_
    else:
        prior_logvar_ = _clamp_logvar(prior_logvar.to(acc), logvar_limit, logvar_clamp)
        log_ratio = logvar_ - prior_logvar_
        # Scaled before it is squared: (mu - prior_mu)^2 alone overflows where its ratio to the prior's variance fits.
        scaled_diff = diff * torch.exp(-0.5 * prior_logvar_)
        terms = torch.exp(log_ratio) + scaled_diff * scaled_diff - 1 - log_ratio
    return z, reduce_per_sample(0.5 * _event_sum(terms, event_dims), reduction)


def _kernels():
    # Imported on first use: fastvae imports without Triton, and TRITON_INTERPRET
    # is read when the kernels are defined.
    from fastvae.kernels import reparameterize_kl

    return reparameterize_kl


def _reserve_philox(generator: torch.Generator | None, mu: torch.Tensor, event_dims: int) -> list[int]:
    """Philox ``[seed, first_counter]`` for the noise of one call on ``mu``, taken from ``generator``."""
    return list(philox_seed_offset(generator, mu.device, _kernels().philox_rounds(mu.shape, event_dims)))


def _kl_shape(mu: torch.Tensor, event_dims: int) -> torch.Size:
    return mu.shape[: mu.dim() - event_dims]


@torch.library.custom_op(
    "fastvae::reparameterize_kl", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _fused_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    philox: list[int] | None,
    philox_device: torch.Tensor | None,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    event_dims: int,
    logvar_limit: float | None,
    logvar_clamp: list[float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``z``, the KL per event, and the Philox ``(seed, first_counter)`` as a CPU int64 tensor.

    ``philox`` is the reserved state of drawn noise (eager calls);
    ``philox_device`` one drawn on the device (under CUDA-graph capture), which
    the kernel reads. Without ``eps`` and either (a traced call) the noise
    comes from the device's default generator, read here, inside the op, so
    that torch.compile traces no generator state (the tag keeps compiled graphs
    from merging two calls).
    """
    seed, first_counter = 0, 0
    if eps is None and philox_device is None:
        seed, first_counter = philox if philox is not None else _reserve_philox(None, mu, event_dims)
    philox_state = torch.tensor([seed, first_counter], dtype=torch.int64)
    if mu.numel() == 0:
        z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
        return z, torch.zeros(_kl_shape(mu, event_dims), dtype=torch.float32, device=mu.device), philox_state
    z, kl = _kernels().reparameterize_kl_forward(
        mu, logvar, eps, seed, first_counter,
        prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=event_dims, logvar_limit=logvar_limit,
        logvar_clamp=logvar_clamp, philox_state=philox_device,
    )
    return z, kl, philox_state


@_fused_forward.register_fake
def _(mu, logvar, eps, philox, philox_device, prior_mu, prior_logvar, event_dims, logvar_limit, logvar_clamp):
    z = mu.new_empty(mu.shape)
    kl = mu.new_empty(_kl_shape(mu, event_dims), dtype=torch.float32)
    return z, kl, torch.empty(2, dtype=torch.int64, device="cpu")


def _launch_backward(grad_z, grad_kl, mu, logvar, eps, seed: int, first_counter: int, prior_mu, prior_logvar,
                     event_dims: int, logvar_limit: float | None, logvar_clamp: list[float] | None,
                     prior_grads: tuple[bool, bool], philox_device: torch.Tensor | None = None):
    """The backward kernel's four gradients (``None`` for a prior gradient not asked for); the noise's state is
    ``philox_device`` when given, else ``seed`` and ``first_counter``."""
    wanted = priors_to_differentiate(prior_mu, prior_logvar, prior_grads, grad_kl)
    if mu.numel() == 0:
        return zero_grads(mu, logvar, *wanted)
    return _kernels().reparameterize_kl_backward(
        grad_z, grad_kl, mu, logvar, eps, seed, first_counter,
        prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=event_dims, logvar_limit=logvar_limit,
        logvar_clamp=logvar_clamp, prior_grads=tuple(p is not None for p in wanted), philox_state=philox_device,
    )


@torch.library.custom_op("fastvae::reparameterize_kl_backward", mutates_args=())
def _fused_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    philox_state: torch.Tensor,
    philox_device: torch.Tensor | None,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    event_dims: int,
    logvar_limit: float | None,
    logvar_clamp: list[float] | None,
    grad_prior_mu: bool,
    grad_prior_logvar: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel for a traced graph, which knows the Philox state only as the forward's CPU tensor
    (or as the device tensor that the forward read, when it was drawn on the device).

    Returns the gradients of ``mu``, ``logvar``, ``prior_mu`` and ``prior_logvar``; a prior gradient not asked
    for (or not defined: no prior, no ``grad_kl``) is an empty tensor.
    """
    seed, first_counter = philox_state.tolist() if philox_device is None else (0, 0)  # a CPU tensor: no sync
    grads = _launch_backward(grad_z, grad_kl, mu, logvar, eps, seed, first_counter, prior_mu, prior_logvar,
                             event_dims, logvar_limit, logvar_clamp, (grad_prior_mu, grad_prior_logvar),
                             philox_device)
    return tuple(g if g is not None else mu.new_empty(0) for g in grads)


@_fused_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, eps, philox_state, philox_device, prior_mu, prior_logvar, event_dims,
      logvar_limit, logvar_clamp, grad_prior_mu, grad_prior_logvar):
    return fake_backward_grads(mu, logvar, prior_mu, prior_logvar, (grad_prior_mu, grad_prior_logvar), grad_kl)


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, philox, philox_device, prior_mu, prior_logvar, event_dims, logvar_limit, logvar_clamp = inputs
    ctx.philox = philox_for_backward(eps, philox, philox_device)
    ctx.event_dims, ctx.logvar_limit, ctx.logvar_clamp = event_dims, logvar_limit, logvar_clamp
    ctx.save_for_backward(mu, logvar, eps, prior_mu, prior_logvar, output[2],
                          philox_device if eps is None else None)
    # Autograd would have every output require grad when any input does; as in the reference, z requires grad only
    # through mu, logvar and eps, and the KL only through mu, logvar and the prior.
    def any_requires_grad(*tensors):
        return any(t is not None and t.requires_grad for t in tensors)

    if not any_requires_grad(mu, logvar, eps):
        ctx.mark_non_differentiable(output[0])
    if not any_requires_grad(mu, logvar, prior_mu, prior_logvar):
        ctx.mark_non_differentiable(output[1])
    # An unused output gets no gradient tensor at all, rather than a buffer of zeros.
    ctx.set_materialize_grads(False)


def _differentiable_backward(grad_z, grad_kl, mu, logvar, eps, prior_mu, prior_logvar, event_dims, logvar_limit,
                             logvar_clamp):
    """``(grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar)`` in float32 torch ops, which autograd
    records under ``create_graph`` (the formulas of :mod:`fastvae.kernels.reparameterize_kl`; ``None`` where
    there is no gradient). The prior gradients are per element of ``mu``: the caller sums them to the prior's shape.
    """
    raw = logvar.float()
    logvar = _clamp_logvar(raw, logvar_limit, logvar_clamp)
    std = torch.exp(0.5 * logvar)
    grad_mu = grad_logvar = grad_eps = grad_prior_mu = grad_prior_logvar = None
    if grad_z is not None:
        grad_z = grad_z.float()
        grad_mu, grad_logvar, grad_eps = grad_z, 0.5 * grad_z * eps.float() * std, grad_z * std
    if grad_kl is not None:
        grad_kl = grad_kl.float().reshape(grad_kl.shape + (1,) * event_dims)
        diff = mu.float() - prior_mu.float() if prior_mu is not None else mu.float()
        scaled, ratio = diff, std * std
        if prior_logvar is not None:
            raw_prior = prior_logvar.float()
            prior_logvar = _clamp_logvar(raw_prior, logvar_limit, logvar_clamp)
            # (mu - pmu)^2 e^-plv as the square of (mu - pmu) e^(-plv / 2): no overflow of (mu - pmu)^2 in it, or in
            # its derivatives.
            inv_prior_std = torch.exp(-0.5 * prior_logvar)
            half_scaled = diff * inv_prior_std
            scaled, ratio = half_scaled * inv_prior_std, torch.exp(logvar - prior_logvar)
        else:
            half_scaled = diff
        grad_mu = add_grads(grad_mu, grad_kl * scaled, dtype=torch.float32)
        grad_logvar = add_grads(grad_logvar, 0.5 * grad_kl * (ratio - 1.0), dtype=torch.float32)
        grad_prior_mu = -grad_kl * scaled
        grad_prior_logvar = 0.5 * grad_kl * (1.0 - ratio - half_scaled * half_scaled)
        if prior_logvar is not None:
            grad_prior_logvar = _through_clamp(grad_prior_logvar, raw_prior, prior_logvar, logvar_limit, logvar_clamp)
    grad_logvar = _through_clamp(grad_logvar, raw, logvar, logvar_limit, logvar_clamp)
    return grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar


def _backward(ctx, grad_z, grad_kl, _grad_philox):
    mu, logvar, eps, prior_mu, prior_logvar, philox_state, philox_device = ctx.saved_tensors
    event_dims, limit, clamp = ctx.event_dims, ctx.logvar_limit, ctx.logvar_clamp
    needs = ctx.needs_input_grad
    if grad_z is None and grad_kl is None:
        return (None,) * 10
    mode = backward_mode(mu)
    if mode is Mode.DIFFERENTIABLE:
        # create_graph=True: plain torch ops, so that autograd can differentiate the backward again.
        noise = eps
        if eps is None and grad_z is not None:
            seed, first_counter = philox_ints(ctx.philox, philox_state)
            noise = _kernels().draw_noise(mu.shape, mu.device, seed, first_counter, event_dims,
                                          philox_state=philox_device)
        grads = _differentiable_backward(grad_z, grad_kl, mu, logvar, noise, prior_mu, prior_logvar, event_dims,
                                         limit, clamp)
        return differentiable_input_grads(grads, mu, logvar, eps, prior_mu, prior_logvar, needs)
    prior_grads = (needs[5], needs[6])
    if mode is Mode.TRACED or ctx.philox is None:
        grads = _fused_backward(grad_z, grad_kl, mu, logvar, eps, philox_state, philox_device, prior_mu,
                                prior_logvar, event_dims, limit, clamp, *prior_grads)
        grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar = unpack_traced_grads(grads, prior_grads, grad_kl)
    else:
        grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar = _launch_backward(
            grad_z, grad_kl, mu, logvar, eps, *ctx.philox, prior_mu, prior_logvar, event_dims, limit, clamp,
            prior_grads, philox_device,
        )
    grad_eps = None
    if eps is not None and needs[2] and grad_z is not None:
        clamped = _clamp_logvar(logvar.float(), limit, clamp)
        grad_eps = grad_to_input(grad_z * torch.exp(0.5 * clamped), eps, True)
    return op_input_grads(grad_mu, grad_logvar, grad_eps, grad_prior_mu, grad_prior_logvar)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None = None,
    *,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
    logvar_clamp: tuple[float, float] | None = None,
    reduction: str = "none",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Sample ``z ~ N(mu, exp(logvar))`` by reparameterization, with ``KL(N(mu, exp(logvar)) || prior)``.

    The prior is ``N(prior_mu, exp(prior_logvar))`` (``N(0, I)`` by default).
    With ``lv = logvar`` and ``plv = prior_logvar`` (after the soft clamp, if
    ``logvar_limit`` is given, or the hard one, if ``logvar_clamp`` is), summed over the event:

    .. math::
        z = \mu + e^{lv / 2} \, \epsilon, \qquad
        \mathrm{KL} = \tfrac12 \sum \left(plv - lv + \frac{e^{lv} + (\mu - \mu_p)^2}{e^{plv}} - 1\right)

    which for ``N(0, I)`` is :math:`-\tfrac12 \sum (1 + lv - \mu^2 - e^{lv})`.

    Args:
        mu: ``(*lead, *event)`` posterior means: ``event`` is the last
            ``event_dims`` dims (``(D,)`` by default; ``(C, H, W)`` for latent
            feature maps with ``event_dims=3``). float16, bfloat16, float32
            (float64 on the reference path); any strides: the channel slices of
            a conv output (``h.chunk(2, dim=1)``, ``h[:, :C]``) are read in place.
        logvar: posterior log-variances (``log sigma**2``, not ``log sigma``),
            same shape and device as ``mu``.
        eps: optional standard-normal noise of ``mu``'s shape, used as is.
            ``None`` draws it: in the Triton kernels with Philox (never stored;
            the backward regenerates it), on the reference path with
            ``torch.randn``. If ``eps`` requires grad it gets ``grad_z * exp(lv / 2)``.
            Under CUDA-graph capture (``torch.cuda.graph``) the Philox state is
            drawn on the device by one ``torch.randint`` (16 bytes, kept for the
            backward), which each replay redraws: replays draw fresh noise
            (see :mod:`fastvae.ops.rng`). Outside capture nothing changes.
        prior_mu, prior_logvar: the prior's mean and log-variance, each
            ``None`` (0) or a tensor that broadcasts to ``mu``'s shape: of
            ``mu``'s shape (a conditional prior per sample) or fewer elements (a
            learned prior shared by the batch, ``(D,)`` or ``(C, H, W)``).
            They get gradients, summed over the dims they are broadcast along.
        event_dims: how many trailing dims one KL value sums over, ``1..mu.dim()``.
        logvar_limit: ``L > 0``: ``logvar`` and ``prior_logvar`` pass through
            the soft clamp ``L * tanh(x / L)`` (:func:`soft_clamp`) inside the op;
            ``z`` is drawn with the clamped value and gradients go through the clamp.
        logvar_clamp: ``(lo, hi)``, finite, ``lo < hi``: ``logvar`` and
            ``prior_logvar`` are clamped to ``[lo, hi]`` inside the op, as
            ``torch.clamp`` does (gradient 1 on ``[lo, hi]``, ends included, 0
            outside): diffusers' ``DiagonalGaussianDistribution`` uses
            ``(-30, 20)``. The log-variances are still read where they lie, with
            no extra pass. At most one of ``logvar_limit`` and ``logvar_clamp``.
        reduction: ``"none"`` (KL per event), ``"sum"`` or ``"mean"`` (over the events).
        generator: the generator to draw ``eps`` from (default: torch's default
            generator of the tensors' device), so ``torch.manual_seed`` makes
            runs reproducible.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``; see
            :mod:`fastvae.backend`.

    Returns:
        ``(z, kl)``: ``z`` with ``mu``'s shape and dtype; ``kl`` of shape
        ``mu.shape[:-event_dims]`` (``"none"``) or a scalar, in float32 (float64
        for float64 inputs). Gradients flow to ``mu``, ``logvar`` and the prior from both.
    """
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    if mu.dim() == 0:
        raise ValueError("mu must have shape (..., D) with at least one dimension, got a 0-d tensor")
    check_same_shape("logvar", logvar, "mu", mu)
    if eps is not None:
        check_float_tensor("eps", eps)
        check_same_shape("eps", eps, "mu", mu)
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is not None:
            check_float_tensor(name, prior)
            check_broadcasts_to(name, prior, "mu", mu)
    check_same_device(mu=mu, logvar=logvar, eps=eps, prior_mu=prior_mu, prior_logvar=prior_logvar)
    check_int_in_range("event_dims", event_dims, 1, mu.dim())
    check_positive_number("logvar_limit", logvar_limit)
    logvar_limit = float(logvar_limit) if logvar_limit is not None else None
    check_clamp_range("logvar_clamp", logvar_clamp)
    if logvar_clamp is not None and logvar_limit is not None:
        raise ValueError("give logvar_limit (the soft clamp) or logvar_clamp (the hard clamp), not both")
    logvar_clamp = [float(bound) for bound in logvar_clamp] if logvar_clamp is not None else None
    check_choice("reduction", reduction, REDUCTIONS)
    check_generator(generator, mu.device)
    tensors = {"mu": mu, "logvar": logvar, "eps": eps, "prior_mu": prior_mu, "prior_logvar": prior_logvar}
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}

    if resolve_backend(backend, mu.device, dtypes) == "torch":
        if eps is None:
            acc = compute_dtype(mu.dtype, logvar.dtype)
            eps = torch.randn(mu.shape, generator=generator, dtype=acc, device=mu.device)
        return reparameterize_kl_reference(
            mu, logvar, eps, reduction,
            prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=event_dims, logvar_limit=logvar_limit,
            logvar_clamp=logvar_clamp,
        )

    # The op's schema takes no generator, so an explicit one's Philox state is read here. So is the default
    # generator's in eager mode, which gives the backward the state as Python ints; a traced call must read it
    # inside the op (at run time, not once at trace time). Under CUDA-graph capture the state is drawn on the
    # device, by a capture-aware torch call, so that every replay draws anew.
    philox = philox_device = None
    if eps is None and needs_device_state(mu.device):
        philox_device = device_philox_state(generator, mu.device)
    elif eps is None and (generator is not None or not is_tracing(mu)):
        philox = _reserve_philox(generator, mu, event_dims)
    z, kl, _ = _fused_forward(mu, logvar, eps, philox, philox_device, prior_mu, prior_logvar, event_dims,
                              logvar_limit, logvar_clamp)
    return z, reduce_per_sample(kl, reduction)
