"""The fused reparameterize + KL op against its PyTorch reference, through the Triton kernels themselves."""
import pytest
import torch

from fastvae.functional import reparameterize_kl
from fastvae.ops.reparameterize_kl import reparameterize_kl_reference
from tests.utils import assert_close, pick

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, device, dtype=torch.float32):
    mu = torch.randn(shape, device=device).to(dtype).requires_grad_()
    logvar = (0.5 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    eps = torch.randn(shape, device=device)
    return mu, logvar, eps


def grads_of(outputs, inputs, grad_outputs):
    """Gradients of ``sum(out * g)``: a grad_output that is not all ones, and None for an unused output."""
    total = sum((out * g).sum() for out, g in zip(outputs, grad_outputs) if g is not None)
    return torch.autograd.grad(total, inputs)


def check_against_reference(mu, logvar, eps, reduction="none", use_z=True, use_kl=True):
    z, kl = reparameterize_kl(mu, logvar, eps, reduction=reduction, backend="triton")
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps, reduction)
    assert z.shape == mu.shape and z.dtype == mu.dtype
    assert kl.shape == kl_ref.shape and kl.dtype == torch.float32
    assert_close(z, z_ref)
    assert_close(kl, kl_ref, dtype=mu.dtype)
    grad_z = torch.randn_like(z) if use_z else None
    grad_kl = torch.rand_like(kl) + 0.5 if use_kl else None
    got = grads_of((z, kl), (mu, logvar), (grad_z, grad_kl))
    want = grads_of((z_ref, kl_ref), (mu, logvar), (grad_z, grad_kl))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_close(g, w)


SHAPES = {
    "D=1": lambda dev: (pick(dev, 5, 4097), 1),
    "odd": lambda dev: (pick(dev, 3, 1001), pick(dev, 7, 129)),
    "BKD": lambda dev: (pick(dev, 2, 64), 3, pick(dev, 37, 515)),
    "above-one-block": lambda dev: (pick(dev, 3, 300), pick(dev, 4100, 70001)),
    "vector": lambda dev: (pick(dev, 9, 65536),),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(device, shape):
    check_against_reference(*make_inputs(shape(device), device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(device, dtype):
    check_against_reference(*make_inputs((pick(device, 6, 4096), pick(device, 33, 257)), device, dtype))


def test_mixed_dtypes(device):
    mu, logvar, eps = make_inputs((4, 19), device, torch.bfloat16)
    logvar = logvar.detach().float().requires_grad_()
    check_against_reference(mu, logvar, eps.half())


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("used", ["both", "z only", "kl only"])
def test_reductions_and_unused_outputs(device, reduction, used):
    mu, logvar, eps = make_inputs((pick(device, 2, 128), 5, pick(device, 11, 100)), device)
    check_against_reference(mu, logvar, eps, reduction, use_z=used != "kl only", use_kl=used != "z only")


def test_unused_outputs_give_zero_gradients(device):
    mu, logvar, eps = make_inputs((4, 10), device)
    z, kl = reparameterize_kl(mu, logvar, eps, backend="triton")
    grad_mu, grad_logvar = torch.autograd.grad(kl.sum(), (mu, logvar))
    assert_close(grad_mu, mu.detach())
    assert_close(grad_logvar, 0.5 * (logvar.detach().exp() - 1))


@pytest.mark.parametrize("layout", ["chunks", "transposed", "strided-leading"])
def test_non_contiguous_inputs(device, layout):
    rows, d = pick(device, 6, 1000), pick(device, 10, 300)
    if layout == "chunks":  # the usual encoder head: one linear output split in two
        h = torch.randn(rows, 2 * d, device=device, requires_grad=True)
        mu, logvar = h.chunk(2, dim=-1)
        eps = torch.randn(rows, 3 * d, device=device)[:, ::3]
    elif layout == "transposed":
        mu = torch.randn(d, rows, device=device).t().requires_grad_()
        logvar = torch.randn(d, rows, device=device).t().requires_grad_()
        eps = torch.randn(d, rows, device=device).t()
    else:
        mu = torch.randn(4, rows, d, device=device)[::2].requires_grad_()
        logvar = torch.randn(2, rows, 2 * d, device=device)[..., :d].requires_grad_()
        eps = torch.randn(2, rows, d, device=device)
    assert not mu.is_contiguous()
    check_against_reference(mu, logvar, eps)


def test_kernels_run_not_the_reference(device):
    mu, logvar, eps = make_inputs((3, 4), device)
    z, kl = reparameterize_kl(mu, logvar, eps, backend="triton")
    assert "fastvae_reparameterize_kl" in type(z.grad_fn).__name__


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_nan_and_inf_propagate_as_in_reference(device):
    mu, logvar, eps = make_inputs((4, 6), device)
    with torch.no_grad():
        mu[0, 1], logvar[1, 2], mu[2, 0], logvar[3, 3] = float("nan"), float("inf"), float("inf"), float("-inf")
    check_against_reference(mu, logvar, eps)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 5)])
def test_empty(device, shape):
    mu, logvar, eps = make_inputs(shape, device)
    z, kl = reparameterize_kl(mu, logvar, eps, backend="triton")
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps)
    assert z.shape == z_ref.shape and kl.shape == kl_ref.shape
    assert_close(kl, kl_ref)
    grad_mu, grad_logvar = torch.autograd.grad(z.sum() + kl.sum(), (mu, logvar))
    assert grad_mu.shape == mu.shape and grad_logvar.shape == logvar.shape
    z, kl = reparameterize_kl(mu, logvar, backend="triton")
    assert z.shape == mu.shape


def test_autocast_inputs(device):
    head = torch.nn.Linear(16, 2 * 8).to(device)
    x = torch.randn(5, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mu, logvar = head(x).chunk(2, dim=-1)
        assert mu.dtype == torch.bfloat16
        eps = torch.randn(mu.shape, device=device)
        z, kl = reparameterize_kl(mu, logvar, eps, backend="triton")
        z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps)
    assert_close(z, z_ref)
    assert_close(kl, kl_ref, dtype=torch.bfloat16)
    grad_z = torch.randn_like(z)
    got = torch.autograd.grad((z * grad_z).sum() + kl.sum(), (mu, logvar), retain_graph=True)
    want = torch.autograd.grad((z_ref * grad_z).sum() + kl_ref.sum(), (mu, logvar))
    for g, w in zip(got, want):
        assert_close(g, w)


# ---- noise drawn inside the kernel -------------------------------------------------------------


def test_drawn_noise_is_standard_normal(device):
    n = pick(device, 1 << 16, 1 << 22)
    mu, logvar = torch.zeros(n // 64, 64, device=device), torch.zeros(n // 64, 64, device=device)
    eps = reparameterize_kl(mu, logvar, backend="triton")[0].double().flatten()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1) < 10 * (2 / n) ** 0.5
    assert abs(((eps - eps.mean()) ** 3).mean().item()) < 0.05
    # Columns come in groups of four sharing a Philox round: they must be independent of each other.
    lanes = eps.view(-1, 4)
    assert torch.corrcoef(lanes.T.float()).sub(torch.eye(4, device=device)).abs().max() < 0.05
    assert (eps.abs() > 4).float().mean().item() < 1e-3


def test_same_seed_same_noise_and_consecutive_calls_differ(device):
    mu, logvar, _ = make_inputs((pick(device, 5, 500), pick(device, 13, 100)), device)
    torch.manual_seed(1234)
    z1, kl1 = reparameterize_kl(mu, logvar, backend="triton")
    z2, _ = reparameterize_kl(mu, logvar, backend="triton")
    torch.manual_seed(1234)
    z3, kl3 = reparameterize_kl(mu, logvar, backend="triton")
    assert torch.equal(z1, z3) and torch.equal(kl1, kl3)
    assert not torch.isclose(z1, z2).any()


def test_explicit_generator(device):
    mu, logvar, _ = make_inputs((4, 9), device)
    gen = torch.Generator(device=device).manual_seed(7)
    z1, _ = reparameterize_kl(mu, logvar, generator=gen, backend="triton")
    z2, _ = reparameterize_kl(mu, logvar, generator=gen, backend="triton")
    z3, _ = reparameterize_kl(mu, logvar, generator=torch.Generator(device=device).manual_seed(7), backend="triton")
    assert torch.equal(z1, z3) and not torch.equal(z1, z2)


def test_backward_regenerates_the_forward_noise(device):
    mu, logvar, _ = make_inputs((pick(device, 3, 300), 2, pick(device, 9, 257)), device)
    z, _ = reparameterize_kl(mu, logvar, backend="triton")
    grad_z = torch.randn_like(z)
    grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), grad_z)
    std = torch.exp(0.5 * logvar.detach())
    eps = (z.detach() - mu.detach()) / std  # the forward's noise, recovered from z
    assert_close(grad_mu, grad_z)
    assert_close(grad_logvar, 0.5 * grad_z * eps * std, rtol=1e-4, atol=1e-5)


def test_noise_does_not_depend_on_tiling(device, monkeypatch):
    from fastvae.kernels import launch

    mu, logvar, _ = make_inputs((pick(device, 7, 700), pick(device, 50, 300)), device)
    torch.manual_seed(99)
    z_default, _ = reparameterize_kl(mu, logvar, backend="triton")
    monkeypatch.setattr(launch, "BLOCK_ELEMENTS", 32)
    monkeypatch.setattr(launch, "target_programs", lambda device: 1000)
    torch.manual_seed(99)
    z_small_tiles, _ = reparameterize_kl(mu, logvar, backend="triton")
    assert_close(z_small_tiles, z_default, rtol=0, atol=0)


def test_reference_path_draws_noise_with_torch():
    mu, logvar = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    z, kl = reparameterize_kl(mu, logvar, generator=gen, backend="torch")
    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps)
    assert z.dtype == kl.dtype == torch.float64
    assert_close(z, z_ref)
    assert_close(kl, kl_ref)


# ---- torch.compile --------------------------------------------------------------------------------


class TinyEncoderHead(torch.nn.Module):
    def __init__(self, features=12, latent=5):
        super().__init__()
        self.head = torch.nn.Linear(features, 2 * latent)

    def forward(self, x, eps=None):
        mu, logvar = self.head(x).chunk(2, dim=-1)
        z, kl = reparameterize_kl(mu, logvar, eps, reduction="mean", backend="triton")
        return (z**2).sum(-1).mean() + kl


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    model = TinyEncoderHead().to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 12, device=device)
    eps = torch.randn(6, 5, device=device)
    loss, loss_c = model(x, eps), compiled(x, eps)
    assert_close(loss_c, loss)
    grad = torch.autograd.grad(loss, model.head.weight)[0]
    grad_c = torch.autograd.grad(loss_c, model.head.weight)[0]
    assert_close(grad_c, grad)
    # Noise drawn inside the op: the same seed gives the same loss compiled or not; calls differ.
    torch.manual_seed(5)
    loss = model(x)
    torch.manual_seed(5)
    loss_c = compiled(x)
    assert_close(loss_c, loss)
    assert not torch.equal(compiled(x), compiled(x))
    loss_c.backward()
    assert torch.isfinite(model.head.weight.grad).all()


# ---- bad input --------------------------------------------------------------------------------------

BAD_INPUTS = {
    "shapes differ": (lambda: (torch.zeros(2, 3), torch.zeros(2, 4)), {}, ValueError, "logvar"),
    "eps shape": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), {"eps": torch.zeros(3, 2)}, ValueError, "eps"),
    "integer mu": (lambda: (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)), {}, TypeError, "mu"),
    "bool logvar": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)), {}, TypeError, "logvar"),
    "integer eps": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), {"eps": torch.zeros(2, 3, dtype=torch.int32)},
                    TypeError, "eps"),
    "not a tensor": (lambda: ([[0.0]], torch.zeros(1, 1)), {}, TypeError, "mu"),
    "0-d": (lambda: (torch.tensor(0.0), torch.tensor(0.0)), {}, ValueError, "mu"),
    "devices differ": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3, device="meta")), {}, ValueError, "logvar"),
    "reduction": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), {"reduction": "avg"}, ValueError, "reduction"),
    "backend": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), {"backend": "cuda"}, ValueError, "backend"),
    "generator": (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), {"generator": 3}, TypeError, "generator"),
    "float64 on triton": (lambda: (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)),
                          {"backend": "triton"}, TypeError, "mu"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(case):
    make, kwargs, error, name = case
    mu, logvar = make()
    with pytest.raises(error, match=name):
        reparameterize_kl(mu, logvar, **kwargs)


def test_bad_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND"):
        reparameterize_kl(torch.zeros(2, 3), torch.zeros(2, 3))


def test_backend_from_environment(monkeypatch, device):
    mu, logvar, eps = make_inputs((2, 3), device)
    monkeypatch.setenv("FASTVAE_BACKEND", "triton")
    z, _ = reparameterize_kl(mu, logvar, eps)
    assert "fastvae" in type(z.grad_fn).__name__
    monkeypatch.setenv("FASTVAE_BACKEND", "torch")
    z, _ = reparameterize_kl(mu, logvar, eps)
    assert "fastvae" not in type(z.grad_fn).__name__


def test_auto_picks_reference_on_cpu_and_float64():
    mu, logvar = torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3)
    z, _ = reparameterize_kl(mu, logvar)
    assert "fastvae" not in type(z.grad_fn).__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with room for 2**31 elements")
def test_more_than_2_31_elements_cuda():
    rows, d = (1 << 31) // 4096 + 3, 4096
    mu = torch.zeros(rows, d, device="cuda", dtype=torch.bfloat16)
    logvar = torch.zeros(rows, d, device="cuda", dtype=torch.bfloat16)
    mu[-2:] = torch.randn(2, d, device="cuda", dtype=torch.bfloat16)
    logvar[-2:] = torch.randn(2, d, device="cuda", dtype=torch.bfloat16)
    eps = torch.ones(1, 1, device="cuda", dtype=torch.bfloat16).expand(rows, d)
    z, kl = reparameterize_kl(mu, logvar, eps, backend="triton")
    z_ref, kl_ref = reparameterize_kl_reference(mu[-2:], logvar[-2:], eps[-2:])
    assert_close(z[-2:], z_ref)
    assert_close(kl[-2:], kl_ref, dtype=torch.bfloat16)
    assert (kl[:-2] == 0).all()


def test_eps_that_requires_grad_gets_its_gradient(device):
    mu, logvar, eps = make_inputs((3, 7), device)
    eps.requires_grad_()
    z, kl = reparameterize_kl(mu, logvar, eps, backend="triton")
    z_ref, _ = reparameterize_kl_reference(mu, logvar, eps)
    grad_z = torch.randn_like(z)
    got = torch.autograd.grad(z, (mu, logvar, eps), grad_z)
    want = torch.autograd.grad(z_ref, (mu, logvar, eps), grad_z)
    for g, w in zip(got, want):
        assert_close(g, w)


class FakeCudaGenerator:
    """Stands in for a CUDA generator (a Philox seed and offset), which a CPU-only machine lacks."""

    device = torch.device("cuda")

    def __init__(self, seed, offset):
        self.seed, self.offset = seed, offset

    def initial_seed(self):
        return self.seed

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        assert offset % 4 == 0  # as CUDA generators demand
        self.offset = offset


def test_philox_state_from_a_cuda_generator_reserves_disjoint_counters():
    from fastvae.ops.rng import philox_seed_offset

    gen = FakeCudaGenerator(seed=2**64 - 5, offset=40)
    seed, first = philox_seed_offset(gen, torch.device("cuda"), n_rounds=7)
    assert seed == -5  # the unsigned seed's bits, as a signed int64
    assert first == 10 and gen.offset == 40 + 4 * 7  # counters 10..16 are ours
    _, second = philox_seed_offset(gen, torch.device("cuda"), n_rounds=3)
    assert second == 17  # the next call starts where this one ended


def _kernel_job(kernel_name, dtype, int_type, constexprs, device_state=None):
    """A compile job; ``device_state``: the Philox state read from memory (``True``) or scalar arguments."""
    from fastvae.kernels import reparameterize_kl as kernels

    kernel = getattr(kernels, kernel_name)
    signature = {}
    for name in kernel.arg_names:
        if name == "philox_ptr" and device_state is None:
            signature[name] = "constexpr"
        elif name == "philox_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("kl_ptr", "grad_kl_ptr") else f"*{dtype}"
        elif name == "logvar_limit":  # the soft clamp (the hard one's limits are absent: None)
            signature[name] = "fp32"
        elif name in ("logvar_min", "logvar_max"):
            signature[name] = "constexpr"
        elif not name.isupper():
            signature[name] = int_type
    clamps = {name: None for name in ("logvar_min", "logvar_max") if name in kernel.arg_names}
    constexprs = dict(constexprs, BLOCK_ROWS=8, BLOCK_GROUPS=128, **clamps,
                      **({} if device_state else {"philox_ptr": None}))
    return kernels.__name__, kernel_name, signature, constexprs, 8


def test_kernels_compile_for_a_cuda_target():
    """The interpreter runs code that compiled Triton refuses: compile every variant as a GPU would."""
    from tests.utils import compile_for_cuda

    jobs = []
    for dtype, int_type in (("fp32", "i32"), ("bf16", "i64"), ("fp16", "i32")):
        for has_eps in (True, False):
            jobs.append(_kernel_job("_reparameterize_kl_forward_kernel", dtype, int_type, dict(HAS_EPS=has_eps)))
            for grad_z, grad_kl in ((True, True), (True, False), (False, True)):
                flags = dict(HAS_GRAD_Z=grad_z, HAS_GRAD_KL=grad_kl, HAS_EPS=has_eps)
                jobs.append(_kernel_job("_reparameterize_kl_backward_kernel", dtype, int_type, flags))
    jobs += [_kernel_job("_standard_normal_kernel", "fp32", int_type, {}) for int_type in ("i32", "i64")]
    # The state read from memory (under CUDA-graph capture), noise drawn.
    for dtype in ("fp32", "bf16"):
        jobs.append(_kernel_job("_reparameterize_kl_forward_kernel", dtype, "i32", dict(HAS_EPS=False), True))
        flags = dict(HAS_GRAD_Z=True, HAS_GRAD_KL=True, HAS_EPS=False)
        jobs.append(_kernel_job("_reparameterize_kl_backward_kernel", dtype, "i32", flags, True))
    jobs.append(_kernel_job("_standard_normal_kernel", "fp32", "i32", {}, True))
    compile_for_cuda(jobs)


# ---- higher orders ----------------------------------------------------------------------------------


def test_drawn_noise_written_out_is_the_forwards(device):
    """draw_noise (for the differentiable backward) gives the kernels' noise bit for bit."""
    from fastvae.kernels.reparameterize_kl import draw_noise, philox_rounds
    from fastvae.ops.rng import philox_seed_offset

    shape = (pick(device, 3, 300), 2, pick(device, 9, 257))
    zeros = torch.zeros(shape, device=device)
    torch.manual_seed(11)
    z, _ = reparameterize_kl(zeros, zeros, backend="triton")  # z = 0 + e^0 * eps = eps, exactly
    torch.manual_seed(11)
    seed, first_counter = philox_seed_offset(None, device, philox_rounds(torch.Size(shape)))
    assert torch.equal(draw_noise(torch.Size(shape), device, seed, first_counter), z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("noise", ["given", "drawn", "given, requires grad"])
@pytest.mark.parametrize("used", ["both", "z only", "kl only"])
def test_higher_orders(device, used, noise, dtype):
    """Second and third derivatives against the reference on the same noise (issue 8: no autograd formula)."""
    from tests.utils import TOLERANCES, gradients_up_to_third

    shape = (3, 2, pick(device, 5, 300))
    mu, logvar, eps = make_inputs(shape, device, dtype)
    if noise == "drawn":
        torch.manual_seed(5)
        eps = reparameterize_kl(torch.zeros(shape, device=device), torch.zeros(shape, device=device),
                                backend="triton")[0]  # the noise the next call draws
        torch.manual_seed(5)
        z, kl = reparameterize_kl(mu, logvar, reduction="mean", backend="triton")
    else:
        if noise == "given, requires grad":
            eps.requires_grad_()
        z, kl = reparameterize_kl(mu, logvar, eps, reduction="mean", backend="triton")
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps, "mean")
    inputs = [mu, logvar] + ([eps] if eps.requires_grad else [])
    grad_z = torch.randn_like(z) if used != "kl only" else None
    grad_kl = torch.tensor(1.5, device=device) if used != "z only" else None
    directions = [torch.randn(t.shape, device=device) for t in inputs]

    def total(z, kl):
        return sum((out.float() * g).sum() for out, g in ((z, grad_z), (kl, grad_kl)) if g is not None)

    got = gradients_up_to_third(total(z, kl), inputs, None, directions)
    want = gradients_up_to_third(total(z_ref, kl_ref), inputs, None, directions)
    for order, (got_order, want_order) in enumerate(zip(got, want), start=1):
        for t, g, w in zip(inputs, got_order, want_order):
            assert g.shape == t.shape and g.dtype == t.dtype
            atol = TOLERANCES[dtype]["atol"] * (1 if dtype == torch.float32 else max(1.0, w.abs().max().item()))
            assert_close(g, w, atol=atol, msg=lambda m: f"order {order}: {m}")


def test_double_backward_directly(device):
    """The gradient of the gradient, as a gradient penalty takes it (it raised "no autograd formula")."""
    mu, logvar, eps = make_inputs((4, 6), device)
    results = {}
    for backend in ("triton", "torch"):
        z, kl = reparameterize_kl(mu, logvar, eps, backend=backend)
        grad_mu, grad_logvar = torch.autograd.grad((z**2).sum() + kl.sum(), (mu, logvar), create_graph=True)
        results[backend] = torch.autograd.grad((grad_mu**2).sum() + (grad_logvar**2).sum(), (mu, logvar))
    for g, w in zip(results["triton"], results["torch"]):
        assert_close(g, w)
