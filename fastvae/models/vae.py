"""The variational autoencoder: :class:`VAE`, its output :class:`VAEOutput`, and the KL warm-up schedule.

* :class:`VAE` wraps any encoder (``x -> features``) and decoder (``z -> x_hat``):
  ``forward`` gives the loss and its parts as a :class:`VAEOutput` (the ELBO), or,
  for a VAE trained on the importance-weighted bound (``iwae_k``, or ``forward(x, k=K)``),
  as an :class:`IWAEOutput` (:meth:`VAE.iwae`);
  :meth:`VAE.sample`, :meth:`VAE.reconstruct` and :meth:`VAE.log_likelihood`
  (the importance-sampled estimate of ``log p(x)``) serve evaluation.
  It is a :class:`~fastvae.models.base.TrainableModel`: its KL warm-up, its noise
  and its held-out evaluation (ELBO and log-likelihood) are its own.
* :func:`kl_warmup_weight` is the linear KL warm-up schedule.

The likelihood ``p(x | z)`` (``likelihood=``) is one of :mod:`fastvae.likelihoods`;
``recon`` is always its full ``-log p(x | z)`` in nats, constants included, so
that ``-(recon + kl)`` is the ELBO and ``log_likelihood(x, k=1)`` estimates the
same number.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from fastvae.functional import reparameterize_log_ratio
from fastvae.likelihoods import Likelihood, bits_per_dim, make_likelihood
from fastvae.models.base import StepInputs, TrainableModel, check_batch, check_temperature, held_out_label, lerp_codes
from fastvae.nn import GaussianLatent

# Rows (importance samples x images) decoded at once by log_likelihood when chunk_size is None. On the CPU a
# chunk's temporaries should stay below glibc's largest mmap threshold (32 MB), or every one is mapped and
# page-faulted afresh: at 16,384 rows the k = 1000 evaluation of 500 MNIST digits took twice as long.
LOG_LIKELIHOOD_ROWS = 4096


class VAEOutput(NamedTuple):
    """What :meth:`VAE.forward` returns (``B`` images, latent size ``D``)."""

    loss: torch.Tensor  # () float32: mean over the batch of recon + kl_weight * kl
    recon: torch.Tensor  # (B,) float32: -log p(x | z), nats per image; detached (a metric: loss has the gradient)
    kl: torch.Tensor  # (B,) float32: KL(q(z | x) || N(0, I)), nats per image
    z: torch.Tensor  # (B, D) the sample decoded
    mu: torch.Tensor  # (B, D) posterior mean
    logvar: torch.Tensor  # (B, D) posterior log sigma**2 before the soft clamp, which the fused op applies (latent.clamp)
    x_hat: torch.Tensor  # (B, ...) decoder output: the likelihood's parameters

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """The per-image values the training engine logs: ``recon`` and ``kl``, ``(B,)`` each."""
        return {"recon": self.recon, "kl": self.kl}


class IWAEOutput(NamedTuple):
    """What :meth:`VAE.iwae` returns (``K`` importance samples of ``B`` images, latent size ``D``)."""

    loss: torch.Tensor  # () float32: -mean_B(bound), the KL weight applied to each sample's log p(z) - log q(z | x)
    bound: torch.Tensor  # (B,) float32: log (1/K) sum_k p(x, z_k) / q(z_k | x), nats per image; detached
    elbo: torch.Tensor  # (B,) float32: the first sample's log weight, a one-sample ELBO; detached
    log_weights: torch.Tensor  # (K, B) float32: log p(x | z_k) + log p(z_k) - log q(z_k | x); detached
    z: torch.Tensor  # (K, B, D) the samples decoded
    mu: torch.Tensor  # (B, D) posterior mean
    logvar: torch.Tensor  # (B, D) posterior log sigma**2 before the soft clamp
    x_hat: torch.Tensor  # (K, B, ...) decoder outputs: the likelihood's parameters

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """What the training engine logs: ``bound`` and the first sample's ``elbo``, ``(B,)`` each."""
        return {"bound": self.bound, "elbo": self.elbo}


class VAE(TrainableModel):
    r"""A variational autoencoder with a diagonal Gaussian posterior and a ``N(0, I)`` prior.

    ``encoder(x) -> h`` (``(B, features)``), a :class:`~fastvae.nn.GaussianLatent`
    head ``h -> (mu, logvar) -> z`` with the fused sample + KL, ``decoder(z) -> x_hat``,
    and the likelihood's fused loss. Training minimises
    ``mean_B(recon + beta * kl)``, the negative ELBO for ``beta = 1``, with the
    KL weight rising from 0 to ``beta`` over the first ``kl_warmup`` steps; or,
    with ``iwae_k = K``, the negative importance-weighted bound with ``K``
    samples per image (:meth:`iwae`; Burda et al. 2016), the KL weight then
    scaling each sample's ``log p(z) - log q(z | x)``.

    Args:
        encoder: module mapping images ``(B, ...)`` to features ``(B, features)``.
        decoder: module mapping ``(B, latent_dim)`` to ``x_hat``, the likelihood's parameters
            (``likelihood.params_channels(C)`` channels for images of ``C``).
        latent_dim: size of ``z``.
        likelihood: a name from :data:`fastvae.likelihoods.LIKELIHOODS`, or a
            :class:`~fastvae.likelihoods.Likelihood` (for instance a per-pixel
            learned variance: ``GaussianLikelihood(logvar_shape=(1, 28, 28))``).
        beta: weight of the KL term (beta-VAE); ``forward``'s ``kl_weight`` overrides it per call.
        kl_warmup: training steps over which :meth:`step_inputs` raises the KL weight from 0 to ``beta``.
        features: the encoder's output size; ``None`` infers it from the first batch.
        logvar_limit: soft clamp of the posterior log-variance (see :class:`~fastvae.nn.GaussianLatent`).
        iwae_k: ``None`` (default): ``forward`` is the ELBO; ``K >= 1``: ``forward`` is the importance-weighted
            bound with ``K`` samples per image (:meth:`iwae`).
        backend: for the fused ops; see :mod:`fastvae.backend`.
    """

    units = "nats"

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        likelihood: str | Likelihood = "bce",
        beta: float = 1.0,
        *,
        kl_warmup: int = 0,
        features: int | None = None,
        logvar_limit: float | None = None,
        iwae_k: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        likelihood = make_likelihood(likelihood, backend=backend)
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        if kl_warmup < 0:
            raise ValueError(f"kl_warmup must be non-negative, got {kl_warmup}")
        if iwae_k is not None:
            check_samples("iwae_k", iwae_k)
        self.encoder = encoder
        self.latent = GaussianLatent(features, latent_dim, logvar_limit=logvar_limit, backend=backend)
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim
        self.beta = beta
        self.kl_warmup = kl_warmup
        self.iwae_k = iwae_k

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z | x)``, each ``(B, D)``."""
        return self.latent.posterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output for ``z`` ``(B, D)``: the parameters of ``p(x | z)`` (logits for ``"bce"``)."""
        return self.decoder(z)

    def forward(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        kl_weight: float | torch.Tensor | None = None,
        k: int | None = None,
    ) -> VAEOutput | IWAEOutput:
        """The training loss of ``x`` ``(B, ...)``: :meth:`elbo`, or :meth:`iwae` with ``k`` samples per image.

        ``k`` (default ``self.iwae_k``): ``None`` for the ELBO, an int ``K >= 1``
        for the importance-weighted bound. ``target``, ``eps`` and ``kl_weight``
        go to the method chosen (``eps`` is ``(B, D)`` for the ELBO, ``(B, K, D)`` for the bound).
        """
        k = self.iwae_k if k is None else k
        if k is None:
            return self.elbo(x, target=target, eps=eps, kl_weight=kl_weight)
        return self.iwae(x, k, target=target, eps=eps, kl_weight=kl_weight)

    def elbo(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        kl_weight: float | torch.Tensor | None = None,
    ) -> VAEOutput:
        """Encode ``x`` ``(B, ...)``, sample ``z`` (with ``eps`` ``(B, D)`` if given), decode, and score: the ELBO.

        ``recon`` is ``-log p(target | z)`` (``target`` defaults to ``x``; a
        denoising run encodes a corrupted ``x`` and scores the clean ``target``).
        ``kl_weight`` (default ``self.beta``) weights the KL in ``loss``; ``recon``
        and ``kl`` are returned unweighted, ``recon`` detached.

        The batch mean of ``recon`` is taken inside the likelihood's fused op
        (:meth:`~fastvae.likelihoods.Likelihood.batch_nll`), so the gradient its
        forward wrote reaches ``loss.backward()`` with an upstream gradient of
        exactly 1 and is handed over without a scaling pass. The KL weight costs
        nothing there: the KL's backward kernel reads its upstream gradient per
        row anyway. An empty batch is a ``ValueError`` (its loss, a mean, is undefined).
        """
        check_batch(x)
        latent = self.latent(self.encoder(x), eps)
        x_hat = self.decoder(latent.z)
        recon_mean, recon = self.likelihood.batch_nll(x_hat, x if target is None else target)
        weight = self.beta if kl_weight is None else kl_weight
        loss = recon_mean + weight * latent.kl.mean()
        return VAEOutput(loss, recon, latent.kl, latent.z, latent.mu, latent.logvar, x_hat)

    def iwae(
        self,
        x: torch.Tensor,
        k: int,
        *,
        target: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        kl_weight: float | torch.Tensor | None = None,
    ) -> IWAEOutput:
        r"""The importance-weighted bound (IWAE, Burda et al. 2016) of ``x`` ``(B, ...)`` with ``k`` samples per image.

        .. math::
            \mathcal{L}_k(x) = \log \frac1k \sum_{j=1}^k \frac{p(x \mid z_j)\, p(z_j)}{q(z_j \mid x)},
            \qquad z_j \sim q(z \mid x)

        The ``k`` samples and their ``log p(z_j) - log q(z_j | x)`` come from one
        fused op (:meth:`~fastvae.nn.GaussianLatent.importance_samples`), the
        decoder runs once on the ``k B`` samples (one ``(k, B, ...)`` tensor of
        its outputs), and the likelihood scores each (against ``target``, default
        ``x``, repeated ``k`` times). ``loss`` is ``-mean_B`` of the bound, whose
        gradient is the IWAE estimator; ``k = 1`` gives a one-sample ELBO whose
        KL is estimated from the sample. ``kl_weight`` (default ``self.beta``)
        scales each sample's ``log p(z_j) - log q(z_j | x)`` in ``loss`` (a KL
        warm-up); ``bound``, ``elbo`` and ``log_weights`` are always unweighted.
        ``eps``: optional noise ``(B, k, D)`` (batch first, as
        :meth:`noise_inputs` draws it), read in place.
        """
        check_samples("k", k)
        if eps is not None:
            expected = (len(x), k, self.latent_dim)
            if tuple(eps.shape) != expected:
                raise ValueError(f"eps must have shape (B, k, D) = {expected} for the importance-weighted bound, "
                                 f"got {tuple(eps.shape)}")
            eps = eps.transpose(0, 1)
        samples = self.latent.importance_samples(self.encoder(x), k, eps)
        x_hat = self.decoder(samples.z.flatten(0, 1))  # (k B, ...): the only tensor of decoder outputs
        scored = x if target is None else target
        # The images repeated for the k samples: a copy of the targets (not of the decoder's outputs) for k > 1.
        recon = self.likelihood(x_hat, scored.expand(k, *scored.shape).flatten(0, 1)).view(k, len(x))
        log_weights = samples.log_ratio - recon
        weight = self.beta if kl_weight is None else kl_weight
        unweighted = isinstance(weight, (int, float)) and weight == 1
        trained = log_weights if unweighted else weight * samples.log_ratio - recon
        log_k = math.log(k)
        trained_bound = torch.logsumexp(trained, dim=0) - log_k
        loss = -trained_bound.mean()
        log_weights = log_weights.detach()
        bound = trained_bound.detach() if unweighted else torch.logsumexp(log_weights, dim=0) - log_k
        x_hat = x_hat.view(k, len(x), *x_hat.shape[1:])
        return IWAEOutput(loss, bound, log_weights[0], log_weights, samples.z, samples.mu, samples.logvar, x_hat)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's :meth:`~fastvae.likelihoods.Likelihood.reconstruction` (its mean; the mode for
        ``"dmol"``) decoded from the posterior mean ``z = mu``; ``x``'s shape."""
        mu, _ = self.encode(x)
        return self.likelihood.reconstruction(self.decode(mu))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean ``mu`` ``(B, D)`` of each image of ``x``."""
        return self.encode(x)[0]

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws ``z ~ N(0, temperature**2 I)`` decoded to the likelihood's
        :meth:`~fastvae.likelihoods.Likelihood.generate` (its mean; a draw from ``p(x | z)`` for ``"dmol"``, with
        ``generator`` too): ``(n, ...)``."""
        check_temperature(temperature)
        device = next(self.parameters()).device
        z = torch.randn((n, self.latent_dim), generator=generator, device=device)
        return self.likelihood.generate(self.decode(z if temperature == 1.0 else temperature * z), generator=generator)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, points: int = 10) -> torch.Tensor:
        """The likelihood's reconstruction decoded at ``mu_a + t (mu_b - mu_a)``, ``t`` in ``linspace(0, 1, points)``.

        ``a``, ``b``: ``(P, ...)`` images; returns ``(P, points, ...)``.
        """
        z = lerp_codes(self.encode(a)[0], self.encode(b)[0], points)  # (P, points, D)
        return self.likelihood.reconstruction(self.decode(z.flatten(0, 1))).view(len(a), points, *a.shape[1:])

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
        r"""Importance-sampled estimate of ``log p(x)`` per image (the IWAE bound), ``(B,)`` float32.

        .. math::
            \log p(x) \ge \log \frac1k \sum_{j=1}^k \frac{p(x \mid z_j)\, p(z_j)}{q(z_j \mid x)},
            \qquad z_j \sim q(z \mid x)

        ``k = 1`` gives a one-sample ELBO; the bound tightens as ``k`` grows.
        ``target`` (default ``x``): estimate ``log p(target)`` instead, with
        ``q(z | x)`` as the proposal (any proposal gives a lower bound; a
        denoising run's ``x`` is the corrupted ``target``).
        The ``k`` samples are drawn and decoded ``chunk_size`` at a time (default:
        about 4,096 decoded images per chunk, fewer where the likelihood has
        more parameters than values: 4,096 / 30 for ``"dmol"`` at M = 10 on
        greyscale images), combined with a running
        ``logsumexp``, so a large ``k`` fits in memory. Noise: for each chunk of
        ``c`` samples, ``torch.randn((c, B, D), generator=generator)``.
        An empty batch ``(0, ...)`` gives an empty ``(0,)`` result.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if len(x) == 0:
            return torch.empty(0, device=x.device)
        batch, channels = x.shape[:2]
        if chunk_size is None:
            rows = LOG_LIKELIHOOD_ROWS * channels // self.likelihood.params_channels(channels)
            chunk_size = max(1, rows // max(batch, 1))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        mu, logvar = (t.float() for t in self.encode(x))
        scored = x if target is None else target
        total = None
        for start in range(0, k, chunk_size):
            c = min(chunk_size, k - start)
            eps = torch.randn((c, *mu.shape), generator=generator, device=mu.device)
            # z and log N(z; 0, I) - log N(z; mu, sigma^2) of the c samples (logvar is clamped already).
            z, log_prior_over_posterior = reparameterize_log_ratio(
                mu, logvar, eps, samples=c, backend=self.latent.backend
            )
            x_hat = self.decode(z.reshape(c * batch, -1))
            repeated = scored.expand(c, *scored.shape).reshape(c * batch, *scored.shape[1:])
            log_p_x_given_z = -self.likelihood(x_hat, repeated)
            log_w = log_p_x_given_z.view(c, batch) + log_prior_over_posterior
            chunk_total = torch.logsumexp(log_w, dim=0)
            total = chunk_total if total is None else torch.logaddexp(total, chunk_total)
        return total - math.log(k)

    # --- the training engine's interface (see fastvae.models.base) ---

    def step_inputs(self, step: int) -> StepInputs:
        """The KL weight of ``step`` (:func:`kl_warmup_weight`), for ``forward`` and for the log. The
        importance-weighted bound without a warm-up or beta takes none (its loss is then the bound itself)."""
        weight = kl_warmup_weight(step, self.kl_warmup, self.beta)
        if self.iwae_k is not None and self.kl_warmup == 0 and self.beta == 1:
            return StepInputs({}, {"kl_weight": weight})
        return StepInputs({"kl_weight": torch.tensor(weight)}, {"kl_weight": weight})

    def noise_inputs(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """``eps``: standard normal noise for ``forward``, drawn from ``generator``: ``(batch_size, D)``, or
        ``(batch_size, K, D)`` for the importance-weighted bound (``iwae_k = K``)."""
        samples = () if self.iwae_k is None else (self.iwae_k,)
        return {"eps": torch.randn((batch_size, *samples, self.latent_dim), generator=generator, device=device)}

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, *, generator: torch.Generator, target: torch.Tensor | None = None, k: int = 1000
    ) -> dict[str, torch.Tensor]:
        """Per image of ``x``: ``elbo``, ``-(recon + kl)`` with one sampled ``z`` and the analytic KL, and
        ``log_likelihood``, the importance-sampled estimate with ``k`` samples (:meth:`log_likelihood`), in nats.

        With ``target``, both score ``target`` with the posterior ``q(z | x)`` (a
        denoising run's corrupted ``x`` against the clean ``target``). For a
        likelihood of discrete values (``"dmol"``) also the same two in bits per
        dim, ``-nats / (C H W ln 2)`` (:func:`~fastvae.likelihoods.bits_per_dim`):
        ``elbo_bits_per_dim`` and ``bits_per_dim``, the unit such models are compared in.
        """
        eps = torch.randn((len(x), self.latent_dim), generator=generator, device=x.device)
        out = self.elbo(x, target=target, eps=eps, kl_weight=1.0)
        log_likelihood = self.log_likelihood(x, k, generator=generator, target=target)
        return elbo_results(self.likelihood, x, -(out.recon + out.kl), log_likelihood)

    def format_evaluation(
        self, results: dict[str, float], *, n_images: int, corruption: str | None = None, k: int = 1000
    ) -> str:
        """The held-out ELBO and log-likelihood (means of :meth:`evaluate`'s) in nats per image, in bits per dim
        for a likelihood of discrete values, and what they are comparable with."""
        return format_elbo_evaluation(self.likelihood, results, n_images=n_images, corruption=corruption, k=k)


def elbo_results(
    likelihood: Likelihood, x: torch.Tensor, elbo: torch.Tensor, log_likelihood: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A VAE's per-image held-out metrics: ``elbo`` and ``log_likelihood`` in nats, and for a likelihood of
    discrete values the same in bits per dim (``elbo_bits_per_dim``, ``bits_per_dim``) over ``x``'s values."""
    results = {"elbo": elbo, "log_likelihood": log_likelihood}
    if likelihood.discrete:
        values = x[0].numel()
        results["elbo_bits_per_dim"] = bits_per_dim(-elbo, values)
        results["bits_per_dim"] = bits_per_dim(-log_likelihood, values)
    return results


def format_elbo_evaluation(
    likelihood: Likelihood, results: dict[str, float], *, n_images: int, corruption: str | None, k: int
) -> str:
    """The lines a VAE prints for the means of :func:`elbo_results`: the held-out ELBO and importance-sampled
    log-likelihood in nats per image, in bits per dim where given, and what they are comparable with."""
    lines = [
        f"{held_out_label('ELBO', corruption)}: {results['elbo']:.2f} nats/image ({n_images} images)",
        f"{held_out_label(f'log-likelihood (importance-sampled, k={k})', corruption)}: "
        f"{results['log_likelihood']:.2f} nats/image",
    ]
    if "bits_per_dim" in results:
        lines.append(
            f"in bits/dim (-nats / (values per image x ln 2)): {results['elbo_bits_per_dim']:.4f} from the ELBO, "
            f"{results['bits_per_dim']:.4f} from the log-likelihood"
        )
    lines.append(f"comparable: {likelihood.comparable_with()}")
    return "\n".join(lines)


def check_samples(name: str, k: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``k`` is an int of at least 1 (samples per image)."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{name} must be an int, the importance samples per image, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be at least 1 (importance samples per image), got {k}")


def kl_warmup_weight(step: int, warmup_steps: int, beta: float = 1.0) -> float:
    """Linear KL warm-up: the KL weight at ``step`` (from 0), rising from 0 to ``beta`` over ``warmup_steps``.

    ``warmup_steps = 0`` gives ``beta`` from the start.
    """
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)
