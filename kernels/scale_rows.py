"""Rows of a saved gradient times the upstream gradient: the backward of ops that write their gradient in the forward.

A fused loss that writes ``G = d(per-sample loss)/d(input)`` in its forward
(see :mod:`fastvae.kernels.reconstruction_loss`) has only this left to do in
its backward: row ``i`` of ``G``, seen as a contiguous ``(n_rows, n_cols)``
matrix, times the upstream gradient ``w[i]`` of sample ``i`` (``w`` float32,
any stride: stride 0 for one scalar shared by every row). The product is taken
in float32 and rounded once, to ``G``'s dtype. The weights are read on the
device: the host never waits for their values.

Two forms (see :mod:`fastvae.ops.grad_in_forward` for which backward takes which):

* **in place** (:func:`scale_rows_`), when the backward owns ``G``: rows whose
  weight is exactly 1 are already the answer and are neither read nor written,
  and a program whose rows all have weight 1 stops after reading its weights.
  ``loss.backward()`` of a ``"sum"`` or ``"mean"`` loss (weight 1) then costs a
  launch and no traffic;
* **out of place** (:func:`scale_rows`): a new tensor, for a backward that must
  leave ``G`` intact (a retained or traced graph).

Memory traffic, in units of n elements of ``G``'s size (the n_rows weights left out):

=============  ==================================================  ============
form           reads -> writes                                     units
=============  ==================================================  ============
in place       rows of weight != 1 -> the same rows                0 (all 1) to 2
out of place   G -> new G * w                                      2
=============  ==================================================  ============
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import device_guard, plan_rows, row_offsets


@triton.jit
def _scale_rows_kernel(
    src_ptr, weight_ptr, out_ptr, n_rows, n_cols, stride_weight, cols_per_split,
    SKIP_UNIT_ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = row_offsets(tile, BLOCK_ROWS)[:, None]
    live_rows = rows < n_rows
    weight = tl.load(weight_ptr + rows * stride_weight, mask=live_rows, other=1.0).to(tl.float32)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)
    if SKIP_UNIT_ROWS:
        # In place, a row times exactly 1 is already the answer: masked off, so never loaded or stored.
        live_rows = live_rows & (weight != 1.0)
        # A tile with no row left to scale runs no column block at all.
        col_end = tl.where(tl.max(live_rows.to(tl.int32)) > 0, col_end, col_start)
    # A while loop, not range(): Triton 3.6's interpreter cannot take a tensor as a range() bound.
    while col_start < col_end:
        cols = col_start + tl.arange(0, BLOCK_COLS)[None, :]
        mask = live_rows & (cols < col_end)
        offsets = rows * n_cols + cols
        src = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (src * weight).to(out_ptr.dtype.element_ty), mask=mask)
        col_start += BLOCK_COLS


def _launch(src: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, skip_unit_rows: bool) -> None:
    n_rows, n_cols = src.shape
    if src.numel() == 0:
        return
    tiling = plan_rows(n_rows, n_cols, src.device)
    with device_guard(src):
        _scale_rows_kernel[tiling.grid](
            src, weight, out, n_rows, n_cols, weight.stride(0), tiling.cols_per_split,
            SKIP_UNIT_ROWS=skip_unit_rows, BLOCK_ROWS=tiling.block_rows, BLOCK_COLS=tiling.block_cols,
            num_warps=tiling.num_warps,
        )


def scale_rows(src: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A new tensor: row ``i`` of the contiguous ``(n_rows, n_cols)`` matrix ``src`` times ``weight[i]``.

    ``weight`` is ``(n_rows,)`` float32 with any stride (0 for a broadcast
    scalar); the product is taken in float32 and rounded once to ``src``'s dtype.
    """
    out = torch.empty_like(src)
    _launch(src, weight, out, skip_unit_rows=False)
    return out


def scale_rows_(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`scale_rows` in place on ``grad``, which it returns; rows of weight exactly 1 are not touched."""
    _launch(grad, weight, grad, skip_unit_rows=True)
    return grad
