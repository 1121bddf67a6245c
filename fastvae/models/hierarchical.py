"""A top-down hierarchical VAE in the style of VDVAE and NVAE, sized for small images: :class:`HierarchicalVAE`.

The model (Child 2021, "Very Deep VAEs"; Vahdat & Kautz 2020, "NVAE"):

* a bottom-up encoder: a stride-2 conv, then residual blocks at each
  resolution, halving it between them (28 -> 14 -> 7 for MNIST); it keeps its
  features at every resolution;
* a top-down decoder that starts from a learned state at the coarsest
  resolution and, at each stochastic layer ``l``, computes the prior
  ``p(z_l | z_<l)`` from its state, the posterior ``q(z_l | x, z_<l)`` from its
  state plus the encoder's features at that resolution, samples ``z_l`` and
  takes the KL through the fused op
  (:class:`~fastvae.nn.ConvGaussianLatent`: posterior and prior are channel
  slices of conv outputs, read in place), and adds a projection of ``z_l``
  (and the prior net's extra features) to its state, followed by a residual
  block; it doubles the resolution between resolutions (nearest neighbour);
* a conv and a pixel shuffle back to the image's size giving the parameters of ``p(x | z)``, any of
  :mod:`fastvae.likelihoods`.

Every stochastic layer samples and takes its KL through the fused op, in
training, sampling (``sample``, at a temperature) and evaluation
(``log_likelihood``: the importance-sampled estimate through every layer).
The loss is ``mean_B(recon) + kl_weight * sum_l kl_loss_l`` with the KL term
of each layer under free bits (:func:`~fastvae.nn.free_bits_kl`); the
reported KL is always the true one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastvae.likelihoods import Likelihood, make_likelihood
from fastvae.models.base import MetricPlot, StepInputs, TrainableModel, check_batch, check_temperature
from fastvae.models.vae import elbo_results, format_elbo_evaluation, kl_warmup_weight
from fastvae.nn import ConvGaussianLatent

# A latent channel counts as active when its KL, averaged over the batch, is above this many nats.
ACTIVE_KL_NATS = 0.01
# Resolutions halve while they stay even and at least this many pixels.
MIN_RESOLUTION = 4
# Images (importance samples x images) decoded at once by log_likelihood when chunk_size is None.
LOG_LIKELIHOOD_ROWS = 256  # small enough for the activations to stay in a CPU's cache


def _halves(size: tuple[int, int]) -> bool:
    return all(s % 2 == 0 and s // 2 >= MIN_RESOLUTION for s in size)


def stem_halves(height: int, width: int) -> bool:
    """Whether the stem halves the image: when the half can be halved again (28, 64; not 8x8 digits)."""
    return _halves((height, width)) and _halves((height // 2, width // 2))


def resolutions(height: int, width: int) -> list[tuple[int, int]]:
    """The resolutions of the latent hierarchy, finest first: the stem halves the image where it can, then they
    halve while both sides stay even and at least 4 (28x28 images: 14 -> 7; 64x64: 32 -> 16 -> 8 -> 4; 8x8: 8 -> 4)."""
    sizes = [(height // 2, width // 2) if stem_halves(height, width) else (height, width)]
    while _halves(sizes[-1]):
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


class Block(nn.Module):
    """A bottleneck block: 1x1 conv to ``mid`` channels, a 3x3 conv, 1x1 conv to ``out``, GELU before each
    (VDVAE's block with one 3x3 conv instead of two, for the CPU); added to its input when ``residual``.
    ``zero_last`` starts the last conv at zero (the block starts as the identity, or as zeros)."""

    def __init__(self, in_channels: int, mid: int, out: int, *, residual: bool, zero_last: bool = False):
        super().__init__()
        self.residual = residual
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(in_channels, mid, 1),
                nn.Conv2d(mid, mid, 3, padding=1),
                nn.Conv2d(mid, out, 1),
            ]
        )
        if zero_last:
            nn.init.zeros_(self.convs[-1].weight)
            nn.init.zeros_(self.convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = conv(F.gelu(h))
        return x + h if self.residual else h


class TopDownLayer(nn.Module):
    """One stochastic layer of the decoder: prior, posterior, the fused sample + KL, and the state's update.

    The prior net maps the state to ``2 * latent`` prior channels and ``width``
    features for the state; the posterior net maps the sum of the state and the
    encoder's features to ``2 * latent`` channels. Both outputs go to
    :class:`~fastvae.nn.ConvGaussianLatent` whole: it reads ``mu`` and
    ``logvar`` as channel slices, in place.
    """

    def __init__(self, width: int, mid: int, latent: int, *, n_layers: int, logvar_limit, free_bits, backend):
        super().__init__()
        self.latent_channels = latent
        self.prior_net = Block(width, mid, 2 * latent + width, residual=False, zero_last=True)  # starts at N(0, I)
        self.posterior_net = Block(width, mid, 2 * latent, residual=False)
        self.latent = ConvGaussianLatent(latent, logvar_limit=logvar_limit, free_bits=free_bits, backend=backend)
        self.project = nn.Conv2d(latent, width, 1)
        self.resnet = Block(width, mid, width, residual=True)
        # VDVAE's scaling: the residual branches' last convs shrink with depth, keeping the state's scale.
        with torch.no_grad():
            self.project.weight.mul_(math.sqrt(1 / n_layers))
            self.resnet.convs[-1].weight.mul_(math.sqrt(1 / n_layers))

    def prior(self, state: torch.Tensor) -> torch.Tensor:
        """The prior net's output ``(B, 2 * latent + width, H, W)``: prior ``mu``, ``logvar``, then features."""
        return self.prior_net(state)

    def posterior(self, state: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The posterior's ``(B, 2 * latent, H, W)`` parameters from the state plus the encoder's features (a sum,
        as NVAE combines them, rather than VDVAE's concatenation: half the first conv's work)."""
        return self.posterior_net(state + features)

    def update(self, state: torch.Tensor, prior: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The state after ``z``: plus the prior net's features and the projection of ``z``, then a residual block."""
        features = prior[:, 2 * self.latent_channels :]
        return self.resnet(state + features + self.project(z))


class HVAEOutput(NamedTuple):
    """What :meth:`HierarchicalVAE.forward` returns (``B`` images, ``L`` stochastic layers)."""

    loss: torch.Tensor  # () float32: mean_B(recon) + kl_weight * sum_l (free-bits) KL term of layer l
    recon: torch.Tensor  # (B,) float32: -log p(x | z), nats per image; detached (a metric: loss has the gradient)
    kl: torch.Tensor  # (B,) float32: sum over the layers of KL(q(z_l | x, z_<l) || p(z_l | z_<l)), nats per image
    kl_layers: tuple[torch.Tensor, ...]  # L x (B,) float32: each layer's KL, top (coarsest) first
    active_channels: torch.Tensor  # () float32: latent channels whose batch-mean KL is above 0.01 nats
    x_hat: torch.Tensor  # (B, ...) decoder output: the likelihood's parameters

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """What the training engine logs: ``recon``, ``kl``, ``kl_0``... (top layer first), ``active_channels``."""
        layers = {f"kl_{i}": kl for i, kl in enumerate(self.kl_layers)}
        return {"recon": self.recon, "kl": self.kl, **layers, "active_channels": self.active_channels}


class HierarchicalVAE(TrainableModel):
    r"""A top-down hierarchical VAE (VDVAE/NVAE style) for small images; see the module docstring.

    Args:
        image_shape: ``(C, H, W)`` of the images.
        layers_per_resolution: stochastic layers at each resolution, coarsest
            first (``(2, 2)`` for MNIST: two at 7x7, two at 14x14, none at
            28x28); at most one entry per resolution of :func:`resolutions`.
        latent_channels: latent channels of every stochastic layer.
        width: channels of the encoder's features and the decoder's state.
        likelihood: a name from :data:`fastvae.likelihoods.LIKELIHOODS` or a
            :class:`~fastvae.likelihoods.Likelihood`.
        beta: weight of the KL term; ``kl_warmup``: steps over which it rises from 0 to ``beta``.
        free_bits: nats per latent channel of each layer (batch mean) that the KL term counts at least.
        logvar_limit: soft clamp of the posterior's and the prior's log-variances, fused into the op.
        default_grad_clip: the gradient-norm clipping the training engine applies unless told otherwise.
        backend: for the fused ops; see :mod:`fastvae.backend`.
    """

    units = "nats"

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        layers_per_resolution: Sequence[int] = (2, 2),
        latent_channels: int = 8,
        width: int = 32,
        likelihood: str | Likelihood = "bce",
        beta: float = 1.0,
        kl_warmup: int = 0,
        free_bits: float = 0.0,
        logvar_limit: float | None = 10.0,
        default_grad_clip: float | None = 200.0,
        backend: str | None = None,
    ):
        super().__init__()
        channels, height, width_px = image_shape
        sizes = resolutions(height, width_px)
        layers_per_resolution = tuple(layers_per_resolution)
        if not layers_per_resolution or min(layers_per_resolution) < 0 or sum(layers_per_resolution) < 1:
            raise ValueError(f"layers_per_resolution must list non-negative counts, at least one layer in all, "
                             f"got {layers_per_resolution}")
        if len(layers_per_resolution) > len(sizes):
            raise ValueError(
                f"layers_per_resolution {layers_per_resolution} has {len(layers_per_resolution)} entries but "
                f"{height}x{width_px} images have {len(sizes)} resolution{'s' if len(sizes) > 1 else ''} "
                f"({', '.join(f'{h}x{w}' for h, w in sizes)}); give at most {len(sizes)}"
            )
        if latent_channels < 1 or width < 1:
            raise ValueError(f"latent_channels and width must be positive, got {latent_channels} and {width}")
        if beta < 0 or kl_warmup < 0:
            raise ValueError(f"beta and kl_warmup must be non-negative, got {beta} and {kl_warmup}")
        self.image_shape = tuple(image_shape)
        self.likelihood = make_likelihood(likelihood, backend=backend, channels=channels)
        self.beta, self.kl_warmup = beta, kl_warmup
        self.default_grad_clip = default_grad_clip
        mid = max(width // 4, 8)
        # Coarsest first: the decoder's order. Resolutions beyond the list have no stochastic layers.
        self.sizes = sizes[::-1]
        self.counts = layers_per_resolution + (0,) * (len(sizes) - len(layers_per_resolution))
        n_layers = sum(self.counts)

        # The full resolution has no stochastic layers: a stride-2 stem and a transposed conv at the output keep
        # the work (k decodes per image in log_likelihood) at half the image's size and below.
        halved = stem_halves(height, width_px)
        self.stem = nn.Conv2d(channels, width, 4, stride=2, padding=1) if halved else nn.Conv2d(channels, width, 3, padding=1)
        self.encoder_blocks = nn.ModuleList(Block(width, mid, width, residual=True) for _ in sizes)
        self.start = nn.Parameter(torch.zeros(width, *self.sizes[0]))
        self.layers = nn.ModuleList(
            TopDownLayer(width, mid, latent_channels, n_layers=n_layers, logvar_limit=logvar_limit,
                         free_bits=free_bits, backend=backend)
            for _ in range(n_layers)
        )
        # A resolution without stochastic layers still gets a residual block on the way up.
        self.plain_blocks = nn.ModuleList(
            Block(width, mid, width, residual=True) if count == 0 else nn.Identity() for count in self.counts
        )
        params = self.likelihood.params_channels(channels)
        # Back to the image's size: a 3x3 conv to 4 values per output pixel, arranged 2x2 (pixel shuffle).
        self.out = nn.Sequential(nn.Conv2d(width, 4 * params, 3, padding=1), nn.PixelShuffle(2)) if halved else (
            nn.Conv2d(width, params, 3, padding=1)
        )
        self.latent_shapes = [
            (latent_channels, *size) for size, count in zip(self.sizes, self.counts) for _ in range(count)
        ]

    # --- the pieces --------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features at each resolution, coarsest first, ``(B, width, h, w)`` each."""
        h = self.stem(x)
        features = []
        for i, block in enumerate(self.encoder_blocks):
            h = block(h)
            features.append(h)
            if i + 1 < len(self.encoder_blocks):
                h = F.avg_pool2d(h, 2)
        return features[::-1]

    def _top_down(self, batch: int, choose_z) -> torch.Tensor:
        """Run the decoder from its start state; ``choose_z(layer, index, resolution, state, prior)`` gives each
        layer's ``z``. Returns the likelihood's parameters ``(B, ...)``."""
        state = self.start.expand(batch, *self.start.shape)
        index = 0
        for resolution, (count, plain) in enumerate(zip(self.counts, self.plain_blocks)):
            if resolution > 0:
                state = F.interpolate(state, scale_factor=2, mode="nearest")
            for _ in range(count):
                layer = self.layers[index]
                prior = layer.prior(state)
                state = layer.update(state, prior, choose_z(layer, index, resolution, state, prior))
                index += 1
            state = plain(state)
        return self.out(F.gelu(state))

    def _layer_noise(self, eps: torch.Tensor | None, index: int) -> torch.Tensor | None:
        """Layer ``index``'s slice of ``eps`` ``(B, total latent elements)``, as ``(B, C, h, w)`` (a view)."""
        if eps is None:
            return None
        start = sum(math.prod(shape) for shape in self.latent_shapes[:index])
        shape = self.latent_shapes[index]
        return eps[:, start : start + math.prod(shape)].unflatten(1, shape)

    # --- training -----------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        kl_weight: torch.Tensor | float | None = None,
    ) -> HVAEOutput:
        """Encode ``x`` ``(B, C, H, W)``, sample every layer top-down (with ``eps`` ``(B, total latent elements)``
        if given, else noise drawn in the fused op), decode and score against ``target`` (default ``x``; a
        denoising run's clean images). ``kl_weight`` (default ``beta``) weights the KL term of the loss. An empty
        batch is a ``ValueError`` (its loss, a mean, is undefined)."""
        check_batch(x)
        features = self.encode(x)
        samples = []

        def posterior_sample(layer, index, resolution, state, prior):
            sample = layer.latent(layer.posterior(state, features[resolution]), prior, self._layer_noise(eps, index))
            samples.append(sample)
            return sample.z

        x_hat = self._top_down(len(x), posterior_sample)
        # The batch mean inside the fused op: loss.backward() hands its gradient over without a scaling pass.
        recon_mean, recon = self.likelihood.batch_nll(x_hat, x if target is None else target)
        weight = self.beta if kl_weight is None else kl_weight
        kl_term = sum(layer.latent.kl_loss(s.kl_channels) for layer, s in zip(self.layers, samples))
        loss = recon_mean + weight * kl_term
        kl_layers = tuple(s.kl for s in samples)
        channel_means = torch.cat([s.kl_channels.detach().mean(dim=0) for s in samples])
        active = (channel_means > ACTIVE_KL_NATS).float().sum()
        return HVAEOutput(loss, recon, sum(kl_layers), kl_layers, active, x_hat)

    def step_inputs(self, step: int) -> StepInputs:
        """The KL weight of ``step`` (:func:`~fastvae.models.vae.kl_warmup_weight`), for ``forward`` and the log."""
        weight = kl_warmup_weight(step, self.kl_warmup, self.beta)
        return StepInputs({"kl_weight": torch.tensor(weight)}, {"kl_weight": weight})

    def noise_inputs(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """``eps`` ``(batch_size, total latent elements)``: every layer's noise, drawn from ``generator``."""
        total = sum(math.prod(shape) for shape in self.latent_shapes)
        return {"eps": torch.randn((batch_size, total), generator=generator, device=device)}

    def metric_plots(self) -> dict[str, list[MetricPlot]]:
        """``kl_layers.png``: the KL of each layer over training, and the active latent channels."""
        layers = tuple(f"kl_{i}" for i in range(len(self.layers)))
        total = len(self.layers) * self.layers[0].latent_channels
        return {
            "kl_layers": [
                MetricPlot("KL per stochastic layer (0 = top)", "nats per image", layers),
                MetricPlot(f"active channels (of {total}: KL > {ACTIVE_KL_NATS} nats)", "channels",
                           ("active_channels",)),
            ]
        }

    # --- generation and evaluation --------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, n: int, *, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` images decoded top-down with every ``z_l`` drawn from its prior, whose spread is scaled by
        ``temperature`` (as VDVAE and NVAE sample; 1 is the model itself), decoded to the likelihood's
        :meth:`~fastvae.likelihoods.Likelihood.generate` (its mean; a draw for ``"dmol"``): ``(n, ...)``."""
        check_temperature(temperature)

        def prior_sample(layer, index, resolution, state, prior):
            return layer.latent.sample(prior, temperature=temperature, generator=generator)

        return self.likelihood.generate(self._top_down(n, prior_sample), generator=generator)

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's posterior mean, top-down with ``z_l`` set to it: the code of ``x``, ``L x (B, C, h, w)``."""
        features = self.encode(x)
        means = []

        def posterior_mean(layer, index, resolution, state, prior):
            mu, _ = layer.latent.split(layer.posterior(state, features[resolution]), "posterior")
            means.append(mu)
            return mu

        self._top_down(len(x), posterior_mean)
        return means

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The likelihood's :meth:`~fastvae.likelihoods.Likelihood.reconstruction` (its mean; the mode for
        ``"dmol"``) decoded top-down with each ``z_l`` fixed to ``codes[l]``."""
        return self.likelihood.reconstruction(self._top_down(len(codes[0]), lambda layer, index, *_: codes[index]))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's reconstruction decoded with every layer at its posterior mean; ``x``'s shape."""
        return self.decode(self.posterior_means(x))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer's posterior mean (:meth:`posterior_means`), flattened and joined top layer first:
        ``(B, total latent elements)``."""
        return torch.cat([mu.flatten(1) for mu in self.posterior_means(x)], dim=1)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, points: int = 10) -> torch.Tensor:
        """Decodes of ``(1 - t) code_a + t code_b`` (every layer's posterior mean), ``t`` in ``linspace(0, 1, points)``.

        ``a``, ``b``: ``(P, ...)`` images; returns ``(P, points, ...)``.
        """
        t = torch.linspace(0, 1, points, device=a.device).view(1, points, 1, 1, 1)
        codes = [
            (mu_a[:, None] + t * (mu_b - mu_a)[:, None]).flatten(0, 1)
            for mu_a, mu_b in zip(self.posterior_means(a), self.posterior_means(b))
        ]
        return self.decode(codes).view(len(a), points, *a.shape[1:])

    @torch.no_grad()
    def log_likelihood(
        self,
        x: torch.Tensor,
        k: int = 1000,
        *,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Importance-sampled estimate of ``log p(x)`` per image through every layer (IWAE), ``(B,)`` float32.

        .. math::
            \log p(x) \ge \log \frac1k \sum_{j=1}^k p(x \mid z^j)
            \prod_l \frac{p(z^j_l \mid z^j_{<l})}{q(z^j_l \mid x, z^j_{<l})}

        Each sample runs the decoder top-down, drawing ``z_l ~ q(z_l | x, z_<l)``
        through the fused op; the encoder runs once. ``chunk_size`` samples at
        a time (default: about 256 decoded images per chunk), combined with a
        running ``logsumexp``. Noise: ``torch.randn`` of each layer's shape from ``generator``.
        ``target`` (default ``x``): estimate ``log p(target)`` with ``q(z | x)`` as the proposal.
        An empty batch ``(0, ...)`` gives an empty ``(0,)`` result.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if len(x) == 0:
            return torch.empty(0, device=x.device)
        batch = x.shape[0]
        if chunk_size is None:
            chunk_size = max(1, LOG_LIKELIHOOD_ROWS // max(batch, 1))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        features = self.encode(x)
        scored = x if target is None else target
        total = None
        for start in range(0, k, chunk_size):
            c = min(chunk_size, k - start)
            repeated = [f.repeat(c, 1, 1, 1) for f in features]  # sample-major: row j * B + i
            log_w = torch.zeros(c * batch, device=x.device)

            def weighted_sample(layer, index, resolution, state, prior):
                nonlocal log_w
                posterior = layer.posterior(state, repeated[resolution])
                eps = torch.randn((c * batch, *self.latent_shapes[index]), generator=generator, device=x.device)
                z, layer_log_w = layer.latent.log_weight(posterior, prior, eps)
                log_w = log_w + layer_log_w
                return z

            x_hat = self._top_down(c * batch, weighted_sample)
            log_w = log_w - self.likelihood(x_hat, scored.repeat(c, 1, 1, 1))
            chunk_total = torch.logsumexp(log_w.view(c, batch), dim=0)
            total = chunk_total if total is None else torch.logaddexp(total, chunk_total)
        return total - math.log(k)

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, *, generator: torch.Generator, target: torch.Tensor | None = None, k: int = 1000
    ) -> dict[str, torch.Tensor]:
        """Per image of ``x``: ``elbo``, ``-(recon + kl)`` with one sample per layer and the analytic KLs, and
        ``log_likelihood``, the importance-sampled estimate with ``k`` samples (:meth:`log_likelihood`), in nats
        (and bits per dim for ``"dmol"``, as :meth:`fastvae.models.VAE.evaluate`); ``target`` as there."""
        eps = self.noise_inputs(len(x), generator=generator, device=x.device)["eps"]
        out = self(x, target=target, eps=eps, kl_weight=1.0)
        log_likelihood = self.log_likelihood(x, k, generator=generator, target=target)
        return elbo_results(self.likelihood, x, -(out.recon + out.kl), log_likelihood)

    def format_evaluation(
        self, results: dict[str, float], *, n_images: int, corruption: str | None = None, k: int = 1000
    ) -> str:
        """The held-out ELBO and log-likelihood as :meth:`fastvae.models.VAE.format_evaluation` prints them."""
        return format_elbo_evaluation(self.likelihood, results, n_images=n_images, corruption=corruption, k=k)
