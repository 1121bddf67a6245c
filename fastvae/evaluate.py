"""Evaluating a trained VAE on held-out images, and the image grids of a run's figures."""

from __future__ import annotations

import torch

from fastvae.data import to_unit_float
from fastvae.models import VAE


@torch.no_grad()
def evaluate(
    model: VAE, images: torch.Tensor, *, k: int, batch_size: int, generator: torch.Generator
) -> tuple[float, float]:
    """Held-out ``(elbo, log_likelihood)`` in nats per image, averaged over ``images``.

    The ELBO is ``-(recon + kl)`` with one sampled ``z`` per image and the
    analytic KL; the log-likelihood is the importance-sampled (IWAE) estimate
    with ``k`` samples (:meth:`VAE.log_likelihood`). Runs in float32 (autocast
    off) with the model in eval mode.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    elbo_sum = log_likelihood_sum = 0.0
    with torch.autocast(device.type, enabled=False):
        for batch in images.split(batch_size):
            x = to_unit_float(batch.to(device))
            eps = torch.randn((len(x), model.latent_dim), generator=generator, device=device)
            out = model(x, eps=eps, kl_weight=1.0)
            elbo_sum -= (out.recon + out.kl).sum().item()
            log_likelihood_sum += model.log_likelihood(x, k, generator=generator).sum().item()
    model.train(was_training)
    return elbo_sum / len(images), log_likelihood_sum / len(images)


def format_eval(elbo: float, log_likelihood: float, k: int, n_images: int) -> str:
    return (
        f"held-out ELBO: {elbo:.2f} nats/image ({n_images} images)\n"
        f"held-out log-likelihood (importance-sampled, k={k}): {log_likelihood:.2f} nats/image"
    )


@torch.no_grad()
def reconstruction_grid(model: VAE, images: torch.Tensor, ncols: int) -> torch.Tensor:
    """``images`` and their reconstructions in alternate rows of ``ncols``: ready for a grid of ``ncols`` columns."""
    reconstructions = model.reconstruct(images).to(images.dtype)
    rows = []
    for start in range(0, len(images), ncols):
        rows += [images[start : start + ncols], reconstructions[start : start + ncols]]
    return torch.cat(rows)


@torch.no_grad()
def interpolation_grid(model: VAE, images: torch.Tensor, points: int = 10) -> torch.Tensor:
    """Rows of ``[a, decode(mu_a + t (mu_b - mu_a)) for t in linspace(0, 1, points), b]``.

    ``images`` pairs up as ``(a, b) = (images[2i], images[2i + 1])``; returns
    ``(rows * (points + 2), C, H, W)``, ready for a grid of ``points + 2`` columns.
    """
    n_pairs = len(images) // 2
    a, b = images[0 : 2 * n_pairs : 2], images[1 : 2 * n_pairs : 2]
    mu_a, mu_b = model.encode(a)[0], model.encode(b)[0]
    t = torch.linspace(0, 1, points, device=images.device).view(1, points, 1)
    z = mu_a[:, None] + t * (mu_b - mu_a)[:, None]  # (pairs, points, D)
    decoded = model.likelihood_mean(model.decode(z.flatten(0, 1))).view(n_pairs, points, *images.shape[1:])
    return torch.cat([a[:, None], decoded.to(images.dtype), b[:, None]], dim=1).flatten(0, 1)
