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
accurate at any ``x``; tanh itself is ``(1 - u) / (1 + u)``, or, for float32
inputs, its series for ``|x / L| < 0.1``, where ``1 - u`` would cancel
(:func:`_soft_clamp`). The hard clamp's is ``torch.clamp``'s: 1 on ``[lo, hi]``
(both ends included), 0 outside and at NaN (which it passes through, as
``torch.clamp`` does).

Layout. Each input is read in place through three strides
(:func:`fastvae.kernels.launch.split_rows`): the row index splits into an
outer part (the first dim) and an inner part (the other leading dims), so the
channel slices of a conv output (``h[:, :C]`` of ``(B, 2C, H, W)``) are read
where they lie. A prior that broadcasts to ``mu`` is read through stride 0
along the dims it is broadcast over; one shared by all rows is read as a single
row per tile, its clamp and exponential computed once per column
(``SHARED_PRIOR``, tiles of up to 64 rows).

A tile is ``BLOCK_ROWS x BLOCK_GROUPS`` groups of four columns, each group in
one thread (it is one Philox round). Where every row starts at a multiple of
four elements (``ALIGNED``, checked by the launcher: vectors of four) a group
loads as one vector; elsewhere (rows of 49 columns, a half-precision head of 20
latents) lane by lane, the lanes then interleaved in registers, so that the
layout Triton picks for unaligned loads (a column per thread) never splits a
group. Indices are int32 where every tensor stays below 2**30 elements
(``INT64`` otherwise). With a prior the backward's tiles hold 2048 elements,
8 a thread, which keeps its terms and gradients in registers. These choices are
the static audit's (``python -m benchmarks --static``; docs/performance-floor.md):
no variant spills, and each keeps its instruction issue under its memory time
on the H100 model.

Noise. Without ``eps`` the kernels draw it with Philox: element ``(row, col)``
of the matrix (``col`` the index in the flattened event, in row-major order)
takes output ``col % 4`` of the Philox round with counter
``first_counter + row * ceil(n_cols / 4) + col // 4`` (four normals per round,
:func:`standard_normal`: Philox4x32-10 and the Box-Muller transform, with the
hardware's log, sine and cosine when compiled; ``tl.randn4x``'s values, bit for
bit, when interpreted). The counter depends on the element's indices alone, not on
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
from triton.language.extra import libdevice

from .launch import (
    INTERPRETED,
    RowTiling,
    device_guard,
    fast_exp,
    fast_log2,
    fast_rcp,
    plan_rows,
    needs_int64,
    split_row_starts,
    split_rows,
)

# Columns come in groups of four: one Philox round gives the noise of a group.
GROUP = 4
# Rows a tile adds up when the backward sums a shared prior's gradient over the rows.
COLUMN_BLOCK_ROWS = 16
# The forward's tiles with a prior shared by all rows: 64 rows (or the batch) of 32 columns, 4 rows a thread.
SHARED_PRIOR_BLOCK_ROWS = 64
SHARED_PRIOR_BLOCK_ELEMENTS = 2048
# Elements of the backward's tiles with a prior (8 a thread at 8 warps).
PRIOR_BACKWARD_BLOCK_ELEMENTS = 2048
MINUS_2_LN_2 = tl.constexpr(-2.0 * math.log(2.0))
# tl.rand's map of 31 random bits to [0, 1): the largest float32 with (2**31 - 1) * UNIFORM_SCALE < 1.
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
SIGN_BIT = tl.constexpr(-(2**31))  # of a float32 seen as an int32
TWO_PI_UNIFORM_SCALE = tl.constexpr(2.0 * math.pi * 4.6566127342e-10)


def event_size(shape: torch.Size, event_dims: int) -> int:
    """``n_cols``: the elements of one event, the last ``event_dims`` dims of ``shape``."""
    return math.prod(shape[len(shape) - event_dims :])


def philox_rounds(shape: torch.Size, event_dims: int = 1) -> int:
    """Philox rounds one call consumes for noise of ``shape`` ``(*lead, *event)``."""
    n_cols = event_size(shape, event_dims)
    return math.prod(shape[: len(shape) - event_dims]) * triton.cdiv(n_cols, GROUP)


@triton.jit
def _program_span(n_cols, cols_per_split, BLOCK_ROWS: tl.constexpr, INT64: tl.constexpr):
    """This program's row tile and column split, its rows ``[BLOCK_ROWS, 1, 1]``, its end column, and its first
    and past-the-last column groups: int64 where a tensor reaches 2**30 elements (``INT64``), else int32, which
    then holds every index, a tile's overshoot past the end included."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    if INT64:
        tile = tile.to(tl.int64)
        split = split.to(tl.int64)
    col_start = split * cols_per_split
    col_end = col_start + tl.minimum(cols_per_split, n_cols - col_start)
    rows = (tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS))[:, None, None]
    return tile, split, rows, col_end, col_start // 4, tl.cdiv(col_end, 4)


@triton.jit
def _philox_state(seed, first_counter, philox_ptr):
    """The Philox key and first counter: the scalar arguments, or the two int64 at ``philox_ptr`` when it is
    given (a state drawn on the device, which a CUDA graph replays anew; see :mod:`fastvae.ops.rng`)."""
    if philox_ptr is not None:
        seed = tl.load(philox_ptr)
        first_counter = tl.load(philox_ptr + 1)
    return seed, first_counter


@triton.jit
def _philox4x32(seed, offset):
    """Philox4x32-10 of the counter ``(lo(offset), hi(offset), 0, 0)`` under the key ``(lo(seed), hi(seed))``:
    the bits of ``tl.randint4x(seed, offset)``, with each 32 x 32-bit product taken whole from one 64-bit multiply
    (a single wide multiply instruction for both halves, where Triton's rounds issue two)."""
    seed = seed.to(tl.uint64)
    key0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    key1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = offset.to(tl.uint32)
    c1 = (offset >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c2
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = (
            (p2 >> 32).to(tl.uint32) ^ c1 ^ key0,
            p2.to(tl.uint32),
            (p0 >> 32).to(tl.uint32) ^ c3 ^ key1,
            p0.to(tl.uint32),
        )
        key0 += 0x9E3779B9
        key1 += 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _random_integer(bits):
    """A uint32 as a float32 carrying 31 random bits: ``tl.rand``'s fold (the bits, or their complement when the top
    bit is set) when interpreted; compiled, the absolute value of the bits as an int32, the same number up to one
    part in 2**31 and two instructions fewer (the float's 24-bit rounding is coarser than the difference)."""
    x = bits.to(tl.int32, bitcast=True)
    if INTERPRETED:
        return tl.where(x < 0, ~x, x).to(tl.float32)
    else:
        return tl.abs(x.to(tl.float32))


@triton.jit
def _box_muller(bits1, bits2):
    """Two independent standard normals from two uint32: ``r cos(2 pi u2)``, ``r sin(2 pi u2)`` with
    ``r = sqrt(-2 log u1)``, each ``u`` in [0, 1) 31 random bits times ``UNIFORM_SCALE`` (``tl.rand``'s map),
    ``u1`` kept above 1e-7 as ``tl.randn`` does (so ``|z| <= 5.68``).

    Compiled, the log, sine and cosine are the hardware's approximations (``lg2.approx``, ``sin.approx``,
    ``cos.approx``: absolute errors about 2**-22 and 2**-21 on these arguments, the angle lying in [0, 2 pi), where
    no range reduction is needed), a few instructions where libdevice's accurate functions take some sixty; the
    constants are folded. Triton's interpreter runs neither libdevice nor PTX: there the exact functions give
    ``tl.randn4x``'s values, bit for bit.
    """
    u1 = tl.maximum(1.0e-7, _random_integer(bits1) * UNIFORM_SCALE)
    if INTERPRETED:
        angle = 6.283185307179586 * (_random_integer(bits2) * UNIFORM_SCALE)
        radius = tl.sqrt(-2.0 * tl.log(u1))
        return radius * tl.cos(angle), radius * tl.sin(angle)
    else:
        angle = _random_integer(bits2) * TWO_PI_UNIFORM_SCALE
        radius = tl.sqrt(fast_log2(u1) * MINUS_2_LN_2)
        return radius * libdevice.fast_cosf(angle), radius * libdevice.fast_sinf(angle)


@triton.jit
def normal4x(seed, offset):
    """Four independent standard normals (float32) per element of the int64 counter block ``offset``: the Box-Muller
    transform of the four uniforms of Philox round ``offset`` under ``seed``."""
    i0, i1, i2, i3 = _philox4x32(seed, offset)
    n0, n1 = _box_muller(i0, i1)
    n2, n3 = _box_muller(i2, i3)
    return n0, n1, n2, n3


@triton.jit
def standard_normal(seed, first_counter, rows, groups, lanes, groups_per_row):
    """eps of a tile: lane k of group g in row r is normal k of Philox round first_counter + r * groups_per_row + g.

    The one noise generator of fastvae's kernels (import it, with :func:`philox_rounds` for the counters a call
    consumes): ``rows`` and ``groups`` broadcast to the tile's shape with a last dim of 1, ``lanes`` (its last dim,
    4) index the four normals of a round, which the result keeps in one thread's registers, whatever layout the
    loads take. Standard normal in distribution (``tests/test_noise.py``: moments, a Kolmogorov-Smirnov test on a
    million draws, the tails beyond 4 and 5 sigma, against ``torch.randn``).
    """
    tl.static_assert(lanes.shape[-1] == 4, "four lanes: the normals of one Philox round")
    counter = tl.cast(first_counter, tl.int64) + (rows * groups_per_row + groups)  # int64: counters grow all run
    n0, n1, n2, n3 = normal4x(seed, counter)
    return _interleave(n0, n1, n2, n3)


@triton.jit
def _soft_clamp(x, limit, SERIES_NEAR_ZERO: tl.constexpr = True):
    """``limit * tanh(x / limit)`` and its derivative ``1 - tanh(x / limit)**2``, both accurate for every ``x``.

    With ``u = exp(-2 |x| / limit)`` in [0, 1] (never overflows), ``limit tanh(|x| / limit)`` is
    ``(limit - limit u) / (1 + u)``, whose difference cancels for small ``|x|``, to an absolute error of
    ``limit`` times ``u``'s (some 2**-22): below ``limit / 10`` the series
    ``x (1 - x**2 / (3 limit**2) + 2 x**4 / (15 limit**4))`` instead (error below 1e-8). Without
    ``SERIES_NEAR_ZERO`` (inputs of 8 or 11 significant bits, whose own rounding is coarser wherever that error
    matters to ``z``, the KL or a gradient) the quotient serves everywhere, six instructions fewer. The sign is
    copied from ``x``; the scalar coefficients are taken once per program, and one reciprocal per element serves
    the value and the slope.
    """
    inverse = 1.0 / limit
    u = fast_exp(tl.abs(x), -2.0 * inverse)
    q = fast_rcp(1.0 + u)
    large = (limit - limit * u) * q  # >= 0
    sign = x.to(tl.int32, bitcast=True) & SIGN_BIT
    clamped = (large.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    if SERIES_NEAR_ZERO:
        inverse_square = inverse * inverse
        x2 = x * x
        small = x * (1.0 - x2 * (inverse_square * (1.0 / 3.0) - x2 * (inverse_square * inverse_square * (2.0 / 15.0))))
        clamped = tl.where(tl.abs(x) < 0.1 * limit, small, clamped)
    return clamped, 4.0 * u * (q * q)


@triton.jit
def _hard_clamp(x, lo, hi):
    """``torch.clamp(x, lo, hi)`` and where its derivative is 1: on ``[lo, hi]`` (a boolean, 0 elsewhere; a flag
    where a float slope would take a register per element). A NaN passes through (no comparison holds for it) with
    a slope of 0, as in torch."""
    inside = (x >= lo) & (x <= hi)
    clamped = tl.where(x < lo, lo, tl.where(x > hi, hi, x))
    return clamped, inside


@triton.jit
def _through_clamp(grad, slope, logvar_limit, logvar_min):
    """``grad`` of a clamped log-variance carried back through its clamp: times the soft clamp's slope, or kept
    where the hard clamp's ``slope`` (a boolean) holds and exactly 0 elsewhere (as torch.clamp's backward, even for
    a NaN)."""
    if logvar_limit is not None:
        grad *= slope
    if logvar_min is not None:
        grad = tl.where(slope, grad, 0.0)
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
        scaled = diff * fast_exp(prior_logvar, -1.0)
        log_ratio = logvar - prior_logvar
        ratio = fast_exp(log_ratio, 1.0)  # not std**2 exp(-plv), which overflows where lv and plv are both large
    return diff, scaled, ratio, log_ratio


@triton.jit
def _row_starts(rows, n_inner, stride_outer, stride_inner, ALIGNED: tl.constexpr):
    """Offsets ``[BLOCK_ROWS, 1, 1]`` of the first element of rows ``rows`` of a tensor laid out as
    :func:`fastvae.kernels.launch.split_rows` describes, once per program. ``ALIGNED``: every row starts at a
    multiple of four elements (the launcher checked), which lets a group of four columns load as one vector."""
    starts = split_row_starts(rows, n_inner, stride_outer, stride_inner)
    if ALIGNED:
        starts = _multiple_of_4(starts)
    return starts


@triton.jit
def _multiple_of_4(starts):
    """Row offsets ``[R, 1, 1]`` declared multiples of four (the launcher checked: ``ALIGNED``), so that Triton
    loads a group of four columns as one vector. (Declared on the 1-D rows: a 3-D hint on a tile of one row trips
    Triton's axis analysis.)"""
    return tl.multiple_of(tl.reshape(starts, (starts.shape[0],)), 4)[:, None, None]


@triton.jit
def _prior_rows(rows, row_mask, n_inner, stride_outer, stride_inner, ALIGNED: tl.constexpr,
                SHARED_PRIOR: tl.constexpr):
    """A prior tensor's row offsets and row mask: as for any input, or, for a prior shared by all rows
    (``SHARED_PRIOR``), one row ``[1, 1, 1]`` at offset 0, so that what depends on the prior alone (its clamp, its
    exponential) is computed once per column a thread holds, not once per row."""
    if SHARED_PRIOR:
        starts = tl.zeros([1, 1, 1], dtype=rows.dtype)
        mask = tl.full([1, 1, 1], True, tl.int1)
    else:
        starts = _row_starts(rows, n_inner, stride_outer, stride_inner, ALIGNED)
        mask = row_mask
    return starts, mask


@triton.jit
def _interleave(x0, x1, x2, x3):
    """``x0``..``x3`` (one shape, last dim 1) side by side along the last dim, lane k from ``x_k``, the four in one
    thread (a join's new dim is held in registers)."""
    x = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # (..., 1, 2, 2): (i, j) holds x_(2 i + j)
    return tl.reshape(x, x0.shape[:-1] + (4,))


@triton.jit
def _deinterleave(x):
    """The inverse of :func:`_interleave`: the four lanes of ``x`` ``[R, G, 4]`` as ``[R, G, 1]`` tensors."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], 1, 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _load_lane(ptr, starts, cols, stride_col, row_mask, n_left):
    return tl.load(ptr + starts + cols * stride_col, mask=row_mask & (cols < n_left), other=0.0)


@triton.jit
def _group_mask(row_mask, groups, n_left):
    """The mask of aligned groups ``[R, G, 4]``: a group of four columns is in range or out as a whole (``n_left`` is
    a multiple of four where ``ALIGNED``), said on the group index so that Triton sees the mask constant along the
    four lanes and keeps the access one vector (a mask on each column would split it into four)."""
    return (row_mask & (groups * 4 < n_left)) & (tl.arange(0, 4)[None, None, :] < 4)


@triton.jit
def _load_tile(ptr, starts, col0, groups, stride_col, row_mask, n_left, ALIGNED: tl.constexpr):
    """Columns ``col0 + 4 g + lane`` of the rows at ``starts`` (``[R, G, 4]`` float32; zeros past ``n_left``
    columns and in rows past the end), for the step's groups ``g`` (``[1, G, 1]``, from 0).

    Aligned rows load a group as one vector. Others load lane by lane and interleave the lanes in registers: Triton
    lays an unaligned load out one column per thread, which would split each group, and so each Philox round,
    over four threads; this way a thread holds whole groups, whatever the alignment.
    """
    starts = starts + col0 * stride_col
    if ALIGNED:
        cols = groups * 4 + tl.arange(0, 4)[None, None, :]
        x = tl.load(ptr + starts + cols * stride_col, mask=_group_mask(row_mask, groups, n_left), other=0.0)
    else:
        cols = groups * 4
        x = _interleave(
            _load_lane(ptr, starts, cols, stride_col, row_mask, n_left),
            _load_lane(ptr, starts, cols + 1, stride_col, row_mask, n_left),
            _load_lane(ptr, starts, cols + 2, stride_col, row_mask, n_left),
            _load_lane(ptr, starts, cols + 3, stride_col, row_mask, n_left),
        )
    return x.to(tl.float32)


@triton.jit
def _store_tile(ptr, starts, col0, groups, row_mask, n_left, value, ALIGNED: tl.constexpr):
    """Store ``value`` ``[R, G, 4]`` where :func:`_load_tile` would load it, in a contiguous output."""
    starts = starts + col0
    value = value.to(ptr.dtype.element_ty)
    if ALIGNED:
        cols = groups * 4 + tl.arange(0, 4)[None, None, :]
        tl.store(ptr + starts + cols, value, mask=_group_mask(row_mask, groups, n_left))
    else:
        cols = groups * 4
        v0, v1, v2, v3 = _deinterleave(value)
        tl.store(ptr + starts + cols, v0, mask=row_mask & (cols < n_left))
        tl.store(ptr + starts + cols + 1, v1, mask=row_mask & (cols + 1 < n_left))
        tl.store(ptr + starts + cols + 2, v2, mask=row_mask & (cols + 2 < n_left))
        tl.store(ptr + starts + cols + 3, v3, mask=row_mask & (cols + 3 < n_left))


@triton.jit
def _step(group_start, col_end, BLOCK_GROUPS: tl.constexpr):
    """A loop step's first column (int64) and how many of its ``4 BLOCK_GROUPS`` columns are in range (int32)."""
    col0 = group_start * 4
    return col0, tl.minimum(col_end - col0, 4 * BLOCK_GROUPS).to(tl.int32)


@triton.jit
def _load_inputs(
    mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows, prior_logvar_rows,
    col0, groups, row_mask, prior_row_mask, n_left, stride_mu_col, stride_logvar_col, stride_prior_mu_col,
    stride_prior_logvar_col, logvar_limit, logvar_min, logvar_max, HAS_PRIOR_MU: tl.constexpr,
    HAS_PRIOR_LOGVAR: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``mu``, ``logvar``, ``prior_mu``, ``prior_logvar`` of a tile in float32 (rows at ``*_rows``), the
    log-variances soft-clamped when ``logvar_limit`` is given or clamped to ``[logvar_min, logvar_max]`` when those
    are, and the clamp's slopes (1 without a clamp). An absent prior tensor reads as zeros, never loaded; a prior
    shared by all rows (:func:`_prior_rows`) is one row ``[1, G, 4]``, clamped once per column."""
    mu = _load_tile(mu_ptr, mu_rows, col0, groups, stride_mu_col, row_mask, n_left, ALIGNED)
    logvar = _load_tile(logvar_ptr, logvar_rows, col0, groups, stride_logvar_col, row_mask, n_left, ALIGNED)
    prior_mu = tl.zeros_like(mu)
    if HAS_PRIOR_MU:
        prior_mu = _load_tile(prior_mu_ptr, prior_mu_rows, col0, groups, stride_prior_mu_col, prior_row_mask,
                              n_left, ALIGNED)
    prior_logvar = tl.zeros_like(mu)
    if HAS_PRIOR_LOGVAR:
        prior_logvar = _load_tile(prior_logvar_ptr, prior_logvar_rows, col0, groups, stride_prior_logvar_col,
                                  prior_row_mask, n_left, ALIGNED)
    slope = tl.zeros_like(mu) + 1.0
    prior_slope = slope
    if logvar_limit is not None:
        logvar, slope = _soft_clamp(logvar, logvar_limit, logvar_ptr.dtype.element_ty == tl.float32)
        if HAS_PRIOR_LOGVAR:
            prior_logvar, prior_slope = _soft_clamp(prior_logvar, logvar_limit,
                                                    prior_logvar_ptr.dtype.element_ty == tl.float32)
    if logvar_min is not None:
        logvar, slope = _hard_clamp(logvar, logvar_min, logvar_max)
        prior_slope = slope  # booleans now, as the prior's (unused without a prior log-variance)
        if HAS_PRIOR_LOGVAR:
            prior_logvar, prior_slope = _hard_clamp(prior_logvar, logvar_min, logvar_max)
    return mu, logvar, prior_mu, prior_logvar, slope, prior_slope


# The optional inputs (the prior's two tensors, the clamps' limits, the prior's gradient buffers) are None when
# absent: Triton compiles None arguments as constants, so each combination is a kernel of its own, with no trace
# of the parts it lacks. An absent tensor's row pointers are the first input's, never read.


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
    HAS_EPS: tl.constexpr, ALIGNED: tl.constexpr, INT64: tl.constexpr, SHARED_PRIOR: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS, INT64)
    n_splits = tl.num_programs(1)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    row_mask = rows < n_rows
    mu_rows = _row_starts(rows, n_inner, stride_mu_outer, stride_mu_inner, ALIGNED)
    logvar_rows = _row_starts(rows, n_inner, stride_logvar_outer, stride_logvar_inner, ALIGNED)
    eps_rows = mu_rows
    if HAS_EPS:
        eps_rows = _row_starts(rows, n_inner, stride_eps_outer, stride_eps_inner, ALIGNED)
    prior_mu_rows, prior_row_mask = mu_rows, row_mask
    if prior_mu_ptr is not None:
        prior_mu_rows, prior_row_mask = _prior_rows(rows, row_mask, n_inner, stride_prior_mu_outer,
                                                    stride_prior_mu_inner, ALIGNED, SHARED_PRIOR)
    prior_logvar_rows = mu_rows
    if prior_logvar_ptr is not None:
        prior_logvar_rows, prior_row_mask = _prior_rows(rows, row_mask, n_inner, stride_prior_logvar_outer,
                                                        stride_prior_logvar_inner, ALIGNED, SHARED_PRIOR)
    z_rows = rows * n_cols  # z is contiguous
    if ALIGNED:
        z_rows = _multiple_of_4(z_rows)
    groups = tl.arange(0, BLOCK_GROUPS)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    kl = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
    # A while loop, not range(): Triton 3.6's interpreter cannot take a tensor as a range() bound.
    while group_start < group_end:
        col0, n_left = _step(group_start, col_end, BLOCK_GROUPS)
        mu, logvar, prior_mu, prior_logvar, _, _ = _load_inputs(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows,
            prior_logvar_rows, col0, groups, row_mask, prior_row_mask, n_left, stride_mu_col, stride_logvar_col,
            stride_prior_mu_col, stride_prior_logvar_col, logvar_limit, logvar_min, logvar_max,
            prior_mu_ptr is not None, prior_logvar_ptr is not None, ALIGNED,
        )
        if HAS_EPS:
            eps = _load_tile(eps_ptr, eps_rows, col0, groups, stride_eps_col, row_mask, n_left, ALIGNED)
        else:
            eps = standard_normal(seed, first_counter, rows, group_start + groups, lanes, groups_per_row)
        std = fast_exp(logvar, 0.5)
        _store_tile(z_ptr, z_rows, col0, groups, row_mask, n_left, mu + std * eps, ALIGNED)
        diff, scaled, ratio, log_ratio = _kl_terms(
            mu, logvar, std, prior_mu, prior_logvar, prior_mu_ptr is not None, prior_logvar_ptr is not None
        )
        # Masked lanes load zeros for every input, whose KL term is exactly 0 (1 + 0 - 1 - 0), except under a hard
        # clamp to a range without 0 (see _padding_kl).
        kl += ratio + diff * scaled - 1.0 - log_ratio
        group_start += BLOCK_GROUPS
    kl_rows = tl.sum(tl.sum(kl, axis=2), axis=1)
    if logvar_min is not None and prior_logvar_ptr is None:
        # The masked lanes a row visited: the loop's last step ends at column 4 * group_start, past col_end.
        kl_rows = _padding_kl_removed(kl_rows, 4 * group_start - col_end, logvar_min, logvar_max)
    row = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tl.store(kl_ptr + row * n_splits + split, 0.5 * kl_rows, mask=row < n_rows)


@triton.jit
def _padding_kl_removed(kl_rows, padding, logvar_min, logvar_max):
    """Row sums of KL terms less what ``padding`` masked lanes a row added under the hard clamp.

    A masked lane loads zeros, and the hard clamp takes its log-variance 0 to ``c = clamp(0, lo, hi)``: without a
    prior log-variance to cancel it, its term is ``e^c - 1 - c``, not 0 when ``[lo, hi]`` excludes 0. Every masked
    lane of a row adds the same term, so it comes off the row's sum once per program, in scalars computed after the
    loop, where a select per element would cost registers (a variant spilled with it). Where ``e^c`` overflows, so do the row's own
    terms (``c`` lies between 0 and each of them): the infinite sum is kept, not made NaN."""
    c = tl.minimum(tl.maximum(0.0, logvar_min), logvar_max)
    term = tl.exp(c) - 1.0 - c
    return kl_rows - padding.to(tl.float32) * tl.where(term < float("inf"), term, 0.0)  # padding >= 0


@triton.jit
def _store_prior_grad(ptr, out_rows, grad, by_columns, col0, groups, row_mask, n_left, tile, n_cols,
                      ALIGNED: tl.constexpr):
    """Write a prior's gradient: per element (rows at ``out_rows`` of a contiguous buffer), or (``by_columns``)
    this tile's sums over its rows, per column."""
    if ptr is not None:
        if by_columns:
            column_sums = tl.sum(grad, axis=0)  # [G, 4]: masked elements load zeros, whose gradients are 0
            col = tl.arange(0, groups.shape[1])[:, None] * 4 + tl.arange(0, 4)[None, :]
            tl.store(ptr + tile * n_cols + col0 + col, column_sums.to(ptr.dtype.element_ty), mask=col < n_left)
        else:
            _store_tile(ptr, out_rows, col0, groups, row_mask, n_left, grad, ALIGNED)


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
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, HAS_EPS: tl.constexpr, ALIGNED: tl.constexpr,
    INT64: tl.constexpr, SHARED_PRIOR: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS, INT64)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    row_mask = rows < n_rows
    # The priors matter to the KL's gradient alone.
    HAS_PRIOR_MU: tl.constexpr = HAS_GRAD_KL and prior_mu_ptr is not None
    HAS_PRIOR_LOGVAR: tl.constexpr = HAS_GRAD_KL and prior_logvar_ptr is not None
    mu_rows = _row_starts(rows, n_inner, stride_mu_outer, stride_mu_inner, ALIGNED)
    logvar_rows = _row_starts(rows, n_inner, stride_logvar_outer, stride_logvar_inner, ALIGNED)
    grad_z_rows = mu_rows
    eps_rows = mu_rows
    if HAS_GRAD_Z:
        grad_z_rows = _row_starts(rows, n_inner, stride_grad_z_outer, stride_grad_z_inner, ALIGNED)
        if HAS_EPS:
            eps_rows = _row_starts(rows, n_inner, stride_eps_outer, stride_eps_inner, ALIGNED)
    prior_mu_rows, prior_row_mask = mu_rows, row_mask
    if HAS_PRIOR_MU:
        prior_mu_rows, prior_row_mask = _prior_rows(rows, row_mask, n_inner, stride_prior_mu_outer,
                                                    stride_prior_mu_inner, ALIGNED, SHARED_PRIOR)
    prior_logvar_rows = mu_rows
    if HAS_PRIOR_LOGVAR:
        prior_logvar_rows, prior_row_mask = _prior_rows(rows, row_mask, n_inner, stride_prior_logvar_outer,
                                                        stride_prior_logvar_inner, ALIGNED, SHARED_PRIOR)
    out_rows = rows * n_cols  # the gradients are contiguous
    if ALIGNED:
        out_rows = _multiple_of_4(out_rows)
    if HAS_GRAD_KL:
        grad_kl = tl.load(grad_kl_ptr + rows * stride_grad_kl, mask=row_mask, other=0.0).to(tl.float32)
    groups = tl.arange(0, BLOCK_GROUPS)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    while group_start < group_end:
        col0, n_left = _step(group_start, col_end, BLOCK_GROUPS)
        mu, logvar, prior_mu, prior_logvar, slope, prior_slope = _load_inputs(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, mu_rows, logvar_rows, prior_mu_rows,
            prior_logvar_rows, col0, groups, row_mask, prior_row_mask, n_left, stride_mu_col, stride_logvar_col,
            stride_prior_mu_col, stride_prior_logvar_col, logvar_limit, logvar_min, logvar_max, HAS_PRIOR_MU,
            HAS_PRIOR_LOGVAR, ALIGNED,
        )
        std = fast_exp(logvar, 0.5)
        grad_mu = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        grad_logvar = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=tl.float32)
        if HAS_GRAD_Z:
            grad_z = _load_tile(grad_z_ptr, grad_z_rows, col0, groups, stride_grad_z_col, row_mask, n_left, ALIGNED)
            if HAS_EPS:
                eps = _load_tile(eps_ptr, eps_rows, col0, groups, stride_eps_col, row_mask, n_left, ALIGNED)
            else:
                eps = standard_normal(seed, first_counter, rows, group_start + groups, lanes, groups_per_row)
            grad_mu += grad_z
            grad_logvar += 0.5 * grad_z * eps * std
        if HAS_GRAD_KL:
            diff, scaled, ratio, _ = _kl_terms(mu, logvar, std, prior_mu, prior_logvar, HAS_PRIOR_MU, HAS_PRIOR_LOGVAR)
            grad_mu += grad_kl * scaled
            grad_logvar += 0.5 * grad_kl * (ratio - 1.0)
            _store_prior_grad(grad_prior_mu_ptr, out_rows, -grad_kl * scaled, prior_mu_grad_by_columns, col0, groups,
                              row_mask, n_left, tile, n_cols, ALIGNED)
            grad_prior_logvar = 0.5 * grad_kl * (1.0 - ratio - diff * scaled)
            grad_prior_logvar = _through_clamp(grad_prior_logvar, prior_slope, logvar_limit, logvar_min)
            _store_prior_grad(grad_prior_logvar_ptr, out_rows, grad_prior_logvar, prior_logvar_grad_by_columns, col0,
                              groups, row_mask, n_left, tile, n_cols, ALIGNED)
        grad_logvar = _through_clamp(grad_logvar, slope, logvar_limit, logvar_min)
        _store_tile(grad_mu_ptr, out_rows, col0, groups, row_mask, n_left, grad_mu, ALIGNED)
        _store_tile(grad_logvar_ptr, out_rows, col0, groups, row_mask, n_left, grad_logvar, ALIGNED)
        group_start += BLOCK_GROUPS


@triton.jit
def _standard_normal_kernel(
    eps_ptr, n_rows, n_cols, seed, first_counter, philox_ptr, cols_per_split,
    ALIGNED: tl.constexpr, INT64: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    tile, split, rows, col_end, group_start, group_end = _program_span(n_cols, cols_per_split, BLOCK_ROWS, INT64)
    groups_per_row = tl.cdiv(n_cols, 4)
    seed, first_counter = _philox_state(seed, first_counter, philox_ptr)
    row_mask = rows < n_rows
    eps_rows = rows * n_cols
    if ALIGNED:
        eps_rows = _multiple_of_4(eps_rows)
    groups = tl.arange(0, BLOCK_GROUPS)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    while group_start < group_end:
        col0, n_left = _step(group_start, col_end, BLOCK_GROUPS)
        eps = standard_normal(seed, first_counter, rows, group_start + groups, lanes, groups_per_row)
        _store_tile(eps_ptr, eps_rows, col0, groups, row_mask, n_left, eps, ALIGNED)
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
    tiling = plan_rows(n_rows, n_cols, device, min_block_cols=GROUP, narrow_padded_cols=True)
    with device_guard(eps):
        _standard_normal_kernel[tiling.grid](
            eps, n_rows, n_cols, seed, first_counter, philox_state, tiling.cols_per_split,
            ALIGNED=n_cols % GROUP == 0, INT64=needs_int64(eps), BLOCK_ROWS=tiling.block_rows,
            BLOCK_GROUPS=tiling.block_cols // GROUP, num_warps=tiling.num_warps,
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

    def aligned(self) -> bool:
        """Whether each row starts at a multiple of four elements, on a 16-byte aligned tensor, with unit column
        stride (as Triton sees it: a group of four columns loads as one vector). True when absent."""
        if self.tensor is None:
            return True
        outer, inner, col = self.strides
        return col == 1 and outer % GROUP == 0 and inner % GROUP == 0 and self.tensor.data_ptr() % 16 == 0


def shared_by_rows(prior_mu: _Matrix, prior_logvar: _Matrix) -> bool:
    """The kernels' ``SHARED_PRIOR``: a prior is given and each of its tensors is the same for every row (stride 0
    along the rows: a learned prior ``(D,)`` or ``(C, H, W)``)."""
    given = [m for m in (prior_mu, prior_logvar) if m.tensor is not None]
    return bool(given) and all(m.strides[:2] == (0, 0) for m in given)


def aligned_rows(n_cols: int, *matrices: _Matrix) -> bool:
    """The kernels' ``ALIGNED``: rows of whole groups of four columns, each starting on a vector boundary in every
    input (:meth:`_Matrix.aligned`) and in the contiguous outputs."""
    return n_cols % GROUP == 0 and all(m.aligned() for m in matrices)


def prior_grad_mode(prior: torch.Tensor | None, shape: torch.Size, event_dims: int, needed: bool) -> str:
    """How the backward kernel writes a prior's gradient (module docstring): ``"none"``, ``"elements"`` or
    ``"columns"`` (a prior shared by all rows: of size 1 along every leading dim)."""
    if prior is None or not needed:
        return "none"
    n_lead = len(shape) - event_dims
    aligned = (1,) * (len(shape) - prior.dim()) + tuple(prior.shape)
    return "columns" if all(size == 1 for size in aligned[:n_lead]) else "elements"


def plan_forward(n_rows: int, n_cols: int, device: torch.device, shared_prior: bool) -> RowTiling:
    """The forward kernel's tiling of ``n_rows`` rows of ``n_cols`` columns. Where it splits the columns over
    programs (``n_splits > 1``), the per-split KL sums are added by one more (small) kernel."""
    if shared_prior:
        # Its clamp and exponential are computed once per column a thread holds: tall tiles of few columns give each
        # thread four rows of one group (2048 elements, 4 warps).
        return plan_rows(n_rows, n_cols, device, min_block_cols=GROUP, narrow_padded_cols=True,
                         min_block_rows=SHARED_PRIOR_BLOCK_ROWS, block_elements=SHARED_PRIOR_BLOCK_ELEMENTS,
                         num_warps=4)
    return plan_rows(n_rows, n_cols, device, min_block_cols=GROUP, narrow_padded_cols=True)


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
    shared_prior = shared_by_rows(prior_mu2, prior_logvar2)
    tiling = plan_forward(n_rows, n_cols, mu.device, shared_prior)
    z = torch.empty(shape, dtype=mu.dtype, device=mu.device)
    kl = torch.empty((n_rows, tiling.n_splits), dtype=torch.float32, device=mu.device)
    with device_guard(mu):
        _reparameterize_kl_forward_kernel[tiling.grid](
            mu2.tensor, logvar2.tensor, eps2.pointer(mu2.tensor), prior_mu2.tensor, prior_logvar2.tensor, z, kl,
            n_rows, n_cols, n_inner,
            *mu2.strides, *logvar2.strides, *eps2.strides, *prior_mu2.strides, *prior_logvar2.strides,
            seed, first_counter, philox_state if eps is None else None, tiling.cols_per_split, logvar_limit,
            *_clamp_limits(logvar_clamp),
            HAS_EPS=eps is not None, ALIGNED=aligned_rows(n_cols, mu2, logvar2, eps2, prior_mu2, prior_logvar2),
            INT64=needs_int64(mu, *(m.tensor for m in (mu2, logvar2, eps2, prior_mu2, prior_logvar2))),
            SHARED_PRIOR=shared_prior, BLOCK_ROWS=tiling.block_rows, BLOCK_GROUPS=tiling.block_cols // GROUP,
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
    has_prior = prior_mu is not None or prior_logvar is not None
    modes = [
        prior_grad_mode(prior, shape, event_dims, needed and grad_kl is not None)
        for prior, needed in zip((prior_mu, prior_logvar), prior_grads)
    ]
    min_block_rows = COLUMN_BLOCK_ROWS if "columns" in modes else 1
    # With a prior, or the hard clamp's flags, 8 elements a thread, not 16: the prior's terms and gradients would not
    # fit the registers, and with the flags ptxas held one variant (noise drawn, 20 columns) to 128 and spilled.
    small_tiles = (has_prior and grad_kl is not None) or logvar_clamp is not None
    block_elements = PRIOR_BACKWARD_BLOCK_ELEMENTS if small_tiles else None
    tiling = plan_rows(n_rows, n_cols, mu.device, min_block_cols=GROUP, narrow_padded_cols=True,
                       min_block_rows=min_block_rows,
                       block_elements=block_elements)
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
            ALIGNED=aligned_rows(n_cols, grad_z2, mu2, logvar2, eps2, prior_mu2, prior_logvar2),
            INT64=needs_int64(mu, *(m.tensor for m in (grad_z2, mu2, logvar2, eps2, prior_mu2, prior_logvar2))),
            SHARED_PRIOR=shared_by_rows(prior_mu2, prior_logvar2), BLOCK_ROWS=tiling.block_rows,
            BLOCK_GROUPS=tiling.block_cols // GROUP, num_warps=tiling.num_warps,
        )
    grad_prior_mu, grad_prior_logvar = (
        _prior_grad(mode, buffer, prior, shape, event_dims) for mode, buffer, prior in zip(modes, buffers, (prior_mu, prior_logvar))
    )
    return grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar
