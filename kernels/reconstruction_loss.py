"""Fused reconstruction losses, reduced per sample, with the gradient written in the forward.

For ``x_hat``, ``x`` (and ``logvar``, broadcast) seen as ``(n_rows, n_cols)``
matrices, one row per sample, with ``d = x_hat - x``, each element gives::

    kind       loss                                          d/dx_hat              d/dx       d/dlogvar
    mse        d**2                                          2 d                   -2 d
    bce        max(x_hat, 0) - x_hat x + log1p(e^-|x_hat|)   sigmoid(x_hat) - x    -x_hat
    gaussian   (d**2 e^-logvar + logvar + log 2 pi) / 2      d e^-logvar           -d e^-logvar  (1 - d**2 e^-logvar) / 2
    l1         |d|                                           sign(d)               -sign(d)

and the loss of a row is the sum over its columns (float32 throughout). BCE
takes its limit at an infinite logit: ``|x_hat|`` times ``1 - x`` (``+inf``)
or ``x`` (``-inf``), which is 0 where that factor is 0 (there ``d/dx`` is 0
too) and ``+inf`` elsewhere; ``d/dx_hat`` stays finite.

Gradient in the forward. When an input needs a gradient, the forward kernel
writes d(row loss)/d(input), times ``grad_scale`` (``1 / n_rows`` for a mean
over samples), into a new buffer in the same pass that sums the losses, as
fused cross-entropy kernels do. The backward then only has to apply the
upstream gradient, row by row (:mod:`fastvae.kernels.scale_rows`; which way,
in place or not, :mod:`fastvae.ops.grad_in_forward` decides). A ``logvar``
shared by several elements gets its gradient summed in the forward as well, as
the caller asks (``LOGVAR_GRAD``):

* ``"elements"``: one value per element (a ``logvar`` that varies along both
  the samples and the features; or one shared by all samples, when per-sample
  weights arrive only with the backward);
* ``"rows"``: one sum per row (a ``logvar`` constant along each row: a scalar, or one per sample);
* ``"columns"``: one sum per column of each row tile, which the launcher adds
  over the tiles (a ``logvar`` shared by all samples, under a scalar upstream
  gradient). Tiles are then ``COLUMN_BLOCK_ROWS`` rows tall where the batch has
  that many, so that these partial sums stay a fraction of n.

Memory traffic, in units of n elements of the inputs' size (values per sample,
and a ``logvar`` shared by all samples, left out):

=======================  ====================================================  ============
pass                     reads -> writes                                       units
=======================  ====================================================  ============
forward, no gradient     x_hat, x                                              2
forward with gradient    x_hat, x -> grad_x_hat                                3
backward, upstream 1     nothing: the saved gradient is handed over, and the   0
                         in-place scaling skips rows whose weight is 1
backward, scaled         grad_x_hat -> grad_x_hat * upstream                   2
forward + backward                                                             3, scaled 5
=======================  ====================================================  ============

"Scaled" is a backward that has to move the gradient: one whose upstream
gradient is not exactly 1 (``reduction="none"`` followed by per-sample weights
or by ``.mean()``: use ``reduction="mean"``, which folds ``1 / B`` into the
forward; only the rows whose weight is not 1 are moved), and every backward
that must leave the saved gradient intact, so writes a new one: a retained
graph (``retain_graph=True``, ``create_graph=True``) or a traced one
(``torch.compile``). The upstream gradient is read on the device, never on the
host. A per-element ``logvar`` adds a read to the forward and, with its
gradient, a write there and a read and a write to a scaled backward: 5, scaled
9. A target ``x`` that requires grad costs what ``x_hat`` does. A ``logvar``
shared by all samples under ``reduction="none"`` keeps a float32 gradient per
element for the backward's weighted column sums (its other reductions need at
most ``n / COLUMN_BLOCK_ROWS`` floats of partial sums).

Forward + backward of the other implementations, with the gradients of
``x_hat`` and ``logvar`` and an upstream gradient of 1:

=============================  =====  ======================  ============================
kind                           fused  eager (fwd + bwd)       torch.compile (fwd + bwd)
=============================  =====  ======================  ============================
mse                            3      6 + 6 = 12              5 + 2 = 7
l1                             3      6 + 4 = 10              5 + 2 = 7
bce                            3      30.75 + 29 = 59.75      2 + 3 = 5
gaussian, logvar per feature   3      14 + 17 = 31            4 + 3 = 7
gaussian, logvar per element   5      20 + 24 = 44            5 + 4 = 9
=============================  =====  ======================  ============================

Eager is ``reconstruction_loss_reference`` counted per ATen call (each call's
tensors read or written once, views and broadcast per-sample values free; the
comparison ops of BCE write bytes of booleans, hence the fractions; BCE's
reference pays some 13 units for its exact gradient at 0 and its limits at
infinite logits). torch.compile is read off the
code Inductor (torch 2.13) generates for the same reference on the CPU: its
forward keeps ``x_hat - x`` or the gradient for the backward, or (BCE) the
backward reads the inputs again. Its GPU code was not inspected here.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import (
    as_rows,
    device_guard,
    fast_exp,
    fast_rcp,
    load_f32,
    log1p_unit,
    plan_rows,
    row_offsets,
    sum_splits,
)

# Rows a tile adds up when the forward sums the logvar gradient over columns.
COLUMN_BLOCK_ROWS = 16
# BCE's tiles: 8 elements a thread at 8 warps. Its exponential, reciprocal and log1p series keep more values live
# than the other kinds; at 16 a thread ptxas capped some variants at 64 registers and spilled.
BCE_BLOCK_ELEMENTS = 2048
LOG_2PI = tl.constexpr(math.log(2 * math.pi))


@triton.jit
def _loss_and_grads(x_hat, x, logvar, KIND: tl.constexpr):
    """Per element, in float32: the loss and its derivatives in ``x_hat``, ``x`` and ``logvar``."""
    # One return for every kind: compiled Triton wants the same types on every return path.
    d = x_hat - x
    grad_logvar = tl.zeros_like(d)
    if KIND == "bce":
        e = fast_exp(tl.abs(x_hat), -1.0)  # in [0, 1]: never overflows, for any logit
        # max(x_hat, 0) - x_hat x is |x_hat| times (1 - x) for a logit >= 0 and times x for one < 0. Where that
        # factor is 0, so is the term, for an infinite logit too (its limit, where inf * 0 would give NaN).
        factor = tl.where(x_hat >= 0, 1.0 - x, x)
        loss = tl.where(factor == 0.0, 0.0, factor * tl.abs(x_hat)) + log1p_unit(e)
        grad_x_hat = tl.where(x_hat >= 0, 1.0, e) * fast_rcp(1.0 + e) - x  # sigmoid(x_hat) - x
        # -x_hat, except 0 where that limit took the term to 0 (as the reference's autograd gives).
        grad_x = tl.where((factor == 0.0) & (tl.abs(x_hat) == float("inf")), 0.0, -x_hat)
    elif KIND == "mse":
        loss = d * d
        grad_x_hat = 2.0 * d
        grad_x = -grad_x_hat
    elif KIND == "l1":
        loss = tl.abs(d)
        # 0 where d is 0 or NaN, as torch.sign gives.
        grad_x_hat = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        grad_x = -grad_x_hat
    else:
        grad_x_hat = d * fast_exp(logvar, -1.0)
        squared = d * grad_x_hat
        loss = 0.5 * (squared + logvar + LOG_2PI)
        grad_x = -grad_x_hat
        grad_logvar = 0.5 * (1.0 - squared)
    return loss, grad_x_hat, grad_x, grad_logvar


@triton.jit
def _reconstruction_loss_forward_kernel(
    x_hat_ptr, x_ptr, logvar_ptr, loss_ptr, grad_x_hat_ptr, grad_x_ptr, grad_logvar_ptr,
    n_rows, n_cols,
    stride_x_hat_row, stride_x_hat_col, stride_x_row, stride_x_col, stride_logvar_row, stride_logvar_col,
    cols_per_split, grad_scale,
    KIND: tl.constexpr, GRAD_X_HAT: tl.constexpr, GRAD_X: tl.constexpr, LOGVAR_GRAD: tl.constexpr,
    LOGVAR_PER_ROW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1)
    rows = row_offsets(tile, BLOCK_ROWS)[:, None]
    if KIND == "gaussian" and LOGVAR_PER_ROW:
        # A scalar or per-sample logvar, constant along each row: one load per row, once. Read per element through
        # its stride of 0, it cost every element a lane's address, mask and load (Triton 3.6: 94 instructions an
        # element in bfloat16, 1.7x the memory time on the audit).
        row_logvar = load_f32(logvar_ptr, rows, 0, stride_logvar_row, 0, rows < n_rows)
    else:
        row_logvar = tl.zeros([BLOCK_ROWS, 1], dtype=tl.float32)  # unused; compiled loops want it defined
    col_end = tl.minimum((split + 1) * cols_per_split, n_cols)
    loss_sum = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    logvar_grad_sum = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    col_start = split * cols_per_split
    # A while loop, not range(): Triton 3.6's interpreter cannot take a tensor as a range() bound.
    while col_start < col_end:
        cols = col_start + tl.arange(0, BLOCK_COLS)[None, :]
        mask = (rows < n_rows) & (cols < col_end)
        x_hat = load_f32(x_hat_ptr, rows, cols, stride_x_hat_row, stride_x_hat_col, mask)
        x = load_f32(x_ptr, rows, cols, stride_x_row, stride_x_col, mask)
        if KIND == "gaussian" and LOGVAR_PER_ROW:
            logvar = row_logvar
        elif KIND == "gaussian":
            logvar = load_f32(logvar_ptr, rows, cols, stride_logvar_row, stride_logvar_col, mask)
        else:
            logvar = x_hat  # unused
        loss, grad_x_hat, grad_x, grad_logvar = _loss_and_grads(x_hat, x, logvar, KIND)
        # Masked lanes read zeros, whose BCE and Gaussian terms are not zero.
        loss_sum += tl.where(mask, loss, 0.0)
        out = rows * n_cols + cols
        if GRAD_X_HAT:
            tl.store(grad_x_hat_ptr + out, (grad_x_hat * grad_scale).to(grad_x_hat_ptr.dtype.element_ty), mask=mask)
        if GRAD_X:
            tl.store(grad_x_ptr + out, (grad_x * grad_scale).to(grad_x_ptr.dtype.element_ty), mask=mask)
        if LOGVAR_GRAD == "elements":
            grad = (grad_logvar * grad_scale).to(grad_logvar_ptr.dtype.element_ty)
            tl.store(grad_logvar_ptr + out, grad, mask=mask)
        elif LOGVAR_GRAD == "rows":
            logvar_grad_sum += tl.where(mask, grad_logvar, 0.0)
        elif LOGVAR_GRAD == "columns":
            column_sum = tl.sum(tl.where(mask, grad_logvar, 0.0), axis=0) * grad_scale
            col = col_start + tl.arange(0, BLOCK_COLS)
            tl.store(grad_logvar_ptr + tile * n_cols + col, column_sum, mask=col < col_end)
        col_start += BLOCK_COLS
    row = row_offsets(tile, BLOCK_ROWS)
    tl.store(loss_ptr + row * n_splits + split, tl.sum(loss_sum, axis=1), mask=row < n_rows)
    if LOGVAR_GRAD == "rows":
        grad = tl.sum(logvar_grad_sum, axis=1) * grad_scale
        tl.store(grad_logvar_ptr + row * n_splits + split, grad, mask=row < n_rows)


def reconstruction_loss_forward(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    logvar_rows: torch.Tensor | None,
    kind: str,
    *,
    grad_x_hat: bool,
    grad_x: bool,
    logvar_grad: str,
    logvar_grad_dtype: torch.dtype = torch.float32,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel on ``(B, ...)`` tensors ``x_hat``, ``x`` (any strides, non-empty).

    ``logvar_rows`` (``kind="gaussian"`` only) is the log-variance as a
    ``(B, n_cols)`` matrix, ``n_cols`` the elements of a sample, stride 0 along
    the dims it is broadcast over. Returns the per-sample loss (float32,
    ``(B,)``) and, times ``grad_scale``, the gradients asked for (else
    ``None``): ``grad_x_hat`` and ``grad_x`` contiguous, in their input's shape
    and dtype, and ``logvar``'s as ``logvar_grad`` says: a ``(B, n_cols)``
    matrix in ``logvar_grad_dtype`` (``"elements"``), float32 sums per sample
    ``(B,)`` (``"rows"``) or per column ``(n_cols,)`` (``"columns"``).
    """
    n_rows = x_hat.shape[0]
    n_cols = x_hat.numel() // n_rows
    x_hat2, x2 = as_rows(x_hat, n_cols), as_rows(x, n_cols)
    min_block_rows = COLUMN_BLOCK_ROWS if logvar_grad == "columns" else 1
    block_elements = BCE_BLOCK_ELEMENTS if kind == "bce" else None
    tiling = plan_rows(n_rows, n_cols, x_hat.device, min_block_rows=min_block_rows, block_elements=block_elements)
    partial_loss = torch.empty((n_rows, tiling.n_splits), dtype=torch.float32, device=x_hat.device)
    grad_x_hat_out = torch.empty(x_hat.shape, dtype=x_hat.dtype, device=x_hat.device) if grad_x_hat else None
    grad_x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad_x else None
    grad_logvar_out = None
    if logvar_grad != "none":
        shape, dtype = {
            "elements": ((n_rows, n_cols), logvar_grad_dtype),
            "rows": ((n_rows, tiling.n_splits), torch.float32),
            "columns": ((tiling.row_tiles, n_cols), torch.float32),
        }[logvar_grad]
        grad_logvar_out = torch.empty(shape, dtype=dtype, device=x_hat.device)
    unused = partial_loss  # a valid pointer for the arguments that a constexpr switches off
    with device_guard(x_hat):
        _reconstruction_loss_forward_kernel[tiling.grid](
            x_hat2, x2, logvar_rows if logvar_rows is not None else unused, partial_loss,
            grad_x_hat_out if grad_x_hat else unused, grad_x_out if grad_x else unused,
            grad_logvar_out if grad_logvar_out is not None else unused,
            n_rows, n_cols,
            *x_hat2.stride(), *x2.stride(), *(logvar_rows.stride() if logvar_rows is not None else (0, 0)),
            tiling.cols_per_split, grad_scale,
            KIND=kind, GRAD_X_HAT=grad_x_hat, GRAD_X=grad_x, LOGVAR_GRAD=logvar_grad,
            LOGVAR_PER_ROW=logvar_rows is not None and (n_cols == 1 or logvar_rows.stride(1) == 0),
            BLOCK_ROWS=tiling.block_rows, BLOCK_COLS=tiling.block_cols, num_warps=tiling.num_warps,
        )
    if logvar_grad == "rows":
        grad_logvar_out = sum_splits(grad_logvar_out)
    elif logvar_grad == "columns":
        grad_logvar_out = grad_logvar_out.sum(dim=0)
    return sum_splits(partial_loss), grad_x_hat_out, grad_x_out, grad_logvar_out
