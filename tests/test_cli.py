"""The fastvae command end to end, at a tiny size: files, metrics, resume, bad input."""

import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastvae import cli
from fastvae.cli import main
from fastvae.training import TrainConfig, loop, rundir
from fastvae.training.rundir import FILES, new_run_dir

TINY = ["--data", "digits", "--num-images", "300", "--batch-size", "16", "--eval-k", "4"]


def run(*argv) -> tuple[int, str, str]:
    """``fastvae *argv`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's own exits (--help, bad option values)
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, FILES["metrics"])) as f:
        return [json.loads(line) for line in f]


def weights(run_dir) -> dict:
    return torch.load(os.path.join(run_dir, FILES["checkpoint"]), weights_only=True)["model"]


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes, to show that nothing was written or changed."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny training run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    status, stdout, stderr = run(
        "train", *TINY, "--steps", 60, "--log-every", 7, "--checkpoint-every", 25, "--out", out
    )
    assert status == 0, stderr
    return out, stdout, stderr


def test_train_writes_the_run_folder_with_finite_falling_metrics(tiny_run):
    out, stdout, _ = tiny_run
    assert set(FILES.values()) <= set(os.listdir(out))
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 61))
    for r in records:
        assert {"loss", "recon", "kl", "samples_per_s", "lr", "kl_weight", "epoch"} <= r.keys()
        assert all(math.isfinite(r[key]) for key in ("loss", "recon", "kl", "samples_per_s"))
    first, last = np.mean([r["loss"] for r in records[:10]]), np.mean([r["loss"] for r in records[-10:]])
    assert last < 0.8 * first
    results = json.load(open(out / FILES["eval"]))
    assert results["step"] == 60 and results["k"] == 4 and results["held_out_images"] == 30
    assert math.isfinite(results["elbo"]) and results["log_likelihood"] >= results["elbo"] - 5
    assert f"held-out ELBO: {results['elbo']:.2f}" in stdout
    assert f"log-likelihood (importance-sampled, k=4): {results['log_likelihood']:.2f}" in stdout
    from matplotlib import image

    # 16 held-out images and their reconstructions: 4 rows of 8 digits, each 8x8 enlarged to 32x32 plus borders.
    assert image.imread(out / FILES["reconstructions"]).shape[:2] == (4 * 34 + 2, 8 * 34 + 2)
    assert image.imread(out / FILES["samples"]).shape[:2] == (8 * 34 + 2, 8 * 34 + 2)
    assert image.imread(out / FILES["interpolation"]).shape[:2] == (8 * 34 + 2, 12 * 34 + 2)
    assert image.imread(out / FILES["loss_curve"]).ndim == 3


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(tiny_run):
    _, _, stderr = tiny_run
    assert "\r" not in stderr
    assert stderr.startswith("training the mlp VAE on digits") and stderr.count("\n") == 1


def test_eval_and_sample_read_the_checkpoint(tiny_run, tmp_path):
    out, train_stdout, _ = tiny_run
    status, stdout, stderr = run("eval", out, "--k", 4)
    assert status == 0, stderr
    assert "step 60" in stdout
    # With the run's seed and batch size (the defaults) and its k, the numbers of the end of training.
    assert stdout.splitlines()[1:] == train_stdout.splitlines()[:2]
    status, stdout, stderr = run("eval", out, "--k", 3, "--batch-size", 7, "--seed", 1)
    assert status == 0, stderr
    assert "held-out ELBO" in stdout and "k=3" in stdout
    status, stdout, _ = run("eval", out / FILES["checkpoint"], "--k", 3, "--batch-size", 7)
    assert status == 0 and "k=3" in stdout
    target = tmp_path / "grid.png"
    status, stdout, _ = run("sample", out, "--n", 10, "--out", target)
    assert status == 0 and target.exists() and str(target) in stdout
    status, _, stderr = run("sample", out, "--n", 10, "--out", target)
    assert status == 2 and "already exists" in stderr


def test_resume_after_an_interruption_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    common = [*TINY, "--steps", 24, "--log-every", 5, "--checkpoint-every", 7, "--kl-warmup", 10, "--quiet"]
    assert run("train", *common, "--out", tmp_path / "straight")[0] == 0

    original_step = loop._Run._train_step

    def interrupted_step(self):
        if self.step == 17:  # after the checkpoint at 14 and the metrics logged up to 15
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(loop._Run, "_train_step", interrupted_step)
    status, _, stderr = run("train", *common, "--out", tmp_path / "resumed")
    assert status == 130
    assert (
        "interrupted at step 18" in stderr
        and "(step 14, written while the loss was finite), is intact" in stderr
        and "--resume" in stderr
    )
    assert max(r["step"] for r in metrics(tmp_path / "resumed")) == 15
    monkeypatch.setattr(loop._Run, "_train_step", original_step)

    status, _, stderr = run("train", "--out", tmp_path / "resumed", "--resume", "--quiet")
    assert status == 0, stderr
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert metrics(tmp_path / "resumed") == [
        {**r, "samples_per_s": m["samples_per_s"]}
        for r, m in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "resumed"))
    ]


def test_resume_can_extend_a_finished_run(tiny_run, tmp_path):
    out = tmp_path / "extended"
    assert run("train", *TINY, "--steps", 5, "--out", out, "--quiet")[0] == 0
    status, _, stderr = run("train", "--out", out, "--resume", "--quiet")
    assert status == 2 and "already at step 5 of 5" in stderr
    assert run("train", "--out", out, "--resume", "--steps", 8, "--quiet")[0] == 0
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_with_bce(tmp_path, precision):
    status, _, stderr = run("train", *TINY, "--steps", 6, "--precision", precision, "--out", tmp_path / "r", "--quiet")
    assert status == 0, stderr
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "r"))
    checkpoint = torch.load(tmp_path / "r" / FILES["checkpoint"], weights_only=True)
    assert checkpoint["scaler"] if precision == "fp16" else True
    assert all(t.dtype == torch.float32 for t in checkpoint["model"].values())  # autocast keeps fp32 weights


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    out = tmp_path / "diverged"
    status, _, stderr = run(
        "train", *TINY, "--steps", 30, "--lr", 1e30, "--checkpoint-every", 1, "--log-every", 1, "--out", out, "--quiet"
    )
    assert status == 1
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    named_step = int(stderr.split(" at step ")[1].split()[0].rstrip(";"))
    assert "became" in stderr and "is intact" in stderr
    checkpoint = torch.load(out / FILES["checkpoint"], weights_only=True)
    assert checkpoint["step"] < named_step
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert all(math.isfinite(r["loss"]) for r in metrics(out))


def test_default_run_folder_names_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20250101-120000")
    config = TrainConfig(model="conv")
    assert new_run_dir(config, "shapes") == os.path.join("runs", "shapes-conv-20250101-120000")
    assert new_run_dir(config, "shapes") == os.path.join("runs", "shapes-conv-20250101-120000-2")
    status, stdout, _ = run("train", *TINY, "--steps", 2, "--quiet")
    assert status == 0 and os.path.isdir("runs/digits-mlp-20250101-120000")
    assert "run folder: runs/digits-mlp-20250101-120000" in stdout


def assert_one_line_error(status, stderr, *fragments):
    assert status == 2, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("fastvae ") and ": error: " in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--data", "cifar"], ["unknown dataset 'cifar'", "mnist, digits, shapes"]),
        (["--model", "resnet"], ["--model", "invalid choice: 'resnet'"]),
        (["--likelihood", "poisson"], ["--likelihood", "invalid choice: 'poisson'"]),
        (["--data", "digits", "--batch-size", "5000"], ["batch size 5000 is larger than the 1617 training images"]),
        (["--batch-size", "0"], ["--batch-size", "'0' is not a positive integer"]),
        (["--lr", "fast"], ["--lr", "'fast' is not a positive number"]),
        (["--resume"], ["resume needs out"]),
        (
            [
                "--model",
                "conv",
                "--data",
                "shapes",
                "--num-images",
                "20",
                "--batch-size",
                "4",
                "--hidden",
                "8",
                "8",
                "8",
                "8",
                "8",
                "8",
                "8",
            ],
            ["image_size 64 must be divisible by 2**len(widths) = 128"],
        ),
    ],
)
def test_bad_train_options_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run("train", *argv)
    assert_one_line_error(status, stderr, *fragments)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_is_an_error(tmp_path):
    assert_one_line_error(*run("train", *TINY, "--device", "cuda", "--out", tmp_path / "r")[:3:2], "no CUDA device")


def test_bad_npy_file_is_an_error(tmp_path):
    np.save(tmp_path / "labels.npy", np.arange(10, dtype=np.int64))
    status, _, stderr = run("train", "--data", tmp_path / "labels.npy", "--out", tmp_path / "r")
    assert_one_line_error(status, stderr, "labels.npy", "int64")
    assert not (tmp_path / "r").exists()


def test_an_existing_output_folder_is_not_touched_without_resume(tiny_run):
    out, _, _ = tiny_run
    before = snapshot(out)
    status, _, stderr = run("train", *TINY, "--steps", 3, "--out", out)
    assert_one_line_error(status, stderr, "already exists", "--resume")
    assert snapshot(out) == before


def test_resuming_with_another_model_or_data_is_refused(tiny_run):
    out, _, _ = tiny_run
    before = snapshot(out)
    for option, value in [("--model", "conv"), ("--data", "mnist"), ("--latent-dim", "3"), ("--lr", "0.5")]:
        status, _, stderr = run("train", "--out", out, "--resume", "--steps", 100, option, value)
        assert_one_line_error(status, stderr, "a resumed run keeps its settings", option.lstrip("-").replace("-", "_"))
    assert snapshot(out) == before


def test_a_checkpoint_that_does_not_fit_its_model_is_an_error(tiny_run, tmp_path):
    out, _, _ = tiny_run
    checkpoint = torch.load(out / FILES["checkpoint"], weights_only=True)
    checkpoint["config"]["latent_dim"] = 5  # claims another model than its weights
    torch.save(checkpoint, tmp_path / "other.pt")
    for command in ("eval", "sample"):
        status, _, stderr = run(command, tmp_path / "other.pt")
        assert_one_line_error(status, stderr, "does not fit this model")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert_one_line_error(*run("eval", tmp_path / "foreign.pt")[:3:2], "not a fastvae training checkpoint")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    assert_one_line_error(*run("eval", tmp_path / "garbage.pt")[:3:2], "cannot read")
    assert_one_line_error(*run("sample", tmp_path / "missing")[:3:2], "no checkpoint at")


def test_every_train_option_is_documented():
    status, stdout, _ = run("train", "--help")
    assert status == 0
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in stdout, field.name


def test_subcommands_plug_into_the_registry(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    seen = {}
    cli.register(
        "echo", "say hello", lambda p: p.add_argument("--name"), lambda args: seen.setdefault("name", args.name) and 0
    )
    assert run("echo", "--name", "vae")[0] == 0 and seen == {"name": "vae"}
    assert "echo" in run("--help")[1] and "train" in run("--help")[1]


def test_the_installed_command_and_python_m_fail_cleanly(tmp_path):
    """A real process: exit status 2 and one line on stderr, with no traceback."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for command in (["fastvae"], [sys.executable, "-m", "fastvae"]):
        done = subprocess.run(
            [*command, "train", "--data", "cifar"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert_one_line_error(done.returncode, done.stderr, "unknown dataset 'cifar'")
    assert os.listdir(tmp_path) == []


def test_compiled_training_follows_the_eager_run(tmp_path):
    """--compile (with a KL warm-up, whose changing weight must not force recompiles) trains like eager mode."""
    import torch._dynamo

    # The noise is given (--noise global): inductor draws its own random numbers for torch.randn on the CPU.
    common = [
        *TINY,
        "--num-images",
        100,
        "--steps",
        6,
        "--kl-warmup",
        4,
        "--hidden",
        32,
        "--noise",
        "global",
        "--quiet",
    ]
    assert run("train", *common, "--out", tmp_path / "eager")[0] == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    status, _, stderr = run("train", *common, "--compile", "--out", tmp_path / "compiled")
    assert status == 0, stderr
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_training_through_the_fused_kernels_follows_the_reference_path(tmp_path):
    """--backend triton (Triton's interpreter on the CPU here) against --backend torch, on the same noise."""
    common = [*TINY, "--num-images", 100, "--steps", 4, "--hidden", 32, "--noise", "global", "--quiet"]
    for backend in ("torch", "triton"):
        status, _, stderr = run("train", *common, "--backend", backend, "--out", tmp_path / backend)
        assert status == 0, stderr
    reference, fused = weights(tmp_path / "torch"), weights(tmp_path / "triton")
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
