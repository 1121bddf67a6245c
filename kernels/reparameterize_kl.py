"""Fused reparameterized sampling and analytic KL divergence, forward and backward.

For ``mu``, ``logvar`` seen as ``(n_rows, D)`` matrices (one row per sample)::

    z   = mu + exp(logvar / 2) * eps
    kl  = 0.5 * sum_d (exp(logvar) + mu**2 - 1 - logvar)          (one value per row)
    grad_mu     = grad_z + grad_kl * mu
    grad_logvar = 0.5 * grad_z * eps * exp(logvar / 2) + 0.5 * grad_kl * (exp(logvar) - 1)

Noise. Without ``eps`` the kernels draw it with Philox: element ``(row, col)``
takes output ``col % 4`` of the Philox round with counter
``first_counter + row * ceil(D / 4) + col // 4`` (``tl.randn4x``: four normals
per round). The counter depends on the element's indices alone, not on block
sizes or the grid, so the backward regenerates exactly the forward's noise,
and the noise is never stored. A call consumes ``n_rows * ceil(D / 4)`` rounds.
Only a backward that autograd must differentiate again (``create_graph=True``)
needs the noise as a tensor: :func:`draw_noise` writes it out, bit for bit.

Memory traffic, in units of the element count n times the element size
(the per-row KL and its gradient are n / D values, left out):

=================  ==========================================  ======
pass               reads / writes                              units
=================  ==========================================  ======
forward            mu, logvar -> z                             3 (4 with eps)
backward           grad_z, mu, logvar -> grad_mu, grad_logvar  5 (6 with eps)
forward+backward                                               8 (10 with eps)
=================  ==========================================  ======

By the project's estimate (not yet checked against profiles or Inductor's GPU
code), eager PyTorch moves about 52 units over some 20 kernels, and
``torch.compile`` about 10 (its forward writes eps and its backward reads it back).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import as_rows, device_guard, load_f32, plan_rows, row_offsets

# Columns come in groups of four: one Philox round gives the noise of a group.
GROUP = 4


def philox_rounds(shape: torch.Size) -> int:
    """Philox rounds one call consumes for noise of ``shape`` ``(..., D)``."""
    return shape[:-1].numel() * triton.cdiv(shape[-1], GROUP)


@triton.jit
def _tile_columns(group_start, BLOCK_GROUPS: tl.constexpr):
    """Column groups ``[1, BLOCK_GROUPS, 1]`` and lanes ``[1, 1, 4]`` of a tile: column = 4 * group + lane."""
    groups = group_start + tl.arange(0, BLOCK_GROUPS)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    return groups, lanes


@triton.jit
def _program_span(n_cols, cols_per_split, BLOCK_ROWS: tl.constexpr):
    """This program's row tile and column split (int64), its rows ``[BLOCK_ROWS, 1, 1]``, its end column, and
    its first and past-the-last column groups."""
    tile = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    col_end = tl.minimum((split + 1) * cols_per_split, n_cols)
    rows = row_offsets(tile, BLOCK_ROWS)[:, None, None]
    return tile, split, rows, col_end, split * (cols_per_split // 4), tl.cdiv(col_end, 4)


@triton.jit
def standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row):
    """eps of a tile: lane k of group g in row r is normal k of Philox round first_counter + r * groups_per_row + g."""
    n0, n1, n2, n3 = tl.randn4x(seed, first_counter + rows * groups_per_row + groups)
    return tl.where(lanes == 0, n0, tl.where(lanes == 1, n1, tl.where(lanes == 2, n2, n3)))


@triton.jit
def _reparameterize_kl_forward_kernel(
    mu_ptr, logvar_ptr, eps_ptr, z_ptr, kl_ptr,
    n_rows, n_cols,
    stride_mu_row, stride_mu_col, stride_logvar_row, stride_logvar_col, stride_eps_row, stride_eps_col,
    seed, first_counter, cols_per_split,
    HAS_EPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS)
    n_splits = tl.num_programs(1)
    groups_per_row = tl.cdiv(n_cols, 4)
    kl = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
    # A while loop, not range(): Triton 3.6's interpreter cannot take a tensor as a range() bound.
    while group_start < group_end:
        groups, lanes = _tile_columns(group_start, BLOCK_GROUPS)
        cols = groups * 4 + lanes
        mask = (rows < n_rows) & (cols < col_end)
        mu = load_f32(mu_ptr, rows, cols, stride_mu_row, stride_mu_col, mask)
        logvar = load_f32(logvar_ptr, rows, cols, stride_logvar_row, stride_logvar_col, mask)
        if HAS_EPS:
            eps = load_f32(eps_ptr, rows, cols, stride_eps_row, stride_eps_col, mask)
        else:
            eps = standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row)
        std = tl.exp(0.5 * logvar)
        tl.store(z_ptr + rows * n_cols + cols, (mu + std * eps).to(z_ptr.dtype.element_ty), mask=mask)
        # Masked lanes load mu = logvar = 0, whose KL term is exactly 0.
        kl += std * std + mu * mu - 1.0 - logvar
        group_start += BLOCK_GROUPS
    row = row_offsets(tile, BLOCK_ROWS)
    tl.store(kl_ptr + row * n_splits + split, 0.5 * tl.sum(tl.sum(kl, axis=2), axis=1), mask=row < n_rows)


@triton.jit
def _reparameterize_kl_backward_kernel(
    grad_z_ptr, grad_kl_ptr, mu_ptr, logvar_ptr, eps_ptr, grad_mu_ptr, grad_logvar_ptr,
    n_rows, n_cols,
    stride_grad_z_row, stride_grad_z_col, stride_grad_kl,
    stride_mu_row, stride_mu_col, stride_logvar_row, stride_logvar_col, stride_eps_row, stride_eps_col,
    seed, first_counter, cols_per_split,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, HAS_EPS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS)
    groups_per_row = tl.cdiv(n_cols, 4)
    if HAS_GRAD_KL:
        grad_kl = tl.load(grad_kl_ptr + rows * stride_grad_kl, mask=rows < n_rows, other=0.0).to(tl.float32)
    while group_start < group_end:
        groups, lanes = _tile_columns(group_start, BLOCK_GROUPS)
        cols = groups * 4 + lanes
        mask = (rows < n_rows) & (cols < col_end)
        mu = load_f32(mu_ptr, rows, cols, stride_mu_row, stride_mu_col, mask)
        logvar = load_f32(logvar_ptr, rows, cols, stride_logvar_row, stride_logvar_col, mask)
        std = tl.exp(0.5 * logvar)
        grad_mu = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        grad_logvar = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        if HAS_GRAD_Z:
            grad_z = load_f32(grad_z_ptr, rows, cols, stride_grad_z_row, stride_grad_z_col, mask)
            if HAS_EPS:
                eps = load_f32(eps_ptr, rows, cols, stride_eps_row, stride_eps_col, mask)
            else:
                eps = standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row)
            grad_mu += grad_z
            grad_logvar += 0.5 * grad_z * eps * std
        if HAS_GRAD_KL:
            grad_mu += grad_kl * mu
            grad_logvar += 0.5 * grad_kl * (std * std - 1.0)
        out = rows * n_cols + cols
        tl.store(grad_mu_ptr + out, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + out, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)
        group_start += BLOCK_GROUPS


@triton.jit
def _standard_normal_kernel(
    eps_ptr, n_rows, n_cols, seed, first_counter, cols_per_split,
    BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS)
    groups_per_row = tl.cdiv(n_cols, 4)
    while group_start < group_end:
        groups, lanes = _tile_columns(group_start, BLOCK_GROUPS)
        cols = groups * 4 + lanes
        eps = standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row)
        tl.store(eps_ptr + rows * n_cols + cols, eps, mask=(rows < n_rows) & (cols < col_end))
        group_start += BLOCK_GROUPS


def draw_noise(shape: torch.Size, device: torch.device, seed: int, first_counter: int) -> torch.Tensor:
    """The noise the kernels draw for a call on ``shape`` ``(..., D)`` with this Philox state, as a float32 tensor.

    Bit-identical to the ``eps`` the forward and backward kernels compute in
    registers (the same counters, the same float32 math). Only the
    differentiable backward (``create_graph=True``) needs it as a tensor.
    """
    eps = torch.empty(shape, dtype=torch.float32, device=device)
    if eps.numel() == 0:
        return eps
    n_cols = shape[-1]
    n_rows = eps.numel() // n_cols
    tiling = plan_rows(n_rows, n_cols, device, min_block_cols=GROUP)
    with device_guard(eps):
        _standard_normal_kernel[tiling.grid](
            eps, n_rows, n_cols, seed, first_counter, tiling.cols_per_split,
            BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP, num_warps=tiling.num_warps,
        )
    return eps


def _strides(tensor: torch.Tensor | None) -> tuple[int, int]:
    return tensor.stride() if tensor is not None else (0, 0)


def reparameterize_kl_forward(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, seed: int, first_counter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on ``(..., D)`` tensors (any strides, non-empty).

    Returns ``z`` (contiguous, ``mu``'s shape and dtype) and the per-sample KL
    (float32, shape ``mu.shape[:-1]``). ``seed``/``first_counter`` are ignored
    when ``eps`` is given.
    """
    n_cols = mu.shape[-1]
    mu2, logvar2 = as_rows(mu, n_cols), as_rows(logvar, n_cols)
    eps2 = as_rows(eps, n_cols) if eps is not None else None
    n_rows = mu2.shape[0]
    tiling = plan_rows(n_rows, n_cols, mu.device, min_block_cols=GROUP)
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    kl = torch.empty((n_rows, tiling.n_splits), dtype=torch.float32, device=mu.device)
    with device_guard(mu):
        _reparameterize_kl_forward_kernel[tiling.grid](
            mu2, logvar2, eps2 if eps2 is not None else mu2, z, kl,
            n_rows, n_cols,
            *mu2.stride(), *logvar2.stride(), *_strides(eps2),
            seed, first_counter, tiling.cols_per_split,
            HAS_EPS=eps2 is not None, BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP,
            num_warps=tiling.num_warps,
        )
    kl = kl.sum(dim=1) if tiling.n_splits > 1 else kl.view(n_rows)
    return z, kl.view(mu.shape[:-1])


def reparameterize_kl_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: int,
    first_counter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns new ``grad_mu`` and ``grad_logvar`` (contiguous).

    ``grad_z`` has ``mu``'s shape, ``grad_kl`` its shape without the last dim
    (any strides: a stride-0 broadcast of a scalar gradient is read in place);
    either may be ``None`` (that output was unused). Without ``eps`` the noise
    is regenerated from ``seed`` and ``first_counter``.
    """
    n_cols = mu.shape[-1]
    mu2, logvar2 = as_rows(mu, n_cols), as_rows(logvar, n_cols)
    n_rows = mu2.shape[0]
    grad_z2 = as_rows(grad_z, n_cols) if grad_z is not None else None
    eps2 = as_rows(eps, n_cols) if eps is not None else None
    grad_kl1 = grad_kl.reshape(n_rows) if grad_kl is not None else None
    tiling = plan_rows(n_rows, n_cols, mu.device, min_block_cols=GROUP)
    grad_mu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    grad_logvar = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    with device_guard(mu):
        _reparameterize_kl_backward_kernel[tiling.grid](
            grad_z2 if grad_z2 is not None else mu2, grad_kl1 if grad_kl1 is not None else mu2,
            mu2, logvar2, eps2 if eps2 is not None else mu2, grad_mu, grad_logvar,
            n_rows, n_cols,
            *_strides(grad_z2), grad_kl1.stride(0) if grad_kl1 is not None else 0,
            *mu2.stride(), *logvar2.stride(), *_strides(eps2),
            seed, first_counter, tiling.cols_per_split,
            HAS_GRAD_Z=grad_z2 is not None, HAS_GRAD_KL=grad_kl1 is not None, HAS_EPS=eps2 is not None,
            BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP,
            num_warps=tiling.num_warps,
        )
    return grad_mu, grad_logvar
