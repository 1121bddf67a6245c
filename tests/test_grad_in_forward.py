"""The backward of ops whose forward writes the gradient: the scaling kernel and the choice of mode."""
import pytest
import torch

from fastvae.functional import reconstruction_loss
from fastvae.ops.grad_in_forward import Mode, apply_upstream, backward_mode
from tests.utils import assert_close, pick


def scaled_rows(grad, weight):
    return (grad.float() * weight.float()[:, None]).to(grad.dtype)


def assert_same(actual, expected):
    """Equal in float32; in bfloat16 up to the rounding, which Triton's interpreter truncates (the GPU rounds)."""
    if actual.dtype == torch.float32:
        assert torch.equal(actual, expected)
    else:
        assert_close(actual, expected, rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_rows_in_place_and_out_of_place(device, dtype, monkeypatch):
    from fastvae.kernels import launch
    from fastvae.kernels.scale_rows import scale_rows, scale_rows_

    # Small tiles: several rows to a tile, several tiles, column splits; tiles whose rows all have weight 1.
    monkeypatch.setattr(launch, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(launch, "target_programs", lambda device: 16)
    rows, cols = 12, pick(device, 40, 4000)
    grad = torch.randn(rows, cols, device=device).to(dtype)
    weight = torch.tensor([1, 1, 1, 1, 2, 1, 0.5, 1, -1, 0, 1, 3], device=device, dtype=torch.float32)
    want = scaled_rows(grad, weight)
    out = scale_rows(grad, weight)
    assert out.data_ptr() != grad.data_ptr()
    assert_same(out, want)
    assert_same(scale_rows_(grad, weight), want)
    # A scalar weight, broadcast with stride 0.
    scalar = torch.tensor(1.5, device=device).expand(rows)
    assert_same(scale_rows(grad, scalar), scaled_rows(grad, scalar))


def test_in_place_scaling_never_touches_rows_of_weight_one(device, monkeypatch):
    """Rows of weight 1 are neither read nor written: seen through an output that is not the input."""
    from fastvae.kernels import launch, scale_rows

    monkeypatch.setattr(launch, "BLOCK_ELEMENTS", 32)
    src = torch.randn(6, 20, device=device)
    out = torch.full_like(src, -7.0)
    weight = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0], device=device)  # the last tiles: all ones
    scale_rows._launch(src, weight, out, skip_unit_rows=True)
    assert torch.equal(out[1], 2 * src[1])
    assert (out[[0, 2, 3, 4, 5]] == -7.0).all()


class _ModeProbe(torch.autograd.Function):
    """Records the backward mode it sees."""

    seen = []

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        _ModeProbe.seen.append(backward_mode(grad))
        return 2 * grad


def test_backward_mode():
    x = torch.randn(3, requires_grad=True)
    _ModeProbe.seen.clear()
    torch.autograd.grad(_ModeProbe.apply(x).sum(), x)
    y = _ModeProbe.apply(x).sum()
    torch.autograd.grad(y, x, retain_graph=True)
    torch.autograd.grad(y, x, create_graph=True)
    assert _ModeProbe.seen == [Mode.OWN, Mode.COPY, Mode.DIFFERENTIABLE]
    assert backward_mode(x, higher_order=True) is Mode.DIFFERENTIABLE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_every_mode_gives_the_same_values(device, mode, dtype):
    grad = torch.randn(4, 3, 5, device=device).to(dtype)
    weight = torch.tensor([1.0, 0.3, -2.0, 1.0], device=device)
    want = scaled_rows(grad.view(4, -1), weight).view(grad.shape)
    assert_same(apply_upstream(grad.clone(), weight, mode), want)
    scalar = torch.tensor(0.7, device=device)
    assert_same(apply_upstream(grad.clone(), scalar, mode), (grad.float() * 0.7).to(grad.dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2**31 elements")
@pytest.mark.parametrize("layout", ["few long rows", "many short rows"])
def test_weighted_backward_past_2_31_elements_cuda(layout):
    """reduction="none" with weights other than 1: row offsets past 2**31 must not wrap (int64 offsets)."""
    rows, cols = (3, (1 << 31) // 3 + 4096) if layout == "few long rows" else ((1 << 31) // 64 + 5, 64)
    x_hat = torch.zeros(rows, cols, device="cuda", dtype=torch.bfloat16)
    x_hat[-1, -8:] = torch.arange(1, 9, device="cuda", dtype=torch.bfloat16)
    x_hat.requires_grad_()
    x = torch.zeros(1, cols, device="cuda", dtype=torch.bfloat16).expand(rows, cols)
    weight = torch.full((rows,), 0.5, device="cuda")
    weight[-1] = 3.0
    loss = reconstruction_loss(x_hat, x, "mse", reduction="none", backend="triton")
    want = 2 * 3.0 * torch.arange(1, 9, device="cuda", dtype=torch.float32)
    for retain in (True, False):  # out of place, then in place
        (grad,) = torch.autograd.grad(loss, x_hat, weight, retain_graph=retain)
        assert_close(grad[-1, -8:].float(), want, dtype=torch.bfloat16)
        assert not grad[:-1].any() and not grad[-1, :-8].any()
        del grad
