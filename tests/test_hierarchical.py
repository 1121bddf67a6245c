"""The hierarchical VAE: its loss, sampling and importance-sampled likelihood through the fused op, its training
on the fused and the reference paths, and ``fastvae train --model hvae`` end to end (small)."""
import copy
import json
import math
import os

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import fastvae.nn
from fastvae.training.config import TrainConfig
from fastvae.models import HierarchicalVAE
from fastvae.models.hierarchical import resolutions
from fastvae.training.rundir import FILES
from tests.test_cli import assert_one_line_error, metrics, run, train_interrupted_and_resumed, weights
from tests.utils import assert_close, assert_float32_sum_of_float64

SHAPE = (1, 8, 8)
SMALL = dict(layers_per_resolution=(1, 2), latent_channels=2, width=8)


def small_model(**kw) -> HierarchicalVAE:
    torch.manual_seed(0)
    return HierarchicalVAE(SHAPE, **{**SMALL, **kw})


class OpCalls:
    """Counts the calls of the fused op made by the stochastic layers."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = fastvae.nn.reparameterize_kl

        def counted(*args, **kwargs):
            self.calls.append(kwargs.get("event_dims"))
            return original(*args, **kwargs)

        monkeypatch.setattr(fastvae.nn, "reparameterize_kl", counted)


def test_resolutions_of_the_hierarchy():
    assert resolutions(28, 28) == [(14, 14), (7, 7)]
    assert resolutions(8, 8) == [(8, 8), (4, 4)]
    assert resolutions(64, 64) == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert resolutions(6, 10) == [(6, 10)]


def test_forward_gives_the_loss_and_the_kl_of_every_layer_through_the_fused_op(monkeypatch):
    model = small_model()
    calls = OpCalls(monkeypatch)
    x = torch.rand(5, *SHAPE)
    out = model(x, kl_weight=0.5)
    assert calls.calls == [2, 2, 2]  # one fused call per stochastic layer, KL per image and channel
    assert len(out.kl_layers) == 3 and all(kl.shape == (5,) for kl in out.kl_layers)
    assert_close(out.kl, sum(out.kl_layers))
    assert_close(out.loss, (out.recon + 0.5 * out.kl).mean())
    assert out.x_hat.shape == x.shape and out.recon.shape == (5,)
    assert list(out.metrics) == ["recon", "kl", "kl_0", "kl_1", "kl_2", "active_channels"]
    assert out.active_channels.shape == () and 0 <= out.active_channels <= 3 * 2
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_free_bits_change_the_loss_not_the_reported_kl():
    x = torch.rand(4, *SHAPE)
    eps = small_model().noise_inputs(4, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    plain, floored = small_model()(x, **eps), small_model(free_bits=50.0)(x, **eps)
    assert_close(floored.kl, plain.kl)
    assert_close(floored.loss, floored.recon.mean() + 50.0 * 3 * 2)


def test_layer_noise_is_the_given_eps(monkeypatch):
    model = small_model()
    eps = torch.randn(3, sum(math.prod(s) for s in model.latent_shapes))
    a, b = model(torch.rand(3, *SHAPE), eps=eps), model(torch.rand(3, *SHAPE), eps=eps)
    assert not torch.equal(a.recon, b.recon)
    x = torch.rand(3, *SHAPE)
    assert torch.equal(model(x, eps=eps).loss, model(x, eps=eps).loss)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
def test_sample_draws_every_layer_from_its_prior_through_the_fused_op(monkeypatch, temperature):
    model = small_model().eval()
    calls = OpCalls(monkeypatch)
    images = model.sample(6, temperature=temperature, generator=torch.Generator().manual_seed(1))
    assert images.shape == (6, *SHAPE) and ((images >= 0) & (images <= 1)).all()
    assert calls.calls == [3, 3, 3]
    other = model.sample(6, temperature=temperature, generator=torch.Generator().manual_seed(2))
    assert torch.equal(images, other) == (temperature == 0.0)  # temperature 0: every layer at its prior's mean
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=-1.0)


def test_log_likelihood_is_an_importance_sampled_bound_through_every_layer():
    """E[log w] with one sample is the ELBO; k samples tighten it (on average); the estimate is finite."""
    model = small_model().eval()
    x = torch.rand(3, *SHAPE)
    generator = torch.Generator().manual_seed(0)
    # 200 independent draws per image, as one batch of 200 copies (each row draws its own noise).
    copies = x.repeat(200, 1, 1, 1)
    one_sample = model.log_likelihood(copies, 1, generator=generator).view(200, len(x))
    elbos = model.evaluate(copies, generator=generator, k=1)["elbo"].view(200, len(x))
    # The analytic KL has less variance, the same mean: their means agree within a few standard errors.
    error = one_sample.std(0) / math.sqrt(200)
    assert ((one_sample.mean(0) - elbos.mean(0)).abs() < 5 * error + 1e-3).all()
    tight = model.log_likelihood(x, 64, chunk_size=5, generator=generator)
    assert torch.isfinite(tight).all() and (tight > one_sample.mean(0)).all()


def layer_densities(params: torch.Tensor, channels: int, limit: float | None) -> Normal:
    """The diagonal Gaussian whose mean and log-variance are the first two groups of ``channels`` channels."""
    mu, logvar = params[:, :channels], params[:, channels : 2 * channels]
    if limit is not None:
        logvar = limit * torch.tanh(logvar / limit)  # the soft clamp, written out
    return Normal(mu, torch.exp(0.5 * logvar))


def float64_log_weights(model: HierarchicalVAE, x: torch.Tensor, noise: list[torch.Tensor]):
    """One importance sample's terms per image, in float64 from the model's networks and torch.distributions, with
    the top-down pass written out: ``log p(x | z)``, ``sum_l log p(z_l | z_<l) - log q(z_l | x, z_<l)`` and the
    analytic ``sum_l KL(q_l || p_l)``; ``noise[l]`` ``(B, C, h, w)`` is layer ``l``'s standard normal draw."""
    model = copy.deepcopy(model).double()
    x, noise = x.double(), [e.double() for e in noise]
    features = model.encode(x)
    state = model.start.expand(len(x), *model.start.shape)
    log_ratio, kl, index = 0.0, 0.0, 0
    for resolution, (count, plain) in enumerate(zip(model.counts, model.plain_blocks)):
        if resolution > 0:
            state = torch.nn.functional.interpolate(state, scale_factor=2, mode="nearest")
        for _ in range(count):
            layer = model.layers[index]
            channels, limit = layer.latent_channels, layer.latent.logvar_limit
            prior_params = layer.prior(state)
            prior = layer_densities(prior_params, channels, limit)  # the conditional prior p(z_l | z_<l)
            posterior = layer_densities(layer.posterior(state, features[resolution]), channels, limit)
            z = posterior.mean + posterior.stddev * noise[index]
            log_ratio = log_ratio + (prior.log_prob(z) - posterior.log_prob(z)).sum(dim=(1, 2, 3))
            kl = kl + kl_divergence(posterior, prior).sum(dim=(1, 2, 3))
            state = layer.update(state, prior_params, z)
            index += 1
        state = plain(state)
    logits = model.out(torch.nn.functional.gelu(state))
    log_p_x = Bernoulli(logits=logits).log_prob(x).sum(dim=(1, 2, 3))
    return log_p_x, log_ratio, kl


def model_with_learned_priors() -> HierarchicalVAE:
    """The small model with every prior moved off N(0, I): the prior nets start at zero, where a layer weighed
    against N(0, I) instead of its conditional prior gives the same numbers."""
    model = small_model().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.layers:
            last = layer.prior_net.convs[-1]
            last.weight.copy_(0.2 * torch.randn(last.weight.shape, generator=generator))
            last.bias.copy_(0.5 * torch.randn(last.bias.shape, generator=generator))
    return model


def test_log_likelihood_against_a_float64_computation_with_the_conditional_priors():
    """The estimate with k samples (chunked so that a chunk is short) is log mean_j w_j from a float64 top-down pass
    of its own, each layer's sample weighed against its conditional prior; with k = 1 on the noise forward was
    given, its parts are forward's: the same log p(x | z) as recon, and the sampled KL of the analytic one."""
    model = model_with_learned_priors()
    x = torch.rand(3, *SHAPE).round()  # binary images, for Bernoulli's log_prob
    terms = math.prod(SHAPE) + sum(math.prod(shape) for shape in model.latent_shapes)
    for k, chunk_size in ((1, 1), (5, 2)):
        generator = torch.Generator().manual_seed(11)
        estimate = model.log_likelihood(x, k, chunk_size=chunk_size, generator=generator)
        # The noise as log_likelihood documents it: chunk by chunk, each layer's (c * B, C, h, w), sample-major.
        generator.manual_seed(11)
        samples = [[] for _ in range(k)]
        for start in range(0, k, chunk_size):
            c = min(chunk_size, k - start)
            for shape in model.latent_shapes:
                drawn = torch.randn((c * len(x), *shape), generator=generator).unflatten(0, (c, len(x)))
                for j in range(c):
                    samples[start + j].append(drawn[j])
        log_w = []
        for noise in samples:
            log_p_x, log_ratio, kl = float64_log_weights(model, x, noise)
            log_w.append(log_p_x + log_ratio)
        want = torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k)
        assert_float32_sum_of_float64(estimate, want, terms, scale=10.0)
        if k == 1:
            eps = torch.cat([e.flatten(1) for e in samples[0]], dim=1)
            out = model(x, eps=eps, kl_weight=1.0)
            assert_float32_sum_of_float64(-out.recon, log_p_x, terms, scale=10.0)
            assert_float32_sum_of_float64(out.kl, kl, terms, scale=10.0)
            # The ELBO and the one-sample estimate on that noise differ by the sampled KL less the analytic one.
            assert_float32_sum_of_float64(estimate - (-(out.recon + out.kl)), log_ratio + kl, terms, scale=10.0)


def test_reconstruct_and_interpolate_decode_the_posterior_means():
    model = small_model().eval()
    a, b = torch.rand(2, *SHAPE), torch.rand(2, *SHAPE)
    recon = model.reconstruct(a)
    assert recon.shape == a.shape and torch.equal(recon, model.reconstruct(a))
    line = model.interpolate(a, b, points=5)
    assert line.shape == (2, 5, *SHAPE)
    assert_close(line[:, 0], recon)
    assert_close(line[:, -1], model.reconstruct(b))


def test_bad_arguments():
    for layers, fragment in (((1, 1, 1), "2 resolutions"), ((0, 0), "at least one layer"), ((-1, 2), "non-negative")):
        with pytest.raises(ValueError, match=fragment):
            HierarchicalVAE(SHAPE, layers_per_resolution=layers)
    with pytest.raises(ValueError, match="latent_channels"):
        HierarchicalVAE(SHAPE, latent_channels=0)


def test_a_few_steps_on_the_fused_path_follow_the_reference_path():
    """The same model, data and noise through the Triton kernels (the interpreter, here) and the reference path."""
    trajectories = {}
    for backend in ("triton", "torch"):
        model = small_model(backend=backend, logvar_limit=5.0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(4):
            x = torch.rand(6, *SHAPE, generator=generator)
            out = model(x, **model.noise_inputs(6, generator=generator, device=torch.device("cpu")))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(torch.stack([out.loss, *(kl.mean() for kl in out.kl_layers)]).detach())
        trajectories[backend] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()])
    (fused_losses, fused_params), (ref_losses, ref_params) = trajectories["triton"], trajectories["torch"]
    assert_close(fused_losses, ref_losses, rtol=1e-4, atol=1e-4)
    for p, q in zip(fused_params, ref_params):
        assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---- fastvae train --model hvae ----------------------------------------------------------------------

HVAE = ["--model", "hvae", "--data", "digits", "--num-images", "200", "--batch-size", "16", "--eval-k", "3",
        "--hidden", "8", "--latent-channels", "2", "--layers-per-resolution", "1", "1"]


@pytest.fixture(scope="module")
def hvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "hvae"
    status, stdout, stderr = run("train", *HVAE, "--steps", 12, "--log-every", 5, "--free-bits", "0.1",
                                 "--grad-clip", "5", "--out", out)
    assert status == 0, stderr
    return out, stdout


def test_train_hvae_writes_the_run_folder_with_the_kl_of_each_layer(hvae_run):
    out, stdout = hvae_run
    assert set(FILES.values()) | {"kl_layers.png"} <= set(os.listdir(out))
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert {"loss", "recon", "kl", "kl_0", "kl_1", "active_channels", "grad_norm", "kl_weight"} <= r.keys()
        assert math.isclose(r["kl"], r["kl_0"] + r["kl_1"], rel_tol=1e-4)
        assert 0 <= r["active_channels"] <= 4 and r["grad_norm"] > 0
    results = json.load(open(out / FILES["eval"]))
    assert math.isfinite(results["elbo"]) and math.isfinite(results["log_likelihood"])
    assert "held-out log-likelihood" in stdout


def test_the_default_k_of_the_evaluation_is_the_models():
    assert TrainConfig().eval_k == 1000 and TrainConfig(model="conv").eval_k == 1000
    assert TrainConfig(model="hvae").eval_k == 100 and TrainConfig(model="hvae", eval_k=7).eval_k == 7


def test_gradient_clipping_caps_the_update_and_never_skips_one(tmp_path):
    """With a tiny limit every step still moves the weights, and the logged norm is the one before clipping."""
    status, _, stderr = run("train", *HVAE, "--steps", 3, "--grad-clip", "1e-6", "--out", tmp_path / "r", "--quiet")
    assert status == 0, stderr
    assert all(r["grad_norm"] > 1e-3 for r in metrics(tmp_path / "r"))
    status, _, _ = run("train", *HVAE, "--steps", 3, "--grad-clip", "0", "--out", tmp_path / "off", "--quiet")
    assert status == 0 and "grad_norm" not in metrics(tmp_path / "off")[0]
    first = weights(tmp_path / "r")
    status, _, _ = run("train", "--out", tmp_path / "r", "--resume", "--steps", 4, "--quiet")
    assert status == 0
    moved = weights(tmp_path / "r")
    assert any(not torch.equal(first[name], moved[name]) for name in first)


def test_eval_and_sample_at_a_temperature_read_the_checkpoint(hvae_run, tmp_path):
    out, _ = hvae_run
    status, stdout, stderr = run("eval", out, "--k", 3)
    assert status == 0, stderr
    assert "hvae HierarchicalVAE" in stdout and "k=3" in stdout
    status, stdout, stderr = run("eval", out)  # the hvae's own default k
    assert status == 0, stderr
    assert "k=100)" in stdout
    status, stdout, stderr = run("sample", out, "--n", 9, "--temperature", 0.6)
    assert status == 0, stderr
    assert (out / "samples-9-seed0-t0.6.png").exists()
    status, _, stderr = run("sample", out, "--temperature", "-1")
    assert status == 2 and "--temperature" in stderr


def test_resuming_an_hvae_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    common = [*HVAE, "--steps", 10, "--checkpoint-every", 4, "--kl-warmup", 5, "--quiet"]
    straight, resumed = train_interrupted_and_resumed(monkeypatch, common, tmp_path, stop_at=6)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    status, _, stderr = run("train", "--out", tmp_path / "resumed", "--resume", "--free-bits", "1", "--steps", 12)
    assert_one_line_error(status, stderr, "free_bits")


def test_compiled_hvae_training_follows_the_eager_run(tmp_path):
    import torch._dynamo

    common = [*HVAE, "--num-images", 100, "--steps", 4, "--kl-warmup", 3, "--noise", "global", "--quiet"]
    assert run("train", *common, "--out", tmp_path / "eager")[0] == 0
    torch._dynamo.reset()
    status, _, stderr = run("train", *common, "--compile", "--out", tmp_path / "compiled")
    assert status == 0, stderr
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_train_the_hvae_as_one_with_the_same_global_batch(tmp_path):
    from tests.test_distributed import load, train

    args = ["--model", "hvae", "--hidden", "8", "--latent-channels", "2", "--layers-per-resolution", "1", "1",
            "--steps", "4", "--noise", "global", "--log-every", "2"]
    one, two = train(tmp_path / "one", *args, nproc=1), train(tmp_path / "two", *args, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    (single, single_metrics), (double, double_metrics) = load(tmp_path / "one"), load(tmp_path / "two")
    for name, value in single["model"].items():
        torch.testing.assert_close(double["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(single_metrics, double_metrics):
        for key in ("loss", "kl_0", "kl_1", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-4), key


def test_bf16_hvae_training(tmp_path):
    status, _, stderr = run("train", *HVAE, "--steps", 3, "--precision", "bf16", "--out", tmp_path / "r", "--quiet")
    assert status == 0, stderr
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "r"))


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--free-bits", "1"], ["--free-bits applies to model 'hvae' only"]),
        (["--latent-channels", "4"], ["--latent-channels applies to model 'hvae' only"]),
        (["--model", "hvae", "--data", "digits", "--layers-per-resolution", "1", "1", "1"], ["2 resolutions"]),
        (["--model", "hvae", "--data", "digits", "--layers-per-resolution", "0"], ["at least one layer"]),
        (["--model", "hvae", "--data", "digits", "--hidden", "8", "8"], ["one hidden size"]),
        (["--model", "hvae", "--free-bits", "-1"], ["--free-bits", "not a non-negative number"]),
        (["--grad-clip", "nan"], ["--grad-clip"]),
        (["--model", "hvae", "--objective", "ae"], ["model 'hvae' trains objective 'vae' only"]),
    ],
)
def test_bad_hvae_options_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run("train", *argv)
    assert_one_line_error(status, stderr, *fragments)
    assert os.listdir(tmp_path) == []


def test_a_target_is_what_the_output_is_scored_against():
    """Denoising: the encoder sees ``x``, the likelihood scores ``target``; evaluation follows."""
    model = small_model().eval()
    x, target = torch.rand(3, *SHAPE), torch.rand(3, *SHAPE)
    eps = model.noise_inputs(3, generator=torch.Generator().manual_seed(0), device=x.device)["eps"]
    out = model(x, target=target, eps=eps)
    x_hat = model(x, eps=eps).x_hat
    assert_close(out.recon, model.likelihood(x_hat, target))
    assert not torch.allclose(out.recon, model.likelihood(x_hat, x))
    scored = model.evaluate(x, generator=torch.Generator().manual_seed(1), target=target, k=2)
    clean = model.evaluate(x, generator=torch.Generator().manual_seed(1), k=2)
    assert not torch.allclose(scored["elbo"], clean["elbo"])


def test_codes_are_every_layers_posterior_mean_flattened_top_first():
    model = small_model().eval()
    x = torch.rand(2, *SHAPE)
    means = model.posterior_means(x)
    codes = model.codes(x)
    assert codes.shape == (2, sum(m[0].numel() for m in means))
    assert_close(codes, torch.cat([m.flatten(1) for m in means], dim=1))
