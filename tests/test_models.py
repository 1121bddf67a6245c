"""fastvae.models: the VAE's loss and evaluation against direct computations, the builders, the baseline."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Laplace, Normal

from fastvae.functional import reconstruction_loss
from fastvae.models import (
    Autoencoder,
    VAE,
    conv_autoencoder,
    conv_vae,
    default_conv_widths,
    kl_warmup_weight,
    mlp_autoencoder,
    mlp_decoder,
    mlp_encoder,
    mlp_vae,
)
from fastvae.likelihoods import GaussianLikelihood
from fastvae.nn import ReconstructionLoss
from tests.utils import assert_close, assert_float32_sum_of_float64

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


def test_one_sample_log_likelihood_is_the_sampled_elbo_of_forward_on_the_same_noise():
    """k = 1 against the training path (the fused ops): on the noise forward is given, the estimate is
    -recon + log N(z; 0, I) - log q(z | x), with q's log-variance soft-clamped as the op clamps it (the head's bias
    pushes it past the clamp's knee, where an unclamped one would differ), in float64 from torch.distributions."""
    model = small_vae(logvar_limit=2.0).eval()
    with torch.no_grad():
        model.latent.head.bias[3:].fill_(2.5)  # logvar = 2.5 + ...: the clamp gives about 2 tanh(1.25) = 1.7
    x = torch.rand(4, *SHAPE).round()
    generator = torch.Generator().manual_seed(5)
    estimate = model.log_likelihood(x, 1, generator=generator)
    eps = torch.randn((1, 4, 3), generator=generator.manual_seed(5))[0]  # the draw log_likelihood documents
    with torch.no_grad():
        out = model(x, eps=eps, kl_weight=1.0)
    z, mu = out.z.double(), out.mu.double()
    logvar = 2.0 * torch.tanh(out.logvar.double() / 2.0)
    log_q = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    want = -out.recon.double() + log_prior - log_q
    assert_float32_sum_of_float64(estimate, want, terms=math.prod(SHAPE) + 3, scale=10.0)


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
    for size in (1, 7):  # odd: no number of widths fits, passed or not
        for widths in (None, (8,)):
            with pytest.raises(ValueError, match=f"image_size {size} is odd.*use an MLP") as raised:
                conv_vae(1, size, widths=widths)
            assert "fewer widths" not in str(raised.value)
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
        "held-out log-likelihood (importance-sampled, k=3): -98.77 nats/image\n"
        f"comparable: {model.likelihood.comparable_with()}"
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


def test_a_target_is_what_the_output_is_scored_against():
    """Denoising: the encoder sees x (corrupted), the loss compares with target (clean)."""
    vae, autoencoder = small_vae(), mlp_autoencoder(SHAPE, latent_dim=3, hidden=(8,))
    x, target, eps = torch.rand(4, *SHAPE), torch.rand(4, *SHAPE), torch.randn(4, 3)
    out = vae(x, target=target, eps=eps)
    assert_close(out.recon, vae.likelihood(out.x_hat, target))
    assert torch.equal(out.kl, vae(x, eps=eps).kl)  # the posterior is that of x
    out = autoencoder(x, target=target)
    assert_close(out.recon, ((out.x_hat - target) ** 2).flatten(1).sum(1))
    assert torch.equal(out.z, autoencoder(x).z)
    results = autoencoder.evaluate(x, target=target)
    assert list(results) == ["recon"] and torch.equal(results["recon"], out.recon.detach())


def test_vae_log_likelihood_of_a_target_uses_the_posterior_of_the_inputs():
    model = small_vae().eval()
    x, target = torch.rand(3, *SHAPE), torch.rand(3, *SHAPE).round()
    estimate = model.log_likelihood(x, 4, generator=torch.Generator().manual_seed(0), target=target)
    mu, logvar = model.encode(x)
    eps = torch.randn((4, 3, 3), generator=torch.Generator().manual_seed(0))
    z = mu + torch.exp(0.5 * logvar) * eps
    log_p = -model.likelihood(model.decode(z.flatten(0, 1)), target.repeat(4, 1, 1, 1)).view(4, 3)
    log_w = log_p + Normal(0, 1).log_prob(z).sum(-1) - Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert_close(estimate, torch.logsumexp(log_w, 0) - math.log(4), rtol=1e-5, atol=1e-4)


def test_codes_are_the_posterior_means_and_the_autoencoders_codes():
    vae, autoencoder = small_vae(), mlp_autoencoder(SHAPE, latent_dim=3, hidden=(8,))
    x = torch.rand(5, *SHAPE)
    assert torch.equal(vae.codes(x), vae.encode(x)[0])
    assert torch.equal(autoencoder.codes(x), autoencoder.encode(x)) and autoencoder.codes(x).shape == (5, 3)
    assert not autoencoder.codes(x).requires_grad


def test_autoencoder_samples_from_its_codes_spread_on_the_training_data():
    torch.manual_seed(6)
    model = mlp_autoencoder(SHAPE, latent_dim=3, hidden=(8,))
    assert torch.equal(model.code_mean, torch.zeros(3)) and torch.equal(model.code_std, torch.ones(3))
    images = torch.rand(50, *SHAPE)
    model.after_training(images.split(7))  # batches of any size
    codes = model.encode(images).detach().double()
    assert_close(model.code_mean, codes.mean(0).float())
    assert_close(model.code_std, codes.std(0, correction=0).float())
    assert set(model.state_dict()) >= {"code_mean", "code_std"}  # checkpointed with the weights
    noise = torch.randn((6, 3), generator=torch.Generator().manual_seed(1))
    expected = model.decode(model.code_mean + model.code_std * noise)
    assert_close(model.sample(6, generator=torch.Generator().manual_seed(1)), expected.detach())
    assert "no prior" in model.sample_note() and small_vae().sample_note() is None


def test_autoencoder_interpolates_between_codes_and_reports_its_units():
    model = mlp_autoencoder(SHAPE, latent_dim=3, hidden=(8,), likelihood="l1")
    a, b = torch.rand(2, *SHAPE), torch.rand(2, *SHAPE)
    path = model.interpolate(a, b, 5)
    assert path.shape == (2, 5, *SHAPE)
    assert_close(path[:, 0], model.reconstruct(a))
    assert_close(path[:, -1], model.reconstruct(b))
    assert_close(path[:, 2], model.decode((model.encode(a) + model.encode(b)) / 2).detach())
    assert model.units == "absolute error" and small_vae().units == "nats"
    assert model.format_evaluation({"recon": 3.14159}, n_images=7) == (
        "held-out reconstruction error: 3.14 absolute error/image (7 images)"
    )
    assert model.format_evaluation({"recon": 2.5}, n_images=7, corruption="mask:0.5") == (
        "held-out reconstruction error from inputs corrupted by mask:0.5 (against the clean images): "
        "2.50 absolute error/image (7 images)"
    )


def test_autoencoder_builders_share_the_vaes_networks():
    vae, autoencoder = mlp_vae(SHAPE, latent_dim=3, hidden=(8, 6)), mlp_autoencoder(SHAPE, latent_dim=3, hidden=(8, 6))
    assert str(autoencoder.encoder) == str(vae.encoder) and str(autoencoder.decoder) == str(vae.decoder)
    assert autoencoder.head.in_features == 6 and autoencoder.likelihood.name == "mse"
    conv = conv_autoencoder(1, 8, latent_dim=4, widths=(4,), likelihood="bce")
    assert str(conv.decoder) == str(conv_vae(1, 8, latent_dim=4, widths=(4,)).decoder)
    assert conv(torch.rand(2, 1, 8, 8)).x_hat.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="hidden"):
        mlp_autoencoder(SHAPE, hidden=())
    with pytest.raises(ValueError, match="divisible"):
        conv_autoencoder(1, 8, widths=(4, 4, 4, 4))


# ---- the discretized mixture of logistics as the VAE's likelihood ------------------------------------------


@pytest.mark.parametrize("shape, model", [((1, 4, 4), "mlp"), ((3, 4, 4), "mlp"), ((3, 8, 8), "conv")])
def test_vae_with_the_mixture_scores_draws_and_reconstructs_on_the_level_grid(shape, model):
    from fastvae.likelihoods import make_likelihood
    from fastvae.ops.discretized_logistic_mixture import discretized_logistic_mixture_nll_reference

    likelihood = make_likelihood("dmol", num_mixtures=2, num_bits=5)
    if model == "mlp":
        vae = mlp_vae(shape, latent_dim=3, hidden=(12,), likelihood=likelihood)
    else:
        vae = conv_vae(shape[0], shape[1], latent_dim=3, widths=(4,), likelihood=likelihood)
    x = torch.rand(5, *shape)
    out = vae(x)
    assert out.x_hat.shape == (5, likelihood.params_channels(shape[0]), *shape[1:])  # 6 or 20 channels per pixel
    assert_close(out.recon, discretized_logistic_mixture_nll_reference(out.x_hat, x, 2, 5))
    out.loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
    recon = vae.reconstruct(x)
    assert_close(recon, likelihood.mode(vae.decode(vae.encode(x)[0])))
    samples = vae.sample(6, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)  # the same stream: z first, then the draw from p(x | z)
    z = torch.randn(6, 3, generator=generator)
    assert torch.equal(samples, likelihood.sample(vae.decode(z), generator=generator))
    for images in (recon, samples, vae.interpolate(x[:2], x[2:4], 3)):
        assert images.shape[-3:] == shape and torch.equal(images * 31, (images * 31).round())


def test_bits_per_dim_of_the_mixture_in_the_evaluation():
    """Zero parameters at 1 bit give each value probability 1/2: recon is one bit per dim, exactly."""
    vae = mlp_vae((3, 2, 2), latent_dim=2, hidden=(4,), likelihood=make_dmol(num_mixtures=1, num_bits=1)).eval()
    with torch.no_grad():
        vae.decoder[-2].weight.zero_()
        vae.decoder[-2].bias.zero_()
    x = torch.rand(4, 3, 2, 2).round()
    results = vae.evaluate(x, generator=torch.Generator().manual_seed(0), k=2)
    assert list(results) == ["elbo", "log_likelihood", "elbo_bits_per_dim", "bits_per_dim"]
    out = vae(x, eps=torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))
    assert_close(out.recon, torch.full((4,), 12 * math.log(2.0)))
    assert_close(results["elbo_bits_per_dim"], 1 + out.kl.detach() / (12 * math.log(2.0)))
    assert_close(results["bits_per_dim"], -results["log_likelihood"] / (12 * math.log(2.0)))
    means = {name: values.mean().item() for name, values in results.items()}
    text = vae.format_evaluation(means, n_images=4, k=2).splitlines()
    assert text[2] == (
        f"in bits/dim (-nats / (values per image x ln 2)): {means['elbo_bits_per_dim']:.4f} from the ELBO, "
        f"{means['bits_per_dim']:.4f} from the log-likelihood"
    )
    assert text[3].startswith("comparable: dmol: probabilities of discrete 1-bit levels")
    assert "elbo_bits_per_dim" not in small_vae().evaluate(torch.rand(2, *SHAPE), generator=torch.Generator(), k=1)


def test_log_likelihood_chunks_hold_as_many_parameters_whatever_the_likelihood(monkeypatch):
    """The default chunk is LOG_LIKELIHOOD_ROWS images' worth of parameters: 1/30 as many images at M = 10, C = 1."""
    from fastvae.models import vae as vae_module

    monkeypatch.setattr(vae_module, "LOG_LIKELIHOOD_ROWS", 120)
    decoded = []
    model = mlp_vae(SHAPE, latent_dim=3, hidden=(12,), likelihood="dmol").eval()
    monkeypatch.setattr(model, "decode", lambda z: decoded.append(len(z)) or model.decoder(z))
    model.log_likelihood(torch.rand(2, *SHAPE), k=5)
    assert decoded == [4, 4, 2]  # 120 * 1 // 30 = 4 rows a chunk: 2 samples of 2 images, then the last one


def test_autoencoder_with_the_mixture_reconstructs_its_mode():
    likelihood = make_dmol(num_mixtures=2)
    model = Autoencoder(mlp_encoder(SHAPE, (8,)), mlp_decoder(3, (6, 4, 5), (8,)), 3, likelihood=likelihood, features=8)
    x = torch.rand(4, *SHAPE)
    out = model(x)
    assert_close(out.recon, likelihood(out.x_hat, x))
    assert torch.equal(model.reconstruct(x), likelihood.mode(out.x_hat.detach()))


def make_dmol(**options):
    from fastvae.likelihoods import make_likelihood

    return make_likelihood("dmol", **options)


@pytest.mark.parametrize("model", ["vae", "ae"])
def test_sampling_at_temperature_zero_decodes_the_prior_mean(model):
    """``temperature`` scales the draws' spread: at 0 every sample decodes the centre (0 for the VAE's prior,
    the codes' mean for an autoencoder); a negative one is refused."""
    built = small_vae() if model == "vae" else mlp_autoencoder(SHAPE, latent_dim=3, hidden=(8,))
    samples = built.sample(4, temperature=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, samples[0].expand_as(samples))
    with pytest.raises(ValueError, match="temperature"):
        built.sample(2, temperature=-1.0)


def test_an_empty_batch_has_no_loss_but_has_empty_per_image_results():
    """forward's loss is a mean over the batch: an empty batch is a ValueError saying so, for every model; per-image
    results (log_likelihood, codes, reconstructions) of no images are empty, of the right shape."""
    from fastvae.models import HierarchicalVAE

    image = (1, 8, 8)
    models = [
        mlp_vae(image, latent_dim=3, hidden=(12,)),
        conv_vae(1, 8, latent_dim=3, widths=(4,)),
        mlp_autoencoder(image, latent_dim=3, hidden=(12,)),
        HierarchicalVAE(image, layers_per_resolution=(1, 1), latent_channels=2, width=8),
    ]
    empty = torch.rand(0, *image)
    for model in models:
        model.eval()
        with pytest.raises(ValueError, match=r"x must be a batch of at least one image.*got shape \(0, 1, 8, 8\)"):
            model(empty)
        if hasattr(model, "log_likelihood"):
            estimate = model.log_likelihood(empty, 3)
            assert estimate.shape == (0,) and estimate.dtype == torch.float32
        assert model.codes(empty).shape[0] == 0
        assert model.reconstruct(empty).shape == empty.shape
