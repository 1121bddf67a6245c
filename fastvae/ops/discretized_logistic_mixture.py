"""The discretized mixture of logistics (DMOL): its negative log-likelihood, and sampling from it.

``discretized_logistic_mixture_nll`` is the public op;
``discretized_logistic_mixture_nll_reference`` is its specification in plain
PyTorch. The Triton path is the custom op
``fastvae::discretized_logistic_mixture_nll``, whose forward returns the nll
together with its gradient in ``params`` (written in the same pass, see
:mod:`fastvae.kernels.discretized_logistic_mixture`), joined by
``register_autograd`` to a backward that applies the upstream gradient as
:mod:`fastvae.ops.grad_in_forward` says (handed over and scaled in place when
it owns the saved gradient, which for ``loss.backward()`` costs no pass; a new
tensor for a retained or traced graph), so ``torch.compile(fullgraph=True)``
sees opaque ops and no graph break. Under ``create_graph=True`` the backward
differentiates the reference at the saved inputs instead.
``sample_discretized_logistic_mixture`` and ``discretized_logistic_mixture_mode``
draw images from the same parameters, in plain PyTorch.

Parameter layout, ``params`` of shape ``(B, P, ...)`` with ``M`` channels per
block and ``P = M (1 + 2C + C(C-1)/2) = M (C + 1)(C + 2) / 2``:
``[logits | means c = 0..C-1 | log-scales c = 0..C-1 | coefficients of the
pairs (1,0), (2,0), (2,1), (3,0), ...]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvae.backend import resolve_backend
from fastvae.ops.grad_in_forward import Mode, apply_upstream, backward_mode
from fastvae.ops.checks import (
    REDUCTIONS,
    check_choice,
    check_flag,
    check_float_tensor,
    check_generator,
    check_same_device,
    compute_dtype,
    reduce_per_sample,
    reduced_with_per_sample,
)

MIN_LOG_SCALE = -7.0
MAX_NUM_BITS = 16
# The most bits whose levels k / (2^b - 1) an x of this dtype holds apart: each, rounded to the dtype, is read
# back as k. bfloat16 (8 significant bits) misreads 511 of the 1,024 levels of 10 bits; float16 (11) those of 12.
# float32 and float64 hold all 16.
MAX_BITS_OF_X = {torch.bfloat16: 8, torch.float16: 11}
# torch's softplus returns z itself above its threshold (20 by default, off by e^-20 = 2e-9: exact in float32,
# not in float64); above 40 the gap, e^-40 < 1e-17 z, is below float64's rounding too.
SOFTPLUS_THRESHOLD = 40.0


def params_per_component(channels: int) -> int:
    """Parameter channels per mixture component for ``channels`` image channels: ``1 + 2C + C(C-1)/2``."""
    return 1 + 2 * channels + channels * (channels - 1) // 2


def _pair(c: int, j: int) -> int:
    """Index of the coefficient of channel ``c`` on channel ``j < c``: pairs (1,0), (2,0), (2,1), (3,0), ..."""
    return c * (c - 1) // 2 + j


def _check_positive_int(name: str, value: object, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1 or (high is not None and value > high):
        bounds = f"from 1 to {high}" if high is not None else "at least 1"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def check_image_channels(channels: object) -> None:
    """``channels``, a count of image channels, must be an int >= 1."""
    _check_positive_int("channels", channels)


def check_settings(num_mixtures: object, num_bits: object) -> None:
    """``num_mixtures`` must be an int >= 1 and ``num_bits`` one from 1 to 16."""
    _check_positive_int("num_mixtures", num_mixtures)
    _check_positive_int("num_bits", num_bits, MAX_NUM_BITS)


def image_channels(params: torch.Tensor, num_mixtures: int) -> int:
    """The number of image channels ``C`` that ``params`` ``(B, P, ...)`` holds parameters for.

    Raises ``ValueError`` when ``P`` is not ``num_mixtures * (C + 1)(C + 2) / 2`` for any ``C``.
    """
    if params.dim() < 2:
        raise ValueError(f"params must have shape (B, P, ...), got {tuple(params.shape)}")
    n_params = params.shape[1]
    per_component = n_params // num_mixtures
    channels = round((math.sqrt(8 * per_component + 1) - 3) / 2) if per_component >= 3 else 0
    if channels < 1 or n_params != num_mixtures * params_per_component(channels):
        raise ValueError(
            f"params has {n_params} channels, which is not num_mixtures * (1 + 2C + C(C-1)/2) for any image "
            f"channel count C: with num_mixtures={num_mixtures} that is {3 * num_mixtures} for C = 1, "
            f"{6 * num_mixtures} for C = 2, {10 * num_mixtures} for C = 3"
        )
    return channels


def _check_nll_inputs(params: object, x: object, num_mixtures: object, num_bits: object) -> None:
    check_float_tensor("params", params)
    check_float_tensor("x", x)
    check_settings(num_mixtures, num_bits)
    _check_levels_fit(x.dtype, num_bits)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, C, ...) with the channels second, got {tuple(x.shape)}")
    channels = x.shape[1]
    if channels < 1:
        raise ValueError("x must have at least one channel, got C = 0")
    if params.dim() != x.dim() or params.shape[0] != x.shape[0] or params.shape[2:] != x.shape[2:]:
        want = (x.shape[0], num_mixtures * params_per_component(channels), *x.shape[2:])
        raise ValueError(
            f"params must have shape (B, P, ...) with x's batch and trailing dims, {want}, got {tuple(params.shape)}"
        )
    _check_params_channels(params, num_mixtures, channels, f"x's C = {channels}")
    check_same_device(params=params, x=x)


def _check_levels_fit(x_dtype: torch.dtype, num_bits: int) -> None:
    """``x``'s dtype must hold the ``2**num_bits`` levels apart (:data:`MAX_BITS_OF_X`), or its nll would be that
    of other images."""
    limit = MAX_BITS_OF_X.get(x_dtype)
    if limit is not None and num_bits > limit:
        name = str(x_dtype).removeprefix("torch.")
        raise ValueError(
            f"x is {name}, which cannot hold the {2**num_bits} levels of num_bits={num_bits} apart (it holds those "
            f"of up to {limit} bits; nearby levels would be read as one): pass x as float32"
        )


def _check_params_channels(params: torch.Tensor, num_mixtures: int, channels: int, said_by: str) -> None:
    """``params`` ``(B, P, ...)`` must hold ``P = M (1 + 2C + C(C-1)/2)`` channels for ``C = channels`` image
    channels (as ``said_by`` gives them, for the message)."""
    expected = num_mixtures * params_per_component(channels)
    if params.shape[1] != expected:
        raise ValueError(
            f"params has {params.shape[1]} channels, but num_mixtures={num_mixtures} with {said_by} "
            f"needs P = M * (1 + 2C + C(C-1)/2) = {expected}"
        )


def _split(params: torch.Tensor, num_mixtures: int, channels: int):
    """``params`` ``(B, P, N)`` as logits ``(B, M, N)``, means and log-scales ``(B, C, M, N)``, raw coefficients."""
    m = num_mixtures
    pairs = channels * (channels - 1) // 2
    logits, means, log_scales, coefs = params.split([m, channels * m, channels * m, pairs * m], dim=1)
    means, log_scales = means.unflatten(1, (channels, m)), log_scales.unflatten(1, (channels, m))
    return logits, means, log_scales, coefs.unflatten(1, (pairs, m))


def _conditional_mean(means: torch.Tensor, tanh_coefs: torch.Tensor, y: list[torch.Tensor], c: int) -> torch.Tensor:
    """Channel ``c``'s mean: ``mu_c + sum_{j<c} tanh(coef_(c,j)) y_j``, ``y`` the earlier channels' values."""
    mean = means[:, c]
    for j in range(c):
        mean = mean + tanh_coefs[:, _pair(c, j)] * y[j]
    return mean


def _levels(x: torch.Tensor, num_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The level ``clamp(round(x * (2**num_bits - 1)), 0, 2**num_bits - 1)`` of each value, in ``dtype``."""
    max_level = 2**num_bits - 1
    return torch.round(x.to(dtype) * max_level).clamp(0, max_level)


def _as_pixels(params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``params`` ``(B, P, ...)`` as ``(B, P, N)`` in ``dtype``, ``N`` the product of the trailing dims."""
    return params.to(dtype).reshape(params.shape[0], params.shape[1], math.prod(params.shape[2:]))


# Above this u (a bin narrow against its logistic), log(1 - e^u) = log(-u) + u/2 + u^2/24 + ... is taken as
# log(-u) + u/2: off by less than 5e-16, below float64's rounding of a value beyond |log 1e-7| = 16.
SERIES_ABOVE = -1e-7


def _log_one_minus_exp(u: torch.Tensor, log_minus_u: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^u)`` for ``u <= 0``, given ``log(-u)``: to the dtype's rounding of the nll it is added to, and
    finite with finite derivatives of every order, for any ``u``, one that underflowed to 0 included.

    ``log(-expm1(u))``, then, where ``e^u`` nears 1 (a wide logistic; in
    float32 it rounds to 1 from ``|u| < 3e-8``, and ``log(-expm1(u))``'s
    gradient ``1 / expm1(u)`` overflows), ``log(-u) + u/2``, with ``log(-u)``
    given exactly. ``where`` passes a zero gradient through the form it does
    not take, and ``0 * inf`` is NaN, so ``log(-expm1(u))`` is fed a harmless
    ``u`` there. (Far below ``-log 2`` ``log(-expm1(u))`` rounds to 0, off by
    ``e^u``: below the rounding of the sum it goes into, as its gradient's
    error is below that of the other terms'.)
    """
    series = u > SERIES_ABOVE
    return torch.where(series, log_minus_u + 0.5 * u, torch.log(-torch.expm1(torch.where(series, SERIES_ABOVE, u))))


def discretized_logistic_mixture_nll_reference(
    params: torch.Tensor,
    x: torch.Tensor,
    num_mixtures: int,
    num_bits: int = 8,
    reduction: str = "none",
) -> torch.Tensor:
    """The specification of :func:`discretized_logistic_mixture_nll`, in plain PyTorch (float32 or float64 math).

    Differentiable twice and more by autograd, with finite derivatives at any
    finite scale; the clamp of the log-scale at -7 passes the gradient where
    ``log_scale >= -7`` (``torch.clamp``'s rule).
    """
    acc = compute_dtype(params.dtype, x.dtype)
    batch, channels = x.shape[:2]
    max_level = 2**num_bits - 1
    h = 1.0 / max_level
    logits, means, log_scales, coefs = _split(_as_pixels(params, acc), num_mixtures, channels)
    level = _levels(x, num_bits, acc).reshape(batch, channels, 1, math.prod(x.shape[2:]))
    y = level * (2 * h) - 1
    tanh_coefs = torch.tanh(coefs)
    ys = [y[:, j] for j in range(channels)]
    mean = torch.stack([_conditional_mean(means, tanh_coefs, ys, c) for c in range(channels)], dim=1)
    s = log_scales.clamp(min=MIN_LOG_SCALE)
    inv = torch.exp(-s)
    a = inv * (y - h - mean)
    b = inv * (y + h - mean)
    log_cdf_upper = -F.softplus(-b, threshold=SOFTPLUS_THRESHOLD)  # log F(y + h)
    log_survival_lower = -F.softplus(a, threshold=SOFTPLUS_THRESHOLD)  # log(1 - F(y - h))
    # log(F(y + h) - F(y - h)), without the difference: sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a-b)),
    # with a - b = -2 h inv, whose log is exact even where inv underflows.
    interior = log_cdf_upper + log_survival_lower + _log_one_minus_exp(-2 * h * inv, math.log(2 * h) - s)
    log_mass = torch.where(level == 0, log_cdf_upper, torch.where(level == max_level, log_survival_lower, interior))
    log_joint = F.log_softmax(logits, dim=1) + log_mass.sum(dim=1)
    nll = -torch.logsumexp(log_joint, dim=1).sum(dim=1)
    return reduce_per_sample(nll, reduction)


def _kernels():
    # Imported on first use: fastvae imports without Triton, and TRITON_INTERPRET
    # is read when the kernels are defined.
    from fastvae.kernels import discretized_logistic_mixture

    return discretized_logistic_mixture


@torch.library.custom_op("fastvae::discretized_logistic_mixture_nll", mutates_args=())
def _fused_forward(
    params: torch.Tensor, x: torch.Tensor, num_mixtures: int, num_bits: int, reduction: str, grad_params: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduced nll, the per-sample nll it was reduced from (``(B,)``, not differentiable; an empty tensor for
    ``reduction="none"``), and, if ``grad_params``, its gradient in ``params`` (contiguous; else an empty tensor).

    The gradient is that of the nll as returned (``1 / B`` folded in for
    ``reduction="mean"``), before the upstream gradient.
    """
    batch = params.shape[0]
    if params.numel() == 0:
        per_sample = params.new_zeros(batch, dtype=torch.float32)
        grad = torch.zeros(params.shape, dtype=params.dtype, device=params.device)
    else:
        per_sample, grad = _kernels().discretized_logistic_mixture_forward(
            params, x, num_mixtures, num_bits, write_grad=grad_params,
            # The mean over samples is folded into the gradient here, for free.
            grad_scale=1.0 / batch if reduction == "mean" else 1.0,
        )
    return (
        reduce_per_sample(per_sample, reduction),
        per_sample if reduction != "none" else per_sample.new_empty(0),
        grad if grad_params else params.new_empty(0),
    )


@_fused_forward.register_fake
def _(params, x, num_mixtures, num_bits, reduction, grad_params):
    loss = params.new_empty(() if reduction != "none" else params.shape[:1], dtype=torch.float32)
    per_sample = params.new_empty(params.shape[:1] if reduction != "none" else (0,), dtype=torch.float32)
    return loss, per_sample, params.new_empty(params.shape) if grad_params else params.new_empty(0)


def _differentiable_grad(ctx, params: torch.Tensor, x: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The gradient in ``params`` as a differentiable function of ``params`` and ``grad_loss`` (``create_graph``).

    The Hessian is not recoverable from the saved gradient, so the reference
    is differentiated at the saved inputs, building the graph a second
    derivative goes through.
    """
    loss = discretized_logistic_mixture_nll_reference(params, x, ctx.num_mixtures, ctx.num_bits, ctx.reduction)
    (grad,) = torch.autograd.grad(loss, params, grad_loss, create_graph=True)
    return grad


def _setup_context(ctx, inputs, output):
    params, x, num_mixtures, num_bits, reduction, _ = inputs
    _, per_sample, grad = output
    # References, not copies: params and x only for a backward under create_graph=True.
    ctx.save_for_backward(grad, params, x)
    ctx.mark_non_differentiable(per_sample, grad)
    # The gradient output is never used: no zero-filled gradient for it.
    ctx.set_materialize_grads(False)
    ctx.num_mixtures, ctx.num_bits, ctx.reduction = num_mixtures, num_bits, reduction


def _backward(ctx, grad_loss, _grad_per_sample, _unused):
    saved_grad, params, x = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    mode = backward_mode(grad_loss)
    if mode is Mode.DIFFERENTIABLE:  # create_graph=True: the reference's graph carries the higher orders
        grad_params = _differentiable_grad(ctx, params, x, grad_loss)
    else:  # handed over and scaled in place (skipping weights of 1), or a new tensor for a kept or traced graph
        grad_params = apply_upstream(saved_grad, grad_loss, mode)
    return grad_params, None, None, None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def discretized_logistic_mixture_nll(
    params: torch.Tensor,
    x: torch.Tensor,
    *,
    num_mixtures: int,
    num_bits: int = 8,
    reduction: str = "none",
    backend: str | None = None,
    return_per_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Negative log-likelihood of images ``x`` under a discretized mixture of logistics, in nats per sample.

    Each value of ``x`` is read as the level ``k = clamp(round(x (2^b - 1)), 0, 2^b - 1)``
    (``b = num_bits``) and placed at ``y = 2 k h - 1`` in [-1, 1], ``h = 1 / (2^b - 1)``
    the half-width of a bin. Per pixel, with ``M = num_mixtures`` components and
    the channels conditioned on the observed values of those before them:

    .. math::
        \mathrm{mean}_{c,m} = \mu_{c,m} + \sum_{j<c} \tanh(\alpha_{(c,j),m})\, y_j, \qquad
        s_{c,m} = \max(\log\text{-scale}_{c,m}, -7)

        p(\text{pixel}) = \sum_m \mathrm{softmax}(l)_m \prod_c
            \big[F_{c,m}(y_c + h) - F_{c,m}(y_c - h)\big], \quad
        F_{c,m}(t) = \sigma\big(e^{-s_{c,m}} (t - \mathrm{mean}_{c,m})\big)

    where the lowest level's bin reaches down to -inf (``F(y - h) = 0``) and the
    highest's up to +inf (``F(y + h) = 1``). The log of a bin's mass is taken
    without the difference of sigmoids (see
    :mod:`fastvae.kernels.discretized_logistic_mixture`), so it keeps float32's
    accuracy for any mean and any scale from ``e^-7`` up (log-scales of 50 and
    beyond: logistics far wider than the bins), with finite gradients of every
    order on both paths.

    Args:
        params: ``(B, P, ...)`` with ``P = M (1 + 2C + C(C-1)/2)`` (3M for one
            channel, 10M for RGB): ``[logits | means | log-scales | coefficients]``,
            M channels per block (means and log-scales one block per image
            channel, coefficients one per pair (1,0), (2,0), (2,1), (3,0), ...).
            float16, bfloat16, float32 (float64 on the reference path); any
            strides: a channel slice of a larger conv output is read in place.
        x: ``(B, C, ...)`` images with ``params``' trailing dims, floats in [0, 1];
            any float dtype that holds the levels apart (``ValueError`` otherwise:
            bfloat16 up to 8 bits, float16 up to 11, float32 and float64 all).
            ``x`` gets no gradient (its level is a step function of it).
        num_mixtures: ``M >= 1``.
        num_bits: bits per value, 1 to 16 (8 for 256 levels).
        reduction: ``"none"``: the nll per sample, ``(B,)``; ``"sum"``: its sum;
            ``"mean"``: its mean over samples.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``; see :mod:`fastvae.backend`.
        return_per_sample: also return the per-sample nll the loss was reduced
            from, ``(B,)``, detached: ``(nll, per_sample)``, as
            :func:`~fastvae.functional.reconstruction_loss` does (with
            ``reduction="mean"``, a model's loss whose backward needs no pass).

    Returns:
        float32 nll in nats (float64 on the reference path for float64 inputs).
        Its gradient flows to ``params``, in ``params``' dtype.

    On the Triton path one kernel sums the nll and, when ``params`` requires
    grad (and grad mode is on), writes ``d nll / d params`` into a new buffer in
    the same pass; the backward applies the upstream gradient to it, reading it
    on the device (no host sync): a plain ``backward()`` takes the buffer over
    and scales it in place, skipping the samples whose upstream gradient is
    exactly 1 (``loss.backward()`` of a ``"sum"`` or ``"mean"`` loss: no pass at
    all), and a retained or traced graph writes a new gradient each time, so no
    two gradients share memory. The forward keeps that buffer (one value per parameter) and
    references to ``params`` and ``x`` for the backward: a backward under
    ``create_graph=True`` differentiates the reference at them, for correct
    higher-order gradients.
    """
    _check_nll_inputs(params, x, num_mixtures, num_bits)
    check_choice("reduction", reduction, REDUCTIONS)
    check_flag("return_per_sample", return_per_sample)
    if resolve_backend(backend, params.device, {"params": params.dtype, "x": x.dtype}) == "torch":
        if not return_per_sample:
            return discretized_logistic_mixture_nll_reference(params, x, num_mixtures, num_bits, reduction)
        per_sample = discretized_logistic_mixture_nll_reference(params, x, num_mixtures, num_bits, "none")
        return reduced_with_per_sample(reduce_per_sample(per_sample, reduction), per_sample, reduction)
    grad_params = torch.is_grad_enabled() and params.requires_grad
    loss, per_sample, _ = _fused_forward(params, x, num_mixtures, num_bits, reduction, grad_params)
    return reduced_with_per_sample(loss, per_sample, reduction) if return_per_sample else loss


# ---- drawing images ----------------------------------------------------------------------------------


def _check_draw_inputs(params: object, num_mixtures: object, num_bits: object, channels: object) -> int:
    """The image channels ``C`` to draw: ``channels`` checked against ``params``, or, if ``None``, read off them."""
    check_float_tensor("params", params)
    check_settings(num_mixtures, num_bits)
    if channels is None:
        return image_channels(params, num_mixtures)
    check_image_channels(channels)
    if params.dim() < 2:
        raise ValueError(f"params must have shape (B, P, ...), got {tuple(params.shape)}")
    _check_params_channels(params, num_mixtures, channels, f"channels={channels}")
    return channels


def _draw_levels(
    params: torch.Tensor,
    num_mixtures: int,
    num_bits: int,
    channels: int,
    component: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Values channel by channel from component ``component`` ``(B, 1, N)`` of ``params`` ``(B, P, N)``.

    Each channel's mean uses the levels drawn before it. ``noise`` ``(B, C, N)``
    holds standard logistic draws; ``None`` takes the most probable level of
    each channel instead, the one nearest its mean. Returns
    ``level / (2**num_bits - 1)``, ``(B, C, N)``.
    """
    max_level = 2**num_bits - 1
    _, means, log_scales, coefs = _split(params, num_mixtures, channels)

    def chosen(t: torch.Tensor) -> torch.Tensor:  # (B, K, M, N) -> (B, K, N): the chosen component's values
        return t.gather(2, component[:, None].expand(-1, t.shape[1], -1, -1)).squeeze(2)

    means, log_scales, tanh_coefs = chosen(means), chosen(log_scales), torch.tanh(chosen(coefs))
    ys, levels = [], []
    for c in range(channels):
        value = _conditional_mean(means, tanh_coefs, ys, c)
        if noise is not None:
            value = value + torch.exp(log_scales[:, c].clamp(min=MIN_LOG_SCALE)) * noise[:, c]
        # The bin that holds the value: the nearest level, the edge bins reaching to +-inf.
        level = torch.round((value + 1) * (max_level / 2)).clamp(0, max_level)
        levels.append(level)
        ys.append(level * (2 / max_level) - 1)
    return torch.stack(levels, dim=1) / max_level


@torch.no_grad()
def sample_discretized_logistic_mixture(
    params: torch.Tensor,
    *,
    num_mixtures: int,
    num_bits: int = 8,
    channels: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw images from the mixture: ``(B, C, ...)`` in [0, 1] on the level grid ``k / (2**num_bits - 1)``.

    Per pixel: a component from ``softmax(logits)`` (Gumbel-max), then each
    channel in order from its logistic, rounded to its level (the bin the draw
    falls in), later channels' means using the earlier channels' drawn levels:
    an exact sample of the distribution :func:`discretized_logistic_mixture_nll`
    scores. float32 (float64 for float64 ``params``); no gradient.

    Args:
        params: ``(B, P, ...)`` as for :func:`discretized_logistic_mixture_nll`.
        num_mixtures, num_bits: as for the nll.
        channels: the image channels ``C``, checked against ``P`` (``ValueError``
            if ``P != M (1 + 2C + C(C-1)/2)``). ``None``: ``C`` follows from ``P``
            and ``num_mixtures``, which cannot tell a wrong ``num_mixtures``
            (30 channels are RGB at M = 3 and greyscale at M = 10).
        generator: the random generator (default: torch's, of ``params``' device).
    """
    channels = _check_draw_inputs(params, num_mixtures, num_bits, channels)
    check_generator(generator, params.device)
    p = _as_pixels(params, compute_dtype(params.dtype))
    batch, n = p.shape[0], p.shape[2]

    def uniform(rows: int) -> torch.Tensor:  # in (0, 1): the logs below stay finite
        u = torch.rand(batch, rows, n, generator=generator, dtype=p.dtype, device=p.device)
        return u.clamp_(min=torch.finfo(p.dtype).tiny)

    gumbel = -torch.log(-torch.log(uniform(num_mixtures)))
    component = (p[:, :num_mixtures] + gumbel).argmax(dim=1, keepdim=True)
    u = uniform(channels)
    logistic = torch.log(u) - torch.log1p(-u)
    x = _draw_levels(p, num_mixtures, num_bits, channels, component, logistic)
    return x.reshape(batch, channels, *params.shape[2:])


@torch.no_grad()
def discretized_logistic_mixture_mode(
    params: torch.Tensor, *, num_mixtures: int, num_bits: int = 8, channels: int | None = None
) -> torch.Tensor:
    """A deterministic image from the mixture: ``(B, C, ...)`` in [0, 1], for showing reconstructions.

    Per pixel: the component with the largest logit, then channel by channel
    the level nearest its mean given the levels chosen before it (the most
    probable level of that logistic). This is the mode of the most probable
    component, not the exact mode of the mixture (which has no closed form);
    unlike the mixture's mean it never averages components into a colour none
    of them predicts, the blur the mixture is there to avoid. ``channels``: as
    for :func:`sample_discretized_logistic_mixture`.
    """
    channels = _check_draw_inputs(params, num_mixtures, num_bits, channels)
    p = _as_pixels(params, compute_dtype(params.dtype))
    component = p[:, :num_mixtures].argmax(dim=1, keepdim=True)
    x = _draw_levels(p, num_mixtures, num_bits, channels, component, None)
    return x.reshape(params.shape[0], channels, *params.shape[2:])
