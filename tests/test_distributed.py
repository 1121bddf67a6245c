"""``torchrun -m fastvae train`` with two Gloo processes on the CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastvae.training.rundir import FILES

TINY = ["--data", "digits", "--num-images", "300", "--batch-size", "16", "--eval-k", "4", "--quiet", "--device", "cpu"]


def train(out, *args, nproc: int, base=TINY) -> subprocess.CompletedProcess:
    """``fastvae train *base *args`` in ``nproc`` processes started by torchrun (one plain process for ``nproc=1``)."""
    launcher = [sys.executable, "-m", "fastvae"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "fastvae",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "train", *base, *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300
    )


def load(out):
    checkpoint = torch.load(os.path.join(out, FILES["checkpoint"]), weights_only=True)
    with open(os.path.join(out, FILES["metrics"])) as f:
        return checkpoint, [json.loads(line) for line in f]


def assert_close_in_norm(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-4) -> None:
    """``actual`` equals ``expected`` to ``rtol`` of its norm, not element by element.

    Two processes sum a gradient in another order than one, so each gradient element differs by float32 rounding
    of its summands. Where an element's summands cancel to about that rounding (a weight whose input is nearly
    constant), its sign and size are noise, and Adam divides it by its own running magnitude: an update of up to
    the learning rate per step that the other run does not make (seen: one element of 25,600 off by 6e-5 after
    12 steps at lr 3e-3, on one machine and not another). Such elements are few, so the tensor's norm-wise
    difference stays near float32 rounding, while a real mismatch (another batch, other noise, a wrong scale
    before the optimizer's eps) moves every element.
    """
    error = torch.linalg.vector_norm((actual - expected).double())
    scale = torch.linalg.vector_norm(expected.double())
    assert error <= rtol * scale, f"{name}: |difference| {error:.3g} > {rtol} * |expected| {scale:.3g}"


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """With the noise drawn for the global batch (--noise global), the world size must not change the result."""
    args = ["--steps", "12", "--noise", "global", "--kl-warmup", "5", "--log-every", "4", "--checkpoint-every", "5"]
    one, two = train(tmp_path / "one", *args, nproc=1), train(tmp_path / "two", *args, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    (single, single_metrics), (double, double_metrics) = load(tmp_path / "one"), load(tmp_path / "two")
    for name, value in single["model"].items():
        assert_close_in_norm(double["model"][name], value, name)
    # Metrics are averaged over ranks (equal shares), so they are the global batch's means; rank 0 alone writes.
    assert [r["step"] for r in double_metrics] == list(range(1, 13))
    for a, b in zip(single_metrics, double_metrics):
        torch.testing.assert_close(
            torch.tensor([b["loss"], b["recon"], b["kl"]]),
            torch.tensor([a["loss"], a["recon"], a["kl"]]),
            rtol=1e-4,
            atol=1e-4,
        )
    assert len(double["rng"]) == 2
    assert "held-out ELBO" in two.stdout and two.stdout.count("held-out ELBO") == 1  # printed by rank 0 only


def test_a_denoising_autoencoder_under_two_processes_matches_one(tmp_path):
    """--noise global draws the corruption of the global batch too, so the world size does not change the result."""
    base = [arg for arg in TINY if arg not in ("--eval-k", "4")]  # an autoencoder has no importance sampling
    args = ["--objective", "ae", "--denoise", "mask:0.5", "--noise", "global", "--steps", "8", "--log-every", "4"]
    one, two = train(tmp_path / "one", *args, nproc=1, base=base), train(tmp_path / "two", *args, nproc=2, base=base)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    (single, single_metrics), (double, double_metrics) = load(tmp_path / "one"), load(tmp_path / "two")
    for name, value in single["model"].items():  # code_mean and code_std included
        torch.testing.assert_close(double["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(
        torch.tensor([r["recon"] for r in double_metrics]), torch.tensor([r["recon"] for r in single_metrics])
    )
    rank0, rank1 = double["rng"]
    assert torch.equal(rank0["corruption"], rank1["corruption"])  # one stream, alike on every rank
    assert two.stdout.count("held-out reconstruction error from inputs corrupted by mask:0.5") == 1


def test_each_rank_draws_its_own_noise_and_only_rank_0_writes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = train(tmp_path / "ranks", "--steps", "6", "--tensorboard", "--tensorboard-image-every", "3", nproc=2)
    assert done.returncode == 0, done.stderr
    checkpoint, records = load(tmp_path / "ranks")
    assert [r["step"] for r in records] == list(range(1, 7))
    rank0, rank1 = checkpoint["rng"]
    # Seeded from (seed, rank): the ranks' generators differ, so their noise does too.
    assert not torch.equal(rank0["cpu"], rank1["cpu"])
    files = sorted(os.listdir(tmp_path / "ranks"))
    events = [name for name in files if name.startswith("events.out.tfevents.")]
    assert len(events) == 1 and sorted(set(files) - set(events)) == sorted(FILES.values())
    holder = json.loads((tmp_path / "ranks" / FILES["lock"]).read_text())
    assert holder["command"].startswith("fastvae train")  # rank 0 held the folder, and no rank refused another
    tensorboard = EventAccumulator(str(tmp_path / "ranks"), size_guidance={"scalars": 0, "images": 0})
    tensorboard.Reload()
    assert [e.step for e in tensorboard.Scalars("train/loss")] == list(range(1, 7))
    assert [e.value for e in tensorboard.Scalars("train/loss")] == [r["loss"] for r in records]
    assert [e.step for e in tensorboard.Images("images/samples")] == [3, 6]


@pytest.mark.parametrize(
    "out, extra, message",
    [
        ("bad", ["--batch-size", "15"], "must divide evenly among 2 processes"),
        ("somefile/sub", [], "cannot create the run folder"),
    ],
)
def test_bad_input_under_torchrun_is_one_clear_line(tmp_path, out, extra, message):
    (tmp_path / "somefile").write_text("")
    done = train(tmp_path / out, "--steps", "2", *extra, nproc=2)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("fastvae train: error:")]
    assert len(ours) == 1 and message in ours[0]  # from rank 0 alone
    # torchrun reports a failed child with a traceback of its own launcher; none comes from fastvae's code.
    frames = [line for line in done.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [line for line in frames if f"{os.sep}fastvae{os.sep}" in line]
    assert sorted(os.listdir(tmp_path)) == ["somefile"]
