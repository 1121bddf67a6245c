"""Evaluating a trained VAE on held-out images."""

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
