"""The vector quantizer layer (EMA, gradient codebook, dead-code restarts, perplexity), the VQ-VAE model, and
``fastvae train --model vqvae`` end to end (small): eval.json, figures, encode, sample, resume, errors."""
import json
import math
import os

import pytest
import torch

from fastvae.models import VQVAE
from fastvae.nn import VectorQuantizer
from fastvae.training.rundir import FILES
from tests.test_cli import assert_one_line_error, metrics, run, train_interrupted_and_resumed
from tests.test_no_host_sync import no_sync
from tests.test_vector_quantize import separated
from tests.utils import assert_close

# ---- the layer ---------------------------------------------------------------------------------------------------


def test_ema_update_follows_the_formula():
    """One training forward: cluster sizes and sums move by 1 - decay, the codes become smoothed averages."""
    layer = VectorQuantizer(6, 3, ema_decay=0.9, epsilon=1e-3, dead_code_threshold=0, backend="torch")
    codebook, size, sums = layer.codebook.clone().double(), layer.cluster_size.clone().double(), layer.ema_sum.double()
    z = torch.randn(40, 3)
    out = layer(z)
    indices = out.indices
    counts = torch.bincount(indices, minlength=6).double()
    batch_sums = torch.zeros(6, 3, dtype=torch.float64).index_add_(0, indices, z.double())
    size = 0.9 * size + 0.1 * counts
    sums = 0.9 * sums + 0.1 * batch_sums
    n = size.sum()
    expected = sums / ((size + 1e-3) / (n + 6e-3) * n)[:, None]
    assert_close(layer.cluster_size.double(), size, torch.float32)
    assert_close(layer.codebook.double(), expected, torch.float32)
    assert torch.equal(out.indices, torch.cdist(z, codebook.float()).argmin(dim=1))
    assert not layer.codebook.requires_grad and "codebook" in dict(layer.named_buffers())


def test_gradient_codebook_is_a_parameter_that_the_loss_trains():
    layer = VectorQuantizer(5, 4, ema_decay=None, dead_code_threshold=0, backend="torch")
    assert isinstance(layer.codebook, torch.nn.Parameter) and not hasattr(layer, "ema_sum")
    before = layer.codebook.detach().clone()
    z = torch.randn(30, 4, requires_grad=True)
    out = layer(z)
    out.loss.backward()
    # The codebook term's gradient: 2 (e - z) averaged over the vectors, into the chosen codes.
    expected = torch.zeros(5, 4).index_add_(0, out.indices, 2 * (before[out.indices] - z.detach()) / 30)
    assert_close(layer.codebook.grad, expected)
    assert_close(z.grad, 2 * 0.25 * (z.detach() - before[out.indices]) / 30)
    assert torch.equal(layer.codebook.detach(), before)  # only the optimizer moves it


@pytest.mark.parametrize("ema_decay", [0.99, None])
def test_dead_codes_restart_on_vectors_of_the_batch(ema_decay):
    layer = VectorQuantizer(8, 2, ema_decay=ema_decay, dead_code_threshold=1.0, backend="torch")
    layer.cluster_size.copy_(torch.tensor([5.0, 0.5, 5.0, 0.0, 5.0, 5.0, 0.99, 5.0]))
    alive = layer.codebook.detach()[[0, 2, 4, 5, 7]].clone()
    z = 100 + torch.randn(12, 2)  # far from every code: only restarted codes can land on them
    with torch.no_grad():
        layer._restart_dead_codes(z)
    codes = layer.codebook.detach()
    assert torch.equal(codes[[0, 2, 4, 5, 7]], alive)
    for k in (1, 3, 6):
        assert (codes[k] == z).all(dim=1).any(), k  # moved onto one of the batch's vectors
        assert layer.cluster_size[k] == 1.0
        if ema_decay is not None:
            assert_close(layer.ema_sum[k] / layer.cluster_size[k], codes[k])
    # In a forward the restarted codes are the nearest: every vector picks one of them.
    out = layer(z)
    assert set(out.indices.tolist()) <= {1, 3, 6}


def test_eval_mode_and_nearest_leave_the_codebook_alone():
    layer = VectorQuantizer(8, 3, backend="torch")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    z = torch.randn(20, 3)
    layer.nearest(z)
    layer.eval()
    layer(z)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    layer.train()
    layer(z)
    assert not torch.equal(state["codebook"], layer.codebook)


def test_perplexity_and_codes_used():
    layer = VectorQuantizer(4, 1, backend="torch").eval()
    layer.codebook.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    out = layer(torch.tensor([[0.1], [0.2], [9.9], [10.1]]))  # two codes, used equally
    assert_close(out.perplexity, torch.tensor(2.0)) and out.codes_used == 2
    assert torch.equal(out.counts, torch.tensor([2.0, 2.0, 0.0, 0.0]))
    out = layer(torch.tensor([[0.1], [10.0], [20.0], [29.0]]))
    assert_close(out.perplexity, torch.tensor(4.0))
    empty = layer(torch.zeros(0, 1))
    assert empty.perplexity == 1 and empty.codes_used == 0


def test_feature_maps_along_the_channel_dim():
    layer = VectorQuantizer(10, 4, channel_dim=1, backend="torch")
    h = torch.randn(3, 6, 5, 5, requires_grad=True)
    out = layer.eval()(h[:, 1:5])
    assert out.z_q.shape == (3, 4, 5, 5) and out.indices.shape == (3, 5, 5)
    assert torch.equal(layer.lookup(out.indices), out.z_q.detach())
    out = layer.train()(h[:, 1:5])  # the EMA updates the codebook after choosing: the gradient is the choice's
    out.loss.backward()
    assert h.grad[:, 1:5].abs().sum() > 0 and torch.equal(h.grad[:, [0, 5]], torch.zeros(3, 2, 5, 5))


@pytest.mark.parametrize("ema_decay", [0.99, None])
def test_training_step_on_the_kernels_makes_no_host_sync(device, ema_decay):
    layer = VectorQuantizer(12, 4, ema_decay=ema_decay, channel_dim=1, backend="triton").to(device)
    z = torch.randn(4, 4, 3, 3, device=device, requires_grad=True)
    with no_sync(device):
        out = layer(z)
        (out.loss + out.z_q.square().mean() + out.perplexity).backward()


def test_compiled_training_step_follows_the_eager_one(device, monkeypatch):
    """torch.compile(fullgraph=True) of the layer in training mode, restarts and EMA buffers included (the
    restarts' random vectors drawn as eager draws them: Inductor's own random numbers differ)."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    z, _, _ = separated(24, 10, 3, device)  # clear nearest codes: both runs choose alike
    eager, compiled_layer = (VectorQuantizer(16, 3, backend="triton").to(device) for _ in range(2))
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for step in range(2):
        torch.manual_seed(step)
        a = eager(z)
        torch.manual_seed(step)
        b = compiled(z)
        assert torch.equal(a.indices, b.indices)
        assert_close(b.loss, a.loss)
    for name, value in eager.state_dict().items():
        assert_close(compiled_layer.state_dict()[name], value)


def test_bad_layer_arguments():
    for kwargs, match in [
        (dict(num_codes=0, dim=3), "num_codes"),
        (dict(num_codes=4, dim=0), "dim"),
        (dict(num_codes=4, dim=3, ema_decay=1.0), "ema_decay"),
        (dict(num_codes=4, dim=3, beta=-1), "beta"),
        (dict(num_codes=4, dim=3, dead_code_threshold=-1), "dead_code_threshold"),
        (dict(num_codes=4, dim=3, epsilon=0), "epsilon"),
    ]:
        with pytest.raises(ValueError, match=match):
            VectorQuantizer(**kwargs)
    with pytest.raises(TypeError, match="channel_dim"):
        VectorQuantizer(4, 3, channel_dim=1.0)
    with pytest.raises(ValueError, match="D = 3"):
        VectorQuantizer(4, 3)(torch.randn(5, 2))


# ---- the model ---------------------------------------------------------------------------------------------------

SHAPE = (1, 8, 8)


def small_model(**kw) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(SHAPE, **{**dict(num_codes=16, code_dim=4, widths=(8,), backend="torch"), **kw})


def test_forward_loss_is_the_reconstruction_plus_the_vq_terms_of_every_position():
    model = small_model()
    x = torch.rand(5, *SHAPE)
    out = model(x)
    assert model.map_size == (4, 4) and out.indices.shape == (5, 4, 4)
    assert list(out.metrics) == ["recon", "vq_loss", "perplexity", "codes_used"]
    q_loss = out.vq_loss / 16
    assert_close(out.loss, out.recon.mean() + 16 * q_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_evaluation_elbos_state_their_priors_and_the_prior_is_fitted_after_training():
    model = small_model().eval()
    x = torch.rand(6, *SHAPE)
    results = model.evaluate(x)
    assert_close(results["elbo_uniform_prior"], -(results["recon"] + 16 * math.log(16)))
    # Before any fit the prior is uniform: both ELBOs agree.
    assert_close(results["elbo_fitted_prior"], results["elbo_uniform_prior"])
    counts = results["code_counts"]
    assert counts.shape == (6, 16) and torch.equal(counts.sum(1), torch.full((6,), 16.0))
    model.after_training([x[:4], x[4:]])
    assert model.prior_counts.sum() == 6 * 16 and model.prior_fitted()
    fitted = model.evaluate(x)["elbo_fitted_prior"]
    assert (fitted > results["elbo_uniform_prior"]).all()  # the images it was fitted on are likelier than uniform
    summary = model.summarize_totals({"code_counts": results["code_counts"].sum(0).double()})
    assert 1 <= summary["perplexity"] <= summary["codes_used"] <= 16


def test_samples_come_from_the_fitted_prior_and_the_note_says_what_they_lack():
    model = small_model().eval()
    assert "none yet" in model.sample_note()
    x = torch.rand(4, *SHAPE)
    model.after_training([x])
    assert "learned prior" in model.sample_note() and "PixelCNN" in model.sample_note()
    samples = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, *SHAPE)
    # Temperature 0: every position's likeliest code, the same image each time.
    modes = model.sample(2, temperature=0)
    assert torch.equal(modes[0], modes[1])


def test_codes_reconstruct_and_interpolate():
    model = small_model().eval()
    x = torch.rand(3, *SHAPE)
    codes = model.codes(x)
    assert codes.dtype == torch.int64 and codes.shape == (3, 4, 4)
    assert_close(model.reconstruct(x), model.likelihood.reconstruction(model.decode_codes(codes)))
    path = model.interpolate(x[:2], x[1:], 5)
    assert path.shape == (2, 5, *SHAPE)
    assert_close(path[:, 0], model.reconstruct(x[:2]))
    assert_close(path[:, -1], model.reconstruct(x[1:]))


def test_a_few_steps_on_the_kernels_follow_the_reference_path():
    trajectories = {}
    for backend in ("triton", "torch"):
        model = small_model(backend=backend, dead_code_threshold=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(3):
            out = model(torch.rand(6, *SHAPE, generator=generator))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.detach())
        trajectories[backend] = torch.stack(losses), model.state_dict()
    (fused, fused_state), (reference, reference_state) = trajectories["triton"], trajectories["torch"]
    assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    for name, value in reference_state.items():
        assert_close(fused_state[name], value, rtol=1e-4, atol=1e-5)


# ---- fastvae train --model vqvae --------------------------------------------------------------------------------

VQ = ["--model", "vqvae", "--data", "digits", "--num-images", "200", "--batch-size", "16", "--num-codes", "32",
      "--code-dim", "4", "--hidden", "8"]


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vq"
    status, stdout, stderr = run("train", *VQ, "--steps", 8, "--log-every", 4, "--out", out)
    assert status == 0, stderr
    return out, stdout


def test_train_vqvae_writes_its_metrics_evaluation_and_figures(vq_run):
    out, stdout = vq_run
    assert set(FILES.values()) | {"codebook.png"} <= set(os.listdir(out))
    for r in metrics(out):
        assert {"loss", "recon", "vq_loss", "perplexity", "codes_used"} <= r.keys()
        assert 1 <= r["perplexity"] <= r["codes_used"] <= 32
    results = json.load(open(out / FILES["eval"]))
    assert {"recon", "elbo_uniform_prior", "elbo_fitted_prior", "perplexity", "codes_used"} <= results.keys()
    assert "k" not in results
    assert math.isclose(results["elbo_uniform_prior"], -(results["recon"] + 16 * math.log(32)), rel_tol=1e-6)
    assert "uniform prior over the 32 codes" in stdout and "perplexity" in stdout


def test_encode_writes_integer_code_maps_and_sample_explains_its_prior(vq_run, tmp_path):
    import numpy as np

    out, _ = vq_run
    status, stdout, stderr = run("encode", out, "--split", "test", "--out", tmp_path / "codes.npz")
    assert status == 0, stderr
    codes = np.load(tmp_path / "codes.npz")["codes"]
    assert codes.dtype == np.int64 and codes.shape[1:] == (4, 4) and 0 <= codes.min() <= codes.max() < 32
    status, stdout, stderr = run("sample", out, "--n", 4)
    assert status == 0, stderr
    note = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "learned prior" in note[0]


def test_resuming_keeps_the_codebook_and_its_ema_state(tmp_path, monkeypatch):
    common = [*VQ, "--steps", 8, "--checkpoint-every", 3, "--quiet"]
    straight, resumed = train_interrupted_and_resumed(monkeypatch, common, tmp_path, stop_at=5)
    assert {"quantizer.codebook", "quantizer.ema_sum", "quantizer.cluster_size", "prior_counts"} <= straight.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--num-codes", "16"], ["--num-codes applies to model 'vqvae' only, not 'mlp'"]),
        (["--model", "conv", "--code-dim", "8"], ["--code-dim applies to model 'vqvae' only"]),
        (["--model", "vqvae", "--beta", "0.5"], ["--beta does not apply to --model vqvae"]),
        (["--model", "vqvae", "--latent-dim", "8"], ["--latent-dim does not apply to --model vqvae", "--code-dim"]),
        (["--model", "vqvae", "--eval-k", "10"], ["--eval-k does not apply to --model vqvae"]),
        (["--model", "vqvae", "--logvar-limit", "3"], ["--logvar-limit does not apply to --model vqvae"]),
        (["--model", "vqvae", "--noise", "global"], ["--noise global does not apply to --model vqvae"]),
        (["--model", "vqvae", "--objective", "ae"], ["model 'vqvae' trains its own loss"]),
        (["--model", "vqvae", "--num-codes", "0"], ["--num-codes", "not a positive integer"]),
        (["--model", "vqvae", "--data", "digits", "--hidden", "8", "8", "8", "8"], ["divisible"]),
    ],
)
def test_bad_vqvae_options_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run("train", *argv)
    assert_one_line_error(status, stderr, *fragments)
    assert os.listdir(tmp_path) == []


def test_eval_of_a_vqvae_takes_no_k(vq_run):
    out, _ = vq_run
    status, _, stderr = run("eval", out, "--k", 5)
    assert_one_line_error(status, stderr, "--k does not apply to --model vqvae")
    status, stdout, stderr = run("eval", out)
    assert status == 0, stderr
    assert "vqvae VQVAE" in stdout and "perplexity" in stdout


def test_two_processes_train_a_vqvae(tmp_path):
    """torchrun with two Gloo processes: the EMA's counts and sums are summed over the ranks and the restarted
    codes broadcast from rank 0 (collectives inside the forward, in the same order on each rank): the run ends."""
    from tests.test_distributed import train

    args = ["--model", "vqvae", "--num-codes", "32", "--code-dim", "4", "--hidden", "8", "--steps", "4"]
    base = ["--data", "digits", "--num-images", "200", "--batch-size", "16", "--quiet", "--device", "cpu"]
    done = train(tmp_path / "two", *args, nproc=2, base=base)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("codebook on the held-out images") == 1  # printed by rank 0 only
