"""reparameterize_kl with a prior, multi-dimensional events and the fused soft and hard clamps, against its
reference, through the Triton kernels; and the N(0, I) path, which must not have moved by a bit."""
import functools
import hashlib
import math

import pytest
import torch

from fastvae.functional import reparameterize_kl
from fastvae.ops.reparameterize_kl import reparameterize_kl_reference, soft_clamp
from tests.utils import TOLERANCES, assert_close, assert_within, gradients_up_to_third, pick, summed_terms


def gaussian(shape, device, dtype=torch.float32, scale=0.5):
    """A mean and a log-variance of ``shape`` that require grad."""
    mu = torch.randn(shape, device=device).to(dtype).requires_grad_()
    logvar = (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    return mu, logvar


def check_against_reference(mu, logvar, eps, *, reduction="none", use_z=True, use_kl=True, **options):
    """Outputs and every input's gradient (random upstream gradients, not all ones) against the reference."""
    z, kl = reparameterize_kl(mu, logvar, eps, reduction=reduction, backend="triton", **options)
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps, reduction, **options)
    assert z.shape == mu.shape and z.dtype == mu.dtype and z.is_contiguous()
    assert kl.shape == kl_ref.shape and kl.dtype == torch.float32
    assert_close(z, z_ref)
    kl_tolerance = dict(rtol=1e-4, atol=1e-4) if mu.dtype == torch.float32 else {}  # sums of many terms
    assert_close(kl, kl_ref, dtype=mu.dtype, **kl_tolerance)
    inputs = [t for t in (mu, logvar, eps, options.get("prior_mu"), options.get("prior_logvar"))
              if t is not None and t.requires_grad]
    grad_z = torch.randn_like(z) if use_z else None
    grad_kl = torch.rand_like(kl) + 0.5 if use_kl else None

    def total(z, kl):
        return sum((out.float() * g).sum() for out, g in ((z, grad_z), (kl, grad_kl)) if g is not None)

    def grads(z, kl):
        return torch.autograd.grad(total(z, kl), inputs, allow_unused=True, materialize_grads=True)

    def prior_terms(t):
        """A prior broadcast over ``mu``: the largest sum of |terms| its gradient adds up (seed 162: a scalar
        ``prior_logvar``'s gradient of 0.59 added 360 terms of total size 96, 1.2e-5 apart on the two paths)."""
        name = next((k for k in ("prior_mu", "prior_logvar") if options.get(k) is t), None)
        if name is None or t.shape == mu.shape:
            return 0.0
        return summed_terms(lambda full: total(*reparameterize_kl_reference(
            mu.detach(), logvar.detach(), eps.detach(), reduction, **{**options, name: full})), t, mu.shape)

    for t, g, w in zip(inputs, grads(z, kl), grads(z_ref, kl_ref)):
        assert g.shape == t.shape and g.dtype == t.dtype
        # Sums over many elements: relative to the largest gradient, or to the terms a broadcast prior's adds up.
        scale = max(1.0, w.abs().max().item(), prior_terms(t))
        assert_close(g, w, atol=TOLERANCES[t.dtype]["atol"] * scale)


# ---- the prior's forms and event_dims --------------------------------------------------------------

B, C, H, W = 3, 4, 5, 6
PRIOR_SHAPES = {  # for mu of shape (B, C, H, W), event_dims=3
    "same shape": (B, C, H, W),
    "per channel and position": (C, H, W),
    "leading 1": (1, C, H, W),
    "per channel": (C, 1, 1),
    "per row": (W,),
    "scalar": (),
    "per sample": (B, 1, 1, 1),
    "per sample and channel": (B, C, 1, 1),
}


@pytest.mark.parametrize("which", ["both", "mu only", "logvar only"])
@pytest.mark.parametrize("prior_shape", PRIOR_SHAPES.values(), ids=PRIOR_SHAPES.keys())
def test_every_prior_form(device, prior_shape, which):
    mu, logvar = gaussian((B, C, H, W), device)
    prior_mu, prior_logvar = gaussian(prior_shape, device)
    options = {"prior_mu": prior_mu if which != "logvar only" else None,
               "prior_logvar": prior_logvar if which != "mu only" else None}
    check_against_reference(mu, logvar, torch.randn_like(mu), event_dims=3, **options)


@pytest.mark.parametrize("event_dims", [1, 2, 3, 4])
@pytest.mark.parametrize("prior", ["none", "same shape", "shared"])
def test_event_dims(device, event_dims, prior):
    shape = (2, 3, 4, 5)
    mu, logvar = gaussian(shape, device)
    options = {}
    if prior != "none":
        prior_shape = shape if prior == "same shape" else shape[len(shape) - event_dims:]
        options["prior_mu"], options["prior_logvar"] = gaussian(prior_shape, device)
    check_against_reference(mu, logvar, torch.randn_like(mu), event_dims=event_dims, **options)
    z, kl = reparameterize_kl(mu, logvar, event_dims=event_dims, backend="triton", **options)
    assert kl.shape == shape[: 4 - event_dims]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtypes_and_mixed_prior_dtype(device, dtype):
    mu, logvar = gaussian((2, 3, 4, 4), device, dtype)
    prior_mu, prior_logvar = gaussian((3, 4, 4), device, torch.bfloat16 if dtype == torch.float32 else torch.float32)
    check_against_reference(mu, logvar, torch.randn(mu.shape, device=device), event_dims=3, prior_mu=prior_mu,
                            prior_logvar=prior_logvar)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("used", ["both", "z only", "kl only"])
def test_reductions_and_unused_outputs(device, reduction, used):
    mu, logvar = gaussian((3, 2, 3, 5), device)
    prior_mu, prior_logvar = gaussian((3, 2, 3, 5), device)
    check_against_reference(mu, logvar, torch.randn_like(mu), reduction=reduction, use_z=used != "kl only",
                            use_kl=used != "z only", event_dims=2, prior_mu=prior_mu, prior_logvar=prior_logvar,
                            logvar_limit=3.0)


def test_shared_prior_over_many_row_tiles_and_column_splits(device):
    """The per-tile column sums of a shared prior's gradient: rows beyond one tile, columns beyond one block."""
    rows, cols = pick(device, (37, 70), (1000, 5000))
    mu, logvar = gaussian((rows, cols), device)
    prior_mu, prior_logvar = gaussian((cols,), device)
    check_against_reference(mu, logvar, torch.randn_like(mu), prior_mu=prior_mu, prior_logvar=prior_logvar)
    rows, cols = pick(device, (3, 4500), (4, 70001))  # few rows, so each row splits into column ranges
    mu, logvar = gaussian((rows, cols), device)
    prior_mu, prior_logvar = gaussian((cols,), device)
    check_against_reference(mu, logvar, torch.randn_like(mu), prior_mu=prior_mu, prior_logvar=prior_logvar)


def test_prior_that_needs_no_gradient(device):
    mu, logvar = gaussian((4, 6), device)
    prior_mu, prior_logvar = torch.randn(4, 6, device=device), torch.randn(6, device=device)
    check_against_reference(mu, logvar, torch.randn_like(mu), prior_mu=prior_mu, prior_logvar=prior_logvar)


@pytest.mark.parametrize("noise", ["given", "drawn"])
def test_outputs_require_grad_exactly_where_the_reference_s_do(device, noise):
    """z depends on mu, logvar and eps; the KL on mu, logvar and the prior: an output requires grad only when an
    input it depends on does (with only the prior requiring grad, z does not), for every subset of inputs."""
    import itertools

    names = ("mu", "logvar", "eps", "prior_mu", "prior_logvar")
    for flags in itertools.product((False, True), repeat=5):
        if noise == "drawn" and flags[2]:
            continue
        tensors = {name: torch.randn(2, 3, device=device).requires_grad_(flag) for name, flag in zip(names, flags)}
        eps = tensors["eps"]
        if noise == "drawn":  # the noise the next call draws
            torch.manual_seed(7)
            eps = reparameterize_kl(torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device),
                                    backend="triton")[0]
            torch.manual_seed(7)
        options = dict(prior_mu=tensors["prior_mu"], prior_logvar=tensors["prior_logvar"], logvar_limit=3.0)
        z, kl = reparameterize_kl(tensors["mu"], tensors["logvar"], eps if noise == "given" else None,
                                  backend="triton", **options)
        z_ref, kl_ref = reparameterize_kl_reference(tensors["mu"], tensors["logvar"], eps, **options)
        assert (z.requires_grad, kl.requires_grad) == (z_ref.requires_grad, kl_ref.requires_grad), flags
        if z.requires_grad or kl.requires_grad:  # and the gradients of what does are those of the reference
            wanted = [t for t in tensors.values() if t.requires_grad]
            outputs = [(o, r) for o, r in ((z, z_ref), (kl, kl_ref)) if o.requires_grad]
            got = torch.autograd.grad(sum(o.sum() for o, _ in outputs), wanted, allow_unused=True,
                                      materialize_grads=True)
            want = torch.autograd.grad(sum(r.sum() for _, r in outputs), wanted, allow_unused=True,
                                       materialize_grads=True)
            for g, w in zip(got, want):
                assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()))


def test_kl_matches_torch_distributions(device):
    mu, logvar = gaussian((3, 2, 4, 4), device, scale=1.0)
    prior_mu, prior_logvar = gaussian((3, 2, 4, 4), device, scale=1.0)
    _, kl = reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=3,
                              backend="triton")
    q = torch.distributions.Normal(mu.detach(), torch.exp(0.5 * logvar.detach()))
    p = torch.distributions.Normal(prior_mu.detach(), torch.exp(0.5 * prior_logvar.detach()))
    want = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert_close(kl, want, rtol=1e-5, atol=1e-4)
    # The N(0, I) prior is the default: the same as passing zeros.
    _, kl_default = reparameterize_kl(mu, logvar, event_dims=3, backend="triton")
    zeros = torch.zeros_like(mu)
    _, kl_zeros = reparameterize_kl(mu, logvar, prior_mu=zeros, prior_logvar=zeros, event_dims=3, backend="triton")
    assert_close(kl_default, kl_zeros)


def test_equal_posterior_and_prior_give_zero_kl_and_zero_gradients(device):
    mu, logvar = gaussian((2, 3, 4), device)
    prior_mu, prior_logvar = (t.detach().clone().requires_grad_() for t in (mu, logvar))
    _, kl = reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=2,
                              logvar_limit=2.0, backend="triton")
    assert_close(kl, torch.zeros_like(kl), atol=1e-6)
    for g in torch.autograd.grad(kl.sum(), (mu, logvar, prior_mu, prior_logvar)):
        assert_close(g, torch.zeros_like(g), atol=1e-6)


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_huge_means_against_a_wide_prior_do_not_overflow(device, backend, create_graph):
    """(mu - prior_mu)^2 overflows float32 where (mu - prior_mu)^2 e^-prior_logvar does not: the KL and its
    gradients are the float64 values (1e3 to 1e5 nats per element here), on both paths, in every backward."""
    mu = torch.tensor([[1e20, -1e20, 3e19, 2.0], [1e19, 1.0, -1e20, 0.0]], device=device, requires_grad=True)
    logvar = torch.zeros_like(mu, requires_grad=True)
    prior_mu = torch.tensor([0.0, 1e19, 0.0, 0.0], device=device, requires_grad=True)
    prior_logvar = torch.tensor([80.0, 80.0, 85.0, 80.0], device=device, requires_grad=True)
    inputs = (mu, logvar, prior_mu, prior_logvar)
    options = dict(prior_mu=prior_mu, prior_logvar=prior_logvar)
    _, kl = reparameterize_kl(mu, logvar, torch.zeros_like(mu), backend=backend, **options)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    _, want = reparameterize_kl_reference(wide[0], wide[1], torch.zeros_like(wide[0]), prior_mu=wide[2],
                                          prior_logvar=wide[3])
    assert want.min() > 1e3 and want.max() < 1e6  # no float32 overflow in the true values
    assert_close(kl.double(), want, rtol=1e-5, atol=0)
    got = torch.autograd.grad(kl.sum(), inputs, create_graph=create_graph)
    for g, w in zip(got, torch.autograd.grad(want.sum(), wide)):
        assert torch.isfinite(g).all()
        assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


# ---- channel slices read in place ----------------------------------------------------------------


class LaunchSpy:
    """Wraps a kernel: records the data pointers of the tensors each launch receives."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append([a.data_ptr() for a in args if isinstance(a, torch.Tensor)])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("event_dims", [1, 2, 3])
def test_channel_slices_of_a_conv_output_are_read_in_place(device, monkeypatch, event_dims):
    """VDVAE's layout: mu and logvar are channel slices of one conv output, beside other channels, and so is a
    conditional prior. The kernels must read them where they lie: no copy, forward or backward."""
    from fastvae.kernels import reparameterize_kl as kernels

    zdim, width = 3, 5
    posterior = torch.randn(2, 2 * zdim, 4, 5, device=device, requires_grad=True)
    prior = torch.randn(2, 2 * zdim + width, 4, 5, device=device, requires_grad=True)
    mu, logvar = posterior.chunk(2, dim=1)
    prior_mu, prior_logvar = prior[:, :zdim], prior[:, zdim : 2 * zdim]
    assert not mu.is_contiguous() and not prior_mu.is_contiguous()
    spies = {name: LaunchSpy(getattr(kernels, name))
             for name in ("_reparameterize_kl_forward_kernel", "_reparameterize_kl_backward_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(kernels, name, spy)
    options = dict(prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=event_dims)
    z, kl = reparameterize_kl(mu, logvar, backend="triton", **options)
    torch.autograd.grad((z * torch.randn_like(z)).sum() + kl.sum(), (posterior, prior))
    inputs = {t.data_ptr() for t in (mu, logvar, prior_mu, prior_logvar)}
    for spy in spies.values():
        (pointers,) = spy.launches
        assert inputs <= set(pointers)
    monkeypatch.undo()
    eps = torch.randn_like(mu)
    check_against_reference(mu, logvar, eps, **options)


def test_strided_and_transposed_inputs(device):
    mu = torch.randn(5, 4, 3, device=device).transpose(0, 2).requires_grad_()  # (3, 4, 5), no merged layout
    logvar = torch.randn(3, 8, 5, device=device)[:, ::2].requires_grad_()
    prior_mu = torch.randn(5, 4, device=device).t().requires_grad_()  # (4, 5) broadcast over the rows
    prior_logvar = torch.randn(3, 1, 1, device=device).requires_grad_()
    for event_dims in (1, 2, 3):
        check_against_reference(mu, logvar, torch.randn(3, 4, 5, device=device), event_dims=event_dims,
                                prior_mu=prior_mu, prior_logvar=prior_logvar)


# ---- the soft clamp ---------------------------------------------------------------------------------


def test_logvar_limit_far_beyond_the_limit(device):
    """z is drawn with the clamped log-variance, and the gradient goes through the clamp, at any value."""
    limit = 4.0
    values = torch.tensor([-1e4, -80.0, -4.5, -0.05, 0.0, 1e-3, 0.3, 3.9, 4.0, 60.0, 1e4, -2.0], device=device)
    mu = torch.randn(2, 12, device=device, requires_grad=True)
    logvar = values.repeat(2, 1).requires_grad_()
    prior_logvar = values.flip(0).requires_grad_()
    eps = torch.randn_like(mu)
    z, kl = reparameterize_kl(mu, logvar, eps, prior_logvar=prior_logvar, logvar_limit=limit, backend="triton")
    clamped = soft_clamp(logvar.detach(), limit)
    assert clamped.abs().max() <= limit
    assert_close(z, mu.detach() + torch.exp(0.5 * clamped) * eps)
    assert torch.isfinite(kl).all()
    check_against_reference(mu, logvar, eps, prior_logvar=prior_logvar, logvar_limit=limit)
    # The clamp's slope: 1 at 0, about 0 far out, and its exact value in between.
    grad_logvar = torch.autograd.grad(kl.sum(), logvar)[0][0]
    slope = 1 - torch.tanh(values / limit) ** 2
    want = 0.5 * (torch.exp(clamped[0] - soft_clamp(prior_logvar.detach(), limit)) - 1) * slope
    assert_close(grad_logvar, want, rtol=1e-5, atol=1e-6)
    assert grad_logvar[0] == 0 and grad_logvar[10] == 0


def test_logvar_limit_is_the_eager_clamp(device):
    """Fused or applied before the op, the clamp gives the same z, KL and gradients (as GaussianLatent used to),
    within what the two computations of it can differ by.

    The kernel takes ``tanh(x / L)`` as ``(1 - u) / (1 + u)``, ``u = exp(-2 |x| / L)``, and the slope
    ``1 - tanh**2`` as ``4 u / (1 + u)**2``, accurate relative to itself; the eager path takes ``torch.tanh`` and
    autograd's slope ``1 - t**2``, whose subtraction keeps ``t``'s absolute error where ``t`` nears 1 (a slope of
    1e-4 off by 1e-7: 1e-3 of itself). Both tanh values lie within a few units of float32's 2**-24 of the truth
    (absolute: ``|t| < 1``), so the clamped log-variance ``c = L t`` differs by ``dc <= 8 L 2**-24`` and the slope
    by ``ds <= 8 * 2**-24``. Each output moves by its derivative in ``c`` times ``dc`` (and a gradient by its
    factor times ``ds``), plus float32's rounding of the rest: 1e-5 of the magnitudes summed.
    """
    limit, unit = 5.0, 2.0**-24
    mu, logvar = gaussian((4, 7), device, scale=8.0)
    eps = torch.randn_like(mu)
    z, kl = reparameterize_kl(mu, logvar, eps, logvar_limit=limit, backend="triton")
    z_eager, kl_eager = reparameterize_kl(mu, soft_clamp(logvar, limit), eps, backend="triton")
    g = torch.autograd.grad((z**2).sum() + kl.sum(), (mu, logvar))
    g_eager = torch.autograd.grad((z_eager**2).sum() + kl_eager.sum(), (mu, logvar))

    m, e = mu.detach().double(), eps.double()
    t = torch.tanh(logvar.detach().double() / limit)
    c, slope, sigma = limit * t, 1 - t**2, torch.exp(0.5 * limit * t)
    dc, ds, rounding = 8 * limit * unit, 8 * unit, 1e-5
    zz = m + sigma * e
    z_bound = 0.5 * sigma * e.abs() * dc + rounding * (m.abs() + sigma * e.abs())
    kl_bound = (0.5 * (c.exp() - 1).abs() * dc + rounding * (c.exp() + m**2 + 1 + c.abs())).sum(-1)
    # d(loss)/dc = z eps sigma + (e^c - 1) / 2 =: A; its derivative in c: eps^2 sigma^2 / 2 + z eps sigma / 2 + e^c / 2.
    a = zz * e * sigma + 0.5 * (c.exp() - 1)
    a_magnitude = (zz * e * sigma).abs() + 0.5 * (c.exp() + 1)
    a_prime = 0.5 * (e * sigma) ** 2 + 0.5 * (zz * e * sigma).abs() + 0.5 * c.exp()
    logvar_bound = a.abs() * ds + a_prime * slope * dc + rounding * a_magnitude * slope
    assert_within(z, z_eager, z_bound, "z")
    assert_within(kl, kl_eager, kl_bound, "kl")
    assert_within(g[0], g_eager[0], 2 * z_bound + rounding * m.abs(), "grad mu")  # 2 z + mu
    assert_within(g[1], g_eager[1], logvar_bound, "grad logvar")


# ---- the hard clamp ---------------------------------------------------------------------------------

LO, HI = -3.0, 2.0


def _float32_step(x: float, toward: float) -> float:
    return torch.nextafter(torch.tensor(x), torch.tensor(toward)).item()


# Log-variances where torch.clamp(x, LO, HI) switches: its ends (gradient 1), a float32 step inside and outside
# each, zero, and far out on both sides (gradient 0).
HARD_EDGES = [-1e4, LO - 1, _float32_step(LO, -math.inf), LO, _float32_step(LO, 0.0), 0.0, _float32_step(HI, 0.0),
              HI, _float32_step(HI, math.inf), HI + 1, 80.0, 1e4]
# The prior modes of the backward kernel (see prior_grad_mode): none, per element, shared by all rows (summed per
# column), broadcast along the event (per element, then summed).
HARD_PRIORS = {"none": None, "per element": (2, 12), "shared": (12,), "per sample": (2, 1)}


def _prior_logvar_at_edges(shape, device):
    """A prior log-variance of ``shape`` with values at and beyond the clamp's ends."""
    if shape == (2, 1):
        values = torch.tensor([[LO - 1.0], [HI]], device=device)
    else:
        values = torch.tensor(HARD_EDGES, device=device).flip(0).expand(shape).clone()
    return values.requires_grad_()


@pytest.mark.parametrize("noise", ["given", "drawn"])
@pytest.mark.parametrize("prior", HARD_PRIORS.values(), ids=HARD_PRIORS.keys())
def test_logvar_clamp_at_and_beyond_its_ends(device, prior, noise):
    """z is drawn with torch.clamp(logvar, lo, hi), the KL uses it, and the gradients go through the clamp as
    torch.clamp's do: unchanged on [lo, hi] (ends included), exactly 0 outside; for the prior's log-variance too."""
    edges = torch.tensor(HARD_EDGES, device=device)
    mu = torch.randn(2, 12, device=device, requires_grad=True)
    logvar = edges.repeat(2, 1).requires_grad_()
    prior_logvar = _prior_logvar_at_edges(prior, device) if prior is not None else None
    options = dict(prior_logvar=prior_logvar, logvar_clamp=(LO, HI))
    if noise == "drawn":
        torch.manual_seed(5)
        eps = reparameterize_kl(torch.zeros_like(mu), torch.zeros_like(mu), backend="triton")[0]
        torch.manual_seed(5)
        z, kl = reparameterize_kl(mu, logvar, backend="triton", **options)
    else:
        eps = torch.randn_like(mu)
        z, kl = reparameterize_kl(mu, logvar, eps, backend="triton", **options)
    clamped = logvar.detach().clamp(LO, HI)
    assert_close(z, mu.detach() + torch.exp(0.5 * clamped) * eps)
    check_against_reference(mu, logvar, eps, **options)
    # The KL's gradient of logvar, by hand: 0.5 * (exp(lv - plv) - 1) inside, exactly 0 outside.
    inputs = (logvar,) if prior_logvar is None else (logvar, prior_logvar)
    grads = torch.autograd.grad(kl.sum(), inputs)
    prior_clamped = prior_logvar.detach().clamp(LO, HI) if prior_logvar is not None else torch.zeros(())
    inside = (edges >= LO) & (edges <= HI)
    want = torch.where(inside, 0.5 * (torch.exp(clamped - prior_clamped) - 1), 0.0)
    assert_close(grads[0], want, rtol=1e-5, atol=1e-6)
    assert (grads[0][:, ~inside] == 0).all() and (grads[0][:, inside] != 0).any()
    if prior_logvar is not None:
        prior_inside = (prior_logvar >= LO) & (prior_logvar <= HI)
        assert (grads[1][~prior_inside] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prior", ["none", "same shape", "shared"])
def test_logvar_clamp_is_torch_clamp(device, dtype, prior):
    """Fused, or torch.clamp applied before the op: the same z, KL and gradients, bit for bit (the clamp selects
    values, and its gradient is the one the unclamped op gives, where it is kept)."""
    shape = (3, 2, 4, 5)
    mu, logvar = gaussian(shape, device, dtype, scale=4.0)
    prior_mu, prior_logvar = gaussian(shape if prior == "same shape" else shape[1:], device, dtype, scale=4.0)
    options = dict(prior_mu=prior_mu, prior_logvar=prior_logvar) if prior != "none" else {}
    eps = torch.randn(shape, device=device)
    z, kl = reparameterize_kl(mu, logvar, eps, event_dims=2, logvar_clamp=(LO, HI), backend="triton", **options)
    eager = dict(options, prior_logvar=prior_logvar.clamp(LO, HI)) if options else {}
    z_eager, kl_eager = reparameterize_kl(mu, logvar.clamp(LO, HI), eps, event_dims=2, backend="triton", **eager)
    assert torch.equal(z, z_eager) and torch.equal(kl, kl_eager)
    inputs = [mu, logvar] + ([prior_mu, prior_logvar] if options else [])
    grad_z, grad_kl = torch.randn_like(z), torch.rand_like(kl)
    got = torch.autograd.grad((z.float() * grad_z).sum() + (kl * grad_kl).sum(), inputs)
    want = torch.autograd.grad((z_eager.float() * grad_z).sum() + (kl_eager * grad_kl).sum(), inputs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("clamp", [(0.5, 2.0), (-3.0, -1.0)], ids=["above 0", "below 0"])
@pytest.mark.parametrize("prior", ["none", "prior_mu only", "shared"])
@pytest.mark.parametrize("n_cols", [5, 130, 132])
def test_logvar_clamp_without_zero_leaves_the_padding_out(device, clamp, prior, n_cols):
    """A clamp range without 0 takes the zeros the kernels load past a row's end to lo or hi, whose KL term
    (e^lo - 1 - lo) is not 0 without a prior log-variance: rows whose length is not a multiple of a tile's columns
    (5: one partial group; 130 and 132, lane by lane and as vectors: past a 128-column step) match the
    reference all the same."""
    mu, logvar = gaussian((3, n_cols), device, scale=3.0)
    options = dict(logvar_clamp=clamp)
    if prior == "prior_mu only":
        options["prior_mu"] = torch.randn(3, n_cols, device=device)
    elif prior == "shared":
        options["prior_mu"], options["prior_logvar"] = gaussian((n_cols,), device)
    check_against_reference(mu, logvar, torch.randn(3, n_cols, device=device), **options)


def test_logvar_clamp_whose_exponential_overflows_gives_an_infinite_kl(device):
    """The padding's term overflows with the row's own (both are e^c, c >= lo): the KL is inf, as the reference's,
    not inf - inf."""
    mu, logvar = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    _, kl = reparameterize_kl(mu, logvar, torch.randn_like(mu), logvar_clamp=(100.0, 200.0), backend="triton")
    assert torch.isposinf(kl).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logvar_clamp_passes_nan_through_with_a_zero_gradient(device, backend):
    """As torch.clamp: a NaN log-variance stays NaN (so do its z and KL), and its gradient is 0, not NaN."""
    if backend == "torch" and device.type != "cpu":
        pytest.skip("the reference path is checked once, on the CPU")
    mu = torch.randn(2, 3, device=device, requires_grad=True)
    logvar = torch.tensor([[0.5, math.nan, 40.0], [-40.0, 0.0, 1.0]], device=device, requires_grad=True)
    z, kl = reparameterize_kl(mu, logvar, torch.randn_like(mu), logvar_clamp=(LO, HI), backend=backend)
    assert torch.isnan(z[0, 1]) and torch.isnan(kl[0]) and not torch.isnan(z[1]).any() and torch.isfinite(kl[1])
    (grad,) = torch.autograd.grad(z[1].sum() + kl[1] + z[0, 0], logvar)
    assert not torch.isnan(grad).any()
    assert grad[0, 1] == 0 and grad[0, 2] == 0 and grad[1, 0] == 0 and grad[1, 1] != 0


# ---- noise ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_dims", [2, 3])
def test_noise_of_events_does_not_depend_on_tiling_or_strides(device, monkeypatch, event_dims):
    from fastvae.kernels import launch
    from fastvae.kernels.reparameterize_kl import draw_noise, philox_rounds
    from fastvae.ops.rng import philox_seed_offset

    h = torch.randn(3, 10, 3, 7, device=device)
    mu, logvar = h[:, :4], h[:, 4:8]
    prior_mu = torch.randn(4, 3, 7, device=device)
    torch.manual_seed(99)
    z, _ = reparameterize_kl(mu, logvar, prior_mu=prior_mu, event_dims=event_dims, backend="triton")
    monkeypatch.setattr(launch, "BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(launch, "target_programs", lambda device: 1000)
    torch.manual_seed(99)
    z_small, _ = reparameterize_kl(mu.contiguous(), logvar.contiguous(), prior_mu=prior_mu, event_dims=event_dims,
                                   backend="triton")
    assert torch.equal(z, z_small)
    monkeypatch.undo()
    # draw_noise writes out the same noise, for the differentiable backward.
    torch.manual_seed(99)
    seed, first = philox_seed_offset(None, device, philox_rounds(mu.shape, event_dims))
    eps = draw_noise(mu.shape, device, seed, first, event_dims)
    assert_close(z, mu + torch.exp(0.5 * logvar) * eps)


def test_event_noise_is_standard_normal(device):
    n = pick(device, 1 << 14, 1 << 22)
    zeros = torch.zeros(n // 256, 4, 8, 8, device=device)
    eps = reparameterize_kl(zeros, zeros, event_dims=3, backend="triton")[0].double().flatten()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1) < 10 * (2 / n) ** 0.5


def test_empty_inputs_with_a_prior(device):
    for shape, event_dims in (((0, 2, 3), 2), ((2, 0, 3), 2), ((2, 3, 0), 1)):
        mu, logvar = gaussian(shape, device)
        prior_mu, prior_logvar = gaussian(shape[1:], device)
        z, kl = reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=event_dims,
                                  backend="triton")
        assert z.shape == shape and kl.shape == shape[: 3 - event_dims]
        grads = torch.autograd.grad(z.sum() + kl.sum(), (mu, logvar, prior_mu, prior_logvar))
        assert [g.shape for g in grads] == [mu.shape, logvar.shape, prior_mu.shape, prior_logvar.shape]
        assert all((g == 0).all() for g in grads)


# ---- higher orders, torch.compile -----------------------------------------------------------------


CLAMPS = {"soft": dict(logvar_limit=3.0), "hard": dict(logvar_clamp=(-1.5, 2.0))}


@pytest.mark.parametrize("clamp", CLAMPS.values(), ids=CLAMPS.keys())
@pytest.mark.parametrize("noise", ["given", "drawn"])
@pytest.mark.parametrize("prior", ["same shape", "shared"])
def test_higher_orders_with_a_prior_and_the_clamp(device, prior, noise, clamp):
    shape = (2, 3, 2, 3)
    mu, logvar = gaussian(shape, device, scale=2.0)
    prior_mu, prior_logvar = gaussian(shape if prior == "same shape" else shape[2:], device, scale=2.0)
    options = dict(prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=2, **clamp)
    if noise == "drawn":
        torch.manual_seed(5)
        zeros = torch.zeros(shape, device=device)
        eps = reparameterize_kl(zeros, zeros, event_dims=2, backend="triton")[0]  # the noise of the next call
        torch.manual_seed(5)
        z, kl = reparameterize_kl(mu, logvar, reduction="mean", backend="triton", **options)
    else:
        eps = torch.randn(shape, device=device, requires_grad=True)
        z, kl = reparameterize_kl(mu, logvar, eps, reduction="mean", backend="triton", **options)
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps, "mean", **options)
    inputs = [mu, logvar, prior_mu, prior_logvar] + ([eps] if eps.requires_grad else [])
    grad_z = torch.randn(shape, device=device)
    directions = [torch.randn(t.shape, device=device) for t in inputs]

    def total(z, kl):
        return (z * grad_z).sum() + 1.5 * kl

    got = gradients_up_to_third(total(z, kl), inputs, None, directions)
    want = gradients_up_to_third(total(z_ref, kl_ref), inputs, None, directions)
    for order, (got_order, want_order) in enumerate(zip(got, want), start=1):
        for t, g, w in zip(inputs, got_order, want_order):
            assert g.shape == t.shape and g.dtype == t.dtype
            assert_close(g, w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()),
                         msg=lambda m: f"order {order}: {m}")


class TinyStochasticLayer(torch.nn.Module):
    """A conv giving posterior and prior as channel slices, through the fused op: a hierarchical VAE's layer."""

    def __init__(self, zdim=2, clamp=None):
        super().__init__()
        self.zdim, self.clamp = zdim, clamp or dict(logvar_limit=4.0)
        self.conv = torch.nn.Conv2d(3, 4 * zdim + 1, 1)
        self.prior_logvar = torch.nn.Parameter(0.1 * torch.randn(zdim, 3, 3))

    def forward(self, x, eps=None):
        h = self.conv(x)
        d = self.zdim
        z, kl = reparameterize_kl(h[:, :d], h[:, d : 2 * d], eps, prior_mu=h[:, 2 * d : 3 * d],
                                  prior_logvar=self.prior_logvar, event_dims=3, reduction="mean", backend="triton",
                                  **self.clamp)
        return (z**2).sum() + kl


@pytest.mark.parametrize("clamp", CLAMPS.values(), ids=CLAMPS.keys())
def test_torch_compile_fullgraph_with_a_prior(device, clamp):
    torch._dynamo.reset()
    model = TinyStochasticLayer(clamp=clamp).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 3, 3, device=device)
    eps = torch.randn(2, 2, 3, 3, device=device)
    loss, loss_c = model(x, eps), compiled(x, eps)
    assert_close(loss_c, loss)
    params = list(model.parameters())
    for g, g_c in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_c, params)):
        assert_close(g_c, g)
    torch.manual_seed(5)
    loss = model(x)
    torch.manual_seed(5)
    loss_c = compiled(x)
    assert_close(loss_c, loss)
    loss_c.backward()
    assert all(torch.isfinite(p.grad).all() for p in params)


# ---- the N(0, I) path is unchanged ----------------------------------------------------------------

# sha256 (first 16 hex digits) of z, kl, grad_mu and grad_logvar, written by the kernels as they were before priors,
# event_dims and logvar_limit existed (commit cc98d6e), under Triton 3.6's and 3.9's interpreters alike. The
# reference path is checked against its formula of then instead (before_reference): torch's CPU kernels round
# exp and sums differently on different CPUs (AVX-512, AVX2, none), so recorded bits of it hold on one machine only.
BEFORE = {
    ("triton", torch.float32, "given"): ("6713b98784017c44", "531865c8e7ffb423"),
    ("triton", torch.float32, "drawn"): ("8598dbcba42d4086", "952575c32f773ee6"),
    ("triton", torch.bfloat16, "given"): ("4a6684a20e39e21d", "93d5ef09695c8504"),
    ("triton", torch.bfloat16, "drawn"): ("db3562fafc49b1b8", "dfb096274b5bb1c7"),
}
BEFORE_CHUNKS = "71b54b6b872d4fd4"


def before_reference(mu, logvar, eps=None, *, reduction="none"):
    """The reference path as it was at commit cc98d6e, before priors (noise drawn as it drew it)."""
    acc = torch.float32
    if eps is None:
        eps = torch.randn(mu.shape, dtype=acc)
    mu_, logvar_ = mu.to(acc), logvar.to(acc)
    z = (mu_ + torch.exp(0.5 * logvar_) * eps.to(acc)).to(mu.dtype)
    kl = -0.5 * torch.sum(1 + logvar_ - mu_ * mu_ - torch.exp(logvar_), dim=-1)
    return z, {"none": kl, "mean": kl.mean(), "sum": kl.sum()}[reduction]


def _digest(*tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _n01_digest(op, dtype, noise, reduction):
    g = torch.Generator().manual_seed(20240610)
    shape = (3, 2, 7)
    mu = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    logvar = (0.7 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    eps = torch.randn(shape, generator=g) if noise == "given" else None
    grad_z = torch.randn(shape, generator=g).to(dtype)
    torch.manual_seed(77)
    z, kl = op(mu, logvar, eps, reduction=reduction)
    grad_kl = torch.linspace(0.5, 2.0, kl.numel()).view(kl.shape)
    grads = torch.autograd.grad((z * grad_z).sum() + (kl * grad_kl).sum(), (mu, logvar))
    return _digest(z, kl, *grads)


def _op(backend):
    return functools.partial(reparameterize_kl, backend=backend)


@pytest.mark.parametrize("key", BEFORE, ids=lambda key: "-".join(map(str, key)))
def test_standard_normal_prior_is_bit_identical_to_before(device, key):
    """Every bit of the kernels' N(0, I) outputs and gradients, on fixed inputs, as they gave them before."""
    if device.type != "cpu":
        pytest.skip("the recorded bits are the CPU interpreter's")
    backend, dtype, noise = key
    assert tuple(_n01_digest(_op(backend), dtype, noise, reduction) for reduction in ("none", "mean")) == BEFORE[key]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise", ["given", "drawn"])
def test_standard_normal_prior_on_the_reference_path_is_its_formula_of_before(dtype, noise):
    """Every bit of the reference path's N(0, I) outputs and gradients as its formula before priors gives them."""
    for reduction in ("none", "mean"):
        assert _n01_digest(_op("torch"), dtype, noise, reduction) == _n01_digest(before_reference, dtype, noise,
                                                                                 reduction)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_standard_normal_prior_on_chunks_is_bit_identical_to_before(device, backend):
    if device.type != "cpu":
        pytest.skip("the recorded bits are the CPU interpreter's and the reference path's on the CPU")

    def digest(op):
        h = torch.randn(5, 18, generator=torch.Generator().manual_seed(5)).requires_grad_()
        mu, logvar = h.chunk(2, dim=-1)
        torch.manual_seed(3)
        z, kl = op(mu, logvar, reduction="sum")
        (grad_h,) = torch.autograd.grad((z * torch.arange(9.0)).sum() + 0.5 * kl, h)
        return _digest(z, kl, grad_h)

    assert digest(_op(backend)) == (BEFORE_CHUNKS if backend == "triton" else digest(before_reference))


# ---- bad input ---------------------------------------------------------------------------------------


def _bad(**options):
    return lambda: options


BAD_INPUTS = {
    "prior_mu does not broadcast": (_bad(prior_mu=torch.zeros(3)), ValueError, "prior_mu"),
    "prior_logvar larger than mu": (_bad(prior_logvar=torch.zeros(5, 2, 4)), ValueError, "prior_logvar"),
    "integer prior_mu": (_bad(prior_mu=torch.zeros(4, dtype=torch.int64)), TypeError, "prior_mu"),
    "bool prior_logvar": (_bad(prior_logvar=torch.zeros(4, dtype=torch.bool)), TypeError, "prior_logvar"),
    "prior not a tensor": (_bad(prior_mu=[0.0] * 4), TypeError, "prior_mu"),
    "prior on another device": (_bad(prior_logvar=torch.zeros(4, device="meta")), ValueError, "prior_logvar"),
    "event_dims 0": (_bad(event_dims=0), ValueError, "event_dims"),
    "event_dims above mu.dim()": (_bad(event_dims=3), ValueError, "event_dims"),
    "event_dims not an int": (_bad(event_dims=1.0), TypeError, "event_dims"),
    "event_dims a bool": (_bad(event_dims=True), TypeError, "event_dims"),
    "logvar_limit 0": (_bad(logvar_limit=0.0), ValueError, "logvar_limit"),
    "logvar_limit negative": (_bad(logvar_limit=-1), ValueError, "logvar_limit"),
    "logvar_limit nan": (_bad(logvar_limit=math.nan), ValueError, "logvar_limit"),
    "logvar_limit inf": (_bad(logvar_limit=math.inf), ValueError, "logvar_limit"),
    "logvar_limit a string": (_bad(logvar_limit="10"), TypeError, "logvar_limit"),
    "logvar_clamp lo = hi": (_bad(logvar_clamp=(1.0, 1.0)), ValueError, "logvar_clamp"),
    "logvar_clamp lo > hi": (_bad(logvar_clamp=[20, -30]), ValueError, "logvar_clamp"),
    "logvar_clamp nan": (_bad(logvar_clamp=(math.nan, 20.0)), ValueError, "logvar_clamp"),
    "logvar_clamp infinite": (_bad(logvar_clamp=(-math.inf, 20.0)), ValueError, "logvar_clamp"),
    "logvar_clamp one number": (_bad(logvar_clamp=20.0), TypeError, "logvar_clamp"),
    "logvar_clamp three numbers": (_bad(logvar_clamp=(-30, 0, 20)), TypeError, "logvar_clamp"),
    "logvar_clamp strings": (_bad(logvar_clamp=("-30", "20")), TypeError, "logvar_clamp"),
    "logvar_clamp bools": (_bad(logvar_clamp=(False, True)), TypeError, "logvar_clamp"),
    "logvar_clamp and logvar_limit": (_bad(logvar_clamp=(-30, 20), logvar_limit=10.0), ValueError, "logvar_clamp"),
    "float64 prior on triton": (_bad(prior_mu=torch.zeros(4, dtype=torch.float64), backend="triton"), TypeError,
                                "prior_mu"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(case):
    make, error, name = case
    with pytest.raises(error, match=name):
        reparameterize_kl(torch.zeros(5, 4), torch.zeros(5, 4), **make())


# ---- compiled for a GPU --------------------------------------------------------------------------


def _job(kernel_name, dtype, int_type, constexprs, absent=()):
    """A compile job: every pointer of ``dtype`` (float32 where the kernel keeps float32), the arguments in
    ``absent`` as compile-time ``None`` (an input the call lacks)."""
    from fastvae.kernels import reparameterize_kl as kernels

    kernel = getattr(kernels, kernel_name)
    float32 = ("kl_ptr", "grad_kl_ptr", "grad_prior_mu_ptr", "grad_prior_logvar_ptr")
    # Both layouts (groups as vectors in float32, lane by lane in bfloat16), int64 indices with i64, and a prior
    # shared by all rows (loaded once per column) in bfloat16.
    layout = dict(ALIGNED=dtype == "fp32", INT64=int_type == "i64",
                  SHARED_PRIOR=dtype == "bf16" and "prior_mu_ptr" not in absent)
    signature, values = {}, dict(constexprs, **layout, BLOCK_ROWS=8, BLOCK_GROUPS=128)
    for name in kernel.arg_names:
        if name in absent:
            signature[name], values[name] = "constexpr", None
        elif name == "philox_ptr":  # the Philox state read from memory (under CUDA-graph capture)
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in float32 else f"*{dtype}"
        elif name in ("logvar_limit", "logvar_min", "logvar_max"):
            signature[name] = "fp32"
        elif not name.isupper():
            signature[name] = int_type
    return kernels.__name__, kernel_name, signature, values, 8


def test_prior_and_clamp_variants_compile_for_a_cuda_target():
    from tests.utils import compile_for_cuda

    forward, backward = "_reparameterize_kl_forward_kernel", "_reparameterize_kl_backward_kernel"
    no_prior = ("prior_mu_ptr", "prior_logvar_ptr", "grad_prior_mu_ptr", "grad_prior_logvar_ptr")
    soft, hard = ("logvar_min", "logvar_max"), ("logvar_limit",)  # absent for the soft clamp, the hard one
    jobs = []
    for dtype, int_type in (("fp32", "i32"), ("bf16", "i64")):
        # The state from memory with everything present; as scalar arguments (eager calls) otherwise.
        eager = ("philox_ptr",)
        for absent in (soft, hard, eager + soft + hard, eager + no_prior[::2] + no_prior[3:] + soft,
                       eager + no_prior + hard, eager + no_prior + soft + hard):
            fwd_absent = tuple(name for name in absent if not name.startswith("grad_"))
            jobs.append(_job(forward, dtype, int_type, dict(HAS_EPS=False), fwd_absent))
            for grad_z, grad_kl in ((True, True), (False, True)):
                flags = dict(HAS_GRAD_Z=grad_z, HAS_GRAD_KL=grad_kl, HAS_EPS=False)
                jobs.append(_job(backward, dtype, int_type, flags, absent))
    compile_for_cuda(jobs)
