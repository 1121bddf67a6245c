r"""Vector quantization (the VQ-VAE's bottleneck): the nearest code of each vector, its straight-through
gradient, and the codebook and commitment losses, without the ``N x K`` distance matrix.

``vector_quantize`` is the public op; ``vector_quantize_reference`` is its
specification in plain PyTorch (chunked over the vectors, so that it too holds
at most :data:`REFERENCE_CHUNK_ELEMENTS` distances at a time). The Triton path
is a pair of custom ops (``fastvae::vector_quantize`` and its backward) joined
by ``register_autograd``, so ``torch.compile(fullgraph=True)`` sees opaque ops
and no graph break; the kernels are :mod:`fastvae.kernels.vector_quantize`.

Gradients, and what they mean at higher orders. The nearest code ``k(z)`` is
piecewise constant in ``z``, so the op's gradients are those of the
straight-through estimator and of the stop-gradients of the VQ-VAE's loss, as
autograd gives them for the reference (``sg`` = ``detach``):

.. math::
    z_q = \mathrm{sg}[e_k] + z - \mathrm{sg}[z], \qquad
    \ell = \lVert \mathrm{sg}[z] - e_k \rVert^2 + \beta \lVert z - \mathrm{sg}[e_k] \rVert^2

so ``dz_q/dz = I``, ``dz_q/de = 0``, ``dl/dz = 2 beta (z - e_k)`` and
``dl/de_k = 2 (e_k - z)`` (summed over the vectors that chose ``e_k``). These
are a surrogate, not the derivative of any function: the mixed second
derivatives are not symmetric (``d/de`` of ``dl/dz`` is ``-2 beta`` by the
formula, but the ``sg`` makes it 0, and ``d/dz`` of ``dl/de`` is 0 too), and a
finite difference of the op (``gradcheck``) measures 0 for ``z_q`` where the
surrogate says ``I``. The definition every order follows is autograd's on the
reference: differentiate the first derivatives above with ``sg[.]`` held
constant. Under ``create_graph=True`` the backward is computed in torch ops
that say exactly that (:func:`_differentiable_backward`): ``z_q`` stays
linear (its second derivatives are 0, and the upstream gradient of ``z_q``
passes to ``z`` unchanged, so a decoder's curvature reaches ``z`` as it would
through ``z`` itself), ``dl/dz`` has second derivatives ``2 beta`` in ``z`` and
0 in the codebook, ``dl/de`` has ``2 x (count of vectors)`` in the codebook and
0 in ``z``, and both are linear in the upstream gradient of the loss.
"""
from __future__ import annotations

import math

import torch

from fastvae.backend import resolve_backend
from fastvae.ops.checks import (
    REDUCTIONS,
    check_choice,
    check_float_tensor,
    check_int_in_range,
    check_same_device,
    compute_dtype,
    reduce_per_sample,
)
from fastvae.ops.grad_in_forward import Mode, backward_mode

# The reference path computes the distances of this many (vector, code) pairs at a time: 16 MB of float32.
REFERENCE_CHUNK_ELEMENTS = 1 << 22


def check_beta(beta: object) -> None:
    """``beta``, the weight of the commitment term, must be a finite number ``>= 0``."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}")
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")


def check_inputs(z: object, codebook: object, dim: object) -> int:
    """Check ``z``, ``codebook`` and ``dim`` (``ValueError``/``TypeError`` naming the argument); returns ``dim`` as a
    non-negative axis of ``z``."""
    check_float_tensor("z", z)
    check_float_tensor("codebook", codebook)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0): it needs at least one code")
    if codebook.shape[1] == 0:
        raise ValueError("codebook has codes of 0 values (D = 0); give each code at least one")
    if z.dim() == 0:
        raise ValueError("z must have at least one dimension (its D values), got a 0-d tensor")
    check_int_in_range("dim", dim, -z.dim(), z.dim() - 1)
    axis = dim % z.dim()
    if z.shape[axis] != codebook.shape[1]:
        raise ValueError(
            f"z has {z.shape[axis]} values along dim={dim} (shape {tuple(z.shape)}), but the codebook's codes have "
            f"D = {codebook.shape[1]} (shape {tuple(codebook.shape)})"
        )
    check_same_device(z=z, codebook=codebook)
    return axis


# ---- the reference ----------------------------------------------------------------------------------------------


@torch.no_grad()
def nearest_codes(rows: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = REFERENCE_CHUNK_ELEMENTS
                  ) -> torch.Tensor:
    """The index of the nearest code of each row of ``rows`` ``(N, D)``, int64 ``(N,)``, ``chunk_elements``
    distances at a time (at least one row per chunk).

    Distances are ``||e||^2 - 2 z . e`` in the inputs' dtype (both ``compute_dtype``), a tie going to the lowest
    index (``argmin``'s rule) and a NaN distance counting as ``+inf``, as the kernel does.
    """
    n, k = rows.shape[0], codebook.shape[0]
    code_sq = (codebook * codebook).sum(dim=1)
    indices = torch.empty(n, dtype=torch.int64, device=rows.device)
    step = max(1, chunk_elements // k)
    with torch.autocast(rows.device.type, enabled=False):  # autocast would take the products in 16 bits
        for start in range(0, n, step):
            distance = torch.addmm(code_sq, rows[start : start + step], codebook.t(), alpha=-2)
            distance.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)
            indices[start : start + step] = distance.argmin(dim=1)
    return indices


def quantize_with_indices(
    rows: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_q, loss per row)`` of ``rows`` ``(N, D)`` for given code ``indices`` ``(N,)``, differentiable by
    autograd as the module docstring says: ``z_q = sg[e] + z - sg[z]`` (the code itself for a finite ``z``, NaN
    where ``z`` is not finite) and ``||sg[z] - e||^2 + beta ||z - sg[e]||^2``."""
    e = codebook[indices]
    z_q = e.detach() + (rows - rows.detach())
    loss = (rows.detach() - e).square().sum(dim=-1) + beta * (rows - e.detach()).square().sum(dim=-1)
    return z_q, loss


def vector_quantize_reference(
    z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, dim: int = -1, reduction: str = "none"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The specification of :func:`vector_quantize`, in plain PyTorch (float32, or float64 for float64 inputs).

    Chunked over the vectors (:func:`nearest_codes`): the search holds at most
    :data:`REFERENCE_CHUNK_ELEMENTS` distances, and what autograd keeps is of
    ``z``'s size, never ``N x K``.
    """
    acc = compute_dtype(z.dtype, codebook.dtype)
    moved = z.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1]).to(acc)
    codes = codebook.to(acc)
    indices = nearest_codes(rows, codes)
    z_q, loss = quantize_with_indices(rows, codes, indices, beta)
    z_q = z_q.to(z.dtype).reshape(moved.shape).movedim(-1, dim)
    lead = moved.shape[:-1]
    return z_q, indices.reshape(lead), reduce_per_sample(loss.reshape(lead), reduction)


# ---- the Triton path --------------------------------------------------------------------------------------------


def _kernels():
    # Imported on first use: fastvae imports without Triton, and TRITON_INTERPRET is read when kernels are defined.
    from fastvae.kernels import vector_quantize

    return vector_quantize


def _rows_splittable(tensor: torch.Tensor, dim: int) -> bool:
    """Whether ``tensor``'s vectors along ``dim`` can be read as rows in place (see ``split_rows``)."""
    from fastvae.kernels.launch import _split_strides

    moved = tensor.movedim(dim, -1)
    return _split_strides(moved.shape, moved.stride(), moved.dim() - 1) is not None


def new_like(z: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor of ``z``'s shape laid out so that the kernels write its vectors in place: ``z``'s own layout
    when ``z`` is contiguous or channels-last, else contiguous; a layout whose vectors are no rows
    (``dim`` in the middle of a contiguous tensor) is replaced by the rows' own (the vectors along ``dim`` made
    contiguous). Reads only metadata: the fake implementations give the same strides."""
    dtype = z.dtype if dtype is None else dtype
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(z.dim())
    if channels_last is not None and z.is_contiguous(memory_format=channels_last) and not z.is_contiguous():
        out = torch.empty(z.shape, dtype=dtype, device=z.device, memory_format=channels_last)
    else:
        out = z.new_empty(z.shape, dtype=dtype)
    if out.numel() and not _rows_splittable(out, dim):
        moved_shape = z.movedim(dim, -1).shape
        out = z.new_empty(moved_shape, dtype=dtype).movedim(-1, dim)
    return out


def _lead_shape(z: torch.Tensor, dim: int) -> torch.Size:
    return z.movedim(dim, -1).shape[:-1]


@torch.library.custom_op("fastvae::vector_quantize", mutates_args=())
def _fused_forward(
    z: torch.Tensor, codebook: torch.Tensor, beta: float, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z_q`` (``z``'s shape and dtype, laid out by :func:`new_like`), the indices and the loss per vector (int64
    and float32, ``z``'s shape without ``dim``)."""
    z_q = new_like(z, dim)
    lead = _lead_shape(z, dim)
    if z.numel() == 0:
        return z_q, z.new_zeros(lead, dtype=torch.int64), z.new_zeros(lead, dtype=torch.float32)
    indices, loss = _kernels().vector_quantize_forward(z, codebook, z_q, beta, dim)
    return z_q, indices.view(lead), loss.view(lead)


@_fused_forward.register_fake
def _(z, codebook, beta, dim):
    lead = _lead_shape(z, dim)
    return new_like(z, dim), z.new_empty(lead, dtype=torch.int64), z.new_empty(lead, dtype=torch.float32)


@torch.library.custom_op("fastvae::vector_quantize_backward", mutates_args=())
def _fused_backward(
    grad_z_q: torch.Tensor | None,
    grad_loss: torch.Tensor | None,
    z: torch.Tensor,
    z_q: torch.Tensor,
    indices: torch.Tensor,
    codebook: torch.Tensor | None,
    beta: float,
    dim: int,
    grad_z: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z``'s gradient (``z``'s shape and dtype; an empty tensor unless ``grad_z``) and the codebook's (its shape
    and dtype; an empty tensor when ``codebook`` is ``None``: it takes no gradient, or no loss gradient came).

    ``codebook`` is passed for its shape and dtype only: the chosen codes are read from ``z_q``.
    """
    want_codebook = codebook is not None and grad_loss is not None
    grad_z_out = new_like(z, dim) if grad_z else None
    grad_codebook = None
    if want_codebook:
        grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device)
    deterministic = want_codebook and torch.are_deterministic_algorithms_enabled()
    if z.numel() and (grad_z or want_codebook):
        loss_rows = grad_loss.reshape(-1) if grad_loss is not None else None
        _kernels().vector_quantize_backward(
            grad_z_q, loss_rows, z, z_q, indices.reshape(-1), grad_z_out,
            None if deterministic else grad_codebook, beta, dim,
        )
        if deterministic:
            _add_codebook_grad_deterministically(grad_codebook, grad_loss, z, z_q, indices, dim)
    elif grad_z_out is not None:
        grad_z_out.zero_()
    return (
        grad_z_out if grad_z_out is not None else z.new_empty(0),
        grad_codebook.to(codebook.dtype) if grad_codebook is not None else z.new_empty(0),
    )


@_fused_backward.register_fake
def _(grad_z_q, grad_loss, z, z_q, indices, codebook, beta, dim, grad_z):
    want_codebook = codebook is not None and grad_loss is not None
    return (
        new_like(z, dim) if grad_z else z.new_empty(0),
        codebook.new_empty(codebook.shape) if want_codebook else z.new_empty(0),
    )


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t``'s vectors along ``dim`` as an ``(N, D)`` matrix (a view where one exists)."""
    moved = t.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1])


def _add_codebook_grad_deterministically(grad_codebook, grad_loss, z, z_q, indices, dim) -> None:
    """``grad_codebook[k] += sum over the vectors n that chose k of 2 g_n (e_k - z_n)``, with torch's
    deterministic ``index_put_`` (under ``torch.use_deterministic_algorithms(True)``) instead of atomics."""
    g = grad_loss.reshape(-1, 1).float()
    terms = 2.0 * g * (_rows(z_q, dim).float() - _rows(z, dim).float())
    grad_codebook.index_put_((indices.reshape(-1),), terms, accumulate=True)


def _setup_context(ctx, inputs, output):
    z, codebook, beta, dim = inputs
    z_q, indices, _ = output
    ctx.mark_non_differentiable(indices)
    # An output no gradient reaches gets None, not a buffer of zeros.
    ctx.set_materialize_grads(False)
    # References, no copies. The chosen codes come from z_q (which the decoder keeps alive anyway): an EMA update
    # may change the codebook in place before the backward. The codebook itself is kept only when it learns by
    # gradient, for the shape of its gradient and for the second derivatives under create_graph.
    ctx.save_for_backward(z, z_q, indices, codebook if codebook.requires_grad else None)
    ctx.beta, ctx.dim = beta, dim


def _differentiable_backward(grad_z_q, grad_loss, z, z_q, indices, codebook, beta, dim, needs):
    """The first derivatives in torch ops that autograd records (``create_graph=True``), as the module docstring
    defines them: ``sg[.]`` terms detached, so every higher order is that of the reference."""
    z_rows = _rows(z, dim)
    grad_z = grad_codebook = None
    if grad_loss is not None:
        g = grad_loss.reshape(-1, 1).float()
        chosen = codebook[indices.reshape(-1)].float() if codebook is not None else _rows(z_q, dim).float()
        if needs[0]:
            commitment = 2.0 * beta * g * (z_rows.float() - chosen.detach())
            grad_z = commitment.reshape(z.movedim(dim, -1).shape).movedim(-1, dim)
        if needs[1] and codebook is not None:
            terms = 2.0 * g * (chosen - z_rows.detach().float())
            grad_codebook = torch.zeros(codebook.shape, device=z.device).index_add(0, indices.reshape(-1), terms)
            grad_codebook = grad_codebook.to(codebook.dtype)
    if needs[0] and grad_z_q is not None:
        grad_z = grad_z_q.float() if grad_z is None else grad_z + grad_z_q.float()
    return (grad_z.to(z.dtype) if grad_z is not None else None), grad_codebook


def _backward(ctx, grad_z_q, _grad_indices, grad_loss):
    z, z_q, indices, codebook = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if grad_loss is None:
        needs = (needs[0], False)  # only z_q's gradient came: the codebook gets none through the straight-through
    if not any(needs) or (grad_z_q is None and grad_loss is None):
        return None, None, None, None
    if backward_mode(z) is Mode.DIFFERENTIABLE:
        grad_z, grad_codebook = _differentiable_backward(
            grad_z_q, grad_loss, z, z_q, indices, codebook, ctx.beta, ctx.dim, needs
        )
        return grad_z, grad_codebook, None, None
    grad_z, grad_codebook = _fused_backward(
        grad_z_q, grad_loss, z, z_q, indices, codebook if needs[1] else None, ctx.beta, ctx.dim, needs[0]
    )
    return (grad_z if needs[0] else None), (grad_codebook if needs[1] else None), None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def vector_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float = 0.25,
    dim: int = -1,
    reduction: str = "none",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Replace each vector of ``z`` by its nearest code: ``(z_q, indices, loss)``, the VQ-VAE's bottleneck.

    With ``e_k`` the rows of ``codebook`` and ``k_n = argmin_k ||z_n - e_k||^2``:

    .. math::
        z_q = e_{k_n} \text{ (gradient straight through to } z), \qquad
        \mathrm{loss}_n = \lVert \mathrm{sg}[z_n] - e_{k_n} \rVert^2 + \beta \lVert z_n - \mathrm{sg}[e_{k_n}] \rVert^2

    the codebook term and the commitment term, summed over ``D``: equal values
    (``loss_n = (1 + beta) ||z_n - e_{k_n}||^2``), different gradients. The
    commitment term's ``2 beta (z - e)`` reaches ``z`` only; the codebook
    term's ``2 (e - z)`` reaches the chosen codes only, summed over the vectors
    that chose each, and only when ``codebook`` requires grad (a codebook
    updated by EMA is a buffer and gets none). Higher orders: see
    :mod:`fastvae.ops.vector_quantize`.

    The search uses the expanded distance ``||e_k||^2 - 2 z . e_k`` in float32
    (float64 on the reference path for float64 inputs), a tie going to the
    lowest index. Expanded and exact distances differ by rounding, about
    ``D * 2^-24 * (||z||^2 + ||e||^2)``: two codes whose exact distances to a
    vector are closer than that are a near tie, and either may be chosen (the
    Triton and reference paths, or two GPUs, may then differ); the loss is always
    recomputed from ``z - e``, without cancellation. A NaN distance counts as
    ``+inf``: a code holding a NaN is never chosen, and a vector holding a NaN
    gets a NaN loss (and index 0), with NaN in ``z_q`` where ``z`` has it (an
    infinity in ``z`` gives an infinite loss and NaN there): never a code that
    looks valid with a finite loss.

    Args:
        z: float16, bfloat16, float32 (float64 on the reference path), any
            strides; ``dim`` is its code dimension of size ``D``: ``-1`` for
            ``(..., D)`` vectors, ``1`` for ``(B, D, H, W)`` feature maps (a
            channel slice of a conv output, or a channels-last map, is read in
            place).
        codebook: ``(K, D)``, ``K >= 1``, any float dtype (the search runs in
            float32 unless both are 16-bit of the same kind); a parameter
            (learned by gradient) or a buffer (updated by EMA).
        beta: weight of the commitment term, ``>= 0`` (0.25 in the VQ-VAE paper).
        dim: the axis of ``z`` holding the ``D`` values.
        reduction: of the loss over vectors: ``"none"`` (``z``'s shape without
            ``dim``), ``"sum"`` or ``"mean"``.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``; see :mod:`fastvae.backend`.

    Returns:
        ``z_q``: ``z``'s shape and dtype (the chosen codes along ``dim``; laid
        out as ``z`` when ``z`` is channels-last, else contiguous). ``indices``: int64,
        ``z``'s shape without ``dim``. ``loss``: float32 (float64 for float64
        inputs on the reference path), reduced as asked.

    Memory: ``O(N D + K D)``, nothing of size ``N x K`` on either path, forward
    or backward. The Triton forward streams the codebook through registers
    (see :mod:`fastvae.kernels.vector_quantize`) and keeps references to ``z``,
    ``z_q`` and the indices for the backward (and to the codebook when it
    requires grad); its backward is one kernel. No host sync.
    """
    axis = check_inputs(z, codebook, dim)
    check_beta(beta)
    check_choice("reduction", reduction, REDUCTIONS)
    dtypes = {"z": z.dtype, "codebook": codebook.dtype}
    if resolve_backend(backend, z.device, dtypes) == "torch":
        return vector_quantize_reference(z, codebook, float(beta), axis, reduction)
    z_q, indices, loss = _fused_forward(z, codebook, float(beta), axis)
    return z_q, indices, reduce_per_sample(loss, reduction)
