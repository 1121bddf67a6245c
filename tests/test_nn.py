"""fastvae.nn layers against the reference path, and their own contracts."""

import math

import pytest
import torch

from fastvae.functional import reconstruction_loss, reparameterize_kl
from fastvae.nn import GaussianLatent, ReconstructionLoss, ReparamKL, soft_clamp
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
    assert out.logvar.abs().max() <= 5.0
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
