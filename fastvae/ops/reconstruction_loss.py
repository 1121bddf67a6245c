"""Reconstruction losses of the ELBO, reduced per sample.

``reconstruction_loss`` is the public op; ``reconstruction_loss_reference`` is
its specification in plain PyTorch. (The fused Triton kernels come with the
loss-kernel issue; until then every backend runs the reference.)
"""
from __future__ import annotations

import math

import torch

from fastvae.backend import resolve_backend
from fastvae.ops.checks import (
    REDUCTIONS,
    check_choice,
    check_float_tensor,
    check_same_device,
    check_same_shape,
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
    acc = torch.promote_types(torch.promote_types(x_hat.dtype, x.dtype), torch.float32)
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
    per_sample = loss.reshape(x.shape[0], -1).sum(dim=1)
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
      :math:`\max(\hat x, 0) - \hat x x + \log(1 + e^{-|\hat x|})`, stable for any logit; ``x`` in [0, 1].
    * ``"gaussian"``: :math:`\tfrac12 \left((x - \hat x)^2 e^{-\log\sigma^2} + \log\sigma^2 + \log 2\pi\right)`
      with a learned ``logvar`` that broadcasts to ``x`` (a scalar tensor, one
      value per feature ``x.shape[1:]``, or one per element); its gradient is
      summed over the broadcast dims.
    * ``"l1"``: :math:`|\hat x - x|`

    Args:
        x_hat: ``(B, ...)`` decoder output; float16, bfloat16, float32 (float64 on the reference path).
        x: ``(B, ...)`` target, same shape; its dtype may differ from ``x_hat``'s.
        kind: ``"mse"``, ``"bce"``, ``"gaussian"`` or ``"l1"``.
        reduction: ``"none"``: per-sample loss, shape ``(B,)``; ``"sum"``: the
            sum over the batch (torch's ``reduction="sum"``); ``"mean"``: the
            mean over **samples** of the per-sample sums (the ELBO's
            convention), which differs from torch's element-wise mean.
        logvar: the Gaussian log-variance, for ``kind="gaussian"`` only.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``; see :mod:`fastvae.backend`.

    Returns:
        float32 loss (float64 for float64 inputs). Gradients flow to ``x_hat``,
        ``logvar`` and a ``x`` that requires grad.
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
    resolve_backend(backend, x_hat.device, dtypes)
    return reconstruction_loss_reference(x_hat, x, kind, reduction, logvar)
