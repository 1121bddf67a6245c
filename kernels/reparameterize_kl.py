"""Fused reparameterized sampling and the analytic KL divergence between diagonal Gaussians, forward and backward.

The inputs, of shape ``(*lead, *event)`` (the last ``event_dims`` dims are the
event), are seen as an ``(n_rows, n_cols)`` matrix: one row per KL value (the
leading dims, flattened), one column per element of the event. With ``c`` the
optional clamp of the log-variances, soft ``c(x) = L tanh(x / L)``
(``logvar_limit = L``) or hard ``c(x) = min(max(x, lo), hi)``
(``logvar_clamp = (lo, hi)``: ``logvar_min``, ``logvar_max`` in the kernels),
``lv = c(logvar)``, ``plv = c(prior_logvar)``, ``pmu = prior_mu`` (both 0 when
not given: the prior N(0, I)), ``r = exp(lv - plv)`` and
``s = (mu - pmu) exp(-plv)``::

    z    = mu + exp(lv / 2) * eps
    kl   = 0.5 * sum_cols (r + (mu - pmu) s - 1 - (lv - plv))       (one value per row)
    grad_mu          = grad_z + grad_kl * s
    grad_logvar      = (0.5 * grad_z * eps * exp(lv / 2) + 0.5 * grad_kl * (r - 1)) * c'(logvar)
    grad_prior_mu    = -grad_kl * s
    grad_prior_logvar = 0.5 * grad_kl * (1 - r - (mu - pmu) s) * c'(prior_logvar)

With the N(0, I) prior and no clamp these are exactly the operations (in the
same order, so the same bits) of the op before priors existed:
``kl = 0.5 * sum(std * std + mu * mu - 1 - logvar)``. The soft clamp's derivative is
``c'(x) = 1 - tanh(x / L)**2 = 4 u / (1 + u)**2`` with ``u = exp(-2 |x| / L)``,
accurate at any ``x``; tanh itself is ``(1 - u) / (1 + u)``, or its series for
``|x / L| < 0.1``, where ``1 - u`` would cancel. The hard clamp's is
``torch.clamp``'s: 1 on ``[lo, hi]`` (both ends included), 0 outside and at NaN
(which it passes through, as ``torch.clamp`` does).

Layout. Each input is read in place through three strides
(:func:`fastvae.kernels.launch.split_rows`): the row index splits into an
outer part (the first dim) and an inner part (the other leading dims), so the
channel slices of a conv output (``h[:, :C]`` of ``(B, 2C, H, W)``) are read
where they lie. A prior that broadcasts to ``mu`` is read through stride 0
along the dims it is broadcast over.

Noise. Without ``eps`` the kernels draw it with Philox: element ``(row, col)``
of the matrix (``col`` the index in the flattened event, in row-major order)
takes output ``col % 4`` of the Philox round with counter
``first_counter + row * ceil(n_cols / 4) + col // 4`` (``tl.randn4x``: four
normals per round). The counter depends on the element's indices alone, not on
block sizes, the grid or the input's strides, so the backward regenerates
exactly the forward's noise, and the noise is never stored. A call consumes
``n_rows * ceil(n_cols / 4)`` rounds. For ``event_dims=1`` this is the layout
the op always had. Only a backward that autograd must differentiate again
(``create_graph=True``) needs the noise as a tensor: :func:`draw_noise` writes
it out, bit for bit.

The Philox state (key and first counter) comes as two scalar arguments, set
on the host at launch (eager calls), or, under CUDA-graph capture, as a
pointer ``philox_ptr`` to an int64 ``[key, first_counter]`` that a capture-aware
torch RNG call wrote on the device inside the graph (:mod:`fastvae.ops.rng`),
so that each replay draws fresh noise; each program loads those 16 bytes once.
Without ``philox_ptr`` (a ``None`` constant) the kernels are compiled without
that load, as they were before it existed.

The prior's gradients come from the backward kernel, in one of two ways
(per prior tensor, chosen by :func:`prior_grad_mode`):

* ``"elements"``: a prior that varies along the rows (a conditional prior per
  sample, as in VDVAE and NVAE): one value per element of ``mu``, summed down
  to the prior's shape afterwards if it is broadcast along some event dims;
* ``"columns"``: a prior shared by all rows (a learned prior per latent
  dimension ``(D,)``, or per channel and position ``(C, H, W)``): per row tile,
  the sum over its rows of each column, in float32, which the launcher adds
  over the tiles. Tiles are then ``COLUMN_BLOCK_ROWS`` rows tall where there
  are that many rows, so these partial sums are about ``n / 16`` floats.

Memory traffic, in units of the element count n of ``mu`` times the element
size (the per-row KL and its gradient, n / n_cols values, left out):

=========================================  ==========================================  =========================
pass                                       reads / writes                              units
=========================================  ==========================================  =========================
forward                                    mu, logvar -> z                             3 (4 with eps)
backward                                   grad_z, mu, logvar -> grad_mu, grad_logvar  5 (6 with eps)
forward + backward                                                                     8 (10 with eps)
each prior tensor of mu's shape            forward: the prior; backward: the prior     +1 forward, +2 backward
                                           -> its gradient
each prior tensor shared by all rows       forward, backward: the prior, n / n_rows    +0 forward; backward
                                           elements (cached); backward: partial        +1/8 (float32 inputs),
                                           column sums written, then read by the sum   +1/4 (bfloat16, float16)
logvar_limit or logvar_clamp               nothing: the clamp is computed in registers 0
=========================================  ==========================================  =========================

So a VDVAE-style stochastic layer (posterior and conditional prior, all four
of one shape, noise drawn in the kernel) moves 5 units forward and 9 backward,
14 in all; with a learned prior shared by the batch instead, 8.25 (float32) or 8.5 (bfloat16).
The gradient of a prior broadcast along only some event dims (``(B, C, 1, 1)``
against ``(B, C, H, W)``, say) is written per element and then summed: +2 units.

For the N(0, I) prior with the noise drawn, counted on the CPU per ATen call
(``python -m benchmarks --static``, 65536 x 256 float32), eager PyTorch moves 24 +
30 = 54 units over 13 + 13 kernels, and ``torch.compile`` at least 4 + 6 = 10
(the graph floor: its forward writes eps and its backward reads it back); not yet
checked against a GPU profile or Inductor's GPU code.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import device_guard, load_f32, plan_rows, row_offsets, split_row_starts, split_rows

# Columns come in groups of four: one Philox round gives the noise of a group.
GROUP = 4
# Rows a tile adds up when the backward sums a shared prior's gradient over the rows.
COLUMN_BLOCK_ROWS = 16


def event_size(shape: torch.Size, event_dims: int) -> int:
    """``n_cols``: the elements of one event, the last ``event_dims`` dims of ``shape``."""
    return math.prod(shape[len(shape) - event_dims :])


def philox_rounds(shape: torch.Size, event_dims: int = 1) -> int:
    """Philox rounds one call consumes for noise of ``shape`` ``(*lead, *event)``."""
    n_cols = event_size(shape, event_dims)
    return math.prod(shape[: len(shape) - event_dims]) * triton.cdiv(n_cols, GROUP)


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
def _philox_state(seed, first_counter, philox_ptr):
    """The Philox key and first counter: the scalar arguments, or the two int64 at ``philox_ptr`` when it is
    given (a state drawn on the device, which a CUDA graph replays anew; see :mod:`fastvae.ops.rng`)."""
    if philox_ptr is not None:
        seed = tl.load(philox_ptr)
        first_counter = tl.load(philox_ptr + 1)
    return seed, first_counter


@triton.jit
def standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row):
    """eps of a tile: lane k of group g in row r is normal k of Philox round first_counter + r * groups_per_row + g."""
    n0, n1, n2, n3 = tl.randn4x(seed, first_counter + rows * groups_per_row + groups)
    return tl.where(lanes == 0, n0, tl.where(lanes == 1, n1, tl.where(lanes == 2, n2, n3)))


@triton.jit
def _soft_clamp(x, limit):
    """``limit * tanh(x / limit)`` and its derivative ``1 - tanh(x / limit)**2``, both accurate for every ``x``."""
    y = x / limit
    a = tl.abs(y)
    u = tl.exp(-2.0 * a)  # in [0, 1]: never overflows
    # tanh|y| = (1 - u) / (1 + u), whose 1 - u cancels for small |y|: there the series (error below 1e-8).
    y2 = y * y
    t = tl.where(a < 0.1, a * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0))), (1.0 - u) / (1.0 + u))
    clamped = limit * tl.where(y < 0, -t, t)
    return clamped, 4.0 * u / ((1.0 + u) * (1.0 + u))


@triton.jit
def _hard_clamp(x, lo, hi):
    """``torch.clamp(x, lo, hi)`` and its derivative: 1 on ``[lo, hi]``, 0 outside. A NaN passes through (no
    comparison holds for it) with a slope of 0, as in torch."""
    inside = (x >= lo) & (x <= hi)
    clamped = tl.where(x < lo, lo, tl.where(x > hi, hi, x))
    return clamped, tl.where(inside, 1.0, 0.0)


@triton.jit
def _through_clamp(grad, slope, logvar_limit, logvar_min):
    """``grad`` of a clamped log-variance carried back through its clamp: times the soft clamp's slope, or kept
    where the hard clamp's slope is 1 and exactly 0 elsewhere (as torch.clamp's backward, even for a NaN)."""
    if logvar_limit is not None:
        grad *= slope
    if logvar_min is not None:
        grad = tl.where(slope != 0.0, grad, 0.0)
    return grad


@triton.jit
def _kl_terms(mu, logvar, std, prior_mu, prior_logvar, HAS_PRIOR_MU: tl.constexpr, HAS_PRIOR_LOGVAR: tl.constexpr):
    """``(mu - pmu, s = (mu - pmu) exp(-plv), r = exp(lv - plv), lv - plv)`` of the module docstring.

    Without a prior they are ``mu, mu, std * std, logvar``: the N(0, I) formulas, operation for operation.
    """
    diff = mu
    if HAS_PRIOR_MU:
        diff = mu - prior_mu
    scaled = diff
    ratio = std * std
    log_ratio = logvar
    if HAS_PRIOR_LOGVAR:
        scaled = diff * tl.exp(-prior_logvar)
        ratio = tl.exp(logvar - prior_logvar)
        log_ratio = logvar - prior_logvar
    return diff, scaled, ratio, log_ratio


@triton.jit
def _load_inputs(
    mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows, prior_logvar_rows,
    cols, mask, stride_mu_col, stride_logvar_col, stride_prior_mu_col, stride_prior_logvar_col, logvar_limit,
    logvar_min, logvar_max,
):
    """``mu``, ``logvar``, ``prior_mu``, ``prior_logvar`` of a tile in float32, the log-variances soft-clamped
    when ``logvar_limit`` is given or clamped to ``[logvar_min, logvar_max]`` when those are, and the clamp's
    slopes (1 without a clamp). An absent prior tensor (a ``None`` pointer, a compile-time constant) reads as
    zeros, never loaded."""
    mu = load_f32(mu_ptr, mu_rows, cols, 1, stride_mu_col, mask)
    logvar = load_f32(logvar_ptr, logvar_rows, cols, 1, stride_logvar_col, mask)
    prior_mu = tl.zeros_like(mu)
    if prior_mu_ptr is not None:
        prior_mu = load_f32(prior_mu_ptr, prior_mu_rows, cols, 1, stride_prior_mu_col, mask)
    prior_logvar = tl.zeros_like(mu)
    if prior_logvar_ptr is not None:
        prior_logvar = load_f32(prior_logvar_ptr, prior_logvar_rows, cols, 1, stride_prior_logvar_col, mask)
    slope = tl.zeros_like(mu) + 1.0
    prior_slope = slope
    if logvar_limit is not None:
        logvar, slope = _soft_clamp(logvar, logvar_limit)
        if prior_logvar_ptr is not None:
            prior_logvar, prior_slope = _soft_clamp(prior_logvar, logvar_limit)
    if logvar_min is not None:
        logvar, slope = _hard_clamp(logvar, logvar_min, logvar_max)
        if prior_logvar_ptr is not None:
            prior_logvar, prior_slope = _hard_clamp(prior_logvar, logvar_min, logvar_max)
    return mu, logvar, prior_mu, prior_logvar, slope, prior_slope


# The optional inputs (the prior's two tensors, the clamps' limits, the prior's gradient buffers) are None when
# absent: Triton compiles None arguments as constants, so each combination is a kernel of its own, with no trace
# of the parts it lacks.


@triton.jit
def _reparameterize_kl_forward_kernel(
    mu_ptr, logvar_ptr, eps_ptr, prior_mu_ptr, prior_logvar_ptr, z_ptr, kl_ptr,
    n_rows, n_cols, n_inner,
    stride_mu_outer, stride_mu_inner, stride_mu_col,
    stride_logvar_outer, stride_logvar_inner, stride_logvar_col,
    stride_eps_outer, stride_eps_inner, stride_eps_col,
    stride_prior_mu_outer, stride_prior_mu_inner, stride_prior_mu_col,
    stride_prior_logvar_outer, stride_prior_logvar_inner, stride_prior_logvar_col,
    seed, first_counter, philox_ptr, cols_per_split, logvar_limit, logvar_min, logvar_max,
    HAS_EPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS)
    n_splits = tl.num_programs(1)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    mu_rows = split_row_starts(rows, n_inner, stride_mu_outer, stride_mu_inner)
    logvar_rows = split_row_starts(rows, n_inner, stride_logvar_outer, stride_logvar_inner)
    eps_rows = split_row_starts(rows, n_inner, stride_eps_outer, stride_eps_inner)
    prior_mu_rows = split_row_starts(rows, n_inner, stride_prior_mu_outer, stride_prior_mu_inner)
    prior_logvar_rows = split_row_starts(rows, n_inner, stride_prior_logvar_outer, stride_prior_logvar_inner)
    kl = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
    # A while loop, not range(): Triton 3.6's interpreter cannot take a tensor as a range() bound.
    while group_start < group_end:
        groups, lanes = _tile_columns(group_start, BLOCK_GROUPS)
        cols = groups * 4 + lanes
        mask = (rows < n_rows) & (cols < col_end)
        mu, logvar, prior_mu, prior_logvar, _, _ = _load_inputs(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows,
            prior_logvar_rows, cols, mask, stride_mu_col, stride_logvar_col, stride_prior_mu_col,
            stride_prior_logvar_col, logvar_limit, logvar_min, logvar_max,
        )
        if HAS_EPS:
            eps = load_f32(eps_ptr, eps_rows, cols, 1, stride_eps_col, mask)
        else:
            eps = standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row)
        std = tl.exp(0.5 * logvar)
        tl.store(z_ptr + rows * n_cols + cols, (mu + std * eps).to(z_ptr.dtype.element_ty), mask=mask)
        diff, scaled, ratio, log_ratio = _kl_terms(
            mu, logvar, std, prior_mu, prior_logvar, prior_mu_ptr is not None, prior_logvar_ptr is not None
        )
        # Masked lanes load zeros for every input, whose KL term is exactly 0 (1 + 0 - 1 - 0).
        kl += ratio + diff * scaled - 1.0 - log_ratio
        group_start += BLOCK_GROUPS
    row = row_offsets(tile, BLOCK_ROWS)
    tl.store(kl_ptr + row * n_splits + split, 0.5 * tl.sum(tl.sum(kl, axis=2), axis=1), mask=row < n_rows)


@triton.jit
def _store_prior_grad(ptr, grad, by_columns, rows, cols, mask, tile, group_start, n_cols, col_end,
                      BLOCK_GROUPS: tl.constexpr):
    """Write a prior's gradient: per element, or (``by_columns``) this tile's sums over its rows, per column."""
    if ptr is not None:
        if by_columns:
            column_sums = tl.sum(tl.where(mask, grad, 0.0), axis=0)  # [BLOCK_GROUPS, 4]
            col = (group_start + tl.arange(0, BLOCK_GROUPS))[:, None] * 4 + tl.arange(0, 4)[None, :]
            tl.store(ptr + tile * n_cols + col, column_sums.to(ptr.dtype.element_ty), mask=col < col_end)
        else:
            tl.store(ptr + rows * n_cols + cols, grad.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reparameterize_kl_backward_kernel(
    grad_z_ptr, grad_kl_ptr, mu_ptr, logvar_ptr, eps_ptr, prior_mu_ptr, prior_logvar_ptr,
    grad_mu_ptr, grad_logvar_ptr, grad_prior_mu_ptr, grad_prior_logvar_ptr,
    n_rows, n_cols, n_inner,
    stride_grad_z_outer, stride_grad_z_inner, stride_grad_z_col, stride_grad_kl,
    stride_mu_outer, stride_mu_inner, stride_mu_col,
    stride_logvar_outer, stride_logvar_inner, stride_logvar_col,
    stride_eps_outer, stride_eps_inner, stride_eps_col,
    stride_prior_mu_outer, stride_prior_mu_inner, stride_prior_mu_col,
    stride_prior_logvar_outer, stride_prior_logvar_inner, stride_prior_logvar_col,
    seed, first_counter, philox_ptr, cols_per_split, logvar_limit, logvar_min, logvar_max, prior_mu_grad_by_columns,
    prior_logvar_grad_by_columns,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, HAS_EPS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    grad_z_rows = split_row_starts(rows, n_inner, stride_grad_z_outer, stride_grad_z_inner)
    mu_rows = split_row_starts(rows, n_inner, stride_mu_outer, stride_mu_inner)
    logvar_rows = split_row_starts(rows, n_inner, stride_logvar_outer, stride_logvar_inner)
    eps_rows = split_row_starts(rows, n_inner, stride_eps_outer, stride_eps_inner)
    prior_mu_rows = split_row_starts(rows, n_inner, stride_prior_mu_outer, stride_prior_mu_inner)
    prior_logvar_rows = split_row_starts(rows, n_inner, stride_prior_logvar_outer, stride_prior_logvar_inner)
    if HAS_GRAD_KL:
        grad_kl = tl.load(grad_kl_ptr + rows * stride_grad_kl, mask=rows < n_rows, other=0.0).to(tl.float32)
    while group_start < group_end:
        groups, lanes = _tile_columns(group_start, BLOCK_GROUPS)
        cols = groups * 4 + lanes
        mask = (rows < n_rows) & (cols < col_end)
        mu, logvar, prior_mu, prior_logvar, slope, prior_slope = _load_inputs(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows,
            prior_logvar_rows, cols, mask, stride_mu_col, stride_logvar_col, stride_prior_mu_col,
            stride_prior_logvar_col, logvar_limit, logvar_min, logvar_max,
        )
        std = tl.exp(0.5 * logvar)
        grad_mu = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        grad_logvar = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        if HAS_GRAD_Z:
            grad_z = load_f32(grad_z_ptr, grad_z_rows, cols, 1, stride_grad_z_col, mask)
            if HAS_EPS:
                eps = load_f32(eps_ptr, eps_rows, cols, 1, stride_eps_col, mask)
            else:
                eps = standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row)
            grad_mu += grad_z
            grad_logvar += 0.5 * grad_z * eps * std
        if HAS_GRAD_KL:
            diff, scaled, ratio, _ = _kl_terms(
                mu, logvar, std, prior_mu, prior_logvar, prior_mu_ptr is not None, prior_logvar_ptr is not None
            )
            grad_mu += grad_kl * scaled
            grad_logvar += 0.5 * grad_kl * (ratio - 1.0)
            _store_prior_grad(grad_prior_mu_ptr, -grad_kl * scaled, prior_mu_grad_by_columns, rows, cols, mask,
                              tile, group_start, n_cols, col_end, BLOCK_GROUPS)
            grad_prior_logvar = 0.5 * grad_kl * (1.0 - ratio - diff * scaled)
            grad_prior_logvar = _through_clamp(grad_prior_logvar, prior_slope, logvar_limit, logvar_min)
            _store_prior_grad(grad_prior_logvar_ptr, grad_prior_logvar, prior_logvar_grad_by_columns, rows, cols,
                              mask, tile, group_start, n_cols, col_end, BLOCK_GROUPS)
        grad_logvar = _through_clamp(grad_logvar, slope, logvar_limit, logvar_min)
        out = rows * n_cols + cols
        tl.store(grad_mu_ptr + out, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + out, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)
        group_start += BLOCK_GROUPS


@triton.jit
def _standard_normal_kernel(
    eps_ptr, n_rows, n_cols, seed, first_counter, philox_ptr, cols_per_split,
    BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    while group_start < group_end:
        groups, lanes = _tile_columns(group_start, BLOCK_GROUPS)
        cols = groups * 4 + lanes
        eps = standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row)
        tl.store(eps_ptr + rows * n_cols + cols, eps, mask=(rows < n_rows) & (cols < col_end))
        group_start += BLOCK_GROUPS


def draw_noise(
    shape: torch.Size,
    device: torch.device,
    seed: int,
    first_counter: int,
    event_dims: int = 1,
    *,
    philox_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The noise the kernels draw for a call on ``shape`` with this Philox state, as a contiguous float32 tensor.

    Bit-identical to the ``eps`` the forward and backward kernels compute in
    registers (the same counters, the same float32 math). Only the
    differentiable backward (``create_graph=True``) needs it as a tensor.
    ``philox_state``: the state as an int64 ``(2,)`` tensor ``[seed,
    first_counter]`` on ``device``, read by the kernel (the scalars are then ignored).
    """
    eps = torch.empty(shape, dtype=torch.float32, device=device)
    if eps.numel() == 0:
        return eps
    n_cols = event_size(shape, event_dims)
    n_rows = eps.numel() // n_cols
    tiling = plan_rows(n_rows, n_cols, device, min_block_cols=GROUP)
    with device_guard(eps):
        _standard_normal_kernel[tiling.grid](
            eps, n_rows, n_cols, seed, first_counter, philox_state, tiling.cols_per_split,
            BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP, num_warps=tiling.num_warps,
        )
    return eps


def _clamp_limits(logvar_clamp: tuple[float, float] | None) -> tuple[float | None, float | None]:
    """``(logvar_min, logvar_max)`` of the hard clamp, as the kernels take them: both ``None`` without it."""
    return (None, None) if logvar_clamp is None else (float(logvar_clamp[0]), float(logvar_clamp[1]))


class _Matrix:
    """An input as the kernels read it: the tensor handed over and its ``(outer, inner, col)`` strides."""

    def __init__(self, tensor: torch.Tensor | None, shape: torch.Size, event_dims: int):
        self.tensor, self.strides = split_rows(tensor, shape, event_dims) if tensor is not None else (None, (0, 0, 0))

    def pointer(self, fallback: torch.Tensor) -> torch.Tensor:
        """The tensor, or ``fallback`` as a valid pointer for an input that a constexpr flag switches off."""
        return self.tensor if self.tensor is not None else fallback


def prior_grad_mode(prior: torch.Tensor | None, shape: torch.Size, event_dims: int, needed: bool) -> str:
    """How the backward kernel writes a prior's gradient (module docstring): ``"none"``, ``"elements"`` or
    ``"columns"`` (a prior shared by all rows: of size 1 along every leading dim)."""
    if prior is None or not needed:
        return "none"
    n_lead = len(shape) - event_dims
    aligned = (1,) * (len(shape) - prior.dim()) + tuple(prior.shape)
    return "columns" if all(size == 1 for size in aligned[:n_lead]) else "elements"


def reparameterize_kl_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: int,
    first_counter: int,
    *,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
    logvar_clamp: tuple[float, float] | None = None,
    philox_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on non-empty ``(*lead, *event)`` tensors (any strides; priors broadcast to ``mu``).

    Returns ``z`` (contiguous, ``mu``'s shape and dtype) and the KL per row
    (float32, shape ``mu.shape[:-event_dims]``). ``seed``/``first_counter`` are
    ignored when ``eps`` is given, or when ``philox_state`` (int64 ``(2,)`` on
    ``mu``'s device: ``[seed, first_counter]``) is, which the kernel reads instead.
    ``logvar_limit`` (soft) or ``logvar_clamp = (lo, hi)`` (hard, as ``torch.clamp``) clamps ``logvar`` and
    ``prior_logvar`` in registers (at most one of them).
    """
    shape = mu.shape
    n_cols = event_size(shape, event_dims)
    n_rows = mu.numel() // n_cols
    n_inner = math.prod(shape[1 : len(shape) - event_dims])
    mu2, logvar2, eps2, prior_mu2, prior_logvar2 = (
        _Matrix(t, shape, event_dims) for t in (mu, logvar, eps, prior_mu, prior_logvar)
    )
    tiling = plan_rows(n_rows, n_cols, mu.device, min_block_cols=GROUP)
    z = torch.empty(shape, dtype=mu.dtype, device=mu.device)
    kl = torch.empty((n_rows, tiling.n_splits), dtype=torch.float32, device=mu.device)
    with device_guard(mu):
        _reparameterize_kl_forward_kernel[tiling.grid](
            mu2.tensor, logvar2.tensor, eps2.pointer(mu2.tensor), prior_mu2.tensor, prior_logvar2.tensor, z, kl,
            n_rows, n_cols, n_inner,
            *mu2.strides, *logvar2.strides, *eps2.strides, *prior_mu2.strides, *prior_logvar2.strides,
            seed, first_counter, philox_state if eps is None else None, tiling.cols_per_split, logvar_limit,
            *_clamp_limits(logvar_clamp),
            HAS_EPS=eps is not None, BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP,
            num_warps=tiling.num_warps,
        )
    kl = kl.sum(dim=1) if tiling.n_splits > 1 else kl.view(n_rows)
    return z, kl.view(shape[: len(shape) - event_dims])


def _prior_grad_buffer(mode: str, prior: torch.Tensor | None, shape: torch.Size, row_tiles: int, n_cols: int):
    """Where the backward kernel writes a prior's gradient: per element (in the prior's dtype when that is the
    gradient itself, else float32 for the sum that follows), or per row tile and column (float32)."""
    if mode == "elements":
        dtype = prior.dtype if prior.shape == shape else torch.float32
        return torch.empty(shape, dtype=dtype, device=prior.device)
    if mode == "columns":
        return torch.empty((row_tiles, n_cols), dtype=torch.float32, device=prior.device)
    return None


def _prior_grad(mode: str, buffer: torch.Tensor | None, prior: torch.Tensor | None, shape: torch.Size,
                event_dims: int) -> torch.Tensor | None:
    """The gradient of ``prior`` from the kernel's ``buffer``, summed over the dims the prior is broadcast along."""
    if mode == "none":
        return None
    if mode == "columns":  # add up the row tiles: the event's shape, with a size-1 dim per leading dim
        n_lead = len(shape) - event_dims
        buffer = buffer.sum(dim=0).view((1,) * n_lead + tuple(shape[n_lead:]))
    if buffer.shape != prior.shape:
        buffer = buffer.sum_to_size(prior.shape)
    return buffer.to(prior.dtype)


def reparameterize_kl_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: int,
    first_counter: int,
    *,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
    logvar_clamp: tuple[float, float] | None = None,
    prior_grads: tuple[bool, bool] = (False, False),
    philox_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel; returns new ``grad_mu`` and ``grad_logvar`` (contiguous), and the gradients of
    ``prior_mu`` and ``prior_logvar`` in their own shapes where ``prior_grads`` asks for them (else ``None``).

    ``grad_z`` has ``mu``'s shape, ``grad_kl`` its shape without the event
    dims (any strides: a stride-0 broadcast of a scalar gradient is read in
    place); either may be ``None`` (that output was unused; without
    ``grad_kl`` the priors get no gradient). Without ``eps`` the noise is
    regenerated from ``seed`` and ``first_counter``, or from ``philox_state``
    when it is given (the forward's, read by the kernel).
    """
    shape = mu.shape
    n_cols = event_size(shape, event_dims)
    n_rows = mu.numel() // n_cols
    n_inner = math.prod(shape[1 : len(shape) - event_dims])
    grad_z2, mu2, logvar2, eps2, prior_mu2, prior_logvar2 = (
        _Matrix(t, shape, event_dims) for t in (grad_z, mu, logvar, eps, prior_mu, prior_logvar)
    )
    grad_kl1 = grad_kl.reshape(n_rows) if grad_kl is not None else None
    modes = [
        prior_grad_mode(prior, shape, event_dims, needed and grad_kl is not None)
        for prior, needed in zip((prior_mu, prior_logvar), prior_grads)
    ]
    min_block_rows = COLUMN_BLOCK_ROWS if "columns" in modes else 1
    tiling = plan_rows(n_rows, n_cols, mu.device, min_block_cols=GROUP, min_block_rows=min_block_rows)
    grad_mu = torch.empty(shape, dtype=mu.dtype, device=mu.device)
    grad_logvar = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    buffers = [
        _prior_grad_buffer(mode, prior, shape, tiling.row_tiles, n_cols)
        for mode, prior in zip(modes, (prior_mu, prior_logvar))
    ]
    unused = mu2.tensor  # a valid pointer for the arguments that a constexpr switches off
    with device_guard(mu):
        _reparameterize_kl_backward_kernel[tiling.grid](
            grad_z2.pointer(unused), grad_kl1 if grad_kl1 is not None else unused,
            mu2.tensor, logvar2.tensor, eps2.pointer(unused), prior_mu2.tensor, prior_logvar2.tensor,
            grad_mu, grad_logvar, *buffers,
            n_rows, n_cols, n_inner,
            *grad_z2.strides, grad_kl1.stride(0) if grad_kl1 is not None else 0,
            *mu2.strides, *logvar2.strides, *eps2.strides, *prior_mu2.strides, *prior_logvar2.strides,
            seed, first_counter, philox_state if eps is None and grad_z is not None else None, tiling.cols_per_split,
            logvar_limit, *_clamp_limits(logvar_clamp), *(int(mode == "columns") for mode in modes),
            HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None, HAS_EPS=eps is not None,
            BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP, num_warps=tiling.num_warps,
        )
    grad_prior_mu, grad_prior_logvar = (
        _prior_grad(mode, buffer, prior, shape, event_dims) for mode, buffer, prior in zip(modes, buffers, (prior_mu, prior_logvar))
    )
    return grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar
