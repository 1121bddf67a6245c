"""The importance-weighted bound (IWAE): VAE.iwae against the bound written the usual way, and
``fastvae train --objective iwae`` end to end."""
import json
import math
import os

import pytest
import torch

from benchmarks.iwae import UsualIWAE
from fastvae.models import IWAEOutput, VAEOutput, mlp_vae
from fastvae.training.rundir import FILES
from tests.test_cli import TINY, metrics, run
from tests.utils import assert_close, no_host_sync

SHAPE = (1, 6, 5)
LATENT = 3


def small_vae(**kw):
    return mlp_vae(SHAPE, latent_dim=LATENT, hidden=(16,), **kw)


def binary_images(batch):
    return torch.rand(batch, *SHAPE).round()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_bound_and_its_gradient_are_those_of_the_usual_code(device, backend):
    """Loss, bound and every weight's gradient equal those of UsualIWAE (mu.expand, randn, Normal.log_prob twice,
    BCE with logits, logsumexp) on the same noise: the IWAE estimator, through the fused ops."""
    if backend == "torch" and device.type != "cpu":
        pytest.skip("the reference path once is enough")
    torch.manual_seed(0)
    model = small_vae(iwae_k=4, backend=backend).to(device)
    usual = UsualIWAE(model, 4)
    x, eps = binary_images(5).to(device), torch.randn(5, 4, LATENT, device=device)
    out = model(x, eps=eps)
    want = usual(x, eps=eps.transpose(0, 1))
    assert isinstance(out, IWAEOutput)
    assert_close(out.loss, want.loss)
    assert_close(out.bound, want.bound, atol=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params)
    expected = torch.autograd.grad(want.loss, params)
    for g, w in zip(got, expected):
        assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()), rtol=1e-4)


def test_the_outputs_fit_together(device):
    model = small_vae(iwae_k=3, backend="triton").to(device)
    x = binary_images(4).to(device)
    out = model(x)
    assert out.loss.shape == () and out.bound.shape == out.elbo.shape == (4,)
    assert out.log_weights.shape == (3, 4) and out.z.shape == (3, 4, LATENT) and out.mu.shape == (4, LATENT)
    assert out.x_hat.shape == (3, 4, *SHAPE)
    assert_close(out.bound, torch.logsumexp(out.log_weights, 0) - math.log(3))
    assert_close(out.loss, -out.bound.mean())
    assert torch.equal(out.elbo, out.log_weights[0])
    assert set(out.metrics) == {"bound", "elbo"} and not out.bound.requires_grad
    # log w = log p(x | z) + log p(z) - log q(z | x), each from torch.distributions.
    from torch.distributions import Bernoulli, Normal

    mu, logvar = out.mu, model.latent.clamp(out.logvar)
    log_q = Normal(mu, torch.exp(0.5 * logvar)).log_prob(out.z).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(out.z).sum(-1)
    log_px = Bernoulli(logits=out.x_hat).log_prob(x.expand(3, *x.shape)).flatten(2).sum(-1)
    assert_close(out.log_weights, log_px + log_p - log_q, atol=1e-4, rtol=1e-5)


def test_k_1_is_a_one_sample_elbo_and_forward_takes_k(device):
    model = small_vae(backend="triton").to(device)
    x, eps = binary_images(4).to(device), torch.randn(4, 1, LATENT, device=device)
    assert isinstance(model(x), VAEOutput)  # no iwae_k: the ELBO
    out = model(x, eps=eps, k=1)
    elbo = model.elbo(x, eps=eps[:, 0])
    assert_close(out.bound, out.elbo)
    # The same sample as the ELBO's: log w = -recon + log p(z) - log q(z | x), the KL estimated from the sample.
    assert_close(out.x_hat[0], elbo.x_hat)
    logvar = model.latent.clamp(elbo.logvar)
    log_ratio = 0.5 * (logvar + eps[:, 0] ** 2 - elbo.z**2).sum(-1)
    assert_close(out.bound, -elbo.recon + log_ratio, atol=1e-4)


def test_kl_weight_scales_the_latent_log_ratio(device):
    model = small_vae(iwae_k=2, backend="triton").to(device)
    x, eps = binary_images(3).to(device), torch.randn(3, 2, LATENT, device=device)
    out = model(x, eps=eps)
    weighted = model(x, eps=eps, kl_weight=torch.tensor(0.25, device=device))
    latent = model.latent.importance_samples(model.encoder(x), 2, eps.transpose(0, 1))
    recon = latent.log_ratio - out.log_weights  # -log p(x | z) per sample
    assert_close(weighted.loss, -(torch.logsumexp(0.25 * latent.log_ratio - recon, 0) - math.log(2)).mean())
    assert_close(weighted.bound, out.bound)  # the logged bound stays the true one


def test_noise_inputs_and_bad_arguments():
    model = small_vae(iwae_k=4)
    noise = model.noise_inputs(6, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert noise["eps"].shape == (6, 4, LATENT)  # batch first: the engine slices it per rank
    x = binary_images(6)
    with pytest.raises(ValueError, match="eps"):
        model(x, eps=torch.randn(6, LATENT))
    with pytest.raises(ValueError, match="k"):
        model(x, k=0)
    with pytest.raises(ValueError, match="iwae_k"):
        small_vae(iwae_k=0)
    with pytest.raises(TypeError, match="iwae_k"):
        small_vae(iwae_k=2.0)


def test_the_evaluation_is_the_vaes(device):
    """eval.json's numbers for an IWAE model: the ELBO with the analytic KL and the k-sample log-likelihood."""
    torch.manual_seed(0)
    iwae = small_vae(iwae_k=5).to(device)
    torch.manual_seed(0)
    vae = small_vae().to(device)
    x = binary_images(4).to(device)
    a = iwae.evaluate(x, generator=torch.Generator(device).manual_seed(1), k=7)
    b = vae.evaluate(x, generator=torch.Generator(device).manual_seed(1), k=7)
    assert a.keys() == b.keys() == {"elbo", "log_likelihood"}
    for key in a:
        assert torch.equal(a[key], b[key])


def test_the_step_makes_no_host_sync_and_decodes_once(device):
    from benchmarks.static.counts import events_of

    model = small_vae(iwae_k=3, backend="triton").to(device)
    x = binary_images(4).to(device)
    with no_host_sync():
        model(x).loss.backward()
    events = events_of(lambda: model(x), execute=True)
    decoder_outputs = 3 * 4 * math.prod(SHAPE) * 4  # bytes of the (K, B, ...) logits
    # The decoder's last layer writes them once, for the K B samples at once; the fused BCE writes their gradient.
    assert [e.name for e in events if e.write_bytes == decoder_outputs and "addmm" in e.name] == ["addmm"]
    assert [e.name for e in events if e.kind == "triton"] == ["_log_ratio_forward_kernel",
                                                              "_reconstruction_loss_forward_kernel"]


# ---- fastvae train --objective iwae ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iwae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "iwae"
    status, stdout, stderr = run("train", *TINY, "--objective", "iwae", "--iwae-k", 3, "--steps", 12,
                                 "--checkpoint-every", 6, "--log-every", 3, "--out", out)
    assert status == 0, stderr
    return out, stdout


def test_train_logs_the_bound_beside_the_first_samples_elbo(iwae_run):
    out, stdout = iwae_run
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert {"loss", "bound", "elbo", "kl_weight"} <= r.keys() and "recon" not in r
        assert math.isfinite(r["bound"]) and math.isclose(r["loss"], -r["bound"], rel_tol=1e-5, abs_tol=1e-4)
    with open(os.path.join(out, FILES["eval"])) as f:
        evaluation = json.load(f)
    assert {"elbo", "log_likelihood"} <= evaluation.keys() and evaluation["k"] == 4
    assert "held-out log-likelihood (importance-sampled, k=4)" in stdout
    config = torch.load(os.path.join(out, FILES["checkpoint"]), weights_only=True)["config"]
    assert config["objective"] == "iwae" and config["iwae_k"] == 3


def test_resume_keeps_k_and_refuses_another(iwae_run, tmp_path):
    out, _ = iwae_run
    status, _, stderr = run("train", "--out", out, "--resume", "--iwae-k", 5, "--steps", 15)
    assert status == 2 and "iwae_k=3" in stderr and len(stderr.strip().splitlines()) == 1
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    status, _, stderr = run("train", "--out", copy, "--resume", "--steps", 15)
    assert status == 0, stderr
    assert torch.load(os.path.join(copy, FILES["checkpoint"]), weights_only=True)["config"]["iwae_k"] == 3
    assert [r["step"] for r in metrics(copy)][-1] == 15 and "bound" in metrics(copy)[-1]


@pytest.mark.parametrize("argv, fragment", [
    (["--iwae-k", "3"], "--iwae-k does not apply to --objective vae"),
    (["--objective", "ae", "--iwae-k", "3"], "--iwae-k does not apply to --objective ae"),
    (["--objective", "iwae", "--iwae-k", "0"], "'0' is not a positive integer"),
    (["--objective", "iwae", "--model", "hvae"], "model 'hvae' trains objective 'vae' only"),
])
def test_bad_iwae_options_are_one_line_errors(tmp_path, argv, fragment):
    out = tmp_path / "run"
    tiny = TINY[:-2] if "ae" in argv else TINY  # an autoencoder takes no --eval-k
    assert TINY[-2] == "--eval-k"
    status, _, stderr = run("train", *tiny, "--steps", 2, "--out", out, *argv)
    assert status == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_conv_iwae_trains(tmp_path):
    out = tmp_path / "conv"
    status, _, stderr = run("train", *TINY, "--objective", "iwae", "--model", "conv", "--iwae-k", 2, "--steps", 3,
                            "--noise", "global", "--out", out)
    assert status == 0, stderr
    assert all(math.isfinite(r["bound"]) for r in metrics(out))


def test_the_latent_counts_that_docs_iwae_quotes():
    """benchmarks/iwae.py's latent part: the fused op is one kernel forward and keeps only its Philox state."""
    from benchmarks.iwae import count_latent

    eager, fused = count_latent(batch=4, latent_dim=3, samples=(2,))
    assert (eager["impl"], fused["impl"]) == ("eager", "fastvae")
    assert fused["forward"]["kernels"] == 1 and fused["forward"]["triton_kernels"] == 1
    assert fused["backward"]["triton_kernels"] == 1 and fused["kept_bytes"] == 16
    assert eager["forward"]["kernels"] > 20 and eager["kept_bytes"] > fused["kept_bytes"]
