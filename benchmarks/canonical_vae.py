"""The canonical PyTorch example VAE, trained plainly, as the baseline for ``fastvae train``'s defaults.

``python -m benchmarks.canonical_vae [--steps 2100] [--k 1000] [--seed 0]`` (CI runs ``--steps 5 --k 2``)

The model of ``pytorch/examples/vae/main.py``: a 784-400-20 MLP with ReLU, a
Bernoulli likelihood on the sigmoid of the decoder's output, the analytic KL,
Adam at 1e-3, batches of 128, reshuffled every epoch. It is trained on the same
split of the bundled MNIST digits that ``fastvae train`` uses (4,500 training
images, 500 held out) for as many steps as fastvae's default run (60 epochs of
35 steps), and scored the way ``fastvae eval`` scores a run: the held-out ELBO
with one sampled ``z`` per image, and the importance-sampled log-likelihood
with ``k`` samples (the IWAE bound), in nats per image. Plain PyTorch only:
fastvae supplies the data split and nothing else.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from fastvae.data import load_images, to_unit_float


class CanonicalVAE(nn.Module):
    def __init__(self, pixels: int = 784, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(pixels, hidden), nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, pixels)

    def encode(self, x):
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode_logits(self, z):
        return self.fc4(F.relu(self.fc3(z)))


def negative_log_bernoulli(logits, x):
    """``-log p(x | z)`` per image: the canonical example's BCE on ``sigmoid(logits)``, summed over pixels."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)


def loss_per_image(model, x, eps):
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return negative_log_bernoulli(model.decode_logits(z), x) + kl


@torch.no_grad()
def held_out_scores(model, images, k: int, generator, batch: int = 128, chunk: int = 100):
    """Mean held-out ELBO and IWAE log-likelihood (``k`` samples) in nats per image."""
    elbo = log_likelihood = 0.0
    for x in images.split(batch):
        mu, logvar = model.encode(x)
        elbo -= loss_per_image(model, x, torch.randn(mu.shape, generator=generator)).sum().item()
        std, log_w = torch.exp(0.5 * logvar), []
        for start in range(0, k, chunk):
            eps = torch.randn((min(chunk, k - start), *mu.shape), generator=generator)
            z = mu + std * eps
            log_p_x = -negative_log_bernoulli(model.decode_logits(z), x.expand(len(z), *x.shape))
            # log N(z; 0, I) - log N(z; mu, sigma^2): the log(2 pi) terms cancel.
            log_w.append(log_p_x + 0.5 * (eps.square() - z.square() + logvar).sum(dim=-1))
        log_likelihood += (torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)).sum().item()
    return elbo / len(images), log_likelihood / len(images)


def main(argv=None) -> tuple[float, float]:
    """Train and score the canonical VAE; prints and returns the held-out ELBO and log-likelihood (nats/image)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.canonical_vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2100, help="optimizer steps (default: 2100, fastvae's default)")
    parser.add_argument("--k", type=int, default=1000, help="importance samples per held-out image (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = load_images("mnist")
    train = to_unit_float(data.train).flatten(1)
    test = to_unit_float(data.test).flatten(1)
    model = CanonicalVAE(train.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, steps_per_epoch = 128, len(train) // 128
    start = time.perf_counter()
    for step in range(args.steps):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train))
        x = train[order[(step % steps_per_epoch) * batch :][:batch]]
        loss = loss_per_image(model, x, torch.randn(len(x), 20)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    elbo, log_likelihood = held_out_scores(model.eval(), test, args.k, torch.Generator().manual_seed(args.seed + 1))
    print(f"canonical VAE (784-400-20, Adam 1e-3, batch 128), {args.steps} steps in {seconds:.0f} s")
    print(f"held-out ELBO: {elbo:.2f} nats/image ({len(test)} images)")
    print(f"held-out log-likelihood (importance-sampled, k={args.k}): {log_likelihood:.2f} nats/image")
    return elbo, log_likelihood


if __name__ == "__main__":
    main()
