"""The fused reconstruction losses against their PyTorch reference, through the Triton kernels themselves."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastvae.functional import reconstruction_loss, reparameterize_kl
from fastvae.ops.reconstruction_loss import reconstruction_loss_reference
from tests.utils import (
    TOLERANCES,
    assert_close,
    assert_within,
    compile_for_cuda,
    gradients_up_to_third,
    pick,
    record_kernel_calls,
)

KINDS = ["mse", "bce", "gaussian", "l1"]
REDUCTIONS = ["none", "sum", "mean"]


def make_inputs(kind, shape, device, dtype=torch.float32, logvar_shape=None, x_dtype=None):
    """``x_hat`` (requires grad), a target in [0, 1], and for ``"gaussian"`` a learned ``logvar``.

    ``logvar_shape`` defaults to one value per feature, ``shape[1:]``.
    """
    x_hat = torch.randn(shape, device=device).to(dtype).requires_grad_()
    x = torch.rand(shape, device=device).to(x_dtype or dtype)
    logvar = None
    if kind == "gaussian":
        logvar_shape = shape[1:] if logvar_shape is None else logvar_shape
        logvar = (0.5 * torch.randn(logvar_shape, device=device)).to(dtype).requires_grad_()
    return x_hat, x, logvar


def upstream(reduction, batch, device):
    """Upstream weights that are exactly 1 for some samples and not for others, or a scalar other than 1."""
    if reduction == "none":
        return torch.tensor([1.0, 2.0, 0.5, 1.0, -1.5][:batch], device=device)
    return torch.tensor(2.5, device=device)


def check_against_reference(x_hat, x, kind, reduction="none", logvar=None, grad_loss=None):
    """Forward and backward against the reference; the upstream gradient defaults to one that is not all ones."""
    loss = reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend="triton")
    want = reconstruction_loss_reference(x_hat, x, kind, reduction, logvar)
    assert "fastvae" in type(loss.grad_fn).__name__  # the kernels ran, not the reference
    assert loss.shape == want.shape and loss.dtype == torch.float32
    assert_close(loss, want, rtol=2e-5)
    grad_loss = torch.rand_like(loss) + 0.5 if grad_loss is None else grad_loss
    inputs = [t for t in (x_hat, x, logvar) if t is not None and t.requires_grad]
    got = torch.autograd.grad(loss, inputs, grad_loss)
    expected = torch.autograd.grad(want, inputs, grad_loss)
    for t, g, w in zip(inputs, got, expected):
        assert g.shape == w.shape and g.dtype == w.dtype
        # A broadcast logvar's gradient adds up k terms, in another order than the reference's:
        # rounding of order k float32 ulps, beyond 1e-5 once the terms cancel.
        summed = x_hat.numel() // max(t.numel(), 1)
        assert_close(g, w, atol=max(TOLERANCES[g.dtype]["atol"], 1e-6 * summed))
    return loss, got


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(device, kind, reduction):
    x_hat, x, logvar = make_inputs(kind, (pick(device, 3, 67), 5, pick(device, 7, 301)), device)
    check_against_reference(x_hat, x, kind, reduction, logvar)


SHAPES = {
    "vector": lambda dev: (pick(dev, 5, 10001),),
    "odd": lambda dev: (pick(dev, 3, 1001), pick(dev, 37, 129)),
    "image": lambda dev: (pick(dev, 2, 64), 3, pick(dev, 5, 32), pick(dev, 7, 33)),
    "above-one-block": lambda dev: (pick(dev, 3, 300), pick(dev, 4100, 70001)),
    "batch-of-one": lambda dev: (1, 3, pick(dev, 64, 512), pick(dev, 64, 512)),
    "many-small-samples": lambda dev: (pick(dev, 300, 100000), 3),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_shapes(device, kind, shape):
    x_hat, x, logvar = make_inputs(kind, shape(device), device)
    check_against_reference(x_hat, x, kind, "sum", logvar)
    check_against_reference(x_hat, x, kind, "none", logvar)


def test_the_shapes_exercise_every_tiling(device):
    from fastvae.kernels.launch import plan_rows

    batch_of_one = SHAPES["batch-of-one"](device)
    assert plan_rows(1, math.prod(batch_of_one[1:]), device).n_splits > 1  # one sample split across programs
    rows, cols = SHAPES["many-small-samples"](device)
    assert plan_rows(rows, cols, device).block_rows > 1  # many samples to a program


@pytest.mark.parametrize("kind", KINDS)
def test_results_do_not_depend_on_tiling(device, kind, monkeypatch):
    from fastvae.kernels import launch

    # Tiny tiles and many programs: several row tiles and column splits even at small sizes.
    monkeypatch.setattr(launch, "BLOCK_ELEMENTS", 32)
    monkeypatch.setattr(launch, "target_programs", lambda device: 64)
    shape = (pick(device, 37, 300), pick(device, 70, 700))
    for reduction in REDUCTIONS:
        x_hat, x, logvar = make_inputs(kind, shape, device)
        check_against_reference(x_hat, x, kind, reduction, logvar)


DTYPES = {
    "float16": (torch.float16, None),
    "bfloat16": (torch.bfloat16, None),
    "bf16 prediction, f32 target": (torch.bfloat16, torch.float32),
    "f32 prediction, f16 target": (torch.float32, torch.float16),
}


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes(device, kind, dtypes):
    dtype, x_dtype = dtypes
    shape = (pick(device, 4, 256), pick(device, 33, 1025))
    x_hat, x, logvar = make_inputs(kind, shape, device, dtype, x_dtype=x_dtype)
    check_against_reference(x_hat, x, kind, "mean", logvar)


LOGVAR_SHAPES = {
    "scalar": lambda b, c, h, w: (),
    "one": lambda b, c, h, w: (1,),
    "per feature": lambda b, c, h, w: (c, h, w),
    "per feature, batch dim 1": lambda b, c, h, w: (1, c, h, w),
    "per channel": lambda b, c, h, w: (c, 1, 1),
    "per column": lambda b, c, h, w: (w,),
    "per sample": lambda b, c, h, w: (b, 1, 1, 1),
    "per sample and pixel": lambda b, c, h, w: (b, 1, h, w),
    "per element": lambda b, c, h, w: (b, c, h, w),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logvar_shape", LOGVAR_SHAPES.values(), ids=LOGVAR_SHAPES.keys())
def test_gaussian_logvar_broadcasts(device, logvar_shape, reduction):
    shape = (pick(device, 5, 40), 3, pick(device, 4, 30), pick(device, 6, 31))
    x_hat, x, logvar = make_inputs("gaussian", shape, device, logvar_shape=logvar_shape(*shape))
    check_against_reference(x_hat, x, "gaussian", reduction, logvar)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_shared_logvar_summed_over_many_row_tiles(device, reduction):
    # More samples than a tile of COLUMN_BLOCK_ROWS rows: the column sums come from several tiles.
    shape = (pick(device, 40, 1000), 3, 10, pick(device, 10, 100))
    x_hat, x, logvar = make_inputs("gaussian", shape, device)
    check_against_reference(x_hat, x, "gaussian", reduction, logvar)


def test_gaussian_logvar_of_half_precision_and_strided(device):
    shape = (pick(device, 4, 64), pick(device, 9, 300))
    x_hat, x, _ = make_inputs("gaussian", shape, device, torch.bfloat16)
    logvar = torch.randn(2 * shape[1], device=device, dtype=torch.float16)[::2].requires_grad_()
    check_against_reference(x_hat, x, "gaussian", "sum", logvar)
    logvar = torch.randn(shape[::-1], device=device).t().requires_grad_()  # per element, transposed
    check_against_reference(x_hat, x, "gaussian", "none", logvar)


@pytest.mark.parametrize("layout", ["transposed", "strided", "channels-last", "broadcast-target"])
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(device, kind, layout):
    b, c, h, w = pick(device, 3, 32), 3, pick(device, 5, 40), pick(device, 6, 41)
    if layout == "transposed":
        x_hat = torch.randn(w * h, b, device=device).t().requires_grad_()
        x = torch.rand(w * h, b, device=device).t()
    elif layout == "strided":
        x_hat = torch.randn(b, 2 * c * h, w, device=device)[:, ::2].requires_grad_()
        x = torch.rand(2 * b, c * h, w, device=device)[::2]
    elif layout == "channels-last":
        x_hat = torch.randn(b, c, h, w, device=device).to(memory_format=torch.channels_last).requires_grad_()
        x = torch.rand(b, c, h, w, device=device).to(memory_format=torch.channels_last)
    else:  # one target for every sample, stride 0 along the batch
        x_hat = torch.randn(b, c, h, w, device=device, requires_grad=True)
        x = torch.rand(1, c, h, w, device=device).expand(b, c, h, w)
    assert not x_hat.is_contiguous() or not x.is_contiguous()
    logvar = (0.3 * torch.randn(x.shape[1:], device=device)).requires_grad_() if kind == "gaussian" else None
    check_against_reference(x_hat, x, kind, "sum", logvar)
    check_against_reference(x_hat, x, kind, "none", logvar)


@pytest.mark.parametrize("kind", KINDS)
def test_target_that_requires_grad_gets_its_gradient(device, kind):
    x_hat, x, logvar = make_inputs(kind, (pick(device, 3, 100), pick(device, 11, 999)), device, x_dtype=torch.float16)
    x.requires_grad_()
    for reduction in ("none", "mean"):
        check_against_reference(x_hat, x, kind, reduction, logvar)
    # The target alone.
    check_against_reference(x_hat.detach(), x, kind, "sum", logvar.detach() if logvar is not None else None)


# ---- the gradient written in the forward ---------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records every forward launch (its keyword arguments, its outputs) and every scaling launch of the backward.

    A scaling launch is recorded as ``("in place" or "new", shape, the weights)``.
    """
    from fastvae.kernels import reconstruction_loss as kernels

    return record_kernel_calls(monkeypatch, kernels, "reconstruction_loss_forward")


@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_written_without_autograd(device, kind, kernel_calls):
    x_hat, x, logvar = make_inputs(kind, (4, 9), device)
    with torch.no_grad():
        loss = reconstruction_loss(x_hat, x, kind, reduction="none", logvar=logvar, backend="triton")
    assert loss.grad_fn is None
    with torch.inference_mode():
        reconstruction_loss(x_hat, x, kind, reduction="sum", logvar=logvar, backend="triton")
    assert_close(loss, reconstruction_loss_reference(x_hat, x, kind, "none", logvar).detach())
    loss = reconstruction_loss(x_hat.detach(), x, kind, logvar=None if logvar is None else logvar.detach(),
                               backend="triton")
    assert loss.grad_fn is None
    for call in kernel_calls["forward"]:
        assert call["grad_x_hat"] is False and call["grad_x"] is False and call["logvar_grad"] == "none"
    # Only what requires grad gets a gradient: here x_hat, not logvar.
    reconstruction_loss(x_hat, x, kind, logvar=None if logvar is None else logvar.detach(), backend="triton")
    assert kernel_calls["forward"][-1]["grad_x_hat"] is True
    assert kernel_calls["forward"][-1]["logvar_grad"] == "none"
    # The op itself hands back empty tensors for the gradients it was not asked for.
    _, per_sample, grad_x_hat, grad_x, grad_logvar = torch.ops.fastvae.reconstruction_loss(
        x_hat.detach(), x, logvar, kind, "sum", False, False, False
    )
    assert grad_x_hat.numel() == grad_x.numel() == grad_logvar.numel() == 0 and per_sample.shape == x.shape[:1]


@pytest.mark.parametrize("reduction", ["sum", "mean", "none then sum"])
def test_backward_hands_over_the_forward_gradient(device, reduction, kernel_calls):
    """``loss.backward()``: the gradient is the forward's own buffer, scaled in place by weights of exactly 1."""
    x_hat, x, logvar = make_inputs("gaussian", (pick(device, 5, 64), pick(device, 13, 1000)), device)
    if reduction == "none then sum":
        loss = reconstruction_loss(x_hat, x, "gaussian", reduction="none", logvar=logvar, backend="triton").sum()
        want = reconstruction_loss_reference(x_hat, x, "gaussian", "none", logvar).sum()
    else:
        loss = reconstruction_loss(x_hat, x, "gaussian", reduction=reduction, logvar=logvar, backend="triton")
        want = reconstruction_loss_reference(x_hat, x, "gaussian", reduction, logvar)
    grad_x_hat, grad_logvar = torch.autograd.grad(loss, (x_hat, logvar))
    _, forward_x_hat, _, _ = kernel_calls["outputs"][0]
    assert grad_x_hat.data_ptr() == forward_x_hat.data_ptr()  # handed over, no copy
    # x_hat's (and, under "sum"/"mean", logvar's) gradient: weights of 1 are skipped in place, with no traffic.
    assert [how for how, *_ in kernel_calls["scale"]] == ["in place"] * (1 if reduction == "none then sum" else 2)
    assert all(bool((weight == 1).all()) for *_, weight in kernel_calls["scale"])
    expected = torch.autograd.grad(want, (x_hat, logvar))
    assert_close(grad_x_hat, expected[0])
    assert_close(grad_logvar, expected[1])


@pytest.mark.parametrize("kind", KINDS)
def test_memory_kept_for_the_backward(device, kind):
    """Higher orders cost no memory: besides the gradient buffers the forward keeps only references to inputs."""
    x_hat, x, logvar = make_inputs(kind, (4, pick(device, 10, 999)), device)
    inputs = [t for t in (x_hat, x, logvar) if t is not None]
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        reconstruction_loss(x_hat, x, kind, reduction="mean", logvar=logvar, backend="triton")
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    new_bytes = sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in storages)
    assert new_bytes == sum(t.numel() * t.element_size() for t in (x_hat, logvar) if t is not None)


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_scalar_loss(device, kind, kernel_calls):
    x_hat, x, logvar = make_inputs(kind, (pick(device, 4, 64), pick(device, 10, 999)), device)
    inputs = [t for t in (x_hat, logvar) if t is not None]
    loss = reconstruction_loss(x_hat, x, kind, reduction="sum", logvar=logvar, backend="triton")
    got = torch.autograd.grad(-2.5 * loss, inputs)
    expected = torch.autograd.grad(-2.5 * reconstruction_loss_reference(x_hat, x, kind, "sum", logvar), inputs)
    assert [how for how, *_ in kernel_calls["scale"]] == ["in place"] * len(inputs)
    for g, w in zip(got, expected):
        assert_close(g, w)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_upstream_weights_exactly_one_for_some_samples(device, kind, reduction):
    """Per-sample weights [1, 2, 0.5, 1, -1.5]: the samples of weight 1 skip the scaling, the others must not."""
    x_hat, x, logvar = make_inputs(kind, (5, 2, pick(device, 3, 300)), device)
    x.requires_grad_()
    grad_loss = upstream(reduction, 5, device)
    check_against_reference(x_hat, x, kind, reduction, logvar, grad_loss=grad_loss)  # the buffers' owner: in place
    # A retained graph scales out of place, and so does the backward after it.
    loss = reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend="triton")
    inputs = [t for t in (x_hat, x, logvar) if t is not None]
    want = torch.autograd.grad(reconstruction_loss_reference(x_hat, x, kind, reduction, logvar), inputs, grad_loss)
    for retain in (True, False):
        got = torch.autograd.grad(loss, inputs, grad_loss, retain_graph=retain)
        for g, w in zip(got, want):
            assert_close(g, w)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_never_share_memory(device, kind, reduction, kernel_calls):
    """Issue 8: two backwards of a retained graph returned the same buffer; the next backward then failed."""
    x_hat, x, logvar = make_inputs(kind, (pick(device, 4, 64), pick(device, 10, 999)), device)
    x_hat_before, x_before = x_hat.detach().clone(), x.clone()
    inputs = [t for t in (x_hat, logvar) if t is not None]
    loss = reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend="triton")
    grad_loss = torch.ones_like(loss)
    first = torch.autograd.grad(loss, inputs, grad_loss, retain_graph=True)
    second = torch.autograd.grad(loss, inputs, grad_loss, retain_graph=True)
    assert {how for how, *_ in kernel_calls["scale"]} <= {"new"}  # the graph is kept: out of place
    expected = [g.clone() for g in first]
    for a, b in zip(first, second):
        assert a.data_ptr() != b.data_ptr()
        b.mul_(10)
    for a, e in zip(first, expected):
        assert torch.equal(a, e)
    # The saved gradients are intact: the last backward (which owns them) and accumulation into .grad are right.
    loss.backward(grad_loss, retain_graph=True)
    loss.backward(grad_loss)
    for t, e in zip(inputs, expected):
        assert_close(t.grad, 2 * e)
    assert torch.equal(x_hat.detach(), x_hat_before) and torch.equal(x, x_before)


def test_autocast_decoder_output(device):
    decoder = torch.nn.Linear(6, 20).to(device)
    z, x = torch.randn(5, 6, device=device), torch.rand(5, 20, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = decoder(z)
        assert logits.dtype == torch.bfloat16
        loss = reconstruction_loss(logits, x, "bce", reduction="mean", backend="triton")
        want = reconstruction_loss_reference(logits, x, "bce", "mean")
    assert loss.dtype == torch.float32
    assert_close(loss, want)
    got = torch.autograd.grad(loss, decoder.weight, retain_graph=True)[0]
    # The logits' gradient is bfloat16: the same float32 math by a different chain of operations, rounded.
    assert_close(got, torch.autograd.grad(want, decoder.weight)[0], dtype=torch.bfloat16)


# ---- edge values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "l1", "bce"])
def test_nan_inf_and_ties_as_in_reference(device, kind):
    x_hat, x, _ = make_inputs(kind, (4, 6), device)
    with torch.no_grad():
        x_hat[0, 1], x_hat[1, 2], x_hat[2, 0] = float("nan"), float("inf"), float("-inf")
        x[3, :3] = x_hat[3, :3]  # |d| at 0, where l1's gradient is sign(0) = 0
    check_against_reference(x_hat, x, kind, "none")


def test_bce_stable_for_extreme_logits(device):
    # Around 16.6 is where 1 + e^-|logit| rounds to 1 in float32: the switch inside the kernel's log1p.
    logits = torch.tensor([[-1e4, -100.0, -30.0, -17.0, -16.6, -16.0, -1e-6, 0.0, 1e-6, 16.0, 16.6, 17.0, 30.0, 100.0,
                            1e4]], device=device)
    for target in (0.0, 0.3, 1.0):
        x = torch.full_like(logits, target)
        x_hat = logits.clone().requires_grad_()
        loss = reconstruction_loss(x_hat, x, "bce", reduction="sum", backend="triton")
        want = F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="sum")
        assert torch.isfinite(loss)
        assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
        loss.backward()
        assert_close(x_hat.grad, torch.sigmoid(logits.double()).sub(x.double()).float())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bce_gradient_at_a_logit_of_exactly_zero(device, backend):
    """sigmoid(0) - x = 0.5 - x, exactly: the reference's clamp_min(0) gave 1 - x there (issue 8)."""
    x = torch.tensor([[0.0, 0.25, 0.5, 1.0], [0.3, 0.7, 0.1, 0.9]], device=device)
    for zero in (0.0, -0.0):  # a zero-initialised output layer starts exactly here
        x_hat = torch.full_like(x, zero).requires_grad_()
        target = x.clone().requires_grad_()
        loss = reconstruction_loss(x_hat, target, "bce", backend=backend)
        assert_close(loss, torch.full((2,), 4 * math.log(2), device=device))
        grad_x_hat, grad_x = torch.autograd.grad(loss.sum(), (x_hat, target), create_graph=backend == "torch")
        assert torch.equal(grad_x_hat, 0.5 - x)
        assert torch.equal(grad_x, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bce_infinite_logits(device, backend):
    """The limits: 0 where the target agrees with the infinite logit, +inf where it does not; finite gradients."""
    inf = float("inf")
    logits = torch.tensor([inf, inf, inf, -inf, -inf, -inf, 3.0, -3.0], device=device)
    x = torch.tensor([1.0, 0.25, 0.0, 0.0, 0.75, 1.0, 1.0, 0.0], device=device)
    x_hat, target = logits[:, None].clone().requires_grad_(), x[:, None].clone().requires_grad_()
    loss = reconstruction_loss(x_hat, target, "bce", backend=backend)  # one element per sample: the terms
    softplus3 = math.log1p(math.exp(-3.0))
    want = torch.tensor([0.0, inf, inf, 0.0, inf, inf, softplus3, softplus3], device=device)
    assert_close(loss, want, rtol=1e-6, atol=0)  # exact 0 and inf
    grad_x_hat, grad_x = torch.autograd.grad(loss.sum(), (x_hat, target), create_graph=True)
    sigmoid3 = 1 / (1 + math.exp(-3.0))
    want_x_hat = torch.tensor([0.0, 0.75, 1.0, 0.0, -0.75, -1.0, sigmoid3 - 1, 1 - sigmoid3], device=device)
    assert_close(grad_x_hat.view(-1), want_x_hat, rtol=1e-6, atol=1e-7)
    # d/dx = -x_hat (infinite, the limit), and 0 where the term's limit is 0, as the reference's autograd gives.
    assert torch.equal(grad_x.view(-1), torch.tensor([0.0, -inf, -inf, 0.0, inf, inf, -3.0, 3.0], device=device))
    # sigmoid'(+-inf) = 0: the second derivative in x_hat is 0 at the infinite logits.
    (second,) = torch.autograd.grad(grad_x_hat.sum(), x_hat)
    assert torch.equal(second.view(-1)[:6], torch.zeros(6, device=device))
    assert_close(second.view(-1)[6:], torch.full((2,), sigmoid3 * (1 - sigmoid3), device=device))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gaussian_of_a_huge_error_against_a_wide_variance_does_not_overflow(device, backend):
    """(x - x_hat)^2 overflows float32 where (x - x_hat)^2 e^-logvar does not: the loss and its gradients are the
    float64 values, on both paths, at the first and second order."""
    x_hat = torch.tensor([[1e20, -3e19, 1e19, 0.5]], device=device, requires_grad=True)
    x = torch.tensor([[0.0, 1e19, -1e20, 0.25]], device=device, requires_grad=True)
    logvar = torch.tensor([80.0, 82.0, 85.0, 80.0], device=device, requires_grad=True)
    inputs = (x_hat, x, logvar)
    loss = reconstruction_loss(x_hat, x, "gaussian", logvar=logvar, backend=backend)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    want = reconstruction_loss_reference(*wide[:2], "gaussian", logvar=wide[2])
    assert 1e3 < want.item() < 1e6  # no float32 overflow in the true value
    assert_close(loss.double(), want, rtol=1e-5, atol=0)
    got = torch.autograd.grad(loss.sum(), inputs, create_graph=True)
    expected = torch.autograd.grad(want.sum(), wide, create_graph=True)
    for g, w in zip(got, expected):
        assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    direction = [torch.rand_like(t) for t in inputs]
    second = torch.autograd.grad(sum((g * d).sum() for g, d in zip(got, direction)), inputs)
    want_second = torch.autograd.grad(sum((g * d.double()).sum() for g, d in zip(expected, direction)), wide)
    for g, w in zip(second, want_second):
        assert torch.isfinite(g).all()
        assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_l1_at_ties_and_either_side(device, backend):
    """sign(d) for d < 0, d = 0 (a tie: gradient 0) and d > 0."""
    x = torch.tensor([[0.5, 0.5, 0.5, 0.0, 1.0]], device=device)
    x_hat = torch.tensor([[0.5 - 2**-20, 0.5, 0.5 + 2**-20, 0.0, 1.0]], device=device, requires_grad=True)
    loss = reconstruction_loss(x_hat, x, "l1", backend=backend)
    assert_close(loss, torch.tensor([2.0**-19], device=device), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(loss.sum(), x_hat)
    assert torch.equal(grad, torch.tensor([[-1.0, 0.0, 1.0, 0.0, 0.0]], device=device))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty(device, shape, reduction):
    x_hat, x, logvar = make_inputs("gaussian", shape, device, logvar_shape=())
    loss = reconstruction_loss(x_hat, x, "gaussian", reduction=reduction, logvar=logvar, backend="triton")
    want = reconstruction_loss_reference(x_hat, x, "gaussian", reduction, logvar)
    assert loss.shape == want.shape
    assert_close(loss, want)
    grad_x_hat, grad_logvar = torch.autograd.grad(loss, (x_hat, logvar), torch.ones_like(loss))
    assert grad_x_hat.shape == x_hat.shape
    assert grad_logvar.shape == () and grad_logvar.item() == 0


# ---- torch.compile ---------------------------------------------------------------------------------


class TinyGaussianDecoder(torch.nn.Module):
    """A linear decoder with a learned log-variance per feature."""

    def __init__(self, latent=5, features=12):
        super().__init__()
        self.decode = torch.nn.Linear(latent, features)
        self.logvar = torch.nn.Parameter(0.1 * torch.randn(features))

    def forward(self, z, x, weights):
        loss = reconstruction_loss(self.decode(z), x, "gaussian", logvar=self.logvar, backend="triton")
        weighted = (loss * weights).sum()
        mean = reconstruction_loss(self.decode(z), x, "bce", reduction="mean", backend="triton")
        return weighted + mean


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    model = TinyGaussianDecoder().to(device)
    compiled = torch.compile(model, fullgraph=True)
    z, x = torch.randn(6, 5, device=device), torch.rand(6, 12, device=device)
    weights = torch.rand(6, device=device)
    loss, loss_compiled = model(z, x, weights), compiled(z, x, weights)
    assert_close(loss_compiled, loss)
    params = list(model.parameters())
    for g, g_compiled in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_compiled, params)):
        assert_close(g_compiled, g)
    with torch.no_grad():
        assert_close(compiled(z, x, weights), loss.detach())


@pytest.mark.parametrize(
    "kind, reduction, logvar_shape, grads",
    [
        ("mse", "none", None, (True, False, False)),
        ("bce", "sum", None, (True, True, False)),
        ("gaussian", "mean", (7,), (True, False, True)),
        ("gaussian", "none", (7,), (False, False, True)),
        ("gaussian", "none", (3, 1), (True, False, True)),
        ("gaussian", "sum", (3, 7), (True, False, True)),
        ("l1", "mean", None, (False, False, False)),
    ],
)
def test_custom_op_registration(device, kind, reduction, logvar_shape, grads):
    """Schema, fake tensors (shapes the compiler plans with) and autograd of the op, by torch's own checker."""
    x_hat = torch.randn(3, 7, device=device, requires_grad=grads[0])
    x = torch.rand(3, 7, device=device, requires_grad=grads[1])
    logvar = None if logvar_shape is None else torch.randn(logvar_shape, device=device, requires_grad=grads[2])
    args = (x_hat, x, logvar, kind, reduction, *grads)
    torch.library.opcheck(torch.ops.fastvae.reconstruction_loss.default, args)
    torch.library.opcheck(torch.ops.fastvae.scale_per_sample.default, (torch.randn(3, 7, device=device),
                                                                       torch.rand(3, device=device)))


def _forward_kernel_job(kind, logvar_grad, dtype, logvar_per_row=False):
    from fastvae.kernels import reconstruction_loss as kernels

    kernel = kernels._reconstruction_loss_forward_kernel
    pointer_types = {"loss_ptr": "*fp32", "grad_logvar_ptr": "*fp32" if logvar_grad in ("rows", "columns") else None}
    signature = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            signature[name] = pointer_types.get(name) or f"*{dtype}"
        elif not name.isupper():
            signature[name] = "fp32" if name == "grad_scale" else "i64"
    constexprs = dict(KIND=kind, GRAD_X_HAT=True, GRAD_X=True, LOGVAR_GRAD=logvar_grad,
                      LOGVAR_PER_ROW=logvar_per_row, BLOCK_ROWS=4, BLOCK_COLS=1024)
    return kernels.__name__, "_reconstruction_loss_forward_kernel", signature, constexprs, 8


def test_kernels_compile_for_a_cuda_target():
    """The interpreter runs code that compiled Triton refuses; this compiles every variant as a GPU would."""
    jobs = [_forward_kernel_job(kind, "none", dtype) for kind in ("mse", "bce", "l1") for dtype in ("bf16", "fp32")]
    jobs += [_forward_kernel_job("gaussian", mode, "fp16") for mode in ("none", "elements", "rows", "columns")]
    # A scalar or per-sample logvar, read once per row: its gradient is summed per row, or not asked for.
    jobs += [_forward_kernel_job("gaussian", mode, "fp16", logvar_per_row=True) for mode in ("none", "rows")]
    scale_signature = {"src_ptr": "*bf16", "weight_ptr": "*fp32", "out_ptr": "*bf16", "n_rows": "i64",
                       "n_cols": "i64", "stride_weight": "i64", "cols_per_split": "i64"}
    for skip_unit_rows, block_rows in ((False, 1), (True, 1), (True, 16)):
        jobs.append(("fastvae.kernels.scale_rows", "_scale_rows_kernel", scale_signature,
                     dict(SKIP_UNIT_ROWS=skip_unit_rows, BLOCK_ROWS=block_rows, BLOCK_COLS=256), 8))
    compile_for_cuda(jobs)


# ---- drop-in for a VAE's loss ------------------------------------------------------------------------


class MLPVAE(torch.nn.Module):
    """A small VAE whose activations are smooth: with ReLU, the two paths' float32 roundings (some 1e-7 of a
    pre-activation) switch a unit that sits within them of 0 on for one model and off for the other, and the
    models then part by that unit's whole gradient for a sample (seed 47: a pre-activation of 3e-8 after the
    fourth step had opposite signs in the two models, whose weights then parted by 8.6e-5 in one step). Through
    tanh a rounding moves the next step by a rounding times its slope, at most 1."""

    def __init__(self, features=20, hidden=16, latent=4):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2 * latent)
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, features)
        )


def plain_torch_loss(model, x, eps):
    mu, logvar = model.encoder(x).chunk(2, dim=-1)
    z = mu + torch.exp(0.5 * logvar) * eps
    reconstruction = F.binary_cross_entropy(torch.sigmoid(model.decoder(z)), x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp())
    return reconstruction + kl


def fastvae_loss(model, x, eps):
    mu, logvar = model.encoder(x).chunk(2, dim=-1)
    z, kl = reparameterize_kl(mu, logvar, eps, reduction="sum", backend="triton")
    return reconstruction_loss(model.decoder(z), x, "bce", reduction="sum", backend="triton") + kl


def test_drop_in_for_sigmoid_bce_and_analytic_kl(device):
    x = torch.rand(8, 20, device=device)
    reference = MLPVAE().to(device)
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    fused = MLPVAE().to(device)
    fused.load_state_dict(reference.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (reference, fused)]
    for _ in range(5):
        eps = torch.randn(8, 4, device=device)
        losses = []
        for model, loss_fn, optimizer in zip((reference, fused), (plain_torch_loss, fastvae_loss), optimizers):
            optimizer.zero_grad()
            loss = loss_fn(model, x, eps)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-4)
    for (name, p_reference), p_fused in zip(reference.named_parameters(), fused.parameters()):
        assert not torch.equal(p_reference, initial[name])  # training moved every parameter
        assert_close(p_fused, p_reference, rtol=1e-5, atol=1e-5)


# ---- bad input -------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "shapes differ": ((torch.zeros(2, 3), torch.zeros(2, 4)), {}, ValueError, "x must have the shape"),
    "integer x_hat": ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)), {}, TypeError, "x_hat"),
    "integer x": ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.uint8)), {}, TypeError, "x must"),
    "bool x": ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)), {}, TypeError, "x must"),
    "complex x_hat": ((torch.zeros(2, 3, dtype=torch.complex64), torch.zeros(2, 3)), {}, TypeError, "x_hat"),
    "not a tensor": (([[0.0]], torch.zeros(1, 1)), {}, TypeError, "x_hat"),
    "0-d": ((torch.tensor(0.0), torch.tensor(0.0)), {}, ValueError, "x_hat"),
    "unknown kind": ((torch.zeros(2, 3), torch.zeros(2, 3), "bernoulli"), {}, ValueError, "kind"),
    "unknown reduction": ((torch.zeros(2, 3), torch.zeros(2, 3)), {"reduction": "batchmean"}, ValueError,
                          "reduction"),
    "gaussian without logvar": ((torch.zeros(2, 3), torch.zeros(2, 3), "gaussian"), {}, ValueError, "logvar"),
    "logvar for mse": ((torch.zeros(2, 3), torch.zeros(2, 3)), {"logvar": torch.zeros(3)}, ValueError, "logvar"),
    "logvar does not broadcast": ((torch.zeros(2, 3), torch.zeros(2, 3), "gaussian"), {"logvar": torch.zeros(2)},
                                  ValueError, "logvar"),
    "logvar of higher rank": ((torch.zeros(2, 3), torch.zeros(2, 3), "gaussian"), {"logvar": torch.zeros(1, 2, 3)},
                              ValueError, "logvar"),
    "integer logvar": ((torch.zeros(2, 3), torch.zeros(2, 3), "gaussian"),
                       {"logvar": torch.zeros(3, dtype=torch.int32)}, TypeError, "logvar"),
    "logvar not a tensor": ((torch.zeros(2, 3), torch.zeros(2, 3), "gaussian"), {"logvar": 0.0}, TypeError,
                            "logvar"),
    "devices differ": ((torch.zeros(2, 3), torch.zeros(2, 3, device="meta")), {}, ValueError, "x is on meta"),
    "backend": ((torch.zeros(2, 3), torch.zeros(2, 3)), {"backend": "cuda"}, ValueError, "backend"),
    "return_per_sample not a bool": ((torch.zeros(2, 3), torch.zeros(2, 3)), {"return_per_sample": 1}, TypeError,
                                     "return_per_sample"),
    "float64 on triton": ((torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3)), {"backend": "triton"},
                          TypeError, "x_hat"),
    "float64 logvar on triton": ((torch.zeros(2, 3), torch.zeros(2, 3), "gaussian"),
                                 {"logvar": torch.zeros(3, dtype=torch.float64), "backend": "triton"},
                                 TypeError, "logvar"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(case):
    args, kwargs, error, message = case
    with pytest.raises(error, match=message):
        reconstruction_loss(*args, **kwargs)


def test_auto_backend_runs_the_reference_on_cpu_and_for_float64():
    x_hat = torch.randn(3, 4, requires_grad=True)
    loss = reconstruction_loss(x_hat, torch.rand(3, 4), "bce")
    assert "fastvae" not in type(loss.grad_fn).__name__
    x_hat = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = reconstruction_loss(x_hat, torch.rand(3, 4, dtype=torch.float64), "mse", reduction="mean")
    assert loss.dtype == torch.float64 and "fastvae" not in type(loss.grad_fn).__name__


# ---- higher orders --------------------------------------------------------------------------------------

REQUIRES_GRAD = {  # which of (x_hat, x, logvar) require grad
    "x_hat": (True, False, False),
    "x": (False, True, False),
    "x_hat, x": (True, True, False),
    "logvar": (False, False, True),
    "x_hat, logvar": (True, False, True),
    "x, logvar": (False, True, True),
    "all": (True, True, True),
}


def bce_saved_gradient_error(grad_loss, reduction, shape, direction, order) -> torch.Tensor:
    """What rounding the saved gradient to bfloat16 can move BCE's order-2 and order-3 gradients by, per element.

    The op's Hessian reads ``sigma = G / s + x`` from the saved gradient ``G = s (sigma - x)``, ``|sigma - x| <= 1``,
    held in bfloat16 (to 2**-8 of itself; Triton's interpreter truncates), and autograd carries the derivatives of
    ``G`` back through bfloat16 gradients. The x_hat row of order 2, ``a sigma (1 - sigma) d`` (``a`` the upstream
    gradient times ``s``), moves by ``|1 - 2 sigma| <= 1`` times sigma's error, and of order 3, ``a sigma (1 - sigma)
    (1 - 2 sigma) d^2``, by ``|1 - 6 sigma + 6 sigma^2| <= 1`` times it; in the x row the two paths from x to sigma
    (through ``G``, ``-1``, and directly, ``+1``) cancel up to the roundings of each. A few of bfloat16's units:
    ``2**-6 a |d|^(order - 1)``, where the largest value (at most 0.25 or 0.1 of ``a |d|^(order - 1)``) times its
    rtol does not reach.
    """
    s = 1 / shape[0] if reduction == "mean" else 1.0
    a = grad_loss.abs().double().reshape(-1, *[1] * (len(shape) - 1)) * s
    return 2**-6 * a * direction.abs().double() ** (order - 1)


def check_higher_orders(kind, reduction, shape, device, dtype, requires_grad, logvar_shape=None):
    """First, second and third derivatives of the fused op against the reference's, through the same inputs."""
    x_hat, x, logvar = make_inputs(kind, shape, device, dtype, logvar_shape=logvar_shape)
    tensors = [t.detach().requires_grad_(wanted) if t is not None else None
               for t, wanted in zip((x_hat, x, logvar), requires_grad)]
    inputs = [t for t in tensors if t is not None and t.requires_grad]
    if not inputs:
        return
    grad_loss = upstream(reduction, shape[0], device)
    directions = [torch.randn(t.shape, device=device) for t in inputs]
    loss = reconstruction_loss(*tensors[:2], kind, reduction=reduction, logvar=tensors[2], backend="triton")
    assert "fastvae" in type(loss.grad_fn).__name__
    got = gradients_up_to_third(loss, inputs, grad_loss, directions)
    want = gradients_up_to_third(reconstruction_loss_reference(*tensors[:2], kind, reduction, tensors[2]), inputs,
                                 grad_loss, directions)
    for order, (got_order, want_order) in enumerate(zip(got, want), start=1):
        for t, g, w in zip(inputs, got_order, want_order):
            assert g.shape == t.shape and g.dtype == t.dtype, f"order {order}"
            summed = x_hat.numel() // max(t.numel(), 1)
            atol = max(TOLERANCES[g.dtype]["atol"], 1e-6 * summed)
            if order > 1:
                # Later orders differentiate the first order's formula, whose terms cancel (the Gaussian's products
                # exp(-logvar) (x_hat - x)^k d^order, and a broadcast logvar's sum over the elements it spans): the
                # two paths' roundings of those terms, a few float32 units of the largest, do not shrink with the
                # result, so the error is relative to the tensor's largest value, not to each one (seed 58: 2.8e-5
                # on a value of 0.06 of a third order whose largest is 44, some 5 units of 44).
                atol = max(atol, TOLERANCES[dtype]["rtol"] * w.abs().max().item())
            if dtype != torch.float32:
                # Later orders start from the saved gradient, rounded to bfloat16, and add terms that cancel: an
                # error relative to the largest value, not to each one; a broadcast logvar's gradient adds up
                # `summed` such terms (each of order 1 here), whose sum may cancel to near 0.
                rtol = TOLERANCES[dtype]["rtol"]
                # Each path's error in a later order is a few bfloat16 units (2**-7: the interpreter truncates) of
                # the largest term, and the two paths' errors add: 2 x 4 units of the largest value (seed 115, the
                # Gaussian's third order in x against float64: the reference 2.0% of the largest value off, the
                # kernels 1.2%, 2.1% apart). The float32 run of the same test checks the math itself.
                later = 2 * 4 * 2**-7 * w.abs().max().item() if order > 1 else 0.0
                atol = max(atol, rtol * w.abs().max().item(), later, rtol * summed if order > 1 else 0.0)
                if kind == "bce" and order > 1 and tensors[0].requires_grad:
                    bound = atol + rtol * w.abs().double() + bce_saved_gradient_error(
                        grad_loss, reduction, shape, directions[0], order)
                    assert_within(g, w, bound, f"order {order}, {t.shape}")
                    continue
            assert_close(g, w, atol=atol, msg=lambda m: f"order {order}, {t.shape}: {m}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["mse", "bce", "l1"])
def test_higher_orders(device, kind, reduction):
    """Gradient penalties and meta-gradients through the loss: every order matches the reference."""
    for requires_grad in [REQUIRES_GRAD[name] for name in ("x_hat", "x", "x_hat, x")]:
        for dtype in (torch.float32, torch.bfloat16):
            check_higher_orders(kind, reduction, (3, 2, pick(device, 5, 300)), device, dtype, requires_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logvar_shape", LOGVAR_SHAPES.values(), ids=LOGVAR_SHAPES.keys())
def test_higher_orders_gaussian(device, logvar_shape, reduction):
    shape = (3, 2, 2, pick(device, 3, 100))
    for requires_grad in REQUIRES_GRAD.values():
        for dtype in (torch.float32, torch.bfloat16):
            check_higher_orders("gaussian", reduction, shape, device, dtype, requires_grad, logvar_shape(*shape))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_return_per_sample(device, kind, reduction, backend):
    """The loss as without the flag, bit for bit, with every order of its gradient; beside it the per-sample
    values, detached, as the reference gives them."""
    x_hat, x, logvar = make_inputs(kind, (3, 2, pick(device, 5, 300)), device)
    x.requires_grad_()
    inputs = [t for t in (x_hat, x, logvar) if t is not None]
    loss, per_sample = reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend=backend,
                                           return_per_sample=True)
    plain = reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend=backend)
    assert torch.equal(loss, plain) and not per_sample.requires_grad
    assert_close(per_sample, reconstruction_loss_reference(x_hat, x, kind, "none", logvar).detach())
    grad_loss = upstream(reduction, 3, device)
    directions = [torch.randn(t.shape, device=device) for t in inputs]
    got = gradients_up_to_third(loss, inputs, grad_loss, directions)
    want = gradients_up_to_third(plain, inputs, grad_loss, directions)
    for got_order, want_order in zip(got, want):
        for g, w in zip(got_order, want_order):
            assert torch.equal(g, w)


def test_return_per_sample_of_a_mean_loss_needs_no_scaling_pass(device, kernel_calls):
    """``reduction="mean"`` with the per-sample values: ``loss.backward()`` scales by exactly 1 (no traffic), where
    the per-sample loss followed by ``.mean()`` scales every row by 1 / B."""
    x_hat, x, _ = make_inputs("bce", (4, pick(device, 9, 500)), device)
    loss, per_sample = reconstruction_loss(x_hat, x, "bce", reduction="mean", backend="triton",
                                           return_per_sample=True)
    loss.backward()
    reconstruction_loss(x_hat, x, "bce", backend="triton").mean().backward()
    (how, _, unit), (_, _, quarter) = kernel_calls["scale"]
    assert how == "in place" and torch.equal(unit, torch.ones_like(unit))
    assert torch.equal(quarter.expand(4), torch.full((4,), 0.25, device=device))


def test_gradient_penalty_through_the_loss(device):
    """The repro of issue 8: a penalty on the gradient must change the gradient (it was silently dropped)."""
    inp, x = torch.randn(6, 4, device=device), torch.rand(6, 10, device=device)
    w = torch.randn(4, 10, device=device, requires_grad=True)
    got, want = [], []
    for backend, out in (("triton", got), ("torch", want)):
        loss = reconstruction_loss(inp @ w, x, "mse", reduction="mean", backend=backend)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        out.append(torch.autograd.grad(loss + (g**2).sum(), w)[0])
    plain = torch.autograd.grad(reconstruction_loss_reference(inp @ w, x, "mse", "mean"), w)[0]
    assert not torch.allclose(want[0], plain)  # the penalty matters here
    assert_close(got[0], want[0])
