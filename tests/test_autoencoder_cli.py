"""The autoencoder, denoising and latent codes through the fastvae command, at a tiny size."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from fastvae.corruption import parse_corruption
from fastvae.data import load_images, to_unit_float
from fastvae.models import Autoencoder
from fastvae.training import builders
from fastvae.training.checkpoint import load_checkpoint, model_from_checkpoint
from fastvae.training.figures import row_label_pixels
from fastvae.training.rundir import FILES, OPTIONAL_FILES
from fastvae.training.seeds import corruption_generator, epoch_order, eval_generator
from tests.test_cli import TINY, assert_one_line_error, metrics, run, snapshot, train_interrupted_and_resumed

AE = ["--data", "digits", "--num-images", "300", "--batch-size", "16", "--objective", "ae"]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """A tiny denoising autoencoder run with a 2-D code, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "ae"
    status, stdout, stderr = run(
        "train", *AE, "--latent-dim", 2, "--denoise", "mask:0.25", "--steps", 40, "--log-every", 7, "--out", out
    )
    assert status == 0, stderr
    return out, stdout, stderr


def test_an_autoencoder_run_writes_its_folder_in_its_own_units(ae_run):
    out, stdout, stderr = ae_run
    assert stderr.startswith("training the mlp Autoencoder on digits") and "corrupted by mask:0.25" in stderr
    assert set(FILES.values()) | set(OPTIONAL_FILES.values()) == set(os.listdir(out))
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all(list(r) == ["step", "epoch", "lr", "loss", "recon", "samples_per_s"] for r in records)
    assert all(r["loss"] == r["recon"] and math.isfinite(r["loss"]) for r in records)
    assert np.mean([r["loss"] for r in records[-10:]]) < 0.8 * np.mean([r["loss"] for r in records[:10]])
    results = json.load(open(out / FILES["eval"]))
    assert list(results) == ["step", "held_out_images", "denoise", "recon", "corrupted_inputs"]
    assert results["denoise"] == "mask:0.25" and list(results["corrupted_inputs"]) == ["recon"]
    assert results["corrupted_inputs"]["recon"] > results["recon"] > 0
    assert stdout.splitlines()[:2] == [
        f"held-out reconstruction error: {results['recon']:.2f} squared error/image (30 images)",
        "held-out reconstruction error from inputs corrupted by mask:0.25 (against the clean images): "
        f"{results['corrupted_inputs']['recon']:.2f} squared error/image (30 images)",
    ]
    from matplotlib import image

    # Rows of 8: 16 held-out digits, their corrupted versions, and the outputs: 6 rows of 8x8 digits shown at 32x32,
    # below a title and beside row labels.
    height, width = image.imread(out / OPTIONAL_FILES["denoising"]).shape[:2]
    assert height > 6 * 34 + 2 and width == 8 * 34 + 2 + row_label_pixels(["corrupted"])
    assert image.imread(out / OPTIONAL_FILES["latent_scatter"]).ndim == 3
    assert image.imread(out / FILES["loss_curve"]).ndim == 3


def test_eval_of_an_autoencoder_repeats_the_runs_numbers_and_takes_another_corruption(ae_run):
    out, train_stdout, _ = ae_run
    status, stdout, stderr = run("eval", out)
    assert status == 0, stderr
    assert "step 40, mlp Autoencoder on digits" in stdout
    assert stdout.splitlines()[1:] == train_stdout.splitlines()[:2]
    status, stdout, _ = run("eval", out, "--denoise", "gaussian:0.4")
    assert status == 0 and "corrupted by gaussian:0.4" in stdout
    assert stdout.splitlines()[1] == train_stdout.splitlines()[0]  # the clean images' error is the same


def test_sample_from_an_autoencoder_says_it_has_no_prior(ae_run, tmp_path):
    out, _, _ = ae_run
    status, stdout, stderr = run("sample", out, "--n", 9, "--out", tmp_path / "s.png")
    assert status == 0, stderr
    assert "wrote 9 samples" in stdout and "note: an autoencoder has no prior" in stdout
    from matplotlib import image

    assert image.imread(tmp_path / "s.png").shape[:2] == (3 * 34 + 2, 3 * 34 + 2)
    # The codes' spread on the training images, stored with the weights at the end of the run.
    model, _ = model_from_checkpoint(*load_checkpoint(str(out)), torch.device("cpu"))
    codes = model.codes(to_unit_float(load_images("digits", num_images=300).train)).double()
    torch.testing.assert_close(model.code_mean, codes.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.code_std, codes.std(0, correction=0).float(), rtol=1e-5, atol=1e-6)
    assert (model.code_std > 0).all() and not torch.equal(model.code_std, torch.ones(2))


def test_encode_writes_codes_with_labels_in_the_datasets_order(ae_run, tmp_path):
    from sklearn.datasets import load_digits

    out, _, _ = ae_run
    status, stdout, stderr = run("encode", out, "--out", tmp_path / "all.npz")
    assert status == 0, stderr
    assert "(300, 2)" in stdout and "all the images of digits" in stdout
    saved = np.load(tmp_path / "all.npz")
    assert sorted(saved) == ["codes", "index", "labels"]
    assert saved["codes"].shape == (300, 2) and saved["codes"].dtype == np.float32
    assert np.array_equal(saved["index"], np.arange(300))
    assert np.array_equal(saved["labels"], load_digits().target[:300])
    model, _ = model_from_checkpoint(*load_checkpoint(str(out)), torch.device("cpu"))
    data = load_images("digits", num_images=300)
    expected = model.codes(to_unit_float(data.subset("all").images))
    torch.testing.assert_close(torch.from_numpy(saved["codes"]), expected)
    status, _, stderr = run("encode", out, "--split", "test", "--out", tmp_path / "test.npz")
    assert status == 0, stderr
    held_out = np.load(tmp_path / "test.npz")
    assert held_out["codes"].shape == (30, 2)
    assert np.array_equal(held_out["labels"], load_digits().target[held_out["index"]])
    torch.testing.assert_close(torch.from_numpy(held_out["codes"]), model.codes(to_unit_float(data.test)))
    # Another dataset of the same image shape: all 1,797 digits, by default into the run folder.
    status, stdout, stderr = run("encode", out, "--data", "digits", "--split", "train")
    assert status == 0, stderr
    assert np.load(out / "latents-digits-train.npz")["codes"].shape == (1617, 2)


def test_encode_of_a_vae_on_shapes_writes_posterior_means_and_factors(tmp_path):
    out = tmp_path / "shapes"
    argv = ["--data", "shapes", "--num-images", 40, "--batch-size", 4, "--steps", 2, "--eval-k", 2, "--quiet"]
    assert run("train", *argv, "--model", "conv", "--hidden", 4, 4, 4, 4, "--latent-dim", 3, "--out", out)[0] == 0
    status, _, stderr = run("encode", out, "--out", tmp_path / "z.npz")
    assert status == 0, stderr
    saved = np.load(tmp_path / "z.npz")
    assert sorted(saved) == ["codes", "factor_names", "factors", "index", "labels"]
    assert saved["codes"].shape == (40, 3) and saved["factors"].shape == (40, 5)
    assert list(saved["factor_names"]) == ["shape", "scale", "orientation", "x", "y"]
    assert np.array_equal(saved["labels"], saved["factors"][:, 0].astype(np.int64))
    model, _ = model_from_checkpoint(*load_checkpoint(str(out)), torch.device("cpu"))
    images = to_unit_float(load_images("shapes", num_images=40).subset("all").images)
    torch.testing.assert_close(torch.from_numpy(saved["codes"]), model.encode(images)[0])


@pytest.mark.parametrize("denoise", [None, "gaussian:0.2"])
def test_autoencoder_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, denoise):
    common = [*AE, "--steps", 24, "--log-every", 5, "--checkpoint-every", 7, "--quiet"]
    common += ["--denoise", denoise] if denoise else []
    straight, resumed = train_interrupted_and_resumed(monkeypatch, common, tmp_path, stop_at=17)  # checkpoint: 14
    assert {"code_mean", "code_std"} <= set(straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [r["loss"] for r in metrics(tmp_path / "straight")]


def identity_autoencoder(config, image_shape, **common):
    """An autoencoder whose output is its input: code = flattened image, through an identity head."""
    size = math.prod(image_shape)
    model = Autoencoder(
        nn.Flatten(), nn.Unflatten(1, image_shape), size, likelihood=common["likelihood"], features=size
    )
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(size))
        model.head.bias.zero_()
    return model


@pytest.mark.parametrize("denoise, noise", [("gaussian:0.3", "rank"), ("mask:0.5", "global")])
def test_denoising_scores_the_clean_images(tmp_path, monkeypatch, denoise, noise):
    """An identity autoencoder outputs the corrupted image, so its loss is ||corrupt(x) - x||^2, which is
    recomputed here from the run's seed: the corruption's stream (per rank, or the global batch's) and the data order.
    """
    monkeypatch.setitem(builders.MODELS, "identity", identity_autoencoder)
    out = tmp_path / "identity"
    argv = [*AE, "--model", "identity", "--denoise", denoise, "--noise", noise, "--steps", 5, "--lr", 1e-12]
    status, _, stderr = run("train", *argv, "--log-every", 1, "--seed", 3, "--quiet", "--out", out)
    assert status == 0, stderr
    corruption = parse_corruption(denoise)
    data = load_images("digits", num_images=300)
    order = epoch_order(3, 0, len(data.train), torch.device("cpu"))
    generator = corruption_generator(3, None if noise == "global" else 0, torch.device("cpu"))
    for step, record in enumerate(metrics(out)):
        x = to_unit_float(data.train[order[16 * step : 16 * (step + 1)]])
        error = (corruption(x, generator=generator) - x).square().flatten(1).sum(1).mean().item()
        assert error > 1 and record["recon"] == pytest.approx(error, rel=1e-5), step
    # The held-out evaluation: no error on the clean images, that of the corruption on the corrupted ones.
    results = json.load(open(out / FILES["eval"]))
    assert results["recon"] < 1e-6
    generator = eval_generator(3, torch.device("cpu"))
    errors = [(corruption(x, generator=generator) - x).square().flatten(1).sum(1) for x in data.test.split(16)]
    assert results["corrupted_inputs"]["recon"] == pytest.approx(torch.cat(errors).mean().item(), rel=1e-5)


def test_an_autoencoder_trains_convolutional_in_half_precision_with_another_likelihood(tmp_path):
    out = tmp_path / "conv"
    argv = [*AE, "--model", "conv", "--likelihood", "bce", "--precision", "fp16", "--denoise", "gaussian:0.1"]
    status, stdout, stderr = run("train", *argv, "--steps", 6, "--quiet", "--out", out)
    assert status == 0, stderr
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    assert "held-out reconstruction error: " in stdout and " nats/image" in stdout
    assert "latents.png" not in os.listdir(out)  # 16-D codes: no scatter


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--objective", "ae", "--beta", "1"], ["--beta does not apply to --objective ae", "no KL term"]),
        (["--objective", "ae", "--kl-warmup", "10"], ["--kl-warmup does not apply to --objective ae"]),
        (["--objective", "ae", "--logvar-limit", "5"], ["--logvar-limit does not apply", "no log-variance"]),
        (["--objective", "ae", "--eval-k", "10"], ["--eval-k does not apply", "importance-sample"]),
        (["--objective", "ae", "--noise", "global"], ["--noise global does not apply", "without --denoise"]),
        (["--objective", "gan"], ["--objective", "invalid choice: 'gan'"]),
        (["--denoise", "salt:0.1"], ["denoise must be KIND:LEVEL", "gaussian, mask"]),
        (["--denoise", "gaussian"], ["gaussian", "a positive number"]),
        (["--objective", "ae", "--denoise", "gaussian:0"], ["a positive number"]),
        (["--denoise", "mask:1"], ["strictly between 0 and 1"]),
    ],
)
def test_options_that_make_no_sense_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run("train", "--data", "digits", *argv)
    assert_one_line_error(status, stderr, *fragments)
    assert os.listdir(tmp_path) == []


def test_nonsense_on_an_autoencoders_checkpoint_is_an_error_that_changes_nothing(ae_run, tmp_path):
    out, _, _ = ae_run
    before = snapshot(out)
    cases = [
        (["train", "--out", out, "--resume", "--steps", 50, "--beta", 1], "--beta does not apply"),
        (["train", "--out", out, "--resume", "--steps", 50, "--eval-k", 3], "--eval-k does not apply"),
        (["train", "--out", out, "--resume", "--steps", 50, "--objective", "vae"], "objective='ae'"),
        (["eval", out, "--k", 10], "--k does not apply to --objective ae"),
        (["eval", out, "--denoise", "mask:2"], "strictly between 0 and 1"),
        (["encode", out, "--out", out / FILES["eval"]], "must name a .npz file"),
        (["encode", out, "--data", "mnist", "--out", tmp_path / "z.npz"], "holds 1x28x28 images, but"),
        (["encode", out, "--split", "val"], ["--split", "invalid choice: 'val'"]),
    ]
    (tmp_path / "taken.npz").write_bytes(b"")
    cases.append((["encode", out, "--out", tmp_path / "taken.npz"], "already exists"))
    for argv, fragments in cases:
        status, _, stderr = run(*argv)
        assert_one_line_error(status, stderr, *([fragments] if isinstance(fragments, str) else fragments))
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["taken.npz"]


def test_vae_options_still_apply_to_a_vae(tmp_path):
    """The VAE-only options, and --noise global with --denoise for an autoencoder, are accepted."""
    status, _, stderr = run(
        "train", *TINY, "--steps", 2, "--beta", 0.5, "--kl-warmup", 3, "--quiet", "--out", tmp_path / "v"
    )
    assert status == 0, stderr
    argv = [*AE, "--steps", 2, "--noise", "global", "--denoise", "mask:0.1", "--quiet", "--out", tmp_path / "a"]
    assert run("train", *argv)[0] == 0
