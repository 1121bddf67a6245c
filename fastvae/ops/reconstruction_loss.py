"""Reconstruction losses of the ELBO, reduced per sample.

``reconstruction_loss`` is the public op; ``reconstruction_loss_reference`` is
its specification in plain PyTorch. The Triton path is the custom op
``fastvae::reconstruction_loss``, whose forward returns the loss together with
the gradients of its inputs (written in the same pass, see
:mod:`fastvae.kernels.reconstruction_loss`), joined by ``register_autograd`` to
a backward that only applies the upstream gradient, as
:mod:`fastvae.ops.grad_in_forward` says: in place when it owns the saved
gradient, out of place for a retained or traced graph
(``fastvae::scale_per_sample``, so ``torch.compile(fullgraph=True)`` sees
opaque ops and no graph break), in torch ops under ``create_graph=True``. The
saved gradients are differentiable outputs of the op: a double backward reaches
this backward with their gradients, and adds the Hessian-vector products
(:func:`_hessian_vector_products`), so every order is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastvae.backend import resolve_backend
from fastvae.ops.grad_in_forward import add_grads, apply_upstream, backward_mode
from fastvae.ops.checks import (
    REDUCTIONS,
    check_broadcasts_to,
    check_choice,
    check_flag,
    check_float_tensor,
    check_same_device,
    check_same_shape,
    compute_dtype,
    reduce_per_sample,
    reduced_with_per_sample,
)

KINDS = ("mse", "bce", "gaussian", "l1")
LOG_2PI = math.log(2 * math.pi)


# softplus(l) is l above this (e^-40 is below half an ulp of 40 in float64 as in float32), and e^l does not overflow.
SOFTPLUS_LINEAR_ABOVE = 40.0


def _bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``softplus(logits) - logits * x`` per element, and its limit where a logit is infinite.

    The smooth form gives autograd the exact gradient ``sigmoid(logits) - x``
    everywhere, 0 included, and every higher derivative (the usual
    ``max(l, 0) + log1p(e^-|l|)`` has kinks at 0, where autograd takes one
    side's gradient: ``1 - x`` instead of ``0.5 - x``). At ``l = +-inf`` it
    would be ``inf - inf``; the limit is ``|l|`` times ``1 - x`` (``l = +inf``)
    or ``x`` (``-inf``): ``+inf``, or 0 where that factor is 0 (``x`` gets a
    gradient of 0 there, as ``torch.xlogy`` gives).
    """
    infinite = logits.isinf()
    # The finite stand-in keeps the unused branch's gradient finite (where() passes it a zero, and 0 * inf is NaN).
    finite = torch.where(infinite, 0.0, logits)
    smooth = F.softplus(finite, threshold=SOFTPLUS_LINEAR_ABOVE) - finite * x
    factor = torch.where(logits > 0, 1 - x, x)
    limit = factor * torch.where(factor == 0, 0.0, logits.abs())
    return torch.where(infinite, limit, smooth)


def reconstruction_loss_reference(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    kind: str = "mse",
    reduction: str = "none",
    logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """The specification of :func:`reconstruction_loss`, in plain PyTorch (float32 or float64 math)."""
    acc = compute_dtype(x_hat.dtype, x.dtype)
    x_hat_, x_ = x_hat.to(acc), x.to(acc)
    if kind == "mse":
        loss = (x_hat_ - x_) ** 2
    elif kind == "l1":
        loss = (x_hat_ - x_).abs()
    elif kind == "bce":
        loss = _bernoulli_nll(x_hat_, x_)
    else:
        logvar_ = logvar.to(acc)
        # Scaled before it is squared: (x - x_hat)^2 alone overflows where its ratio to the variance fits.
        scaled = (x_ - x_hat_) * torch.exp(-0.5 * logvar_)
        loss = 0.5 * (scaled**2 + logvar_ + LOG_2PI)
    per_sample = loss.reshape(x.shape[0], math.prod(x.shape[1:])).sum(dim=1)
    return reduce_per_sample(per_sample, reduction)


def _check_logvar(logvar: object, kind: str, x: torch.Tensor) -> None:
    if kind != "gaussian":
        if logvar is not None:
            raise ValueError(f"logvar is only used by kind='gaussian', got it with kind={kind!r}")
        return
    if logvar is None:
        raise ValueError("kind='gaussian' needs logvar: a scalar tensor, one value per feature, or one per element")
    check_float_tensor("logvar", logvar)
    check_broadcasts_to("logvar", logvar, "x", x)


@dataclass(frozen=True)
class _LogvarBroadcast:
    """How a ``logvar`` that broadcasts to ``x`` is read by the kernel, and how its gradient is summed back.

    The kernel sees every input as a ``(B, n_cols)`` matrix, one row per sample.
    ``logvar`` becomes one with stride 0 along the dims it is broadcast over; it
    is copied only where no such view exists (a per-channel ``(C, 1, 1)``
    becomes ``n_cols`` values; a ``(B, 1, H, W)`` becomes ``x``'s size).
    """

    shape: torch.Size
    x_shape: torch.Size

    @property
    def padded(self) -> tuple[int, ...]:
        """``logvar``'s shape with leading ones up to ``x``'s rank."""
        return (1,) * (len(self.x_shape) - len(self.shape)) + tuple(self.shape)

    @property
    def full(self) -> bool:
        return self.shape == self.x_shape

    @property
    def varies_over_batch(self) -> bool:
        return self.padded[0] != 1

    @property
    def varies_over_features(self) -> bool:
        return any(size != 1 for size in self.padded[1:])

    def rows(self, logvar: torch.Tensor) -> torch.Tensor:
        """``logvar`` as a ``(B, n_cols)`` matrix."""
        batch = self.padded[0]
        per_row = logvar.reshape(self.padded).expand(batch, *self.x_shape[1:]).reshape(batch, -1)
        return per_row.expand(self.x_shape[0], per_row.shape[1])

    def grad_mode(self, reduction: str) -> str:
        """How the forward kernel sums ``logvar``'s gradient (see :mod:`fastvae.kernels.reconstruction_loss`)."""
        if not self.varies_over_features:
            return "rows"
        if self.full:
            return "elements"
        if not self.varies_over_batch and reduction != "none":
            # With per-sample weights (reduction="none") a shared logvar needs per-element gradients.
            return "columns"
        return "elements"

    def sum_back(self, grad: torch.Tensor, mode: str) -> torch.Tensor:
        """A gradient per sample ``(B,)``, per column ``(n_cols,)`` or per element, summed to ``logvar``'s shape."""
        rank = len(self.x_shape)
        view = {
            "rows": (self.x_shape[0],) + (1,) * (rank - 1),
            "columns": (1, *self.x_shape[1:]),
            "elements": self.x_shape,
        }[mode]
        return self.sum_to_shape(grad.reshape(view))

    def sum_to_shape(self, grad: torch.Tensor) -> torch.Tensor:
        """A per-element gradient (``x``'s shape) summed over the broadcast dims, to ``logvar``'s shape."""
        return grad.sum_to_size(self.padded).reshape(self.shape)

    def per_element(self, grad: torch.Tensor, reduction: str) -> torch.Tensor:
        """The adjoint of how the forward gathers ``logvar``'s gradient: ``grad`` spread back to ``x``'s shape.

        ``grad`` has the layout of :meth:`grad_spec` (``logvar``'s shape, one
        value per sample, or one per element); each value came from a sum over
        the elements it stands for, so each of them gets it back.
        """
        if self.final_grad_in_forward(reduction):
            return grad.reshape(self.padded).expand(self.x_shape)
        if self.grad_mode(reduction) == "rows":
            return grad.reshape((self.x_shape[0],) + (1,) * (len(self.x_shape) - 1)).expand(self.x_shape)
        return grad.reshape(self.x_shape)

    def final_grad_in_forward(self, reduction: str) -> bool:
        """Whether the forward can give the gradient itself, only to be scaled per sample in the backward."""
        return reduction != "none" or self.full

    def grad_spec(self, reduction: str, dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the logvar gradient that the forward op returns."""
        if self.final_grad_in_forward(reduction):
            return tuple(self.shape), dtype
        if self.grad_mode(reduction) == "rows":
            return (self.x_shape[0],), torch.float32
        return (self.x_shape[0], math.prod(self.x_shape[1:])), torch.float32


def _kernels():
    # Imported on first use: fastvae imports without Triton, and TRITON_INTERPRET
    # is read when the kernels are defined.
    from fastvae.kernels import reconstruction_loss

    return reconstruction_loss


def _grad_scale(reduction: str, batch: int) -> float:
    """The factor folded into the gradients the forward writes: the mean over samples comes for free there."""
    return 1.0 / max(batch, 1) if reduction == "mean" else 1.0


@torch.library.custom_op("fastvae::reconstruction_loss", mutates_args=())
def _fused_forward(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    logvar: torch.Tensor | None,
    kind: str,
    reduction: str,
    grad_x_hat: bool,
    grad_x: bool,
    grad_logvar: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduced loss, the per-sample losses it was reduced from (``(B,)``, not differentiable; an empty tensor
    for ``reduction="none"``, where they are the loss), and the gradients of the loss in each flagged input (an
    empty tensor for the others).

    The gradients are those of the loss as returned, before the upstream
    gradient: ``x_hat``'s and ``x``'s in their shape and dtype; ``logvar``'s
    per :meth:`_LogvarBroadcast.grad_spec` (its own shape, except for a shared
    ``logvar`` under ``reduction="none"``, whose per-sample weights come with
    the backward).
    """
    batch, n_cols = x_hat.shape[0], math.prod(x_hat.shape[1:])
    broadcast = _LogvarBroadcast(logvar.shape, x.shape) if logvar is not None else None
    mode = broadcast.grad_mode(reduction) if grad_logvar else "none"
    if x_hat.numel() == 0:
        per_sample = x_hat.new_zeros(batch, dtype=torch.float32)
        grad_x_hat_out, grad_x_out = torch.zeros_like(x_hat), torch.zeros_like(x)
        raw_shape = {"rows": (batch,), "columns": (n_cols,), "elements": (batch, n_cols), "none": (0,)}[mode]
        grad_logvar_out = x_hat.new_zeros(raw_shape, dtype=torch.float32)
    else:
        per_sample, grad_x_hat_out, grad_x_out, grad_logvar_out = _kernels().reconstruction_loss_forward(
            x_hat, x, broadcast.rows(logvar) if broadcast is not None else None, kind,
            grad_x_hat=grad_x_hat, grad_x=grad_x, logvar_grad=mode,
            logvar_grad_dtype=logvar.dtype if broadcast is not None and broadcast.full else torch.float32,
            grad_scale=_grad_scale(reduction, batch),
        )
    if mode == "none":
        grad_logvar_out = x_hat.new_empty(0)
    elif broadcast.final_grad_in_forward(reduction):
        grad_logvar_out = broadcast.sum_back(grad_logvar_out, mode).to(logvar.dtype)
    return (
        reduce_per_sample(per_sample, reduction),
        per_sample if reduction != "none" else per_sample.new_empty(0),
        grad_x_hat_out if grad_x_hat else x_hat.new_empty(0),
        grad_x_out if grad_x else x.new_empty(0),
        grad_logvar_out,
    )


@_fused_forward.register_fake
def _(x_hat, x, logvar, kind, reduction, grad_x_hat, grad_x, grad_logvar):
    loss = x_hat.new_empty(() if reduction != "none" else x_hat.shape[:1], dtype=torch.float32)
    per_sample = x_hat.new_empty(x_hat.shape[:1] if reduction != "none" else (0,), dtype=torch.float32)
    grad_logvar_out = x_hat.new_empty(0)
    if grad_logvar:
        shape, dtype = _LogvarBroadcast(logvar.shape, x.shape).grad_spec(reduction, logvar.dtype)
        grad_logvar_out = x_hat.new_empty(shape, dtype=dtype)
    return (
        loss,
        per_sample,
        x_hat.new_empty(x_hat.shape) if grad_x_hat else x_hat.new_empty(0),
        x.new_empty(x.shape) if grad_x else x.new_empty(0),
        grad_logvar_out,
    )


def _setup_context(ctx, inputs, output):
    x_hat, x, logvar, kind, reduction, *asked = inputs
    per_sample, saved_grads = output[1], output[2:]
    # The gradients asked for stay differentiable outputs, which is what carries higher orders (see _backward);
    # the others are empty placeholders. The per-sample losses are values to log, never differentiated.
    ctx.mark_non_differentiable(per_sample, *(g for g, wanted in zip(saved_grads, asked) if not wanted))
    # An output that no gradient reaches gets None, not a buffer of zeros.
    ctx.set_materialize_grads(False)
    # What the second derivatives need beyond the saved gradients: references to inputs, no copies. Only a
    # Gaussian whose logvar alone requires grad has no saved gradient to recover d e^-logvar from: it keeps x_hat.
    residual_from_inputs = kind == "gaussian" and not (asked[0] or asked[1])
    keep_x = (kind == "bce" and asked[0]) or residual_from_inputs
    ctx.save_for_backward(
        *saved_grads,
        x if keep_x else None,
        logvar if kind == "gaussian" else None,
        x_hat if residual_from_inputs else None,
    )
    ctx.kind, ctx.reduction, ctx.asked = kind, reduction, tuple(asked)
    ctx.grad_scale = _grad_scale(reduction, x_hat.shape[0])
    ctx.broadcast = _LogvarBroadcast(logvar.shape, x.shape) if logvar is not None else None
    ctx.dtypes = (x_hat.dtype, x.dtype, logvar.dtype if logvar is not None else None)


def _first_order(ctx, grad_loss, saved_x_hat, saved_x, saved_logvar, mode):
    """The upstream gradient applied to the gradients the forward wrote (see :mod:`fastvae.ops.grad_in_forward`)."""
    grad_x_hat = apply_upstream(saved_x_hat, grad_loss, mode) if ctx.needs_input_grad[0] else None
    grad_x = apply_upstream(saved_x, grad_loss, mode) if ctx.needs_input_grad[1] else None
    grad_logvar = None
    if ctx.needs_input_grad[2]:
        broadcast, reduction = ctx.broadcast, ctx.reduction
        if broadcast.final_grad_in_forward(reduction):
            grad_logvar = apply_upstream(saved_logvar, grad_loss, mode)
        elif broadcast.grad_mode(reduction) == "rows":
            grad_logvar = broadcast.sum_back(saved_logvar * grad_loss, "rows")
        elif not broadcast.varies_over_batch:
            # Shared by all samples: each feature's gradient is a weighted column sum, one matrix-vector product.
            grad_logvar = broadcast.sum_back(grad_loss @ saved_logvar, "columns")
        else:
            grad_logvar = broadcast.sum_back(saved_logvar * grad_loss[:, None], "elements")
    return grad_x_hat, grad_x, grad_logvar


def _hessian_vector_products(ctx, vectors, saved_x_hat, saved_x, x, logvar, x_hat):
    r"""The second-order part of a double backward: ``H v`` for the gradients ``v`` of the saved-gradient outputs.

    The saved gradients are ``s`` times the derivatives of the per-element
    loss in ``(x_hat, x, logvar)`` (``s`` = ``1 / B`` for ``"mean"``, else 1),
    so their derivatives are ``s`` times its Hessian, which is per element and
    tiny. With ``r = d e^{-logvar}`` and ``q = r^2 e^{logvar}`` for the Gaussian
    and ``\sigma = \mathrm{sigmoid}(x_hat)`` for BCE:

    ========  ==========================================================
    kind      Hessian in (x_hat, x, logvar), per element
    ========  ==========================================================
    mse       ``[[2, -2, 0], [-2, 2, 0], [0, 0, 0]]``
    l1        0
    bce       ``[[sigma (1 - sigma), -1, 0], [-1, 0, 0], [0, 0, 0]]``
    gaussian  ``[[e^-lv, -e^-lv, -r], [-e^-lv, e^-lv, r], [-r, r, q / 2]]``
    ========  ==========================================================

    Everything is written in differentiable torch ops of the saved gradients
    (outputs of the op itself: ``sigma = G_x_hat / s + x``, ``r = G_x_hat / s``
    or ``-G_x / s``) and the saved inputs, so autograd takes third and higher
    orders through the op again. Float32 results, ``None`` for zero terms.
    """
    kind, s, (asked_x_hat, asked_x, _) = ctx.kind, ctx.grad_scale, ctx.asked
    v_x_hat, v_x, v_logvar = (v.float() if v is not None else None for v in vectors)
    if v_logvar is not None:
        v_logvar = ctx.broadcast.per_element(v_logvar, ctx.reduction)
    if kind == "l1":
        return None, None, None
    if kind == "mse":
        t = 2.0 * s * _combine(v_x_hat, v_x, 1.0, -1.0)
        return t, -t, None
    if kind == "bce":
        grad_x_hat = grad_x = None
        if v_x_hat is not None:
            sigma = saved_x_hat.float() / s + x.float()
            grad_x_hat, grad_x = s * sigma * (1.0 - sigma) * v_x_hat, -s * v_x_hat
        if v_x is not None:
            grad_x_hat = _combine(grad_x_hat, v_x, 1.0, -s)
        return grad_x_hat, grad_x, None
    logvar = logvar.float()
    inv_var = torch.exp(-logvar)
    if asked_x_hat:
        r = saved_x_hat.float() / s
    elif asked_x:
        r = -saved_x.float() / s
    else:
        r = (x_hat.float() - x.float()) * inv_var
    # t: the x_hat row of H v (the x row is -t); u: the logvar row, per element.
    dv = _combine(v_x_hat, v_x, 1.0, -1.0)
    t = _combine(_times(dv, inv_var), _times(v_logvar, r), 1.0, -1.0)
    u = _combine(_times(dv, r), _times(v_logvar, r * r * torch.exp(logvar)), -1.0, 0.5)
    grad_logvar = ctx.broadcast.sum_to_shape(s * u.expand(ctx.broadcast.x_shape))
    return s * t, -s * t, grad_logvar


def _times(a, b):
    """``a * b``, or ``None`` for a zero term ``a``."""
    return None if a is None else a * b


def _combine(a, b, alpha, beta):
    """``alpha a + beta b`` where either may be ``None`` (a zero term); ``None`` if both are."""
    if a is None:
        return None if b is None else beta * b
    return alpha * a if b is None else alpha * a + beta * b


def _backward(ctx, grad_loss, _grad_per_sample, *vectors):
    saved_x_hat, saved_x, saved_logvar, x, logvar, x_hat = ctx.saved_tensors
    double_backward = any(v is not None for v in vectors)
    if grad_loss is None and not double_backward:
        return (None,) * 8
    received = grad_loss if grad_loss is not None else next(v for v in vectors if v is not None)
    mode = backward_mode(received, higher_order=double_backward)
    second = (None, None, None)
    if double_backward:
        second = _hessian_vector_products(ctx, vectors, saved_x_hat, saved_x, x, logvar, x_hat)
    first = (None, None, None)
    if grad_loss is not None:
        first = _first_order(ctx, grad_loss, saved_x_hat, saved_x, saved_logvar, mode)
    grads = [
        add_grads(f, h, dtype=dtype) if needed else None
        for f, h, dtype, needed in zip(first, second, ctx.dtypes, ctx.needs_input_grad)
    ]
    return (*grads, None, None, None, None, None)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def reconstruction_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    kind: str = "mse",
    *,
    reduction: str = "none",
    logvar: torch.Tensor | None = None,
    backend: str | None = None,
    return_per_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Negative log-likelihood of ``x`` under the decoder output ``x_hat``, summed per sample.

    Per element, summed over every dim but the first (the batch):

    * ``"mse"``: :math:`(\hat x - x)^2`
    * ``"bce"``: Bernoulli with ``x_hat`` as **logits**:
      :math:`\max(\hat x, 0) - \hat x x + \log(1 + e^{-|\hat x|})`, stable for any finite logit, and its
      limit at an infinite one (0 where ``x`` agrees with it: ``x = 1`` for ``+inf``, ``x = 0`` for
      ``-inf``; ``+inf`` otherwise), with a finite gradient ``sigmoid(x_hat) - x``; ``x`` in [0, 1]
      (not checked, which would cost a sync: other values go through the same formula).
    * ``"gaussian"``: :math:`\tfrac12 \left((x - \hat x)^2 e^{-\log\sigma^2} + \log\sigma^2 + \log 2\pi\right)`
      with a learned ``logvar`` that broadcasts to ``x``: a scalar tensor, one
      value per feature ``x.shape[1:]``, one per element, or any other shape
      that broadcasts (one per channel ``(C, 1, 1)``, per sample ``(B, 1, 1, 1)``);
      its gradient is summed over the broadcast dims.
    * ``"l1"``: :math:`|\hat x - x|`

    Args:
        x_hat: ``(B, ...)`` decoder output; float16, bfloat16, float32 (float64 on the reference path).
        x: ``(B, ...)`` target, same shape; its dtype may differ from ``x_hat``'s.
        kind: ``"mse"``, ``"bce"``, ``"gaussian"`` or ``"l1"``.
        reduction: ``"none"``: per-sample loss, shape ``(B,)``; ``"sum"``: the
            sum over the batch (torch's ``reduction="sum"``); ``"mean"``: the
            mean over **samples** of the per-sample sums (the ELBO's
            convention), which differs from torch's element-wise mean.
        logvar: the Gaussian log-variance, for ``kind="gaussian"`` only; any
            float dtype the backend takes, same device.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``; see :mod:`fastvae.backend`.
        return_per_sample: also return the per-sample values the loss was
            reduced from, ``(B,)``, detached (values to log; only the loss is
            differentiated): ``(loss, per_sample)``. With ``reduction="mean"``
            this is what a model's training loss wants: the loss's gradient comes
            with ``1 / B`` folded in, so ``loss.backward()`` hands it over
            without a pass, where ``reduction="none"`` followed by ``.mean()``
            pays one, and the per-image values come at no cost.

    Returns:
        float32 loss (float64 for float64 inputs). Gradients flow to ``x_hat``,
        ``logvar`` and also to ``x`` when it requires grad (``-2 (x_hat - x)``,
        ``-sign``, ``-(x_hat - x) e^{-logvar}``, and ``-x_hat`` for BCE's
        logits), each in its input's dtype.

    On the Triton path the forward writes the gradients of the inputs that
    require grad in the same pass as the loss, so the backward only multiplies
    them by the upstream gradient, without reading it on the host. A plain
    ``backward()`` takes the saved buffer over and scales it in place, leaving
    alone the samples whose upstream gradient is exactly 1 (for
    ``loss.backward()`` of a ``"sum"`` or ``"mean"`` loss: no pass at all); a
    retained graph (``retain_graph=True``) or a traced one (``torch.compile``)
    writes a new gradient each time, so no two gradients share memory. Under
    ``create_graph=True`` every order of gradient is exact. The gradients are
    kept from the forward to the backward: a buffer the size of each input
    that requires grad (a shared ``logvar`` under ``reduction="none"`` keeps a
    float32 one the size of ``x``, for the per-sample weights that come with
    the backward), plus references to ``x`` and ``logvar`` where the second
    derivatives need them (and to ``x_hat`` for a Gaussian whose ``logvar``
    alone requires grad). Under ``torch.no_grad()``, or when no input requires
    grad, the forward writes none.
    """
    check_float_tensor("x_hat", x_hat)
    check_float_tensor("x", x)
    if x_hat.dim() == 0:
        raise ValueError("x_hat must have shape (B, ...) with the batch first, got a 0-d tensor")
    check_same_shape("x", x, "x_hat", x_hat)
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_flag("return_per_sample", return_per_sample)
    _check_logvar(logvar, kind, x)
    check_same_device(x_hat=x_hat, x=x, logvar=logvar)
    dtypes = {"x_hat": x_hat.dtype, "x": x.dtype, **({"logvar": logvar.dtype} if logvar is not None else {})}
    if resolve_backend(backend, x_hat.device, dtypes) == "torch":
        if not return_per_sample:
            return reconstruction_loss_reference(x_hat, x, kind, reduction, logvar)
        per_sample = reconstruction_loss_reference(x_hat, x, kind, "none", logvar)
        return reduced_with_per_sample(reduce_per_sample(per_sample, reduction), per_sample, reduction)

    # The forward writes a gradient only for inputs that autograd will ask about.
    grad_enabled = torch.is_grad_enabled()
    needs_grad = [grad_enabled and t is not None and t.requires_grad for t in (x_hat, x, logvar)]
    loss, per_sample, *_ = _fused_forward(x_hat, x, logvar, kind, reduction, *needs_grad)
    return reduced_with_per_sample(loss, per_sample, reduction) if return_per_sample else loss
