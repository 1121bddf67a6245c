"""Each fused op's gradients against its reference's in every combination of its options, through both of its
backward paths, with every nonlinearity in its working range: a chain-rule factor dropped anywhere fails here.

A fused op computes its gradients by hand twice: in its kernels (a plain backward) and in the torch ops a
``create_graph=True`` backward runs; the reference is differentiated by autograd. A factor left out of one of
them (a soft clamp's slope, the ``1 / B`` of a mean, an upstream gradient) survives every test whose inputs keep
that factor near 1, or that never reaches that combination of options. So here the clamps work far from their
identity region (slopes from 0.03 to 1), every upstream gradient is random, each output's gradient is checked on
its own (a term of one output is not hidden under a larger term of the other), and every combination is run.
"""
import itertools

import pytest
import torch

from fastvae.functional import discretized_logistic_mixture_nll, reconstruction_loss, reparameterize_kl
from fastvae.ops.discretized_logistic_mixture import discretized_logistic_mixture_nll_reference, params_per_component
from fastvae.ops.reconstruction_loss import reconstruction_loss_reference
from fastvae.ops.reparameterize_kl import reparameterize_kl_reference
from tests.utils import assert_close, summed_terms

BACKWARDS = ("kernels", "create_graph")


def check_gradients(outputs, references, inputs, upstreams, backward, label, tolerance=1e-5, term_scales=None):
    """Each output's gradients in ``inputs`` (then every output's at once) against the reference's, for one backward
    path, within ``tolerance`` of each gradient's largest element, or of ``term_scales[i]`` where larger (a
    broadcast input's gradient is a sum of terms that may cancel: float32 errs by units of the terms, not of the
    sum); under ``create_graph`` also a Hessian-vector product of the whole."""
    term_scales = term_scales or [0.0] * len(inputs)
    create_graph = backward == "create_graph"
    picks = [[i] for i in range(len(outputs))] + ([list(range(len(outputs)))] if len(outputs) > 1 else [])
    for pick in picks:
        got = torch.autograd.grad([outputs[i] for i in pick], inputs, [upstreams[i] for i in pick],
                                  retain_graph=True, create_graph=create_graph, allow_unused=True,
                                  materialize_grads=True)
        want = torch.autograd.grad([references[i] for i in pick], inputs, [upstreams[i] for i in pick],
                                   retain_graph=True, create_graph=create_graph, allow_unused=True,
                                   materialize_grads=True)
        for name, g, w, terms in zip(("input %d" % i for i in range(len(inputs))), got, want, term_scales):
            # Float32 math by other formulas: relative to each gradient's largest element (or term).
            assert_close(g, w, rtol=tolerance, atol=tolerance * max(w.abs().max().item(), terms, 1e-3),
                         msg=lambda m: f"{label}, outputs {pick}, {name}: {m}")
        if create_graph and all(g.requires_grad for g in want):
            directions = [torch.randn_like(t) for t in inputs]
            second = [
                torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, directions)), inputs, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
                for grads in (got, want)
            ]
            for i, (g, w) in enumerate(zip(*second)):
                assert_close(g, w, rtol=1e-4, atol=1e-4 * max(w.abs().max().item(), 1e-3),
                             msg=lambda m: f"{label}, outputs {pick}, second order, input {i}: {m}")


# ---- reparameterize_kl -------------------------------------------------------------------------------------

SHAPE = (3, 2, 4)  # event_dims=2: one KL per row of 8 elements
PRIOR_FORMS = {"same shape": SHAPE, "shared": SHAPE[1:], "broadcast": (SHAPE[0], 1, SHAPE[2])}
PRIORS = [("none", None)] + [(part, form) for part in ("mu", "logvar", "both") for form in PRIOR_FORMS]
NOISES = ("given", "given, requires grad", "drawn")
LIMIT = 2.0
# The soft clamp L tanh(x / L) and the hard one, torch.clamp to [-L, L] (gradient 1 inside, 0 outside).
CLAMPS = {"soft clamp": {"logvar_limit": LIMIT}, "hard clamp": {"logvar_clamp": (-LIMIT, LIMIT)}}


def wide_logvar(shape):
    """Log-variances across [-2.5 L, 2.5 L]: the soft clamp's slope from 0.03 to 1; the hard clamp's 1 inside
    [-L, L] and 0 beyond it."""
    return (LIMIT * (5 * torch.rand(shape) - 2.5)).requires_grad_()


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p[0] if p[1] is None else f"{p[0]} {p[1]}")
def test_reparameterize_kl(device, prior, noise, clamp, backward):
    part, form = prior
    mu, logvar = torch.randn(SHAPE, requires_grad=True), wide_logvar(SHAPE)
    options = {"event_dims": 2, **CLAMPS[clamp]}
    if part in ("mu", "both"):
        options["prior_mu"] = torch.randn(PRIOR_FORMS[form], requires_grad=True)
    if part in ("logvar", "both"):
        options["prior_logvar"] = wide_logvar(PRIOR_FORMS[form])
    inputs = [mu, logvar] + [options[k] for k in ("prior_mu", "prior_logvar") if k in options]
    if noise == "drawn":
        torch.manual_seed(11)
        eps = reparameterize_kl(torch.zeros(SHAPE), torch.zeros(SHAPE), event_dims=2, backend="triton")[0]
        torch.manual_seed(11)  # the next call draws the same noise
    else:
        eps = torch.randn(SHAPE, requires_grad=noise == "given, requires grad")
        inputs += [eps] if eps.requires_grad else []
    moved = [t.to(device).detach().requires_grad_(t.requires_grad) for t in inputs]
    on_device = dict(zip(map(id, inputs), moved))
    mu, logvar = on_device[id(mu)], on_device[id(logvar)]
    options = {k: on_device[id(v)] if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    eps = on_device.get(id(eps), eps.to(device))
    z, kl = reparameterize_kl(mu, logvar, None if noise == "drawn" else eps, backend="triton", **options)
    references = reparameterize_kl_reference(mu, logvar, eps, **options)
    assert "fastvae" in type(z.grad_fn).__name__  # the kernels ran
    upstreams = [torch.randn_like(z), torch.rand_like(kl) + 0.5]
    check_gradients([z, kl], references, moved, upstreams, backward, f"{part} prior {form}, {noise} noise, {clamp}")


# ---- reconstruction_loss -----------------------------------------------------------------------------------

LOSS_SHAPE = (3, 2, 5)
LOGVAR_FORMS = {"per element": LOSS_SHAPE, "per feature": LOSS_SHAPE[1:], "per channel": (2, 1), "scalar": (),
                "per sample": (3, 1, 1)}
LOSSES = [("mse", None), ("l1", None), ("bce", None)] + [("gaussian", form) for form in LOGVAR_FORMS]
REQUIRES = [flags for flags in itertools.product((False, True), repeat=3) if any(flags)]


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: loss[0] if loss[1] is None else f"{loss[0]} {loss[1]}")
def test_reconstruction_loss(device, loss, reduction, backward):
    """Every subset of (x_hat, x, logvar) requiring grad; logvar across [-4, 4] (weights e^-logvar from 0.02 to 55);
    BCE's logits across [-6, 6] (sigmoid's slope from 0.002 to 0.25)."""
    kind, form = loss
    for flags in REQUIRES:
        if kind != "gaussian" and flags[2]:
            continue
        x_hat = (6 * (2 * torch.rand(LOSS_SHAPE) - 1) if kind == "bce" else torch.randn(LOSS_SHAPE)).to(device)
        x = (torch.rand(LOSS_SHAPE) if kind == "bce" else torch.randn(LOSS_SHAPE)).to(device)
        logvar = (8 * torch.rand(LOGVAR_FORMS[form]) - 4).to(device) if kind == "gaussian" else None
        tensors = [t.requires_grad_(flag) for t, flag in zip((x_hat, x, logvar), flags) if t is not None]
        inputs = [t for t in tensors if t.requires_grad]
        out = reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend="triton")
        want = reconstruction_loss_reference(x_hat, x, kind, reduction, logvar)
        assert "fastvae" in type(out.grad_fn).__name__
        upstream = torch.rand_like(out) + 0.5
        scales = [logvar_terms(kind, reduction, x_hat, x, logvar, upstream) if t is logvar else 0.0 for t in inputs]
        check_gradients([out], [want], inputs, [upstream], backward, f"requires grad {flags}", term_scales=scales)


def logvar_terms(kind, reduction, x_hat, x, logvar, upstream) -> float:
    """The largest sum of |terms| that a broadcast ``logvar``'s gradient adds up (seed 33: a scalar logvar's
    gradient of -0.0075, a sum of 30 terms, 4.4e-7 apart on the two paths)."""
    def total_of(full):
        return (reconstruction_loss_reference(x_hat.detach(), x.detach(), kind, reduction, full) * upstream).sum()

    return summed_terms(total_of, logvar, x_hat.shape)


# ---- the discretized mixture of logistics --------------------------------------------------------------------


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
@pytest.mark.parametrize("mixture", [(1, 1), (3, 2)], ids=["C=1 M=1", "C=3 M=2"])
def test_discretized_logistic_mixture(device, mixture, reduction, backward):
    """Log-scales across [-9, 2] (some below the clamp at -7, whose gradient is 0), coefficients across [-3, 3]
    (tanh's slope from 0.01 to 1), means across the levels and beyond, every level: against the reference."""
    channels, m = mixture
    batch, pixels = 3, 8
    logits = torch.randn(batch, m, pixels)
    means = 1.5 * (2 * torch.rand(batch, channels * m, pixels) - 1)
    log_scales = 11 * torch.rand(batch, channels * m, pixels) - 9
    coefs = 6 * torch.rand(batch, channels * (channels - 1) // 2 * m, pixels) - 3
    params = torch.cat([logits, means, log_scales, coefs], dim=1).to(device).requires_grad_()
    assert params.shape[1] == m * params_per_component(channels)
    x = (torch.randint(0, 256, (batch, channels, pixels)) / 255).to(device)
    out = discretized_logistic_mixture_nll(params, x, num_mixtures=m, reduction=reduction, backend="triton")
    want = discretized_logistic_mixture_nll_reference(params, x, m, 8, reduction)
    assert "fastvae" in type(out.grad_fn).__name__
    # At a log-scale near -7 (inv = e^7) float32 rounding of a and b moves the gradients by up to ~6e-5 of their
    # size, on either path (see test_log_scale_clamp_passes_the_gradient_at_minus_seven).
    check_gradients([out], [want], [params], [torch.rand_like(out) + 0.5], backward, reduction, tolerance=3e-4)
