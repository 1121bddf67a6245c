"""The models' losses take the fused losses' 3-pass path: the batch mean is folded into the op's forward, so
``loss.backward()`` of a training step hands the saved gradient over untouched (the in-place scaling kernel sees
weights of exactly 1 and moves nothing), where the per-image loss followed by ``.mean()`` scaled every row by
1 / B. The per-image metrics stay as they were; loss and gradients match the reference path."""
import pytest
import torch

from fastvae.kernels import scale_rows as scaling
from fastvae.models import HierarchicalVAE, mlp_autoencoder, mlp_vae
from tests.utils import assert_close

SHAPE = (1, 8, 8)
BATCH = 4


def vae(likelihood, backend):
    return mlp_vae(SHAPE, latent_dim=3, hidden=(8,), likelihood=likelihood, kl_warmup=10, backend=backend)


def hvae(likelihood, backend):
    return HierarchicalVAE(SHAPE, layers_per_resolution=(1, 1), latent_channels=2, width=8, likelihood=likelihood,
                           backend=backend)


def autoencoder(likelihood, backend):
    return mlp_autoencoder(SHAPE, latent_dim=3, hidden=(8,), likelihood=likelihood, backend=backend)


MODELS = {
    "vae-bce": (vae, "bce"),
    "vae-mse": (vae, "mse"),  # an nll constant added to the mean and to the metric
    "vae-gaussian": (vae, "gaussian"),  # a learned logvar: its gradient comes from the forward too
    "vae-dmol": (vae, "dmol"),
    "hvae-bce": (hvae, "bce"),
    "autoencoder-mse": (autoencoder, "mse"),
    "autoencoder-dmol": (autoencoder, "dmol"),
}


@pytest.fixture
def scalings(monkeypatch):
    """Every scaling of a saved gradient in a backward: ``("in place" or "new", weights)``."""
    calls = []

    def spy(how, function):
        def launch(src, weight):
            calls.append((how, weight.clone()))
            return function(src, weight)

        return launch

    monkeypatch.setattr(scaling, "scale_rows", spy("new", scaling.scale_rows))
    monkeypatch.setattr(scaling, "scale_rows_", spy("in place", scaling.scale_rows_))
    return calls


def images(likelihood):
    x = torch.rand(BATCH, *SHAPE)
    return x.round() if likelihood == "bce" else x


def step_inputs(model, step=3):
    return model.step_inputs(step).forward  # a KL weight below 1 for the VAEs (warm-up), nothing for the autoencoder


@pytest.mark.parametrize("name", MODELS)
def test_training_step_backward_scales_nothing(name, scalings):
    build, likelihood = MODELS[name]
    torch.manual_seed(0)
    model = build(likelihood, "triton")
    x = images(likelihood)
    out = model(x, **step_inputs(model))
    out.loss.backward()
    assert scalings and all(how == "in place" and torch.equal(w, torch.ones_like(w)) for how, w in scalings)
    # The control: what the models computed before, the per-image loss then the batch mean, scales by 1 / B.
    scalings.clear()
    x_hat = out.x_hat.detach().requires_grad_()
    model.likelihood(x_hat, x).mean().backward()
    (how, weight), = scalings
    assert how == "in place" and torch.equal(weight.expand(BATCH), torch.full((BATCH,), 1 / BATCH))


@pytest.mark.parametrize("name", MODELS)
def test_loss_metrics_and_gradients_match_the_reference_path(name):
    build, likelihood = MODELS[name]
    x = images(likelihood)
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = build(likelihood, backend)
        kwargs = step_inputs(model)
        kwargs.update(model.noise_inputs(BATCH, generator=torch.Generator().manual_seed(1), device=x.device) or {})
        out = model(x, **kwargs)
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters()])
        results.append((out, grads))
    (fused, fused_grads), (reference, reference_grads) = results
    assert_close(fused.loss, reference.loss, rtol=1e-4)
    assert not fused.recon.requires_grad and not reference.recon.requires_grad  # metrics: loss has the gradient
    for metric, value in fused.metrics.items():
        assert_close(value, reference.metrics[metric], rtol=1e-4)
    for got, want in zip(fused_grads, reference_grads):
        assert_close(got, want, rtol=1e-4, atol=1e-5)
