"""fastvae train --likelihood dmol end to end, at a tiny size: greyscale and RGB images, resume, bad options."""

import json
import math

import numpy as np
import pytest
import torch

from fastvae.training import TrainConfig
from fastvae.training.config import likelihood_options
from fastvae.training.rundir import FILES
from tests.test_cli import assert_one_line_error, metrics, run, snapshot, weights

COMMON = ["--batch-size", "8", "--eval-k", "3", "--quiet"]


def mnist_like(path, n=48, size=28, seed=0):
    """uint8 ``(n, size, size)`` images, mostly black, with white strokes and grey edges, like MNIST's digits."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), dtype=np.uint8)
    for image in images:
        row, col = rng.integers(4, size - 4, 2)
        image[row - 3 : row + 3, col - 1 : col + 1] = 255
        image[row - 3 : row + 3, col + 1] = rng.integers(60, 200)
    np.save(path, images)
    return path


def rgb(path, n=24, size=8, seed=1):
    """uint8 ``(n, size, size, 3)`` colour images."""
    np.save(path, np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def greyscale_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dmol")
    data, out = mnist_like(folder / "digits.npy"), folder / "run"
    status, stdout, stderr = run(
        "train", "--data", data, "--likelihood", "dmol", "--num-mixtures", 3, "--hidden", 16,
        *COMMON, "--steps", 6, "--checkpoint-every", 4, "--out", out,
    )
    assert status == 0, stderr
    return data, out, stdout


def test_greyscale_run_writes_nats_and_bits_per_dim(greyscale_run):
    _, out, stdout = greyscale_run
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r[key]) for r in records for key in ("loss", "recon", "kl"))
    checkpoint = torch.load(out / FILES["checkpoint"], weights_only=True)
    assert (checkpoint["config"]["likelihood"], checkpoint["config"]["num_mixtures"]) == ("dmol", 3)
    assert checkpoint["config"]["num_bits"] == 8  # the likelihood's default, recorded
    assert checkpoint["model"]["decoder.2.weight"].shape == (9 * 28 * 28, 16)  # 3 M parameters per pixel
    results = json.load(open(out / FILES["eval"]))
    values = 28 * 28
    assert results["bits_per_dim"] == pytest.approx(-results["log_likelihood"] / (values * math.log(2)))
    assert results["elbo_bits_per_dim"] == pytest.approx(-results["elbo"] / (values * math.log(2)))
    assert f"{results['bits_per_dim']:.4f} from the log-likelihood" in stdout
    assert "comparable: dmol: probabilities of discrete 8-bit levels" in stdout
    from matplotlib import image

    assert image.imread(out / FILES["samples"]).ndim == 3


def test_eval_and_sample_of_a_dmol_checkpoint(greyscale_run, tmp_path):
    _, out, train_stdout = greyscale_run
    status, stdout, stderr = run("eval", out, "--k", 3)
    assert status == 0, stderr
    assert stdout.splitlines()[1:] == train_stdout.splitlines()[:-1]  # nats, bits/dim, what they compare with
    status, _, stderr = run("sample", out, "--n", 4, "--out", tmp_path / "s.png")
    assert status == 0 and (tmp_path / "s.png").exists(), stderr


def test_resume_keeps_the_likelihood_settings(greyscale_run, tmp_path):
    _, out, _ = greyscale_run
    before = snapshot(out)
    for option, value in [("--num-mixtures", 4), ("--num-bits", 5), ("--likelihood", "mse")]:
        status, _, stderr = run("train", "--out", out, "--resume", "--steps", 8, option, value, "--quiet")
        assert_one_line_error(status, stderr, "a resumed run keeps its settings", option[2:].replace("-", "_"))
    assert snapshot(out) == before
    # The same values, given again, are no conflict; left out, they come from the checkpoint.
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 8, "--num-mixtures", 3, "--num-bits", 8,
                            "--eval-k", 2, "--quiet")
    assert status == 0, stderr
    checkpoint = torch.load(out / FILES["checkpoint"], weights_only=True)
    assert checkpoint["step"] == 8 and checkpoint["config"]["num_mixtures"] == 3
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))


@pytest.mark.parametrize("model", ["conv", "mlp"])
def test_rgb_npy_images_with_either_decoder(tmp_path, model):
    data = rgb(tmp_path / "rgb.npy")
    out = tmp_path / model
    status, _, stderr = run("train", "--data", data, "--model", model, "--likelihood", "dmol", "--num-mixtures", 2,
                            "--num-bits", 5, "--hidden", 8, *COMMON, "--steps", 3, "--out", out)
    assert status == 0, stderr
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    decoder_out = {"conv": "decoder.3.bias", "mlp": "decoder.2.bias"}[model]
    assert weights(out)[decoder_out].numel() == 20 * (1 if model == "conv" else 64)  # 10 M channels per pixel
    results = json.load(open(out / FILES["eval"]))
    assert results["bits_per_dim"] == pytest.approx(-results["log_likelihood"] / (3 * 64 * math.log(2)))


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--num-mixtures", "3"], ["num_mixtures (--num-mixtures) is a setting of likelihood dmol only, not of bce"]),
        (["--likelihood", "mse", "--num-bits", "5"], ["num_bits (--num-bits) is a setting of likelihood dmol only"]),
        (["--likelihood", "dmol", "--num-bits", "17"], ["likelihood dmol: num_bits must be from 1 to 16, got 17"]),
        (["--likelihood", "dmol", "--num-mixtures", "0"], ["--num-mixtures", "'0' is not a positive integer"]),
    ],
)
def test_bad_likelihood_options_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run("train", "--data", "digits", *argv)
    assert_one_line_error(status, stderr, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_resuming_another_likelihood_with_mixture_options_is_refused(tmp_path):
    out = tmp_path / "bce"
    assert run("train", "--data", "digits", "--num-images", 100, *COMMON, "--steps", 2, "--out", out)[0] == 0
    before = snapshot(out)
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 4, "--num-mixtures", 5)
    assert_one_line_error(status, stderr, "a setting of likelihood dmol only, not of bce")
    assert snapshot(out) == before


def test_config_fills_in_the_mixtures_defaults_only_for_it():
    assert (TrainConfig(likelihood="dmol").num_mixtures, TrainConfig(likelihood="dmol").num_bits) == (10, 8)
    assert (TrainConfig().num_mixtures, TrainConfig(likelihood="mse").num_bits) == (None, None)
    assert likelihood_options(TrainConfig(likelihood="dmol", num_bits=5)) == {"num_mixtures": 10, "num_bits": 5}
    assert likelihood_options(TrainConfig(likelihood="l1")) == {}

