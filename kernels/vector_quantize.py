"""Vector quantization (VQ-VAE) without the distance matrix: a nearest-code search that streams the codebook.

For ``N`` vectors ``z_n`` of ``D`` values (rows of any strided layout, read in
place: see :func:`~fastvae.kernels.launch.split_rows`) and a codebook of ``K``
codes ``e_k`` (``(K, D)``):

* **forward** (:func:`vector_quantize_forward`): one program per ``BLOCK_N``
  vectors walks the codebook in tiles of ``BLOCK_K`` codes; ``tl.dot`` gives
  the tile of inner products ``z . e`` on tensor cores, in float32 with
  float32 sums (exact products for 16-bit values, about float32's accuracy for
  float32 ones: :func:`dot_precision`), turned into the
  expanded distance ``||e_k||^2 - 2 z . e_k`` (the vector's own ``||z||^2`` is
  the same for every code). Each register of the tile keeps the smallest
  distance its lane has seen and the code that gave it (a strict ``<``: the
  earlier, lower code wins a tie), so the only reductions across codes come
  once, after the last tile: the minimum, then the lowest code index that
  reaches it. NaN distances (a NaN in the vector or in a code) count as
  ``+inf``: a code with a NaN is never chosen, and a vector with a NaN gets
  code 0 and a NaN loss. Then the program gathers the chosen codes and writes
  ``z_q`` (the code itself, in ``z``'s dtype: ``e + (z - z)``, which is ``e``
  exactly for a finite ``z`` and NaN where ``z`` has a NaN or an infinity), the
  index (int64) and the loss ``(1 + beta) ||z - e||^2`` (float32), the
  distance recomputed from the difference, so that it has no cancellation.
  Nothing of size ``N x K`` exists at any time: the distance tile lives in
  registers. The squared norms of the codes (``K`` floats) come from a small
  kernel before the search (:func:`_code_norms_kernel`), which reads the codebook once.
* **backward** (:func:`vector_quantize_backward`): elementwise over the
  vectors: ``z``'s gradient ``g_zq + 2 beta g (z - e)`` (``g_zq`` the upstream
  gradient of ``z_q``, passed straight through; ``g`` that of each vector's
  loss) and, when the codebook learns by gradient, ``2 g (e - z)`` added into
  row ``k_n`` of a float32 ``(K, D)`` buffer with ``tl.atomic_add`` (summed in
  an order that varies from run to run, in the last bits: as ``index_add_`` on
  CUDA; :mod:`fastvae.ops.vector_quantize` sums with torch's deterministic
  ``index_put_`` instead when ``torch.use_deterministic_algorithms(True)``).
  The chosen codes come from the saved ``z_q``, not from the codebook, which
  an EMA update may have changed in place since the forward.

Memory traffic (DRAM, what at least has to move; ``s`` the bytes of a value;
the codebook, read by every program, is counted once: it stays in L2 up to a
few tens of MB, and beyond that each program's sweep adds ``K D s`` of L2
traffic):

==========  ==========================================================  ===================================
pass        reads -> writes                                             bytes
==========  ==========================================================  ===================================
norms       codebook -> its squared norms                               ``K D s + 4 K``
forward     z, codebook, its norms -> z_q, indices, loss                ``2 N D s + K D s + 4 K + 12 N``
backward    g_zq, z, z_q, g, indices -> grad_z (+ codebook's, atomic)   ``4 N D s + 12 N`` (``+ 4 K D``)
==========  ==========================================================  ===================================

The distance-matrix implementation (``torch.cdist`` or the expanded einsum,
then ``argmin``) writes and reads back ``N x K`` float32 values at least once,
and holds them: ``4 N K`` bytes, 4.3 GB for 65,536 vectors against 16,384 codes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import device_guard, row_offsets, split_row_starts, split_rows

# Vectors per program and codes per tile of the forward's search; the value dim is walked in chunks of at most
# MAX_BLOCK_D (tl.dot needs every dim of a tile to be at least 16).
BLOCK_N = 64
BLOCK_K = 64
MIN_BLOCK_D = 16
MAX_BLOCK_D = 64
CHUNK_BLOCK_D = 32
SEARCH_WARPS = 8
SEARCH_STAGES = 1
# The codes' squared norms: tiles of this many values.
NORMS_ELEMENTS = 2048
# The backward is elementwise: tiles of about this many values.
BACKWARD_ELEMENTS = 2048
BACKWARD_WARPS = 8
BACKWARD_MAX_BLOCK_D = 256


@triton.jit
def _load_rows(ptr, starts, cols, stride_col, mask):
    """Values ``cols`` of the rows that start at ``starts`` (``[BLOCK_N]`` offsets), in their dtype; 0 masked off."""
    return tl.load(ptr + starts[:, None] + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def _code_norms_kernel(codebook_ptr, code_sq_ptr, n_codes, dim, stride_code_row, stride_code_col,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``||e_k||^2`` of each code, in float32: read once, before the search (a program per ``BLOCK_K`` codes)."""
    codes = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D)
    squares = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    d_start = 0
    while d_start < dim:
        d = d_start + cols
        mask = (codes < n_codes)[:, None] & (d < dim)[None, :]
        e = tl.load(codebook_ptr + codes[:, None] * stride_code_row + d[None, :] * stride_code_col, mask=mask,
                    other=0.0).to(tl.float32)
        squares += e * e
        d_start += BLOCK_D
    tl.store(code_sq_ptr + codes, tl.sum(squares, axis=1), mask=codes < n_codes)


@triton.jit
def _vector_quantize_forward_kernel(
    z_ptr, codebook_ptr, code_sq_ptr, z_q_ptr, indices_ptr, loss_ptr,
    n_rows, n_inner, n_codes, dim,
    stride_z_outer, stride_z_inner, stride_z_col,
    stride_zq_outer, stride_zq_inner, stride_zq_col,
    stride_code_row, stride_code_col,
    loss_scale,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
):
    rows = row_offsets(tl.program_id(0), BLOCK_N)
    row_ok = rows < n_rows
    z_starts = split_row_starts(rows, n_inner, stride_z_outer, stride_z_inner)
    lanes = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:  # the vectors fit one chunk: loaded once, kept for every tile of codes
        z_tile = _load_rows(z_ptr, z_starts, cols, stride_z_col, row_ok[:, None] & (cols < dim)[None, :])
    # Per register: the smallest distance its lane has seen so far, and the code that gave it.
    run_min = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    run_code = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    code_start = 0
    # A while loop, not range(): Triton 3.6's interpreter cannot take a tensor as a range() bound.
    while code_start < n_codes:
        codes = code_start + lanes
        code_ok = codes < n_codes
        code_offsets = codes.to(tl.int64) * stride_code_row
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for chunk in range(D_CHUNKS):
            d = chunk * BLOCK_D + cols
            e = tl.load(codebook_ptr + code_offsets[:, None] + d[None, :] * stride_code_col,
                        mask=code_ok[:, None] & (d < dim)[None, :], other=0.0)
            if D_CHUNKS == 1:
                z = z_tile
            else:
                z = _load_rows(z_ptr, z_starts, d, stride_z_col, row_ok[:, None] & (d < dim)[None, :])
            dots = tl.dot(z.to(tl.float32), tl.trans(e.to(tl.float32)), dots, input_precision=INPUT_PRECISION)
        code_sq = tl.load(code_sq_ptr + codes, mask=code_ok, other=float("inf"))
        distance = code_sq[None, :] - 2.0 * dots
        # NaN never wins (x == x is false only for NaN); codes past the end are +inf already.
        distance = tl.where(distance == distance, distance, float("inf"))
        better = distance < run_min
        run_min = tl.where(better, distance, run_min)
        run_code = tl.where(better, codes[None, :], run_code)
        code_start += BLOCK_K
    best = tl.min(run_min, axis=1)
    # The lowest code among the lanes that reach the minimum (every lane, for a vector whose distances are all
    # +inf or NaN: code 0).
    index = tl.min(tl.where(run_min == best[:, None], run_code, n_codes), axis=1)
    index = tl.where(index < n_codes, index, 0)

    zq_starts = split_row_starts(rows, n_inner, stride_zq_outer, stride_zq_inner)
    chosen = index.to(tl.int64) * stride_code_row
    squares = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for chunk in range(D_CHUNKS):
        d = chunk * BLOCK_D + cols
        mask = row_ok[:, None] & (d < dim)[None, :]
        e = tl.load(codebook_ptr + chosen[:, None] + d[None, :] * stride_code_col, mask=mask, other=0.0)
        e = e.to(tl.float32)
        if D_CHUNKS == 1:
            z = z_tile.to(tl.float32)
        else:
            z = _load_rows(z_ptr, z_starts, d, stride_z_col, mask).to(tl.float32)
        diff = z - e
        squares += diff * diff  # masked lanes hold z = e = 0
        # The code itself for a finite z; NaN where z has a NaN or an infinity (z - z), so that it propagates.
        z_q = e + (z - z)
        tl.store(z_q_ptr + zq_starts[:, None] + d[None, :] * stride_zq_col, z_q.to(z_q_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(indices_ptr + rows, index.to(tl.int64), mask=row_ok)
    tl.store(loss_ptr + rows, tl.sum(squares, axis=1) * loss_scale, mask=row_ok)


@triton.jit
def _vector_quantize_backward_kernel(
    grad_zq_ptr, grad_loss_ptr, z_ptr, z_q_ptr, indices_ptr, grad_z_ptr, grad_codebook_ptr,
    n_rows, n_inner, dim,
    stride_gzq_outer, stride_gzq_inner, stride_gzq_col,
    stride_grad_loss,
    stride_z_outer, stride_z_inner, stride_z_col,
    stride_zq_outer, stride_zq_inner, stride_zq_col,
    stride_gz_outer, stride_gz_inner, stride_gz_col,
    commitment_scale, codebook_scale,
    HAS_GRAD_ZQ: tl.constexpr, HAS_GRAD_LOSS: tl.constexpr, GRAD_Z: tl.constexpr, GRAD_CODEBOOK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
):
    rows = row_offsets(tl.program_id(0), BLOCK_N)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    if HAS_GRAD_LOSS:
        g = tl.load(grad_loss_ptr + rows * stride_grad_loss, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        z_starts = split_row_starts(rows, n_inner, stride_z_outer, stride_z_inner)
        zq_starts = split_row_starts(rows, n_inner, stride_zq_outer, stride_zq_inner)
    if GRAD_CODEBOOK:
        code_rows = tl.load(indices_ptr + rows, mask=row_ok, other=0) * dim
    if GRAD_Z:
        gz_starts = split_row_starts(rows, n_inner, stride_gz_outer, stride_gz_inner)
        if HAS_GRAD_ZQ:
            gzq_starts = split_row_starts(rows, n_inner, stride_gzq_outer, stride_gzq_inner)
    for chunk in range(D_CHUNKS):
        d = chunk * BLOCK_D + cols
        mask = row_ok[:, None] & (d < dim)[None, :]
        if HAS_GRAD_LOSS:
            # z - e, with e the chosen code as the forward wrote it into z_q.
            diff = (_load_rows(z_ptr, z_starts, d, stride_z_col, mask).to(tl.float32)
                    - _load_rows(z_q_ptr, zq_starts, d, stride_zq_col, mask).to(tl.float32))
        if GRAD_Z:
            grad = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            if HAS_GRAD_ZQ:  # straight through
                grad += _load_rows(grad_zq_ptr, gzq_starts, d, stride_gzq_col, mask).to(tl.float32)
            if HAS_GRAD_LOSS:  # the commitment term: 2 beta (z - e)
                grad += (commitment_scale * g) * diff
            tl.store(grad_z_ptr + gz_starts[:, None] + d[None, :] * stride_gz_col,
                     grad.to(grad_z_ptr.dtype.element_ty), mask=mask)
        if GRAD_CODEBOOK:  # the codebook term: 2 (e - z), into the row of the chosen code
            tl.atomic_add(grad_codebook_ptr + code_rows[:, None] + d[None, :], (-codebook_scale * g) * diff,
                          mask=mask, sem="relaxed")


# ---- launch helpers ---------------------------------------------------------------------------------------------


def _tiles_of_dim(dim: int, max_block: int, chunk_block: int | None = None) -> tuple[int, int]:
    """``(BLOCK_D, D_CHUNKS)``: one chunk of a power of two, at least 16 (``tl.dot``'s least), up to ``max_block``;
    beyond that, chunks of ``chunk_block`` (default ``max_block``)."""
    block = max(triton.next_power_of_2(dim), MIN_BLOCK_D)
    if block > max_block:
        block = chunk_block or max_block
    return block, triton.cdiv(dim, block)


def dot_precision(z_dtype: torch.dtype, codebook_dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for the inner products, taken in float32 with float32 sums.

    "tf32" (one tensor-core product) when both are 16-bit: their values fit TF32's 10-bit mantissa, so the
    products are exact, as a bfloat16 or float16 product would be. (A 16-bit ``tl.dot`` would run at twice the
    rate on the GPU, but Triton 3.9's interpreter multiplies bfloat16 bit patterns as integers, and the kernels must
    compute the same on the CPU.) "tf32x3" for float32 values: three TF32 products that keep about float32's
    accuracy; plain TF32 would round each value to 10 bits and choose the wrong code wherever two codes are within
    about 1e-3 of each other.
    """
    sixteen_bit = (torch.float16, torch.bfloat16)
    return "tf32" if z_dtype in sixteen_bit and codebook_dtype in sixteen_bit else "tf32x3"


def rows_of(tensor: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``tensor`` with axis ``dim`` moved last, as the rows of :func:`~fastvae.kernels.launch.split_rows`: a view
    (channel slices and channels-last maps read in place) or, where no single row stride exists, a copy."""
    moved = tensor.movedim(dim, -1)
    return split_rows(moved, moved.shape, 1)


def vector_quantize_forward(
    z: torch.Tensor, codebook: torch.Tensor, z_q: torch.Tensor, beta: float, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the search on ``z`` (code values along ``dim``) and ``codebook`` ``(K, D)``, writing into ``z_q``
    (``z``'s shape, a layout :func:`rows_of` views in place); returns the indices and the loss, ``(N,)`` each
    (int64, float32). ``z`` must hold at least one vector."""
    rows, (z_outer, z_inner, z_col) = rows_of(z, dim)
    out, (q_outer, q_inner, q_col) = rows_of(z_q, dim)
    assert out.data_ptr() == z_q.data_ptr(), "z_q must be laid out as rows (see rows_of)"
    n_codes, size = codebook.shape
    n_rows, n_inner = rows.numel() // size, rows.shape[1:-1].numel()
    indices = torch.empty(n_rows, dtype=torch.int64, device=z.device)
    loss = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    code_sq = torch.empty(n_codes, dtype=torch.float32, device=z.device)
    block_d, chunks = _tiles_of_dim(size, MAX_BLOCK_D, CHUNK_BLOCK_D)
    with device_guard(z):
        norm_cols = min(triton.next_power_of_2(size), NORMS_ELEMENTS)
        norm_rows = NORMS_ELEMENTS // norm_cols
        _code_norms_kernel[(triton.cdiv(n_codes, norm_rows),)](
            codebook, code_sq, n_codes, size, *codebook.stride(), BLOCK_K=norm_rows, BLOCK_D=norm_cols, num_warps=4,
        )
        _vector_quantize_forward_kernel[(triton.cdiv(n_rows, BLOCK_N),)](
            rows, codebook, code_sq, out, indices, loss,
            n_rows, n_inner, n_codes, size,
            z_outer, z_inner, z_col, q_outer, q_inner, q_col, *codebook.stride(),
            1.0 + beta,
            INPUT_PRECISION=dot_precision(z.dtype, codebook.dtype),
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=block_d, D_CHUNKS=chunks, num_warps=SEARCH_WARPS,
            num_stages=SEARCH_STAGES,
        )
    return indices, loss


def vector_quantize_backward(
    grad_z_q: torch.Tensor | None,
    grad_loss: torch.Tensor | None,
    z: torch.Tensor,
    z_q: torch.Tensor,
    indices: torch.Tensor,
    grad_z: torch.Tensor | None,
    grad_codebook: torch.Tensor | None,
    beta: float,
    dim: int,
) -> None:
    """Write ``z``'s gradient into ``grad_z`` (``z``'s shape, a layout :func:`rows_of` views in place) and add
    the codebook's into ``grad_codebook`` (a contiguous float32 ``(K, D)`` buffer of zeros), each when given.

    ``grad_z_q`` (``z``'s shape, any strides) and ``grad_loss`` (``(N,)`` float32, any stride: 0 for one value
    shared by every vector) are the upstream gradients, ``None`` where none came. ``z`` holds at least one vector.
    """
    size = z.shape[dim]
    z_rows, z_strides = rows_of(z, dim)
    q_rows, q_strides = rows_of(z_q, dim)
    n_rows = z_rows.numel() // size
    n_inner = z_rows.shape[1:-1].numel()
    unused = q_rows  # a valid pointer for the arguments a constexpr switches off
    gzq_rows, gzq_strides = rows_of(grad_z_q, dim) if grad_z_q is not None else (unused, (0, 0, 0))
    gz_rows, gz_strides = rows_of(grad_z, dim) if grad_z is not None else (unused, (0, 0, 0))
    if grad_z is not None:
        assert gz_rows.data_ptr() == grad_z.data_ptr(), "grad_z must be laid out as rows (see rows_of)"
    block_d, chunks = _tiles_of_dim(size, BACKWARD_MAX_BLOCK_D)
    block_n = max(BACKWARD_ELEMENTS // block_d, 1)
    with device_guard(z):
        _vector_quantize_backward_kernel[(triton.cdiv(n_rows, block_n),)](
            gzq_rows, grad_loss if grad_loss is not None else unused, z_rows, q_rows, indices,
            gz_rows, grad_codebook if grad_codebook is not None else unused,
            n_rows, n_inner, size,
            *gzq_strides, grad_loss.stride(0) if grad_loss is not None else 0,
            *z_strides, *q_strides, *gz_strides,
            2.0 * beta, 2.0,
            HAS_GRAD_ZQ=grad_z_q is not None, HAS_GRAD_LOSS=grad_loss is not None,
            GRAD_Z=grad_z is not None, GRAD_CODEBOOK=grad_codebook is not None,
            BLOCK_N=block_n, BLOCK_D=block_d, D_CHUNKS=chunks, num_warps=BACKWARD_WARPS,
        )
