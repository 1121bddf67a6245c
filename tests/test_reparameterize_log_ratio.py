"""reparameterize_log_ratio: K importance samples and log p(z) - log q(z | x), through the Triton kernels, against
its reference evaluated in float64 on the same inputs and noise."""
import functools
import math

import pytest
import torch

from fastvae.functional import reparameterize_kl, reparameterize_log_ratio
from fastvae.ops.reparameterize_log_ratio import reparameterize_log_ratio_reference
from tests.utils import TOLERANCES, assert_close, gradients_up_to_third, no_host_sync, pick, summed_terms

U32 = 2.0**-24  # float32's unit roundoff


def gaussian(shape, device, dtype=torch.float32, scale=0.5):
    """A mean and a log-variance of ``shape`` that require grad."""
    mu = torch.randn(shape, device=device).to(dtype).requires_grad_()
    logvar = (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    return mu, logvar


def as_float64(t):
    return t.detach().double().requires_grad_(t.requires_grad) if t is not None else None


def log_ratio_tolerance(wide, samples, event_dims, logvar_limit):
    """A bound on the float32 error of each log ratio, from the float64 inputs ``wide``.

    The kernel adds ``n_cols`` terms ``(lv - plv) + (eps - t)(eps + t)``, each
    a few roundings (under 16 ulp of ``|lv - plv| + eps^2 + t^2``), in at most
    ``ceil(n_cols / 4)`` sequential trips and then a tree over a tile (at most
    12 levels): the error is below ``(n_cols / 4 + 28) u`` times the sum of the
    terms' sizes.
    """
    from fastvae.ops.reparameterize_kl import soft_clamp

    def clamped(t):
        return soft_clamp(t, logvar_limit) if logvar_limit is not None and t is not None else t

    lv, plv = clamped(wide["logvar"]).detach(), clamped(wide.get("prior_logvar"))
    eps = wide["eps"].detach()
    z = wide["mu"].detach() + torch.exp(0.5 * lv) * eps
    t = z - wide["prior_mu"].detach() if wide.get("prior_mu") is not None else z
    if plv is not None:
        t = t * torch.exp(-0.5 * plv.detach())
        lv = lv - plv.detach()
    size = (lv.abs() + eps.square() + t.square()).sum(dim=tuple(range(-event_dims, 0)))
    n_cols = math.prod(wide["mu"].shape[wide["mu"].dim() - event_dims:])
    return (n_cols / 4 + 28) * U32 * (size + 1)


def check_against_reference(mu, logvar, eps, *, use_z=True, use_log_ratio=True, event_dims=1, **options):
    """Outputs and every input's gradient (random upstream gradients) against the float64 reference."""
    z, log_ratio = reparameterize_log_ratio(mu, logvar, eps, event_dims=event_dims, backend="triton", **options)
    tensors = {"mu": mu, "logvar": logvar, "eps": eps, **{k: v for k, v in options.items() if k.startswith("prior")}}
    wide = {name: as_float64(t) for name, t in tensors.items()}
    samples = options.get("samples")
    z_ref, log_ratio_ref = reparameterize_log_ratio_reference(
        wide["mu"], wide["logvar"], wide["eps"], event_dims=event_dims, samples=samples,
        logvar_limit=options.get("logvar_limit"), prior_mu=wide.get("prior_mu"), prior_logvar=wide.get("prior_logvar"),
    )
    out_shape = mu.shape if samples is None else (samples, *mu.shape)
    assert z.shape == out_shape and z.dtype == mu.dtype and z.is_contiguous()
    assert log_ratio.shape == out_shape[: len(out_shape) - event_dims] and log_ratio.dtype == torch.float32
    assert_close(z, z_ref.to(z.dtype))
    tolerance = log_ratio_tolerance(wide, samples, event_dims, options.get("logvar_limit"))
    assert ((log_ratio.double() - log_ratio_ref).abs() <= tolerance).all(), (log_ratio, log_ratio_ref)

    names = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    grad_z = torch.randn(z.shape, device=z.device) if use_z else None
    grad_log_ratio = torch.rand_like(log_ratio) + 0.5 if use_log_ratio else None

    def total(z, log_ratio):
        return sum((out.double() * g.double()).sum() for out, g in ((z, grad_z), (log_ratio, grad_log_ratio))
                   if g is not None)

    def grads(z, log_ratio, inputs):
        return torch.autograd.grad(total(z, log_ratio), inputs, allow_unused=True, materialize_grads=True)

    def summed_over(name):
        """The largest sum of |terms| that a prior broadcast over the output adds up in its gradient (``mu``'s and
        ``logvar``'s add K terms, one per sample)."""
        if not name.startswith("prior") or tensors[name].shape == out_shape:
            return 0.0
        reference = functools.partial(
            reparameterize_log_ratio_reference, event_dims=event_dims, samples=samples,
            logvar_limit=options.get("logvar_limit"), prior_mu=wide.get("prior_mu"),
            prior_logvar=wide.get("prior_logvar"))
        inputs = {k: wide[k].detach() for k in ("mu", "logvar", "eps")}
        return summed_terms(lambda full: total(*reference(**{**inputs, name: full})), wide[name], out_shape)

    got = grads(z, log_ratio, [tensors[n] for n in names])
    want = grads(z_ref, log_ratio_ref, [wide[n] for n in names])
    for name, g, w in zip(names, got, want):
        t = tensors[name]
        assert g.shape == t.shape and g.dtype == t.dtype, name
        # Each element's gradient adds K samples' few-rounding terms (a broadcast prior's, those of the elements it
        # spans): float32 errs by units of the terms, not of their sum, which may cancel; in half precision the
        # rounding of the result.
        scale = max(1.0, w.abs().max().item(), summed_over(name))
        tol = TOLERANCES[t.dtype]
        assert_close(g, w.to(g.dtype), atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")
    return z, log_ratio


# ---- shapes, samples and the stride-0 expansion ---------------------------------------------------------------

SHAPES = {  # mu's shape, samples
    "flat, K=5": (lambda d: (pick(d, 7, 512), pick(d, 20, 256)), 5),
    "one sample dim, K=1": (lambda d: (pick(d, 3, 300), 9), 1),
    "no sample dim": (lambda d: (pick(d, 3, 300), pick(d, 13, 129)), None),
    "D=1": (lambda d: (pick(d, 5, 4097), 1), 3),
    "above one block": (lambda d: (pick(d, 2, 300), pick(d, 4100, 70001)), 2),
    "3-d lead": (lambda d: (2, 3, pick(d, 37, 515)), 4),
}


@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(device, case):
    shape_of, samples = case
    shape = shape_of(device)
    mu, logvar = gaussian(shape, device)
    out = shape if samples is None else (samples, *shape)
    check_against_reference(mu, logvar, torch.randn(out, device=device), samples=samples)


def test_halves_of_a_linear_head_and_channel_slices_are_read_in_place(device):
    h = torch.randn(6, 2 * 11, device=device, requires_grad=True)
    mu, logvar = h.chunk(2, dim=-1)  # strided views
    check_against_reference(mu, logvar, torch.randn(4, 6, 11, device=device), samples=4)
    posterior = torch.randn(3, 10, 4, 5, device=device, requires_grad=True)
    mu, logvar = posterior[:, :4], posterior[:, 4:8]  # channel slices: (B, C, H, W) with B's stride 10 H W
    check_against_reference(mu, logvar, torch.randn(3, 3, 4, 4, 5, device=device), samples=3, event_dims=3)
    check_against_reference(mu, logvar, torch.randn(3, 3, 4, 4, 5, device=device), samples=3, event_dims=2)


def test_a_stride_0_expansion_is_read_in_place_as_samples_are(device):
    """mu.expand(K, B, D) without samples= gives what samples=K gives; both read mu where it lies."""
    from benchmarks.static.counts import events_of

    mu, logvar = gaussian((5, 7), device)
    eps = torch.randn(3, 5, 7, device=device)
    expanded = check_against_reference(mu.expand(3, 5, 7), logvar.expand(3, 5, 7), eps)
    sampled = check_against_reference(mu, logvar, eps, samples=3)
    for a, b in zip(expanded, sampled):
        assert torch.equal(a, b)

    def forward_and_backward():
        for samples, m, v in ((None, mu.expand(3, 5, 7), logvar.expand(3, 5, 7)), (3, mu, logvar)):
            z, log_ratio = reparameterize_log_ratio(m, v, eps, samples=samples, backend="triton")
            torch.autograd.grad((z.sum() + log_ratio.sum()), (mu, logvar))

    events = events_of(forward_and_backward, execute=True)
    # The kernels read mu's own 35 floats: nothing copies the expansion (no ATen copy, and a read of 35 * 4 bytes).
    assert not [e for e in events if e.kind == "aten" and "copy" in e.name], events
    forward = [e for e in events if e.name == "_log_ratio_forward_kernel"]
    assert len(forward) == 2 and all(e.read_bytes == 3 * 5 * 7 * 4 + 2 * 5 * 7 * 4 for e in forward), forward
    backward = [e for e in events if e.name == "_log_ratio_backward_kernel"]
    assert len(backward) == 2
    assert backward[1].write_bytes == 2 * 5 * 7 * 4  # samples=K: the gradients summed over K inside, at mu's size


# ---- the prior's forms ----------------------------------------------------------------------------------------

K, B, C, H, W = 3, 4, 2, 3, 5
PRIOR_SHAPES = {  # for mu of shape (B, C, H, W), event_dims=3, samples=K
    "per sample (K, B, C, H, W)": (K, B, C, H, W),
    "per posterior (B, C, H, W)": (B, C, H, W),
    "per posterior, leading 1": (1, B, C, H, W),
    "shared (C, H, W)": (C, H, W),
    "per channel": (C, 1, 1),
    "per sample and image": (K, B, 1, 1, 1),
    "per sample only": (K, 1, 1, 1, 1),
    "scalar": (),
}


@pytest.mark.parametrize("which", ["both", "mu only", "logvar only"])
@pytest.mark.parametrize("prior_shape", PRIOR_SHAPES.values(), ids=PRIOR_SHAPES.keys())
def test_every_prior_form(device, prior_shape, which):
    mu, logvar = gaussian((B, C, H, W), device)
    prior_mu, prior_logvar = gaussian(prior_shape, device)
    options = {"prior_mu": prior_mu if which != "logvar only" else None,
               "prior_logvar": prior_logvar if which != "mu only" else None}
    check_against_reference(mu, logvar, torch.randn(K, B, C, H, W, device=device), samples=K, event_dims=3,
                            **options)


def test_a_per_sample_prior_of_conv_channel_slices_is_read_in_place(device):
    """A hierarchical VAE's prior: channel slices of the prior net's output on the K B decoded states."""
    mu, logvar = gaussian((B, C, H, W), device)
    prior_out = torch.randn(K * B, 2 * C + 3, H, W, device=device, requires_grad=True).view(K, B, 2 * C + 3, H, W)
    check_against_reference(mu, logvar, torch.randn(K, B, C, H, W, device=device), samples=K, event_dims=3,
                            prior_mu=prior_out[:, :, :C], prior_logvar=prior_out[:, :, C : 2 * C], logvar_limit=2.0)


@pytest.mark.parametrize("event_dims", [1, 2, 3, 4])
@pytest.mark.parametrize("prior", ["none", "per posterior", "shared"])
def test_event_dims(device, event_dims, prior):
    shape = (2, 3, 4, 5)
    mu, logvar = gaussian(shape, device)
    options = {}
    if prior != "none":
        prior_shape = shape if prior == "per posterior" else shape[len(shape) - event_dims:]
        options["prior_mu"], options["prior_logvar"] = gaussian(prior_shape, device)
    z, log_ratio = check_against_reference(mu, logvar, torch.randn(2, *shape, device=device), samples=2,
                                           event_dims=event_dims, **options)
    assert log_ratio.shape == (2, *shape[: 4 - event_dims])


def test_shared_prior_over_many_row_tiles_and_column_splits(device):
    """The per-tile column sums of a shared prior's gradient, summed over the samples too."""
    rows, cols = pick(device, (37, 70), (1000, 5000))
    mu, logvar = gaussian((rows, cols), device)
    prior_mu, prior_logvar = gaussian((cols,), device)
    check_against_reference(mu, logvar, torch.randn(2, rows, cols, device=device), samples=2, prior_mu=prior_mu,
                            prior_logvar=prior_logvar)
    rows, cols = pick(device, (3, 4500), (4, 70001))  # few rows: each row splits into column ranges
    mu, logvar = gaussian((rows, cols), device)
    prior_mu, prior_logvar = gaussian((cols,), device)
    check_against_reference(mu, logvar, torch.randn(2, rows, cols, device=device), samples=2, prior_mu=prior_mu,
                            prior_logvar=prior_logvar)


@pytest.mark.parametrize("prior_shape", [(4, 6), (3, 4, 6), (6,)], ids=["per posterior", "per sample", "shared"])
def test_a_prior_that_needs_no_gradient_and_eps_that_does(device, prior_shape):
    mu, logvar = gaussian((4, 6), device)
    eps = torch.randn(3, 4, 6, device=device, requires_grad=True)
    check_against_reference(mu, logvar, eps, samples=3, prior_mu=torch.randn(prior_shape, device=device),
                            prior_logvar=torch.randn(prior_shape, device=device))


# ---- the clamp and where the formulas switch ------------------------------------------------------------------


def test_soft_clamp_at_and_beyond_its_switch_points(device):
    """logvar at 0 (the clamp's series), at 0.1 L either side (its switch), at +-L and far beyond (saturated)."""
    limit = 3.0
    values = torch.tensor([0.0, 0.3 - 1e-6, 0.3 + 1e-6, -0.3, 3.0, -3.0, 40.0, -40.0], device=device)
    logvar = values.repeat(5, 1).requires_grad_()
    mu = torch.randn(5, 8, device=device, requires_grad=True)
    prior_logvar = values.flip(0).repeat(5, 1).requires_grad_()
    check_against_reference(mu, logvar, torch.randn(2, 5, 8, device=device), samples=2, logvar_limit=limit,
                            prior_mu=torch.randn(5, 8, device=device, requires_grad=True), prior_logvar=prior_logvar)


def test_a_prior_equal_to_the_posterior_gives_log_ratio_zero(device):
    """Where p = q every term is exactly 0: (eps - t)(eps + t) takes no difference of two large squares."""
    mu, logvar = gaussian((6, 33), device, scale=3.0)
    z, log_ratio = reparameterize_log_ratio(mu, logvar, samples=4, prior_mu=mu, prior_logvar=logvar, backend="triton")
    assert log_ratio.abs().max() <= 33 * 8 * U32 * (1 + z.detach().abs().max() ** 2)
    gm, gl = torch.autograd.grad(log_ratio.sum(), (mu, logvar))
    assert gm.abs().max() < 1e-5 and gl.abs().max() < 1e-4  # the gradients through q and p cancel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtypes_and_a_mixed_prior_dtype(device, dtype):
    mu, logvar = gaussian((2, 3, 4, 4), device, dtype)
    prior_mu, prior_logvar = gaussian((3, 4, 4), device, torch.bfloat16 if dtype == torch.float32 else torch.float32)
    check_against_reference(mu, logvar, torch.randn(3, 2, 3, 4, 4, device=device), samples=3, event_dims=3,
                            prior_mu=prior_mu, prior_logvar=prior_logvar)


@pytest.mark.parametrize("used", ["both", "z only", "log ratio only"])
def test_unused_outputs(device, used):
    mu, logvar = gaussian((3, 2, 3, 5), device)
    prior_mu, prior_logvar = gaussian((4, 3, 2, 3, 5), device)
    check_against_reference(mu, logvar, torch.randn(4, 3, 2, 3, 5, device=device), samples=4, event_dims=2,
                            use_z=used != "log ratio only", use_log_ratio=used != "z only", prior_mu=prior_mu,
                            prior_logvar=prior_logvar, logvar_limit=3.0)


@pytest.mark.parametrize("shape, samples", [((0, 5), 3), ((4, 0), 2), ((3, 5), 1), ((0, 5), None)])
def test_empty_and_size_1(device, shape, samples):
    mu, logvar = gaussian(shape, device)
    z, log_ratio = reparameterize_log_ratio(mu, logvar, samples=samples, backend="triton")
    out = shape if samples is None else (samples, *shape)
    assert z.shape == out and log_ratio.shape == out[:-1]
    assert (log_ratio == 0).all() if shape[-1] == 0 else torch.isfinite(log_ratio).all()
    grads = torch.autograd.grad(z.sum() + log_ratio.sum(), (mu, logvar))
    assert all(g.shape == shape and torch.isfinite(g).all() for g in grads)


# ---- the noise drawn in the kernel ------------------------------------------------------------------------------


def test_the_noise_is_reparameterize_kls_for_the_output_shape(device):
    """Shared Philox layout: K samples of (B, D) draw the noise reparameterize_kl draws for (K, B, D)."""
    shape = (pick(device, 5, 300), pick(device, 13, 129))
    zeros = torch.zeros(shape, device=device)
    torch.manual_seed(21)
    z, log_ratio = reparameterize_log_ratio(zeros, zeros, samples=3, backend="triton")  # z = eps exactly
    torch.manual_seed(21)
    eps, _ = reparameterize_kl(torch.zeros(3, *shape, device=device), torch.zeros(3, *shape, device=device),
                               backend="triton")
    assert torch.equal(z, eps)  # so its distribution is the one tests/test_reparameterize_kl.py checks
    assert (log_ratio == 0).all()  # q = p = N(0, I): eps^2 - z^2 is exactly 0


def test_drawn_noise_backward_regenerates_it(device):
    shape = (pick(device, 4, 300), pick(device, 9, 257))
    mu, logvar = gaussian(shape, device)
    zeros = torch.zeros(shape, device=device)
    torch.manual_seed(5)
    eps = reparameterize_log_ratio(zeros, zeros, samples=3, backend="triton")[0]  # the noise the next call draws
    torch.manual_seed(5)
    z, log_ratio = reparameterize_log_ratio(mu, logvar, samples=3, backend="triton")
    z_ref, log_ratio_ref = reparameterize_log_ratio_reference(mu, logvar, eps, samples=3)
    assert_close(z, z_ref)
    assert_close(log_ratio, log_ratio_ref, rtol=1e-4, atol=1e-4)
    grad_z, weights = torch.randn_like(z), torch.rand_like(log_ratio)
    got = torch.autograd.grad((z * grad_z).sum() + (log_ratio * weights).sum(), (mu, logvar))
    want = torch.autograd.grad((z_ref * grad_z).sum() + (log_ratio_ref * weights).sum(), (mu, logvar))
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()))


def test_same_seed_same_samples_and_calls_differ(device):
    mu, logvar = gaussian((5, 13), device)
    torch.manual_seed(1234)
    first = reparameterize_log_ratio(mu, logvar, samples=2, backend="triton")
    second = reparameterize_log_ratio(mu, logvar, samples=2, backend="triton")
    torch.manual_seed(1234)
    again = reparameterize_log_ratio(mu, logvar, samples=2, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.isclose(first[0], second[0]).any()
    assert not torch.equal(first[0][0], first[0][1])  # the samples differ from one another


def test_reference_path_draws_noise_with_torch():
    mu, logvar = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    z, log_ratio = reparameterize_log_ratio(mu, logvar, samples=2, generator=torch.Generator().manual_seed(3),
                                            backend="torch")
    eps = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z_ref, log_ratio_ref = reparameterize_log_ratio_reference(mu, logvar, eps, samples=2)
    assert z.dtype == log_ratio.dtype == torch.float64
    assert torch.equal(z, z_ref) and torch.equal(log_ratio, log_ratio_ref)


def test_the_log_ratio_averages_to_minus_the_kl(device):
    """E_q[log p(z) - log q(z)] = -KL(q || p): the mean over many samples within a few standard errors."""
    mu, logvar = gaussian((3, 6), device)
    prior_mu, prior_logvar = gaussian((6,), device)
    options = dict(prior_mu=prior_mu, prior_logvar=prior_logvar, backend="triton")
    n = pick(device, 4000, 100000)  # as an expansion: the interpreter runs a kernel's loop over samples slowly
    _, log_ratio = reparameterize_log_ratio(mu.expand(n, 3, 6), logvar.expand(n, 3, 6), **options)
    _, kl = reparameterize_kl(mu, logvar, **options)
    error = log_ratio.mean(0) + kl
    assert (error.abs() < 5 * log_ratio.std(0) / log_ratio.shape[0] ** 0.5).all(), error


# ---- higher orders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["given", "drawn", "given, requires grad"])
@pytest.mark.parametrize("prior", ["none", "per sample", "shared"])
def test_higher_orders(device, noise, prior):
    """Second and third derivatives against the reference on the same noise, in float64."""
    shape, samples = (3, pick(device, 5, 300)), 2
    mu, logvar = gaussian(shape, device)
    options = {}
    if prior != "none":
        prior_shape = (samples, *shape) if prior == "per sample" else shape[1:]
        options["prior_mu"], options["prior_logvar"] = gaussian(prior_shape, device)
    zeros = torch.zeros(shape, device=device)
    torch.manual_seed(5)
    eps = reparameterize_log_ratio(zeros, zeros, samples=samples, backend="triton")[0]
    if noise == "given, requires grad":
        eps.requires_grad_()
    torch.manual_seed(5)
    z, log_ratio = reparameterize_log_ratio(mu, logvar, None if noise == "drawn" else eps, samples=samples,
                                            logvar_limit=4.0, backend="triton", **options)
    wide = {name: as_float64(t) for name, t in dict(mu=mu, logvar=logvar, eps=eps, **options).items()}
    z_ref, log_ratio_ref = reparameterize_log_ratio_reference(
        wide["mu"], wide["logvar"], wide["eps"], samples=samples, logvar_limit=4.0,
        prior_mu=wide.get("prior_mu"), prior_logvar=wide.get("prior_logvar"),
    )
    names = [name for name in wide if wide[name].requires_grad]
    grad_z, weights = torch.randn(z.shape, device=device), torch.rand(log_ratio.shape, device=device)
    directions = [torch.randn(wide[n].shape, device=device) for n in names]

    def total(z, log_ratio):
        return (z.double() * grad_z).sum() + (log_ratio.double() * weights).sum()

    got = gradients_up_to_third(total(z, log_ratio), [dict(mu=mu, logvar=logvar, eps=eps, **options)[n] for n in names],
                                None, directions)
    want = gradients_up_to_third(total(z_ref, log_ratio_ref), [wide[n] for n in names], None, directions)
    for order, (got_order, want_order) in enumerate(zip(got, want), start=1):
        for name, g, w in zip(names, got_order, want_order):
            scale = max(1.0, w.abs().max().item())
            assert_close(g.double(), w, atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"order {order}, {name}: {m}")


# ---- torch.compile, host syncs ----------------------------------------------------------------------------------


class TinyIWAEHead(torch.nn.Module):
    def __init__(self, features=12, latent=5, samples=3):
        super().__init__()
        self.head, self.samples = torch.nn.Linear(features, 2 * latent), samples

    def forward(self, x, eps=None):
        mu, logvar = self.head(x).chunk(2, dim=-1)
        z, log_ratio = reparameterize_log_ratio(mu, logvar, eps, samples=self.samples, logvar_limit=5.0,
                                                backend="triton")
        log_w = log_ratio - (z**2).sum(-1)
        return -(torch.logsumexp(log_w, dim=0) - math.log(self.samples)).mean()


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    model = TinyIWAEHead().to(device)
    compiled = torch.compile(model, fullgraph=True)
    x, eps = torch.randn(6, 12, device=device), torch.randn(3, 6, 5, device=device)
    loss, loss_c = model(x, eps), compiled(x, eps)
    assert_close(loss_c, loss)
    assert_close(torch.autograd.grad(loss_c, model.head.weight)[0], torch.autograd.grad(loss, model.head.weight)[0])
    torch.manual_seed(5)
    loss = model(x)
    torch.manual_seed(5)
    loss_c = compiled(x)  # noise drawn inside the op: the same seed, the same draws
    assert_close(loss_c, loss)
    grad, grad_c = (torch.autograd.grad(value, model.head.weight)[0] for value in (loss, loss_c))
    assert_close(grad_c, grad)
    assert not torch.equal(compiled(x), compiled(x))


def test_no_host_sync(device):
    mu, logvar = gaussian((4, 6), device)
    prior_mu, prior_logvar = gaussian((6,), device)
    with no_host_sync():
        z, log_ratio = reparameterize_log_ratio(mu, logvar, samples=3, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                                logvar_limit=5.0, backend="triton")
        (z.sum() + log_ratio.sum()).backward()


def test_kernels_compile_for_a_cuda_target():
    """The interpreter runs code the compiler refuses: compile the variants as a GPU would (sm_90)."""
    from fastvae.kernels import reparameterize_log_ratio as kernels
    from tests.utils import compile_for_cuda

    def job(name, dtype, int_type, constexprs, device_state=False, prior_dtype=None):
        kernel = getattr(kernels, name)
        signature = {}
        for arg in kernel.arg_names:
            if arg == "philox_ptr":
                signature[arg] = "*i64" if device_state else "constexpr"
            elif arg.startswith("prior") and arg.endswith("_ptr") and prior_dtype is None:
                signature[arg] = "constexpr"
            elif arg.startswith("grad_prior") and prior_dtype is None:
                signature[arg] = "constexpr"
            elif arg == "logvar_limit" and "limit" not in constexprs:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*fp32" if arg in ("log_ratio_ptr", "grad_log_ratio_ptr") else f"*{dtype}"
            elif not arg.isupper():
                signature[arg] = "fp32" if arg == "logvar_limit" else int_type
        flags = {k: v for k, v in constexprs.items() if k != "limit"}
        # Vector loads with int32 indices, or lane by lane with int64 ones, the samples' tensors the other way in bf16.
        flags.update(ALIGNED=int_type == "i32", PRIOR_ALIGNED=int_type == "i32", SAMPLES_ALIGNED=dtype == "bf16",
                     INT64=int_type == "i64")
        nones = {arg: None for arg, kind in signature.items() if kind == "constexpr"}
        return kernels.__name__, name, signature, dict(flags, BLOCK_ROWS=8, BLOCK_GROUPS=128, **nones), 8

    def forward(has_eps, per_sample=False):
        return dict(HAS_EPS=has_eps, PRIOR_MU_PER_SAMPLE=per_sample, PRIOR_LOGVAR_PER_SAMPLE=per_sample)

    def backward(grad_z, grad_log_ratio, has_eps, per_sample=False):
        return dict(HAS_GRAD_Z=grad_z, HAS_GRAD_LOG_RATIO=grad_log_ratio, HAS_EPS=has_eps,
                    PRIOR_MU_PER_SAMPLE=per_sample, PRIOR_LOGVAR_PER_SAMPLE=per_sample)

    jobs = []
    for dtype, int_type in (("fp32", "i32"), ("bf16", "i64")):  # each flag both ways across the variants
        jobs += [
            job("_log_ratio_forward_kernel", dtype, int_type, forward(False)),
            job("_log_ratio_forward_kernel", dtype, int_type, dict(forward(True, True), limit=True), prior_dtype=dtype),
            job("_log_ratio_forward_kernel", dtype, int_type, dict(forward(False), limit=True), prior_dtype=dtype),
            job("_log_ratio_backward_kernel", dtype, int_type, dict(backward(True, True, False, True), limit=True),
                prior_dtype=dtype),
            job("_log_ratio_backward_kernel", dtype, int_type, dict(backward(True, True, True), limit=True),
                prior_dtype=dtype),
            job("_log_ratio_backward_kernel", dtype, int_type, backward(True, False, False)),
            job("_log_ratio_backward_kernel", dtype, int_type, backward(False, True, True)),
        ]
    jobs += [job("_log_ratio_forward_kernel", "fp32", "i32", forward(False), device_state=True),
             job("_log_ratio_backward_kernel", "fp32", "i32", backward(True, True, False), device_state=True)]
    compile_for_cuda(jobs)


# ---- bad input --------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "samples 0": ({"samples": 0}, ValueError, "samples"),
    "samples bool": ({"samples": True}, TypeError, "samples"),
    "samples float": ({"samples": 2.0}, TypeError, "samples"),
    "eps of mu's shape with samples": ({"samples": 2, "eps": torch.zeros(4, 3)}, ValueError, "eps"),
    "integer eps": ({"eps": torch.zeros(4, 3, dtype=torch.int32)}, TypeError, "eps"),
    "prior that does not broadcast": ({"samples": 2, "prior_mu": torch.zeros(3, 4, 3)}, ValueError, "prior_mu"),
    "prior larger than z": ({"prior_logvar": torch.zeros(2, 4, 3)}, ValueError, "prior_logvar"),
    "event_dims": ({"event_dims": 3}, ValueError, "event_dims"),
    "logvar_limit": ({"logvar_limit": -1.0}, ValueError, "logvar_limit"),
    "generator": ({"generator": 3}, TypeError, "generator"),
    "backend": ({"backend": "cuda"}, ValueError, "backend"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(case):
    kwargs, error, name = case
    with pytest.raises(error, match=name):
        reparameterize_log_ratio(torch.zeros(4, 3), torch.zeros(4, 3), **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match="logvar"):
        reparameterize_log_ratio(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="mu"):
        reparameterize_log_ratio(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64),
                                 backend="triton")
    with pytest.raises(ValueError, match="mu"):
        reparameterize_log_ratio(torch.tensor(0.0), torch.tensor(0.0))
