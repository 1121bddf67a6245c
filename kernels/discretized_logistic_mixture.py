"""Fused negative log-likelihood of the discretized mixture of logistics, with its gradient in the forward.

Per pixel (``C`` channels, ``M`` components, ``K = 2**num_bits - 1``, bin
half-width ``h = 1 / K``), from the observed level ``k_c`` of each channel at
``y_c = 2 k_c h - 1``::

    mean_cm   = mu_cm + sum_{j<c} tanh(coef_(c,j)m) y_j         s_cm = max(log_scale_cm, -7), inv = e^-s
    a, b      = inv (y_c - h - mean_cm), inv (y_c + h - mean_cm),  u = a - b = -2 h inv
    L_cm      = log(sigmoid(b) - sigmoid(a)) = -softplus(-b) - softplus(a) + log(1 - e^u)
                (lowest level: -softplus(-b); highest level: -softplus(a))
    log p     = logsumexp_m(log_softmax(l)_m + sum_c L_cm)        nll of a sample = -sum of log p

How the kernel evaluates it, per channel and component: three exponentials
(``e^-|a|``, ``e^-|b|``, ``e^-w`` with ``w = -u = 2 h inv``), one reciprocal
and one log, shared by the value and both derivatives::

    P_a = 1 + e^-|a|, P_b = 1 + e^-|b|            (1 at the open edge: the lowest level has no P_a, the highest no P_b)
    G   = (1 - e^-w) / w  where w < log 2,  else 1 - e^-w                          (1 at either edge)
    L   = min(b, 0) - max(a, 0) + [w < log 2] log w + log(G / (P_a P_b))        (the edges drop their a or b term)
    sigmoid(a) = e^min(a, 0) / P_a,   sigmoid(-b) = e^min(-b, 0) / P_b,   u / expm1(-u) = -w e^-w / (1 - e^-w)

with ``1 / (G P_a P_b)`` the one reciprocal, ``log w = log(2h) - s`` exact even
where ``inv`` underflows, and ``(1 - e^-w) / w`` by its Taylor series to
``w^9`` where ``1 - e^-w`` would cancel. The four terms of ``L`` are all <= 0
(the last is the log of a number in [1/8, 1]), so they add without cancelling:
the value carries the float32 rounding of ``a`` and ``b`` themselves and a few
1e-7 from the last log, for any mean and any scale from ``e^-7`` up (masses
of 1e-30 and far below), with no density approximation and a finite gradient.
The mixture takes ``log p = max J + log(sum_m e^(J_m - max J) / sum_m e^(l_m -
max l))`` with ``J_m = l_m - max l + sum_c L_cm``, both sums online over the
components (a running maximum, each term one exponential): one more log and
one reciprocal per pixel.

Fast math, on the GPU: ``e^x`` is ``ex2.approx.ftz`` (as ``tl.exp`` is), except
``inv = e^-s``, whose relative error would grow with ``|s|`` (about ``|s|``
6e-8, from rounding ``s log2 e``) and is the log-mass's relative error in the
far tails: there three FMAs put the rounding back (:func:`_exp_accurate`).
Reciprocals are ``rcp.approx.ftz`` (1 ulp, :func:`~fastvae.kernels.launch.fast_rcp`)
and the two logs :func:`~fastvae.kernels.launch.fast_log` (``lg2.approx`` on
the mantissa, within 2^-22 there); the interpreter computes them exactly.
The tests' tolerances hold with these functions' documented worst errors
injected, all of one sign (``docs/performance-dmol.md``). Compiled for sm_90
the forward takes 610 SASS instructions per pixel-component for RGB at M = 10
with the gradient (865 before, in 16 slots for 10 components), under the
memory time of its bytes on an H100 in float32 (0.67 of it) and bfloat16
(1.40): the static audit, ``python -m benchmarks --static``.

Gradient in the forward. With ``R_m`` the posterior responsibility of
component ``m`` (the softmax of the summed log terms), the kernel writes, in
the pass that sums the nll, times ``grad_scale``::

    d nll / d l_m          = softmax(l)_m - R_m
    d nll / d mu_cm        = -R_m dL/dmean,      dL/dmean = inv (sigmoid(a) + sigmoid(b) - 1)   (interior)
    d nll / d log_scale_cm = -R_m dL/ds [log_scale >= -7],  dL/ds = a sigmoid(a) - b sigmoid(-b) + u / expm1(-u)
    d nll / d coef_(c,j)m  = -R_m dL/dmean (1 - tanh^2(coef)) y_j

(edge levels keep the ``a`` or the ``b`` terms only). The clamp passes the
gradient at ``log_scale == -7`` exactly, as ``torch.clamp``'s autograd does.

Tiles. The grid is :func:`plan`'s (:func:`~fastvae.kernels.launch.plan_rows`
with tiles as tall as leave the fewest slots past the ends): rows are
samples, columns the pixels of a sample (``N``, the product of the trailing
dims), and a program covers ``BLOCK_ROWS x BLOCK_COLS`` pixels,
:func:`tile_pixels` in all, consecutive ones in each thread (vector loads). A
thread takes its pixels' ``M`` components one at a time, in a loop: no slot
is padding whatever ``M`` is, its registers do not grow with ``M``, and the
sums over components stay in the thread (no shuffles, no shared memory). The
channel loop is unrolled (``C`` is a constexpr). The nll needs every
component before the responsibilities are known, so with the gradient a
second loop over the components computes each one again, now with its
derivatives (sharing its exponentials with the value), and writes its
gradient: the compute of the value twice, in exchange for nothing waiting in
registers. ``params`` and ``x`` are read with their own strides (int64
offsets); partial sums per sample and column split are added by the launcher.

Memory traffic per pass, in units of ``params``' size (``B P N`` elements of its
dtype, ``P = M (C + 1)(C + 2) / 2``: 100 per pixel for RGB at M = 10); ``x``
adds ``C / P`` of its own dtype's size to every read of the inputs (3 % for RGB
at M = 10), and the per-sample sums are ``B`` floats:

========================  =================================================  ============
pass                      reads -> writes                                    units
========================  =================================================  ============
forward, no gradient      params, x                                          1
forward with gradient     params, x -> gradient (params' dtype)              2
backward, upstream 1      nothing: the saved gradient is handed over, and    0
                          the in-place scaling skips samples of weight 1
backward, scaled          gradient -> gradient * upstream                    2
forward + backward                                                           2, scaled 4
========================  =================================================  ============

"Scaled" is a backward whose upstream gradient is not exactly 1 (per-sample
weights, or ``reduction="none"`` followed by ``.mean()``: prefer
``reduction="mean"``, which folds ``1 / B`` into the forward), or one that must
leave the saved gradient intact and so writes a new one (a retained or traced
graph); see :mod:`fastvae.ops.grad_in_forward` and :mod:`fastvae.kernels.scale_rows`.
A backward under ``create_graph=True`` runs the eager reference instead.
The eager reference, counted per ATen call on the CPU (each call's tensor
inputs read and its outputs written once, views free) for ``(4, 100, 8, 8)``
RGB parameters at M = 10 with ``reduction="mean"``, moves 22.2 units in its
forward (53 calls) and 37.0 in its backward (66): 59.2 against the fused 2 (4
scaled). For bfloat16 ``params``, which it computes in float32, 47.5 + 76.9 = 124.4.

Kept from the forward for the backward: the gradient (1 unit, a new buffer)
and references to ``params`` and ``x`` (no copies; they cost memory only where
nothing else would keep them alive, such as a decoder's output that the
caller drops). ``params`` is there for ``create_graph=True``: the Hessian is
not recoverable from the gradient, so a backward under grad mode
differentiates the reference at the saved inputs instead.

Against the eager reference (``discretized_logistic_mixture_nll_reference``),
counted with ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages)
for ``(B, 100, H, W)`` RGB parameters at M = 10 (the counts scale with ``B H W``;
``x`` float32), in units of ``params``' size:

=====================  ===================================  ==============================  =========
params dtype           eager keeps                          fused keeps                     ratio
=====================  ===================================  ==============================  =========
float32                3.73: 2.73 new + params              2.03: 1 new + params + x        1.8x
bfloat16, float16      7.46, all new (a float32 copy of     2.06: 1 new + params + x        3.6x
                       params, and float32 temporaries)
new memory only        float32 2.73, half 7.46              1                               2.7x, 7.5x
=====================  ===================================  ==============================  =========

"New memory only" leaves out the inputs, which a caller that keeps the decoder
output (as a VAE returning it does) holds anyway. The issue's goal of 5x less
is met only there, for half-precision parameters; in float32 the compact
reference keeps 2.73 units of its own, so one unit of gradient cannot be 5x
less, and the reference to ``params`` (for ``create_graph``) costs a second
unit wherever nothing else keeps ``params`` alive.
"""
from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from . import launch
from .launch import LOG_2, RowTiling, device_guard, fast_log, fast_rcp, plan_rows, row_offsets, sum_splits

MIN_LOG_SCALE = tl.constexpr(-7.0)
LOG2_E = tl.constexpr(1.0 / math.log(2.0))
# log2(e) - LOG2_E as float32 rounds it: the low part that makes e^x = 2^(x log2 e) accurate for large |x|.
LOG2_E_LOW = tl.constexpr(1.0 / math.log(2.0) - struct.unpack("f", struct.pack("f", 1.0 / math.log(2.0)))[0])
# Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to an integer, half to even.
ROUNDING_SHIFT = tl.constexpr(1.5 * 2.0**23)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
NUM_WARPS = 4
# Pixels a thread holds at once, by channels (1, 2, 3; 1 beyond): consecutive ones, so that its loads are vectors.
PIXELS_PER_THREAD = {1: 4, 2: 2, 3: 2}
MIN_BLOCK_COLS = 16


def tile_pixels(channels: int) -> int:
    """Pixels a program holds at once: :data:`PIXELS_PER_THREAD` per thread of its :data:`NUM_WARPS` warps.

    A thread takes every component of its pixels in turn (a loop over ``M``), so its registers do not grow
    with ``M`` and no component slot is padding; they grow with ``C`` (each channel's bin waits in registers
    for the loop) and with the pixels it holds, whose loads then are vectors and whose per-pixel work
    (levels, loop set-up, the mixture's last log) is shared.
    """
    return 32 * NUM_WARPS * PIXELS_PER_THREAD.get(channels, 1)


def plan(batch: int, n_cols: int, channels: int, device) -> RowTiling:
    """The launch plan: :func:`~fastvae.kernels.launch.plan_rows` with tiles of :func:`tile_pixels` pixels, as
    tall as leaves the fewest pixel slots past the ends of the samples and of the batch, the widest of those, and
    at least :data:`MIN_BLOCK_COLS` pixels wide (784 pixels a sample: tiles of 32 samples by 16 pixels cover them
    exactly, where tiles of 512 pixels of one sample would run 1,024 slots for them)."""
    device = torch.device(device)
    # What plan_rows fills (programs per device) is part of the cache's key: the static audit plans for an H100.
    return _plan(batch, n_cols, tile_pixels(channels), device, launch.target_programs(device))


@functools.lru_cache(maxsize=256)
def _plan(batch: int, n_cols: int, block: int, device: torch.device, programs: int) -> RowTiling:
    def slots(tiling):
        return triton.cdiv(batch, tiling.block_rows) * tiling.block_rows * triton.cdiv(
            n_cols, tiling.block_cols
        ) * tiling.block_cols

    # Column blocks of 16 pixels at least (where a sample has them): a row's pixels in a tile then fill whole
    # 32-byte sectors, and each thread's are consecutive (vector loads).
    narrowest = min(MIN_BLOCK_COLS, triton.next_power_of_2(n_cols))
    tilings = [
        plan_rows(batch, n_cols, device, min_block_cols=narrowest, min_block_rows=1 << k, block_elements=block,
                  num_warps=NUM_WARPS)
        for k in range(block.bit_length())
    ]
    return min(tilings, key=slots)  # the first of the fewest: the widest columns


@triton.jit
def _exp(x):
    """``e^x`` as one ``ex2.approx.ftz`` (results below 2^-126 flush to 0, which no term here needs); the rounding
    of ``x log2 e`` costs it a relative error of about ``|x|`` 6e-8, harmless where ``e^x`` is added to 1 or
    weighs a term."""
    return tl.exp2(x * LOG2_E)


@triton.jit
def _exp_accurate(x):
    """``e^x`` within a few 1e-7 of it for any ``x``: ``2^t (1 + r log 2)``, with ``t = x log2 e`` in float32 and
    ``r`` what that product rounded off (an FMA finds it exactly) plus ``x`` times log2 e's own low part. Three
    instructions more than :func:`_exp`, whose error grows with ``|x|``; ``e^-s`` scales ``a`` and ``b``, whose
    relative error is the log-mass's far in the tails."""
    t = x * LOG2_E
    r = tl.fma(x, LOG2_E, -t)
    r = tl.fma(x, LOG2_E_LOW, r)
    e = tl.exp2(t)
    return tl.fma(e, r * LOG_2, e)


@triton.jit
def _add_exp(total, above):
    """An online sum of exponentials relative to its running maximum: ``total`` (relative to the maximum so far)
    plus ``e^above`` of a term ``above`` it, relative to the new maximum. One exponential; the first term
    (``above`` = inf) gives 1, a NaN term NaN."""
    e = _exp(-tl.abs(above))
    return tl.where(above > 0.0, total * e + 1.0, total + e)


@triton.jit
def _tanh_and_derivative(z):
    """``tanh(z)`` to float32's absolute accuracy (all the mean needs of it) and ``1 - tanh(z)**2`` to its relative
    accuracy (no ``1 - t*t`` cancellation), from one exponential and one reciprocal."""
    e = _exp(-2.0 * tl.abs(z))
    inv_one_plus_e = fast_rcp(1.0 + e)
    t = (1.0 - e) * inv_one_plus_e
    return tl.where(z < 0, -t, t), 4.0 * e * inv_one_plus_e * inv_one_plus_e


@triton.jit
def _one_minus_exp_over(w):
    """``(1 - e^-w) / w`` for ``0 <= w < log 2``, in (0.72, 1]: its Taylor series to ``w^9`` (the rest is below
    1e-9), which has no cancellation, where ``1 - e^-w`` itself would lose ``w``'s digits."""
    r = 1.0 / 3628800.0
    r = r * w - 1.0 / 362880.0
    r = r * w + 1.0 / 40320.0
    r = r * w - 1.0 / 5040.0
    r = r * w + 1.0 / 720.0
    r = r * w - 1.0 / 120.0
    r = r * w + 1.0 / 24.0
    r = r * w - 1.0 / 6.0
    r = r * w + 0.5
    return 1.0 - r * w


@triton.jit
def _level(x, max_level):
    """``clamp(round(x * max_level), 0, max_level)``, rounding half to even as torch.round does; NaN stays NaN."""
    v = _clamp(x * max_level, -1.0, max_level + 1.0)  # inf rounds to the edge, as in torch
    return _clamp((v + ROUNDING_SHIFT) - ROUNDING_SHIFT, 0.0, max_level)


@triton.jit
def _clamp(x, low, high):
    """``min(max(x, low), high)`` that keeps NaN, as ``torch.clamp`` does."""
    x = tl.maximum(x, low, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, high, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _bin(x, max_level, half_width):
    """The observed bin of one channel, once per pixel: its edges ``y - h`` and ``y + h``, its centre ``y``, and
    whether each edge is finite (1.0) or open (0.0: the lowest level reaches -inf, the highest +inf). As numbers,
    not predicates: a thread holds several pixels' channels at once, more than its predicate registers."""
    level = _level(x, max_level)
    y = level * (2.0 * half_width) - 1.0
    keep_a = tl.where(level == 0.0, 0.0, 1.0)
    keep_b = tl.where(level == max_level, 0.0, 1.0)
    return y - half_width, y + half_width, y, keep_a, keep_b


@triton.jit
def _log_bin_mass(y_lo, y_hi, keep_a, keep_b, mean, log_scale, half_width, log_bin_width):
    """log of the bin's mass for one channel, and its derivatives in the mean and in the raw log-scale.

    Three exponentials (``e^-|a|``, ``e^-|b|``, ``e^-w``), one reciprocal and one log, shared by the value and
    both derivatives: ``L = lin + base + log(G / (P_a P_b))`` (see the module docstring). An open edge
    (``keep_a`` or ``keep_b`` 0) drops its terms by multiplying them by 0: each is finite there, ``a`` and ``b``
    in ``lin`` bounded first (they overflow only for means beyond 1e35).
    """
    s = tl.maximum(log_scale, MIN_LOG_SCALE, propagate_nan=tl.PropagateNan.ALL)
    inv = _exp_accurate(-s)
    a = inv * (y_lo - mean)
    b = inv * (y_hi - mean)
    e_a = _exp(-tl.abs(a)) * keep_a
    e_b = _exp(-tl.abs(b)) * keep_b
    p_a = 1.0 + e_a  # e^-max(a, 0) / sigmoid(-a); 1 at the open lowest level
    p_b = 1.0 + e_b  # e^min(b, 0) / sigmoid(b); 1 at the open highest level
    interior = keep_a * keep_b
    # G: the gap 1 - e^-w (w = -u = 2 h inv), or (1 - e^-w) / w by a series where 1 - e^-w would cancel (its log w
    # is in base); 1 at an edge (G is in [1/2, 1], so 1 + (G - 1) is G exactly).
    w = (2.0 * half_width) * inv
    e_w = _exp(-w)
    near = w < LOG_2
    gap = 1.0 + interior * (tl.where(near, _one_minus_exp_over(w), 1.0 - e_w) - 1.0)
    inv_all = fast_rcp(gap * p_a * p_b)
    inv_p = gap * inv_all  # 1 / (P_a P_b)
    lin = tl.maximum(tl.minimum(b, 0.0), -FLOAT32_MAX) * keep_b - tl.minimum(tl.maximum(a, 0.0), FLOAT32_MAX) * keep_a
    base = tl.where(near, log_bin_width - s, 0.0) * interior  # log w, exact even where inv underflows
    log_mass = lin + base + fast_log(gap * inv_p)
    d_a = -tl.where(a >= 0.0, keep_a, e_a) * (p_b * inv_p)  # -sigmoid(a)
    d_b = tl.where(b <= 0.0, keep_b, e_b) * (p_a * inv_p)  # sigmoid(-b)
    d_mean = -inv * (d_a + d_b)
    # a, b and u all scale with inv = e^-s: u d/du log(1 - e^u) = w e^-w / (1 - e^-w) = e^-w / r near, w e^-w / gap.
    u_d_gap = tl.where(near, e_w, w * e_w) * (p_a * p_b * inv_all) * interior
    d_log_scale = -(a * d_a + b * d_b) - u_d_gap
    # The clamp passes the gradient where log_scale >= -7.
    d_log_scale = tl.where(log_scale >= MIN_LOG_SCALE, d_log_scale, 0.0)
    return log_mass, d_mean, d_log_scale


@triton.jit
def _load_block(pixels, block, block_stride, component, mask):
    """Parameter block ``block`` (channels ``block * M`` on) of component ``component`` (a scalar offset) at the
    tile's pixels (pointers to their component 0 of block 0), as float32 (0 where masked)."""
    return tl.load(pixels + (block * block_stride + component), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_block(pixels, value, block, block_stride, component, mask):
    """Write ``value`` to parameter block ``block`` of component ``component`` at the tile's pixels."""
    tl.store(pixels + (block * block_stride + component), value.to(pixels.dtype.element_ty), mask=mask)


@triton.jit
def _coef_block(c, j, C: tl.constexpr):
    """The block of channel ``c``'s coefficient on channel ``j < c``: pairs (1,0), (2,0), (2,1), (3,0), ... after the
    logits, the means and the log-scales."""
    return 1 + 2 * C + c * (c - 1) // 2 + j


@triton.jit
def _component(pixels, block_stride, component, mask, bins, half_width, log_bin_width, C: tl.constexpr):
    """One mixture component at the tile's pixels: its logit, ``sum_c L_c`` and, per channel, ``dL/dmean``,
    ``dL/ds`` and the tanh slopes of its coefficients (pair order). What a caller leaves unused is not computed."""
    logit = _load_block(pixels, 0, block_stride, component, mask)
    log_mass = tl.zeros_like(logit)
    d_means = ()
    d_log_scales = ()
    tanh_slopes = ()
    for c in tl.static_range(C):
        mean = _load_block(pixels, 1 + c, block_stride, component, mask)
        for j in tl.static_range(c):
            t, slope = _tanh_and_derivative(_load_block(pixels, _coef_block(c, j, C), block_stride, component, mask))
            mean += t * bins[j][2]
            tanh_slopes = tanh_slopes + (slope,)
        log_scale = _load_block(pixels, 1 + C + c, block_stride, component, mask)
        y_lo, y_hi, _, keep_a, keep_b = bins[c]
        l_c, d_mean, d_log_scale = _log_bin_mass(y_lo, y_hi, keep_a, keep_b, mean, log_scale, half_width,
                                                 log_bin_width)
        log_mass += l_c
        d_means = d_means + (d_mean,)
        d_log_scales = d_log_scales + (d_log_scale,)
    return logit, log_mass, d_means, d_log_scales, tanh_slopes


@triton.jit
def _dmol_forward_kernel(
    params_ptr, x_ptr, nll_ptr, grad_ptr,
    n_rows, n_cols, n_mix,
    stride_params_row, stride_params_channel, stride_params_col,
    stride_x_row, stride_x_channel, stride_x_col,
    stride_grad_row, stride_grad_channel, stride_grad_col,
    cols_per_split,
    max_level, half_width, log_bin_width, grad_scale,
    C: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1)
    rows = row_offsets(tl.program_id(0), BLOCK_ROWS)[:, None]
    # Blocks of M channels: logits at 0, means at 1 + c, log-scales at 1 + C + c, coefficients at 1 + 2C + pair;
    # component m of a block is m channels further on.
    params_block = n_mix * stride_params_channel.to(tl.int64)
    grad_block = n_mix * stride_grad_channel.to(tl.int64)
    col_start = split * cols_per_split
    # Up to the row's end: the last split's tiles stop there.
    tiles = tl.cdiv(tl.minimum(cols_per_split, n_cols - col_start), BLOCK_COLS)
    nll = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    # While loops: Triton 3.6's interpreter cannot take a kernel argument as a range() bound (numpy 2 refuses
    # to read its 1-element array as an int).
    tile = 0
    while tile < tiles:
        cols = col_start + tile * BLOCK_COLS + tl.arange(0, BLOCK_COLS)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        pixels = params_ptr + rows * stride_params_row + cols * stride_params_col
        bins = ()
        for c in tl.static_range(C):
            x_c = tl.load(x_ptr + rows * stride_x_row + c * stride_x_channel + cols * stride_x_col,
                          mask=mask, other=0.0).to(tl.float32)
            bins = bins + (_bin(x_c, max_level, half_width),)

        # log p = logsumexp_m(J_m) - log(sum_m e^(l_m - max l)), J_m = l_m - max l + sum_c L_cm, both sums online:
        # a running maximum and one exponential per component each. The joints are kept relative to the largest
        # logit so far (as the reference's log_softmax, l_m - max l formed first), shifted when it rises.
        logit_max = tl.full([BLOCK_ROWS, BLOCK_COLS], float("-inf"), dtype=tl.float32)
        prior_sum = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
        joint_max = tl.full([BLOCK_ROWS, BLOCK_COLS], float("-inf"), dtype=tl.float32)
        joint_sum = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
        m = 0
        while m < n_mix:
            logit, log_mass, _, _, _ = _component(pixels, params_block, m * stride_params_channel, mask, bins,
                                                  half_width, log_bin_width, C)
            rise = logit - logit_max
            prior_sum = _add_exp(prior_sum, rise)
            logit_max = tl.maximum(logit_max, logit)
            joint_max -= tl.maximum(rise, 0.0)
            joint = logit - logit_max + log_mass
            joint_sum = _add_exp(joint_sum, joint - joint_max)
            joint_max = tl.maximum(joint_max, joint)
            m += 1
        inv_prior_sum = fast_rcp(prior_sum)
        log_p = joint_max + fast_log(joint_sum * inv_prior_sum)
        nll += tl.where(mask, -log_p, 0.0)

        if WRITE_GRAD:
            # Each component again, now with its derivatives, weighted by its posterior responsibility R_m.
            out = grad_ptr + rows * stride_grad_row + cols * stride_grad_col
            prior_scale = inv_prior_sum * grad_scale
            posterior_scale = fast_rcp(joint_sum) * grad_scale
            m = 0
            while m < n_mix:
                logit, log_mass, d_means, d_log_scales, tanh_slopes = _component(
                    pixels, params_block, m * stride_params_channel, mask, bins, half_width, log_bin_width, C
                )
                component = m * stride_grad_channel
                weight = -_exp(logit - logit_max + log_mass - joint_max) * posterior_scale  # -R_m grad_scale
                _store_block(out, _exp(logit - logit_max) * prior_scale + weight, 0, grad_block, component, mask)
                for c in tl.static_range(C):
                    grad_mean = weight * d_means[c]
                    _store_block(out, grad_mean, 1 + c, grad_block, component, mask)
                    _store_block(out, weight * d_log_scales[c], 1 + C + c, grad_block, component, mask)
                    for j in tl.static_range(c):
                        grad_coef = grad_mean * tanh_slopes[c * (c - 1) // 2 + j] * bins[j][2]
                        _store_block(out, grad_coef, _coef_block(c, j, C), grad_block, component, mask)
                m += 1
        tile += 1

    row = row_offsets(tl.program_id(0), BLOCK_ROWS)
    tl.store(nll_ptr + row * n_splits + split, tl.sum(nll, axis=1), mask=row < n_rows)


def discretized_logistic_mixture_forward(
    params: torch.Tensor,
    x: torch.Tensor,
    num_mixtures: int,
    num_bits: int,
    *,
    write_grad: bool,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on non-empty ``params`` ``(B, P, ...)`` and ``x`` ``(B, C, ...)``.

    Both are read in place with their strides wherever their trailing dims
    merge into one (contiguous tensors, channel slices, channels-last do; other
    layouts are copied by ``reshape``). Returns the per-sample nll (float32,
    ``(B,)``) and, if ``write_grad``, ``d nll / d params`` times ``grad_scale``:
    a new contiguous tensor of ``params``' shape and dtype (else ``None``).
    """
    batch, channels = x.shape[:2]
    n_cols = math.prod(x.shape[2:])
    params3 = params.reshape(batch, params.shape[1], n_cols)
    x3 = x.reshape(batch, channels, n_cols)
    tiling = plan(batch, n_cols, channels, params.device)
    partial_nll = torch.empty((batch, tiling.n_splits), dtype=torch.float32, device=params.device)
    grad = torch.empty(params3.shape, dtype=params.dtype, device=params.device) if write_grad else None
    max_level = 2**num_bits - 1
    with device_guard(params):
        _dmol_forward_kernel[tiling.grid](
            params3, x3, partial_nll, grad if write_grad else partial_nll,
            batch, n_cols, num_mixtures,
            *params3.stride(), *x3.stride(), *(grad.stride() if write_grad else (0, 0, 0)),
            tiling.cols_per_split,
            float(max_level), 1.0 / max_level, math.log(2.0 / max_level), grad_scale,
            C=channels, WRITE_GRAD=write_grad,
            BLOCK_ROWS=tiling.block_rows, BLOCK_COLS=tiling.block_cols, num_warps=tiling.num_warps,
        )
    return sum_splits(partial_nll), grad.view(params.shape) if write_grad else None
