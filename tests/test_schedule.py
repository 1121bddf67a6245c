"""The learning-rate schedule: exact values, the value each optimizer step really used, and its place in the CLI."""

import math

import pytest
import torch

from fastvae.training.schedule import LR_SCHEDULES, learning_rate
from tests.test_cli import TINY, metrics, run


def test_cosine_values_at_its_ends_and_middle():
    assert learning_rate(0.004, "cosine", 0, 100) == 0.004
    assert learning_rate(0.004, "cosine", 50, 100) == pytest.approx(0.002, rel=1e-15)
    assert learning_rate(0.004, "cosine", 25, 100) == pytest.approx(0.002 * (1 + math.sqrt(0.5)), rel=1e-15)
    assert learning_rate(0.004, "cosine", 99, 100) == pytest.approx(0.002 * (1 - math.cos(math.pi / 100)), rel=1e-12)
    assert 0 < learning_rate(0.004, "cosine", 99, 100) < 1e-6  # the last step's is small, not 0
    assert learning_rate(0.004, "cosine", 1, 1) == 0.0  # one past the last step
    values = [learning_rate(1.0, "cosine", step, 30) for step in range(30)]
    assert values == sorted(values, reverse=True)
    assert all(learning_rate(0.004, "constant", step, 100) == 0.004 for step in (0, 50, 99))
    assert LR_SCHEDULES == ("constant", "cosine")
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        learning_rate(0.004, "linear", 0, 100)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_each_step_uses_and_logs_the_schedules_rate(tmp_path, monkeypatch, schedule):
    used = []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    status, _, stderr = run(
        "train", *TINY, "--steps", 8, "--lr", 0.01, "--lr-schedule", schedule, "--out", tmp_path / "r", "--quiet"
    )
    assert status == 0, stderr
    logged = [r["lr"] for r in metrics(tmp_path / "r")]
    assert logged == used  # what metrics.jsonl says is what Adam used
    if schedule == "constant":
        assert logged == [0.01] * 8
    else:
        assert logged[0] == 0.01 and logged[4] == pytest.approx(0.005, rel=1e-15)
        assert logged[2] == pytest.approx(0.005 * (1 + math.sqrt(0.5)), rel=1e-15)


def test_the_schedule_is_part_of_the_run_on_resume(tmp_path):
    out = tmp_path / "r"
    assert run("train", *TINY, "--steps", 4, "--lr-schedule", "constant", "--out", out, "--quiet")[0] == 0
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 6, "--lr-schedule", "cosine")
    assert status == 2 and "lr_schedule='constant'" in stderr and "keeps its settings" in stderr
    assert run("train", "--out", out, "--resume", "--steps", 6, "--quiet")[0] == 0
    assert [r["lr"] for r in metrics(out)] == [0.003] * 6
    status, _, stderr = run("train", *TINY, "--lr-schedule", "linear", "--out", tmp_path / "x")
    assert status == 2 and "--lr-schedule" in stderr and "invalid choice: 'linear'" in stderr


def test_checkpoints_from_before_the_schedule_keep_their_defaults(tmp_path):
    """A checkpoint without lr_schedule was trained with a constant rate and the old mlp's (512, 256) layers."""
    from fastvae.training.config import checkpoint_config

    config = checkpoint_config({"config": {"model": "mlp", "hidden": None, "lr": 1e-3, "latent_dim": 16}}, "old.pt")
    assert config.lr_schedule == "constant" and config.hidden == (512, 256) and config.latent_dim == 16
    config = checkpoint_config({"config": {"model": "conv", "hidden": None, "lr": 1e-3}}, "old.pt")
    assert config.lr_schedule == "constant" and config.hidden is None  # conv's widths come from the image size
    config = checkpoint_config({"config": {"model": "mlp", "hidden": None, "lr_schedule": "cosine"}}, "old.pt")
    assert config.hidden is None  # today's default (400,)
