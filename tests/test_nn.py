"""fastvae.nn layers against the reference path, and their own contracts."""

import math

import pytest
import torch

from fastvae.functional import reconstruction_loss, reparameterize_kl
from fastvae.nn import (
    ConvGaussianLatent,
    GaussianLatent,
    ReconstructionLoss,
    ReparamKL,
    free_bits_kl,
    soft_clamp,
)
from tests.utils import assert_close


def grads(loss: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reparam_kl_module_is_the_op(device, reduction):
    mu = torch.randn(5, 7, device=device, requires_grad=True)
    logvar = torch.randn(5, 7, device=device, requires_grad=True)
    eps = torch.randn(5, 7, device=device)
    z, kl = ReparamKL(reduction, backend="triton")(mu, logvar, eps)
    z_ref, kl_ref = reparameterize_kl(mu, logvar, eps, reduction=reduction, backend="torch")
    assert_close(z, z_ref)
    assert_close(kl, kl_ref)
    weights = torch.rand_like(z)  # a grad_output that is not all ones
    loss, loss_ref = (z * weights).sum() + kl.sum(), (z_ref * weights).sum() + kl_ref.sum()
    for g, g_ref in zip(grads(loss, (mu, logvar)), grads(loss_ref, (mu, logvar))):
        assert_close(g, g_ref)


def test_reparam_kl_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        ReparamKL("average")


@pytest.mark.parametrize("leading", [(6,), (2, 3)])
def test_gaussian_latent_matches_its_formula_and_the_reference(device, leading):
    torch.manual_seed(0)
    layer = GaussianLatent(9, 4, backend="triton").to(device)
    reference = GaussianLatent(9, 4, backend="torch").to(device)
    reference.load_state_dict(layer.state_dict())
    h = torch.randn(*leading, 9, device=device)
    eps = torch.randn(*leading, 4, device=device)
    out, ref = layer(h, eps), reference(h, eps)
    # By hand: the head gives [mu, logvar]; z = mu + sigma * eps with sigma = exp(logvar / 2).
    mu, logvar = torch.nn.functional.linear(h, layer.head.weight, layer.head.bias).chunk(2, dim=-1)
    assert_close(ref.mu, mu)
    assert_close(ref.logvar, logvar)
    assert_close(ref.z, mu + torch.exp(0.5 * logvar) * eps)
    assert_close(ref.kl, -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1))
    assert ref.kl.shape == leading
    for name in ("z", "kl", "mu", "logvar"):
        assert_close(getattr(out, name), getattr(ref, name))
    weights = torch.rand_like(out.z)
    loss, loss_ref = (out.z * weights).sum() + out.kl.sum(), (ref.z * weights).sum() + ref.kl.sum()
    for g, g_ref in zip(grads(loss, layer.parameters()), grads(loss_ref, reference.parameters())):
        assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_gaussian_latent_samples_in_training_and_can_return_the_mean_in_eval():
    layer = GaussianLatent(8, 3, mean_in_eval=True)
    h = torch.randn(4, 8)
    sampled = layer(h)
    assert not torch.allclose(sampled.z, sampled.mu)
    layer.eval()
    mean = layer(h)
    assert torch.equal(mean.z, mean.mu)
    assert_close(mean.kl, sampled.kl)
    # Without the flag, eval mode samples too.
    layer.mean_in_eval = False
    assert not torch.allclose(layer(h).z, mean.mu)


def test_soft_clamp_bounds_logvar_and_leaves_small_values_nearly_alone():
    x = torch.tensor([-1e4, -30.0, -0.5, 0.0, 0.5, 30.0, 1e4], requires_grad=True)
    y = soft_clamp(x, 10.0)
    assert y.abs().max() <= 10.0
    assert_close(y[2:5], x[2:5].detach(), rtol=1e-2, atol=1e-2)
    y.sum().backward()
    assert (x.grad[1:-1] > 0).all()  # unlike a hard clamp, inputs beyond the limit keep a gradient
    layer = GaussianLatent(4, 2, logvar_limit=5.0)
    with torch.no_grad():
        layer.head.weight.fill_(100.0)
    out = layer(torch.ones(3, 4))
    # The op clamps inside; the layer reports logvar as the head gave it, and clamp() as the op saw it.
    assert out.logvar.abs().max() > 5.0 and layer.clamp(out.logvar).abs().max() <= 5.0
    assert layer.posterior(torch.ones(3, 4))[1].abs().max() <= 5.0
    assert torch.isfinite(out.z).all() and torch.isfinite(out.kl).all()


def test_gaussian_latent_infers_in_features_when_none():
    layer = GaussianLatent(None, 3)
    out = layer(torch.randn(2, 11))
    assert out.z.shape == (2, 3) and layer.head.weight.shape == (6, 11)


def test_gaussian_latent_rejects_bad_arguments():
    with pytest.raises(ValueError, match="latent_dim"):
        GaussianLatent(4, 0)
    with pytest.raises(ValueError, match="logvar_limit"):
        GaussianLatent(4, 2, logvar_limit=-1.0)


def test_gaussian_latent_fuses_its_clamp_and_takes_a_prior(device):
    """The clamp inside the op gives what the clamp applied before it gave (up to float rounding)."""
    torch.manual_seed(0)
    layer = GaussianLatent(9, 4, logvar_limit=2.0, backend="triton").to(device)
    with torch.no_grad():
        layer.head.weight.mul_(10.0)  # log-variances well beyond the limit
    h, eps = torch.randn(6, 9, device=device), torch.randn(6, 4, device=device)
    prior_mu, prior_logvar = torch.randn(4, device=device), torch.randn(6, 4, device=device)
    out = layer(h, eps, prior_mu=prior_mu, prior_logvar=prior_logvar)
    mu, logvar = torch.nn.functional.linear(h, layer.head.weight, layer.head.bias).chunk(2, dim=-1)
    assert (logvar.abs() > 2.0).any()
    z, kl = reparameterize_kl(mu, soft_clamp(logvar, 2.0), eps, prior_mu=prior_mu,
                              prior_logvar=soft_clamp(prior_logvar, 2.0), backend="torch")
    assert_close(out.z, z)
    assert_close(out.kl, kl)
    assert_close(out.logvar, logvar)  # as the head gave it
    weights = torch.rand_like(z)
    got = grads((out.z * weights).sum() + out.kl.sum(), list(layer.parameters()))
    want = grads((z * weights).sum() + kl.sum(), list(layer.parameters()))
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_free_bits_count_each_channel_as_at_least_the_threshold_with_no_gradient_below_it():
    kl = torch.tensor([[0.1, 3.0, 0.0], [0.3, 1.0, 0.1]], requires_grad=True)  # (B=2, C=3)
    assert_close(free_bits_kl(kl, 0.0), kl.sum(1).mean())
    loss = free_bits_kl(kl, 0.5)  # channel means 0.2, 2.0, 0.05: the first and last count as 0.5
    assert_close(loss, torch.tensor(0.5 + 2.0 + 0.5))
    (grad,) = torch.autograd.grad(loss, kl)
    assert_close(grad, torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.5, 0.0]]))


LATENT_CHANNELS = 3


def conv_layer_inputs(device, prior):
    """A posterior and a prior as VDVAE's convs give them: channel slices beside other channels."""
    posterior = torch.randn(2, 2 * LATENT_CHANNELS, 4, 5, device=device, requires_grad=True)
    if prior == "conditional":
        params = torch.randn(2, 2 * LATENT_CHANNELS + 4, 4, 5, device=device, requires_grad=True)
    elif prior == "learned":
        params = torch.randn(2 * LATENT_CHANNELS, 4, 5, device=device, requires_grad=True)
    else:
        params = None
    return posterior, params


@pytest.mark.parametrize("prior", ["conditional", "learned", "standard normal"])
def test_conv_gaussian_latent_is_the_op_on_channel_slices(device, prior):
    layer = ConvGaussianLatent(LATENT_CHANNELS, logvar_limit=3.0, backend="triton")
    posterior, params = conv_layer_inputs(device, prior)
    eps = torch.randn(2, LATENT_CHANNELS, 4, 5, device=device)
    out = layer(posterior, params, eps)
    c = LATENT_CHANNELS
    prior_mu, prior_logvar = (params[..., :c, :, :], params[..., c : 2 * c, :, :]) if params is not None else (None,) * 2
    z, kl = reparameterize_kl(posterior[:, :c], posterior[:, c : 2 * c], eps, prior_mu=prior_mu,
                              prior_logvar=prior_logvar, event_dims=2, logvar_limit=3.0, backend="torch")
    assert out.z.shape == (2, c, 4, 5) and out.kl.shape == (2,) and out.kl_channels.shape == (2, c)
    assert_close(out.z, z)
    assert_close(out.kl_channels, kl)
    assert_close(out.kl, kl.sum(1))
    inputs = [t for t in (posterior, params) if t is not None]
    weights = torch.randn_like(z)
    got = grads((out.z * weights).sum() + layer.kl_loss(out.kl_channels), inputs)
    want = grads((z * weights).sum() + kl.sum(1).mean(), inputs)
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_conv_gaussian_latent_reports_the_true_kl_under_free_bits():
    layer = ConvGaussianLatent(LATENT_CHANNELS, free_bits=1000.0)
    posterior, params = conv_layer_inputs(torch.device("cpu"), "conditional")
    out = layer(posterior, params)
    _, kl = reparameterize_kl(*posterior.chunk(2, dim=1), prior_mu=params[:, :3], prior_logvar=params[:, 3:6],
                              event_dims=3)
    assert_close(out.kl, kl)  # the true KL, below the floor
    assert out.kl_channels.max() < 1000.0
    assert_close(layer.kl_loss(out.kl_channels), torch.tensor(1000.0 * LATENT_CHANNELS))


def test_conv_gaussian_latent_samples_the_prior_at_a_temperature():
    layer = ConvGaussianLatent(2, logvar_limit=2.0)
    prior = torch.cat([torch.full((4000, 2, 3, 3), 1.5), torch.full((4000, 2, 3, 3), 5.0)], dim=1)  # logvar beyond 2
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(layer.sample(prior, temperature=0.0, generator=generator), prior[:, :2])
    variance = math.exp(soft_clamp(torch.tensor(5.0), 2.0).item())
    for temperature in (1.0, 0.5):
        z = layer.sample(prior, temperature=temperature, generator=generator)
        assert abs(z.mean().item() - 1.5) < 0.05
        assert abs(z.var().item() / (temperature**2 * variance) - 1) < 0.05
    again = layer.sample(prior, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, layer.sample(prior, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("prior", ["conditional", "standard normal"])
def test_conv_gaussian_latent_log_weight_is_log_p_minus_log_q(device, prior):
    layer = ConvGaussianLatent(LATENT_CHANNELS, logvar_limit=3.0, backend="triton")
    posterior, params = conv_layer_inputs(device, prior)
    eps = torch.randn(2, LATENT_CHANNELS, 4, 5, device=device)
    z, log_w = layer.log_weight(posterior.detach(), params.detach() if params is not None else None, eps)
    c = LATENT_CHANNELS
    q = torch.distributions.Normal(posterior[:, :c].detach(), torch.exp(0.5 * soft_clamp(posterior[:, c:].detach(), 3.0)))
    if params is None:
        p = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    else:
        p = torch.distributions.Normal(params[:, :c].detach(), torch.exp(0.5 * soft_clamp(params[:, c : 2 * c].detach(), 3.0)))
    assert_close(z, q.mean + q.stddev * eps)
    assert_close(log_w, (p.log_prob(z) - q.log_prob(z)).sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_conv_gaussian_latent_rejects_bad_arguments():
    with pytest.raises(ValueError, match="latent_channels"):
        ConvGaussianLatent(0)
    with pytest.raises(ValueError, match="free_bits"):
        ConvGaussianLatent(2, free_bits=-1.0)
    with pytest.raises(ValueError, match="logvar_limit"):
        ConvGaussianLatent(2, logvar_limit=0.0)
    with pytest.raises(ValueError, match="posterior"):
        ConvGaussianLatent(3)(torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="prior"):
        ConvGaussianLatent(2)(torch.zeros(2, 4, 4, 4), torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("kind", ["mse", "bce", "l1"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_reconstruction_loss_module_is_the_op(device, kind, reduction):
    x_hat = torch.randn(3, 2, 5, device=device, requires_grad=True)
    x = torch.rand(3, 2, 5, device=device)
    module = ReconstructionLoss(kind, reduction, backend="triton")
    assert module.logvar is None
    loss = module(x_hat, x)
    loss_ref = reconstruction_loss(x_hat, x, kind, reduction=reduction, backend="torch")
    assert_close(loss, loss_ref)
    weights = torch.rand_like(loss)
    assert_close(grads((loss * weights).sum(), [x_hat])[0], grads((loss_ref * weights).sum(), [x_hat])[0])


@pytest.mark.parametrize("logvar_shape", [(), (2, 5), 5])
def test_gaussian_reconstruction_loss_learns_its_logvar(device, logvar_shape):
    module = ReconstructionLoss("gaussian", "sum", logvar_shape=logvar_shape, init_logvar=0.3, backend="triton").to(
        device
    )
    shape = (logvar_shape,) if isinstance(logvar_shape, int) else logvar_shape
    assert module.logvar.shape == shape and torch.all(module.logvar == 0.3)
    x_hat = torch.randn(4, 2, 5, device=device, requires_grad=True)
    x = torch.randn(4, 2, 5, device=device)
    loss = module(x_hat, x)
    logvar = module.logvar.detach().clone().requires_grad_()
    by_hand = 0.5 * ((x - x_hat) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
    assert_close(loss, by_hand.sum())
    g_x_hat, g_logvar = grads(loss, [x_hat, module.logvar])
    ref_x_hat, ref_logvar = grads(by_hand.sum(), [x_hat, logvar])
    assert_close(g_x_hat, ref_x_hat)
    assert_close(g_logvar, ref_logvar, rtol=1e-4)
    assert dict(module.named_parameters()).keys() == {"logvar"}


def test_reconstruction_loss_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        ReconstructionLoss("huber")


def test_layers_under_bf16_autocast_with_bce_on_logits():
    """bf16 activations through the fused ops: finite, float32 losses, close to the float32 result."""
    torch.manual_seed(0)
    latent, recon = GaussianLatent(16, 4), ReconstructionLoss("bce", "mean")
    decoder = torch.nn.Linear(4, 20)
    h, x, eps = torch.randn(8, 16), torch.rand(8, 20), torch.randn(8, 4)

    def loss_of():
        out = latent(h, eps)
        return recon(decoder(out.z), x) + out.kl.mean()

    full = loss_of()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = loss_of()
    assert half.dtype == torch.float32
    assert torch.isfinite(half)
    assert_close(half, full, rtol=2e-2, atol=2e-2)
    half.backward()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters())
