"""fastvae.functional.vector_quantize: the Triton kernels (the interpreter on the CPU) against a float64 reference.

The float64 reference (``quantize_with_indices`` and ``nearest_codes`` in float64) is the spec. The nearest code is
compared up to near ties: the kernels rank codes by float32 expanded distances, whose error is bounded below
(:func:`distance_error_bound`); wherever the exact best and the code chosen are closer than that, either is right.
Values and gradients are compared at the indices the kernels chose.
"""
import math
import os

import pytest
import torch

from fastvae.functional import vector_quantize
from fastvae.ops.vector_quantize import (
    REFERENCE_CHUNK_ELEMENTS,
    nearest_codes,
    quantize_with_indices,
    vector_quantize_reference,
)
from tests.test_no_host_sync import every_backward, no_sync
from tests.utils import assert_close, gradients_up_to_third, pick

U32 = 2.0**-24  # float32's unit roundoff


def distance_error_bound(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``(N, K)``: a bound on |float32 expanded distance - exact distance| for each vector and code.

    ``||e||^2 - 2 z.e`` in float32 sums ``D`` products (exact for 16-bit values; for float32 ones the tensor
    cores' "tf32x3" split, which leaves about 2^-21 of each product): at most ``(D + 2) 2^-21 (|z| |e| + |e|^2)``
    for the two sums, plus the final subtraction's rounding. A factor of 4 over that covers the summation order.
    """
    d = z.shape[-1]
    zn = z.double().norm(dim=-1, keepdim=True)
    en = codebook.double().norm(dim=-1)[None, :]
    return 4 * (d + 2) * 2.0**-21 * (2 * zn * en + en * en) + 8 * U32 * (zn + en) ** 2


def check_indices_up_to_near_ties(z: torch.Tensor, codebook: torch.Tensor, chosen: torch.Tensor) -> int:
    """Every chosen code is at most the error bound farther than the exact nearest one; returns how many vectors
    had a near tie (where the kernels may choose either)."""
    rows = z.double().reshape(-1, z.shape[-1])
    exact = torch.cdist(rows, codebook.double()).square()
    best = exact.min(dim=1).values
    chosen = chosen.reshape(-1)
    bound = distance_error_bound(rows, codebook)
    picked = exact.gather(1, chosen[:, None])[:, 0]
    assert (picked - best <= bound.gather(1, chosen[:, None])[:, 0] + bound.min(dim=1).values).all()
    # A vector whose second-best code is farther than twice the bound has one right answer: the exact argmin.
    second = exact.topk(2, dim=1, largest=False).values[:, 1] if codebook.shape[0] > 1 else best + math.inf
    clear = second - best > 2 * bound.max(dim=1).values
    assert torch.equal(chosen[clear], exact.argmin(dim=1)[clear])
    return int((~clear).sum())


def separated(n: int, k: int, d: int, device, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, codebook, nearest)``: ``k`` distinct codes on the integer lattice {-2..2}^d (1 apart at least) and
    ``n`` vectors within 0.25 of a random one of them, so that every implementation must find that code: the
    exact distances differ by at least 0.5, far beyond any rounding."""
    lattice = torch.randperm(5**d)[:k]
    digits = torch.stack([(lattice // 5**i) % 5 for i in range(d)], dim=1).float() - 2
    nearest = torch.randint(0, k, (n,))
    noise = torch.randn(n, d)
    noise = 0.24 * torch.rand(n, 1) * noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = digits[nearest] + noise
    return (scale * z).to(device), (scale * digits).to(device), nearest.to(device)


def float64_spec(z, codebook, indices, beta, dim):
    """The reference in float64 at the given indices: ``(z_q, loss)`` shaped as the op returns them."""
    moved = z.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1]).double()
    z_q, loss = quantize_with_indices(rows, codebook.double(), indices.reshape(-1), beta)
    return z_q.reshape(moved.shape).movedim(-1, dim), loss.reshape(moved.shape[:-1])


# ---- the nearest code, values and gradients against float64 ------------------------------------------------------


@pytest.mark.parametrize("n, k, d", [(200, 70, 20), (130, 1, 3), (70, 300, 64), (20, 40, 130), (5, 3, 300)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_the_float64_reference(device, n, k, d, reduction):
    n, k = pick(device, n, 64 * n), pick(device, k, 16 * k)
    z = torch.randn(n, d, device=device, requires_grad=True)
    codebook = torch.randn(k, d, device=device, requires_grad=True)
    beta = 0.3
    z_q, indices, loss = vector_quantize(z, codebook, beta=beta, reduction=reduction, backend="triton")
    assert z_q.dtype == z.dtype and z_q.shape == z.shape
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    check_indices_up_to_near_ties(z.detach(), codebook.detach(), indices)
    # z_q is the chosen code, exactly.
    assert torch.equal(z_q, codebook.detach()[indices])

    z64 = z.detach().double().requires_grad_()
    codebook64 = codebook.detach().double().requires_grad_()
    z_q64, loss64 = float64_spec(z64, codebook64, indices, beta, -1)
    per_vector = vector_quantize(z, codebook, beta=beta, backend="triton")[2]
    assert_close(per_vector.double(), loss64.detach(), torch.float32, rtol=(d + 4) * U32, atol=1e-30)
    expected_loss = {"none": loss64, "sum": loss64.sum(), "mean": loss64.mean()}[reduction]
    assert_close(loss.double(), expected_loss.detach(), torch.float32, rtol=(d + n + 4) * U32)

    grad_z_q = torch.randn_like(z_q)
    grad_loss = torch.rand_like(loss) + 0.5
    grads = torch.autograd.grad([z_q, loss], [z, codebook], [grad_z_q, grad_loss])
    grads64 = torch.autograd.grad([z_q64, expected_loss], [z64, codebook64], [grad_z_q.double(), grad_loss.double()])
    atol = 8 * U32 * float(grads64[0].abs().max())
    assert_close(grads[0].double(), grads64[0], torch.float32, rtol=8 * U32, atol=atol)
    # The codebook's gradient sums 2 g (e - z) over the vectors that chose each code, in any order (atomics): the
    # rounding of a sum of m terms is at most m u times the sum of their magnitudes.
    g = grad_loss.double().expand(n) / (n if reduction == "mean" else 1)
    terms = 2 * g[:, None] * (codebook64[indices] - z64).detach()
    magnitude = torch.zeros(k, d, dtype=torch.float64, device=device).index_add(0, indices, terms.abs())
    count = int(torch.bincount(indices, minlength=k).max())
    assert_close(grads[1].double(), grads64[1], torch.float32, rtol=0, atol=float((count + 4) * U32 * magnitude.max()))


def test_near_ties_are_found_and_either_code_is_accepted(device):
    """Codes a hair apart (below float32's resolution of the distance): the check accepts either, and only there."""
    base = torch.randn(40, 16, device=device)
    codebook = torch.cat([base, base + 1e-7 * torch.randn_like(base)])
    z = base[torch.randint(0, 40, (64,))] + 0.3 * torch.randn(64, 16, device=device)
    _, indices, _ = vector_quantize(z, codebook, backend="triton")
    assert check_indices_up_to_near_ties(z, codebook, indices) > 0
    # Moving a code far away makes a wrong index fail the check: the check can fail.
    wrong = (indices + 1) % 80
    with pytest.raises(AssertionError):
        check_indices_up_to_near_ties(z, codebook, wrong)


def test_exact_ties_go_to_the_lowest_index(device):
    code = torch.randn(1, 8, device=device)
    # Duplicates of one code at indices 3, 17 and 70 (the third in a later tile of 64 codes), and a vector
    # equidistant from two codes, +e and -e, at indices 5 and 2.
    codebook = 10 + torch.randn(80, 8, device=device)
    codebook[[3, 17, 70]] = code
    e = torch.zeros(8, device=device)
    e[0] = 1.0
    codebook[5], codebook[2] = e, -e
    z = torch.stack([code[0], torch.zeros(8, device=device)])
    for backend in ("triton", "torch"):
        _, indices, _ = vector_quantize(z, codebook, backend=backend)
        assert indices.tolist() == [3, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("codebook_dtype", ["same", torch.float32], ids=str)
def test_half_precision(device, dtype, codebook_dtype):
    codebook_dtype = dtype if codebook_dtype == "same" else codebook_dtype
    z = torch.randn(pick(device, 150, 9000), 24, device=device).to(dtype).requires_grad_()
    codebook = torch.randn(pick(device, 90, 2000), 24, device=device).to(codebook_dtype).requires_grad_()
    z_q, indices, loss = vector_quantize(z, codebook, backend="triton")
    assert z_q.dtype == dtype and loss.dtype == torch.float32
    # The inputs' values are exact in float32: the search is that of their float32 copies.
    check_indices_up_to_near_ties(z.detach().float(), codebook.detach().float(), indices)
    if codebook_dtype == dtype:
        assert torch.equal(z_q, codebook.detach()[indices])
    else:  # rounded to z's dtype (to nearest on a GPU; Triton 3.9's interpreter truncates: within one ulp)
        assert_close(z_q, codebook.detach()[indices].to(dtype), rtol=2.0**-7, atol=0)
    z_q64, loss64 = float64_spec(z.detach(), codebook.detach(), indices, 0.25, -1)
    assert_close(loss.double(), loss64, torch.float32, rtol=30 * U32)
    grad_z_q = torch.randn_like(z_q)
    grads = torch.autograd.grad([z_q, loss], [z, codebook], [grad_z_q, torch.ones_like(loss)])
    z64 = z.detach().double().requires_grad_()
    codebook64 = codebook.detach().double().requires_grad_()
    z_q64, loss64 = float64_spec(z64, codebook64, indices, 0.25, -1)
    grads64 = torch.autograd.grad([z_q64, loss64], [z64, codebook64], [grad_z_q.double(), torch.ones_like(loss64)])
    assert grads[0].dtype == dtype and grads[1].dtype == codebook_dtype
    for g, g64 in zip(grads, grads64):
        # Rounded once to the input's dtype (the codebook's sums in float32 first).
        assert_close(g.double(), g64, g.dtype, rtol=1e-2, atol=1e-2 * float(g64.abs().max()))


# ---- layouts: feature maps, slices, any dim ---------------------------------------------------------------------


def _feature_map_inputs(device, layout):
    """``(h, view, dim)``: the tensor that requires grad, how the vectors are taken from it, and their axis."""
    d = 6
    if layout == "channel slice":
        return torch.randn(3, 2 * d + 1, 5, 7, device=device), lambda h: h[:, 1 : d + 1], 1
    if layout == "channels last":
        return torch.randn(3, d, 5, 7, device=device).contiguous(memory_format=torch.channels_last), lambda h: h, 1
    if layout == "dim 0":
        return torch.randn(d, 11, device=device), lambda h: h, 0
    if layout == "dim in the middle":
        return torch.randn(3, 4, d, 5, device=device), lambda h: h, 2
    return torch.randn(4, 9, 3 * d, device=device), lambda h: h[..., ::3], -1  # last dim, every third value


@pytest.mark.parametrize("layout", ["channel slice", "channels last", "dim 0", "dim in the middle", "strided last"])
def test_vectors_along_any_dim_and_in_any_layout(device, layout):
    h, view, dim = _feature_map_inputs(device, layout)
    h.requires_grad_()
    z = view(h)
    codebook = torch.randn(37, z.shape[dim], device=device, requires_grad=True)
    z_q, indices, loss = vector_quantize(z, codebook, dim=dim, backend="triton")
    moved = z.movedim(dim, -1)
    assert z_q.shape == z.shape and indices.shape == moved.shape[:-1] and loss.shape == moved.shape[:-1]
    if layout == "channels last":
        assert z_q.is_contiguous(memory_format=torch.channels_last)
    check_indices_up_to_near_ties(moved.detach(), codebook.detach(), indices)
    assert torch.equal(z_q.movedim(dim, -1), codebook.detach()[indices])
    h64 = h.detach().double().requires_grad_()
    codebook64 = codebook.detach().double().requires_grad_()
    z_q64, loss64 = float64_spec(view(h64), codebook64, indices, 0.25, dim)
    assert_close(loss.double(), loss64.detach(), torch.float32)
    grad_z_q, grad_loss = torch.randn_like(z_q), torch.rand_like(loss)
    grads = torch.autograd.grad([z_q, loss], [h, codebook], [grad_z_q, grad_loss])
    expected = torch.autograd.grad([z_q64, loss64], [h64, codebook64], [grad_z_q.double(), grad_loss.double()])
    for g, e in zip(grads, expected):
        assert_close(g.double(), e, torch.float32, atol=1e-5 * float(e.abs().max()))


def test_a_slice_of_a_conv_output_is_read_in_place(device, monkeypatch):
    """The kernel gets the conv output's own storage (no copy) and writes z_q in the layout of a new tensor."""
    from fastvae.kernels import vector_quantize as kernels

    seen = {}
    launch = kernels.vector_quantize_forward

    def spy(z, codebook, z_q, beta, dim):
        seen["rows"] = kernels.rows_of(z, dim)[0]
        return launch(z, codebook, z_q, beta, dim)

    monkeypatch.setattr(kernels, "vector_quantize_forward", spy)
    h = torch.randn(2, 9, 4, 4, device=device)
    vector_quantize(h[:, 2:6], torch.randn(5, 4, device=device), dim=1, backend="triton")
    assert seen["rows"].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()


# ---- edges -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, dim", [((0, 8), -1), ((0, 8, 3, 3), 1), ((2, 8, 0, 3), 1)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(device, shape, dim, reduction):
    z = torch.randn(shape, device=device, requires_grad=True)
    codebook = torch.randn(4, 8, device=device, requires_grad=True)
    z_q, indices, loss = vector_quantize(z, codebook, dim=dim, reduction=reduction, backend="triton")
    reference = vector_quantize_reference(z, codebook, dim=dim, reduction=reduction)
    assert z_q.shape == z.shape and indices.shape == reference[1].shape and loss.shape == reference[2].shape
    assert_close(loss, reference[2])
    grad_z, grad_codebook = torch.autograd.grad([z_q.sum() + loss.sum()], [z, codebook])
    assert grad_z.shape == z.shape and torch.equal(grad_codebook, torch.zeros_like(codebook))


def test_one_code(device):
    z = torch.randn(70, 5, device=device, requires_grad=True)
    codebook = torch.randn(1, 5, device=device, requires_grad=True)
    z_q, indices, loss = vector_quantize(z, codebook, reduction="sum", backend="triton")
    assert torch.equal(indices, torch.zeros_like(indices))
    assert torch.equal(z_q, codebook.detach().expand(70, 5))
    (grad_codebook,) = torch.autograd.grad(loss, [codebook])
    assert_close(grad_codebook, 2 * (70 * codebook.detach() - z.detach().sum(0, keepdim=True)), rtol=1e-5, atol=1e-4)


def test_one_vector_without_a_batch_dim(device):
    z = torch.randn(7, device=device)
    codebook = torch.randn(9, 7, device=device)
    z_q, indices, loss = vector_quantize(z, codebook, backend="triton")
    assert z_q.shape == (7,) and indices.shape == () and loss.shape == ()
    assert int(indices) == int(torch.cdist(z[None], codebook).argmin())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter, about the NaN it computes
def test_nan_propagates_to_the_loss_and_z_q_and_a_nan_code_is_never_chosen(device):
    z = torch.randn(6, 4, device=device)
    z[1, 2] = math.nan
    z[4, 0] = math.inf
    codebook = torch.randn(10, 4, device=device)
    codebook[7, 1] = math.nan
    for backend in ("triton", "torch"):
        z_q, indices, loss = vector_quantize(z, codebook, backend=backend)
        assert loss[1].isnan() and loss[4] == math.inf and loss[[0, 2, 3, 5]].isfinite().all()
        assert torch.equal(z_q.isnan(), ~z.isfinite())  # NaN where z is not finite, the code elsewhere
        assert (indices != 7).all() and indices[1] == 0


def test_inputs_are_not_modified_and_gradients_share_no_memory(device):
    z = torch.randn(50, 6, device=device, requires_grad=True)
    codebook = torch.randn(12, 6, device=device, requires_grad=True)
    before = z.detach().clone(), codebook.detach().clone()
    z_q, _, loss = vector_quantize(z, codebook, backend="triton")
    upstream = torch.randn_like(z_q), torch.rand_like(loss)
    kept = [t.clone() for t in upstream]
    grads = torch.autograd.grad([z_q, loss], [z, codebook], list(upstream))
    assert torch.equal(z.detach(), before[0]) and torch.equal(codebook.detach(), before[1])
    assert all(torch.equal(a, b) for a, b in zip(upstream, kept))
    storages = {t.untyped_storage().data_ptr() for t in (z, codebook, z_q, loss, *upstream)}
    assert all(g.untyped_storage().data_ptr() not in storages for g in grads)
    assert grads[0].untyped_storage().data_ptr() != grads[1].untyped_storage().data_ptr()


@pytest.mark.parametrize("outputs", ["z_q", "loss", "both"])
@pytest.mark.parametrize("learned_codebook", [True, False])
def test_gradients_of_each_output_alone(device, outputs, learned_codebook):
    z, codebook, _ = separated(40, 9, 6, device)
    z, codebook = z.requires_grad_(), codebook.requires_grad_(learned_codebook)
    wrt = [z, codebook] if learned_codebook else [z]
    results = {}
    for backend in ("triton", "torch"):
        z_q, _, loss = vector_quantize(z, codebook, reduction="mean", backend=backend)
        chosen = {"z_q": [z_q], "loss": [loss], "both": [z_q, loss]}[outputs]
        upstream = [torch.ones_like(t) for t in chosen]
        results[backend] = torch.autograd.grad(chosen, wrt, upstream, allow_unused=True, materialize_grads=True)
    for g, e in zip(*results.values()):
        assert_close(g, e)
    if outputs == "z_q":
        assert torch.equal(results["triton"][0], torch.ones_like(z))  # straight through, exactly
        if learned_codebook:
            assert torch.equal(results["triton"][1], torch.zeros_like(codebook))


def test_deterministic_mode_sums_the_codebook_gradient_without_atomics(device, monkeypatch):
    z = torch.randn(90, 5, device=device, requires_grad=True)
    codebook = torch.randn(4, 5, device=device, requires_grad=True)
    z_q, _, loss = vector_quantize(z, codebook, backend="triton")
    upstream = [torch.randn_like(z_q), torch.rand_like(loss)]
    expected = torch.autograd.grad([z_q, loss], [z, codebook], upstream, retain_graph=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad([z_q, loss], [z, codebook], upstream, retain_graph=True)
        second = torch.autograd.grad([z_q, loss], [z, codebook], upstream)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for g, e in zip(first, expected):
        assert_close(g, e)


def test_reference_chunks_agree_with_one_chunk():
    rows, codebook = torch.randn(300, 8), torch.randn(50, 8)
    assert torch.equal(nearest_codes(rows, codebook, chunk_elements=1), nearest_codes(rows, codebook, 1 << 30))
    assert REFERENCE_CHUNK_ELEMENTS * 4 <= 16 << 20  # what the docs state: 16 MB of float32 distances per chunk


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 4)), ValueError, "D = 4"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(0, 3)), ValueError, "empty"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(3)), ValueError, r"shape \(K, D\)"),
        (dict(z=torch.randn(4, 0), codebook=torch.randn(2, 0)), ValueError, "D = 0"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 3), beta=-0.1), ValueError, "beta"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 3), beta=math.nan), ValueError, "beta"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 3), beta="0.25"), TypeError, "beta"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 3), dim=2), ValueError, "dim"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 3), dim=1.0), TypeError, "dim"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 3), reduction="max"), ValueError, "reduction"),
        (dict(z=torch.randn(4, 3), codebook=torch.randn(5, 3), backend="cuda"), ValueError, "backend"),
        (dict(z=torch.ones(4, 3, dtype=torch.long), codebook=torch.randn(5, 3)), TypeError, "z must"),
        (dict(z=torch.randn(4, 3), codebook=[[0.0] * 3]), TypeError, "codebook must"),
        (dict(z=torch.tensor(1.0), codebook=torch.randn(5, 1)), ValueError, "0-d"),
        (dict(z=torch.randn(4, 3, dtype=torch.float64), codebook=torch.randn(5, 3), backend="triton"), TypeError,
         "float64"),
    ],
)
def test_bad_input(kwargs, error, match):
    z, codebook = kwargs.pop("z"), kwargs.pop("codebook")
    with pytest.raises(error, match=match):
        vector_quantize(z, codebook, **kwargs)


def test_float64_runs_the_reference_and_auto_picks_it_on_the_cpu():
    z, codebook = torch.randn(30, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    z_q, indices, loss = vector_quantize(z, codebook)
    assert z_q.dtype == loss.dtype == torch.float64
    assert torch.equal(indices, torch.cdist(z, codebook).argmin(dim=1))


# ---- higher orders, host syncs, torch.compile, the custom ops ----------------------------------------------------


@pytest.mark.parametrize("learned_codebook", [True, False])
def test_higher_order_gradients_follow_the_reference(device, learned_codebook):
    """Under create_graph the backward is the reference's, sg[.] held constant: second and third derivatives (with
    those in the upstream gradients) match autograd's on the float64 reference at the same indices."""
    z = torch.randn(30, 5, device=device, dtype=torch.float32, requires_grad=True)
    codebook = torch.randn(7, 5, device=device, requires_grad=learned_codebook)
    grad_z_q = torch.randn(30, 5, device=device, requires_grad=True)
    grad_loss = (torch.rand(30, device=device) + 0.5).requires_grad_()
    inputs = [z, codebook, grad_z_q, grad_loss] if learned_codebook else [z, grad_z_q, grad_loss]

    def derivatives(fn, cast):
        ins = [t.detach().to(cast).requires_grad_() for t in inputs]
        named = dict(zip(["z", "codebook", "gzq", "gl"] if learned_codebook else ["z", "gzq", "gl"], ins))
        cb = named.get("codebook", codebook.detach().to(cast))
        z_q, loss = fn(named["z"], cb)
        first = torch.autograd.grad([z_q, loss], [named["z"]] + ([cb] if learned_codebook else []),
                                    [named["gzq"], named["gl"]], create_graph=True)
        directions = [torch.ones_like(t, dtype=torch.float32) for t in first]
        out = [first]
        total = sum((g.float() * v).sum() for g, v in zip(first, directions))
        out.append(torch.autograd.grad(total, ins, allow_unused=True, materialize_grads=True))
        return out

    _, indices, _ = vector_quantize(z, codebook, backend="triton")
    got = derivatives(lambda z_, cb: vector_quantize(z_, cb, backend="triton")[::2], torch.float32)
    expected = derivatives(lambda z_, cb: float64_spec(z_, cb, indices, 0.25, -1), torch.float64)
    for order_got, order_expected in zip(got, expected):
        for g, e in zip(order_got, order_expected):
            assert_close(g.double(), e, torch.float32, rtol=1e-5, atol=1e-5 * float(e.detach().abs().max() + 1))


def test_third_order_derivatives_are_those_of_a_linear_backward(device):
    """The first derivatives are linear in z, the codebook and the upstream gradients: third orders vanish."""
    z = torch.randn(12, 3, device=device, requires_grad=True)
    codebook = torch.randn(4, 3, device=device, requires_grad=True)
    z_q, _, loss = vector_quantize(z, codebook, backend="triton")
    upstream = torch.rand_like(loss)
    directions = [torch.randn_like(z), torch.randn_like(codebook)]
    grads = gradients_up_to_third(loss, [z, codebook], upstream, directions)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[2])
    # The second: d/dz (2 beta g (z - e)) . v = 2 beta g v; d/de (2 g (e - z)) . u = 2 g u summed per code.
    _, indices, _ = vector_quantize(z, codebook, backend="triton")
    assert_close(grads[1][0], 0.5 * upstream[:, None] * directions[0])
    per_code = torch.zeros(4, device=device).index_add(0, indices, 2 * upstream)
    assert_close(grads[1][1], per_code[:, None] * directions[1])


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_no_host_sync_in_forward_and_backward(device, reduction):
    z = torch.randn(40, 6, device=device, requires_grad=True)
    codebook = torch.randn(9, 6, device=device, requires_grad=True)
    weight = torch.rand(40, device=device) if reduction == "none" else torch.tensor(1.0, device=device)

    def loss_fn():
        z_q, _, loss = vector_quantize(z, codebook, reduction=reduction, backend="triton")
        return loss + z_q.square().mean()

    with no_sync(device):
        every_backward(loss_fn, [z, codebook], weight)


class TinyVQ(torch.nn.Module):
    """A scale (ones: compiled and eager give the same bits, hence the same codes) and a slice of its output."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1, 9, 1, 1))
        self.codebook = torch.nn.Parameter(torch.randn(11, 4))

    def forward(self, x):
        h = x * self.scale
        z_q, indices, loss = vector_quantize(h[:, 1:5], self.codebook, dim=1, reduction="mean", backend="triton")
        return z_q.square().mean() + loss, indices


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    model = TinyVQ().to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 9, 4, 5, device=device)
    (loss, indices), (loss_c, indices_c) = model(x), compiled(x)
    assert torch.equal(indices, indices_c)
    assert_close(loss_c, loss)
    for g, g_c in zip(torch.autograd.grad(loss, list(model.parameters())),
                      torch.autograd.grad(loss_c, list(model.parameters()))):
        assert_close(g_c, g)


@pytest.mark.parametrize("layout", ["rows", "channel slice"])
def test_custom_op_registration(device, layout):
    """Schema, fake tensors (their strides too) and autograd of the ops, by torch's own checker."""
    if layout == "rows":
        z, dim = torch.randn(20, 6, device=device, requires_grad=True), 1
    else:
        z, dim = torch.randn(2, 9, 3, 4, device=device)[:, 2:8].requires_grad_(), 1
    codebook = torch.randn(5, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvae.vector_quantize.default, (z, codebook, 0.25, dim))
    z_q, indices, _ = torch.ops.fastvae.vector_quantize.default(z, codebook, 0.25, dim)
    grad_loss = torch.rand(indices.shape, device=device)
    torch.library.opcheck(
        torch.ops.fastvae.vector_quantize_backward.default,
        (torch.randn_like(z_q), grad_loss, z.detach(), z_q.detach(), indices, codebook.detach(), 0.25, dim, True),
        test_utils=("test_schema", "test_faketensor"),  # its codebook gradient is summed with atomics
    )


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the resident memory from /proc")
def test_reference_path_memory_is_far_below_the_distance_matrix():
    """A fresh process's resident memory (its high-water mark) rises by a small fraction of the 1.07 GB a
    16,384 x 16,384 distance matrix would take: the reference holds one chunk of distances at a time."""
    from benchmarks.vq_memory import measure

    result = measure(16384, 16384, 8)
    assert result["peak_rise_bytes"] < result["distance_matrix_bytes"] / 8, result
