"""The VQ-VAE (van den Oord et al. 2017): :class:`VQVAE`, a conv encoder to a latent map, the fused vector
quantizer (:class:`~fastvae.nn.VectorQuantizer`), a conv decoder and any likelihood of :mod:`fastvae.likelihoods`.

Its loss per image is the likelihood's ``-log p(x | z_q)`` plus, summed over the
latent map's ``h w`` positions, the quantizer's codebook and commitment terms
(``||sg[z] - e||^2 + beta ||z - sg[e]||^2``); with the default EMA codebook
only the commitment term has a gradient. Its posterior is one-hot, so its
ELBO is ``-(recon + KL)`` with ``KL = -log p(codes)``: ``h w log K`` nats per
image under a uniform prior over the ``K`` codes, which is how the VQ-VAE paper
states its bound. After training, a categorical prior per position is fitted to
the training images' codes (:meth:`VQVAE.after_training`): a learned prior,
though the weakest one, with no dependence between positions; it gives a
tighter ELBO and samples whose strokes sit in the right places but do not join
up. An autoregressive prior over the code maps (a PixelCNN, as in the paper)
is what makes a VQ-VAE's samples look like data; fastvae does not fit one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from fastvae.likelihoods import Likelihood, make_likelihood
from fastvae.models.base import MetricPlot, TrainableModel, check_temperature, held_out_label
from fastvae.models.networks import _conv_final_size, default_conv_widths
from fastvae.nn import VectorQuantizer

# The name of evaluate's per-image code counts, which the engine sums over the held-out images (summarize_totals).
CODE_COUNTS = "code_counts"


class VQVAEOutput(NamedTuple):
    """What :meth:`VQVAE.forward` returns (``B`` images, an ``h x w`` latent map)."""

    loss: torch.Tensor  # () float32: mean over the batch of recon + the VQ terms summed over the map's positions
    recon: torch.Tensor  # (B,) float32: -log p(x | z_q), nats per image; detached (a metric)
    vq_loss: torch.Tensor  # () float32: the VQ terms per image (summed over its positions), batch mean
    perplexity: torch.Tensor  # () float32: exp(entropy of the batch's code frequencies)
    codes_used: torch.Tensor  # () float32: codes chosen by at least one position of the batch
    indices: torch.Tensor  # (B, h, w) int64: the code map
    x_hat: torch.Tensor  # (B, ...) decoder output: the likelihood's parameters

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """What the training engine logs: ``recon``, ``vq_loss``, ``perplexity``, ``codes_used``."""
        return {
            "recon": self.recon,
            "vq_loss": self.vq_loss,
            "perplexity": self.perplexity,
            "codes_used": self.codes_used,
        }


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``: the VQ-VAE paper's residual block, at a fixed width."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def vq_encoder(channels: int, widths: Sequence[int], code_dim: int) -> nn.Sequential:
    """Stride-2 4x4 convs (ReLU between), a residual block, then a 1x1 conv to ``code_dim`` channels."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip([channels, *widths[:-1]], widths)):
        layers += ([nn.ReLU()] if i else []) + [nn.Conv2d(n_in, n_out, 4, stride=2, padding=1)]
    return nn.Sequential(*layers, ResidualBlock(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], code_dim, 1))


def vq_decoder(code_dim: int, widths: Sequence[int], params_channels: int) -> nn.Sequential:
    """The mirror of :func:`vq_encoder`: a 3x3 conv from ``code_dim``, a residual block, stride-2 transposed convs."""
    reversed_widths = list(widths[::-1])
    layers: list[nn.Module] = [nn.Conv2d(code_dim, reversed_widths[0], 3, padding=1), ResidualBlock(reversed_widths[0])]
    for n_in, n_out in zip(reversed_widths, reversed_widths[1:] + [params_channels]):
        layers += [nn.ReLU(), nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1)]
    return nn.Sequential(*layers)


class VQVAE(TrainableModel):
    r"""A VQ-VAE for ``(C, H, W)`` images; see the module docstring.

    ``encoder(x)`` gives a ``(B, code_dim, h, w)`` map (``h = H / 2^L`` for
    ``L = len(widths)`` stride-2 layers), the quantizer replaces each of its
    ``h w`` vectors by the nearest of ``num_codes`` codes (the fused
    :func:`~fastvae.functional.vector_quantize`, reading the map in place), and
    ``decoder(z_q)`` gives the likelihood's parameters.

    Args:
        image_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2**len(widths)``.
        num_codes: ``K``, the codebook's size.
        code_dim: ``D``, the size of each code.
        widths: channels of the stride-2 conv layers, one per halving (default:
            :func:`~fastvae.models.default_conv_widths` of the smaller side: 28 -> (32, 64), a 7x7 map).
        likelihood: a name from :data:`fastvae.likelihoods.LIKELIHOODS` or a :class:`~fastvae.likelihoods.Likelihood`.
        beta: the commitment weight.
        ema_decay: the codebook's EMA decay, or ``None`` to learn it by gradient.
        dead_code_threshold: restart codes used by fewer vectors per batch (an EMA) than this; 0: never.
        backend: for the fused ops; see :mod:`fastvae.backend`.

    Buffers beyond the quantizer's: ``prior_counts`` ``(h, w, K)``, how often
    each code appeared at each position among the training images'
    (:meth:`after_training`; zeros until then), the fitted prior's counts.
    """

    units = "nats"

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        num_codes: int = 512,
        code_dim: int = 64,
        widths: Sequence[int] | None = None,
        likelihood: str | Likelihood = "bce",
        beta: float = 0.25,
        ema_decay: float | None = 0.99,
        dead_code_threshold: float = 1.0,
        backend: str | None = None,
    ):
        super().__init__()
        channels, height, width = image_shape
        widths = default_conv_widths(min(height, width)) if widths is None else tuple(widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must list at least one positive channel count, got {widths}")
        self.map_size = (_conv_final_size(height, widths), _conv_final_size(width, widths))
        self.image_shape = tuple(image_shape)
        self.likelihood = make_likelihood(likelihood, backend=backend)
        self.encoder = vq_encoder(channels, widths, code_dim)
        self.quantizer = VectorQuantizer(
            num_codes, code_dim, beta=beta, ema_decay=ema_decay, dead_code_threshold=dead_code_threshold,
            channel_dim=1, backend=backend,
        )
        self.decoder = vq_decoder(code_dim, widths, self.likelihood.params_channels(channels))
        self.register_buffer("prior_counts", torch.zeros(*self.map_size, num_codes))

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @property
    def positions(self) -> int:
        """``h w``: vectors (codes) per image."""
        return self.map_size[0] * self.map_size[1]

    # --- the pieces ---------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's map ``z_e`` ``(B, code_dim, h, w)``, before quantization."""
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_q, code map)`` of a map ``z_e``, without touching the codebook (no EMA update or restart)."""
        return self.quantizer.nearest(z_e)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """The decoder's output for a quantized map ``(B, code_dim, h, w)``: the likelihood's parameters."""
        return self.decoder(z_q)

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The decoder's output for code maps ``(B, h, w)`` (int64)."""
        return self.decode(self.quantizer.lookup(indices))

    # --- training -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, target: torch.Tensor | None = None) -> VQVAEOutput:
        """Encode ``x`` ``(B, C, H, W)``, quantize (updating the codebook in training mode), decode, and score
        against ``target`` (default ``x``)."""
        q = self.quantizer(self.encode(x))
        x_hat = self.decode(q.z_q)
        # The batch mean inside the fused op: loss.backward() hands its gradient over without a scaling pass.
        recon_mean, recon = self.likelihood.batch_nll(x_hat, x if target is None else target)
        vq_loss = q.loss * self.positions  # the quantizer's mean over vectors, per image
        return VQVAEOutput(recon_mean + vq_loss, recon, vq_loss.detach(), q.perplexity, q.codes_used, q.indices,
                           x_hat)

    def metric_plots(self) -> dict[str, list[MetricPlot]]:
        """``codebook.png``: the perplexity of code usage and the codes in use per batch, over training."""
        return {
            "codebook": [
                MetricPlot(f"perplexity of code usage per batch (of {self.num_codes})", "perplexity", ("perplexity",)),
                MetricPlot(f"codes in use per batch (of {self.num_codes})", "codes", ("codes_used",)),
            ]
        }

    @torch.no_grad()
    def after_training(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit the prior: count the codes at each position of the training images' code maps (``prior_counts``)."""
        counts = torch.zeros_like(self.prior_counts).view(-1)
        for x in batches:
            cells = self._cells(self.codes(x))
            counts.index_add_(0, cells.reshape(-1), torch.ones(cells.numel(), device=counts.device))
        self.prior_counts.copy_(counts.view_as(self.prior_counts))

    def _cells(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, h w)``: each position's code as an index into ``prior_counts`` flattened (position-major)."""
        positions = torch.arange(self.positions, device=indices.device)
        return positions * self.num_codes + indices.reshape(len(indices), -1)

    def prior_log_probs(self) -> torch.Tensor:
        """``(h, w, K)``: the log-probabilities of the fitted prior, add-one smoothed (uniform before any fit)."""
        counts = self.prior_counts + 1.0
        return torch.log(counts / counts.sum(dim=-1, keepdim=True))

    def prior_fitted(self) -> bool:
        return bool(self.prior_counts.sum() > 0)

    # --- generation and evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's :meth:`~fastvae.likelihoods.Likelihood.reconstruction` decoded from the codes of ``x``."""
        z_q, _ = self.quantize(self.encode(x))
        return self.likelihood.reconstruction(self.decode(z_q))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The code map of each image of ``x``: ``(B, h, w)`` int64 (what ``fastvae encode`` writes)."""
        return self.quantize(self.encode(x))[1]

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` code maps drawn from the fitted prior (each position on its own; ``temperature`` divides its
        log-probabilities, 0 takes each position's likeliest code), decoded to the likelihood's
        :meth:`~fastvae.likelihoods.Likelihood.generate`: ``(n, ...)``. See :meth:`sample_note`."""
        check_temperature(temperature)
        log_probs = self.prior_log_probs().reshape(self.positions, self.num_codes)
        if temperature == 0:
            indices = log_probs.argmax(dim=-1).expand(n, -1)
        else:
            probs = torch.softmax(log_probs / temperature, dim=-1)
            drawn = torch.multinomial(probs, n, replacement=True, generator=generator)  # (positions, n)
            indices = drawn.t()
        params = self.decode_codes(indices.reshape(n, *self.map_size))
        return self.likelihood.generate(params, generator=generator)

    def sample_note(self) -> str:
        if not self.prior_fitted():
            return (
                "a VQ-VAE samples by drawing code maps from a learned prior over its codes, and this checkpoint has "
                "none yet (it is fitted when training ends): these decode codes drawn uniformly at random"
            )
        return (
            "a VQ-VAE's samples need a learned prior over its code maps; these draw each position's code from a "
            "categorical fitted to the training images' codes, on its own, so strokes sit in the right places but "
            "do not join up (an autoregressive prior, a PixelCNN over the code maps, would learn that)"
        )

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, points: int = 10) -> torch.Tensor:
        """Decodes of the quantized ``(1 - t) z_e(a) + t z_e(b)``, ``t`` in ``linspace(0, 1, points)``: ``(P, points,
        ...)`` for ``(P, ...)`` images. The path runs through the encoder's continuous space; each point snaps to
        the nearest codes, so the decodes change in steps."""
        z_a, z_b = self.encode(a), self.encode(b)
        t = torch.linspace(0, 1, points, device=a.device).view(1, points, 1, 1, 1)
        path = (z_a[:, None] + t * (z_b - z_a)[:, None]).flatten(0, 1)
        z_q, _ = self.quantize(path)
        return self.likelihood.reconstruction(self.decode(z_q)).view(len(a), points, *a.shape[1:])

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per image, in nats: ``recon`` (``-log p(target | z_q)``), ``elbo_uniform_prior``
        (``-(recon + h w log K)``) and ``elbo_fitted_prior`` (``-(recon - sum of the fitted prior's log-probabilities
        of its codes)``); and ``code_counts`` ``(B, K)``, how often each code appears in each image's map, which the
        engine sums over the held-out images for :meth:`summarize_totals`. ``generator`` is unused."""
        z_q, indices = self.quantize(self.encode(x))
        recon = self.likelihood(self.decode(z_q), x if target is None else target).float()
        prior_nats = -self.prior_log_probs().view(-1)[self._cells(indices)].sum(dim=1)
        per_image = indices.reshape(len(x), -1)
        counts = torch.zeros(len(x), self.num_codes, device=x.device)
        counts.scatter_add_(1, per_image, torch.ones(per_image.shape, device=x.device))
        return {
            "recon": recon,
            "elbo_uniform_prior": -(recon + self.positions * math.log(self.num_codes)),
            "elbo_fitted_prior": -(recon + prior_nats),
            CODE_COUNTS: counts,
        }

    def summarize_totals(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """From the held-out images' code counts ``(K,)``: ``perplexity`` (``exp`` of the entropy of the code
        frequencies) and ``codes_used`` (codes that appear at least once)."""
        counts = totals[CODE_COUNTS].double()
        frequencies = counts / counts.sum().clamp_min(1)
        entropy = -torch.xlogy(frequencies, frequencies).sum()
        return {"perplexity": float(entropy.exp()), "codes_used": int((counts > 0).sum())}

    def format_evaluation(self, results: dict[str, float], *, n_images: int, corruption: str | None = None) -> str:
        """The held-out reconstruction nll, the two ELBOs (stating their priors) and the codebook's use."""
        uniform = self.positions * math.log(self.num_codes)
        h, w = self.map_size
        lines = [
            f"{held_out_label('reconstruction -log p(x|z_q)', corruption)}: {results['recon']:.2f} nats/image "
            f"({n_images} images)",
            f"{held_out_label('ELBO', corruption)} under a uniform prior over the {self.num_codes} codes (recon + "
            f"{h}x{w} log {self.num_codes} = recon + {uniform:.1f} nats): "
            f"{results['elbo_uniform_prior']:.2f} nats/image",
            f"{held_out_label('ELBO', corruption)} under the per-position prior fitted to the training codes: "
            f"{results['elbo_fitted_prior']:.2f} nats/image",
        ]
        if "perplexity" in results:
            lines.append(
                f"codebook on the held-out images: perplexity {results['perplexity']:.1f} of {self.num_codes} codes, "
                f"{results['codes_used']} codes used"
            )
        return "\n".join(lines)
