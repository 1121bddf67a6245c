"""No fused op reads a tensor's value on the host in its forward or backward: on a GPU each read is a sync.

The ops run on the Triton path (under the interpreter on the CPU, which takes
the same code path as a GPU) inside :func:`tests.utils.no_host_sync`, which
makes such a read from fastvae's code raise. On a GPU, CUDA's sync debug mode
checks the same from the other side.
"""
import contextlib

import pytest
import torch

from fastvae.functional import discretized_logistic_mixture_nll, reconstruction_loss, reparameterize_kl
from tests.utils import no_host_sync

KINDS = ["mse", "bce", "gaussian", "l1"]
REDUCTIONS = ["none", "sum", "mean"]


@contextlib.contextmanager
def no_sync(device):
    with no_host_sync():
        if device.type != "cuda":
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def every_backward(loss_fn, inputs, grad_output):
    """The backwards a training step may run: retained graph, the last one (owning), create_graph, double."""
    out = loss_fn()
    torch.autograd.grad(out, inputs, grad_output, retain_graph=True)
    torch.autograd.grad(out, inputs, grad_output)
    grads = torch.autograd.grad(loss_fn(), inputs, grad_output, create_graph=True)
    torch.autograd.grad(sum((g.float() ** 2).sum() for g in grads), inputs, allow_unused=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_reconstruction_loss(device, kind, reduction):
    x_hat = torch.randn(3, 2, 5, device=device, requires_grad=True)
    x = torch.rand(3, 2, 5, device=device, requires_grad=True)
    logvar = torch.zeros(2, 5, device=device, requires_grad=True) if kind == "gaussian" else None
    inputs = [t for t in (x_hat, x, logvar) if t is not None]
    weights = torch.tensor([1.0, 2.0, 0.5], device=device) if reduction == "none" else torch.tensor(1.0, device=device)
    with no_sync(device):
        every_backward(
            lambda: reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend="triton"),
            inputs, weights,
        )
        reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend="triton").sum().backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("noise", ["given", "drawn", "drawn with a generator"])
def test_reparameterize_kl(device, noise, reduction):
    mu = torch.randn(3, 6, device=device, requires_grad=True)
    logvar = torch.randn(3, 6, device=device, requires_grad=True)
    eps = torch.randn(3, 6, device=device) if noise == "given" else None
    generator = torch.Generator(device=device).manual_seed(0) if noise == "drawn with a generator" else None

    def loss():
        z, kl = reparameterize_kl(mu, logvar, eps, reduction=reduction, generator=generator, backend="triton")
        return (z**2).sum() + kl.sum()

    with no_sync(device):
        every_backward(loss, (mu, logvar), None)
        loss().backward()


@pytest.mark.parametrize("prior", ["same shape", "shared"])
def test_reparameterize_kl_with_a_prior_events_and_the_clamp(device, prior):
    shape = (3, 2, 2, 3)
    mu, logvar = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    prior_shape = shape if prior == "same shape" else shape[1:]
    prior_mu, prior_logvar = (torch.randn(prior_shape, device=device, requires_grad=True) for _ in range(2))

    def loss():
        z, kl = reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, event_dims=3,
                                  logvar_limit=5.0, backend="triton")
        return (z**2).sum() + kl.sum()

    with no_sync(device):
        every_backward(loss, (mu, logvar, prior_mu, prior_logvar), None)
        loss().backward()
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_discretized_logistic_mixture_nll(device, reduction):
    params = torch.randn(3, 20, 2, 2, device=device, requires_grad=True)  # C = 3, M = 2
    x = torch.rand(3, 3, 2, 2, device=device)
    weights = torch.tensor([1.0, 2.0, 0.5], device=device) if reduction == "none" else torch.tensor(1.0, device=device)

    def loss():
        return discretized_logistic_mixture_nll(params, x, num_mixtures=2, reduction=reduction, backend="triton")

    with no_sync(device):
        every_backward(loss, [params], weights)
        loss().sum().backward()


def test_the_guard_catches_a_host_read():
    """The helper itself: a host read from the watched packages raises, one from elsewhere does not."""
    from tests.utils import HostSyncError

    t = torch.ones((), requires_grad=True)
    with no_host_sync():
        assert t.item() == 1.0  # this test is not fastvae
    with no_host_sync(packages=("tests",)):
        for read in (torch.Tensor.item, torch.Tensor.tolist, bool, int, float, torch.Tensor.nonzero):
            with pytest.raises(HostSyncError, match="test_the_guard_catches_a_host_read"):
                read(t)
        with pytest.raises(HostSyncError):
            t.to("cpu")
        t.to(torch.float64)  # not a read
