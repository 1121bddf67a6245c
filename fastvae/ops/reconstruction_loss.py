"""Reconstruction losses of the ELBO, reduced per sample.

``reconstruction_loss`` is the public op; ``reconstruction_loss_reference`` is
its specification in plain PyTorch. The Triton path is the custom op
``fastvae::reconstruction_loss``, whose forward returns the loss together with
the gradients of its inputs (written in the same pass, see
:mod:`fastvae.kernels.reconstruction_loss`), joined by ``register_autograd`` to
a backward that only applies the upstream gradient (``fastvae::scale_per_sample``),
so ``torch.compile(fullgraph=True)`` sees opaque ops and no graph break.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastvae.backend import resolve_backend
from fastvae.ops.checks import (
    REDUCTIONS,
    check_choice,
    check_float_tensor,
    check_same_device,
    check_same_shape,
    compute_dtype,
    reduce_per_sample,
)

KINDS = ("mse", "bce", "gaussian", "l1")
LOG_2PI = math.log(2 * math.pi)


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
        loss = x_hat_.clamp_min(0) - x_hat_ * x_ + torch.log1p(torch.exp(-x_hat_.abs()))
    else:
        logvar_ = logvar.to(acc)
        loss = 0.5 * ((x_ - x_hat_) ** 2 * torch.exp(-logvar_) + logvar_ + LOG_2PI)
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
    try:
        shape = torch.broadcast_shapes(logvar.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"logvar of shape {tuple(logvar.shape)} does not broadcast to x's shape {tuple(x.shape)}"
        )


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
        return grad.reshape(view).sum_to_size(self.padded).reshape(self.shape)

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduced loss and the gradients of the loss in each flagged input (an empty tensor for the others).

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
            # The mean over samples is folded into the gradients here, for free.
            grad_scale=1.0 / batch if reduction == "mean" else 1.0,
        )
    if mode == "none":
        grad_logvar_out = x_hat.new_empty(0)
    elif broadcast.final_grad_in_forward(reduction):
        grad_logvar_out = broadcast.sum_back(grad_logvar_out, mode).to(logvar.dtype)
    return (
        reduce_per_sample(per_sample, reduction),
        grad_x_hat_out if grad_x_hat else x_hat.new_empty(0),
        grad_x_out if grad_x else x.new_empty(0),
        grad_logvar_out,
    )


@_fused_forward.register_fake
def _(x_hat, x, logvar, kind, reduction, grad_x_hat, grad_x, grad_logvar):
    loss = x_hat.new_empty(() if reduction != "none" else x_hat.shape[:1], dtype=torch.float32)
    grad_logvar_out = x_hat.new_empty(0)
    if grad_logvar:
        shape, dtype = _LogvarBroadcast(logvar.shape, x.shape).grad_spec(reduction, logvar.dtype)
        grad_logvar_out = x_hat.new_empty(shape, dtype=dtype)
    return (
        loss,
        x_hat.new_empty(x_hat.shape) if grad_x_hat else x_hat.new_empty(0),
        x.new_empty(x.shape) if grad_x else x.new_empty(0),
        grad_logvar_out,
    )


@torch.library.custom_op("fastvae::scale_per_sample", mutates_args=())
def _scale_per_sample(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A new ``grad * weight``: ``grad`` contiguous ``(B, ...)`` with ``weight`` ``(B,)`` float32, or a scalar."""
    if grad.numel() == 0:
        return torch.empty_like(grad)
    rows = weight.shape[0] if weight.dim() == 1 else 1
    return _kernels().scale_rows(grad.view(rows, -1), weight.reshape(rows)).view(grad.shape)


@_scale_per_sample.register_fake
def _(grad, weight):
    return torch.empty_like(grad)


def _is_one(grad_loss: torch.Tensor) -> bool:
    """Whether the upstream gradient is exactly 1 (``loss.backward()`` on a scalar loss, or on ``loss.sum()``).

    The saved gradients then are the answer and are handed on as they are,
    without a pass over them. Telling needs the value on the host: one sync
    (the host waits for the device to reach this point before it launches the
    rest of the backward) against a read and a write of every gradient, the
    trade Liger-Kernel's fused cross-entropy makes too; this op is for inputs
    large enough that the pass is the dearer. A traced backward (torch.compile,
    AOTAutograd, make_fx: a tracing dispatch mode or tensor subclass) has no
    values to test, and its graph must serve any upstream gradient: there the
    gradients are always scaled.
    """
    tracing = torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
    if tracing or type(grad_loss) is not torch.Tensor:
        return False
    return bool((grad_loss == 1).all())


def _setup_context(ctx, inputs, output):
    _, x, logvar, _, reduction, *_ = inputs
    _, grad_x_hat, grad_x, grad_logvar = output
    ctx.save_for_backward(grad_x_hat, grad_x, grad_logvar)
    ctx.mark_non_differentiable(grad_x_hat, grad_x, grad_logvar)
    # The gradient outputs are never used: no zero-filled gradients for them.
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.broadcast = _LogvarBroadcast(logvar.shape, x.shape) if logvar is not None else None
    ctx.logvar_dtype = logvar.dtype if logvar is not None else None


def _backward(ctx, grad_loss, *_unused):
    saved_x_hat, saved_x, saved_logvar = ctx.saved_tensors
    unit = _is_one(grad_loss)

    def scaled(saved: torch.Tensor) -> torch.Tensor:
        # Never in place: a second backward (retain_graph=True) must see the saved gradient unchanged.
        return saved if unit else _scale_per_sample(saved, grad_loss)

    grad_x_hat = scaled(saved_x_hat) if ctx.needs_input_grad[0] else None
    grad_x = scaled(saved_x) if ctx.needs_input_grad[1] else None
    grad_logvar = None
    if ctx.needs_input_grad[2]:
        broadcast = ctx.broadcast
        if broadcast.final_grad_in_forward(ctx.reduction):
            grad_logvar = scaled(saved_logvar)
        elif broadcast.grad_mode(ctx.reduction) == "rows":
            grad_logvar = broadcast.sum_back(saved_logvar * grad_loss, "rows").to(ctx.logvar_dtype)
        elif not broadcast.varies_over_batch:
            # Shared by all samples: each feature's gradient is a weighted column sum, one matrix-vector product.
            grad_logvar = broadcast.sum_back(grad_loss @ saved_logvar, "columns").to(ctx.logvar_dtype)
        else:
            weighted = saved_logvar * grad_loss[:, None]
            grad_logvar = broadcast.sum_back(weighted, "elements").to(ctx.logvar_dtype)
    return grad_x_hat, grad_x, grad_logvar, None, None, None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def reconstruction_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    kind: str = "mse",
    *,
    reduction: str = "none",
    logvar: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Negative log-likelihood of ``x`` under the decoder output ``x_hat``, summed per sample.

    Per element, summed over every dim but the first (the batch):

    * ``"mse"``: :math:`(\hat x - x)^2`
    * ``"bce"``: Bernoulli with ``x_hat`` as **logits**:
      :math:`\max(\hat x, 0) - \hat x x + \log(1 + e^{-|\hat x|})`, stable for any logit; ``x`` in [0, 1]
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

    Returns:
        float32 loss (float64 for float64 inputs). Gradients flow to ``x_hat``,
        ``logvar`` and also to ``x`` when it requires grad (``-2 (x_hat - x)``,
        ``-sign``, ``-(x_hat - x) e^{-logvar}``, and ``-x_hat`` for BCE's
        logits), each in its input's dtype.

    On the Triton path the forward writes the gradients of the inputs that
    require grad in the same pass as the loss, so the backward only multiplies
    them by the upstream gradient, and hands them on untouched when that is
    exactly 1 (``loss.backward()`` of a ``"sum"`` or ``"mean"`` loss, outside
    ``torch.compile``). The gradients are kept from the forward to the
    backward: a buffer the size of each input that requires grad (a shared
    ``logvar`` under ``reduction="none"`` keeps a float32 one the size of
    ``x``, for the per-sample weights that come with the backward). Under
    ``torch.no_grad()``, or when no input requires grad, the forward writes none.
    """
    check_float_tensor("x_hat", x_hat)
    check_float_tensor("x", x)
    if x_hat.dim() == 0:
        raise ValueError("x_hat must have shape (B, ...) with the batch first, got a 0-d tensor")
    check_same_shape("x", x, "x_hat", x_hat)
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_logvar(logvar, kind, x)
    check_same_device(x_hat=x_hat, x=x, logvar=logvar)
    dtypes = {"x_hat": x_hat.dtype, "x": x.dtype, **({"logvar": logvar.dtype} if logvar is not None else {})}
    if resolve_backend(backend, x_hat.device, dtypes) == "torch":
        return reconstruction_loss_reference(x_hat, x, kind, reduction, logvar)

    # The forward writes a gradient only for inputs that autograd will ask about.
    grad_enabled = torch.is_grad_enabled()
    needs_grad = [grad_enabled and t is not None and t.requires_grad for t in (x_hat, x, logvar)]
    loss, *_ = _fused_forward(x_hat, x, logvar, kind, reduction, *needs_grad)
    return loss
