"""fastvae.likelihoods: each family's -log p(x|z) against torch.distributions, its loss, mean, samples and registry."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Laplace, Normal

from fastvae.functional import reconstruction_loss
from fastvae.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    FixedGaussianLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
    Likelihood,
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
    assert list(LIKELIHOODS) == ["bce", "gaussian", "mse", "l1"]
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


def test_params_channels_is_one_per_image_channel():
    for family in LIKELIHOODS.values():
        assert family().params_channels(1) == 1 and family().params_channels(3) == 3


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
    with pytest.raises(ValueError, match="likelihood must be one of 'bce', 'gaussian', 'mse', 'l1', got 'poisson'"):
        make_likelihood("poisson")
    with pytest.raises(TypeError, match="got ReconstructionLoss"):
        make_likelihood(ReconstructionLoss("mse"))


def test_backends_agree(device):
    torch.manual_seed(2)
    params = torch.randn(4, *SHAPE, device=device)
    x = torch.rand(4, *SHAPE, device=device)
    for name in LIKELIHOODS:
        fused = make_likelihood(name, backend="triton").to(device)
        reference = make_likelihood(name, backend="torch").to(device)
        assert_close(fused(params, x), reference(params, x), rtol=1e-5, atol=1e-4)
