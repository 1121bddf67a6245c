"""Fused negative log-likelihood of the discretized mixture of logistics, with its gradient in the forward.

Per pixel (``C`` channels, ``M`` components, ``K = 2**num_bits - 1``, bin
half-width ``h = 1 / K``), from the observed level ``k_c`` of each channel at
``y_c = 2 k_c h - 1``::

    mean_cm   = mu_cm + sum_{j<c} tanh(coef_(c,j)m) y_j         s_cm = max(log_scale_cm, -7), inv = e^-s
    a, b      = inv (y_c - h - mean_cm), inv (y_c + h - mean_cm),  u = a - b = -2 h inv
    L_cm      = log(sigmoid(b) - sigmoid(a)) = -softplus(-b) - softplus(a) + log(1 - e^u)
                (lowest level: -softplus(-b); highest level: -softplus(a))
    log p     = logsumexp_m(log_softmax(l)_m + sum_c L_cm)        nll of a sample = -sum of log p

Every term of ``L`` is a log of a number in (0, 1], so they add without
cancelling: the value carries no error beyond the float32 rounding of ``a``
and ``b`` themselves, for any mean and any scale from ``e^-7`` up (masses of
1e-30 and far below), with no density approximation and a finite gradient.
``log(1 - e^u)`` is taken as ``log(2h) - s + log r`` with ``r = (1 - e^u) / -u``
for ``u > -log 2`` and as ``log1p(-e^u)`` below: two exact forms of one
function, equal to rounding where they meet.

Gradient in the forward. With ``R_m`` the posterior responsibility of
component ``m`` (the softmax of the summed log terms), the kernel writes, in
the pass that sums the nll, times ``grad_scale``::

    d nll / d l_m          = softmax(l)_m - R_m
    d nll / d mu_cm        = -R_m dL/dmean,      dL/dmean = inv (sigmoid(a) + sigmoid(b) - 1)   (interior)
    d nll / d log_scale_cm = -R_m dL/ds [log_scale >= -7],  dL/ds = a sigmoid(a) - b sigmoid(-b) + u / expm1(-u)
    d nll / d coef_(c,j)m  = -R_m dL/dmean (1 - tanh^2(coef)) y_j

(edge levels keep the ``a`` or the ``b`` terms only). The clamp passes the
gradient at ``log_scale == -7`` exactly, as ``torch.clamp``'s autograd does.

Tiles. The grid is :func:`~fastvae.kernels.launch.plan_rows`'s: rows are
samples, columns the pixels of a sample (``N``, the product of the trailing
dims), and a program covers ``BLOCK_ROWS x BLOCK_COLS`` pixels times the
``M_PAD`` (``M`` rounded up to a power of two, the padding masked off)
components, :func:`tile_slots` pixel-components in all, so the registers a
thread needs do not grow with ``M``. The channel loop is unrolled (``C`` is a
constexpr): channel ``c``'s derivatives and tanh terms wait in registers for
the responsibilities, which need every channel. ``params`` and ``x`` are read
with their own strides (int64 offsets); partial sums per sample and column
split are added by the launcher. Compiled for sm_90 on contiguous ``params``,
Triton gives each thread consecutive pixels (vector loads) and spreads the
components over threads and warps, so the reductions over components pass
through 1 KiB of shared memory.

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

import math

import torch
import triton
import triton.language as tl

from .launch import device_guard, expm1, log1p, plan_rows, row_offsets, sum_splits

MIN_LOG_SCALE = tl.constexpr(-7.0)
LOG_2 = tl.constexpr(math.log(2.0))
NUM_WARPS = 4


def tile_slots(channels: int) -> int:
    """Pixel-components a program holds at once: 4, 2, then 1 per thread for 1, 2, 3 or more channels.

    Each channel's derivatives and tanh terms wait in registers for the
    responsibilities, so a thread's registers grow with ``C`` and with its
    slots. Compiled for sm_90 (M = 16, with the gradient) these sizes take
    80, 106, 128 and 184 registers for C = 1, 2, 3, 4, and nothing spills;
    two slots per thread at C = 3 would take 176, four would spill.
    """
    return 32 * NUM_WARPS * {1: 4, 2: 2}.get(channels, 1)


@triton.jit
def _softplus_and_sigmoid(z):
    """``softplus(z) = log(1 + e^z)`` and ``sigmoid(z)`` from one exponential, stable for any ``z``."""
    e = tl.exp(-tl.abs(z))
    return tl.maximum(z, 0.0) + log1p(e), tl.where(z >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _tanh_and_derivative(z):
    """``tanh(z)`` and ``1 - tanh(z)**2``, both to float32's relative accuracy (no ``1 - t*t`` cancellation)."""
    e = tl.exp(-2.0 * tl.abs(z))
    one_minus_e = -expm1(-2.0 * tl.abs(z))
    t = one_minus_e / (1.0 + e)
    return tl.where(z < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _log_one_minus_exp(u, log_minus_u):
    """``log(1 - e^u)`` for ``u < 0``, given ``log(-u)``, and ``u * d/du`` of it (``-u / expm1(-u)``).

    ``r = (1 - e^u) / -u`` is in (0, 1]; Kahan's ``(e - 1) / log(e)`` keeps it
    accurate where ``e = e^u`` rounds near 1, and it never divides by ``u``, so a
    ``u`` that underflows (a huge scale) still gives ``log(-u)``, from ``log_minus_u``.
    """
    e = tl.exp(u)
    near = u > -LOG_2
    kahan = near & (e != 1.0)
    log_e = tl.where(kahan, tl.log(tl.where(kahan, e, 0.5)), u)  # u itself where e^u is far from 1
    r = tl.where(e == 1.0, 1.0, (e - 1.0) / log_e)
    value = tl.where(near, log_minus_u + tl.log(r), log1p(-tl.where(near, 0.5, e)))
    return value, e / r


@triton.jit
def _level(x, max_level):
    """``clamp(round(x * max_level), 0, max_level)``, rounding half to even as torch.round does; NaN stays NaN."""
    v = _clamp(x * max_level, -1.0, max_level + 1.0)  # inf rounds to the edge, as in torch
    f = tl.floor(v)
    d = v - f
    f_is_odd = f - 2.0 * tl.floor(0.5 * f)
    return _clamp(tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + f_is_odd)), 0.0, max_level)


@triton.jit
def _clamp(x, low, high):
    """``min(max(x, low), high)`` that keeps NaN, as ``torch.clamp`` does."""
    x = tl.maximum(x, low, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, high, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _log_bin_mass(level, y, mean, log_scale, max_level, half_width, log_bin_width):
    """log of the bin's mass for one channel, and its derivatives in the mean and in the raw log-scale."""
    s = tl.maximum(log_scale, MIN_LOG_SCALE, propagate_nan=tl.PropagateNan.ALL)
    inv = tl.exp(-s)
    a = inv * (y - half_width - mean)
    b = inv * (y + half_width - mean)
    softplus_a, sigmoid_a = _softplus_and_sigmoid(a)  # log(1 - F(y - h)) = -softplus(a)
    softplus_neg_b, sigmoid_neg_b = _softplus_and_sigmoid(-b)  # log F(y + h) = -softplus(-b)
    log_width = log_bin_width - s  # log(-u) = log(2 h inv), exact even where inv underflows
    log_gap, u_d_gap = _log_one_minus_exp(-tl.exp(log_width), log_width)
    lower_open = level == 0.0  # the lowest bin reaches -inf: no F(y - h) term
    upper_open = level == max_level  # the highest reaches +inf: no F(y + h) term
    interior = (~lower_open) & (~upper_open)
    log_mass = tl.where(upper_open, 0.0, -softplus_neg_b) + tl.where(lower_open, 0.0, -softplus_a)
    log_mass += tl.where(interior, log_gap, 0.0)
    d_a = tl.where(lower_open, 0.0, -sigmoid_a)
    d_b = tl.where(upper_open, 0.0, sigmoid_neg_b)
    d_mean = -inv * (d_a + d_b)
    # a, b and u all scale with inv = e^-s; the clamp passes the gradient where log_scale >= -7.
    d_log_scale = -(a * d_a + b * d_b) - tl.where(interior, u_d_gap, 0.0)
    d_log_scale = tl.where(log_scale >= MIN_LOG_SCALE, d_log_scale, 0.0)
    return log_mass, d_mean, d_log_scale


@triton.jit
def _load_block(ptr, pixel_offsets, first_channel, components, stride_channel, mask):
    """The ``M_PAD`` channels from ``first_channel`` on at each pixel of the tile, as float32 (0 where masked)."""
    offsets = pixel_offsets + (first_channel + components) * stride_channel
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_block(ptr, value, pixel_offsets, first_channel, components, stride_channel, mask):
    """Write ``value`` to the ``M_PAD`` channels from ``first_channel`` on, in ``ptr``'s dtype."""
    offsets = pixel_offsets + (first_channel + components) * stride_channel
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dmol_forward_kernel(
    params_ptr, x_ptr, nll_ptr, grad_ptr,
    n_rows, n_cols, n_mix,
    stride_params_row, stride_params_channel, stride_params_col,
    stride_x_row, stride_x_channel, stride_x_col,
    stride_grad_row, stride_grad_channel, stride_grad_col,
    cols_per_split, tiles_per_split,
    max_level, half_width, log_bin_width, grad_scale,
    C: tl.constexpr, M_PAD: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1)
    rows = row_offsets(tl.program_id(0), BLOCK_ROWS)[:, None, None]
    components = tl.arange(0, M_PAD).to(tl.int64)[None, None, :]
    component_ok = components < n_mix
    # Channel blocks: logits at 0, means at M (1 + c), log-scales at M (1 + C + c), coefficients at M (1 + 2C + pair).
    nll = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    # A while loop: Triton 3.6's interpreter cannot take a kernel argument as a range() bound (numpy 2 refuses
    # to read its 1-element array as an int).
    tile = 0
    while tile < tiles_per_split:
        cols = split * cols_per_split + tile * BLOCK_COLS + tl.arange(0, BLOCK_COLS)[None, :, None]
        pixel_ok = (rows < n_rows) & (cols < n_cols)
        mask = pixel_ok & component_ok
        pixel = rows * stride_params_row + cols * stride_params_col

        logits = _load_block(params_ptr, pixel, 0, components, stride_params_channel, mask)
        logits = tl.where(component_ok, logits, float("-inf"))
        ys = ()
        d_means = ()
        d_log_scales = ()
        tanh_slopes = ()  # 1 - tanh^2 of each coefficient, in pair order
        log_mass_sum = tl.zeros([BLOCK_ROWS, BLOCK_COLS, M_PAD], dtype=tl.float32)
        for c in tl.static_range(C):
            x_c = tl.load(x_ptr + rows * stride_x_row + c * stride_x_channel + cols * stride_x_col,
                          mask=pixel_ok, other=0.0).to(tl.float32)
            level = _level(x_c, max_level)
            y = level * (2.0 * half_width) - 1.0
            mean = _load_block(params_ptr, pixel, n_mix * (1 + c), components, stride_params_channel, mask)
            for j in tl.static_range(c):
                coef_channel = n_mix * (1 + 2 * C + c * (c - 1) // 2 + j)
                coef = _load_block(params_ptr, pixel, coef_channel, components, stride_params_channel, mask)
                t, slope = _tanh_and_derivative(coef)
                mean += t * ys[j]
                tanh_slopes = tanh_slopes + (slope,)
            log_scale = _load_block(params_ptr, pixel, n_mix * (1 + C + c), components, stride_params_channel, mask)
            log_mass, d_mean, d_log_scale = _log_bin_mass(level, y, mean, log_scale, max_level, half_width,
                                                          log_bin_width)
            log_mass_sum += log_mass
            ys = ys + (y,)
            d_means = d_means + (d_mean,)
            d_log_scales = d_log_scales + (d_log_scale,)

        # log_softmax of the logits, then logsumexp over the components (padding at -inf drops out).
        logit_max = tl.max(logits, axis=2)[:, :, None]
        prior = tl.exp(logits - logit_max)
        prior_sum = tl.sum(prior, axis=2)[:, :, None]
        joint = logits - logit_max - tl.log(prior_sum) + log_mass_sum
        joint_max = tl.max(joint, axis=2)[:, :, None]
        posterior = tl.exp(joint - joint_max)
        posterior_sum = tl.sum(posterior, axis=2)[:, :, None]
        log_p = joint_max + tl.log(posterior_sum)
        nll += tl.sum(tl.where(pixel_ok, -log_p, 0.0), axis=2)

        if WRITE_GRAD:
            out = rows * stride_grad_row + cols * stride_grad_col
            responsibility = posterior / posterior_sum
            grad_logits = (prior / prior_sum - responsibility) * grad_scale
            _store_block(grad_ptr, grad_logits, out, 0, components, stride_grad_channel, mask)
            weight = -responsibility * grad_scale
            for c in tl.static_range(C):
                grad_mean = weight * d_means[c]
                _store_block(grad_ptr, grad_mean, out, n_mix * (1 + c), components, stride_grad_channel, mask)
                grad_log_scale = weight * d_log_scales[c]
                _store_block(grad_ptr, grad_log_scale, out, n_mix * (1 + C + c), components, stride_grad_channel,
                             mask)
                for j in tl.static_range(c):
                    coef_channel = n_mix * (1 + 2 * C + c * (c - 1) // 2 + j)
                    grad_coef = grad_mean * tanh_slopes[c * (c - 1) // 2 + j] * ys[j]
                    _store_block(grad_ptr, grad_coef, out, coef_channel, components, stride_grad_channel, mask)
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
    m_pad = triton.next_power_of_2(num_mixtures)
    pixels = max(tile_slots(channels) // m_pad, 1)
    tiling = plan_rows(batch, n_cols, params.device, block_elements=pixels, num_warps=NUM_WARPS)
    partial_nll = torch.empty((batch, tiling.n_splits), dtype=torch.float32, device=params.device)
    grad = torch.empty(params3.shape, dtype=params.dtype, device=params.device) if write_grad else None
    max_level = 2**num_bits - 1
    with device_guard(params):
        _dmol_forward_kernel[tiling.grid](
            params3, x3, partial_nll, grad if write_grad else partial_nll,
            batch, n_cols, num_mixtures,
            *params3.stride(), *x3.stride(), *(grad.stride() if write_grad else (0, 0, 0)),
            tiling.cols_per_split, tiling.cols_per_split // tiling.block_cols,
            float(max_level), 1.0 / max_level, math.log(2.0 / max_level), grad_scale,
            C=channels, M_PAD=m_pad, WRITE_GRAD=write_grad,
            BLOCK_ROWS=tiling.block_rows, BLOCK_COLS=tiling.block_cols, num_warps=tiling.num_warps,
        )
    return sum_splits(partial_nll), grad.view(params.shape) if write_grad else None
