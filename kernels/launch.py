"""Launch planning shared by fastvae's kernels.

The fused ops all see their input as a matrix of ``n_rows`` samples by
``n_cols`` features, and reduce along the rows. A program handles a tile of
``block_rows x block_cols`` elements (about ``BLOCK_ELEMENTS``): many short
rows at once when rows are short, one long row in column chunks when rows are
long. When there are too few row tiles to fill the device (a small batch of
large samples), each row is also split into ``n_splits`` column ranges run by
separate programs, whose partial sums the caller adds up.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BLOCK_ELEMENTS = 4096
MAX_GRID_Y = 65535
# Programs per streaming multiprocessor that keep the memory system busy.
PROGRAMS_PER_SM = 4
# The interpreter has no SMs; this small count still exercises the split path.
CPU_PROGRAMS = 8


@triton.jit
def _probe_kernel():
    pass


def is_interpreted() -> bool:
    """Whether Triton's interpreter runs these kernels (``TRITON_INTERPRET=1`` when they were defined)."""
    return isinstance(_probe_kernel, InterpretedFunction)


@functools.cache
def target_programs(device: torch.device) -> int:
    """How many programs a launch needs to fill ``device``."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_PROGRAMS


@dataclass(frozen=True)
class RowTiling:
    """How a row-wise kernel covers an ``n_rows x n_cols`` matrix.

    Program ``(i, s)`` of the ``(row_tiles, n_splits)`` grid covers rows
    ``[i * block_rows, (i + 1) * block_rows)`` and columns
    ``[s * cols_per_split, (s + 1) * cols_per_split)``, in steps of
    ``block_cols``; ``cols_per_split`` is a multiple of ``block_cols``.
    """

    block_rows: int
    block_cols: int
    row_tiles: int
    n_splits: int
    cols_per_split: int
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.row_tiles, self.n_splits)


# A column block may leave up to this fraction of a row's slots empty past its end before a narrower one is taken.
MAX_COLUMN_PADDING = 1 / 8


def least_padded_block(n_cols: int, narrowest: int, widest: int) -> int:
    """The widest power-of-two column block from ``narrowest`` to ``widest`` that covers a row of ``n_cols`` with at
    most :data:`MAX_COLUMN_PADDING` of its slots past the row's end, or else the one that leaves the fewest.

    Every slot of a tile costs a thread its instructions, live or masked off: rows of 20 columns in blocks of 32
    would execute 1.6 times the instructions their elements need (the sm_90 audit counts them per real element).
    A narrower block takes more steps along the row, or more programs, instead.
    """
    if n_cols <= 0 or widest <= narrowest:
        return widest
    candidates = []
    block = widest
    while block >= narrowest:
        candidates.append(block)
        block //= 2
    padded = {b: triton.cdiv(n_cols, b) * b for b in candidates}
    within = [b for b in candidates if padded[b] <= n_cols * (1 + MAX_COLUMN_PADDING)]
    return within[0] if within else min(candidates, key=lambda b: (padded[b], -b))


def plan_rows(
    n_rows: int,
    n_cols: int,
    device: torch.device,
    *,
    min_block_cols: int = 1,
    min_block_rows: int = 1,
    block_elements: int | None = None,
    num_warps: int | None = None,
    narrow_padded_cols: bool = False,
) -> RowTiling:
    """Tile sizes, column splits and warps for a row-wise kernel.

    ``min_block_cols`` is the smallest column block the kernel accepts (a power
    of two), for kernels that work on groups of columns. ``min_block_rows``
    (a power of two) asks for tiles of at least that many rows where there are
    that many, with narrower column blocks to match, for kernels that also
    reduce along the columns: each tile then adds up ``block_rows`` rows.
    ``block_elements`` (a power of two; default :data:`BLOCK_ELEMENTS`) bounds
    ``block_rows * block_cols``: smaller for kernels whose elements keep many
    values live (the components of a mixture at each pixel, a prior's terms and
    gradients), so that each thread holds fewer. ``num_warps`` defaults to 8 for
    full tiles, else 4. ``narrow_padded_cols`` steps along the columns in the
    block :func:`least_padded_block` picks, for kernels that loop over a split's
    columns and accept any block of at least ``min_block_cols``: rows of 20 or 49
    columns no longer run in blocks of 32 or 64 (taller tiles, or more column
    splits, take the slots instead).
    """
    block_elements = BLOCK_ELEMENTS if block_elements is None else block_elements
    tall_rows = min(triton.next_power_of_2(n_rows), min_block_rows)
    block_cols = max(min(triton.next_power_of_2(n_cols), block_elements // tall_rows), min_block_cols)
    if narrow_padded_cols:
        block_cols = least_padded_block(n_cols, min_block_cols, block_cols)
    block_rows = max(min(triton.next_power_of_2(n_rows), block_elements // block_cols), 1)
    row_tiles = triton.cdiv(n_rows, block_rows)
    col_blocks = triton.cdiv(n_cols, block_cols)
    n_splits = min(col_blocks, max(triton.cdiv(target_programs(device), row_tiles), 1), MAX_GRID_Y)
    cols_per_split = triton.cdiv(col_blocks, n_splits) * block_cols
    n_splits = triton.cdiv(n_cols, cols_per_split)
    if num_warps is None:
        num_warps = 8 if block_rows * block_cols >= block_elements else 4
    return RowTiling(block_rows, block_cols, row_tiles, n_splits, cols_per_split, num_warps)


def as_rows(tensor: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``tensor`` as an ``(n_rows, n_cols)`` matrix: a view with its own strides when one exists, else a copy.

    Slices such as ``h[:, :D]`` stay views, so the kernels read them in place.
    """
    return tensor.reshape(-1, n_cols)


def merged_stride(sizes: Sequence[int], strides: Sequence[int]) -> int | None:
    """The one stride that steps through dims ``sizes`` (with ``strides``) as a single flattened dim, or ``None``.

    Dims of size 1 take no steps and are skipped; no dims (or only size-1 ones) give 0.
    """
    dims = [(size, stride) for size, stride in zip(sizes, strides) if size != 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != size * inner:
            return None
    return dims[-1][1] if dims else 0


def _split_strides(sizes: Sequence[int], strides: Sequence[int], n_lead: int) -> tuple[int, int, int] | None:
    """``(outer, inner, col)`` strides of :func:`split_rows`' layout, or ``None`` if the tensor has none."""
    outer = strides[0] if n_lead >= 1 else 0
    inner = merged_stride(sizes[1:n_lead], strides[1:n_lead]) if n_lead >= 1 else 0
    col = merged_stride(sizes[n_lead:], strides[n_lead:])
    return None if inner is None or col is None else (outer, inner, col)


def split_rows(tensor: torch.Tensor, shape: Sequence[int], event_dims: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``tensor`` broadcast to ``shape`` as rows (the leading dims) by columns (the last ``event_dims`` dims).

    Row ``r`` starts at ``(r // n_inner) * outer + (r % n_inner) * inner``
    (:func:`split_row_starts`), with ``n_inner = prod(shape[1:-event_dims])``,
    and column ``c`` lies ``c * col`` further on. Splitting the row index in
    two reads the channel slices of a feature map in place: ``h[:, :C]`` of a
    ``(B, 2C, H, W)`` tensor, with one row per sample and channel
    (``event_dims=2``) or per sample (``3``), and a linear head's chunks.

    Returns the tensor to hand to a kernel, with its ``(outer, inner, col)``
    strides: a view of ``tensor`` (its own memory: broadcast dims get stride
    0) when its layout allows, else a contiguous copy, of the event alone when
    ``tensor`` is broadcast over all rows (a learned prior: ``prod(event)``
    elements, not ``prod(shape)``).
    """
    n_lead = len(shape) - event_dims
    view = tensor.expand(shape)
    strides = _split_strides(view.shape, view.stride(), n_lead)
    if strides is None:
        broadcast_over_rows = all(s == 0 or n == 1 for n, s in zip(view.shape[:n_lead], view.stride()[:n_lead]))
        if broadcast_over_rows:
            view = view[(0,) * n_lead].contiguous().expand(shape)
        else:
            view = view.contiguous()
        strides = _split_strides(view.shape, view.stride(), n_lead)
    return view, strides


@triton.jit
def split_row_starts(rows, n_inner, stride_outer, stride_inner):
    """Offsets of rows ``rows`` in a tensor laid out as :func:`split_rows` describes, in the rows' integer type.

    In int32 (the launcher found every offset below 2**30: :func:`needs_int64`) the division by ``n_inner`` is an
    unsigned 32-bit one, a third the instructions of a signed 64-bit one.
    """
    if rows.dtype == tl.int32:
        row = rows.to(tl.uint32)
        divisor = tl.cast(n_inner, tl.uint32)  # n_inner may be the constant 1
        outer = row // divisor
        inner = row - outer * divisor
        return outer.to(tl.int32) * stride_outer + inner.to(tl.int32) * stride_inner
    return (rows // n_inner) * stride_outer + (rows % n_inner) * stride_inner


INT32_INDEX_LIMIT = 2**30


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel over these tensors must index in int64: one of them has an element count or an element
    offset of at least 2**30 (below that, int32 indices hold a tile's overshoot past the end too)."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        if max(t.numel(), extent) >= INT32_INDEX_LIMIT:
            return True
    return False


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s GPU the current one, so that Triton launches there and not on GPU 0."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@triton.jit
def load_f32(ptr, rows, cols, stride_row, stride_col, mask):
    """Elements ``(rows, cols)`` of a strided matrix, as float32 (0 where masked off)."""
    return tl.load(ptr + rows * stride_row + cols * stride_col, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def row_offsets(pid, BLOCK_ROWS: tl.constexpr):
    """int64 row indices of tile ``pid``: offsets into tensors of more than 2**31 elements must not wrap."""
    return pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)


def sum_splits(partial: torch.Tensor) -> torch.Tensor:
    """Per-row values from a kernel's ``(n_rows, n_splits)`` partial sums (a view when there is one split)."""
    return partial.sum(dim=1) if partial.shape[1] > 1 else partial.view(-1)


# ---- float32 math that stays accurate where the plain formula cancels ----------------------------------


@triton.jit
def log1p(u):
    """log(1 + u), accurate for small u (Kahan: the rounding of 1 + u cancels out)."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


# ---- float32 math in few instructions: the SFU where its accuracy is provably enough --------------------

# Whether the kernels run in Triton's interpreter, as a constexpr a kernel can branch on: the interpreter cannot
# run inline PTX, so the helpers below that use it take the exact formula there (a compile-time branch: each
# build has only its own).
INTERPRETED = tl.constexpr(is_interpreted())
LOG_2 = tl.constexpr(math.log(2.0))
LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def fast_rcp(x):
    """``1 / x`` in one SFU instruction (``rcp.approx.ftz.f32``: within 1 ulp for normal ``x``, subnormal ``x`` and
    results flushed to zero); Triton's ``/`` is ``div.full.f32`` (2 ulp), whose range scaling costs 6 more
    instructions. The interpreter divides."""
    if INTERPRETED:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def fast_log2(x):
    """``log2(x)`` in one SFU instruction (``lg2.approx.ftz.f32``): within 2^-22 of it for ``x`` in [0.5, 2] (CUDA
    C++ Programming Guide, ``__log2f``), within 2 ulp elsewhere (subnormal ``x`` flushed to zero). The interpreter
    takes numpy's log2."""
    if INTERPRETED:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def fast_log(x):
    """``log(x)`` for a positive normal float32 ``x`` (NaN stays NaN; not for 0, subnormals or inf), within
    1.7e-7 + 1.2e-7 |log x|: ``x = m 2^e`` with ``m`` in [1/sqrt 2, sqrt 2), split off by integer arithmetic on
    its bits, and ``log x = (e + log2 m) log 2`` with the SFU's ``log2`` where it is accurate (:func:`fast_log2`).
    About 9 instructions; ``tl.log`` (libdevice's ``logf``, 1 ulp) takes 22."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23  # 0x3F3504F3 is 1/sqrt(2)
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    return tl.where(x == x, (e.to(tl.float32) + fast_log2(m)) * LOG_2, x)


@triton.jit
def fast_exp(x, scale):
    """e^(scale x): ``ex2.approx.ftz`` of ``x (scale log2 e)``, the constant folded (``scale`` a number or a scalar
    taken once per program): two instructions, where ``tl.exp`` takes five to keep denormal results (relative error
    about 2**-22; a result below 2**-126 flushes to 0). Exactly ``tl.exp(scale * x)`` when interpreted."""
    if INTERPRETED:
        return tl.exp(scale * x)
    else:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * (scale * LOG2_E)], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def log1p_unit(x):
    """log(1 + x) for ``x`` in [0, 1], within 3 ulp, in a dozen instructions and no libdevice call:
    ``2 atanh(s)`` with ``s = x / (2 + x)`` in [0, 1/3], its odd series to ``s**13`` (truncation below 2e-8
    relative), accurate for small ``x`` as for large."""
    s = x * fast_rcp(2.0 + x)
    t = s * s
    series = 2.0 / 13.0
    series = series * t + 2.0 / 11.0
    series = series * t + 2.0 / 9.0
    series = series * t + 2.0 / 7.0
    series = series * t + 2.0 / 5.0
    series = series * t + 2.0 / 3.0
    series = series * t + 2.0
    return s * series
