"""The IWAE training step: fastvae's fused importance samples against an IWAE written the usual way.

``python -m benchmarks.iwae [--batch 128] [--out DIR]`` counts, on the CPU, what
one training step of the MLP VAE trained on the importance-weighted bound
(``fastvae train --objective iwae``) launches, keeps for the backward and
moves, at K = 5 and K = 50 samples per image, for

* ``eager``: :class:`UsualIWAE`, the same networks with the bound written as
  PyTorch code usually writes it (``mu.expand``, ``torch.randn``,
  ``Normal.log_prob`` for the posterior and the prior, the decoder on the
  ``K B`` samples, BCE with logits against the expanded images, ``logsumexp``);
* ``compile``: ``torch.compile`` of it (what it keeps for the backward only;
  see :mod:`benchmarks.static.counts`);
* ``fastvae``: ``VAE(iwae_k=K)`` on the Triton path: one
  :func:`~fastvae.functional.reparameterize_log_ratio` call for the K samples
  and their log ratios, the fused BCE per sample.

It writes ``iwae.json`` and ``iwae.md`` into ``benchmarks/results/static/``.
The same models are in :data:`benchmarks.train_step.MODELS` (``mlp-iwae5``,
``mlp-iwae50``), so the GPU runner times them and ``python -m benchmarks --static`` counts them too.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from fastvae.models import VAE, mlp_vae
from fastvae.ops.reparameterize_kl import soft_clamp

IMAGE_SHAPE = (1, 28, 28)
SAMPLES = (5, 50)
BATCH = 128  # fastvae train's default


class UsualOutput(NamedTuple):
    loss: torch.Tensor  # () the negative IWAE bound, batch mean
    bound: torch.Tensor  # (B,) detached


class UsualIWAE(nn.Module):
    """The IWAE bound of a fastvae :class:`~fastvae.models.VAE`'s networks, written as PyTorch code usually writes it.

    The same encoder, linear head (with the model's soft clamp of the
    log-variance, in torch ops) and decoder; a Bernoulli likelihood on the
    decoder's logits. ``forward(x, eps=None)`` draws ``eps`` ``(K, B, D)`` with
    ``torch.randn`` unless given, and returns the negative bound's batch mean.
    """

    def __init__(self, vae: VAE, k: int):
        super().__init__()
        if vae.likelihood.name != "bce":
            raise ValueError(f"UsualIWAE scores a Bernoulli likelihood, got {vae.likelihood.name!r}")
        self.vae, self.k = vae, k

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> UsualOutput:
        vae, k = self.vae, self.k
        z, log_ratio = usual_samples(vae.latent.head(vae.encoder(x)), k, vae.latent.logvar_limit, eps)
        logits = vae.decoder(z.reshape(k * len(x), -1)).view(k, *x.shape)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(2).sum(-1)
        bound = torch.logsumexp(log_px + log_ratio, dim=0) - math.log(k)
        return UsualOutput(-bound.mean(), bound.detach())


def iwae_model(k: int, backend: str) -> nn.Module:
    """The benchmark's MLP IWAE: :class:`UsualIWAE` on the reference path (``backend="torch"``), else
    ``VAE(iwae_k=k)`` with the fused ops; the same networks and initial weights under the same seed."""
    vae = mlp_vae(IMAGE_SHAPE, iwae_k=k, backend=backend)
    return UsualIWAE(vae, k) if backend == "torch" else vae


def usual_samples(
    h: torch.Tensor, k: int, logvar_limit: float | None = 10.0, eps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent part of :class:`UsualIWAE`: ``k`` samples and ``log p(z) - log q(z | x)`` from a head's output
    ``h`` ``(B, 2 D)`` (noise ``eps`` ``(k, B, D)``, or ``torch.randn``), as it is usually written."""
    mu, logvar = h.chunk(2, dim=-1)
    if logvar_limit is not None:
        logvar = soft_clamp(logvar, logvar_limit)
    std = torch.exp(0.5 * logvar)
    mu_k, std_k = mu.expand(k, *mu.shape), std.expand(k, *std.shape)
    if eps is None:
        eps = torch.randn(mu_k.shape, device=h.device, dtype=h.dtype)
    z = mu_k + std_k * eps
    # validate_args=False: the default checks the arguments on the host (6 syncs and 12 kernels a step).
    log_q = Normal(mu_k, std_k, validate_args=False).log_prob(z).sum(-1)
    log_p = Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False).log_prob(z).sum(-1)
    return z, log_p - log_q


def fused_samples(h: torch.Tensor, k: int, logvar_limit: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with :func:`~fastvae.functional.reparameterize_log_ratio` on the Triton path."""
    from fastvae.functional import reparameterize_log_ratio

    mu, logvar = h.chunk(2, dim=-1)
    return reparameterize_log_ratio(mu, logvar, samples=k, logvar_limit=logvar_limit, backend="triton")


def count_latent(batch: int = BATCH, latent_dim: int = 16, samples=SAMPLES) -> list[dict]:
    """Kernels, modelled bytes and bytes kept of the latent part alone (forward, then the backward of random
    upstream gradients for ``z`` and the log ratios), the usual code against the fused op."""
    from benchmarks.static.capture import SavedTensors, summarise
    from benchmarks.static.counts import _as_on_a_gpu, counting

    records = []
    for k in samples:
        for impl, fn in (("eager", usual_samples), ("fastvae", fused_samples)):
            torch.manual_seed(0)
            h = torch.randn(batch, 2 * latent_dim, requires_grad=True)
            forward, backward = [], []
            with _as_on_a_gpu():
                with SavedTensors() as saved, counting(forward):
                    z, log_ratio = fn(h, k)
                upstream = [torch.randn_like(z), torch.rand_like(log_ratio)]
                with counting(backward):
                    torch.autograd.grad([z, log_ratio], [h], upstream)
            records.append({"k": k, "batch": batch, "latent_dim": latent_dim, "impl": impl,
                            "forward": summarise(forward), "backward": summarise(backward),
                            "kept_bytes": saved.bytes(exclude=[h])})
    return records


def count(batch: int = BATCH, samples=SAMPLES, log=print) -> list[dict]:
    """The counts of one step at each K (:func:`benchmarks.static.counts.count_train_cases`)."""
    from benchmarks.static.counts import count_train_cases

    return count_train_cases([(f"mlp-iwae{k}", batch, "fp32") for k in samples], ("eager", "compile", "fastvae"),
                             log=log)


def markdown(records: list[dict], command: str, latent: list[dict] = ()) -> str:
    lines = [
        "# The IWAE training step, counted (no GPU)",
        "",
        f"`{command}`: one steady-state fp32 step (forward, backward, Adam) of the MLP VAE "
        "(784-512-256-16) on the importance-weighted bound, `eager` = the bound written the usual way "
        "(`benchmarks/iwae.py: UsualIWAE`), `fastvae` = `VAE(iwae_k=K)` on the Triton path. MB moved: the modelled "
        "traffic of every kernel (each tensor read or written once per kernel); kept: storages saved for the backward "
        "(beyond the weights and the batch).",
        "",
        "| K | batch | impl | kernels fwd / bwd / Adam / step | MB moved (step) | MB kept (beyond weights and batch) "
        "| host syncs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        k = r["model"].removeprefix("mlp-iwae")
        for impl, x in r["impls"].items():
            if "step" in x:
                kernels = (f"{x['forward']['kernels']} / {x['backward']['kernels']} / {x['optimizer']['kernels']} / "
                           f"{x['step']['kernels']}")
                moved, syncs = f"{x['step']['bytes'] / 1e6:.2f}", str(x["step"]["host_syncs"])
            else:
                kernels, moved, syncs = "— (not counted)", "—", "—"
            lines.append(f"| {k} | {r['batch']} | {impl} | {kernels} | {moved} | {x['saved_bytes'] / 1e6:.2f} "
                         f"({x['saved_beyond_inputs'] / 1e6:.2f}) | {syncs} |")
    if latent:
        lines += [
            "",
            "The latent part alone (`usual_samples` against `fused_samples`: `K` samples of a linear head's halves, "
            f"batch {latent[0]['batch']}, D = {latent[0]['latent_dim']}, the soft clamp; forward, then the backward "
            "of random upstream gradients for `z` and the log ratios):",
            "",
            "| K | impl | kernels fwd + bwd | MB moved fwd + bwd | bytes kept |",
            "|---|---|---|---|---|",
        ]
        for r in latent:
            f, b = r["forward"], r["backward"]
            lines.append(f"| {r['k']} | {r['impl']} | {f['kernels']} + {b['kernels']} | "
                         f"{f['bytes'] / 1e6:.3f} + {b['bytes'] / 1e6:.3f} | {r['kept_bytes']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import os
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="python -m benchmarks.iwae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "static")
    args = parser.parse_args(argv)
    # The fused ops run their Triton path on CPU tensors: the kernels must be defined for the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"
    command = " ".join(["python -m benchmarks.iwae", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    start = time.perf_counter()
    records = count(args.batch)
    latent = count_latent(args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "seconds": round(time.perf_counter() - start, 1), "train": records,
               "latent": latent}
    (args.out / "iwae.json").write_text(json.dumps(payload, indent=1, default=str))
    text = markdown(records, command, latent)
    (args.out / "iwae.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
