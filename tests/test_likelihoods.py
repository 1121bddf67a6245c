"""fastvae.likelihoods: each family's -log p(x|z) against torch.distributions, its loss, mean, samples and registry."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Laplace, Normal

from fastvae.functional import (
    discretized_logistic_mixture_mode,
    discretized_logistic_mixture_nll,
    reconstruction_loss,
    sample_discretized_logistic_mixture,
)
from fastvae.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    DiscretizedLogisticMixtureLikelihood,
    FixedGaussianLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
    Likelihood,
    bits_per_dim,
    make_likelihood,
)
from fastvae.nn import ReconstructionLoss
from tests.utils import assert_close

SHAPE = (2, 3, 4)


def distribution(likelihood: Likelihood, params: torch.Tensor):
    """The torch.distributions form of ``p(x | params)``: the specification of each family."""
    if isinstance(likelihood, BernoulliLikelihood):
        return Bernoulli(logits=params)
    if isinstance(likelihood, GaussianLikelihood):
        return Normal(params, torch.exp(0.5 * likelihood.logvar).expand_as(params))
    if isinstance(likelihood, FixedGaussianLikelihood):
        return Normal(params, math.sqrt(0.5))
    return Laplace(params, 1.0)


def test_the_registry_names_every_family_in_the_command_line_order():
    assert list(LIKELIHOODS) == ["bce", "gaussian", "mse", "l1", "dmol"]
    for name, family in LIKELIHOODS.items():
        assert family.name == name and issubclass(family, Likelihood)


@pytest.mark.parametrize("name", ["bce", "gaussian", "mse", "l1"])
def test_nll_is_the_exact_negative_log_likelihood_and_loss_drops_the_constant(name):
    torch.manual_seed(0)
    likelihood = make_likelihood(name)
    if name == "gaussian":
        with torch.no_grad():
            likelihood.logvar.fill_(-0.7)
    params, x = torch.randn(5, *SHAPE), torch.rand(5, *SHAPE)
    if name == "bce":
        x = x.round()
    nll = likelihood(params, x)
    assert nll.shape == (5,) and nll.dtype == torch.float32
    assert_close(nll, -distribution(likelihood, params).log_prob(x).flatten(1).sum(1), rtol=1e-5, atol=1e-4)
    # loss is the fused op alone: -log p without its constant terms (the squared error for "mse").
    logvar = likelihood.logvar if name == "gaussian" else None
    assert torch.equal(likelihood.loss(params, x), reconstruction_loss(params, x, name, logvar=logvar))
    constant = {"bce": 0.0, "gaussian": 0.0, "mse": 0.5 * math.log(math.pi), "l1": math.log(2.0)}[name]
    assert_close(nll - likelihood.loss(params, x), torch.full((5,), constant * math.prod(SHAPE)))
    units = {"bce": "nats", "gaussian": "nats", "mse": "squared error", "l1": "absolute error"}[name]
    assert likelihood.loss_units == units


@pytest.mark.parametrize("name", ["bce", "gaussian", "mse", "l1"])
def test_mean_and_samples_follow_the_distribution(name):
    likelihood = make_likelihood(name)
    if name == "gaussian":
        with torch.no_grad():
            likelihood.logvar.fill_(math.log(0.25))  # sigma = 0.5
    params = torch.linspace(-1.5, 1.5, 6).repeat(40000, 1)
    dist = distribution(likelihood, params[:1])
    assert_close(likelihood.mean(params[:1]), dist.mean)
    samples = likelihood.sample(params, generator=torch.Generator().manual_seed(1))
    assert samples.shape == params.shape and samples.dtype == params.dtype
    assert torch.equal(samples, likelihood.sample(params, generator=torch.Generator().manual_seed(1)))
    # 40,000 draws per column: the empirical mean and spread within a few standard errors.
    assert_close(samples.mean(0), dist.mean[0], rtol=0, atol=0.03)
    assert_close(samples.std(0), dist.stddev[0], rtol=0.03, atol=0)


def test_params_channels_is_one_per_image_channel_but_for_the_mixture():
    for name, family in LIKELIHOODS.items():
        if name != "dmol":
            assert family().params_channels(1) == 1 and family().params_channels(3) == 3
    assert make_likelihood("dmol").params_channels(1) == 30 and make_likelihood("dmol").params_channels(3) == 100
    assert make_likelihood("dmol", num_mixtures=4).params_channels(3) == 40


def test_gaussian_logvar_of_any_broadcast_shape():
    likelihood = GaussianLikelihood(logvar_shape=SHAPE, init_logvar=0.3)
    assert likelihood.logvar.shape == SHAPE and torch.all(likelihood.logvar == 0.3)
    assert GaussianLikelihood(logvar_shape=4).logvar.shape == (4,)
    params, x = torch.randn(3, *SHAPE), torch.rand(3, *SHAPE)
    likelihood(params, x).sum().backward()
    assert likelihood.logvar.grad.shape == SHAPE
    assert [name for name, _ in likelihood.named_parameters()] == ["logvar"]
    assert not list(make_likelihood("mse").parameters())


def test_make_likelihood():
    assert isinstance(make_likelihood("l1"), LaplaceLikelihood)
    assert make_likelihood("bce", backend="torch").backend == "torch"
    given = GaussianLikelihood(backend="triton")
    assert make_likelihood(given, backend="torch") is given  # an object keeps its own backend
    with pytest.raises(ValueError, match="likelihood must be one of 'bce', 'gaussian', 'mse', 'l1', 'dmol', got 'poisson'"):
        make_likelihood("poisson")
    with pytest.raises(TypeError, match="got ReconstructionLoss"):
        make_likelihood(ReconstructionLoss("mse"))
    dmol = make_likelihood("dmol", num_mixtures=3, num_bits=5, backend="torch")
    assert (dmol.mixture.num_mixtures, dmol.mixture.num_bits, dmol.mixture.backend) == (3, 5, "torch")
    with pytest.raises(ValueError, match="likelihood 'mse' has no option num_bits; it takes none"):
        make_likelihood("mse", num_bits=5)
    with pytest.raises(ValueError, match="has no option scale; its options are num_mixtures, num_bits"):
        make_likelihood("dmol", scale=2)
    with pytest.raises(ValueError, match="apply to a likelihood given by name"):
        make_likelihood(dmol, num_mixtures=2)
    with pytest.raises(ValueError, match="num_bits must be from 1 to 16"):
        make_likelihood("dmol", num_bits=17)


def test_backends_agree(device):
    torch.manual_seed(2)
    x = torch.rand(4, *SHAPE, device=device)
    for name in LIKELIHOODS:
        options = {"num_mixtures": 2} if name == "dmol" else {}
        fused = make_likelihood(name, backend="triton", **options).to(device)
        reference = make_likelihood(name, backend="torch", **options).to(device)
        params = torch.randn(4, fused.params_channels(SHAPE[0]), *SHAPE[1:], device=device)
        assert_close(fused(params, x), reference(params, x), rtol=1e-5, atol=1e-4)


def test_the_mixture_is_the_fused_op_and_shows_its_mode_and_draws():
    likelihood = make_likelihood("dmol", num_mixtures=2, num_bits=5)
    assert likelihood.name == "dmol" and likelihood.discrete and likelihood.loss_units == "nats"
    assert not any(family.discrete for name, family in LIKELIHOODS.items() if name != "dmol")
    x = torch.rand(3, 3, 4, 4)  # RGB
    params = torch.randn(3, likelihood.params_channels(3), 4, 4)  # 10 M = 20 channels
    nll = likelihood(params, x)
    assert torch.equal(nll, discretized_logistic_mixture_nll(params, x, num_mixtures=2, num_bits=5))
    assert torch.equal(likelihood.loss(params, x), nll)  # exact nats, no constant left out
    mode = discretized_logistic_mixture_mode(params, num_mixtures=2, num_bits=5)
    assert torch.equal(likelihood.mode(params), mode) and torch.equal(likelihood.reconstruction(params), mode)
    draw = likelihood.generate(params, generator=torch.Generator().manual_seed(3))
    expected = sample_discretized_logistic_mixture(
        params, num_mixtures=2, num_bits=5, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(draw, expected) and draw.shape == x.shape
    assert torch.equal(likelihood.sample(params, generator=torch.Generator().manual_seed(3)), expected)
    assert torch.equal(draw * 31, (draw * 31).round())  # on the 5-bit level grid
    with pytest.raises(NotImplementedError, match="no closed form"):
        likelihood.mean(params)
    assert not list(likelihood.parameters())
    for name in LIKELIHOODS:
        assert f"{name}: " in make_likelihood(name).comparable_with()


def test_the_mixture_told_its_image_channels_checks_them_and_the_builder_tells_it():
    likelihood = make_likelihood("dmol", num_mixtures=10, channels=3)
    assert likelihood.mixture.channels == 3 and likelihood.params_channels(3) == 100
    greyscale = torch.randn(2, 30, 4, 4)  # greyscale parameters at M = 10, which would read as RGB at M = 3
    for show in (likelihood.sample, likelihood.mode, likelihood.reconstruction, likelihood.generate):
        with pytest.raises(ValueError, match="with channels=3 needs"):
            show(greyscale)
    for score in (likelihood, likelihood.loss, likelihood.batch_nll, likelihood.batch_loss):
        with pytest.raises(ValueError, match="is for images of 3 channels, got x of shape"):
            score(greyscale, torch.rand(2, 1, 4, 4))
    assert make_likelihood("mse", channels=3).params_channels(3) == 3  # the others take channels= and ignore it
    from fastvae.training.builders import build_model
    from fastvae.training.config import TrainConfig

    model = build_model(TrainConfig(likelihood="dmol", num_mixtures=3, latent_dim=2), (3, 8, 8), "torch")
    assert model.likelihood.mixture.channels == 3
    from fastvae.models import HierarchicalVAE, conv_autoencoder, conv_vae, mlp_autoencoder, mlp_vae

    dmol = dict(likelihood="dmol")
    models = {1: (mlp_vae((1, 8, 8), latent_dim=2, **dmol), mlp_autoencoder((1, 8, 8), latent_dim=2, **dmol)),
              3: (conv_vae(3, 8, latent_dim=2, **dmol), conv_autoencoder(3, 8, latent_dim=2, **dmol),
                  HierarchicalVAE((3, 8, 8), **dmol))}
    for channels, built in models.items():
        assert all(model.likelihood.mixture.channels == channels for model in built)


def test_the_other_families_show_their_mean():
    params = torch.randn(2, *SHAPE)
    for name in ("bce", "gaussian", "mse", "l1"):
        likelihood = make_likelihood(name)
        assert torch.equal(likelihood.reconstruction(params), likelihood.mean(params))
        assert torch.equal(likelihood.generate(params, generator=torch.Generator()), likelihood.mean(params))


def test_bits_per_dim_is_nats_over_values_times_log_2():
    assert bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)
    assert bits_per_dim(1000.0, 3 * 32 * 32) == pytest.approx(1000.0 / (3072 * math.log(2.0)))
    # One logistic centred between the 2 levels of 1 bit: each value has probability 1/2, one bit exactly.
    likelihood = DiscretizedLogisticMixtureLikelihood(num_mixtures=1, num_bits=1)
    x = torch.rand(4, 3, 5, 5).round()
    nll = likelihood(torch.zeros(4, likelihood.params_channels(3), 5, 5), x)
    assert_close(bits_per_dim(nll, 75), torch.ones(4))
