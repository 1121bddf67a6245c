"""The fused discretized mixture of logistics against its reference, the reference against an exact port; sampling."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastvae.functional import discretized_logistic_mixture_nll, sample_discretized_logistic_mixture
from fastvae.nn import DiscretizedLogisticMixture
from fastvae.ops.discretized_logistic_mixture import (
    discretized_logistic_mixture_mode,
    discretized_logistic_mixture_nll_reference,
)
from tests.utils import (
    TOLERANCES,
    assert_close,
    compile_for_cuda,
    gradients_up_to_third,
    pick,
    record_kernel_calls,
)

REDUCTIONS = ["none", "sum", "mean"]
EPS32 = 2.0**-24  # float32's unit roundoff


def n_params(channels, num_mixtures):
    return num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def make_params(batch, channels, num_mixtures, spatial, device, dtype=torch.float32, log_scale_low=-4.0):
    """Moderate parameters: logits ~ N(0, 1), means ~ N(0, 0.5), log-scales in (low, 0), coefficients ~ N(0, 1)."""
    m = num_mixtures
    logits = torch.randn(batch, m, *spatial, device=device)
    means = 0.5 * torch.randn(batch, channels * m, *spatial, device=device)
    log_scales = log_scale_low * torch.rand(batch, channels * m, *spatial, device=device)
    coefs = torch.randn(batch, channels * (channels - 1) // 2 * m, *spatial, device=device)
    return torch.cat([logits, means, log_scales, coefs], dim=1).to(dtype).requires_grad_()


def make_images(batch, channels, spatial, num_bits, device, dtype=torch.float32):
    """Images on random levels, the edge levels 0 and max among them, off the grid by up to 0.3 of a step (no ties)."""
    max_level = 2**num_bits - 1
    levels = torch.randint(0, max_level + 1, (batch, channels, *spatial), device=device).float()
    flat = levels.view(-1)
    flat[: flat.numel() // 4] = 0
    flat[flat.numel() // 4 : flat.numel() // 2] = max_level
    levels = levels.view(-1)[torch.randperm(levels.numel(), device=device)].view(levels.shape)
    jitter = 0.6 * torch.rand(levels.shape, device=device) - 0.3
    return ((levels + jitter) / max_level).clamp(0, 1).to(dtype)


def check_against_reference(params, x, num_mixtures, num_bits=8, reduction="none", grad_loss=None, grad_atol=1e-5):
    """Forward and backward through the kernels against the reference; a grad_output that is not all ones.

    float32 gradients must agree within ``grad_atol`` times the largest of them.
    """
    loss = discretized_logistic_mixture_nll(
        params, x, num_mixtures=num_mixtures, num_bits=num_bits, reduction=reduction, backend="triton"
    )
    want = discretized_logistic_mixture_nll_reference(params, x, num_mixtures, num_bits, reduction)
    assert "fastvae" in type(loss.grad_fn).__name__  # the kernels ran, not the reference
    assert loss.shape == want.shape and loss.dtype == torch.float32
    # The nll sums same-signed terms: float32 relative accuracy, per sample.
    assert_close(loss, want, rtol=2e-5, atol=1e-4)
    grad_loss = torch.rand_like(loss) + 0.5 if grad_loss is None else grad_loss
    (got,) = torch.autograd.grad(loss, params, grad_loss)
    (expected,) = torch.autograd.grad(want, params, grad_loss)
    assert got.shape == params.shape and got.dtype == params.dtype
    tol = dict(TOLERANCES[params.dtype])
    if params.dtype == torch.float32:
        # The same float32 math by other formulas: with scales down to e^-4 the gradients agree to ~1e-6 of their size.
        tol = dict(rtol=1e-4, atol=grad_atol * max(expected.abs().max().item(), 1.0))
    assert_close(got, expected, **tol)
    return loss, got


# ---- an exact port of the math, for the reference -----------------------------------------------------


def exact_nll(params, x, num_mixtures, num_bits):
    """The per-sample nll in 60-digit arithmetic (mpmath), written from the formulas alone.

    Per pixel ``p = sum_m softmax(l)_m prod_c (F(y + h) - F(y - h))``, each
    bin's mass a difference of the two CDFs, or of the two upper tails where
    the bin lies above the mean (so that nothing cancels at 60 digits); then
    ``nll = -sum log p``. Shares no code with the reference.
    """
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp
    m_count, batch, channels = num_mixtures, x.shape[0], x.shape[1]
    max_level = 2**num_bits - 1
    p = params.detach().double().reshape(batch, params.shape[1], -1).tolist()
    xs = x.detach().double().reshape(batch, channels, -1).tolist()
    out = []
    with mpmath.workdps(60):
        h = mp.mpf(1) / max_level

        def sigmoid(t):
            return 1 / (1 + mp.exp(-t))

        for b in range(batch):
            total = mp.mpf(0)
            for n in range(len(xs[b][0])):
                levels = [min(max(round(xs[b][c][n] * max_level), 0), max_level) for c in range(channels)]
                y = [mp.mpf(2 * k) / max_level - 1 for k in levels]
                logits = [mp.mpf(p[b][m][n]) for m in range(m_count)]
                weights = [mp.exp(v) for v in logits]
                prob = mp.mpf(0)
                for m in range(m_count):
                    term = weights[m] / sum(weights)
                    for c in range(channels):
                        mean = mp.mpf(p[b][m_count * (1 + c) + m][n])
                        for j in range(c):
                            coef = mp.mpf(p[b][m_count * (1 + 2 * channels + c * (c - 1) // 2 + j) + m][n])
                            mean += mp.tanh(coef) * y[j]
                        inv = mp.exp(-max(mp.mpf(p[b][m_count * (1 + channels + c) + m][n]), -7))
                        lo, hi = inv * (y[c] - h - mean), inv * (y[c] + h - mean)
                        lower_open, upper_open = levels[c] == 0, levels[c] == max_level
                        if lo > 0:  # above the mean: upper tails 1 - F = F(-t)
                            mass = (1 if lower_open else sigmoid(-lo)) - (0 if upper_open else sigmoid(-hi))
                        else:
                            mass = (1 if upper_open else sigmoid(hi)) - (0 if lower_open else sigmoid(lo))
                        term *= mass
                    prob += term
                total -= mp.log(prob)
            out.append(float(total))
    return torch.tensor(out, dtype=torch.float64)


def roundoff_bound(params, x, num_mixtures, num_bits):
    """Per sample: what float32 rounding of ``a`` and ``b`` can move the nll by (|dL/da|, |dL/db| <= 1 each).

    ``a = inv (y - h - mean)`` is formed from float32 values of size up to
    ``|y| + h + |mean|`` and scaled by ``inv``: a few roundings of that, times
    ``inv``, is the accuracy any float32 evaluation has, per channel.
    """
    batch, channels = x.shape[:2]
    m = num_mixtures
    p = params.detach().double().reshape(batch, params.shape[1], -1)
    means = p[:, m : m + channels * m].unflatten(1, (channels, m))
    inv = torch.exp(-p[:, m + channels * m : m + 2 * channels * m].unflatten(1, (channels, m)).clamp(min=-7))
    coefs = p[:, None, m + 2 * channels * m :].abs().sum(dim=2, keepdim=True) if channels > 1 else 0
    size = inv * (2 + means.abs() + coefs)
    return 8 * EPS32 * size.amax(dim=2).sum(dim=(1, 2))


EXACT_CASES = {
    "C=1 M=1 5 bits": (1, 1, 5),
    "C=1 M=3 8 bits": (1, 3, 8),
    "C=3 M=1 8 bits": (3, 1, 8),
    "C=3 M=3 5 bits": (3, 3, 5),
}


@pytest.mark.parametrize("case", EXACT_CASES.values(), ids=EXACT_CASES.keys())
def test_reference_matches_an_exact_port(case):
    channels, m, bits = case
    params = make_params(3, channels, m, (2, 3), "cpu", torch.float64)
    x = make_images(3, channels, (2, 3), bits, "cpu", torch.float64)
    want = exact_nll(params, x, m, bits)
    assert_close(discretized_logistic_mixture_nll_reference(params, x, m, bits), want, rtol=1e-12, atol=1e-12)


EXTREME_LOG_SCALES = (-30.0, -7.5, -7.0, -7.0, -6.99, -3.0, 0.0, 5.0, 30.0)
EXTREME_MEANS = (-1e3, -30.0, -3.0, -1.0, 0.0, 0.4, 1.0, 3.0, 30.0, 1e3)


def extreme_params(channels, num_mixtures, num_bits, device, log_scales=EXTREME_LOG_SCALES, means=EXTREME_MEANS):
    """One pixel per sample (params ``(B, P)``, no spatial dims) at the places the formulas switch or strain.

    By default log-scales below, at and just above the clamp at -7 and large;
    means inside [-1, 1] and far outside it (masses down to e^-1e6); the edge
    levels 0 and max and interior ones; component 0 moderate, the others extreme.
    """
    max_level = 2**num_bits - 1
    levels = [0, 1, max_level // 2, max_level - 1, max_level]
    rows, images = [], []
    for i, (s, mean, level) in enumerate(
        (s, mean, level) for s in log_scales for mean in means for level in levels
    ):
        m = num_mixtures
        row = torch.zeros(n_params(channels, m), dtype=torch.float64)
        row[:m] = torch.linspace(0.5, -0.5, m)
        row[m : m + channels * m] = 0.1
        row[m + channels * m : m + 2 * channels * m] = -2.0
        for c in range(channels):
            row[m + c * m + 1 : m + (c + 1) * m] = mean + 0.01 * c  # components 1.. are extreme
            row[m + channels * m + c * m + 1 : m + channels * m + (c + 1) * m] = s
        row[m + 2 * channels * m :] = 0.3
        if m == 1:  # a single component is the extreme one
            row[m : m + channels * m] = mean
            row[m + channels * m : m + 2 * channels * m] = s
        rows.append(row)
        images.append(torch.tensor([(level + (i % 3 - 1) * 0.2) / max_level] * channels).clamp(0, 1))
    params = torch.stack(rows).to(device=device)
    return params, torch.stack(images).to(device=device, dtype=torch.float64)


@pytest.mark.parametrize("case", [(1, 1, 8), (3, 2, 8), (3, 1, 5), (1, 3, 5)], ids=str)
def test_tiny_scales_and_far_means_against_the_exact_value(device, case):
    channels, m, bits = case
    params64, x64 = extreme_params(channels, m, bits, device)
    params, x = params64.float().requires_grad_(), x64.float()
    loss = discretized_logistic_mixture_nll(params, x, num_mixtures=m, num_bits=bits, backend="triton")
    exact = exact_nll(params.double(), x.double(), m, bits).to(device)
    err = (loss.double() - exact).abs()
    bound = 1e-6 * exact.abs() + roundoff_bound(params, x, m, bits) + 1e-6
    if m == 1:  # (with more, component 0 keeps the mixture's mass moderate)
        assert exact.max() > 1e5 and exact.min() < 1  # masses from about 1 down to e^-1e5 and below
    assert (err <= bound).all(), (err / bound).max()
    # Finite gradients everywhere, equal to the float64 reference's within float32's conditioning.
    (grad,) = torch.autograd.grad(loss.sum(), params)
    assert torch.isfinite(grad).all()
    p64 = params.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(discretized_logistic_mixture_nll_reference(p64, x.double(), m, bits).sum(), p64)
    scale = want.abs().amax(dim=1, keepdim=True)
    inv_max = torch.exp(-params.detach().double().clamp(min=-7)).amax(dim=1, keepdim=True)
    assert ((grad.double() - want).abs() <= 1e-4 * scale + 64 * EPS32 * inv_max * scale + 1e-6).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_log_scale_clamp_passes_the_gradient_at_minus_seven(device, channels):
    m = 2
    params = make_params(4, channels, m, (3,), device)
    x = make_images(4, channels, (3,), 8, device)
    with torch.no_grad():
        scales = params[:, m + channels * m : m + 2 * channels * m]
        scales[0] = -7.0
        scales[1] = -7.25
        scales[2] = torch.nextafter(torch.tensor(-7.0), torch.tensor(0.0)).item()
    # At inv = e^7 = 1096, float32 rounding of a and b (~1e-4) moves the gradients by up to ~6e-5 of their size,
    # in the reference's float32 as much as in the kernel's (both against float64).
    loss, grad = check_against_reference(params, x, m, grad_atol=3e-4)
    scale_grads = grad[:, m + channels * m : m + 2 * channels * m]
    assert (scale_grads[0] != 0).any() and (scale_grads[1] == 0).all()


def wide_log_scales(num_bits):
    """Log-scales at, just below and just above every place where the bin's ``log(1 - e^u)``, ``u = -2 h e^-s``,
    changes form or strains as the scale grows: ``u = -log 2`` and ``u = -1e-3`` (the formulas switch there),
    ``|u|`` of half an ulp below 1 in float32 and in float64 (``e^u`` rounds to 1); then wider: 12.5, 13 and 32.6
    (where the reference's gradient used to be NaN), 50 (the no-NaN promise's widest), 88 and 100 (``e^-s``
    subnormal in float32) and 120 (``e^-s`` is 0 in float32). Only those above the clamp at -7."""
    log_2h = math.log(2 / (2**num_bits - 1))
    switches = [log_2h - math.log(u) for u in (math.log(2), 1e-3, 2.0**-25, 2.0**-54)]
    near = [s + d for s in switches for d in (-0.01, 0.0, 0.01)]
    return [s for s in near + [12.5, 13.0, 32.6, 50.0, 88.0, 100.0, 120.0] if s > -7]


# numpy, under the interpreter: a form the kernel's where() does not take, at u = 0 (e^-s underflowed)
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("num_bits", [8, 16])
@pytest.mark.parametrize("case", [(1, 1), (3, 2)], ids=["C=1 M=1", "C=3 M=2"])
def test_wide_scales_give_finite_gradients_of_every_order_on_both_paths(device, case, num_bits):
    """Wide logistics, on every level (the edge ones too): the value against the exact one, the gradient against
    the float64 reference's, and finite Hessian- and third-derivative-vector products on both paths."""
    channels, m = case
    params64, x64 = extreme_params(channels, m, num_bits, device, log_scales=wide_log_scales(num_bits),
                                   means=(-3.0, 0.0, 0.4, 30.0))
    params, x = params64.float().requires_grad_(), x64.float()
    exact = exact_nll(params.double(), x.double(), m, num_bits).to(device)
    bound = 1e-6 * exact.abs() + roundoff_bound(params, x, m, num_bits) + 1e-6
    p64 = params.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(discretized_logistic_mixture_nll_reference(p64, x.double(), m, num_bits).sum(), p64)
    assert torch.isfinite(want).all()
    scale = want.abs().amax(dim=1, keepdim=True)
    inv_max = torch.exp(-params.detach().double().clamp(min=-7)).amax(dim=1, keepdim=True)
    directions = [torch.randn_like(params)]
    for backend in ("triton", "torch"):
        loss = discretized_logistic_mixture_nll(params, x, num_mixtures=m, num_bits=num_bits, backend=backend)
        assert ((loss.double() - exact).abs() <= bound).all(), backend
        (grad,) = torch.autograd.grad(loss.sum(), params, retain_graph=True)
        assert ((grad.double() - want).abs() <= 1e-4 * scale + 64 * EPS32 * inv_max * scale + 1e-6).all(), backend
        # create_graph=True: the Triton path differentiates the reference, at every order.
        for order, (found,) in enumerate(gradients_up_to_third(loss.sum(), [params], None, directions), start=1):
            assert torch.isfinite(found).all(), f"{backend}, order {order}"


def test_reference_gradcheck_and_gradgradcheck_at_wide_scales():
    """float64 finite differences of the reference's first and second derivatives where the formulas switch."""
    for bits in (8, 16):
        params, x = extreme_params(1, 1, bits, "cpu", log_scales=wide_log_scales(bits), means=(0.0, 0.4))
        params.requires_grad_()

        def nll(p):
            return discretized_logistic_mixture_nll_reference(p, x, 1, bits)

        assert torch.autograd.gradcheck(nll, (params,))
        assert torch.autograd.gradgradcheck(nll, (params,), fast_mode=True)


# ---- the kernels against the reference -----------------------------------------------------------------

MIXTURES = {"C=1 M=1": (1, 1), "C=1 M=5": (1, 5), "C=3 M=1": (3, 1), "C=3 M=3": (3, 3), "C=3 M=10": (3, 10)}


@pytest.mark.parametrize("num_bits", [5, 8])
@pytest.mark.parametrize("mixture", MIXTURES.values(), ids=MIXTURES.keys())
def test_matches_reference(device, mixture, num_bits):
    channels, m = mixture
    spatial = (pick(device, 3, 32), pick(device, 5, 33))
    params = make_params(pick(device, 3, 16), channels, m, spatial, device)
    x = make_images(params.shape[0], channels, spatial, num_bits, device)
    check_against_reference(params, x, m, num_bits)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(device, reduction):
    params = make_params(pick(device, 5, 64), 3, 2, (pick(device, 4, 32),), device)
    x = make_images(params.shape[0], 3, params.shape[2:], 8, device)
    check_against_reference(params, x, 2, 8, reduction)


SHAPES = {
    "no spatial dims": lambda dev: (pick(dev, 7, 3000), ()),
    "one spatial dim": lambda dev: (pick(dev, 2, 8), (pick(dev, 11, 2049),)),
    "three spatial dims": lambda dev: (2, (2, 3, pick(dev, 4, 40))),
    "batch of one, many pixels": lambda dev: (1, (pick(dev, 20, 256), pick(dev, 17, 256))),
    "many samples of few pixels": lambda dev: (pick(dev, 70, 5000), (2,)),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shapes(device, shape):
    batch, spatial = shape(device)
    params = make_params(batch, 3, 2, spatial, device)
    x = make_images(batch, 3, spatial, 8, device)
    check_against_reference(params, x, 2, 8, "none")


def test_tiles_are_shaped_to_leave_the_fewest_pixels_past_the_ends():
    from fastvae.kernels import discretized_logistic_mixture as kernels

    def slots(tiling, batch, n_cols):
        return math.ceil(batch / tiling.block_rows) * tiling.block_rows * math.ceil(n_cols / tiling.block_cols) * (
            tiling.block_cols
        )

    # 784 = 49 x 16 pixels: tiles 16 pixels wide cover MNIST exactly (512 wide would run 1,024 slots a sample).
    tiling = kernels.plan(128, 784, 1, "cpu")
    assert slots(tiling, 128, 784) == 128 * 784 and tiling.block_rows * tiling.block_cols == kernels.tile_pixels(1)
    # Where every shape fits, the widest: a sample's pixels in a row.
    tiling = kernels.plan(64, 1024, 3, "cpu")
    assert (tiling.block_rows, tiling.block_cols) == (1, kernels.tile_pixels(3))
    # Any shape: the fewest slots of the tiles plan_rows offers 16 pixels wide or more (as wide as a sample).
    for batch, n_cols, channels in [(100, 20, 1), (128, 49, 1), (3, 25, 3), (64, 300, 3), (5, 2000, 1)]:
        tiling = kernels.plan(batch, n_cols, channels, "cpu")
        offered = [
            kernels.launch.plan_rows(batch, n_cols, torch.device("cpu"), min_block_rows=2**k,
                                     block_elements=kernels.tile_pixels(channels))
            for k in range(12)
        ]
        wide = [t for t in offered if t.block_cols >= min(16, n_cols)]
        assert tiling.block_cols >= min(16, n_cols)
        assert slots(tiling, batch, n_cols) == min(slots(t, batch, n_cols) for t in wide)
    # Samples of one pixel (no spatial dims): tiles of samples.
    assert kernels.plan(1000, 1, 3, "cpu").block_cols == 1


def test_results_do_not_depend_on_tiling(device, monkeypatch):
    from fastvae.kernels import discretized_logistic_mixture as kernels
    from fastvae.kernels import launch

    # Tiny tiles and many programs: several row tiles, column splits and loop trips even at small sizes.
    monkeypatch.setattr(kernels, "tile_pixels", lambda channels: 4)
    monkeypatch.setattr(launch, "target_programs", lambda device: 6)
    for batch, spatial in [(3, (2, 5)), (1, (24,)), (5, ())]:
        params = make_params(batch, 3, 3, spatial, device)
        x = make_images(batch, 3, spatial, 8, device)
        tiling = kernels.plan(batch, math.prod(spatial), 3, device)
        assert tiling.n_splits > 1 or tiling.row_tiles > 1
        check_against_reference(params, x, 3, 8, "none")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, "same"], ids=["f32 images", "same dtype"])
def test_half_precision(device, dtype, x_dtype):
    spatial = (pick(device, 3, 32), pick(device, 4, 32))
    params = make_params(pick(device, 3, 16), 3, 3, spatial, device, dtype)
    # Images on the level grid of 5 bits: representable in either half dtype.
    max_level = 31
    levels = torch.randint(0, max_level + 1, (params.shape[0], 3, *spatial), device=device)
    x = (levels / max_level).to(dtype if x_dtype == "same" else x_dtype)
    check_against_reference(params, x, 3, 5, "mean")
    check_against_reference(params, x, 3, 5, "none")  # per-sample upstream weights


@pytest.fixture
def kernel_args(monkeypatch):
    """Records the arguments of every forward kernel launch."""
    from fastvae.kernels import discretized_logistic_mixture as kernels

    calls = []
    kernel = kernels._dmol_forward_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append((args, kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "_dmol_forward_kernel", Spy())
    return calls


@pytest.mark.parametrize("layout", ["channel slice", "channels last", "batch slice"])
def test_non_contiguous_params_are_read_in_place(device, layout, kernel_args):
    b, m, h, w = 3, 2, 4, 5
    p = n_params(3, m)
    if layout == "channel slice":  # channels of a larger conv output
        conv_out = torch.randn(b, p + 7, h, w, device=device, requires_grad=True)
        params = conv_out[:, 4 : 4 + p]
    elif layout == "channels last":
        conv_out = make_params(b, 3, m, (h, w), device).detach().to(memory_format=torch.channels_last)
        params = conv_out.requires_grad_()
    else:
        conv_out = torch.randn(2 * b, p, h, w, device=device, requires_grad=True)
        params = conv_out[::2]
    assert not params.is_contiguous()
    x = make_images(b, 6, (h, w), 8, device)[:, ::2]  # every other channel: x strided too
    check_against_reference(params, x, m)
    (args, _), *_ = kernel_args
    params_arg, x_arg = args[0], args[1]
    assert params_arg.data_ptr() == params.data_ptr()  # a view of params' memory: no copy was made
    assert params_arg.untyped_storage().data_ptr() == params.untyped_storage().data_ptr()
    assert x_arg.data_ptr() == x.data_ptr()
    if layout == "channel slice":  # the gradient lands in the slice of the larger tensor
        loss = discretized_logistic_mixture_nll(params, x, num_mixtures=m, reduction="sum", backend="triton")
        (grad,) = torch.autograd.grad(loss, conv_out)
        assert (grad[:, :4] == 0).all() and (grad[:, 4 + p :] == 0).all() and (grad[:, 4 : 4 + p] != 0).any()


@pytest.fixture
def backward_calls(monkeypatch):
    """Records the forward's outputs and every launch of the scaling kernel: ``("in place" or "new", shape, weights)``."""
    from fastvae.kernels import discretized_logistic_mixture as kernels

    return record_kernel_calls(monkeypatch, kernels, "discretized_logistic_mixture_forward")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none then sum"])
def test_backward_hands_over_the_forward_gradient(device, reduction, backward_calls):
    """``loss.backward()``: the gradient is the forward's own buffer, and weights of exactly 1 leave it as it is."""
    params = make_params(pick(device, 3, 16), 3, 2, (pick(device, 3, 32), 5), device)
    x = make_images(params.shape[0], 3, params.shape[2:], 8, device)
    op = "none" if reduction == "none then sum" else reduction
    loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=op, backend="triton").sum()
    want = discretized_logistic_mixture_nll_reference(params, x, 2, 8, op).sum()
    (grad,) = torch.autograd.grad(loss, params)
    (_, forward_grad), = backward_calls["outputs"]
    assert grad.data_ptr() == forward_grad.data_ptr()  # handed over, no copy
    assert [how for how, *_ in backward_calls["scale"]] == ["in place"]
    assert all(bool((weight == 1).all()) for *_, weight in backward_calls["scale"])
    (expected,) = torch.autograd.grad(want, params)
    assert_close(grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_weights_not_all_ones_and_exactly_one_for_some_rows(device, reduction):
    """Per-sample weights with exact 1s: those samples skip the in-place scaling, the others must not."""
    params = make_params(6, 3, 2, (3, 2), device)
    x = make_images(6, 3, (3, 2), 8, device)
    if reduction == "none":
        weights = torch.tensor([1.0, 0.25, 1.0, -2.0, 0.0, 1.0], device=device)
    else:
        weights = torch.tensor(-0.75, device=device)
    _, grad = check_against_reference(params, x, 2, 8, reduction, grad_loss=weights)  # the buffer's owner: in place
    if reduction == "none":
        assert (grad[4] == 0).all()
    # A retained graph scales out of place, and so does the backward after it.
    loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend="triton")
    for retain in (True, False):
        (again,) = torch.autograd.grad(loss, params, weights, retain_graph=retain)
        assert torch.equal(again, grad)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradients_never_share_memory(device, reduction, backward_calls):
    """Two backwards of a retained graph get two buffers; the saved gradient stays intact for the last one."""
    params = make_params(4, 3, 2, (2, 3), device)
    x = make_images(4, 3, (2, 3), 8, device)
    loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend="triton")
    grad_loss = torch.ones_like(loss)
    (first,) = torch.autograd.grad(loss, params, grad_loss, retain_graph=True)
    (second,) = torch.autograd.grad(loss, params, grad_loss, retain_graph=True)
    assert {how for how, *_ in backward_calls["scale"]} == {"new"}  # the graph is kept: out of place
    (_, saved), = backward_calls["outputs"]
    assert len({first.data_ptr(), second.data_ptr(), saved.data_ptr()}) == 3
    expected = first.clone()
    second.mul_(10)
    assert torch.equal(first, expected)
    loss.backward(grad_loss, retain_graph=True)
    loss.backward(grad_loss)  # the last one owns the saved gradient: handed over in place
    assert backward_calls["scale"][-1][0] == "in place"
    assert_close(params.grad, 2 * expected)


def test_gradient_written_only_when_asked(device, kernel_args):
    params = make_params(2, 1, 2, (3,), device)
    x = make_images(2, 1, (3,), 8, device)
    with torch.no_grad():
        loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, backend="triton")
    assert loss.grad_fn is None
    discretized_logistic_mixture_nll(params.detach(), x, num_mixtures=2, backend="triton")
    discretized_logistic_mixture_nll(params, x, num_mixtures=2, backend="triton")
    assert [kwargs["WRITE_GRAD"] for _, kwargs in kernel_args] == [False, False, True]
    _, per_sample, grad = torch.ops.fastvae.discretized_logistic_mixture_nll(params.detach(), x, 2, 8, "sum", False)
    assert grad.numel() == 0 and per_sample.shape == (2,)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_leaves_the_saved_gradient_and_inputs_unchanged(device, reduction):
    params = make_params(3, 3, 2, (2, 2), device)
    x = make_images(3, 3, (2, 2), 8, device)
    before = params.detach().clone(), x.clone()
    loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend="triton")
    grad_loss = torch.rand_like(loss) + 0.5
    first = torch.autograd.grad(loss, params, grad_loss, retain_graph=True)[0]
    second = torch.autograd.grad(loss, params, grad_loss, retain_graph=True)[0]
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()
    loss.backward(grad_loss, retain_graph=True)
    loss.backward(grad_loss)
    assert_close(params.grad, 2 * first)
    assert torch.equal(params.detach(), before[0]) and torch.equal(x, before[1])


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["empty batch", "no pixels"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty(device, shape, reduction):
    params = torch.zeros(shape[0], n_params(3, 2), *shape[2:], device=device, requires_grad=True)
    x = torch.zeros(shape, device=device)
    loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend="triton")
    want = discretized_logistic_mixture_nll_reference(params, x, 2, 8, reduction)
    assert loss.shape == want.shape
    assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, params, torch.ones_like(loss))
    assert grad.shape == params.shape and (grad == 0).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nan_in_input_gives_nan_as_in_reference(device):
    params = make_params(3, 1, 2, (2,), device)
    x = make_images(3, 1, (2,), 8, device)
    with torch.no_grad():
        x[0, 0, 0] = float("nan")
        params[1, 3, 1] = float("nan")  # a log-scale: the clamp at -7 must not swallow it
    loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, backend="triton")
    want = discretized_logistic_mixture_nll_reference(params, x, 2)
    assert torch.isnan(loss[:2]).all() and torch.isnan(want[:2]).all()
    assert_close(loss[2], want[2])


# ---- higher-order gradients and the reference's own -----------------------------------------------------


def test_reference_gradcheck_and_gradgradcheck():
    for channels, m, bits in [(1, 2, 5), (3, 2, 8)]:
        params = make_params(2, channels, m, (1,), "cpu", torch.float64)
        x = make_images(2, channels, (1,), bits, "cpu", torch.float64)
        with torch.no_grad():  # one log-scale below the clamp (zero gradient), away from its kink
            params[0, m + channels * m, 0] = -7.5

        def nll(p):
            return discretized_logistic_mixture_nll_reference(p, x, m, bits)

        assert torch.autograd.gradcheck(nll, (params,))
        assert torch.autograd.gradgradcheck(nll, (params,), fast_mode=True)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_second_order_gradients_through_the_kernels(device, reduction):
    params = make_params(3, 3, 2, (2, 3), device)
    x = make_images(3, 3, (2, 3), 8, device)
    grad_loss = (torch.rand(3, device=device) + 0.5) if reduction == "none" else torch.tensor(1.5, device=device)
    grad_loss.requires_grad_()
    direction = torch.randn_like(params)
    results = []
    for backend in ("triton", "torch"):
        loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend=backend)
        (grad,) = torch.autograd.grad(loss, params, grad_loss, create_graph=True)
        # A Hessian-vector product, and the derivative in the upstream gradient.
        results.append((grad, *torch.autograd.grad((grad * direction).sum(), (params, grad_loss))))
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_per_sample(device, reduction, backend, backward_calls):
    """The nll as without the flag, bit for bit, with its first and second derivatives; beside it the per-sample
    nll, detached; and for ``"mean"``, ``loss.backward()`` scales the saved gradient by exactly 1 (no traffic)."""
    params = make_params(3, 3, 2, (2, 3), device)
    x = make_images(3, 3, (2, 3), 8, device)
    loss, per_sample = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction,
                                                        backend=backend, return_per_sample=True)
    plain = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend=backend)
    assert torch.equal(loss, plain) and not per_sample.requires_grad
    assert_close(per_sample, discretized_logistic_mixture_nll_reference(params, x, 2, 8).detach())
    grad_loss = (torch.rand(3, device=device) + 0.5) if reduction == "none" else torch.tensor(1.5, device=device)
    direction = torch.randn_like(params)
    derivatives = []
    for out in (loss, plain):
        (grad,) = torch.autograd.grad(out, params, grad_loss, create_graph=True)
        derivatives.append((grad, *torch.autograd.grad((grad * direction).sum(), params)))
    for got, want in zip(*derivatives):
        assert torch.equal(got, want)
    if backend == "triton" and reduction == "mean":
        backward_calls["scale"].clear()
        discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction="mean", backend=backend,
                                         return_per_sample=True)[0].backward()
        (how, _, weight), = backward_calls["scale"]
        assert how == "in place" and torch.equal(weight, torch.ones_like(weight))


# ---- no host sync, torch.compile, the custom op --------------------------------------------------------


class SyncDetector(TorchDispatchMode):
    """Records the ATen calls that hand a device value to the host (``.item()``, ``bool()``, ``.tolist()`` of CUDA)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.syncs.append(str(func))
        if func in (torch.ops.aten._to_copy.default,) and kwargs.get("device") == torch.device("cpu"):
            if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                self.syncs.append("device-to-host copy")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_host_sync_in_forward_and_backward(device, reduction):
    params = make_params(3, 3, 2, (2, 3), device)
    x = make_images(3, 3, (2, 3), 8, device)
    grad_loss = torch.rand(3 if reduction == "none" else (), device=device)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    detector = SyncDetector()
    try:
        with detector:
            loss = discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend="triton")
            loss.backward(grad_loss)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert detector.syncs == []
    assert params.grad is not None
    with detector:  # the detector sees what it looks for
        bool(loss.sum() > 0) or loss.sum().item()
    assert len(detector.syncs) >= 1


class TinyDecoder(torch.nn.Module):
    def __init__(self, latent=4, pixels=6, channels=3, num_mixtures=2):
        super().__init__()
        self.shape = (n_params(channels, num_mixtures) + 2, pixels)
        self.decode = torch.nn.Linear(latent, math.prod(self.shape))
        self.num_mixtures = num_mixtures

    def forward(self, z, x):
        out = self.decode(z).view(-1, *self.shape)
        params = out[:, 1:-1]  # a channel slice, read in place
        return discretized_logistic_mixture_nll(params, x, num_mixtures=self.num_mixtures, reduction="mean",
                                                backend="triton")


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    model = TinyDecoder().to(device)
    compiled = torch.compile(model, fullgraph=True)
    z, x = torch.randn(5, 4, device=device), make_images(5, 3, (6,), 8, device)
    loss, loss_compiled = model(z, x), compiled(z, x)
    assert_close(loss_compiled, loss)
    for g, g_compiled in zip(torch.autograd.grad(loss, list(model.parameters())),
                             torch.autograd.grad(loss_compiled, list(model.parameters()))):
        assert_close(g_compiled, g)


@pytest.mark.parametrize("reduction, grad", [("none", True), ("sum", True), ("mean", False)])
def test_custom_op_registration(device, reduction, grad):
    """Schema, fake tensors and autograd of the op, by torch's own checker."""
    params = make_params(3, 3, 2, (2,), device).detach().requires_grad_(grad)
    x = make_images(3, 3, (2,), 8, device)
    torch.library.opcheck(torch.ops.fastvae.discretized_logistic_mixture_nll.default,
                          (params, x, 2, 8, reduction, grad))


def _forward_kernel_job(channels, dtype, write_grad):
    """The forward kernel as a launch on contiguous ``params`` specializes it: unit strides are constants."""
    from fastvae.kernels import discretized_logistic_mixture as kernels

    kernel = kernels._dmol_forward_kernel
    floats = ("max_level", "half_width", "log_bin_width", "grad_scale")
    unit_strides = ("stride_params_col", "stride_x_col", "stride_grad_col")
    signature = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("nll_ptr", "x_ptr") else f"*{dtype}"
        elif name.isupper() or name in unit_strides:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name in floats else "i64"
    constexprs = dict(C=channels, WRITE_GRAD=write_grad, BLOCK_ROWS=1, BLOCK_COLS=kernels.tile_pixels(channels))
    constexprs.update({name: 1 for name in unit_strides})
    return kernels.__name__, "_dmol_forward_kernel", signature, constexprs, kernels.NUM_WARPS


def test_kernels_compile_for_a_cuda_target():
    """The interpreter runs code that compiled Triton refuses: compile the variants as a GPU would."""
    jobs = [
        _forward_kernel_job(1, "fp32", True),
        _forward_kernel_job(3, "bf16", True),
        _forward_kernel_job(3, "fp16", False),
    ]
    compile_for_cuda(jobs)


# ---- memory kept for the backward ------------------------------------------------------------------------


def kept_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward while ``fn`` runs, and those not of its inputs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memory_kept_for_the_backward(device, dtype):
    """The counts in the byte table of fastvae.kernels.discretized_logistic_mixture, in units of params' size."""
    params = make_params(2, 3, 10, (4, 4), device, dtype)
    x = make_images(2, 3, (4, 4), 8, device)
    unit = params.numel() * params.element_size()
    inputs = {params.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}

    def units(storages, new_only=False):
        return sum(n for ptr, n in storages.items() if not (new_only and ptr in inputs)) / unit

    eager = kept_bytes(lambda: discretized_logistic_mixture_nll_reference(params, x, 10))
    fused = kept_bytes(lambda: discretized_logistic_mixture_nll(params, x, num_mixtures=10, backend="triton"))
    x_units = x.numel() * x.element_size() / unit
    # The fused op: its gradient (new) and references to params and x.
    assert units(fused) == pytest.approx(2 + x_units) and units(fused, new_only=True) == 1
    expected_eager = {torch.float32: (3.73, 2.73), torch.bfloat16: (7.46, 7.46)}[dtype]
    assert (units(eager), units(eager, new_only=True)) == pytest.approx(expected_eager, abs=0.005)


class BytesMoved(TorchDispatchMode):
    """Bytes each ATen call reads and writes: its tensor inputs and outputs once each; views and scalars free."""

    VIEWS = {"view", "_unsafe_view", "split_with_sizes", "slice", "select", "expand", "unsqueeze", "squeeze",
             "permute", "transpose", "t", "alias", "detach", "as_strided", "unbind", "_reshape_alias"}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in self.VIEWS:
            tensors = [t for t in torch.utils._pytree.tree_flatten((args, kwargs, out))[0]
                       if isinstance(t, torch.Tensor) and t.numel() > 1]
            self.total += sum(t.numel() * t.element_size() for t in tensors)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bytes_the_eager_reference_moves(dtype):
    """The eager counts in the byte table of fastvae.kernels.discretized_logistic_mixture."""
    params = make_params(4, 3, 10, (8, 8), "cpu", dtype)
    x = make_images(4, 3, (8, 8), 8, "cpu")
    unit = params.numel() * params.element_size()
    forward, backward = BytesMoved(), BytesMoved()
    with forward:
        loss = discretized_logistic_mixture_nll_reference(params, x, 10, 8, "mean")
    with backward:
        loss.backward()
    expected = {torch.float32: (22.25, 36.96), torch.bfloat16: (47.49, 76.91)}[dtype]
    assert (forward.total / unit, backward.total / unit) == pytest.approx(expected, abs=0.01)


# ---- bad input --------------------------------------------------------------------------------------------

P3 = n_params(3, 2)
BAD_INPUTS = {
    "wrong P": ((torch.zeros(2, 21, 4), torch.zeros(2, 3, 4)), {}, ValueError, "needs P = .* = 20"),
    "trailing dims differ": ((torch.zeros(2, P3, 4), torch.zeros(2, 3, 5)), {}, ValueError, "params must have"),
    "batch differs": ((torch.zeros(3, P3, 4), torch.zeros(2, 3, 4)), {}, ValueError, "params must have"),
    "x without channels dim": ((torch.zeros(2, 3), torch.zeros(2)), {"num_mixtures": 1}, ValueError, "x must"),
    "num_bits 0": ((torch.zeros(2, P3), torch.zeros(2, 3)), {"num_bits": 0}, ValueError, "num_bits"),
    "num_bits 17": ((torch.zeros(2, P3), torch.zeros(2, 3)), {"num_bits": 17}, ValueError, "num_bits"),
    "num_bits float": ((torch.zeros(2, P3), torch.zeros(2, 3)), {"num_bits": 8.0}, TypeError, "num_bits"),
    "num_mixtures 0": ((torch.zeros(2, P3), torch.zeros(2, 3)), {"num_mixtures": 0}, ValueError, "num_mixtures"),
    "num_mixtures bool": ((torch.zeros(2, P3), torch.zeros(2, 3)), {"num_mixtures": True}, TypeError,
                          "num_mixtures"),
    "integer params": ((torch.zeros(2, P3, dtype=torch.int32), torch.zeros(2, 3)), {}, TypeError, "params"),
    "integer x": ((torch.zeros(2, P3), torch.zeros(2, 3, dtype=torch.uint8)), {}, TypeError, "x must"),
    "params not a tensor": (([[0.0]], torch.zeros(1, 1)), {}, TypeError, "params"),
    "devices differ": ((torch.zeros(2, P3), torch.zeros(2, 3, device="meta")), {}, ValueError, "x is on meta"),
    "reduction": ((torch.zeros(2, P3), torch.zeros(2, 3)), {"reduction": "batchmean"}, ValueError, "reduction"),
    "return_per_sample": ((torch.zeros(2, P3), torch.zeros(2, 3)), {"return_per_sample": "yes"}, TypeError,
                          "return_per_sample"),
    "float64 on triton": ((torch.zeros(2, P3, dtype=torch.float64), torch.zeros(2, 3)), {"backend": "triton"},
                          TypeError, "params"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(case):
    args, kwargs, error, message = case
    kwargs = {"num_mixtures": 2, **kwargs}
    with pytest.raises(error, match=message):
        discretized_logistic_mixture_nll(*args, **kwargs)


def levels_read_back(dtype, num_bits):
    """Whether every level ``k / (2^b - 1)``, rounded to ``dtype``, is read back as ``k`` (as both paths read x)."""
    max_level = 2**num_bits - 1
    k = torch.arange(max_level + 1, dtype=torch.float64)
    read = torch.round((k / max_level).to(dtype).float() * max_level)
    return torch.equal(read.double(), k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_x_in_a_dtype_too_coarse_for_its_levels_is_refused(device, dtype):
    """bfloat16 holds the levels of up to 8 bits apart, float16 those of up to 11: beyond that, x is refused on
    both paths (it would be scored as other images), and up to it, it is read exactly."""
    from fastvae.ops.discretized_logistic_mixture import MAX_BITS_OF_X

    limit = MAX_BITS_OF_X[dtype]
    assert limit == {torch.bfloat16: 8, torch.float16: 11}[dtype]
    assert levels_read_back(dtype, limit) and not levels_read_back(dtype, limit + 1)
    params = make_params(2, 1, 2, (3,), device)
    for backend in ("triton", "torch"):
        x = make_images(2, 1, (3,), limit, device)
        levels = (x * (2**limit - 1)).round() / (2**limit - 1)  # on the grid, then in dtype: exact
        got = discretized_logistic_mixture_nll(params, levels.to(dtype), num_mixtures=2, num_bits=limit,
                                               backend=backend)
        assert torch.equal(got, discretized_logistic_mixture_nll(params, levels, num_mixtures=2, num_bits=limit,
                                                                 backend=backend))
        with pytest.raises(ValueError, match=f"x is {str(dtype)[6:]}, which cannot hold the {2**(limit + 1)} "
                                             f"levels of num_bits={limit + 1} apart .* float32"):
            discretized_logistic_mixture_nll(params, levels.to(dtype), num_mixtures=2, num_bits=limit + 1,
                                             backend=backend)


def test_bad_input_to_the_sampler():
    with pytest.raises(ValueError, match="params has 7 channels.*30 for C = 3"):
        sample_discretized_logistic_mixture(torch.zeros(2, 7, 3), num_mixtures=3)
    with pytest.raises(TypeError, match="generator"):
        sample_discretized_logistic_mixture(torch.zeros(2, 3, 3), num_mixtures=1, generator=0)
    with pytest.raises(ValueError, match="num_bits"):
        discretized_logistic_mixture_mode(torch.zeros(2, 3, 3), num_mixtures=1, num_bits=20)


def test_sampler_and_mode_check_the_image_channels_when_given():
    """30 channels are RGB at M = 3 or greyscale at M = 10: channels= says which, and a mismatch is an error."""
    params = torch.randn(2, 30, 4)
    for draw in (sample_discretized_logistic_mixture, discretized_logistic_mixture_mode):
        assert draw(params, num_mixtures=3, channels=3).shape == (2, 3, 4)
        assert draw(params, num_mixtures=10, channels=1).shape == (2, 1, 4)
        assert draw(params, num_mixtures=10).shape == (2, 1, 4)  # without channels=, C follows from P and M
        with pytest.raises(ValueError, match="params has 30 channels, but num_mixtures=10 with channels=3 needs .* 100"):
            draw(params, num_mixtures=10, channels=3)
        with pytest.raises(ValueError, match="params has 30 channels, but num_mixtures=3 with channels=1 needs .* 9"):
            draw(params, num_mixtures=3, channels=1)
        with pytest.raises(ValueError, match="channels must be at least 1, got 0"):
            draw(params, num_mixtures=3, channels=0)
        for bad in ("3", 3.0, True):
            with pytest.raises(TypeError, match="channels must be an int"):
                draw(params, num_mixtures=3, channels=bad)


def test_auto_backend_runs_the_reference_on_cpu():
    params = make_params(2, 1, 1, (3,), "cpu")
    loss = discretized_logistic_mixture_nll(params, make_images(2, 1, (3,), 8, "cpu"), num_mixtures=1)
    assert "fastvae" not in type(loss.grad_fn).__name__


# ---- sampling -----------------------------------------------------------------------------------------------


def one_component(mean, log_scale, channels=1, pixels=1, coefs=0.0):
    """``params`` ``(1, P, pixels)`` of one component with these means, log-scales and raw coefficients."""
    pairs = channels * (channels - 1) // 2
    values = [0.0] + [mean] * channels + [log_scale] * channels + [coefs] * pairs
    return torch.tensor(values, dtype=torch.float64)[None, :, None].expand(1, -1, pixels).contiguous()


def test_sampler_one_component_gives_its_mean():
    bits, max_level = 8, 255
    mean = 2 * 77 / max_level - 1  # on a level, so the discretized logistic is symmetric about it
    params = one_component(mean, -3.0, pixels=20000)
    gen = torch.Generator().manual_seed(0)
    x = sample_discretized_logistic_mixture(params, num_mixtures=1, num_bits=bits, generator=gen)
    assert x.shape == (1, 1, 20000) and x.dtype == torch.float64
    levels = x * max_level
    assert torch.equal(levels, levels.round())  # on the level grid
    y = 2 * x - 1
    std = math.exp(-3.0) * math.pi / math.sqrt(3)  # the logistic's
    assert abs(y.mean().item() - mean) < 4 * std / math.sqrt(20000)
    assert abs(y.std().item() - std) < 0.05 * std


def test_sampler_component_frequencies_follow_the_softmax():
    logits = torch.tensor([0.0, 1.0, -0.5, 2.0], dtype=torch.float64)
    means = torch.tensor([-0.9, -0.3, 0.3, 0.9], dtype=torch.float64)
    n = 40000
    params = torch.cat([logits, means, torch.full((4,), -7.0, dtype=torch.float64)])[None, :, None].expand(1, -1, n)
    x = sample_discretized_logistic_mixture(params, num_mixtures=4, num_bits=8,
                                            generator=torch.Generator().manual_seed(2))  # no flaky 4-sigma miss
    component = ((2 * x - 1)[0, 0, :, None] - means).abs().argmin(dim=1)  # tiny scales: each draw is at its mean
    freq = torch.bincount(component, minlength=4).double() / n
    prob = torch.softmax(logits, 0)
    assert ((freq - prob).abs() < 4 * (prob * (1 - prob) / n).sqrt()).all()


def test_sampler_draws_the_distribution_the_nll_scores():
    """Two channels, the second conditioned on the first, three bits: the histogram of draws against exp(-nll)."""
    bits, max_level, m = 3, 7, 2
    # logits | means of channel 0, of channel 1 | log-scales of channel 0, of channel 1 | coefficients (1, 0).
    # Channel 1 narrow: its level follows from channel 0's level (not from a value inside channel 0's bin).
    column = torch.tensor([0.3, -0.2, -0.4, 0.5, 0.1, -0.3, -1.0, -0.5, -4.0, -3.5, 1.5, -0.8], dtype=torch.float64)
    n = 60000
    params = column[None, :, None].expand(1, -1, n)
    x = sample_discretized_logistic_mixture(params, num_mixtures=m, num_bits=bits,
                                            generator=torch.Generator().manual_seed(1))
    cells = (x[0, 0] * max_level).round().long() * 8 + (x[0, 1] * max_level).round().long()
    freq = torch.bincount(cells, minlength=64).double() / n
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")).reshape(2, 64).T
    nll = discretized_logistic_mixture_nll_reference(column[None, :].expand(64, -1), grid.double() / max_level, m, bits)
    prob = torch.exp(-nll)
    assert_close(prob.sum(), torch.tensor(1.0, dtype=torch.float64))  # the nll is normalised over the levels
    assert ((freq - prob).abs() <= 4 * (prob * (1 - prob) / n).sqrt() + 1e-4).all()


def test_sampler_conditions_later_channels_on_earlier_draws():
    # Channel 0 spread out, channels 1 and 2 with tiny scales: they sit at their conditional means.
    mean, coef = 0.1, 0.7
    params = torch.tensor([0.0, 0.0, mean, -mean, 0.0, -7.0, -7.0, coef, -coef, coef], dtype=torch.float64)
    params = params[None, :, None].expand(2, -1, 500)
    x = sample_discretized_logistic_mixture(params, num_mixtures=1, num_bits=8)
    y = 2 * x - 1
    t = math.tanh(coef)
    assert y[:, 0].std() > 0.3
    # Half a level, plus the logistic noise at scale e^-7: beyond 0.025 (27 scales) with odds 2 e^-27.4 = 2.5e-12
    # a draw, 5e-9 a run of these 2,000. (At 0.015, 16 scales, one run in 3,500 would fail: seed 13 reached 0.91
    # of it.) Not conditioning on the earlier draws would be off by up to tanh(0.7) = 0.6.
    atol = 1 / 255 + 0.025
    assert_close(y[:, 1], mean + t * y[:, 0], rtol=0, atol=atol)
    assert_close(y[:, 2], -mean - t * y[:, 0] + t * y[:, 1], rtol=0, atol=atol)


def test_sampler_reproducible_with_a_generator_and_on_the_device(device):
    params = make_params(2, 3, 3, (4, 5), device).detach()
    draws = [
        sample_discretized_logistic_mixture(params, num_mixtures=3, generator=torch.Generator(device).manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(*draws) and draws[0].shape == (2, 3, 4, 5) and draws[0].dtype == torch.float32
    assert ((draws[0] >= 0) & (draws[0] <= 1)).all()


def test_mode_is_the_nearest_level_of_the_likeliest_component():
    logits = [0.0, 3.0]
    column = torch.tensor(logits + [-0.5, 0.4, -2.0, -2.0], dtype=torch.float64)
    params = column[None, :, None]
    x = discretized_logistic_mixture_mode(params, num_mixtures=2, num_bits=5)
    assert_close(x, torch.tensor([[[round((0.4 + 1) * 31 / 2) / 31]]], dtype=torch.float64))
    params = torch.tensor([0.0, 2.0, -2.0, 0.0, 0.0, 0.0], dtype=torch.float64)[None, :, None]  # C = 2, M = 1
    x = discretized_logistic_mixture_mode(params, num_mixtures=1, num_bits=8)
    assert_close(x[0, :, 0], torch.tensor([1.0, 0.0], dtype=torch.float64))  # clamped to the edge levels


# ---- the module --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_is_the_op(device, reduction):
    likelihood = DiscretizedLogisticMixture(num_mixtures=3, num_bits=5, reduction=reduction, backend="triton")
    assert likelihood.params_channels(3) == 30 and likelihood.params_channels(1) == 9
    params = make_params(2, 3, 3, (2, 3), device)
    x = make_images(2, 3, (2, 3), 5, device)
    assert_close(likelihood(params, x), discretized_logistic_mixture_nll_reference(params, x, 3, 5, reduction))
    gen = torch.Generator(device).manual_seed(0)
    draw = likelihood.sample(params, generator=gen)
    assert torch.equal(draw, sample_discretized_logistic_mixture(params, num_mixtures=3, num_bits=5,
                                                                 generator=torch.Generator(device).manual_seed(0)))
    assert torch.equal(likelihood.mode(params), discretized_logistic_mixture_mode(params, num_mixtures=3, num_bits=5))
    assert "num_mixtures=3" in repr(likelihood)


def test_module_with_image_channels_checks_them_everywhere():
    likelihood = DiscretizedLogisticMixture(num_mixtures=10, num_bits=5, channels=3)
    assert likelihood.params_channels(3) == 100 and "channels=3" in repr(likelihood)
    with pytest.raises(ValueError, match="is for images of 3 channels, got params_channels\\(1\\)"):
        likelihood.params_channels(1)
    greyscale = torch.randn(2, 30, 4, 4)  # M = 10 greyscale parameters: not this module's
    with pytest.raises(ValueError, match="with channels=3 needs"):
        likelihood.sample(greyscale)
    with pytest.raises(ValueError, match="with channels=3 needs"):
        likelihood.mode(greyscale)
    with pytest.raises(ValueError, match="is for images of 3 channels, got x of shape \\(2, 1, 4, 4\\)"):
        likelihood(greyscale, torch.rand(2, 1, 4, 4))
    params = torch.randn(2, 100, 4, 4)
    assert likelihood.sample(params).shape == likelihood.mode(params).shape == (2, 3, 4, 4)


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_mixtures"):
        DiscretizedLogisticMixture(num_mixtures=0)
    with pytest.raises(ValueError, match="num_bits"):
        DiscretizedLogisticMixture(num_bits=17)
    with pytest.raises(ValueError, match="reduction"):
        DiscretizedLogisticMixture(reduction="avg")
    with pytest.raises(ValueError, match="channels"):
        DiscretizedLogisticMixture().params_channels(0)
