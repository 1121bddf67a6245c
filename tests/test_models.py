"""fastvae.models: the VAE's loss and evaluation against direct computations, the builders, the baseline."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Laplace, Normal

from fastvae.functional import reconstruction_loss
from fastvae.models import (
    Autoencoder,
    VAE,
    conv_vae,
    default_conv_widths,
    kl_warmup_weight,
    mlp_decoder,
    mlp_encoder,
    mlp_vae,
)
from fastvae.likelihoods import GaussianLikelihood
from fastvae.nn import ReconstructionLoss
from tests.utils import assert_close

SHAPE = (1, 4, 5)


def small_vae(likelihood="bce", **kw) -> VAE:
    return mlp_vae(SHAPE, latent_dim=3, hidden=(12,), likelihood=likelihood, **kw)


def test_forward_returns_the_named_parts_of_the_loss():
    model = small_vae(beta=0.5)
    x, eps = torch.rand(6, *SHAPE), torch.randn(6, 3)
    out = model(x, eps=eps)
    assert out._fields == ("loss", "recon", "kl", "z", "mu", "logvar", "x_hat")
    assert out.recon.shape == out.kl.shape == (6,) and out.loss.shape == ()
    assert out.z.shape == out.mu.shape == out.logvar.shape == (6, 3)
    assert out.x_hat.shape == x.shape
    assert_close(out.z, out.mu + torch.exp(0.5 * model.latent.clamp(out.logvar)) * eps)
    assert_close(out.recon, reconstruction_loss(out.x_hat, x, "bce"))
    assert_close(out.loss, (out.recon + 0.5 * out.kl).mean())
    assert_close(model(x, eps=eps, kl_weight=2.0).loss, (out.recon + 2.0 * out.kl).mean())


def exact_log_p_x_given_z(model: VAE, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | z) per image from torch.distributions: the spec of each likelihood."""
    kind = model.likelihood.name
    if kind == "bce":
        dist = Bernoulli(logits=x_hat)
    elif kind == "gaussian":
        dist = Normal(x_hat, torch.exp(0.5 * model.likelihood.logvar))
    elif kind == "mse":
        dist = Normal(x_hat, math.sqrt(0.5))
    else:
        dist = Laplace(x_hat, 1.0)
    return dist.log_prob(x).flatten(1).sum(1)


@pytest.mark.parametrize("likelihood", ["bce", "gaussian", "mse", "l1"])
def test_recon_is_the_exact_negative_log_likelihood(likelihood):
    model = small_vae(likelihood)
    if likelihood == "gaussian":
        with torch.no_grad():
            model.likelihood.logvar.fill_(-1.3)
    x = torch.rand(5, *SHAPE)
    if likelihood == "bce":
        x = x.round()  # Bernoulli's log_prob wants binary values
    out = model(x)
    assert_close(out.recon, -exact_log_p_x_given_z(model, out.x_hat, x), rtol=1e-5, atol=1e-4)


def direct_log_likelihood(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log (1/k) sum_j p(x|z_j) p(z_j) / q(z_j|x) with z_j = mu + sigma eps_j, from torch.distributions."""
    mu, logvar = model.encode(x)
    posterior = Normal(mu, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    log_w = []
    for e in eps:  # one explicit sample at a time
        z = mu + torch.exp(0.5 * logvar) * e
        log_w.append(
            exact_log_p_x_given_z(model, model.decode(z), x) + prior.log_prob(z).sum(-1) - posterior.log_prob(z).sum(-1)
        )
    return torch.logsumexp(torch.stack(log_w), dim=0) - math.log(len(eps))


@pytest.mark.parametrize("likelihood", ["bce", "gaussian"])
@pytest.mark.parametrize("k, chunk_size", [(1, 1), (5, 1), (5, 2), (5, 5)])
def test_log_likelihood_against_a_direct_computation(likelihood, k, chunk_size):
    torch.manual_seed(1)
    model = small_vae(likelihood).eval()
    x = torch.rand(4, *SHAPE).round()
    generator = torch.Generator().manual_seed(7)
    estimate = model.log_likelihood(x, k, chunk_size=chunk_size, generator=generator)
    # The same noise, drawn as log_likelihood documents: chunk by chunk, (c, B, D) each.
    generator.manual_seed(7)
    sizes = [min(chunk_size, k - start) for start in range(0, k, chunk_size)]
    eps = torch.cat([torch.randn((c, 4, 3), generator=generator) for c in sizes])
    with torch.no_grad():
        expected = direct_log_likelihood(model, x, eps)
    assert estimate.shape == (4,)
    assert_close(estimate, expected, rtol=1e-5, atol=1e-4)


def test_log_likelihood_bound_is_tighter_than_the_elbo_on_average():
    torch.manual_seed(2)
    model = small_vae().eval()
    x = torch.rand(64, *SHAPE).round()
    elbo = -(model(x).recon + model(x).kl).mean()
    iwae = model.log_likelihood(x, 200).mean()
    single = model.log_likelihood(x, 1).mean()
    # k = 1 estimates the ELBO (its sampled-KL form); many samples give a higher bound.
    assert abs(single - elbo) < 0.05 * abs(elbo)
    assert iwae > elbo


def test_backends_agree_for_the_whole_model(device):
    torch.manual_seed(3)
    fused = small_vae(backend="triton").to(device)
    reference = small_vae(backend="torch").to(device)
    reference.load_state_dict(fused.state_dict())
    x, eps = torch.rand(6, *SHAPE, device=device), torch.randn(6, 3, device=device)
    out, ref = fused(x, eps=eps), reference(x, eps=eps)
    assert_close(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    for p, p_ref in zip(fused.parameters(), reference.parameters()):
        assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5)


def test_sample_and_reconstruct_give_means_of_the_image_shape():
    model = small_vae()
    samples = model.sample(7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (7, *SHAPE)
    assert samples.min() >= 0 and samples.max() <= 1  # Bernoulli means
    assert torch.equal(samples, model.sample(7, generator=torch.Generator().manual_seed(0)))
    x = torch.rand(3, *SHAPE)
    recon = model.reconstruct(x)
    mu, _ = model.encode(x)
    assert_close(recon, torch.sigmoid(model.decode(mu)))
    assert not recon.requires_grad
    mse = small_vae("mse")  # the other likelihoods' means are the decoder's output, not squashed
    z = torch.randn(2, 3)
    assert_close(mse.likelihood.mean(mse.decode(z)), mse.decode(z))


@pytest.mark.parametrize(
    "channels, size, widths",
    [(1, 28, (32, 64)), (1, 64, (32, 64, 128, 256)), (3, 8, (32,))],
)
def test_conv_vae_default_widths_fit_the_image(channels, size, widths):
    assert default_conv_widths(size) == widths
    model = conv_vae(channels, size, latent_dim=4, widths=[4] * len(widths))
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.x_hat.shape == x.shape and torch.isfinite(out.loss)


def test_builders_reject_shapes_they_cannot_build():
    with pytest.raises(ValueError, match="image_size 28 must be divisible by 2\\*\\*len\\(widths\\) = 8"):
        conv_vae(1, 28, widths=(8, 8, 8))
    with pytest.raises(ValueError, match="hidden"):
        mlp_vae(SHAPE, hidden=())
    with pytest.raises(ValueError, match="likelihood must be one of"):
        small_vae("poisson")
    with pytest.raises(TypeError, match="likelihood must be a name or a Likelihood, got ReconstructionLoss"):
        VAE(mlp_encoder(SHAPE, (8,)), mlp_decoder(2, SHAPE, (8,)), 2, ReconstructionLoss("mse"), features=8)
    with pytest.raises(ValueError, match="beta"):
        small_vae(beta=-1.0)


def test_vae_takes_a_likelihood_module_with_per_feature_variance():
    likelihood = GaussianLikelihood(logvar_shape=SHAPE)
    model = VAE(mlp_encoder(SHAPE, (8,)), mlp_decoder(2, SHAPE, (8,)), 2, likelihood)  # features inferred
    out = model(torch.rand(3, *SHAPE))
    out.loss.backward()
    assert model.likelihood.logvar.grad.shape == SHAPE


def test_kl_warmup_rises_linearly_to_beta():
    assert [kl_warmup_weight(s, 4, 2.0) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert kl_warmup_weight(0, 0, 0.7) == 0.7


def test_autoencoder_loss_is_the_squared_error_and_it_trains():
    torch.manual_seed(4)
    model = Autoencoder(mlp_encoder(SHAPE, (16,)), mlp_decoder(3, SHAPE, (16,)), 3, features=16)
    x = torch.rand(32, *SHAPE)
    out = model(x)
    assert_close(out.recon, ((x - out.x_hat) ** 2).flatten(1).sum(1))
    assert_close(out.loss, out.recon.mean())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = out.loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        model(x).loss.backward()
        optimizer.step()
    assert model(x).loss.item() < 0.5 * first
    assert model.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vae_trains_under_autocast_with_bce(dtype):
    torch.manual_seed(5)
    model = small_vae()
    x = torch.rand(16, *SHAPE).round()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        assert out.x_hat.dtype == dtype and out.loss.dtype == torch.float32
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_vae_speaks_the_training_interface():
    """What the training engine asks of a VAE: metrics, the KL warm-up, the global noise, evaluation, figures."""
    model = small_vae(beta=2.0, kl_warmup=10)
    x = torch.rand(4, *SHAPE)
    out = model(x)
    assert list(out.metrics) == ["recon", "kl"]
    assert out.metrics["recon"] is out.recon and out.metrics["kl"] is out.kl
    # The KL weight rises linearly from 0 at step 0 to beta at step kl_warmup, as a tensor for forward.
    for step, weight in [(0, 0.0), (1, 0.2), (3, 0.6), (10, 2.0), (25, 2.0)]:
        inputs = model.step_inputs(step)
        assert inputs.log == {"kl_weight": weight}
        assert list(inputs.forward) == ["kl_weight"] and inputs.forward["kl_weight"].item() == pytest.approx(weight)
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    noise = model.noise_inputs(4, generator=torch.Generator().manual_seed(3), device=torch.device("cpu"))
    assert list(noise) == ["eps"] and torch.equal(noise["eps"], eps)
    out = model(x, **noise, kl_weight=torch.tensor(0.5))
    assert_close(out.loss, (out.recon + 0.5 * out.kl).mean())


def test_vae_evaluation_is_the_elbo_and_the_log_likelihood_per_image():
    model = small_vae().eval()
    x = torch.rand(5, *SHAPE).round()
    results = model.evaluate(x, generator=torch.Generator().manual_seed(4), k=3)
    generator = torch.Generator().manual_seed(4)  # the same noise: eps for the ELBO, then the k samples
    out = model(x, eps=torch.randn(5, 3, generator=generator))
    expected_log_likelihood = model.log_likelihood(x, 3, generator=generator)
    assert list(results) == ["elbo", "log_likelihood"]
    assert torch.equal(results["elbo"], -(out.recon + out.kl).detach())
    assert torch.equal(results["log_likelihood"], expected_log_likelihood)
    text = model.format_evaluation({"elbo": -100.123, "log_likelihood": -98.765}, n_images=5, k=3)
    assert text == (
        "held-out ELBO: -100.12 nats/image (5 images)\n"
        "held-out log-likelihood (importance-sampled, k=3): -98.77 nats/image"
    )


def test_interpolation_runs_between_the_posterior_means():
    model = small_vae().eval()
    a, b = torch.rand(2, *SHAPE), torch.rand(2, *SHAPE)
    path = model.interpolate(a, b, 5)
    assert path.shape == (2, 5, *SHAPE)
    assert_close(path[:, 0], model.reconstruct(a))
    assert_close(path[:, -1], model.reconstruct(b))
    mid = torch.sigmoid(model.decode((model.encode(a)[0] + model.encode(b)[0]) / 2))
    assert_close(path[:, 2], mid)


def test_decoders_output_the_likelihoods_parameter_channels(monkeypatch):
    from fastvae.likelihoods import BernoulliLikelihood

    monkeypatch.setattr(BernoulliLikelihood, "params_channels", lambda self, c: 3 * c)
    assert mlp_vae((2, 4, 4), hidden=(8,)).decode(torch.zeros(1, 16)).shape == (1, 6, 4, 4)
    assert conv_vae(2, 8, widths=(4,)).decode(torch.zeros(1, 32)).shape == (1, 6, 8, 8)


def test_autoencoder_speaks_the_training_interface_without_noise_or_schedule():
    model = Autoencoder(mlp_encoder(SHAPE, (8,)), mlp_decoder(3, SHAPE, (8,)), 3, features=8)
    out = model(torch.rand(2, *SHAPE))
    assert list(out.metrics) == ["recon"] and out.metrics["recon"] is out.recon
    assert model.step_inputs(7) == ({}, {})
    assert model.noise_inputs(2, generator=torch.Generator(), device=torch.device("cpu")) is None


def test_autoencoder_with_another_likelihood_minimises_its_loss():
    model = Autoencoder(mlp_encoder(SHAPE, (8,)), mlp_decoder(3, SHAPE, (8,)), 3, likelihood="bce", features=8)
    x = torch.rand(4, *SHAPE)
    out = model(x)
    assert_close(out.recon, reconstruction_loss(out.x_hat, x, "bce"))
    assert_close(model.reconstruct(x), torch.sigmoid(out.x_hat.detach()))
