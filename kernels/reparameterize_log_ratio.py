"""Fused importance samples of a diagonal Gaussian posterior and their log density ratio to a prior, forward and backward.

The IWAE bound needs, for each of ``K`` samples ``z_k ~ q(z | x)`` per input,
the latent part of its log importance weight, ``log p(z_k) - log q(z_k | x)``.
The inputs ``mu``, ``logvar`` of shape ``(*lead, *event)`` are seen as an
``(R, n_cols)`` matrix (one row per value of the leading dims, one column per
element of the event, as in :mod:`fastvae.kernels.reparameterize_kl`); the
output ``z`` of shape ``(K, *lead, *event)`` is a ``(K R, n_cols)`` matrix
whose row ``k R + j`` is sample ``k`` of row ``j``. With ``c`` the optional
soft clamp (``logvar_limit``), ``lv = c(logvar)``, ``plv = c(prior_logvar)``,
``pmu = prior_mu`` (both 0 when not given: the prior N(0, I)), per element::

    z = mu + exp(lv / 2) * eps,        t = (z - pmu) exp(-plv / 2),        s = t exp(-plv / 2)
    log_ratio = 0.5 * sum_cols ((lv - plv) + (eps - t)(eps + t))       (one value per row k R + j)

which is ``log N(z; pmu, e^plv) - log N(z; mu, e^lv)`` summed over the event
(the ``log 2 pi`` terms cancel; ``(eps - t)(eps + t)`` is ``eps^2 - t^2``
without the cancellation of two squares where the prior matches the posterior).
Its gradients, with ``g`` the upstream gradient of the row's log ratio and
``eps`` held fixed (the reparameterized, "total" derivative: through ``z`` and
through both densities, the estimator of Burda et al.)::

    grad_mu      = sum_k (grad_z - g s)
    grad_logvar  = 0.5 sum_k (exp(lv / 2) eps (grad_z - g s) + g) * c'(logvar)
    grad_prior_mu = g s,    grad_prior_logvar = 0.5 g (t^2 - 1) * c'(prior_logvar)

Layout. ``mu`` and ``logvar`` are read in place, as
:func:`fastvae.kernels.launch.split_rows` describes (the halves of a linear
head, the channel slices of a conv output), and never expanded: a program
loads a tile of their rows and columns (and of a prior broadcast along ``K``)
once, then loops over the ``K`` samples, drawing each one's noise, writing its
``z`` and its partial log ratio over the tile's columns (one value per row and
block of columns, added up afterwards where a row spans several blocks). A
tensor of the output's shape (``eps``, ``grad_z``, a prior per sample) has a
fourth stride, along ``K``, and is read for each sample; the backward sums
``mu``'s and ``logvar``'s gradients over ``K`` in registers and writes them
once, at ``mu``'s size, as it does for a prior broadcast along ``K``.

Noise. Element ``(k R + j, col)`` of the output takes normal ``col % 4`` of
the Philox round ``first_counter + (k R + j) ceil(n_cols / 4) + col // 4``
(:func:`fastvae.kernels.reparameterize_kl.standard_normal`, shared with that
op): the noise of a call on ``(K, *lead, *event)`` is the noise
``reparameterize_kl`` would draw for that shape, and
:func:`fastvae.kernels.reparameterize_kl.draw_noise` writes it out bit for bit
for a differentiable backward. The backward regenerates it; it is never stored.

Memory traffic, in units of the element count n of ``mu`` times the element
size (the log ratios, ``K R`` floats, and their gradients left out):

=======================================  ===============================================  ========================
pass                                     reads / writes                                   units
=======================================  ===============================================  ========================
forward                                  mu, logvar -> z (K samples)                      2 + K (2 + 2K with eps)
backward                                 grad_z, mu, logvar -> grad_mu, grad_logvar       4 + K (4 + 2K with eps)
forward + backward                                                                        6 + 2K (6 + 4K with eps)
a prior tensor of mu's shape             forward: read; backward: read, its gradient      +1 forward, +2 backward
  (broadcast along K)                    written once (summed over K in registers)
a prior tensor per sample (K, ...)       forward: read; backward: read, gradient written  +K forward, +2K backward
a prior shared by all rows               as for reparameterize_kl: n / R elements and     +0 forward, +1/8 backward
                                         the partial column sums of its gradient          (float32)
logvar_limit                             nothing: computed in registers                   0
=======================================  ===============================================  ========================

A float32 sample moves about 4.4 bytes (its ``z``, a share of ``mu`` and ``logvar``), a budget of some 50
instructions on the sm_90 audit's H100 model, where drawing its noise takes 21: a linear head's kernels take 45 to
58 per element in float32 (under their memory time) and 46 to 59 in bfloat16 (1.5 to 2 times it, the noise alone some
1.3 at 20 columns padded to 32): ``python -m benchmarks --static --scenario log_ratio``, docs/iwae.md.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import INT32_INDEX_LIMIT, _split_strides, device_guard, fast_exp, needs_int64, plan_rows, split_rows, sum_splits

# Shared with reparameterize_kl: the noise (the one generator of fastvae's kernels, so that both ops draw the same
# noise for the same counters and a faster noise serves both), the Philox state, the soft clamp, and the host-side
# helpers for the event's size, the rounds a call consumes and a shared prior's gradient, and the tiling: a program's
# span, its row offsets, the loads and stores of a tile whose groups of four columns are one vector where aligned.
from .reparameterize_kl import (
    COLUMN_BLOCK_ROWS,
    GROUP,
    _load_inputs,
    _load_tile,
    _multiple_of_4,
    _philox_state,
    _prior_grad,
    _program_span,
    _row_starts,
    _soft_clamp,
    _step,
    _store_prior_grad,
    _store_tile,
    event_size,
    prior_grad_mode,
    standard_normal,
)
from .reparameterize_kl import philox_rounds as output_rounds


@triton.jit
def _sample_counter(first_counter, sample, n_rows, groups_per_row):
    """The Philox round before sample ``sample``'s: its rows are rows ``sample * n_rows + j`` of the ``(K R, n_cols)``
    output. A scalar per sample (int64), so that the per-element part of the counter stays out of the sample loop."""
    return tl.cast(first_counter, tl.int64) + sample.to(tl.int64) * n_rows * groups_per_row


@triton.jit
def _log_ratio_terms(z, eps, logvar, prior_mu, prior_logvar, HAS_PRIOR_MU: tl.constexpr,
                     HAS_PRIOR_LOGVAR: tl.constexpr):
    """``(t, s, term)`` of the module docstring: the standardized ``z`` under the prior, ``t e^{-plv/2}``, and
    the element's term of ``2 log_ratio``. Without a prior they are ``z, z, lv + (eps - z)(eps + z)``.

    A masked lane (every input loaded as 0, so ``std = 1``) has ``z = eps = t`` and a term of exactly 0: the row
    sums need no mask."""
    diff = z
    if HAS_PRIOR_MU:
        diff = z - prior_mu
    t = diff
    s = diff
    log_ratio = logvar
    if HAS_PRIOR_LOGVAR:
        inv_sd = fast_exp(prior_logvar, -0.5)
        t = diff * inv_sd
        s = t * inv_sd
        log_ratio = logvar - prior_logvar
    return t, s, log_ratio + (eps - t) * (eps + t)


@triton.jit
def _row_sums(x):
    """Sums over a tile's columns, ``[R, 1, 1]`` in the tile's own layout: stored from there, with no layout change
    (through shared memory) in the sample loop."""
    return tl.sum(tl.sum(x, axis=2, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _sample_prior(ptr, sample, stride_sample, starts, col0, groups, stride_col, row_mask, n_left, logvar_limit,
                  IS_LOGVAR: tl.constexpr, ALIGNED: tl.constexpr):
    """Sample ``sample``'s tile of a prior tensor that varies along K, in float32 (a log-variance soft-clamped when
    ``logvar_limit`` is given), and the clamp's slope (1 without it)."""
    value = _load_tile(ptr, _of_sample(starts, sample, stride_sample, ALIGNED), col0, groups, stride_col, row_mask, n_left, ALIGNED)
    slope = tl.zeros_like(value) + 1.0
    if IS_LOGVAR and logvar_limit is not None:
        value, slope = _soft_clamp(value, logvar_limit, ptr.dtype.element_ty == tl.float32)
    return value, slope


@triton.jit
def _of_sample(starts, sample, stride_sample, ALIGNED: tl.constexpr):
    """Row offsets ``starts`` of a tensor's first sample moved to sample ``sample`` (``stride_sample`` along K; a
    multiple of four where ``ALIGNED``: the launcher checked), still declared multiples of four, so that the loads
    and stores stay vectors: per row a thread holds, not per element."""
    starts = starts + sample * stride_sample
    if ALIGNED:
        starts = _multiple_of_4(starts)
    return starts


@triton.jit
def _input_rows(rows, n_inner, prior_mu_ptr, prior_logvar_ptr, stride_mu_outer, stride_mu_inner, stride_logvar_outer,
                stride_logvar_inner, stride_prior_mu_outer, stride_prior_mu_inner, stride_prior_logvar_outer,
                stride_prior_logvar_inner, ALIGNED: tl.constexpr, PRIOR_ALIGNED: tl.constexpr):
    """Row offsets of ``mu``, ``logvar`` and the priors (a prior per sample: its first sample's, the others lie
    ``sample * stride_sample`` on), once per program; ``mu``'s for an absent prior (never read)."""
    mu_rows = _row_starts(rows, n_inner, stride_mu_outer, stride_mu_inner, ALIGNED)
    logvar_rows = _row_starts(rows, n_inner, stride_logvar_outer, stride_logvar_inner, ALIGNED)
    prior_mu_rows = mu_rows
    if prior_mu_ptr is not None:
        prior_mu_rows = _row_starts(rows, n_inner, stride_prior_mu_outer, stride_prior_mu_inner, PRIOR_ALIGNED)
    prior_logvar_rows = mu_rows
    if prior_logvar_ptr is not None:
        prior_logvar_rows = _row_starts(rows, n_inner, stride_prior_logvar_outer, stride_prior_logvar_inner,
                                        PRIOR_ALIGNED)
    return mu_rows, logvar_rows, prior_mu_rows, prior_logvar_rows


# Both kernels take a tile of mu's rows and columns, load the posterior (and a prior shared by the samples) once,
# and loop over the samples inside: the noise, z and the log ratio's terms of each sample, and (backward) the
# gradients summed over the samples in registers. The tiling is reparameterize_kl's (_program_span, _row_starts,
# _load_tile, _store_tile: int32 indices below 2**30 elements, a group of four columns one vector where ALIGNED);
# what depends on the row alone is computed once per program, and a sample moves each pointer by a scalar.


@triton.jit
def _log_ratio_forward_kernel(
    mu_ptr, logvar_ptr, eps_ptr, prior_mu_ptr, prior_logvar_ptr, z_ptr, log_ratio_ptr,
    n_samples, n_rows, n_cols, n_inner, n_col_blocks,
    stride_mu_outer, stride_mu_inner, stride_mu_col,
    stride_logvar_outer, stride_logvar_inner, stride_logvar_col,
    stride_eps_sample, stride_eps_outer, stride_eps_inner, stride_eps_col,
    stride_prior_mu_sample, stride_prior_mu_outer, stride_prior_mu_inner, stride_prior_mu_col,
    stride_prior_logvar_sample, stride_prior_logvar_outer, stride_prior_logvar_inner, stride_prior_logvar_col,
    seed, first_counter, philox_ptr, cols_per_split, logvar_limit,
    HAS_EPS: tl.constexpr, PRIOR_MU_PER_SAMPLE: tl.constexpr, PRIOR_LOGVAR_PER_SAMPLE: tl.constexpr,
    ALIGNED: tl.constexpr, PRIOR_ALIGNED: tl.constexpr, SAMPLES_ALIGNED: tl.constexpr, INT64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS, INT64)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    row_mask = rows < n_rows
    HAS_PRIOR_MU: tl.constexpr = prior_mu_ptr is not None
    HAS_PRIOR_LOGVAR: tl.constexpr = prior_logvar_ptr is not None
    mu_rows, logvar_rows, prior_mu_rows, prior_logvar_rows = _input_rows(
        rows, n_inner, prior_mu_ptr, prior_logvar_ptr, stride_mu_outer, stride_mu_inner, stride_logvar_outer,
        stride_logvar_inner, stride_prior_mu_outer, stride_prior_mu_inner, stride_prior_logvar_outer,
        stride_prior_logvar_inner, ALIGNED, PRIOR_ALIGNED,
    )
    eps_rows = mu_rows
    if HAS_EPS:
        eps_rows = _row_starts(rows, n_inner, stride_eps_outer, stride_eps_inner, SAMPLES_ALIGNED)
    z_rows = rows * n_cols  # z is contiguous: sample k's rows lie k n_rows n_cols on
    if SAMPLES_ALIGNED:
        z_rows = _multiple_of_4(z_rows)
    z_sample = n_rows * n_cols
    log_ratio_rows = rows * n_col_blocks
    groups = tl.arange(0, BLOCK_GROUPS)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    # A while loop, not range(): Triton 3.6's interpreter cannot take a kernel argument or a tensor as a bound.
    while group_start < group_end:
        col0, n_left = _step(group_start, col_end, BLOCK_GROUPS)
        mu, logvar, prior_mu, prior_logvar, _, _ = _load_inputs(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows,
            prior_logvar_rows, col0, groups, row_mask, row_mask, n_left, stride_mu_col, stride_logvar_col,
            stride_prior_mu_col, stride_prior_logvar_col, logvar_limit, None, None,
            HAS_PRIOR_MU and not PRIOR_MU_PER_SAMPLE, HAS_PRIOR_LOGVAR and not PRIOR_LOGVAR_PER_SAMPLE,
            ALIGNED and PRIOR_ALIGNED,
        )
        std = fast_exp(logvar, 0.5)
        # Each sample's log ratio over this block of columns: one partial sum per row and column block.
        col_block = group_start // BLOCK_GROUPS
        sample = tile * 0  # int64 with INT64: sample k's offsets pass 2**31 in a large output
        while sample < n_samples:
            if PRIOR_MU_PER_SAMPLE:
                prior_mu, _ = _sample_prior(prior_mu_ptr, sample, stride_prior_mu_sample, prior_mu_rows, col0, groups,
                                            stride_prior_mu_col, row_mask, n_left, logvar_limit, False, PRIOR_ALIGNED)
            if PRIOR_LOGVAR_PER_SAMPLE:
                prior_logvar, _ = _sample_prior(prior_logvar_ptr, sample, stride_prior_logvar_sample,
                                                prior_logvar_rows, col0, groups, stride_prior_logvar_col, row_mask,
                                                n_left, logvar_limit, True, PRIOR_ALIGNED)
            if HAS_EPS:
                eps = _load_tile(eps_ptr, _of_sample(eps_rows, sample, stride_eps_sample, SAMPLES_ALIGNED), col0, groups, stride_eps_col,
                                 row_mask, n_left, SAMPLES_ALIGNED)
            else:
                eps = standard_normal(seed, _sample_counter(first_counter, sample, n_rows, groups_per_row), rows,
                                      group_start + groups, lanes, groups_per_row)
            z = mu + std * eps
            _store_tile(z_ptr, _of_sample(z_rows, sample, z_sample, SAMPLES_ALIGNED), col0, groups, row_mask, n_left, z, SAMPLES_ALIGNED)
            _, _, term = _log_ratio_terms(z, eps, logvar, prior_mu, prior_logvar, HAS_PRIOR_MU, HAS_PRIOR_LOGVAR)
            tl.store(log_ratio_ptr + sample * (n_rows * n_col_blocks) + log_ratio_rows + col_block,
                     0.5 * _row_sums(term), mask=row_mask)
            sample += 1
        group_start += BLOCK_GROUPS


@triton.jit
def _log_ratio_backward_kernel(
    grad_z_ptr, grad_log_ratio_ptr, mu_ptr, logvar_ptr, eps_ptr, prior_mu_ptr, prior_logvar_ptr,
    grad_mu_ptr, grad_logvar_ptr, grad_prior_mu_ptr, grad_prior_logvar_ptr,
    n_samples, n_rows, n_cols, n_inner,
    stride_grad_z_sample, stride_grad_z_outer, stride_grad_z_inner, stride_grad_z_col, stride_grad_log_ratio,
    stride_mu_outer, stride_mu_inner, stride_mu_col,
    stride_logvar_outer, stride_logvar_inner, stride_logvar_col,
    stride_eps_sample, stride_eps_outer, stride_eps_inner, stride_eps_col,
    stride_prior_mu_sample, stride_prior_mu_outer, stride_prior_mu_inner, stride_prior_mu_col,
    stride_prior_logvar_sample, stride_prior_logvar_outer, stride_prior_logvar_inner, stride_prior_logvar_col,
    seed, first_counter, philox_ptr, cols_per_split, logvar_limit, prior_mu_grad_by_columns,
    prior_logvar_grad_by_columns,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_LOG_RATIO: tl.constexpr, HAS_EPS: tl.constexpr,
    PRIOR_MU_PER_SAMPLE: tl.constexpr, PRIOR_LOGVAR_PER_SAMPLE: tl.constexpr, ALIGNED: tl.constexpr,
    PRIOR_ALIGNED: tl.constexpr, SAMPLES_ALIGNED: tl.constexpr, INT64: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS, INT64)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    row_mask = rows < n_rows
    # The priors matter to the log ratio's gradient alone.
    HAS_PRIOR_MU: tl.constexpr = HAS_GRAD_LOG_RATIO and prior_mu_ptr is not None
    HAS_PRIOR_LOGVAR: tl.constexpr = HAS_GRAD_LOG_RATIO and prior_logvar_ptr is not None
    MU_PER_SAMPLE: tl.constexpr = HAS_PRIOR_MU and PRIOR_MU_PER_SAMPLE
    LOGVAR_PER_SAMPLE: tl.constexpr = HAS_PRIOR_LOGVAR and PRIOR_LOGVAR_PER_SAMPLE
    mu_rows, logvar_rows, prior_mu_rows, prior_logvar_rows = _input_rows(
        rows, n_inner, prior_mu_ptr, prior_logvar_ptr, stride_mu_outer, stride_mu_inner, stride_logvar_outer,
        stride_logvar_inner, stride_prior_mu_outer, stride_prior_mu_inner, stride_prior_logvar_outer,
        stride_prior_logvar_inner, ALIGNED, PRIOR_ALIGNED,
    )
    grad_z_rows = mu_rows
    if HAS_GRAD_Z:
        grad_z_rows = _row_starts(rows, n_inner, stride_grad_z_outer, stride_grad_z_inner, SAMPLES_ALIGNED)
    eps_rows = mu_rows
    if HAS_EPS:
        eps_rows = _row_starts(rows, n_inner, stride_eps_outer, stride_eps_inner, SAMPLES_ALIGNED)
    out_rows = rows * n_cols  # the gradients are contiguous; a prior's per sample lie k n_rows n_cols on
    if SAMPLES_ALIGNED:
        out_rows = _multiple_of_4(out_rows)
    out_sample = n_rows * n_cols
    groups = tl.arange(0, BLOCK_GROUPS)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    while group_start < group_end:
        col0, n_left = _step(group_start, col_end, BLOCK_GROUPS)
        mu, logvar, prior_mu, prior_logvar, slope, prior_slope = _load_inputs(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows,
            prior_logvar_rows, col0, groups, row_mask, row_mask, n_left, stride_mu_col, stride_logvar_col,
            stride_prior_mu_col, stride_prior_logvar_col, logvar_limit, None, None,
            HAS_PRIOR_MU and not PRIOR_MU_PER_SAMPLE, HAS_PRIOR_LOGVAR and not PRIOR_LOGVAR_PER_SAMPLE,
            ALIGNED and PRIOR_ALIGNED,
        )
        std = fast_exp(logvar, 0.5)
        grad_mu = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        grad_std_eps_eps = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)  # sum_k eps (grad_z - g s)
        grad_prior_mu = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        grad_prior_logvar = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        g_sum = tl.zeros([BLOCK_ROWS, 1, 1], dtype=tl.float32)
        sample = tile * 0  # int64 with INT64
        while sample < n_samples:
            if HAS_EPS:
                eps = _load_tile(eps_ptr, _of_sample(eps_rows, sample, stride_eps_sample, SAMPLES_ALIGNED), col0, groups, stride_eps_col,
                                 row_mask, n_left, SAMPLES_ALIGNED)
            else:
                eps = standard_normal(seed, _sample_counter(first_counter, sample, n_rows, groups_per_row), rows,
                                      group_start + groups, lanes, groups_per_row)
            grad_std_eps = tl.zeros_like(mu)  # d(loss)/d(std * eps) of this sample
            if HAS_GRAD_Z:
                grad_std_eps = _load_tile(grad_z_ptr, _of_sample(grad_z_rows, sample, stride_grad_z_sample, SAMPLES_ALIGNED), col0, groups,
                                          stride_grad_z_col, row_mask, n_left, SAMPLES_ALIGNED)
            if HAS_GRAD_LOG_RATIO:
                g = tl.load(grad_log_ratio_ptr + (sample * n_rows + rows) * stride_grad_log_ratio, mask=row_mask,
                            other=0.0).to(tl.float32)
                if MU_PER_SAMPLE:
                    prior_mu, _ = _sample_prior(prior_mu_ptr, sample, stride_prior_mu_sample, prior_mu_rows, col0,
                                                groups, stride_prior_mu_col, row_mask, n_left, logvar_limit, False,
                                                PRIOR_ALIGNED)
                if LOGVAR_PER_SAMPLE:
                    prior_logvar, prior_slope = _sample_prior(
                        prior_logvar_ptr, sample, stride_prior_logvar_sample, prior_logvar_rows, col0, groups,
                        stride_prior_logvar_col, row_mask, n_left, logvar_limit, True, PRIOR_ALIGNED,
                    )
                t, s, _ = _log_ratio_terms(mu + std * eps, eps, logvar, prior_mu, prior_logvar, HAS_PRIOR_MU,
                                           HAS_PRIOR_LOGVAR)
                g_s = g * s
                grad_std_eps -= g_s
                g_sum += g
                sample_prior_logvar = 0.5 * g * (t * t - 1.0)
                if logvar_limit is not None:
                    sample_prior_logvar *= prior_slope
                if MU_PER_SAMPLE:
                    if grad_prior_mu_ptr is not None:
                        _store_tile(grad_prior_mu_ptr, _of_sample(out_rows, sample, out_sample, SAMPLES_ALIGNED), col0,
                                    groups, row_mask, n_left, g_s, SAMPLES_ALIGNED)
                else:
                    grad_prior_mu += g_s
                if LOGVAR_PER_SAMPLE:
                    if grad_prior_logvar_ptr is not None:
                        _store_tile(grad_prior_logvar_ptr, _of_sample(out_rows, sample, out_sample, SAMPLES_ALIGNED), col0,
                                    groups, row_mask, n_left, sample_prior_logvar, SAMPLES_ALIGNED)
                else:
                    grad_prior_logvar += sample_prior_logvar
            grad_mu += grad_std_eps
            grad_std_eps_eps += eps * grad_std_eps
            sample += 1
        # grad_logvar = 0.5 sum_k (std eps (grad_z - g s) + g): std taken out of the sum.
        grad_logvar = 0.5 * (std * grad_std_eps_eps + g_sum)
        if logvar_limit is not None:
            grad_logvar *= slope
        _store_tile(grad_mu_ptr, out_rows, col0, groups, row_mask, n_left, grad_mu, SAMPLES_ALIGNED)
        _store_tile(grad_logvar_ptr, out_rows, col0, groups, row_mask, n_left, grad_logvar, SAMPLES_ALIGNED)
        if HAS_PRIOR_MU and not PRIOR_MU_PER_SAMPLE:
            _store_prior_grad(grad_prior_mu_ptr, out_rows, grad_prior_mu, prior_mu_grad_by_columns, col0, groups,
                              row_mask, n_left, tile, n_cols, SAMPLES_ALIGNED)
        if HAS_PRIOR_LOGVAR and not PRIOR_LOGVAR_PER_SAMPLE:
            _store_prior_grad(grad_prior_logvar_ptr, out_rows, grad_prior_logvar, prior_logvar_grad_by_columns, col0,
                              groups, row_mask, n_left, tile, n_cols, SAMPLES_ALIGNED)
        group_start += BLOCK_GROUPS


class _SampledMatrix:
    """An input as the kernels read it: the tensor handed over and its ``(sample, outer, inner, col)`` strides.

    ``tensor`` broadcasts to the output's shape ``(K, *lead, *event)`` (or to
    ``(*lead, *event)`` without a sample dim). Its first sample is read as
    :func:`~fastvae.kernels.launch.split_rows` reads a tensor of ``mu``'s shape
    (a view where its layout allows, else a copy); ``sample`` is its stride
    along ``K``: 0 where it is broadcast along ``K``. ``per_sample``: it varies along ``K``.
    """

    def __init__(self, tensor: torch.Tensor | None, shape: torch.Size, samples: int | None, event_dims: int):
        self.tensor, self.strides, self.per_sample = None, (0, 0, 0, 0), False
        if tensor is None:
            return
        if samples is None:
            self.tensor, strides = split_rows(tensor, shape, event_dims)
            self.strides = (0, *strides)
            return
        full = tensor.expand(samples, *shape)
        sample = full.stride(0) if samples > 1 else 0
        if sample == 0:  # broadcast along K: read as a tensor of mu's shape
            self.tensor, strides = split_rows(full[0], shape, event_dims)
            self.strides = (0, *strides)
            return
        n_lead = len(shape) - event_dims
        strides = _split_strides(full.shape[1:], full.stride()[1:], n_lead)
        if strides is None:
            full = full.contiguous()
            sample, strides = full.stride(0), _split_strides(full.shape[1:], full.stride()[1:], n_lead)
        self.tensor, self.strides, self.per_sample = full, (sample, *strides), True

    def pointer(self, fallback: torch.Tensor) -> torch.Tensor:
        """The tensor, or ``fallback`` as a valid pointer for an input that a constexpr flag switches off."""
        return self.tensor if self.tensor is not None else fallback

    def aligned(self) -> bool:
        """Whether each row of each sample starts at a multiple of four elements, on a 16-byte aligned tensor, with
        unit column stride (a group of four columns loads as one vector). True when absent."""
        if self.tensor is None:
            return True
        sample, outer, inner, col = self.strides
        return (col == 1 and sample % GROUP == 0 and outer % GROUP == 0 and inner % GROUP == 0
                and self.tensor.data_ptr() % 16 == 0)


def _flags(n_cols: int, out_elements: int, posterior: list[_SampledMatrix], priors: list[_SampledMatrix],
           per_sample: list[_SampledMatrix]) -> dict:
    """The kernels' flags. ``ALIGNED``, ``PRIOR_ALIGNED``, ``SAMPLES_ALIGNED``: rows of whole groups of four columns,
    each on a vector boundary (a group loads as one vector), in ``mu`` and ``logvar``, in the priors, in the tensors
    read or written at each sample's offset (``z``, ``eps``, ``grad_z``) and the contiguous outputs. Apart because a
    linear head's halves in half precision often start off a 16-byte boundary (the second half of 20 columns, 40
    bytes on) where ``z`` and ``grad_z`` do not: the K-fold traffic stays vectors. ``INT64``: an input, or the
    output of ``out_elements``, too large for int32 indices (:func:`~fastvae.kernels.launch.needs_int64`)."""
    whole_groups = n_cols % GROUP == 0
    return {
        "ALIGNED": whole_groups and all(m.aligned() for m in posterior),
        "PRIOR_ALIGNED": whole_groups and all(m.aligned() for m in priors),
        "SAMPLES_ALIGNED": whole_groups and all(m.aligned() for m in per_sample),
        "INT64": out_elements >= INT32_INDEX_LIMIT or needs_int64(*(m.tensor for m in posterior + priors + per_sample)),
    }


def output_shape(shape: torch.Size, samples: int | None) -> torch.Size:
    """The shape of ``z``: ``(samples, *shape)``, or ``shape`` without a sample dim."""
    return shape if samples is None else torch.Size((samples, *shape))


def philox_rounds(shape: torch.Size, samples: int | None, event_dims: int = 1) -> int:
    """Philox rounds one call consumes for ``samples`` draws of noise for ``mu`` of ``shape``."""
    return output_rounds(output_shape(shape, samples), event_dims)


# Elements a program takes per trip through its loop: 8 a thread at 8 warps. The noise and the loop over the samples
# keep more values live than reparameterize_kl does: at 16 a thread (its 4096) the kernels spill.
BLOCK_ELEMENTS = 2048
NUM_WARPS = 8


def _plan(n_rows: int, n_cols: int, device: torch.device, min_block_rows: int = 1):
    """The launch plan of both kernels over ``mu``'s ``n_rows`` rows (see :func:`~fastvae.kernels.launch.plan_rows`)."""
    return plan_rows(n_rows, n_cols, device, min_block_cols=GROUP, min_block_rows=min_block_rows,
                     block_elements=BLOCK_ELEMENTS, num_warps=NUM_WARPS)


def _matrix(shape: torch.Size, event_dims: int) -> tuple[int, int, int]:
    """``(rows, columns, inner rows)`` of ``mu``'s shape: see :func:`~fastvae.kernels.launch.split_rows`."""
    n_cols = event_size(shape, event_dims)
    n_lead = len(shape) - event_dims
    return math.prod(shape[:n_lead]), n_cols, math.prod(shape[1:n_lead])


def reparameterize_log_ratio_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: int,
    first_counter: int,
    *,
    samples: int | None = None,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
    philox_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on non-empty tensors (``mu``, ``logvar`` of one shape, any strides; ``eps`` and
    the priors broadcast to the output's shape).

    Returns ``z`` (contiguous, :func:`output_shape`, ``mu``'s dtype) and the
    log ratio per row (float32, ``z``'s shape without the event dims).
    ``seed``/``first_counter`` are ignored when ``eps`` is given, or when
    ``philox_state`` (int64 ``(2,)`` on ``mu``'s device) is, which the kernel reads instead.
    """
    shape = mu.shape
    out_shape = output_shape(shape, samples)
    n_rows, n_cols, n_inner = _matrix(shape, event_dims)
    n_samples = samples or 1
    mu2, logvar2 = (_SampledMatrix(t, shape, None, event_dims) for t in (mu, logvar))
    eps2, prior_mu2, prior_logvar2 = (_SampledMatrix(t, shape, samples, event_dims) for t in (eps, prior_mu, prior_logvar))
    tiling = _plan(n_rows, n_cols, mu.device)
    z = torch.empty(out_shape, dtype=mu.dtype, device=mu.device)
    # The log ratios' partial sums, one per row and block of columns (one block: the log ratios themselves).
    n_col_blocks = triton.cdiv(n_cols, tiling.block_cols)
    log_ratio = torch.empty((n_samples * n_rows, n_col_blocks), dtype=torch.float32, device=mu.device)
    with device_guard(mu):
        _log_ratio_forward_kernel[tiling.grid](
            mu2.tensor, logvar2.tensor, eps2.pointer(mu2.tensor), prior_mu2.tensor, prior_logvar2.tensor, z, log_ratio,
            n_samples, n_rows, n_cols, n_inner, n_col_blocks,
            *mu2.strides[1:], *logvar2.strides[1:], *eps2.strides, *prior_mu2.strides, *prior_logvar2.strides,
            seed, first_counter, philox_state if eps is None else None, tiling.cols_per_split, logvar_limit,
            HAS_EPS=eps is not None, PRIOR_MU_PER_SAMPLE=prior_mu2.per_sample,
            PRIOR_LOGVAR_PER_SAMPLE=prior_logvar2.per_sample,
            **_flags(n_cols, z.numel(), [mu2, logvar2], [prior_mu2, prior_logvar2], [eps2]),
            BLOCK_ROWS=tiling.block_rows,
            BLOCK_GROUPS=tiling.block_cols // GROUP, num_warps=tiling.num_warps,
        )
    return z, sum_splits(log_ratio).view(out_shape[: len(out_shape) - event_dims])


def prior_grad_buffer(mode: str, per_sample: bool, prior: torch.Tensor | None, shape: torch.Size,
                      samples: int | None, row_tiles: int, n_cols: int) -> torch.Tensor | None:
    """Where the backward kernel writes a prior's gradient: per element of the output (a prior per sample), per
    element of ``mu`` (summed over the samples), or per row tile and column (a prior shared by all rows)."""
    if mode == "none":
        return None
    if mode == "columns":
        return torch.empty((row_tiles, n_cols), dtype=torch.float32, device=prior.device)
    # A leading 1 for the sample dim, so that the buffer sums to any shape the prior broadcasts from.
    elements = output_shape(shape, samples) if per_sample else (shape if samples is None else (1, *shape))
    dtype = prior.dtype if tuple(prior.shape) == tuple(elements) else torch.float32
    return torch.empty(elements, dtype=dtype, device=prior.device)


def reparameterize_log_ratio_backward(
    grad_z: torch.Tensor | None,
    grad_log_ratio: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: int,
    first_counter: int,
    *,
    samples: int | None = None,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    event_dims: int = 1,
    logvar_limit: float | None = None,
    prior_grads: tuple[bool, bool] = (False, False),
    philox_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel; returns new ``grad_mu`` and ``grad_logvar`` (contiguous, ``mu``'s shape:
    summed over the samples), and the gradients of ``prior_mu`` and ``prior_logvar`` in their own shapes where
    ``prior_grads`` asks for them (else ``None``).

    ``grad_z`` has the output's shape, ``grad_log_ratio`` its shape without
    the event dims (any strides; a stride-0 broadcast is read in place); either
    may be ``None`` (that output was unused; without ``grad_log_ratio`` the
    priors get no gradient). Without ``eps`` the noise is regenerated from
    ``seed`` and ``first_counter``, or from ``philox_state`` when it is given.
    """
    shape = mu.shape
    out_shape = output_shape(shape, samples)
    n_rows, n_cols, n_inner = _matrix(shape, event_dims)
    n_samples = samples or 1
    mu2, logvar2 = (_SampledMatrix(t, shape, None, event_dims) for t in (mu, logvar))
    grad_z2, eps2, prior_mu2, prior_logvar2 = (
        _SampledMatrix(t, shape, samples, event_dims) for t in (grad_z, eps, prior_mu, prior_logvar)
    )
    grad_log_ratio1 = grad_log_ratio.reshape(n_samples * n_rows) if grad_log_ratio is not None else None
    modes = [
        prior_grad_mode(prior, out_shape, event_dims, needed and grad_log_ratio is not None)
        for prior, needed in zip((prior_mu, prior_logvar), prior_grads)
    ]
    # Read for each sample, and written for each sample, where the prior varies along K.
    per_sample = [matrix.per_sample for matrix in (prior_mu2, prior_logvar2)]
    min_block_rows = COLUMN_BLOCK_ROWS if "columns" in modes else 1
    tiling = _plan(n_rows, n_cols, mu.device, min_block_rows)
    grad_mu = torch.empty(shape, dtype=mu.dtype, device=mu.device)
    grad_logvar = torch.empty(shape, dtype=logvar.dtype, device=logvar.device)
    buffers = [
        prior_grad_buffer(mode, each, prior, shape, samples, tiling.row_tiles, n_cols)
        for mode, each, prior in zip(modes, per_sample, (prior_mu, prior_logvar))
    ]
    unused = mu2.tensor  # a valid pointer for the arguments that a constexpr switches off
    with device_guard(mu):
        _log_ratio_backward_kernel[tiling.grid](
            grad_z2.pointer(unused), grad_log_ratio1 if grad_log_ratio1 is not None else unused,
            mu2.tensor, logvar2.tensor, eps2.pointer(unused), prior_mu2.tensor, prior_logvar2.tensor,
            grad_mu, grad_logvar, *buffers,
            n_samples, n_rows, n_cols, n_inner,
            *grad_z2.strides, grad_log_ratio1.stride(0) if grad_log_ratio1 is not None else 0,
            *mu2.strides[1:], *logvar2.strides[1:], *eps2.strides, *prior_mu2.strides, *prior_logvar2.strides,
            seed, first_counter, philox_state if eps is None else None, tiling.cols_per_split,
            logvar_limit, *(int(mode == "columns") for mode in modes),
            HAS_GRAD_Z=grad_z is not None, HAS_GRAD_LOG_RATIO=grad_log_ratio is not None, HAS_EPS=eps is not None,
            PRIOR_MU_PER_SAMPLE=per_sample[0], PRIOR_LOGVAR_PER_SAMPLE=per_sample[1],
            **_flags(n_cols, n_samples * mu.numel(), [mu2, logvar2], [prior_mu2, prior_logvar2], [grad_z2, eps2]),
            BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP, num_warps=tiling.num_warps,
        )
    grad_prior_mu, grad_prior_logvar = (
        _prior_grad(mode, buffer, prior, out_shape, event_dims)
        for mode, buffer, prior in zip(modes, buffers, (prior_mu, prior_logvar))
    )
    return grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar
