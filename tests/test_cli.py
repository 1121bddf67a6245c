"""The fastvae command end to end, at a tiny size: files, metrics, resume, bad input."""

import argparse
import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from fastvae import cli
from fastvae.cli import main
from fastvae.training import TrainConfig, loop, rundir
from fastvae.training.checkpoint import save_atomic
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

    from fastvae.training.figures import row_label_pixels

    # 16 held-out images and their reconstructions: 4 rows of 8 digits, each 8x8 enlarged to 32x32 plus borders,
    # below a title (of one or more lines) and, where the rows differ, beside row labels.
    for name, rows, columns, labels in [("reconstructions", 4, 8, True), ("samples", 8, 8, False),
                                        ("interpolation", 8, 12, False)]:
        height, width = image.imread(out / FILES[name]).shape[:2]
        assert height > rows * 34 + 2 and width == columns * 34 + 2 + labels * row_label_pixels(["reconstructed"]), name
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
    assert stdout.splitlines()[1:] == train_stdout.splitlines()[:-1]  # all but the "run folder:" line
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


def interrupt_at(monkeypatch, step: int) -> None:
    """Make training raise KeyboardInterrupt (Ctrl-C) as step ``step`` (from 0) begins; ``monkeypatch.undo()`` ends it."""
    original_step = loop._Run._train_step

    def interrupted_step(self):
        if self.step == step:
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(loop._Run, "_train_step", interrupted_step)


def train_interrupted_and_resumed(monkeypatch, common, tmp_path, stop_at: int) -> tuple[dict, dict]:
    """``fastvae train *common`` run straight into ``tmp_path/"straight"``, and into ``tmp_path/"resumed"``
    interrupted as step ``stop_at`` begins (:func:`interrupt_at`) and resumed; returns both runs' final weights."""
    assert run("train", *common, "--out", tmp_path / "straight")[0] == 0
    original_step = loop._Run._train_step
    interrupt_at(monkeypatch, stop_at)
    assert run("train", *common, "--out", tmp_path / "resumed")[0] == 130
    monkeypatch.setattr(loop._Run, "_train_step", original_step)
    status, _, stderr = run("train", "--out", tmp_path / "resumed", "--resume", "--quiet")
    assert status == 0, stderr
    return weights(tmp_path / "straight"), weights(tmp_path / "resumed")


@pytest.mark.parametrize("noise", ["rank", "global"])
def test_resume_after_an_interruption_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, noise):
    common = [*TINY, "--steps", 24, "--log-every", 5, "--checkpoint-every", 7, "--kl-warmup", 10, "--noise", noise]
    assert run("train", *common, "--quiet", "--out", tmp_path / "straight")[0] == 0
    # The warm-up's weights as logged, exactly: step s (from 1) trains with (s - 1) / 10.
    assert [r["kl_weight"] for r in metrics(tmp_path / "straight")[:4]] == [0.0, 0.1, 0.2, 0.3]

    interrupt_at(monkeypatch, 17)  # after the checkpoint at 14 and the metrics logged up to 15
    status, _, stderr = run("train", *common, "--quiet", "--out", tmp_path / "resumed")
    assert status == 130
    assert (
        "interrupted at step 18" in stderr
        and "(step 14, written while the loss was finite), is intact" in stderr
        and "--resume" in stderr
    )
    assert max(r["step"] for r in metrics(tmp_path / "resumed")) == 15
    monkeypatch.undo()

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
    # rundir's clock only: patching time.strftime itself would break whatever else formats a date meanwhile.
    monkeypatch.setattr(rundir, "time", types.SimpleNamespace(strftime=lambda fmt: "20250101-120000"))
    config, held = TrainConfig(model="conv"), []
    assert new_run_dir(config, "shapes", held.append) == (os.path.join("runs", "shapes-conv-20250101-120000"), False)
    assert new_run_dir(config, "shapes", held.append) == (os.path.join("runs", "shapes-conv-20250101-120000-2"), False)
    assert held == [os.path.join("runs", "shapes-conv-20250101-120000"), os.path.join("runs", "shapes-conv-20250101-120000-2")]
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
    for option, value in [("--model", "conv"), ("--latent-dim", "3"), ("--lr", "0.5")]:
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
    # The command installed beside this interpreter (a venv's bin/), whether or not that venv is activated.
    installed = os.path.join(os.path.dirname(sys.executable), "fastvae")
    assert os.access(installed, os.X_OK), f"no fastvae command beside {sys.executable}: pip install -e ."
    for command in ([installed], [sys.executable, "-m", "fastvae"]):
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


@pytest.mark.parametrize("likelihood", [[], ["--likelihood", "dmol", "--num-mixtures", 2]], ids=["bce", "dmol"])
def test_training_through_the_fused_kernels_follows_the_reference_path(tmp_path, likelihood):
    """--backend triton (Triton's interpreter on the CPU here) against --backend torch, on the same noise."""
    common = [*TINY, *likelihood, "--num-images", 100, "--steps", 4, "--hidden", 32, "--noise", "global", "--quiet"]
    for backend in ("torch", "triton"):
        status, _, stderr = run("train", *common, "--backend", backend, "--out", tmp_path / backend)
        assert status == 0, stderr
    reference, fused = weights(tmp_path / "torch"), weights(tmp_path / "triton")
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


# --- Nothing lost: resume keeps the run's options, runs without a checkpoint, interrupted endings, damaged files ---


def saved_steps(monkeypatch) -> list[int]:
    """The steps of the checkpoints written from now on, in order."""
    steps = []
    original = loop.save_atomic
    monkeypatch.setattr(
        loop, "save_atomic", lambda checkpoint, path: (steps.append(checkpoint["step"]), original(checkpoint, path))
    )
    return steps


def test_resume_keeps_the_options_the_run_was_started_with_unless_set_again(tmp_path, monkeypatch):
    out = tmp_path / "r"
    start = [*TINY, "--steps", 12, "--checkpoint-every", 5, "--log-every", 3, "--eval-k", 3, "--backend", "torch"]
    interrupt_at(monkeypatch, 7)
    assert run("train", *start, "--quiet", "--out", out)[0] == 130
    monkeypatch.undo()

    steps = saved_steps(monkeypatch)
    status, _, stderr = run("train", "--out", out, "--resume", "--eval-k", 2)
    assert status == 0, stderr
    assert steps == [10, 12]  # every 5 steps, as the run was started, not every 500
    config = torch.load(out / FILES["checkpoint"], weights_only=True)["config"]
    assert (config["checkpoint_every"], config["log_every"], config["backend"], config["eval_k"]) == (5, 3, "torch", 2)
    assert json.load(open(out / FILES["eval"]))["k"] == 2
    assert "for steps 6..12" in stderr and "resumed with --eval-k 3 -> 2" in stderr


def test_the_command_takes_its_backend_from_FASTVAE_BACKEND(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "triton")  # the kernels in Triton's interpreter, here
    status, _, stderr = run("train", *TINY, "--num-images", 40, "--hidden", 8, "--steps", 1, "--out", tmp_path / "r")
    assert status == 0, stderr
    assert "backend triton" in stderr
    assert torch.load(tmp_path / "r" / FILES["checkpoint"], weights_only=True)["config"]["backend"] == "triton"
    monkeypatch.setenv("FASTVAE_BACKEND", "bogus")
    for argv in (["train", *TINY, "--out", tmp_path / "s"], ["eval", tmp_path / "r"]):
        assert_one_line_error(*run(*argv)[:3:2], "FASTVAE_BACKEND must be one of 'auto', 'triton', 'torch'", "'bogus'")
    assert not (tmp_path / "s").exists()


def test_the_data_is_stored_by_absolute_path_and_fingerprint_and_checked(tmp_path, monkeypatch):
    def images(seed):
        return np.random.default_rng(seed).integers(0, 256, (40, 8, 8), dtype=np.uint8)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "a" / "x.npy", images(0))
    np.save(tmp_path / "b" / "x.npy", images(1))  # another file at the same relative path
    monkeypatch.chdir(tmp_path / "a")
    run_dir = tmp_path / "run"
    assert run("train", "--data", "x.npy", "--batch-size", 4, "--steps", 2, "--eval-k", 2, "--out", run_dir)[0] == 0
    checkpoint = torch.load(run_dir / FILES["checkpoint"], weights_only=True)
    assert checkpoint["config"]["data"] == str(tmp_path / "a" / "x.npy")
    assert checkpoint["data"]["images"] == 40 and checkpoint["data"]["image_shape"] == [1, 8, 8]

    monkeypatch.chdir(tmp_path / "b")  # the run still finds its own file
    status, stdout, stderr = run("eval", run_dir, "--k", 2)
    assert status == 0 and "on x" in stdout, stderr
    before = snapshot(run_dir)
    np.save(tmp_path / "a" / "x.npy", images(2))  # the run's file changed: refused, for eval and resume alike
    for argv in (["eval", run_dir], ["train", "--out", run_dir, "--resume", "--steps", 3]):
        assert_one_line_error(*run(*argv)[:3:2], "is not what the checkpoint", "40 images of 1x8x8 uint8")
    assert snapshot(run_dir) == before

    np.save(tmp_path / "b" / "moved.npy", images(0))  # the run's data, moved: --data points at it
    assert run("eval", run_dir, "--k", 2, "--data", "moved.npy")[0] == 0
    status, _, stderr = run("train", "--out", run_dir, "--resume", "--steps", 3, "--data", "moved.npy")
    assert status == 0, stderr
    assert f"--data {tmp_path / 'a' / 'x.npy'} -> {tmp_path / 'b' / 'moved.npy'}" in stderr


def test_a_bundled_dataset_is_checked_by_name_and_fingerprint(tiny_run):
    out, _, _ = tiny_run
    fingerprint = torch.load(out / FILES["checkpoint"], weights_only=True)["data"]
    assert {key: fingerprint[key] for key in ("images", "image_shape", "dtype")} == {
        "images": 300,
        "image_shape": [1, 8, 8],
        "dtype": "float32",
    }
    before = snapshot(out)
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 100, "--data", "mnist")
    assert_one_line_error(status, stderr, "the data mnist is not what the checkpoint", "300 images of 1x8x8 float32")
    assert snapshot(out) == before


def test_a_run_stopped_before_its_first_checkpoint_is_taken_over_by_the_next(tmp_path, monkeypatch):
    out = tmp_path / "r"
    common = [*TINY, "--steps", 6, "--checkpoint-every", 50, "--log-every", 2, "--out", out]
    interrupt_at(monkeypatch, 3)
    status, _, stderr = run("train", *common, "--quiet")
    assert status == 130 and stderr.count("\n") == 1, stderr
    assert f"no checkpoint was written; to start again, run the same command (it takes over {out})" in stderr
    monkeypatch.undo()
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert_one_line_error(*run("train", "--out", out, "--resume")[:3:2], "holds no checkpoint", "without --resume")

    status, _, stderr = run("train", *common)
    assert status == 0, stderr
    assert "(taken over: it held no checkpoint)" in stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))  # the old lines went with the old run

    # A NaN before the first checkpoint: the rerun with a lower --lr takes the folder over too.
    nan = tmp_path / "nan"
    status, _, stderr = run("train", *TINY, "--steps", 30, "--lr", 1e30, "--log-every", 1, "--out", nan, "--quiet")
    assert status == 1 and "no checkpoint was written" in stderr
    assert run("train", *TINY, "--steps", 3, "--out", nan, "--quiet")[0] == 0

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert_one_line_error(*run("train", *TINY, "--out", tmp_path / "mine")[:3:2], "holds files of its own", "notes.txt")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # not even a lock file


def test_ctrl_c_in_the_final_evaluation_and_a_resume_that_finishes_it(tmp_path, monkeypatch):
    out = tmp_path / "r"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate_held_out", interrupted)
    status, stdout, stderr = run("train", *TINY, "--steps", 4, "--out", out, "--quiet")
    assert status == 130 and stderr.count("\n") == 1, stderr
    assert f"interrupted while writing the evaluation and figures; the last checkpoint, {out}" in stderr
    assert (
        f"(step 4, written while the loss was finite), is intact; write them with: fastvae train --out {out} --resume"
        in stderr
    )
    assert not (out / FILES["eval"]).exists()
    monkeypatch.undo()

    status, stdout, stderr = run("train", "--out", out, "--resume")
    assert status == 0, stderr
    assert f"the run in {out} is at its last step, 4; writing the evaluation and figures it lacks" in stderr
    assert "held-out ELBO" in stdout and json.load(open(out / FILES["eval"]))["step"] == 4
    assert set(FILES.values()) == set(os.listdir(out))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert_one_line_error(*run("train", "--out", out, "--resume")[:3:2], "already at step 4 of 4")


def test_a_cut_off_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    out = tmp_path / "r"
    assert run("train", *TINY, "--steps", 4, "--out", out, "--quiet")[0] == 0
    with open(out / FILES["metrics"], "a") as f:
        f.write('{"step": 5, "epoch": 0, "lo')  # what a crash while appending leaves
    (out / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")  # and one killed while checkpointing
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 6, "--quiet")
    assert status == 0, stderr
    assert (
        stderr
        == f"fastvae train: warning: {out / FILES['metrics']}: dropped its last line, which was cut off (as a crash leaves it)\n"
    )
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))
    assert not (out / "checkpoint.pt.tmp").exists()


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data)[: self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def fail_saves_after(monkeypatch, saves: int, fail) -> None:
    """Let ``saves`` calls of torch.save through, then make each later one write through ``fail(f)``'s file."""
    original, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        original(obj, f if len(calls) <= saves else fail(f), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "r"
    fail_saves_after(monkeypatch, 1, lambda f: FullDisk(f, 3000))
    status, _, stderr = run("train", *TINY, "--steps", 6, "--checkpoint-every", 3, "--out", out, "--quiet")
    assert status == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert f"cannot write the checkpoint {out / FILES['checkpoint']}: No space left on device" in stderr
    assert "(step 3, written while the loss was finite), is intact" in stderr
    assert sorted(os.listdir(out)) == sorted([FILES["lock"], FILES["checkpoint"], FILES["metrics"]])  # no .tmp
    assert torch.load(out / FILES["checkpoint"], weights_only=True)["step"] == 3
    monkeypatch.undo()
    assert run("train", "--out", out, "--resume", "--quiet")[0] == 0


def test_save_atomic_failing_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_atomic({"step": 3, "weights": torch.zeros(1000)}, path)
    fail_saves_after(monkeypatch, 0, lambda f: FullDisk(f, 500))
    with pytest.raises(OSError) as raised:
        save_atomic({"step": 6, "weights": torch.ones(1000)}, path)
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True)["step"] == 3


class InterruptedDisk(FullDisk):
    """A file whose writer presses Ctrl-C (sends this process SIGINT) after ``room`` bytes, and then goes on."""

    def write(self, data):
        if self.room is not None and len(data) > self.room:
            self.room = None
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(data)


def test_ctrl_c_while_a_checkpoint_is_written_finishes_it_then_stops(tmp_path, monkeypatch):
    out = tmp_path / "r"
    fail_saves_after(monkeypatch, 1, lambda f: InterruptedDisk(f, 3000))  # in the checkpoint of step 6
    status, _, stderr = run("train", *TINY, "--steps", 9, "--checkpoint-every", 3, "--out", out, "--quiet")
    assert status == 130 and stderr.count("\n") == 1, stderr
    assert "(step 6, written while the loss was finite), is intact; continue with" in stderr
    assert sorted(os.listdir(out)) == sorted([FILES["lock"], FILES["checkpoint"], FILES["metrics"]])
    assert torch.load(out / FILES["checkpoint"], weights_only=True)["step"] == 6
    monkeypatch.undo()
    assert run("train", "--out", out, "--resume", "--quiet")[0] == 0


# --- One clear line, for every bad input ---


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--out", "/proc/x"], ["cannot create the run folder /proc/x"]),
        (["--out", "somefile/sub"], ["cannot create the run folder somefile/sub", "Not a directory"]),
        (["--out", "somefile"], ["somefile already exists and is not a folder"]),
        (["--seed", "18446744073709551616"], ["--seed", "is not a seed from 0 to 2**64 - 1"]),
        (["--lr", "1e308"], ["lr must be at most 3.4e+37"]),
        (
            ["--data", "digits", "--num-images", "1000000"],
            ["num_images 1000000 is more than the 1797 images of digits"],
        ),
    ],
)
def test_bad_run_folders_and_numbers_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "somefile").write_text("")
    status, _, stderr = run("train", *argv)
    assert_one_line_error(status, stderr, *fragments)
    assert os.listdir(tmp_path) == ["somefile"]


def test_shapes_too_many_for_memory_are_refused_before_generating(tmp_path, monkeypatch):
    monkeypatch.setattr("fastvae.data.available_memory", lambda: 2**30)
    monkeypatch.setattr("fastvae.data.make_shapes", lambda *a, **k: pytest.fail("generated shapes that cannot fit"))
    status, _, stderr = run("train", "--data", "shapes", "--num-images", 100_000_000, "--out", tmp_path / "r")
    assert_one_line_error(
        status, stderr, "100000000 generated shapes would need about 762.9 GiB", "1.0 GiB is available"
    )
    assert not (tmp_path / "r").exists()


def test_damaged_and_foreign_checkpoints_are_one_line_errors(tiny_run, tmp_path):
    out, _, _ = tiny_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / FILES["checkpoint"]).write_bytes(b"")
    for argv in (["eval", tmp_path / "empty"], ["train", "--out", tmp_path / "empty", "--resume"]):
        assert_one_line_error(*run(*argv)[:3:2], "is empty (0 bytes), not a fastvae checkpoint")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save(argparse.Namespace(step=1), tmp_path / "pickled.pt")  # an object weights_only refuses
    for name in ("random.pt", "pickled.pt"):
        status, _, stderr = run("eval", tmp_path / name)
        assert_one_line_error(status, stderr, f"{name} is not a fastvae checkpoint")
        assert "weights_only" not in stderr
    assert_one_line_error(
        *run("train", "--out", out / FILES["checkpoint"], "--resume")[:3:2],
        "is a file; --resume continues a run folder",
        f"--out {out}",
    )
    original = torch.load(out / FILES["checkpoint"], weights_only=True)
    (tmp_path / "handmade").mkdir()
    torch.save({k: v for k, v in original.items() if k not in ("step", "rng")}, tmp_path / "handmade" / "checkpoint.pt")
    for argv in (["eval", tmp_path / "handmade"], ["train", "--out", tmp_path / "handmade", "--resume"]):
        assert_one_line_error(*run(*argv)[:3:2], "incomplete or damaged fastvae checkpoint: step, rng missing")
    torch.save({**original, "config": {**original["config"], "model": "resnet"}}, tmp_path / "config.pt")
    assert_one_line_error(*run("eval", tmp_path / "config.pt")[:3:2], "damaged run configuration", "'resnet'")
    torch.save({**original, "optimizer": {"state": {}}}, tmp_path / "handmade" / "checkpoint.pt")
    assert_one_line_error(
        *run("train", "--out", tmp_path / "handmade", "--resume", "--steps", 100)[:3:2],
        "does not fit this run: its optimizer, scaler or RNG state cannot be restored",
    )


def test_a_checkpoint_that_does_not_fit_says_what_did_not(tiny_run, tmp_path):
    out, _, _ = tiny_run
    original = torch.load(out / FILES["checkpoint"], weights_only=True)
    model = dict(original["model"])
    model["extra.weight"] = model.pop("decoder.2.weight")
    torch.save({**original, "config": {**original["config"], "latent_dim": 5}, "model": model}, tmp_path / "c.pt")
    status, _, stderr = run("eval", tmp_path / "c.pt")
    assert_one_line_error(
        status,
        stderr,
        "does not fit this model: missing: decoder.2.weight; unexpected: extra.weight; other shape: ",
        "latent.head.weight (40, 400) in the checkpoint, (10, 400) in the model",  # the default mlp: 400 units, D = 20
    )


def test_sample_writes_the_format_its_name_asks_for_and_refuses_others(tiny_run, tmp_path):
    out, _, _ = tiny_run
    for name, magic in [("s.jpg", b"\xff\xd8\xff"), ("s.pdf", b"%PDF"), ("s.PNG", b"\x89PNG")]:
        status, _, stderr = run("sample", out, "--n", 4, "--out", tmp_path / name)
        assert status == 0, stderr
        assert (tmp_path / name).read_bytes().startswith(magic), name
    for name in ("s.bmp", "s"):
        assert_one_line_error(*run("sample", out, "--out", tmp_path / name)[:3:2], "cannot write", ".png, .jpg")
    assert_one_line_error(*run("sample", out, "--out", "/proc/a.png")[:3:2], "cannot write /proc/a.png")
    assert sorted(os.listdir(tmp_path)) == ["s.PNG", "s.jpg", "s.pdf"]
    assert run("sample", out, "--n", 1, "--seed", 2**64 - 1, "--out", tmp_path / "max.png")[0] == 0


@pytest.mark.parametrize("command, name", [("sample", "s.png"), ("encode", "codes.npz")])
def test_an_output_file_that_cannot_be_written_is_one_line_for_every_command(
    tiny_run, tmp_path, monkeypatch, command, name
):
    """sample and encode alike: checked before any work, and a write that fails when done (a full disk) too."""
    out, _, _ = tiny_run
    before = snapshot(out)
    (tmp_path / "file").write_text("")
    (tmp_path / name).write_text("")
    for path, fragment in (
        (f"/proc/{name}", f"cannot write /proc/{name}: No such file or directory"),
        (tmp_path / "file" / name, f"cannot write {tmp_path / 'file' / name}: {tmp_path / 'file'} is not a folder"),
        (tmp_path / "missing" / name, f"the folder of {tmp_path / 'missing' / name} does not exist"),
        (tmp_path / name, f"{tmp_path / name} already exists"),
    ):
        assert_one_line_error(*run(command, out, "--out", path)[:3:2], fragment)
    (tmp_path / name).unlink()

    def full_disk(path, write, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for module in ("figures", "checkpoint"):
        monkeypatch.setattr(f"fastvae.training.{module}.write_atomic", full_disk)
    path = tmp_path / name
    assert_one_line_error(*run(command, out, "--out", path)[:3:2], f"cannot write {path}: No space left on device")
    assert os.listdir(tmp_path) == ["file"]
    assert snapshot(out) == before


def test_running_out_of_memory_is_one_line(tiny_run, monkeypatch):
    from fastvae.models import VAE

    def sample(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 64000000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(VAE, "sample", sample)
    status, _, stderr = run("sample", tiny_run[0], "--n", 10**12)
    assert status == 1 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("fastvae sample: error: out of memory (can't allocate memory: you tried to allocate")


@pytest.mark.parametrize(
    "options, advice",
    [
        ({}, "Try a lower --lr or a smaller --logvar-limit"),
        ({"precision": "bf16"}, "Try a lower --lr, --precision fp32 or a smaller --logvar-limit"),
        ({"logvar_limit": 0.0}, "Try a lower --lr or the log-variance clamp this run turned off (--logvar-limit 10)"),
        ({"objective": "ae"}, "Try a lower --lr"),
    ],
)
def test_the_advice_on_a_non_finite_loss_names_only_what_the_run_could_change(options, advice):
    assert loop._nonfinite_advice(TrainConfig(**options)) == advice


def test_threads_sets_torchs_cpu_threads_for_the_command(tmp_path):
    threads = torch.get_num_threads()
    try:
        status, _, stderr = run("train", *TINY, "--steps", 2, "--out", tmp_path / "r", "--threads", 1)
        assert status == 0 and torch.get_num_threads() == 1, stderr
        assert "--threads N" in run("eval", "--help")[1] and "--threads N" in run("encode", "--help")[1]
    finally:
        torch.set_num_threads(threads)
