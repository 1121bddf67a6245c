"""fastvae.integrations.diffusers: the fused posterior of diffusers' AutoencoderKL against diffusers' own class.

Both of fastvae's paths are checked (the Triton kernels, under the interpreter on the CPU, and the reference
path), on a tiny AutoencoderKL: every output and every parameter's gradient, log-variances beyond diffusers'
clamp [-30, 20] included, and a short fine-tune whose loss must be the same at every step with and without the
patch. Skipped where diffusers is not installed (``pip install -e ".[test]"`` installs it).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import TOLERANCES, assert_close

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed")
BACKENDS = ["triton", "torch"]


def test_fastvae_imports_without_diffusers():
    """``import fastvae`` (and ``fastvae.integrations``) never imports diffusers; the integration itself, without
    diffusers, fails with an ImportError that says how to install it."""
    code = (
        "import sys\n"
        "sys.modules['diffusers'] = None  # as if it were not installed\n"
        "import fastvae, fastvae.integrations, fastvae.nn, fastvae.functional\n"
        "try:\n"
        "    import fastvae.integrations.diffusers\n"
        "except ImportError as error:\n"
        "    assert 'fastvae[diffusers]' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('imported without diffusers')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- a tiny AutoencoderKL --------------------------------------------------------------------------------------

LATENT_CHANNELS = 4


def tiny_autoencoder(device, seed=0):
    """An AutoencoderKL with two levels of 8 and 16 channels (44k parameters): 16x16 images, 8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=16,
    ).to(device)


@pytest.fixture
def patched():
    """Patch with the backend asked for; always unpatched afterwards."""
    from fastvae.integrations.diffusers import patch_autoencoder_kl, unpatch_autoencoder_kl

    yield patch_autoencoder_kl
    unpatch_autoencoder_kl()


def _posterior_class():
    from diffusers.models.autoencoders import autoencoder_kl

    return autoencoder_kl.DiagonalGaussianDistribution


@needs_diffusers
def test_patch_and_unpatch(device, patched):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from fastvae.integrations.diffusers import FusedDiagonalGaussianDistribution, unpatch_autoencoder_kl

    vae = tiny_autoencoder(device)  # built before the patch: encode looks the class up at each call
    x = torch.rand(1, 3, 16, 16, device=device)
    assert type(vae.encode(x).latent_dist) is DiagonalGaussianDistribution
    patched()
    posterior = vae.encode(x).latent_dist
    assert type(posterior) is FusedDiagonalGaussianDistribution and isinstance(posterior, DiagonalGaussianDistribution)
    assert isinstance(vae.encode(x, return_dict=False)[0], FusedDiagonalGaussianDistribution)
    patched(backend="torch")  # again, with a backend: replaces the patch
    posterior = vae.encode(x).latent_dist
    assert isinstance(posterior, FusedDiagonalGaussianDistribution) and posterior.backend == "torch"
    unpatch_autoencoder_kl()
    assert _posterior_class() is DiagonalGaussianDistribution
    assert type(vae.encode(x).latent_dist) is DiagonalGaussianDistribution
    unpatch_autoencoder_kl()  # a no-op when not patched
    assert _posterior_class() is DiagonalGaussianDistribution


@needs_diffusers
def test_tiled_encode_is_patched_too(device, patched):
    from fastvae.integrations.diffusers import FusedDiagonalGaussianDistribution

    vae = tiny_autoencoder(device)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 8, 4  # 16x16 images in 8x8 tiles
    patched(backend="torch")
    posterior = vae.encode(torch.rand(1, 3, 16, 16, device=device)).latent_dist
    assert isinstance(posterior, FusedDiagonalGaussianDistribution)


@needs_diffusers
def test_bad_backend_is_a_value_error(patched):
    from fastvae.integrations.diffusers import FusedDiagonalGaussianDistribution

    with pytest.raises(ValueError, match="backend"):
        patched(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        FusedDiagonalGaussianDistribution(torch.zeros(1, 2, 2, 2), backend="fast")


# ---- parity with diffusers' class, end to end ----------------------------------------------------------------


def _beyond_the_clamp(vae, device):
    """Push two log-variance channels of the encoder's output beyond diffusers' clamp: one above 20, one below
    -30 (their gradients must be 0, as through torch.clamp); the other two stay in range."""
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS : LATENT_CHANNELS + 2] += torch.tensor([35.0, -45.0], device=device)


def _step_outputs(vae, x, prior_h, generator_seed):
    """Everything a posterior gives (z, kl, kl(other), nll, mode, its attributes), and a loss through them."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    device = x.device
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=torch.Generator(device).manual_seed(generator_seed))
    other = DiagonalGaussianDistribution(prior_h)  # diffusers' own class, as a prior
    outputs = {
        "z": z,
        "kl": posterior.kl(),
        "kl(other)": posterior.kl(other),
        "kl(other) fused": posterior.kl(type(posterior)(prior_h)),  # a prior of the posterior's own class
        "mode": posterior.mode(),
        "mean": posterior.mean,
        "logvar": posterior.logvar,
        "std": posterior.std,
        "var": posterior.var,
    }
    # The KL's terms reach 1e10 here (var = e^20): weigh them down to the reconstruction's scale.
    loss = (vae.decode(z).sample - x).abs().mean() + 1e-10 * (outputs["kl"].sum() + outputs["kl(other)"].sum())
    loss = loss + 1e-10 * outputs["kl(other) fused"].sum()
    return posterior, outputs, loss


@needs_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
def test_autoencoder_kl_matches_diffusers(device, backend, patched):
    """z (the same generator state, the same noise), kl, kl(other), nll, mode, the attributes, and every
    parameter's gradient (and the prior's), with log-variances beyond [-30, 20], patched against diffusers."""
    from fastvae.integrations.diffusers import unpatch_autoencoder_kl

    vae = tiny_autoencoder(device)
    _beyond_the_clamp(vae, device)
    x = torch.rand(2, 3, 16, 16, device=device) * 2 - 1
    prior_h = torch.randn(2, 2 * LATENT_CHANNELS, 8, 8, device=device)
    prior_h[:, LATENT_CHANNELS:] *= 30  # some prior log-variances beyond the clamp too
    runs = {}
    for patch in (False, True):
        if patch:
            patched(backend=backend)
        else:
            unpatch_autoencoder_kl()
        vae.zero_grad()
        h = prior_h.clone().requires_grad_()
        posterior, outputs, loss = _step_outputs(vae, x, h, generator_seed=7)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in vae.named_parameters()} | {"prior": h.grad.clone()}
        # nll of one sample (diffusers' z), by each class: diffusers' own code in both.
        sample = runs[False][0]["z"] if patch else outputs["z"]
        runs[patch] = outputs | {"nll": posterior.nll(sample)}, grads
    (want, want_grads), (got, got_grads) = runs[False], runs[True]
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert name == "z" or g.stride() == w.stride(), name  # z: contiguous from the kernels, any layout serves
        if backend == "torch" and name in ("z", "mean", "logvar", "std", "var", "mode", "nll"):
            assert torch.equal(g, w), name  # the same float32 operations as diffusers'
        # KL sums of up to 256 terms of up to 1e10; z's noise scaled by up to e^10.
        assert_close(g, w, rtol=1e-5, atol=1e-6 * max(1.0, w.abs().max().item()), msg=lambda m: f"{name}: {m}")
    logvar = want["logvar"]
    assert logvar.max() == 20 and logvar.min() == -30  # the clamp did act
    assert want["z"].is_contiguous(memory_format=torch.channels_last)  # the encoder's layout, from its attention
    scale = max(w.abs().max().item() for w in want_grads.values())
    for name, w in want_grads.items():
        # The gradients' scale: terms of the largest gradient cancel in some (an attention key's bias has a
        # gradient of exactly 0 in exact arithmetic), so their error is relative to it.
        assert_close(got_grads[name], w, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")
    # The gradient reaches the encoder through the log-variances in range only.
    grad_bias = got_grads["quant_conv.bias"][LATENT_CHANNELS:]
    assert (grad_bias[:2] == 0).all() and (grad_bias[2:] != 0).all()


# ---- the class alone: the clamp's ends, video latents, half precision, deterministic ---------------------------


def _both(parameters, backend, **options):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from fastvae.integrations.diffusers import FusedDiagonalGaussianDistribution

    return (DiagonalGaussianDistribution(parameters, **options),
            FusedDiagonalGaussianDistribution(parameters, backend=backend, **options))


def _compare(parameters, backend, prior=None, tol=None, check_grads=True):
    """sample, kl, kl(prior) and mode of both classes on ``parameters``, and their gradients in ``parameters``
    (and ``prior``) from random weights of each output."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    tol = tol or dict(rtol=1e-5, atol=1e-5)
    results = []
    for distribution in _both(parameters, backend):
        generator = torch.Generator(parameters.device).manual_seed(11)
        outputs = [distribution.sample(generator), distribution.kl(), distribution.mode()]
        if prior is not None:
            outputs.append(distribution.kl(DiagonalGaussianDistribution(prior)))
        results.append(outputs)
    torch.manual_seed(0)
    weights = [torch.rand(out.shape, device=parameters.device) for out in results[0]]
    for i, (want, got) in enumerate(zip(*results)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert i == 0 or got.stride() == want.stride()  # kl, mode as diffusers'; z: contiguous from the kernels
        assert_close(got, want, **tol, msg=lambda m: f"{m}")
    if check_grads:
        inputs = [parameters] + ([prior] if prior is not None else [])
        grads = [torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(outputs, weights)), inputs)
                 for outputs in results]
        for want, got in zip(*grads):
            assert_close(got, want, **tol)
    return results


@needs_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_ends_are_diffusers(device, backend):
    """Log-variances at -30 and 20 exactly (gradient 1, as torch.clamp), and a float32 step beyond (0)."""
    edges = torch.tensor([-31.0, torch.nextafter(torch.tensor(-30.0), torch.tensor(-31.0)).item(), -30.0, -29.5,
                          1.0, 19.5, 20.0, torch.nextafter(torch.tensor(20.0), torch.tensor(21.0)).item()])
    parameters = torch.randn(2, 2, 2, 8, device=device)
    parameters[:, 1] = edges.to(device)
    parameters.requires_grad_()
    _compare(parameters, backend, tol=dict(rtol=1e-5, atol=1e-3))  # z up to e^10 in size, KL up to e^20
    _, fused = _both(parameters, backend)
    fused.sample()
    (grad,) = torch.autograd.grad(fused.kl().sum(), parameters)
    want = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0], dtype=torch.bool, device=device)
    assert ((grad[:, 1] != 0) == want).all()


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": "channels_last"}


@needs_diffusers
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_video_latents_are_diffusers(device, backend, layout):
    """5-D latents (B, 2C, T, H, W): diffusers sums its KL over dims 1, 2, 3 and keeps the last, and so does the
    fused class (the op reads a permuted view); z comes back contiguous."""
    parameters = torch.randn(2, 6, 3, 4, 5, device=device) * 3
    memory_format = torch.channels_last_3d if layout == "channels_last" else layout
    parameters = parameters.contiguous(memory_format=memory_format).requires_grad_()
    prior = (torch.randn(2, 6, 3, 4, 5, device=device) * 3).requires_grad_()
    (_, kl, _, _), _ = _compare(parameters, backend, prior=prior)
    assert kl.shape == (2, 5)


@needs_diffusers
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_both_layouts(device, monkeypatch, layout):
    """The channel halves of a contiguous encoder output reach the kernels where they lie, forward and backward;
    those of a channels_last one (AutoencoderKL's on the CPU, its mid-block attention reshaping to that layout)
    are copied inside the op. Against diffusers in both, with a prior of the other layout too."""
    from fastvae.kernels import reparameterize_kl as kernels

    copies = []

    def spy(tensor, shape, event_dims):
        view, strides = split_rows(tensor, shape, event_dims)
        copies.append(view.data_ptr() != tensor.data_ptr())
        return view, strides

    split_rows = kernels.split_rows
    monkeypatch.setattr(kernels, "split_rows", spy)
    memory_format = torch.channels_last if layout == "channels_last" else layout
    parameters = torch.randn(2, 8, 5, 6, device=device).contiguous(memory_format=memory_format).requires_grad_()
    _compare(parameters, "triton")
    assert copies and any(copies) == (layout == "channels_last")
    prior = torch.randn(2, 8, 5, 6, device=device).requires_grad_()  # contiguous: read with strides where needed
    _compare(parameters, "triton", prior=prior)


@needs_diffusers
def test_latents_of_fewer_dims_take_diffusers_code(device):
    parameters = torch.randn(2, 6, 5, device=device)
    diffusers_one, fused = _both(parameters, "triton")
    z = fused.sample(torch.Generator(device).manual_seed(3))
    assert torch.equal(z, diffusers_one.sample(torch.Generator(device).manual_seed(3)))
    assert torch.equal(fused.mode(), diffusers_one.mode())


@needs_diffusers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_gives_diffusers_dtypes(device, backend, dtype):
    """Half-precision parameters: z and the KL in that dtype, as diffusers returns them, and the values it gives
    (diffusers rounds each intermediate to the half dtype; the fused op rounds once)."""
    parameters = torch.randn(2, 8, 4, 4, device=device) * 2
    parameters[0, 4, 0] = torch.tensor([-40.0, 25.0, -30.0, 20.0])  # beyond and at the clamp
    parameters = parameters.to(dtype).requires_grad_()
    tol = dict(TOLERANCES[dtype])
    tol["atol"] = tol["atol"] * 30  # values up to e^10 (z) and sums of 64 terms (the KL) in half precision
    _compare(parameters, backend, tol=dict(rtol=tol["rtol"], atol=tol["atol"]), check_grads=False)


@needs_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_is_diffusers(device, backend):
    parameters = torch.randn(2, 8, 3, 3, device=device)
    want, got = _both(parameters, backend, deterministic=True)
    for name in ("std", "var", "mean", "logvar"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.std is got.var  # one tensor of zeros, as diffusers has it
    seed = torch.Generator(device)
    assert torch.equal(got.sample(seed.manual_seed(1)), want.sample(seed.manual_seed(1)))
    for method in ("kl", "mode"):
        assert torch.equal(getattr(got, method)(), getattr(want, method)()), method
    assert torch.equal(got.nll(parameters[:, :4]), want.nll(parameters[:, :4]))


@needs_diffusers
def test_attributes_are_computed_only_when_read(device):
    """The fused path never computes std, var or the clamped logvar: they are built the first time they are read."""
    from fastvae.integrations.diffusers import FusedDiagonalGaussianDistribution

    posterior = FusedDiagonalGaussianDistribution(torch.randn(1, 8, 2, 2, device=device), backend="torch")
    posterior.sample()
    posterior.kl()
    assert not {"std", "var", "logvar"} & set(vars(posterior))
    assert torch.equal(posterior.var, torch.exp(posterior.logvar)) and {"var", "logvar"} <= set(vars(posterior))


@needs_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_before_sample_draws_no_noise(device, backend):
    """kl() without a sample computes the KL (fused, with zero noise) and leaves the generators alone."""
    parameters = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    want, got = _both(parameters, backend)
    state = torch.get_rng_state()
    kl = got.kl()
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(kl, want.kl(), rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(k.sum(), parameters)[0] for k in (kl, want.kl())]
    assert_close(*grads)


@needs_diffusers
def test_torch_compile_fullgraph(device):
    """The fused posterior compiles without a graph break; with Inductor drawing random numbers as eager torch
    does (``fallback_random``), it gives eager's z, KL and gradient."""
    import torch._inductor.config

    from fastvae.integrations.diffusers import FusedDiagonalGaussianDistribution

    def posterior(h):
        distribution = FusedDiagonalGaussianDistribution(h, backend="triton")
        return distribution.sample(), distribution.kl()

    torch._dynamo.reset()
    h = torch.randn(2, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(0)
        z, kl = torch.compile(posterior, fullgraph=True)(h)
    torch.manual_seed(0)
    z_eager, kl_eager = posterior(h)
    assert_close(z, z_eager)
    assert_close(kl, kl_eager)
    grads = [torch.autograd.grad((a * torch.arange(a.numel(), device=device).view_as(a)).sum() + b.sum(), h)[0]
             for a, b in ((z, kl), (z_eager, kl_eager))]
    assert_close(*grads)


# ---- the convergence test: a short fine-tune, with and without the patch ----------------------------------------

FINETUNE_STEPS = 12


def _finetune(device, kl_weight=1e-3):
    """Losses of FINETUNE_STEPS Adam steps of L1 reconstruction + KL on fixed images, and the final parameters."""
    vae = tiny_autoencoder(device, seed=1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(2)
    images = (torch.rand(4, 3, 16, 16, generator=data) * 2 - 1).to(device)
    noise = torch.Generator(device).manual_seed(3)
    losses = []
    for step in range(FINETUNE_STEPS):
        batch = images[2 * (step % 2) : 2 * (step % 2) + 2]
        posterior = vae.encode(batch).latent_dist
        z = posterior.sample(generator=noise)
        loss = (vae.decode(z).sample - batch).abs().mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    # An attention key's bias has a gradient of exactly 0 in exact arithmetic (softmax ignores a constant added to
    # a query's scores): what it gets is rounding noise, which Adam turns into steps of any size up to lr. It is
    # left out of the final parameters compared (it changes no loss).
    params = [p.detach().flatten() for name, p in vae.named_parameters() if not name.endswith("to_k.bias")]
    return torch.stack(losses), torch.cat(params)


@needs_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_converges_as_with_diffusers(device, backend, patched):
    """Liger-Kernel's convergence test: the same loss at every step, and the same final parameters.

    Each step's gradients agree to about 1e-7 relative (float32 rounding, the KL summed in another order), and
    after a dozen Adam steps the losses agree to well within 1e-5 relative. A parameter agrees to a tenth of one
    Adam step (lr = 1e-3): Adam's first step is lr times the sign of the gradient, whatever its size, so an element
    whose gradient is near 0 moves by a share of lr that rounding decides.
    """
    from fastvae.integrations.diffusers import unpatch_autoencoder_kl

    unpatch_autoencoder_kl()
    want_losses, want_params = _finetune(device)
    patched(backend=backend)
    got_losses, got_params = _finetune(device)
    assert (want_losses[1:] != want_losses[0]).all()  # it trained: every step moved the loss
    assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-6)
    assert_close(got_params, want_params, rtol=1e-4, atol=1e-4)


# ---- the counts docs/diffusers.md quotes ----------------------------------------------------------------------


@needs_diffusers
def test_posterior_counts_are_the_documented_ones():
    """``python -m benchmarks.autoencoder_kl --counts``' posterior rows (SD's latent, batch 8, float32), as
    docs/diffusers.md quotes them: kernels, units moved and kept, forward and backward, in both layouts.

    diffusers, forward: clamp, mul, exp, exp, randn, mul, add, pow, add, sub, sub, sum (2+2+2+2+1+3+3+2+3+2+3+1 =
    26 units) and a mul of the per-image sums; it keeps std, var and the noise (3 units). fastvae: randn (1) and
    the kernel (mu, logvar, noise -> z: 4), a sum of the KL's partials; backward the kernel (grad_z, mu, logvar,
    noise -> two gradients: 6) and the chunk's cat (4); it keeps the noise (1). A channels_last encoder output:
    the op copies both channel halves to contiguous ones, forward and backward (2 kernels, 4 units each way).
    """
    from fastvae.backend import kernels_interpreted

    if not kernels_interpreted():
        pytest.skip("records fastvae's launches on CPU tensors, which needs TRITON_INTERPRET=1")
    from benchmarks.autoencoder_kl import count_posterior

    want = {
        ("diffusers", "channels_last"): ((13, 18), (26.0, 35.5), 3.0),
        ("fastvae", "channels_last"): ((5, 4), (9.0, 14.0), 1.0),
        ("diffusers", "contiguous"): ((13, 18), (26.0, 35.5), 3.0),
        ("fastvae", "contiguous"): ((3, 2), (5.0, 10.0), 1.0),
    }
    for (impl, layout), (kernels, units, kept) in want.items():
        counts = count_posterior((4, 64, 64), torch.float32, impl, batch=8, layout=layout)
        unit = counts["unit_bytes"]
        assert (counts["forward"]["kernels"], counts["backward"]["kernels"]) == kernels, impl
        assert (round(counts["forward"]["bytes"] / unit, 2), round(counts["backward"]["bytes"] / unit, 2)) == units
        assert round(counts["kept_bytes"] / unit, 2) == kept, impl


# ---- the example ---------------------------------------------------------------------------------------------

EXAMPLE = str(Path(__file__).parents[1] / "examples" / "finetune_autoencoder_kl.py")
TINY_EXAMPLE = ["--data", "digits", "--num-images", "24", "--image-size", "16", "--channels", "8,16", "--batch-size",
                "4", "--steps", "3", "--log-every", "2"]


def _example(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, EXAMPLE, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


@needs_diffusers
@pytest.mark.parametrize("patch", ["patched", "--no-patch"])
def test_example_finetunes_and_saves(tmp_path, patch):
    """The example trains and saves, patched on the digits, unpatched on a folder of RGB images."""
    args = list(TINY_EXAMPLE)
    if patch == "--no-patch":
        from PIL import Image

        folder = tmp_path / "images"
        folder.mkdir()
        for i in range(6):
            Image.fromarray(torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
        args[args.index("--data") + 1] = str(folder)
        args[args.index("--num-images") : args.index("--num-images") + 2] = []
        args.append("--no-patch")
    result = _example(*args, "--out", tmp_path / "run")
    tmp_path = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step     2" in result.stdout and "step     3" in result.stdout and "held-out l1 error" in result.stdout
    assert ("diffusers' own posterior" in result.stdout) == (patch == "--no-patch")
    assert {"config.json", "diffusion_pytorch_model.safetensors", "reconstructions.png"} <= {
        p.name for p in tmp_path.iterdir()}


@needs_diffusers
@pytest.mark.parametrize("args, message", [
    (["--channels", "8,x"], "--channels"),
    (["--steps", "0"], "--steps"),
    (["--data", "nowhere.npz"], "--data"),
    (["--data", "digits", "--channels", "8,8,8,8,8", "--steps", "1"], "multiple of 16"),
])
def test_example_bad_input_is_one_line(args, message):
    result = _example(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
